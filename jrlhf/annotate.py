"""`jrlhf annotate`: a terminal tool for people to rank sampled responses.

Input: JSONL rows `{"prompt": str, "responses": [str, ...]}` (extra fields are kept).
Output: the rankings layout the data builders read, `{"prompt", "responses", "ranks"}`, one row
appended per answer and flushed + fsynced at once, so an interrupted session loses nothing and
a restart resumes at the first prompt not yet answered.
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


def load_items(path: Path) -> list[dict]:
    items = []
    for line_no, row in read_rows(path):
        if isinstance(row, BadRow):
            raise row
        responses = row.get("responses") if isinstance(row, dict) else None
        if not isinstance(row.get("prompt"), str) or not isinstance(responses, list) or \
                len(responses) < 2 or not all(isinstance(r, str) for r in responses):
            raise BadRow(path, line_no, "<row>", "expected {\"prompt\": str, \"responses\": "
                                                 "[str, str, ...]}")
        items.append(row)
    return items


def done_keys(out: Path) -> set[str]:
    if not out.exists():
        return set()
    keys = set()
    for line in out.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            keys.add(row_key(row["prompt"], row["responses"]))
    return keys


def append_row(out: Path, row: dict) -> None:
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run(inp: str | os.PathLike, out: str | os.PathLike, stdin=sys.stdin, stdout=sys.stdout,
        width: int = 100) -> int:
    inp, out = Path(inp), Path(out)
    items = load_items(inp)
    done = done_keys(out)
    todo = [it for it in items if row_key(it["prompt"], it["responses"]) not in done]
    say = lambda text="": (stdout.write(text + "\n"), stdout.flush())  # noqa: E731
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
