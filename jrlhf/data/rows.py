"""Reading local data files and validating their rows into four normalised layouts.

Sources: JSONL (`.jsonl`, `.json`, optionally `.gz`), Parquet, and a folder written by
`datasets`' `save_to_disk` (a `Dataset`, or a `DatasetDict` of one split; needs the optional
`datasets` package: `jrlhf[datasets]`). Rows may use TRL's layouts: `prompt`/`completion`,
`messages`, `prompt`/`chosen`/`rejected` and `chosen`/`rejected` alone (implicit prompt), each
as strings or as conversations (lists of `{"role", "content"}` messages). Every row becomes one
of:

- sft:      {"prompt": str, "response": str, "messages": str (JSON of the prompt turns or "")}
- rankings: {"prompt": str, "messages": str, "responses": [str, ...], "ranks": [int, ...]}
- prompts:  {"prompt": str, "messages": str, "max_new_tokens": int (the prompt's own bound on
            new tokens; 0 when the row gives none: the rollout's `max_new_tokens`)}

(pairwise preferences are rankings with two responses ranked [1, 2]). A bad row raises
`BadRow` naming the file, the line (1-based; the row index for Parquet and `datasets` folders)
and the field.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KINDS = ("sft", "rankings", "prompts")


class BadRow(ValueError):
    def __init__(self, path, line: int, field: str, why: str):
        self.path, self.line, self.field, self.why = str(path), line, field, why
        super().__init__(f"{path}:{line}: field {field!r}: {why}")


class MissingExtra(ModuleNotFoundError, ValueError):
    """An optional package a feature needs is not installed; the message names the extra.

    Also a `ValueError`, so the CLI reports it as its one error line."""


def _without_nones(value):
    """A row without its None (JSON null) fields: a null field is an absent one. Columnar
    files (Parquet, `datasets`, and JSONL written from them) store a key that some rows lack
    (`name` in one message, `messages` beside `prompt` rows) as None in the others."""
    if isinstance(value, dict):
        return {k: _without_nones(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nones(v) for v in value]
    return value


def read_rows(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """`(line number, decoded row)` for each row of a JSONL(.gz) or Parquet file, or of a
    `datasets` `save_to_disk` folder (`saved_dataset`).

    Undecodable rows are yielded as `BadRow` instances, so callers decide whether to raise.
    """
    path = Path(path)
    if path.is_dir():
        rows = saved_dataset(path)
        yield from ((i, _without_nones(row)) for i, row in enumerate(rows, start=1))
        return
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        yield from ((i, _without_nones(row)) for i, row in enumerate(rows, start=1))
        return
    if not name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        raise ValueError(f"{path}: unsupported data file (use .jsonl, .jsonl.gz, .parquet or a "
                         "folder written by datasets' save_to_disk)")
    opener = gzip.open if name.endswith(".gz") else open
    try:
        yield from _json_lines(path, opener)
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        # A damaged file is an error whatever `on_bad_row` says: no row of it can be trusted.
        kind = "gzip-compressed JSONL" if opener is gzip.open else "JSONL"
        raise ValueError(f"{path}: cannot be read as {kind} ({type(err).__name__}: {err})")\
            from None


def saved_dataset(path: Path):
    """The `datasets.Dataset` saved in folder `path` by `save_to_disk` (a `DatasetDict`'s
    folder: its only split; with several, the error names the split folders to choose from).

    Raises:
        ValueError: a folder that `save_to_disk` did not write, or a DatasetDict of several
            splits. MissingExtra: `datasets` is not installed.
    """
    if (path / "dataset_dict.json").is_file():
        try:
            splits = list(json.loads((path / "dataset_dict.json").read_text())["splits"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path / 'dataset_dict.json'}: not a DatasetDict index "
                             f"({type(err).__name__}: {err})") from None
        if len(splits) != 1:
            raise ValueError(f"{path}: a DatasetDict of splits {', '.join(splits)}; name one "
                             f"split's folder, e.g. {path / splits[0]}")
        path = path / splits[0]
    if not (path / "state.json").is_file():
        raise ValueError(f"{path}: a folder, but not one written by datasets' save_to_disk (no "
                         "state.json or dataset_dict.json); data files are .jsonl, .jsonl.gz or "
                         ".parquet")
    try:
        import datasets
    except ModuleNotFoundError:
        raise MissingExtra(f"{path}: reading a folder written by datasets' save_to_disk needs "
                           "the datasets package: pip install 'jrlhf[datasets]'",
                           name="datasets") from None
    try:
        return datasets.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 - datasets and pyarrow raise many types here
        text = " ".join(str(err).split())
        raise ValueError(f"{path}: datasets cannot load it ({type(err).__name__}: {text})")\
            from None


def _json_lines(path: Path, opener) -> Iterator[tuple[int, Any]]:
    with opener(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield i, BadRow(path, i, "<row>", f"not valid UTF-8 ({err.reason} at byte "
                                                  f"{err.start})")
                continue
            try:
                yield i, _without_nones(json.loads(text))
            except json.JSONDecodeError as err:
                yield i, BadRow(path, i, "<row>", f"not valid JSON ({err.msg})")


@dataclass
class Row:
    path: str
    line: int
    data: dict

    def fail(self, field: str, why: str):
        raise BadRow(self.path, self.line, field, why)

    def text(self, field: str, *, allow_empty: bool = False) -> str:
        if field not in self.data:
            self.fail(field, "missing")
        value = self.data[field]
        if not isinstance(value, str):
            self.fail(field, f"expected a string, got {type(value).__name__}")
        if not allow_empty and not value.strip():
            self.fail(field, "empty")
        return value


def _messages(row: Row, field: str = "messages") -> list[dict]:
    msgs = row.data.get(field)
    if not isinstance(msgs, list) or not msgs:
        row.fail(field, "expected a non-empty list of {role, content} messages")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
                m.get("content"), str):
            row.fail(f"{field}[{j}]", "expected {\"role\": str, \"content\": str}")
        if m["role"] == "user" and not m["content"].strip():
            row.fail(f"{field}[{j}].content", "empty (a user turn must say something)")
    if not msgs[-1]["content"].strip():
        row.fail(f"{field}[{len(msgs) - 1}].content", "empty")
    return msgs


def _conversation_prompt(row: Row, msgs: list[dict], field: str) -> dict:
    """`prompt` (the last turn's text) and `messages` (JSON) of prompt turns `msgs` that a
    response answers: they must not end with the assistant's own turn."""
    if msgs[-1]["role"] == "assistant":
        row.fail(f"{field}[{len(msgs) - 1}].role", "the prompt ends with an assistant turn; it "
                                                   "must end with the turn the response answers")
    return {"prompt": msgs[-1]["content"], "messages": json.dumps(msgs)}


def _prompt(row: Row) -> dict:
    """`prompt` text and `messages` (JSON) from a `prompt` string, chat `messages`, or TRL's
    conversational `prompt` (a list of messages)."""
    if isinstance(row.data.get("prompt"), list):
        return _conversation_prompt(row, _messages(row, "prompt"), "prompt")
    if "messages" in row.data and "prompt" not in row.data:
        msgs = _messages(row)
        return {"prompt": msgs[-1]["content"], "messages": json.dumps(msgs)}
    return {"prompt": row.text("prompt"), "messages": ""}


def _reply(row: Row, field: str) -> str:
    """The text of response `field`: a string, or TRL's conversational form, a list of one
    assistant message."""
    if not isinstance(row.data.get(field), list):
        return row.text(field)
    msgs = _messages(row, field)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        row.fail(field, f"expected one assistant message, got roles "
                        f"{[m['role'] for m in msgs]}")
    return msgs[0]["content"]


def normalise_sft(row: Row) -> dict:
    data = row.data
    if "messages" in data and "response" not in data and "completion" not in data:
        msgs = _messages(row)
        if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
            row.fail("messages", "the last message must be the assistant's reply to a prompt")
        if not msgs[-1]["content"].strip():
            row.fail("messages[-1].content", "empty")
        return {"prompt": msgs[-2]["content"], "response": msgs[-1]["content"],
                "messages": json.dumps(msgs[:-1])}
    # TRL's prompt-completion layout, or ours (prompt, response)
    field = "completion" if "completion" in data and "response" not in data else "response"
    return {**_prompt(row), "response": _reply(row, field)}


def split_shared_prefix(chosen: str, rejected: str, marker: str = "\n\nAssistant:"):
    """Anthropic-HH layout: two dialogues sharing everything up to the last assistant turn.

    Returns `(prompt, chosen_reply, rejected_reply)`; the prompt ends with `marker`.
    """
    cut = chosen.rfind(marker)
    if cut < 0 or not rejected.startswith(chosen[: cut + len(marker)]):
        return None
    end = cut + len(marker)
    return chosen[:end], chosen[end:], rejected[end:]


def split_shared_turns(row: Row) -> tuple[dict, str, str]:
    """TRL's implicit prompt for conversations: `chosen` and `rejected` share their leading
    messages (the prompt); after them each holds one assistant message (the reply).

    Returns `(prompt, chosen_reply, rejected_reply)`, the prompt as `_prompt` gives it.
    """
    chosen, rejected = _messages(row, "chosen"), _messages(row, "rejected")
    if chosen == rejected:
        row.fail("rejected", "identical to 'chosen': the pair gives no preference")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        row.fail("chosen[0]", "no 'prompt' field and no leading messages shared with "
                              "'rejected' (the implicit prompt)")
    replies = []
    for field, msgs in (("chosen", chosen), ("rejected", rejected)):
        rest = msgs[n:]
        if len(rest) != 1 or rest[0]["role"] != "assistant":
            row.fail(f"{field}[{n}:]", f"after the {n} messages shared by 'chosen' and "
                                       f"'rejected' (the prompt) expected one assistant "
                                       f"message, got roles {[m['role'] for m in rest]}")
        replies.append(rest[0]["content"])
    return _conversation_prompt(row, chosen[:n], "chosen"), replies[0], replies[1]


def ranks_from_scores(scores: list[float]) -> list[int]:
    """Competition ranks from scores (higher score = better = lower rank; ties share a rank)."""
    return [1 + sum(other > s for other in scores) for s in scores]


def _check_ranked_apart(row: Row, responses: list[str], ranks: list, field: str) -> None:
    """Refuse two identical responses (after stripping) ranked differently: the row prefers a
    text over itself. `field` formats the offending response's field from its index."""
    seen = {}
    for j, (text, rank) in enumerate(zip(responses, ranks)):
        i = seen.setdefault(text.strip(), j)
        if ranks[i] != rank:
            row.fail(field.format(j), f"identical to {field.format(i)} but ranked {rank}, not "
                                      f"{ranks[i]}: a response cannot be preferred to itself")


def normalise_rankings(row: Row) -> dict:
    data = row.data
    if "responses" in data:
        prompt = _prompt(row)
        responses = data["responses"]
        if not isinstance(responses, list) or len(responses) < 2:
            row.fail("responses", "expected a list of at least 2 responses")
        for j, r in enumerate(responses):
            if not isinstance(r, str):
                row.fail(f"responses[{j}]", f"expected a string, got {type(r).__name__}")
            if not r.strip():
                row.fail(f"responses[{j}]", "empty")
        ranks = data.get("ranks")
        if not isinstance(ranks, list) or len(ranks) != len(responses):
            row.fail("ranks", f"expected a list of {len(responses)} integers")
        if not all(isinstance(r, int) and not isinstance(r, bool) and 1 <= r < 2**31
                   for r in ranks):
            row.fail("ranks", f"expected integers from 1 (best) to 2**31 - 1, got {ranks}")
        if len(set(ranks)) < 2:
            row.fail("ranks", "all responses tie: the row gives no preference")
        _check_ranked_apart(row, responses, ranks, "responses[{}]")
        return {**prompt, "responses": list(responses), "ranks": list(ranks)}
    if "completions" in data:  # UltraFeedback-style ratings
        prompt = {"prompt": data.get("instruction") or row.text("prompt"), "messages": ""}
        if not isinstance(prompt["prompt"], str) or not prompt["prompt"].strip():
            row.fail("instruction", "missing or empty")
        comps = data["completions"]
        if not isinstance(comps, list) or len(comps) < 2:
            row.fail("completions", "expected a list of at least 2 completions")
        responses, scores = [], []
        for j, c in enumerate(comps):
            if not isinstance(c, dict):
                row.fail(f"completions[{j}]", "expected an object")
            text = c.get("response")
            if not isinstance(text, str) or not text.strip():
                row.fail(f"completions[{j}].response", "missing or empty")
            score = next((c[k] for k in ("overall_score", "score", "rating") if k in c), None)
            if not isinstance(score, (int, float)) or isinstance(score, bool):
                row.fail(f"completions[{j}].overall_score", "missing or not a number")
            responses.append(text)
            scores.append(float(score))
        ranks = ranks_from_scores(scores)
        if len(set(ranks)) < 2:
            row.fail("completions", "all completions have the same score")
        _check_ranked_apart(row, responses, ranks, "completions[{}].response")
        return {**prompt, "responses": responses, "ranks": ranks}
    if "chosen" in data and "rejected" in data:
        if "prompt" in data or "messages" in data:
            prompt = _prompt(row)
            chosen, rejected = _reply(row, "chosen"), _reply(row, "rejected")
        elif isinstance(data["chosen"], list) or isinstance(data["rejected"], list):
            prompt, chosen, rejected = split_shared_turns(row)
        else:
            chosen, rejected = row.text("chosen"), row.text("rejected")
            split = split_shared_prefix(chosen, rejected)
            if split is None:
                row.fail("chosen", "no 'prompt' field and no shared dialogue prefix ending in "
                                   "'\\n\\nAssistant:' with 'rejected'")
            prompt = {"prompt": split[0], "messages": ""}
            chosen, rejected = split[1], split[2]
            if not chosen.strip():
                row.fail("chosen", "empty after removing the shared prompt")
            if not rejected.strip():
                row.fail("rejected", "empty after removing the shared prompt")
        if chosen.strip() == rejected.strip():
            row.fail("rejected", "identical to 'chosen': the pair gives no preference")
        return {**prompt, "responses": [chosen, rejected], "ranks": [1, 2]}
    row.fail("responses", "missing: expected {prompt, responses, ranks}, {[prompt,] chosen, "
                          "rejected} or {instruction, completions}")


def normalise_prompts(row: Row) -> dict:
    budget = row.data.get("max_new_tokens", 0)
    if "max_new_tokens" in row.data and not (
            isinstance(budget, int) and not isinstance(budget, bool) and 1 <= budget < 2**31):
        row.fail("max_new_tokens", f"expected a positive integer (this prompt's own bound on "
                                   f"new tokens), got {budget!r}")
    return {**_prompt(row), "max_new_tokens": budget}


NORMALISERS = {"sft": normalise_sft, "rankings": normalise_rankings, "prompts": normalise_prompts}


@dataclass
class LoadReport:
    path: str
    kind: str
    rows: int = 0
    skipped: int = 0
    errors: list[str] | None = None

    def summary(self) -> str:
        text = f"{self.path}: {self.rows} {self.kind} rows"
        if self.skipped:
            text += f", {self.skipped} bad rows skipped (first: {self.errors[0]})"
        return text


def load_rows(path: str | os.PathLike, kind: str, on_bad_row: str = "error"):
    """All normalised rows of a file, and a `LoadReport`.

    `on_bad_row="error"` raises `BadRow` at the first bad row; `"skip"` counts bad rows in the
    report instead (never silently).
    """
    if kind not in NORMALISERS:
        raise ValueError(f"unknown data kind {kind!r}; choose from {', '.join(KINDS)}")
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    report = LoadReport(str(path), kind, errors=[])
    out = []
    for line, data in read_rows(path):
        try:
            if isinstance(data, BadRow):
                raise data
            if not isinstance(data, dict):
                raise BadRow(path, line, "<row>", f"expected an object, got {type(data).__name__}")
            out.append(NORMALISERS[kind](Row(str(path), line, data)))
        except BadRow as err:
            if on_bad_row == "error":
                raise
            report.skipped += 1
            report.errors.append(str(err))
    report.rows = len(out)
    if not out:
        raise ValueError(f"{path}: no usable {kind} rows"
                         + (f" ({report.skipped} bad, first: {report.errors[0]})"
                            if report.skipped else ""))
    return out, report
