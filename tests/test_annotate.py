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


def samples_file(tmp_path, n=3):
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"P{i}", "responses": ["a", "b"]}) + "\n"
                            for i in range(n)))
    return path


def answer(answers, samples, out):
    """`run` with typed `answers`; returns the screen."""
    import io

    from jrlhf.annotate import run

    screen = io.StringIO()
    assert run(samples, out, stdin=io.StringIO("".join(a + "\n" for a in answers)),
               stdout=screen) == 0
    return screen.getvalue()


def test_a_torn_last_row_is_cut_off_saying_so_and_the_session_continues(tmp_path):
    samples, out = samples_file(tmp_path), tmp_path / "ranks.jsonl"
    answer(["2 1", "q"], samples, out)
    whole = out.read_bytes()
    torn = b'{"prompt": "P1", "responses": ["a", "b"], "ran'  # a write cut short
    out.write_bytes(whole + torn)
    screen = answer(["1 2", "2 1"], samples, out)
    assert f"{out}:2: removed a torn last row ({len(torn)} bytes of an interrupted write)" \
        in screen
    assert "1 already ranked" in screen and "all 3 prompts done" in screen
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"], r["ranks"]) for r in rows] == [("P0", [2, 1]), ("P1", [1, 2]),
                                                         ("P2", [2, 1])]


def test_a_whole_last_row_without_its_newline_is_kept(tmp_path):
    samples, out = samples_file(tmp_path, 2), tmp_path / "ranks.jsonl"
    answer(["1 2", "q"], samples, out)
    out.write_bytes(out.read_bytes().rstrip(b"\n"))
    screen = answer(["2 1"], samples, out)
    assert "removed" not in screen and "1 already ranked" in screen
    assert [json.loads(line)["ranks"] for line in out.read_text().splitlines()] == [[1, 2],
                                                                                    [2, 1]]


KILLED_WRITE = """
import os, signal, sys
import jrlhf.annotate as annotate

def torn(out, data, writes=[]):
    writes.append(data)
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, data if len(writes) == 1 else data[: len(data) // 2])
    if len(writes) == 2:
        os.kill(os.getpid(), signal.SIGKILL)

annotate._append = torn
annotate.run(sys.argv[1], sys.argv[2])
"""


def test_a_kill_during_an_annotate_write_is_repaired_on_the_next_session(tmp_path):
    """SIGKILL half-way through writing the second answer: the next session cuts the torn
    row off (saying so), keeps the first answer and asks the second prompt again."""
    samples, out = samples_file(tmp_path), tmp_path / "ranks.jsonl"
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(samples), str(out)],
                            cwd=ROOT, input="2 1\n1 2\n", capture_output=True, text=True,
                            timeout=120, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert out.read_bytes().count(b"\n") == 1 and not out.read_bytes().endswith(b"\n")
    screen = answer(["1 2", "1 2"], samples, out)
    assert f"{out}:2: removed a torn last row" in screen
    assert [json.loads(line)["ranks"] for line in out.read_text().splitlines()] == [
        [2, 1], [1, 2], [1, 2]]
    from jrlhf.data import load_rows

    assert load_rows(out, "rankings")[1].rows == 3


@pytest.mark.parametrize("where, content, expected", [
    ("samples", '{"prompt": "A", "responses": ["x", "y"]}\n[1, 2]\n',
     "samples.jsonl:2: field '<row>': expected a JSON object"),
    ("samples", '{"prompt": "A"}\n', "samples.jsonl:1: field 'responses': missing"),
    ("samples", '{"responses": ["x", "y"]}\n', "samples.jsonl:1: field 'prompt': missing"),
    ("samples", '{"prompt": 7, "responses": ["x", "y"]}\n',
     "samples.jsonl:1: field 'prompt': expected a string, got int"),
    ("samples", '{"prompt": "A", "responses": ["x"]}\n',
     "samples.jsonl:1: field 'responses': expected a list of at least 2 strings"),
    ("samples", '\n\n{"prompt": "A", "responses": ["x", "y"\n',
     "samples.jsonl:3: field '<row>': not valid JSON"),
    ("out", '{"prompt": "A", "responses": ["x", "y"], "ranks": [1, 2]}\n{"prompt": \n{}\n',
     "ranks.jsonl:2: field '<row>': not valid JSON"),
    ("out", '"just a string"\n', "ranks.jsonl:1: field '<row>': expected a JSON object"),
])
def test_a_bad_row_is_one_line_naming_file_and_line(where, content, expected, tmp_path, capfd):
    from jrlhf.cli import main

    samples, out = samples_file(tmp_path), tmp_path / "ranks.jsonl"
    (samples if where == "samples" else out).write_text(content)
    assert main(["annotate", str(samples), "--out", str(out)]) == 2
    captured = capfd.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert captured.err.startswith(f"jrlhf annotate: error: {tmp_path}/{expected}"), captured.err
    assert captured.err.count("\n") == 1
