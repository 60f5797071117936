"""Faults injected into a real `jrlhf pipeline` process: SIGKILL at random points — between
steps, during checkpoint writes (also the very first one, before anything is committed), while
rankings are generated, during evaluation and export — and SIGTERM; every `--resume` continues
to exactly the result of one uninterrupted run: metrics, rankings, summary and exported weights,
byte for byte.

The uninterrupted run is also the end-to-end check of the tiny pipeline (report, TensorBoard,
leaderboard, an export transformers loads with our logits, a second `--resume` that trains
nothing)."""

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
    """Seven interruptions in pipeline order: SIGKILL during the very first checkpoint write
    (SFT step 1, nothing committed yet) and at two random SFT steps; SIGTERM as SFT ends (it
    lands in the rankings stage, which finishes, and the run stops before the reward stage);
    SIGKILL during the reward model's first checkpoint write; SIGTERM at a random PPO step;
    SIGKILL at a random later point (a PPO step, evaluation or export)."""
    keys = sorted(order, key=order.get)
    sft = [k for k in keys if re.fullmatch(r"\[sft \d+\]", k) and k != "[sft 1]"]
    ppo = [k for k in keys if k.startswith("[ppo ")]
    kill, term = signal.SIGKILL, signal.SIGTERM
    points = [("write", "sft", kill)]
    points += [("line", k, kill) for k in sorted(rng.sample(sft, 2), key=order.get)]
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
                 "reward/export/model.safetensors", "comparisons.jsonl", "samples.jsonl"):
        assert (out / name).read_bytes() == (full / name).read_bytes(), (points, name)

    # A finished run resumed again finds every stage done and trains nothing.
    code, again = Watched(start(full, resume=True)).finish()
    assert code == 0, again
    assert "resumed from step 12" in again and "resumed from step 3" in again
    assert not any(line_key(line) in order and re.match(r"\[\w+ \d+\]", line)
                   for line in again.splitlines())
