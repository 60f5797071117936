"""`jrlhf annotate`: a terminal tool for people to rank sampled responses.

Input: JSONL rows `{"prompt": str, "responses": [str, ...]}` (extra fields are kept).
Output: the rankings layout the data builders read, `{"prompt", "responses", "ranks"}`, one row
appended per answer in one write and fsynced at once, so an interrupted session loses nothing and
a restart resumes at the first prompt not yet answered (a row torn by a crash is cut off and
reported on the restart).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import textwrap
from pathlib import Path

from jrlhf.data.rows import BadRow, ranks_from_scores, read_rows

HELP = ("Rank the responses: one number per response, 1 = best, equal numbers for ties "
        "(e.g. '2 1 3' or '1 1 2').  s = skip, q = quit.")


def row_key(prompt: str, responses: list[str]) -> str:
    return hashlib.sha1(json.dumps([prompt, responses]).encode()).hexdigest()


def parse_ranking(text: str, k: int) -> list[int]:
    """Ranks from a line of K numbers; raises ValueError with a message for a person.

    Ties are equal numbers; the numbers only order the responses (1 2 2 and 1 3 3 mean the
    same) and are returned as competition ranks (1 = best).
    """
    parts = text.replace(",", " ").split()
    if len(parts) != k:
        raise ValueError(f"expected {k} numbers, one per response, got {len(parts)}")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"expected whole numbers, got {text.strip()!r}") from None
    if any(v < 1 or v > k for v in values):
        raise ValueError(f"ranks must be between 1 and {k}")
    if len(set(values)) == 1 and k > 1:
        raise ValueError("all responses tie: that says nothing; use s to skip instead")
    return ranks_from_scores([-v for v in values])


def check_item(path: Path, line: int, row) -> dict:
    """`row` if it is `{"prompt": str, "responses": [str, str, ...]}` (extra fields kept).

    Raises:
        BadRow: naming the file, the line and the field.
    """
    if not isinstance(row, dict):
        raise BadRow(path, line, "<row>", 'expected a JSON object {"prompt": str, "responses": '
                                          f"[str, str, ...]}}, got {type(row).__name__}")
    if not isinstance(row.get("prompt"), str):
        raise BadRow(path, line, "prompt", "missing" if "prompt" not in row else
                     f"expected a string, got {type(row['prompt']).__name__}")
    responses = row.get("responses")
    if not isinstance(responses, list) or len(responses) < 2 or \
            not all(isinstance(r, str) for r in responses):
        raise BadRow(path, line, "responses", "missing" if "responses" not in row else
                     "expected a list of at least 2 strings")
    return row


def load_items(path: Path) -> list[dict]:
    """The samples to rank; any bad row raises `BadRow` naming file and line."""
    items = []
    for line, row in read_rows(path):
        if isinstance(row, BadRow):
            raise row
        items.append(check_item(path, line, row))
    return items


def _answer_key(out: Path, line: int, raw: bytes) -> str:
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise BadRow(out, line, "<row>", f"not valid UTF-8 ({err.reason} at byte {err.start})"
                     ) from None
    except json.JSONDecodeError as err:
        raise BadRow(out, line, "<row>", f"not valid JSON ({err.msg})") from None
    row = check_item(out, line, row)
    return row_key(row["prompt"], row["responses"])


def done_keys(out: Path, say=lambda text: None) -> set[str]:
    """Keys of the prompts already ranked in `out`.

    A torn last row (no newline, not a whole JSON row: a write cut short) is cut off and
    `say` tells so in one line; a whole last row without its newline gets one. Any other bad
    row raises `BadRow` naming `out` and its line.
    """
    if not out.exists():
        return set()
    if not out.is_file():
        raise ValueError(f"{out}: not a file (--out names the rankings file to append to)")
    data = out.read_bytes()
    *lines, tail = data.split(b"\n")
    keys = {_answer_key(out, i, raw) for i, raw in enumerate(lines, 1) if raw.strip()}
    if tail.strip():
        try:
            keys.add(_answer_key(out, len(lines) + 1, tail))
        except BadRow:
            with open(out, "r+b") as f:
                f.truncate(len(data) - len(tail))
                os.fsync(f.fileno())
            say(f"{out}:{len(lines) + 1}: removed a torn last row ({len(tail)} bytes of an "
                "interrupted write); the answers before it are kept")
        else:
            _append(out, b"\n")
    return keys


def _append(out: Path, data: bytes) -> None:
    """Append `data` in one write and fsync it: a kill leaves all of it or none (a torn row is
    still possible on a full disk or a crash of the machine; `done_keys` repairs it)."""
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def append_row(out: Path, row: dict) -> None:
    """Append one answer (a JSON line) to `out`, on disk when this returns."""
    _append(out, (json.dumps(row) + "\n").encode("utf-8"))


def run(inp: str | os.PathLike, out: str | os.PathLike, stdin=sys.stdin, stdout=sys.stdout,
        width: int = 100) -> int:
    inp, out = Path(inp), Path(out)
    say = lambda text="": (stdout.write(text + "\n"), stdout.flush())  # noqa: E731
    items = load_items(inp)
    done = done_keys(out, say)
    todo = [it for it in items if row_key(it["prompt"], it["responses"]) not in done]
    say(f"{len(items)} prompts, {len(items) - len(todo)} already ranked in {out}. {HELP}")
    for n, item in enumerate(todo, len(items) - len(todo) + 1):
        say()
        say(f"[{n}/{len(items)}] PROMPT")
        say(textwrap.indent(textwrap.fill(item["prompt"], width), "  "))
        for i, response in enumerate(item["responses"], 1):
            say(f"  ({i}) " + textwrap.fill(response, width, subsequent_indent="      "))
        while True:
            stdout.write(f"ranks for (1)..({len(item['responses'])}) > ")
            stdout.flush()
            try:
                line = stdin.readline()
            except KeyboardInterrupt:  # Ctrl-C: every answer given is already on disk
                line = ""
                say()
            if not line or line.strip().lower() == "q":
                say("stopped; answers so far are saved. Run the same command to resume.")
                return 0
            if line.strip().lower() == "s":
                break
            try:
                ranks = parse_ranking(line, len(item["responses"]))
            except ValueError as err:
                say(f"  ! {err}. {HELP}")
                continue
            append_row(out, {**item, "ranks": ranks})
            break
    say(f"all {len(items)} prompts done → {out}")
    return 0
