"""`jrlhf bench` and `jrlhf plan` on small configs, checked against analytic and measured numbers."""

import dataclasses
import json
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from jrlhf import bench, optim, sharding
from jrlhf.config import MeshConfig, derive, load_config
from jrlhf.models import ModelConfig, init_params
from jrlhf.plan import count_collectives, parse_mesh, plan
from jrlhf.state import TrainState
from jrlhf.steps import place_state

ROOT = Path(__file__).parent.parent
SMALL = ModelConfig(family="gpt2", vocab_size=512, hidden_size=128, num_layers=2, num_heads=4,
                    num_kv_heads=4, head_dim=32, intermediate_size=512, max_position_embeddings=64,
                    activation="gelu_new", tie_word_embeddings=True, attention_bias=True,
                    output_bias=True, mlp_bias=True, hf_model_type="gpt2", eos_token_id=511,
                    pad_token_id=511)


def small_config(**changes):
    base = load_config(ROOT / "configs" / "bench_gpt2.py")
    return derive(base, {"model.arch": SMALL, "data.max_prompt_length": 16,
                         "data.max_response_length": 16, "rollout.max_new_tokens": 8,
                         "ppo.epochs": 2, **changes})


@pytest.mark.slow
@pytest.mark.parametrize("step", bench.step_kinds())
def test_bench_reports_consistent_numbers(step):
    work = bench.Workload.from_config(small_config())
    r = bench.bench_step(work, step, steps=3, warmup=1)
    assert r["steps_timed"] == 3 and r["min_s"] <= r["median_s"] <= r["max_s"]
    np.testing.assert_allclose(r["tokens_per_s"], r["tokens_per_step"] / r["median_s"])
    assert 0 < r["mfu"] < 1.5
    if step in ("sft", "reward", "ppo"):
        # Analytic 6·N·tokens + attention agrees with XLA's count to within 25%. XLA's
        # cost analysis counts a while-loop body once: PPO's scan runs epochs x minibatches.
        loops = r["epochs"] * r["minibatches"] if step == "ppo" else 1
        ratio = r["xla_flops_per_step"] * loops / r["model_flops_per_step"]
        assert 0.75 < ratio < 1.35, ratio
        assert r["memory_per_device"]["argument_bytes"] > SMALL.num_params * 4
        assert r["dispatches_per_step"] == 1
    if step.endswith("_iteration"):
        assert set(r["phases"]) == {"generate", "score", "update"}
        assert r["dispatches_per_step"] == 3
    json.loads(bench.to_json(r))
    assert "tokens / s" in bench.format_result(r)


@pytest.mark.parametrize("long_tail", [False, True])
def test_generate_reports_its_slot_utilisation(long_tail):
    """Useful tokens ÷ (rows × decode steps): all of them without budgets (no EOS); with the
    long-tail budgets exactly their sum over rows × the longest budget."""
    config = small_config(**{"ppo.prompts_per_iteration": 32, "rollout.max_new_tokens": 28})
    r = bench.bench_step(bench.Workload.from_config(config), "generate", steps=1, warmup=0,
                         long_tail=long_tail)
    budgets = bench.long_tail_budgets(32, 28) if long_tail else np.full(32, 28)
    assert r["useful_tokens"] == r["tokens_per_step"] == int(budgets.sum())
    assert r["decode_steps"] == int(budgets.max())
    np.testing.assert_allclose(r["slot_utilisation"], budgets.sum() / (32 * budgets.max()))
    assert (r["slot_utilisation"] < 0.5) == long_tail
    assert "slot utilisation" in bench.format_result(r)


def test_model_flops_hand_count():
    cfg = SMALL
    per_layer = 4 * 128 * 128 + 4 * 128 + 2 * 128 * 512 + 512 + 128 + 4 * 128
    n = cfg.num_layers * per_layer + 2 * 128 + 512 * 128  # + final norm + tied LM head matmul
    assert bench.matmul_params(cfg) == n
    assert bench.model_flops(cfg, 10, 16, True) == 6 * (n + 2 * 2 * 16 * 128) * 10
    head = 512 * 128
    assert bench.model_flops(cfg, 10, 16, False, lm_tokens=4) == \
        2 * ((n - head + 2 * 2 * 16 * 128) * 10 + head * 4)
    # Reading 2 of the 10 positions: the last layer's query side (all but its K/V projections,
    # plus its attention) runs on 2 tokens, not 10.
    kv = 2 * 128 * 128 + 2 * 128
    assert bench.model_flops(cfg, 10, 16, True) - bench.model_flops(
        cfg, 10, 16, True, read_tokens=2) == 6 * (per_layer - kv + 2 * 16 * 128) * 8


def test_parse_mesh():
    assert parse_mesh("data=2,fsdp=4,tensor=1") == MeshConfig(2, 4, 1)
    assert parse_mesh("fsdp=8") == MeshConfig(1, 8, 1)
    with pytest.raises(ValueError, match="expected e.g."):
        parse_mesh("dp=2")


def measured_state_bytes(config, mesh):
    """Bytes the placed train state really occupies on device 0."""
    params = init_params(SMALL, 0)
    labels = optim.trainable_labels(params)
    tx = optim.make_optimizer(config.optim, labels, learning_rate=config.sft.learning_rate)
    state = place_state(TrainState.create(params, tx, 0), mesh)
    dev = jax.devices()[0]

    def on_dev0(tree):
        return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
                   if s.device == dev)
    return on_dev0(state.params), on_dev0(state.opt_state)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2)])
def test_plan_matches_measured_and_analytic(shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = dataclasses.replace(small_config(), mesh=MeshConfig(*shape))
        r = plan(config, "sft", "h100")
        mesh = sharding.make_mesh(config.mesh)
    params_bytes, opt_bytes = measured_state_bytes(config, mesh)
    assert r["params_bytes_per_device"] == params_bytes
    # Adam's two moments plus optax's scalar counters.
    assert r["optimizer_bytes_per_device"] - opt_bytes in range(0, 64)
    assert r["fits"] and r["xla_flops_per_step"] > 0
    if shape == (8, 1, 1):  # pure data parallel: everything replicated
        assert r["params_bytes_per_device"] == SMALL.num_params * 4
        assert r["collectives"]["all-reduce"] > 0


@pytest.mark.slow
def test_fsdp8_cuts_state_bytes_about_8x():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp = plan(dataclasses.replace(small_config(), mesh=MeshConfig(8, 1, 1)), "sft")
        fsdp = plan(dataclasses.replace(small_config(), mesh=MeshConfig(1, 8, 1)), "sft")
    total = lambda r: r["params_bytes_per_device"] + r["optimizer_bytes_per_device"]  # noqa
    assert 6.5 < total(dp) / total(fsdp) <= 8.0
    assert fsdp["collectives"]["all-gather"] > 0


@pytest.mark.slow
def test_plan_reports_too_big():
    config = dataclasses.replace(small_config(), mesh=MeshConfig(1, 1, 1))
    huge = derive(config, {"model.arch": dataclasses.replace(SMALL, hidden_size=4096,
                                                             intermediate_size=16384,
                                                             num_heads=32, num_kv_heads=32,
                                                             head_dim=128, num_layers=8)})
    r = plan(huge, "sft", "tpu v5e")
    # 1.6B float32 parameters: weights 6.4 GB + Adam 12.9 GB + gradients 6.4 GB > 16 GB.
    assert not r["fits"]
    assert r["peak_bytes_per_device"] > 16 * huge.model.arch.num_params


def test_count_collectives():
    text = "%a = f32[] all-reduce(f32[] %x)\n%b = all-gather-start(%y)\n%c = all-reduce(%z)"
    assert count_collectives(text)["all-reduce"] == 2
    assert count_collectives(text)["all-gather"] == 1


@pytest.mark.slow
def test_jrlhf_plan_needs_no_devices_under_jax_platforms_cpu():
    """`jrlhf plan` adds its fake CPU devices itself, also when JAX_PLATFORMS=cpu is set (it
    was read as "JAX already started"): one process, one real CPU device, an 8-device mesh."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-m", "jrlhf.cli", "plan", "--config", str(ROOT / "configs" / "tiny.py"),
         "--mesh", "data=2,fsdp=4", "--step", "dpo", "--json"], cwd=ROOT, text=True,
        capture_output=True, timeout=600, env={**env, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["mesh"] == {"data": 2, "fsdp": 4, "expert": 1, "tensor": 1} and \
        result["step"] == "dpo"


def test_every_command_option_has_help():
    from jrlhf.cli import build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if a.dest == "command"]
    missing = [f"{name} {action.option_strings or action.dest}"
               for name, sub in commands.choices.items() for action in sub._actions
               if not action.help and action.dest != "help"]
    assert not missing, missing
    assert "implementation" not in (parser.description or "") and "jrlhf <command> -h" in (
        parser.description or "")


def test_the_long_tail_workload_is_the_one_benchmark_md_describes():
    """benchmarks/long_tail.py draws BENCHMARK.md's budgets (28 of 224 tokens, 10,778 in all,
    static utilisation ≈ 19%) and its slot simulation gives the quoted makespans (64 slots:
    308 steps, 32: 486); a queue shorter than the slots takes its longest budget."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "long_tail.py"
    spec = importlib.util.spec_from_file_location("long_tail", path)
    long_tail = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(long_tail)
    prompt_ids, budgets = long_tail.workload()
    assert prompt_ids.shape == (64, 32) and budgets.shape == (256,)
    assert int(budgets.sum()) == 10_778 and int((budgets == 224).sum()) == 28
    assert round(10_778 / (256 * 224), 2) == 0.19
    assert long_tail.simulate_slots(budgets, 64) == 308
    assert long_tail.simulate_slots(budgets, 32) == 486
    assert long_tail.simulate_slots([5, 9, 2], 8) == 9


@pytest.mark.slow
def test_bench_plays_episodes_on_an_episode_config():
    """`env.enabled`: the iteration's prompts are the task's problems (encoded as training
    encodes them) and its generate phase plays episodes against the task's environment."""
    config = derive(load_config(ROOT / "configs" / "tiny.py"), {
        "data.task": "calculator", "env.enabled": True, "env.max_turn_tokens": 4,
        "env.max_episode_tokens": 12, "env.max_turns": 2, "rollout.max_new_tokens": 12,
        "data.max_prompt_length": 48, "grpo.group_size": 2, "grpo.prompts_per_iteration": 2})
    r = bench.bench_step(bench.Workload.from_config(config), "grpo_iteration", steps=1,
                         warmup=0)
    assert r["episodes"]["episodes"] == 4  # per timed step: every sampled row an episode
    assert r["episodes"]["turns"] >= 4 and r["episodes"]["skipped"] == 0
    assert set(r["phases"]) == {"generate", "score", "update"}
    assert 0 <= r["env_wait_s"] <= r["phases"]["generate"]["median_s"]
    assert "episodes / step" in bench.format_result(r)
