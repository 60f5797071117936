"""Running it for real: NaN halt, exact resume of PPO, LoRA export, the other commands, damaged
checkpoints. (SIGKILL and SIGTERM at random points of the whole pipeline: tests/test_faults.py.)"""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import transformers

from jrlhf.checkpoint import Checkpointer
from jrlhf.config import apply_overrides, load_config
from jrlhf.loops import train
from jrlhf.models import ModelConfig, init_params
from jrlhf.report import read_metrics
from jrlhf.rollouts import Reward
from jrlhf.setups import make_setup

ROOT = Path(__file__).parent.parent
TINY = str(ROOT / "configs" / "tiny.py")


CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, intermediate_size=64)


def sft_batches(seed=0):
    rng = np.random.RandomState(seed)
    while True:
        ids = rng.randint(1, 64, (8, 10)).astype(np.int32)
        yield {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}


def test_nan_halts_naming_step_and_keeps_last_good_checkpoint(tmp_path):
    config = apply_overrides(load_config(TINY), [
        f"run.out_dir={tmp_path}", "run.save_every=1", "sft.steps=10", "sft.learning_rate=1e12",
        "optim.max_grad_norm=0", "optim.eps=1e-30"])
    # The compiled step reports non-finite updated weights (naming the first parameter) before
    # any metric computed from them can be NaN.
    halt = (r"sft step (\d+): (metric 'sft/\w+' is (nan|inf)|the updated parameters or "
            r"optimizer state are not finite \(first: (params|opt_state)/[\w/ ]+\))")
    with pytest.raises(FloatingPointError, match=halt) as err:
        train(make_setup("sft", config, CFG, init_params(CFG, 0)), config, sft_batches(),
              out_dir=tmp_path, log=None)
    bad_step = int(str(err.value).split("sft step ")[1].split(":")[0])
    ckpt = Checkpointer(tmp_path / "sft" / "checkpoints")
    assert ckpt.latest_step() == bad_step - 1
    state, _ = ckpt.restore(_template(config))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    ckpt.close()


def _template(config):
    return make_setup("sft", config, CFG, init_params(CFG, 0)).state


def prompt_stream():
    rng = np.random.RandomState(0)
    state = {"i": 0}

    class Stream:
        def __next__(self):
            state["i"] += 1
            ids = rng.randint(4, 64, (8, 4)).astype(np.int32)
            return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

        def get_state(self):
            return dict(state, rng=rng.get_state()[1].tolist(), pos=int(rng.get_state()[2]))

        def set_state(self, saved):
            state["i"] = saved["i"]
            rng.set_state(("MT19937", np.array(saved["rng"], np.uint32), saved["pos"]))

    return Stream()


def count_token_3(_, pi, pm, ri, rm):
    return ((ri == 3) & (rm > 0)).sum(1).astype(np.float32)


@pytest.mark.slow
def test_ppo_resume_equals_uninterrupted(tmp_path):
    """PPO state, adaptive KL, reward-normalisation moments, RNG and prompt stream resume."""
    def config(out, iterations):
        return apply_overrides(load_config(TINY), [
            f"run.out_dir={out}", f"ppo.iterations={iterations}", "run.save_every=1",
            "ppo.adaptive_kl=true", "ppo.normalize_rewards=true", "lora.rank=2",
            "run.allow_changed=ppo.iterations"])  # the resumed run is longer

    def run(out, iterations, resume=False):
        c = config(out, iterations)
        return train(make_setup("ppo", c, CFG, init_params(CFG, 0)), c, prompt_stream(),
                     reward=Reward(fn=count_token_3), eos_token_id=None, out_dir=out,
                     resume=resume, log=None)

    full = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4, resume=True)
    jax.tree.map(np.testing.assert_array_equal, resumed.state.params, full.state.params)
    jax.tree.map(np.testing.assert_array_equal, resumed.state.rl, full.state.rl)  # β, moments
    assert int(full.state.rl.iteration) == 4 and float(full.state.rl.moments.count) == 4 * 8
    def strip(rows):
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per"))}
                for r in rows]
    assert strip(read_metrics(tmp_path / "a" / "metrics.jsonl")) == strip(
        read_metrics(tmp_path / "b" / "metrics.jsonl"))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_a_run_checkpointed_before_the_rl_state_resumes_into_it(tmp_path, monkeypatch,
                                                                  algorithm):
    """Checkpoints written as before `RLState` (β a top-level `kl_coef` array, zeros for GRPO;
    iteration and moments JSON `loop` metadata) resume into the state's RLState: the finished
    run equals an uninterrupted one."""
    from jrlhf import checkpoint

    def run(out, iterations, resume=False):
        c = apply_overrides(load_config(TINY), [
            f"run.out_dir={out}", f"{algorithm}.iterations={iterations}", "run.save_every=1",
            "ppo.adaptive_kl=true", "ppo.normalize_rewards=true", "grpo.prompts_per_iteration=2",
            f"run.allow_changed={algorithm}.iterations"])
        return train(make_setup(algorithm, c, CFG, init_params(CFG, 0)), c, prompt_stream(),
                     reward=Reward(fn=count_token_3), eos_token_id=None, out_dir=out,
                     resume=resume, log=None)

    full = run(tmp_path / "a", 3)
    save = Checkpointer.save

    def legacy_save(self, step, state, meta=None, force=True):
        m = state.rl.moments
        loop = {"iteration": int(state.rl.iteration),
                "moments": [float(m.count), float(m.mean), float(m.var)]}
        save(self, step, state, dict(meta or {}, loop=loop), force)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "_arrays", checkpoint._legacy_arrays)
        patch.setattr(Checkpointer, "save", legacy_save)
        run(tmp_path / "b", 2)
    ckpt = Checkpointer(tmp_path / "b" / algorithm / "checkpoints")
    assert "kl_coef" in ckpt.saved_meta(2)["arrays"] and "loop" in ckpt.saved_meta(2)
    ckpt.close()
    resumed = run(tmp_path / "b", 3, resume=True)
    jax.tree.map(np.testing.assert_array_equal, resumed.state.params, full.state.params)
    jax.tree.map(np.testing.assert_array_equal, resumed.state.rl, full.state.rl)
    assert int(resumed.state.rl.iteration) == 3
    assert (resumed.state.rl.kl_coef is None) == (algorithm == "grpo")


@pytest.mark.slow
def test_export_merges_lora_into_a_transformers_folder(tmp_path):
    """`jrlhf sft` with LoRA, then `jrlhf export`: the HF folder holds W + scale·A·B."""
    from jrlhf import lora, models
    from jrlhf.cli import main

    common = ["--config", TINY, "--set", f"run.out_dir={tmp_path}", "--set", "sft.steps=3",
              "--set", "lora.rank=2", "--set", "lora.targets=.*attn/(q_proj|v_proj)/kernel",
              "--set", "run.log_every=0"]
    assert main(["sft", *common]) == 0
    assert main(["export", *common, "--stage", "sft", "--out", str(tmp_path / "hf")]) == 0
    ckpt = Checkpointer(tmp_path / "sft" / "checkpoints")
    from jrlhf.models.sources import load_policy

    config = apply_overrides(load_config(TINY), common[3::2])
    cfg, params, _ = load_policy(config.model, config.run.seed)
    template = make_setup("sft", config, cfg, params).state
    state, _ = ckpt.restore(template)
    ckpt.close()
    assert lora.has_lora(state.params)
    merged = lora.merge_lora(state.params, config.lora.scale)
    cfg2, exported = models.load_pretrained(tmp_path / "hf")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), exported,
                 jax.tree.map(np.asarray, merged))
    delta = merged["layers"][0]["attn"]["q_proj"]["kernel"] - params["layers"][0]["attn"][
        "q_proj"]["kernel"]
    assert np.abs(np.asarray(delta)).max() > 0  # the adapters really trained
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.config.num_hidden_layers == cfg2.num_layers


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_dpo_and_orpo_commands(tmp_path, method):
    """`jrlhf dpo|orpo` on a rankings file: the preference margin grows; the export loads."""
    from jrlhf.cli import main

    rankings = tmp_path / "r.jsonl"
    rows = [{"prompt": f"Review {i}:", "responses": [" great fun", " dull and bad", " fine"],
             "ranks": [1, 3, 2]} for i in range(8)]
    rankings.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main([method, "--config", str(ROOT / "configs" / "dpo_tiny.py"), "--set",
                 f"run.out_dir={out}", "--set", f"data.rankings_path={rankings}", "--set",
                 "run.log_every=0"]) == 0
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["stage"] == method]
    assert len(rows) == 10
    key = f"{method}/margin" if method == "dpo" else "orpo/log_odds_ratio"
    assert rows[-1][key] > rows[0][key]
    assert rows[-1][f"{method}/loss"] < rows[0][f"{method}/loss"]
    assert transformers.AutoConfig.from_pretrained(out / method / "export").num_hidden_layers == 2


@pytest.mark.slow
def test_grpo_command_with_the_task_annotator(tmp_path):
    from jrlhf.cli import main

    out = tmp_path / "run"
    assert main(["rloo", "--config", str(ROOT / "configs" / "grpo_tiny.py"), "--set",
                 f"run.out_dir={out}", "--set", "run.log_every=0"]) == 0
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["stage"] == "rloo"]
    assert len(rows) == 3 and all(np.isfinite(r["rloo/loss"]) for r in rows)
    assert (out / "rloo" / "export" / "model.safetensors").exists()


def test_non_finite_update_halts_naming_the_parameter_and_saves_nothing(tmp_path):
    """The compiled step checks the weights it returns: an update that makes one parameter inf
    (with finite metrics) halts the loop at that step, naming the parameter, and the latest
    checkpoint is the step before, all finite."""
    import jax.numpy as jnp
    import optax

    from jrlhf.loops import run_stage
    from jrlhf.state import TrainState
    from jrlhf.steps import jit_step

    def step(state, scale):
        params = dict(state.params, b=state.params["b"] * scale)
        return state.replace(params=params, step=state.step + 1), {"toy/loss": jnp.float32(1.0)}

    state = TrainState.create({"a": np.zeros(2, np.float32), "b": np.ones(3, np.float32)},
                              optax.sgd(0.1), 0)
    scales = iter(np.array([2.0, 2.0, np.inf, 2.0], np.float32))
    config = apply_overrides(load_config(TINY), ["run.save_every=1"])
    with pytest.raises(FloatingPointError,
                       match=r"toy step 3: the updated parameters or optimizer state are not "
                             r"finite \(first: params/b\)"):
        run_stage("toy", config, state, jit_step(step), scales, 4, out_dir=tmp_path, log=None)
    ckpt = Checkpointer(tmp_path / "toy" / "checkpoints")
    assert ckpt.latest_step() == 2
    template = TrainState.create({"a": np.zeros(2, np.float32), "b": np.ones(3, np.float32)},
                                 optax.sgd(0.1), 0)
    restored, _ = ckpt.restore(template)
    ckpt.close()
    np.testing.assert_array_equal(restored.params["b"], [4.0, 4.0, 4.0])
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]


@pytest.mark.slow
def test_resume_with_another_config_or_data_is_refused_with_the_diff(tmp_path):
    """`--resume` checks the config and the data file against those the stage's checkpoints were
    made with: a changed learning rate or data file is refused, naming the keys; a listed
    `run.allow_changed` key, or a reporting setting, may change."""
    from jrlhf.cli import main

    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"Say {i}:", "response": f" {i} {i}"}) + "\n"
                           for i in range(16)))
    common = ["--config", TINY, "--set", f"run.out_dir={tmp_path / 'run'}", "--set",
              f"data.sft_path={sft}", "--set", "sft.steps=2", "--set", "run.log_every=0"]
    assert main(["sft", *common]) == 0
    with pytest.raises(ValueError, match=r"sft.learning_rate: 0.003 -> 0.01.*"
                                         r"--set run.allow_changed=sft.learning_rate"):
        main_raising(["sft", *common, "--set", "sft.learning_rate=0.01", "--resume"])
    assert main(["sft", *common, "--set", "sft.learning_rate=0.01", "--set",
                 "run.allow_changed=sft.learning_rate", "--set", "run.log_every=5",
                 "--resume"]) == 0
    sft.write_text(sft.read_text() + json.dumps({"prompt": "New:", "response": " row"}) + "\n")
    with pytest.raises(ValueError, match=r"data.sft: 'file [0-9a-f]{7}"):
        main_raising(["sft", *common, "--resume"])
    assert main(["sft", *common, "--resume"]) == 2  # the CLI: one line, exit 2


def main_raising(argv):
    """Run a CLI command in-process, letting its user error propagate."""
    from jrlhf.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.func(args)


def checkpointed_sft_args(out, steps):
    return ["sft", "--config", TINY, "--set", f"run.out_dir={out}", "--set",
            f"sft.steps={steps}", "--set", "run.save_every=1", "--set",
            "run.keep_checkpoints=3", "--set", "run.log_every=0", "--set",
            "run.allow_changed=sft.steps"]


@pytest.fixture(scope="module")
def undamaged_sft_run(tmp_path_factory):
    from jrlhf.cli import main

    out = tmp_path_factory.mktemp("clean")
    assert main(checkpointed_sft_args(out, 4)) == 0
    return out


@pytest.fixture(scope="module")
def three_step_sft_run(tmp_path_factory):
    """A run stopped after step 3 (checkpoints 1-3), copied by each test that damages it."""
    from jrlhf.cli import main

    out = tmp_path_factory.mktemp("three")
    assert main(checkpointed_sft_args(out, 3)) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "meta"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_intact_one(tmp_path, damage,
                                                                 undamaged_sft_run,
                                                                 three_step_sft_run, capfd):
    """Bytes flipped inside, a truncated or a deleted array file of the latest checkpoint, or a
    changed byte in its metadata: `--resume` says so in one line (nothing else on stderr), sets
    it aside and continues from the checkpoint before it, with the same metrics as a run that
    was never damaged."""
    args = checkpointed_sft_args
    out = tmp_path / "damaged"
    shutil.copytree(three_step_sft_run, out)
    files = [p for p in (out / "sft" / "checkpoints" / "3").rglob("*") if p.is_file()
             and "ocdbt" in str(p) and p.stat().st_size > 10_000]
    assert files, list((out / "sft" / "checkpoints" / "3").rglob("*"))
    target = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    if damage == "flip":
        for i in range(len(data) // 3, len(data) // 3 + 64):
            data[i] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    target.write_bytes(bytes(data))
    if damage == "delete":
        target.unlink()
    if damage == "meta":  # the data position changed in place (same size: the file list passes)
        meta = out / "sft" / "checkpoints" / "3" / "meta" / "metadata"
        text = meta.read_text()
        assert '"next_index": 3' in text
        meta.write_text(text.replace('"next_index": 3', '"next_index": 7'))
    capfd.readouterr()
    log = []
    from jrlhf.stages import command_stage, open_run, run_stages

    config = apply_overrides(load_config(TINY), args(out, 4)[4::2])
    with open_run(config, resume=True, log=log.append) as run:
        assert run_stages(run, [command_stage("sft")]) is None
    text = "\n".join(log)
    assert "checkpoint step 3" in text and "using step 2" in text
    why = {"flip": "array checksum mismatch", "truncate": "bytes, ", "delete": "is missing",
           "meta": "metadata digest mismatch"}
    assert why[damage] in text, text
    assert "Traceback" not in capfd.readouterr().err
    assert "resumed from step 2" in text
    assert (out / "sft" / "corrupt_checkpoints" / "3").is_dir()
    assert read_metrics(undamaged_sft_run / "metrics.jsonl") == read_metrics(out / "metrics.jsonl")


def test_a_non_finite_optimizer_leaf_is_named_by_its_path():
    import optax

    from jrlhf.report import first_non_finite
    from jrlhf.state import TrainState

    params = {"a": np.zeros(2, np.float32), "b": {"w": np.ones(3, np.float32)}}
    state = TrainState.create(params, optax.chain(optax.clip_by_global_norm(1.0),
                                                  optax.adam(0.1)), 0)
    assert first_non_finite(state) == "none found"
    adam = state.opt_state[1][0]
    bad = adam._replace(nu={"a": adam.nu["a"], "b": {"w": np.array([0, np.nan, 0], np.float32)}})
    state = state.replace(opt_state=(state.opt_state[0], (bad, *state.opt_state[1][1:])))
    assert first_non_finite(state) == "opt_state/1/0/nu/b/w"
    state = state.replace(params={"a": np.array([np.inf, 0], np.float32), "b": params["b"]})
    assert first_non_finite(state) == "params/a"
