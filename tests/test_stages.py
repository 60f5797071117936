"""Stages as data: a preempted stage ends the run at once, and `--resume` then gives what an
uninterrupted run gives (`jrlhf pipeline` killed and preempted at random points:
tests/test_faults.py; `jrlhf iterate` preempted in a reward stage: here)."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
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


# ---------------------------------------------------------------------------------------------
# What the runner guarantees around the stages: one run per folder, replayed metrics, and no
# remote code.


def test_a_second_run_on_a_folder_is_refused_naming_the_holder(tmp_path):
    from jrlhf.runlock import RunLock, RunLocked

    with RunLock(tmp_path):  # a live run holds the folder
        with pytest.raises(RunLocked, match=rf"in use by another jrlhf run \(pid {os.getpid()}"):
            run_pipeline(tiny(tmp_path), log=quiet)
    assert not (tmp_path / "sft").exists()  # nothing was written by the refused run


def test_a_killed_runs_lock_is_taken_over(tmp_path):
    from jrlhf.runlock import RunLock

    (tmp_path / "run.lock").write_text("4194301\n")  # left by a killed run: no flock on it
    with RunLock(tmp_path) as lock:
        assert lock.previous_holder == "4194301"
        assert (tmp_path / "run.lock").read_text() == f"{os.getpid()}\n"
    assert (tmp_path / "run.lock").read_text() == ""


@pytest.mark.slow
def test_cli_refuses_a_locked_folder_in_one_line(tmp_path):
    from jrlhf.runlock import RunLock

    with RunLock(tmp_path):
        proc = subprocess.run([sys.executable, "-m", "jrlhf.cli", "sft", "--config",
                               str(ROOT / "configs" / "tiny.py"), "--set",
                               f"run.out_dir={tmp_path}"], capture_output=True, text=True,
                              env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"in use by another jrlhf run (pid {os.getpid()}" in proc.stderr


def test_rows_written_before_the_first_checkpoint_are_replayed(tmp_path):
    """A run killed before its first checkpoint left rows 1..3 of a stage (and a half-written
    fourth line): the rerun's metrics.jsonl holds each step once, as an uninterrupted run's."""
    from jrlhf.loops import run_stage
    from jrlhf.report import MetricsWriter

    writer = MetricsWriter(tmp_path, "toy")
    for step in (1, 2, 3):
        writer.write(step, {"x": float(step)})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "toy", "step": 4, "x"')  # the kill, mid-line

    def step_fn(state, batch):
        return state, {"x": float(batch)}

    config = tiny(tmp_path)
    state = make_state_for_loop()
    for resume in (True, False):  # with or without --resume: no checkpoint to continue from
        result = run_stage("toy", config, state, step_fn, iter(range(1, 100)), 5,
                           out_dir=tmp_path, resume=resume, log=None)
        assert len(result.history) == 5
        rows = read_metrics(tmp_path / "metrics.jsonl")
        assert [(r["stage"], r["step"], r["x"]) for r in rows] == \
            [("toy", s, float(s)) for s in range(1, 6)]
        shutil.rmtree(tmp_path / "toy")  # drop the checkpoint: the next round starts over


def make_state_for_loop():
    import optax

    from jrlhf.state import TrainState

    return TrainState.create({"w": np.zeros(2, np.float32)}, optax.sgd(0.1), 0)


@pytest.mark.slow
def test_remote_code_folders_are_refused_in_one_line_without_prompting(tmp_path):
    """A model folder whose config.json has an auto_map is refused, naming the folder and the
    entry, also with "y" on standard input; its Python never runs."""
    from jrlhf import models

    cfg = models.ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=1,
                             num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                             hf_model_type="llama")
    folder = models.save_pretrained(tmp_path / "m", cfg, models.init_params(cfg, 0))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    with pytest.raises(ValueError, match=r"asks for remote code \(auto_map \('AutoConfig'"):
        models.load_pretrained(folder)
    proc = subprocess.run([sys.executable, "-m", "jrlhf.cli", "generate", "--model", str(folder)],
                          input="y\ny\n", capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and str(folder) in proc.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_sft_stage_trains_on_packed_rows(tmp_path):
    """`data.pack=true` reaches the SFT stage's loader: rows carry several examples (segment
    ids), the loss is finite and there are fewer rows than examples per step."""
    from jrlhf.stages import command_stage, open_run, run_stages, stage_batches

    config = tiny(tmp_path, "data.pack=true", "sft.steps=2", "data.max_response_length=176")
    with open_run(config, resume=False, train=True) as run:
        batch = next(stage_batches(run, command_stage("sft"), config))
        assert batch["segment_ids"].max() > 1  # at least one row holds two examples
        np.testing.assert_array_equal(batch["attention_mask"], batch["segment_ids"] > 0)
        run_stages(run, [command_stage("sft")])
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("stage") == "sft"]
    assert len(rows) == 2 and all(np.isfinite(r["sft/loss"]) for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["reward", "dpo"])
def test_reward_and_dpo_stages_train_on_packed_rows(tmp_path, algorithm):
    """With `data.pack`, each ranking group / pair is one row of segments; the stages train."""
    from jrlhf.stages import command_stage, open_run, run_stages, stage_batches

    rankings = tmp_path / "rankings.jsonl"
    words = ["great", "awful", "fine", "boring", "superb"]
    k = [3 if i % 3 else 2 for i in range(8)]  # some groups have fewer responses
    rankings.write_text("".join(json.dumps(
        {"prompt": f"Review {i}:", "responses": [f"a {w} film" for w in words[i % 2:][:k[i]]],
         "ranks": [1 + (i + j) % k[i] for j in range(k[i])]}) + "\n" for i in range(8)))
    config = tiny(tmp_path / "run", "data.pack=true", "data.pack_length=400",
                  f"{algorithm}.steps=2", "dpo.batch_size=2", f"data.rankings_path={rankings}")
    stage = command_stage(algorithm)
    with open_run(config, resume=False, train=True) as run:
        batch = next(stage_batches(run, stage, config))
        assert batch["input_ids"].shape[1] == 400 and batch["segment_ids"].max() >= 2
        if algorithm == "reward":  # every present response is a segment
            np.testing.assert_array_equal(batch["segment_ids"].max(1), (batch["ranks"] > 0).sum(1))
        run_stages(run, [stage])
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
            if r.get("stage") == algorithm]
    assert len(rows) == 2 and all(np.isfinite(r[f"{algorithm}/loss"]) for r in rows)


def test_a_sigterm_in_a_stage_loop_reaches_the_run():
    """A SIGTERM caught by a training loop's handler (even at its last step, when the stage
    completes) is passed on to the run's, which stops before the next stage."""
    from jrlhf.loops import Preemption

    with Preemption() as run_level:
        with Preemption() as loop_level:
            os.kill(os.getpid(), signal.SIGTERM)
        assert loop_level.requested and run_level.requested
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


# ---------------------------------------------------------------------------------------------
# Outputs as consistent sets: evaluation files vouched for by their marker, summary.json only
# beside the outputs it describes, no temp files left by a killed run (kills: test_faults.py).

EVALUATION = {"comparisons.jsonl": '{"a": "sft", "b": "ppo", "winner": "b"}\n',
              "leaderboard.txt": " #  model  BT rating\n 1  ppo  1100.0\n 2  sft  900.0\n",
              "samples.jsonl": '{"prompt": "Am\u00e9lie", "sft": "fine", "ppo": "superb"}\n'}


def test_an_evaluation_set_is_vouched_for_by_its_marker(tmp_path):
    from jrlhf.report import IncompleteEvaluation, evaluation_files, write_evaluation

    with pytest.raises(IncompleteEvaluation, match=rf"{tmp_path}: no evaluation.json"):
        evaluation_files(tmp_path)
    write_evaluation(tmp_path, "eval", EVALUATION)
    files = evaluation_files(tmp_path)
    assert {name: path.read_bytes() for name, path in files.items()} == \
        {name: text.encode() for name, text in EVALUATION.items()}
    assert json.loads((tmp_path / "evaluation.json").read_text()) == {
        "stage": "eval", "complete": True,
        "sha256": {name: hashlib.sha256(text.encode()).hexdigest()
                   for name, text in EVALUATION.items()}}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*EVALUATION, "evaluation.json"])
    # A file changed or removed since (another tool, an older jrlhf) is not part of the set.
    (tmp_path / "samples.jsonl").write_text("edited\n")
    with pytest.raises(IncompleteEvaluation,
                       match=r"samples.jsonl: not the file evaluation 'eval' wrote"):
        evaluation_files(tmp_path)
    (tmp_path / "samples.jsonl").unlink()
    with pytest.raises(IncompleteEvaluation, match=r"samples.jsonl: not the file"):
        evaluation_files(tmp_path)
    (tmp_path / "evaluation.json").write_text('{"stage": "eval", "complete": false}\n')
    with pytest.raises(IncompleteEvaluation, match=r"evaluation 'eval' was cut short"):
        evaluation_files(tmp_path)


def test_a_run_removes_the_temp_files_a_killed_run_left(tmp_path):
    """Opening the folder (before any stage) removes `write_atomically`'s leftovers anywhere in
    it and says so in one line; other files stay."""
    from jrlhf.stages import open_run

    left = ["metrics.jsonl.tmp", "sft/checkpoints/4/jrlhf_files.json.tmp",
            "sft/inputs.json.tmp", "samples.jsonl.tmp"]
    for name in left + ["notes.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("half")
    lines = []
    with open_run(tiny(tmp_path), log=lines.append):
        assert not [p for p in tmp_path.rglob("*.tmp")]
    assert lines[0] == ("[run] removed 4 temp file(s) an interrupted run left: "
                        "metrics.jsonl.tmp, samples.jsonl.tmp, "
                        "sft/checkpoints/4/jrlhf_files.json.tmp, ...")
    assert (tmp_path / "notes.txt").read_text() == "half"


def test_a_pipeline_removes_the_previous_summary_when_it_starts(tmp_path):
    """summary.json describes a finished run's outputs; a run that starts (here: one that
    fails in its first stage) removes it first, so it never lies beside newer outputs."""
    (tmp_path / "summary.json").write_text('{"score_ppo": 1.0}')
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        run_pipeline(tiny(tmp_path, f"data.sft_path={tmp_path / 'missing.jsonl'}"), log=quiet)
    assert not (tmp_path / "summary.json").exists()


def test_evaluation_kl_equals_a_numpy_sum_over_the_full_logits():
    """`sequence_kl` (the jitted, chunked LM-head path) against NumPy over `models.forward`'s
    full logits: Σ_t mask·(log π(y_t) − log π_ref(y_t)) averaged over rows, at a temperature;
    masked response positions hold garbage tokens that must not count."""
    from jrlhf.models import ModelConfig, forward, init_params
    from jrlhf.judging import sequence_kl

    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, intermediate_size=64, logits_chunk_size=3)
    policy, ref = init_params(cfg, 0), init_params(cfg, 1)
    rng = np.random.RandomState(0)
    ids = rng.randint(1, 64, (3, 5)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # a left-padded prompt
    tokens = rng.randint(1, 64, (3, 4)).astype(np.int32)
    tmask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], np.int32)
    got = sequence_kl(cfg, policy, cfg, ref, ids, mask, tokens, tmask, 0.7)

    full, fmask = np.concatenate([ids, tokens], 1), np.concatenate([mask, tmask], 1)
    want = np.zeros(3)
    for p in (policy, ref):
        logits = np.asarray(forward(cfg, p, full, fmask), np.float64)[:, 4:-1] / 0.7
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        picked = np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
        want += (1 if p is policy else -1) * (picked * tmask).sum(1)
    np.testing.assert_allclose(got, want.mean(), rtol=1e-5, atol=1e-6)
    garbage = np.where(tmask > 0, tokens, 63)
    assert sequence_kl(cfg, policy, cfg, ref, ids, mask, garbage, tmask, 0.7) == \
        pytest.approx(got, abs=1e-6)
