"""The ranking tool, driven through a pseudo-terminal as a person would use it."""

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jrlhf.annotate import parse_ranking

ROOT = Path(__file__).parent.parent


def test_parse_ranking():
    assert parse_ranking("2 1 3", 3) == [2, 1, 3]
    assert parse_ranking("1, 1, 2", 3) == [1, 1, 3]  # a tie, stored as competition ranks
    for bad, message in (("1 2", "expected 3 numbers"), ("1 2 x", "whole numbers"),
                         ("1 2 4", "between 1 and 3"), ("2 2 2", "all responses tie")):
        with pytest.raises(ValueError, match=message):
            parse_ranking(bad, 3)


class Terminal:
    """A child process on a pty: `expect` text on its screen, `type` a line."""

    def __init__(self, *args):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "jrlhf.cli", *args], cwd=ROOT,
                                     stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
        os.close(slave)
        self.screen = ""

    def expect(self, text, timeout=60):
        deadline = time.time() + timeout
        while text not in self.screen:
            if time.time() > deadline:
                raise AssertionError(f"{text!r} never appeared; screen:\n{self.screen}")
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    self.screen += os.read(self.master, 4096).decode(errors="replace")
                except OSError:
                    break
        return self.screen

    def type(self, line):
        os.write(self.master, (line + "\n").encode())


def test_annotate_in_a_terminal_resumes_after_kill(tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "Review A", "responses": ["great", "bad", "fine"]},
        {"prompt": "Review B", "responses": ["dull", "lovely"]},
    ]))
    out = tmp_path / "rankings.jsonl"
    term = Terminal("annotate", str(samples), "--out", str(out))
    term.expect("[1/2] PROMPT")
    term.expect("ranks for (1)..(3) >")
    term.type("1 2")
    term.expect("expected 3 numbers, one per response, got 2")
    term.type("1 3 2")
    term.expect("[2/2] PROMPT")
    term.proc.send_signal(signal.SIGKILL)  # interrupted mid-session: nothing answered is lost
    term.proc.wait()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"prompt": "Review A", "responses": ["great", "bad", "fine"],
                     "ranks": [1, 3, 2]}]

    term = Terminal("annotate", str(samples), "--out", str(out))
    term.expect("1 already ranked")
    term.expect("[2/2] PROMPT")
    term.type("2 1")
    term.expect("all 2 prompts done")
    assert term.proc.wait(timeout=30) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[1]["ranks"] == [2, 1] and len(rows) == 2
    # The output is the rankings layout the TFDS builder reads.
    from jrlhf.data import load_rows

    assert load_rows(out, "rankings")[1].rows == 2


def test_ctrl_c_stops_cleanly_keeping_every_answer(tmp_path):
    """Ctrl-C at the prompt: a one-line goodbye, exit 0, the answers given so far on disk."""
    import io

    from jrlhf.annotate import run

    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"prompt": f"P{i}", "responses": ["a", "b"]}) + "\n"
                               for i in range(3)))

    class CtrlCAfterOne:
        answers = iter(["1 2\n"])

        def readline(self):
            for line in self.answers:
                return line
            raise KeyboardInterrupt

    out, screen = tmp_path / "ranks.jsonl", io.StringIO()
    assert run(samples, out, stdin=CtrlCAfterOne(), stdout=screen) == 0
    assert "stopped; answers so far are saved" in screen.getvalue()
    assert [json.loads(line)["ranks"] for line in out.read_text().splitlines()] == [[1, 2]]
