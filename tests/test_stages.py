"""Stages as data: a preempted stage ends the run at once, and `--resume` then gives what an
uninterrupted run gives, for every training stage of `jrlhf pipeline` and `jrlhf iterate`."""

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from jrlhf.config import apply_overrides, load_config
from jrlhf.report import read_metrics
from jrlhf.stages import Stage, iterate_stages, pipeline_stages, run_iterate, run_pipeline

ROOT = Path(__file__).parent.parent
SHORT = ["reward.steps=3", "ppo.iterations=3", "data.num_ranking_prompts=16",
         "reward.batch_size=2", "data.num_eval_prompts=4", "run.log_every=1"]


def tiny(out, *changes):
    return apply_overrides(load_config(ROOT / "configs" / "tiny.py"),
                           [f"run.out_dir={out}", *SHORT, *changes])


def sigterm_at(line_prefix: str):
    """A log function that sends this process SIGTERM when the stage loop logs `line_prefix`
    (inside the loop, where the preemption handler turns it into save-and-stop)."""
    def log(message: str):
        if message.startswith(line_prefix):
            os.kill(os.getpid(), signal.SIGTERM)

    return log


def quiet(_):
    pass


def weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)


def training_rows(out: Path):
    """metrics.jsonl without wall-clock columns."""
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s/"))}
            for r in read_metrics(out / "metrics.jsonl")]


def test_stage_lists():
    config = tiny("/tmp/x")
    names = [s.name for s in pipeline_stages(config)]
    assert names == ["sft", "rankings", "reward", "ppo", "eval", "export", "reward/export"]
    given = apply_overrides(config, ["data.rankings_path=r.jsonl"])
    assert "rankings" not in [s.name for s in pipeline_stages(given)]
    names = [s.name for s in iterate_stages(apply_overrides(config, ["iterate.rounds=2"]))]
    assert names[:2] == ["sft", "versions/v0"]
    assert names[2:7] == ["round1/rankings", "round1/reward", "round1/ppo", "versions/v1",
                          "round1/eval"]
    assert len(names) == 12
    with pytest.raises(ValueError, match="unknown kind 'trian'"):
        Stage("x", "trian")


@pytest.mark.slow
def test_pipeline_preempted_in_each_training_stage_resumes_to_the_same_result(tmp_path):
    """One run preempted in SFT, resumed and preempted in the reward stage, resumed and
    preempted in PPO, resumed to the end == one uninterrupted run: weights, rankings, metrics."""
    full = tmp_path / "full"
    assert "preempted" not in run_pipeline(tiny(full), log=quiet)
    out = tmp_path / "cut"
    for resume, stage, later in ((False, "sft", "reward"), (True, "reward", "ppo"),
                                 (True, "ppo", "export")):
        result = run_pipeline(tiny(out), resume=resume, log=sigterm_at(f"[{stage} 2]"))
        assert result == {"preempted": stage}
        assert not (out / later).exists()  # nothing after the preempted stage ran
    run_pipeline(tiny(out), resume=True, log=quiet)
    assert_same_weights(full / "export", out / "export")
    assert_same_weights(full / "reward" / "export", out / "reward" / "export")
    assert training_rows(out) == training_rows(full)
    assert (out / "data" / "rankings.jsonl").read_text() == \
        (full / "data" / "rankings.jsonl").read_text()


@pytest.mark.slow
def test_iterate_preempted_in_the_reward_stage_resumes_to_the_same_policy(tmp_path):
    """The reward model of round 2 is preempted: no PPO runs on the half-trained reward model,
    and the resumed run's versions, rankings and metrics equal an uninterrupted run's."""
    rounds = ["iterate.rounds=2", "ppo.iterations=2"]
    full = tmp_path / "full"
    summary = run_iterate(tiny(full, *rounds), log=quiet)
    assert summary["versions"] == ["v0", "v1", "v2"]
    assert [len(b) for b in summary["leaderboards"]] == [2, 3]
    out = tmp_path / "cut"
    assert run_iterate(tiny(out, *rounds), log=sigterm_at("[round2/reward 2]")) == \
        {"preempted": "round2/reward"}
    assert not (out / "round2" / "ppo").exists() and not (out / "versions" / "v2").exists()
    run_iterate(tiny(out, *rounds), resume=True, log=quiet)
    for version in ("v0", "v1", "v2"):
        assert_same_weights(full / "versions" / version, out / "versions" / version)
    rows = []
    for r in (1, 2):
        text = (out / f"round{r}" / "rankings.jsonl").read_text()
        assert text == (full / f"round{r}" / "rankings.jsonl").read_text()
        rows.append([json.loads(line) for line in text.splitlines()])
    # Round 2's file holds round 1's rows, then its own, which mix in the earlier version.
    assert rows[1][:len(rows[0])] == rows[0]
    assert all(set(row["sources"]) == {"v0"} for row in rows[0])
    assert all(set(row["sources"]) == {"v1", "v0"} for row in rows[1][len(rows[0]):])
    assert training_rows(out) == training_rows(full)
