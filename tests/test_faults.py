"""Faults injected into a real `jrlhf pipeline` process: SIGKILL at random points — between
steps, during checkpoint writes (also the very first one, before anything is committed), while
rankings are generated, during evaluation and export — and SIGTERM; every `--resume` continues
to exactly the result of one uninterrupted run: metrics, rankings, summary and exported weights,
byte for byte.

The uninterrupted run is also the end-to-end check of the tiny pipeline (report, TensorBoard,
leaderboard, an export transformers loads with our logits, a second `--resume` that trains
nothing).

Below it, SIGKILL while a command writes its outputs (the point drawn from the same seed): an
evaluation between its files (each point; and `jrlhf grpo` then resumed), `jrlhf export` over a
previous export, `jrlhf annotate` in the middle of appending an answer."""

import hashlib
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import transformers

from jrlhf.report import read_metrics

ROOT = Path(__file__).parent.parent
SHORT = ["reward.steps=3", "ppo.iterations=3", "data.num_ranking_prompts=16",
         "reward.batch_size=2", "data.num_eval_prompts=4", "run.log_every=1",
         "run.save_every=1"]
SEED = int(os.environ.get("JRLHF_FAULT_SEED", "0"))  # another seed explores other points


def start(out: Path, resume: bool) -> subprocess.Popen:
    args = ["pipeline", "--config", str(ROOT / "configs" / "tiny.py"),
            "--set", f"run.out_dir={out}"]
    for change in SHORT:
        args += ["--set", change]
    return subprocess.Popen(
        [sys.executable, "-m", "jrlhf.cli", *args, *(["--resume"] if resume else [])],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONUNBUFFERED": "1"})


def line_key(line: str) -> str | None:
    """`[sft 3]`, `[rankings]`, `[eval]`, `[export]`: where in the pipeline a line was printed."""
    match = re.match(r"(\[[a-z/]+(?: \d+)?\]) (\w+)", line)
    if not match or match.group(1) in ("[model]", "[run]") or \
            match.group(2) in ("resumed", "preempted", "SIGTERM"):
        return None  # printed at every start, or by a resumed / preempted stage
    return match.group(1)


class Watched:
    """A pipeline process whose output lines arrive on a queue (read by a thread)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines, self.text = proc, queue.Queue(), []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:  # bytes: a kill can cut a multi-byte character in half
            for line in self.proc.stdout:
                self.lines.put(line.decode("utf-8", "replace"))
        finally:
            self.lines.put(None)

    def next_line(self, timeout: float) -> str | None:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return ""
        if line is not None:
            self.text.append(line)
        return line

    def finish(self) -> tuple[int, str]:
        code = self.proc.wait(timeout=600)
        while self.next_line(60) not in (None, ""):
            pass
        return code, "".join(self.text)


def writing_checkpoint(folder: Path) -> bool:
    """Orbax writes a checkpoint into a temporary folder and renames it when committed."""
    return folder.is_dir() and any("tmp" in p.name for p in folder.iterdir())


def interrupt_at(watched: Watched, point: tuple, order: dict, out: Path, rng) -> str:
    """Send the point's signal when the process reaches it: a printed line at or past the point
    (after a random delay of up to 0.3 s), or a checkpoint being written in a stage's folder.
    Returns the process's output."""
    kind, where, sig = point
    folder = out / where / "checkpoints" if kind == "write" else None
    while True:
        if folder is not None and writing_checkpoint(folder):
            break
        line = watched.next_line(0.002 if folder is not None else 1.0)
        if line is None:
            code, text = watched.finish()
            raise AssertionError(f"the run ended (exit {code}) before {point}:\n{text}")
        key = line_key(line) if line else None
        if kind == "line" and key in order and order[key] >= order[where]:
            # A random moment after the line; none after evaluation and export, which the
            # run's last, short stages would outlast.
            time.sleep(0 if where in ("[eval]", "[export]") else rng.uniform(0, 0.3))
            break
    watched.proc.send_signal(sig)
    code, text = watched.finish()
    if sig == signal.SIGTERM:
        assert code == 0 and "preempted" in text and "resume with --resume" in text, text
    else:
        assert code == -signal.SIGKILL, text
    return text


def comparable_rows(out: Path):
    """metrics.jsonl without wall-clock columns."""
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s/"))}
            for r in read_metrics(out / "metrics.jsonl")]


def summary(out: Path) -> dict:
    """summary.json without the wall time, paths relative to the run folder."""
    text = (out / "summary.json").read_text().replace(str(out), "<run>")
    return {k: v for k, v in json.loads(text).items() if k != "seconds"}


def check_end_to_end(out: Path, text: str):
    result = summary(out)
    for key in ("score_sft", "score_ppo", "kl_ppo_to_sft"):
        assert np.isfinite(result[key])
    assert "held-out annotator score" in text and "exported HF:" in text
    assert {r["stage"] for r in read_metrics(out / "metrics.jsonl")} == {"sft", "reward", "ppo"}
    assert (out / "report.png").stat().st_size > 10_000
    assert (out / "config.json").exists() and (out / "ppo" / "config.json").exists()
    assert list((out / "tensorboard" / "ppo").glob("events.out.tfevents.*"))
    assert "BT rating" in (out / "leaderboard.txt").read_text()
    # The exported policy loads in transformers with our logits.
    import torch

    from jrlhf import models

    cfg, params = models.load_pretrained(out / "export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "export").eval()
    ids = np.arange(1, 13)[None]
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(models.forward(cfg, params, ids, np.ones_like(ids)), ref,
                               atol=1e-4, rtol=0)


def kill_points(order: dict, rng: random.Random) -> list[tuple]:
    """Six interruptions in pipeline order: SIGKILL during the very first checkpoint write
    (SFT step 1, nothing committed yet) and at a random SFT step; SIGTERM as SFT ends (it
    lands in the rankings stage, which finishes, and the run stops before the reward stage);
    SIGKILL during the reward model's first checkpoint write; SIGTERM at a random PPO step;
    SIGKILL at a random later point (a PPO step, evaluation or export)."""
    keys = sorted(order, key=order.get)
    sft = [k for k in keys if re.fullmatch(r"\[sft \d+\]", k) and k != "[sft 1]"]
    ppo = [k for k in keys if k.startswith("[ppo ")]
    kill, term = signal.SIGKILL, signal.SIGTERM
    points = [("write", "sft", kill)]
    points += [("line", rng.choice(sft), kill)]
    points += [("line", "[sft]", term), ("write", "reward", kill)]
    preempt = rng.choice(ppo)
    later = [k for k in keys if k in ("[eval]", "[export]") or k in ppo[ppo.index(preempt) + 1:]]
    points += [("line", preempt, term), ("line", rng.choice(later), kill)]
    return points


@pytest.mark.slow
def test_pipeline_killed_at_random_points_resumes_to_the_uninterrupted_result(tmp_path):
    full = tmp_path / "full"
    code, text = Watched(start(full, resume=False)).finish()
    assert code == 0, text
    check_end_to_end(full, text)
    order = {}
    for line in text.splitlines():
        key = line_key(line)
        if key and key not in order:
            order[key] = len(order)
    assert {"[sft 12]", "[rankings]", "[reward 3]", "[ppo 3]", "[eval]", "[export]"} <= set(order)

    rng = random.Random(SEED)
    out = tmp_path / "cut"
    points = kill_points(order, rng)
    for i, point in enumerate(points):
        text = interrupt_at(Watched(start(out, resume=i > 0)), point, order, out, rng)
        left = {stage: sorted(p.name for p in (out / stage / "checkpoints").iterdir())
                for stage in ("sft", "reward", "ppo") if (out / stage / "checkpoints").is_dir()}
        print(f"{point[2].name} at {point[:2]}: checkpoints {left}")
        if point[2] == signal.SIGTERM:  # a preempted stage ends the run: nothing later ran
            assert not (out / "export").exists() and not (out / "summary.json").exists()
            saved = re.search(r"\[(\w+)\] SIGTERM: saved step (\d+)", text)
            if saved:  # inside a training loop: that step was checkpointed before stopping
                stage, step = saved.groups()
                assert step in left[stage], (text, left)
                rows = [r for r in read_metrics(out / "metrics.jsonl") if r["stage"] == stage]
                assert rows[-1]["step"] == int(step)
    code, text = Watched(start(out, resume=True)).finish()
    assert code == 0, text
    assert "resumed from step" in text

    assert comparable_rows(out) == comparable_rows(full)
    assert summary(out) == summary(full)
    for name in ("data/rankings.jsonl", "export/model.safetensors",
                 "reward/export/model.safetensors", "comparisons.jsonl", "samples.jsonl",
                 "leaderboard.txt", "evaluation.json"):
        assert (out / name).read_bytes() == (full / name).read_bytes(), (points, name)
    assert json.loads((out / "evaluation.json").read_text())["complete"]
    assert not list(out.rglob("*.tmp"))

    # A finished run resumed again finds every stage done and trains nothing.
    code, again = Watched(start(full, resume=True)).finish()
    assert code == 0, again
    assert "resumed from step 12" in again and "resumed from step 3" in again
    assert not any(line_key(line) in order and re.match(r"\[\w+ \d+\]", line)
                   for line in again.splitlines())


# ----------------------------------------------------------------------------------------------
# SIGKILL while one command writes its outputs: an evaluation's files, `jrlhf export`,
# `jrlhf annotate`. Each point is drawn from the seeded RNG (or, for evaluations, each one).

def killed_child(args: list[str], env=None) -> str:
    """Run `python <args>` until it prints KILL ME (it then waits), SIGKILL it; its output."""
    child = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})
    seen = []
    try:
        for line in iter(child.stdout.readline, ""):
            seen.append(line)
            if line.startswith("KILL ME"):
                break
        else:
            raise AssertionError("the child ended unkilled:\n" + "".join(seen))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    return "".join(seen)


# The `point`-th write (0-based) of an evaluation's files (`report.write_evaluation`: marker,
# three files, marker) is cut short: half its temp file written, then the kill. Run as
# `-c CUT_EVALUATION_WRITE point (folder contents.json | cli args)`.
CUT_EVALUATION_WRITE = """
import json, sys, time
from pathlib import Path
from jrlhf import report

point, writes, original = int(sys.argv[1]), [], report.write_atomically
EVALUATION = {"evaluation.json", "comparisons.jsonl", "leaderboard.txt", "samples.jsonl"}

def write_atomically(path, text):
    if Path(path).name in EVALUATION:
        writes.append(Path(path).name)
    if len(writes) == point + 1:
        Path(str(path) + ".tmp").write_text(text[: len(text) // 2])
        print("KILL ME", writes, flush=True)
        time.sleep(600)
    original(path, text)

report.write_atomically = write_atomically
if sys.argv[2] == "cli":
    from jrlhf.cli import main
    sys.exit(main(sys.argv[3:]))
report.write_evaluation(Path(sys.argv[2]), "eval", json.loads(Path(sys.argv[3]).read_text()))
"""

OLD_EVALUATION = {"comparisons.jsonl": '{"a": "sft", "b": "ppo", "winner": "a"}\n',
                  "leaderboard.txt": " 1  sft  1100.0\n 2  ppo  900.0\n",
                  "samples.jsonl": '{"prompt": "P0", "sft": "fine", "ppo": "dull"}\n'}
NEW_EVALUATION = {"comparisons.jsonl": '{"a": "sft", "b": "ppo", "winner": "b"}\n' * 2,
                  "leaderboard.txt": " 1  ppo  1150.0\n 2  sft  850.0\n",
                  "samples.jsonl": '{"prompt": "P0", "sft": "ok", "ppo": "superb"}\n'
                                   '{"prompt": "P1", "sft": "meh", "ppo": "lovely"}\n'}


@pytest.mark.parametrize("point", range(5))
def test_a_kill_between_evaluation_files_leaves_a_set_its_marker_vouches_for(point, tmp_path):
    """An evaluation over a previous one, killed during its write number `point` (0: the
    marker saying incomplete; 1-3: comparisons, leaderboard, samples; 4: the completing
    marker). The folder then holds the previous complete set, or files that do mix the two
    evaluations under a marker saying so; the next evaluation leaves its complete set."""
    from jrlhf.report import remove_temp_files
    from jrlhf.report import IncompleteEvaluation, evaluation_files, write_evaluation

    folder = tmp_path / "run"
    folder.mkdir()
    write_evaluation(folder, "eval", OLD_EVALUATION)
    contents = tmp_path / "new.json"
    contents.write_text(json.dumps(NEW_EVALUATION))
    said = killed_child(["-c", CUT_EVALUATION_WRITE, str(point), str(folder), str(contents)])
    names = ["evaluation.json", *NEW_EVALUATION, "evaluation.json"]
    assert f"KILL ME {names[:point + 1]}" in said
    on_disk = {name: (folder / name).read_text() for name in NEW_EVALUATION}
    if point == 0:
        assert {n: p.read_text() for n, p in evaluation_files(folder).items()} == OLD_EVALUATION
    else:
        replaced = names[1:point]
        assert on_disk == {n: (NEW_EVALUATION if n in replaced else OLD_EVALUATION)[n]
                           for n in NEW_EVALUATION}
        with pytest.raises(IncompleteEvaluation, match="evaluation 'eval' was cut short"):
            evaluation_files(folder)
    assert [p.name for p in remove_temp_files(folder)] == [names[point] + ".tmp"]
    write_evaluation(folder, "eval", NEW_EVALUATION)
    assert {n: p.read_text() for n, p in evaluation_files(folder).items()} == NEW_EVALUATION
    assert not list(folder.glob("*.tmp"))


def tiny_command(command: str, out: Path, *changes: str) -> list[str]:
    config = "grpo_tiny.py" if command == "grpo" else "tiny.py"
    args = [command, "--config", str(ROOT / "configs" / config), "--set", f"run.out_dir={out}"]
    for change in changes:
        args += ["--set", change]
    return args


def run_cli(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "jrlhf.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def assert_consistent_evaluation(folder: Path, names: tuple[str, ...], prompts: int, seed: int):
    """The marker vouches for the files, and they agree with each other: the comparisons are
    the annotator's judgements of the samples, the leaderboard is the comparisons'."""
    from jrlhf import elo
    from jrlhf.judging import _judged
    from jrlhf.report import evaluation_files
    from jrlhf.tasks.reviews import score_texts

    files = evaluation_files(folder)
    samples = [json.loads(line) for line in files["samples.jsonl"].read_text().splitlines()]
    assert len(samples) == prompts and all(set(s) == {"prompt", *names} for s in samples)
    scores = {n: np.float32(score_texts([s["prompt"] for s in samples], [s[n] for s in samples]))
              for n in names}
    games = [(a, b, _judged(scores[a][i], scores[b][i])) for i in range(prompts)
             for x, a in enumerate(names) for b in names[x + 1:]]
    assert elo.read_games(files["comparisons.jsonl"]) == games
    board = elo.leaderboard(games, samples=200, seed=seed)
    assert files["leaderboard.txt"].read_text() == elo.format_leaderboard(board) + "\n"


@pytest.mark.slow
def test_jrlhf_grpo_killed_between_evaluation_files_evaluates_again_on_resume(tmp_path):
    """`jrlhf grpo` killed while its evaluation writes (a seeded point among the files and the
    completing marker): the marker says the set is incomplete; `--resume` trains nothing,
    evaluates again and leaves one complete, self-consistent set, no temp file anywhere."""
    from jrlhf.report import IncompleteEvaluation, evaluation_files

    point = random.Random(f"{SEED}-evaluation").randint(1, 4)
    out = tmp_path / "run"
    args = tiny_command("grpo", out, "grpo.iterations=1", "data.num_eval_prompts=4")
    said = killed_child(["-c", CUT_EVALUATION_WRITE, str(point), "cli", *args])
    assert "[grpo 1]" in said and "[grpo/eval]" not in said
    with pytest.raises(IncompleteEvaluation, match="evaluation 'grpo/eval' was cut short"):
        evaluation_files(out / "grpo")
    (left,) = out.rglob("*.tmp")
    text = run_cli([*args, "--resume"])
    assert "[grpo] resumed from step 1" in text and "[grpo 1]" not in text
    assert f"[run] removed 1 temp file(s) an interrupted run left: {left.relative_to(out)}" \
        in text
    assert "[grpo/eval] replacing an incomplete evaluation:" in text
    assert_consistent_evaluation(out / "grpo", ("base", "grpo"), prompts=4, seed=0)
    assert not list(out.rglob("*.tmp"))


# `jrlhf export` (args after the point) waits to be killed at `point` of writing the export:
# after model.safetensors, after config.json, with every file synced (not yet swapped in), or
# once swapped in (the previous export not yet removed).
KILLED_CLI_EXPORT = """
import sys, time
import safetensors.numpy, transformers
from jrlhf.cli import main
from jrlhf.models import hf

point = sys.argv[1]

def hang(original, when=lambda *args: True):
    def run(*args, **kwargs):
        result = original(*args, **kwargs)
        if when(*args):
            print("KILL ME", result, flush=True)
            time.sleep(600)
        return result
    return run

if point == "weights":
    safetensors.numpy.save_file = hang(safetensors.numpy.save_file)
elif point == "config":
    transformers.PretrainedConfig.save_pretrained = hang(
        transformers.PretrainedConfig.save_pretrained)
elif point == "written":
    hf._fsync = hang(hf._fsync, lambda path: path.is_dir() and ".jrlhf-tmp-" in path.name)
else:
    hf._exchange = hang(hf._exchange)
sys.exit(main(sys.argv[2:]))
"""


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_jrlhf_export_killed_keeps_the_previous_export_and_the_rerun_succeeds(tmp_path):
    """SIGKILL during `jrlhf export --stage sft --out DIR` over a previous export (at a seeded
    point): DIR is the previous export byte for byte and loads (or, once swapped, the new one);
    the same command again succeeds, writes the checkpoint's weights and leaves no leftover."""
    from jrlhf import models

    point = random.Random(f"{SEED}-export").choice(["weights", "config", "written", "swap"])
    out = tmp_path / "run"
    args = tiny_command("sft", out, "sft.steps=2")
    run_cli(args)
    trained = out / "sft" / "export"  # what `jrlhf sft` exported at its end
    cfg, params = models.load_pretrained(trained)
    previous = tmp_path / "deploy"
    old = jax.tree.map(lambda p: np.asarray(p) + 0.5, params)
    models.save_pretrained(previous, cfg, old,
                           tokenizer=transformers.AutoTokenizer.from_pretrained(trained))
    before = digests(previous)
    export = ["export", "--stage", "sft", "--out", str(previous), *args[1:]]
    said = killed_child(["-c", KILLED_CLI_EXPORT, point, *export])
    (stale,) = [p for p in tmp_path.iterdir() if ".jrlhf-" in p.name]
    swapped = point == "swap" and said.rstrip().endswith("KILL ME True")
    if swapped:  # the new export is in place; the previous one is the leftover
        assert digests(stale) == before
        assert (previous / "model.safetensors").read_bytes() == \
            (trained / "model.safetensors").read_bytes()
    else:
        assert digests(previous) == before
        cfg2, params2 = models.load_pretrained(previous)
        assert cfg2 == cfg
        jax.tree.map(np.testing.assert_array_equal, params2, old)
        transformers.AutoModelForCausalLM.from_pretrained(previous)
    text = run_cli(export)
    assert f"[sft/export] exported {previous}" in text
    assert (previous / "model.safetensors").read_bytes() == \
        (trained / "model.safetensors").read_bytes()
    assert digests(previous).keys() == before.keys()
    transformers.AutoModelForCausalLM.from_pretrained(previous)
    assert [p.name for p in tmp_path.iterdir() if ".jrlhf-" in p.name] == []
    assert not list(tmp_path.rglob("*.tmp"))


class Terminal:
    """`python <args>` on a pseudo-terminal, as a person runs `jrlhf annotate`: `expect` text
    on its screen, `type` a line."""

    def __init__(self, *args: str):
        import pty

        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdin=slave,
                                     stdout=slave, stderr=slave, close_fds=True,
                                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
        os.close(slave)
        self.screen = ""

    def expect(self, text: str, timeout: float = 60) -> str:
        import select

        deadline = time.time() + timeout
        while text not in self.screen:
            if time.time() > deadline:
                raise AssertionError(f"{text!r} never appeared; screen:\n{self.screen}")
            if select.select([self.master], [], [], 0.2)[0]:
                try:
                    self.screen += os.read(self.master, 4096).decode(errors="replace")
                except OSError:  # the child closed the terminal
                    break
        return self.screen

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())


# `jrlhf annotate` (args after `answer cut`) whose `answer`-th answer row (1-based) reaches
# the file only up to byte `cut`; then it waits to be killed. The write is annotate's own
# `os.write` loop, so the cut lands inside the real append.
TORN_ANSWER = """
import os, sys, time, types
import jrlhf.annotate as annotate
from jrlhf.cli import main

answer, cut, writes = int(sys.argv[1]), int(sys.argv[2]), []

def write(fd, data):
    writes.append(len(data))
    if len(writes) < answer:
        return os.write(fd, data)
    os.write(fd, bytes(data)[:cut])
    print("KILL ME", flush=True)
    time.sleep(600)

annotate.os = types.SimpleNamespace(**{**vars(os), "write": write})
sys.exit(main(sys.argv[3:]))
"""

ITEMS = [{"prompt": "Review \"Wild Garden\":", "responses": ["great", "bad", "fine"]},
         {"prompt": "Review \"Am\u00e9lie\":", "responses": ["dull", "lovely"]},
         {"prompt": "Review \"Crimson Signal\":", "responses": ["so-so", "superb", "awful"]},
         {"prompt": "Review \"The Silent Machine\":", "responses": ["tense", "flat"]}]
ANSWERS = ["1 3 2", "2 1", "3 1 2", "1 2"]


def test_jrlhf_annotate_killed_mid_row_resumes_at_the_first_unanswered_prompt(tmp_path):
    """SIGKILL while an answer row is half appended (a seeded answer and byte): the file is
    the earlier rows and that row's first bytes; the next session cuts the torn row off
    (saying so in one line; a row missing only its newline is kept), starts at the first
    unanswered prompt, and the finished file is the rankings rows, byte for byte as if never
    interrupted."""
    from jrlhf.annotate import parse_ranking
    from jrlhf.data import load_rows

    samples, out = tmp_path / "samples.jsonl", tmp_path / "rankings.jsonl"
    samples.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    rows = [(json.dumps({**item, "ranks": parse_ranking(a, len(item["responses"]))}) + "\n")
            .encode() for item, a in zip(ITEMS, ANSWERS)]
    rng = random.Random(f"{SEED}-annotate")
    answer = rng.randint(1, len(ITEMS) - 1)
    cut = rng.randint(1, len(rows[answer - 1]) - 1)  # a byte short of the newline at most
    print(f"torn: answer {answer}, {cut} of {len(rows[answer - 1])} bytes")

    term = Terminal("-c", TORN_ANSWER, str(answer), str(cut), "annotate", str(samples),
                    "--out", str(out))
    for n in range(answer):
        term.expect(f"[{n + 1}/4] PROMPT")
        term.type(ANSWERS[n])
    term.expect("KILL ME")
    term.proc.send_signal(signal.SIGKILL)
    assert term.proc.wait(timeout=30) == -signal.SIGKILL
    assert out.read_bytes() == b"".join(rows[:answer - 1]) + rows[answer - 1][:cut]

    term = Terminal("-m", "jrlhf.cli", "annotate", str(samples), "--out", str(out))
    whole = cut == len(rows[answer - 1]) - 1  # all but the newline: a whole row, kept
    done = answer if whole else answer - 1
    screen = term.expect(f"[{done + 1}/4] PROMPT")
    assert f"4 prompts, {done} already ranked" in screen
    assert re.findall(r"\[(\d)/4\] PROMPT", screen) == [str(done + 1)]
    torn = f"{out}:{answer}: removed a torn last row ({cut} bytes of an interrupted write)"
    assert (torn in screen) != whole and "removed" not in screen.replace(torn, "")
    for n in range(done, len(ITEMS)):
        term.expect(f"[{n + 1}/4] PROMPT")
        term.type(ANSWERS[n])
    term.expect("all 4 prompts done")
    assert term.proc.wait(timeout=30) == 0
    assert out.read_bytes() == b"".join(rows)
    assert load_rows(out, "rankings")[1].rows == 4


def file_size_limited(args: list[str], limit: int) -> subprocess.CompletedProcess:
    """`jrlhf <args>` where no file may grow beyond `limit` bytes (RLIMIT_FSIZE, SIGXFSZ
    ignored: a write past it fails with EFBIG, as a full disk fails with ENOSPC)."""
    import resource

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "jrlhf.cli", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=600, preexec_fn=limited,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.slow
def test_a_failed_write_is_one_line_at_the_moment_it_happens(tmp_path):
    """No file over 12 MB: the first (background) checkpoint write fails and the run stops with
    one line naming the file; an export (12.9 MB of weights) fails in one
    line and leaves the previous export and no temp folder."""
    out = tmp_path / "run"
    args = tiny_command("sft", out, "sft.steps=4", "run.save_every=2", "run.log_every=1")
    proc = file_size_limited(args, 12_000_000)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert re.fullmatch(r"jrlhf sft: error: cannot write checkpoint step 2 to \S+: File too "
                        r"large \(\S+/2\.orbax-checkpoint-tmp/\S+\)", line), line
    # Reported by the first step after the background write failed (or by the next save's
    # wait): nothing more is written, no export.
    assert "[sft/export]" not in proc.stdout
    assert [p.name for p in (out / "sft" / "checkpoints").iterdir()] == [
        "2.orbax-checkpoint-tmp"]

    out = tmp_path / "exported"
    run_cli(tiny_command("sft", out, "sft.steps=2"))
    before = digests(out / "sft" / "export")
    args = tiny_command("sft", out, "sft.steps=2")[1:]
    proc = file_size_limited(["export", "--stage", "sft", *args], 12_000_000)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("jrlhf export: error: File too large: ") and \
        line.endswith("/model.safetensors"), line
    assert digests(out / "sft" / "export") == before
    assert sorted(p.name for p in (out / "sft").iterdir() if p.name.startswith(".")) == []
