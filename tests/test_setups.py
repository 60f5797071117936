"""One setup per algorithm: `jrlhf plan` sizes, and `jrlhf bench` times, the state training builds;
the tools sit beside the trainer; RNG streams are named."""

import ast
import dataclasses
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from jrlhf import algorithms, bench, optim
from jrlhf.config import Config, LoRAConfig, MeshConfig, derive
from jrlhf.models import ModelConfig, init_params
from jrlhf.plan import plan
from jrlhf.setups import (
    batch_shapes,
    initial_weights,
    make_setup,
    stream_key,
    stream_seed,
)

ROOT = Path(__file__).parent.parent
ALGORITHMS = algorithms.names()
CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, intermediate_size=64, eos_token_id=2,
                  pad_token_id=2)
FREEZE = ("embed/.*", "layers/0/.*")
VARIANTS = {
    "full": {},
    "lora": {"lora": LoRAConfig(rank=4, alpha=8.0)},
    "freeze": {"optim.freeze": FREEZE, "reward.freeze": FREEZE},
    "separate_critic": {"ppo.critic": "separate"},
}


MESH = MeshConfig(1, 2, 2)


def small_config(mesh=MESH, **changes) -> Config:
    base = derive(Config(), {
        "model.source": "random", "model.arch": CFG, "mesh": mesh,
        "data.max_prompt_length": 8, "data.max_response_length": 8,
        "rollout.max_new_tokens": 4, "sft.batch_size": 4, "reward.batch_size": 4,
        "dpo.batch_size": 4, "ppo.prompts_per_iteration": 4, "ppo.epochs": 1,
        "grpo.prompts_per_iteration": 2, "grpo.group_size": 2})
    return derive(base, changes)


def bytes_on_device0(tree) -> int:
    dev = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
               if s.device == dev)


CASES = [(a, v) for a in ALGORITHMS for v in VARIANTS
         if v != "separate_critic" or a == "ppo"]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm,variant", CASES)
def test_plan_reports_the_state_training_builds(algorithm, variant):
    """Per-device parameter and optimizer bytes of `jrlhf plan` == those of the state the
    training stage builds (same config, same mesh), for full fine-tuning, LoRA, regex freezing
    and a separate critic."""
    config = small_config(**VARIANTS[variant])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a mesh smaller than the 8 fake devices
        planned = plan(config, algorithm, "h100")
        setup = make_setup(algorithm, config,
                           *initial_weights(algorithm, config, CFG, init_params(CFG, 0)))
    assert planned["params_bytes_per_device"] == bytes_on_device0(setup.state.params)
    assert planned["optimizer_bytes_per_device"] == bytes_on_device0(setup.state.opt_state)
    reference = 0 if setup.ref_params is None else bytes_on_device0(setup.ref_params)
    assert planned["reference_bytes_per_device"] == reference
    assert planned["memory_basis"] == "estimate" and planned["fits"]
    # Each variant really changes what is planned (the old planner ignored LoRA and critics).
    labels = setup.labels
    frozen = [x for x, label in zip(jax.tree.leaves(setup.state.params), jax.tree.leaves(labels))
              if label == optim.FROZEN]
    if variant in ("lora", "freeze") and algorithm != "reward" or \
            variant == "freeze" and algorithm == "reward":
        assert frozen
    elif variant == "full":
        assert not frozen
    if variant == "separate_critic":
        assert set(setup.state.params) == {"policy", "value"}
    if algorithm in ("ppo", "reward"):  # a value / reward head always trains
        critic = "value" if variant == "separate_critic" else "policy"
        labels = setup.labels[critic] if algorithm == "ppo" else setup.labels
        assert labels["score"]["kernel"] == optim.TRAINABLE
    if algorithm == "ppo" and variant == "freeze":
        assert setup.labels["policy"]["embed"]["embedding"] == optim.FROZEN


def test_plan_memory_is_labelled_and_estimated_from_the_shape():
    """On CPU stand-ins the activations are an analytic estimate, XLA:CPU's temps beside it;
    the estimate grows linearly in batch size."""
    a = plan(small_config(mesh=MeshConfig(1, 1, 1)), "sft")
    b = plan(small_config(mesh=MeshConfig(1, 1, 1), **{"sft.batch_size": 8}), "sft")
    assert a["memory_basis"] == "estimate"
    assert b["activation_estimate_bytes_per_device"] == \
        2 * a["activation_estimate_bytes_per_device"]
    assert a["xla_cpu_temp_bytes_per_device"] > 0


@pytest.mark.parametrize("flash,measured", [(False, 34.3e9), (True, 17.9e9)])
def test_llama_1b_sft_plan_is_near_the_h200_measurement(flash, measured):
    """BENCHMARK.md's Llama-3.2-1B-shaped SFT step (8 x 1024, bf16, logits unchunked) used
    34.3 GB of XLA temp memory on an H200 with XLA's attention and 17.9 GB with cuDNN flash
    attention; XLA:CPU's buffer assignment said 87 GiB. The estimate (activations + gradients)
    is within 1.5x of each measurement, and chunking the LM head lowers it."""
    from jrlhf.plan import activation_estimate, flash_attention

    llama = ModelConfig(family="llama", vocab_size=128256, hidden_size=2048, num_layers=16,
                        num_heads=32, num_kv_heads=8, head_dim=64, intermediate_size=8192,
                        tie_word_embeddings=True, dtype="bfloat16", logits_chunk_size=0,
                        attention="auto" if flash else "xla")
    assert flash_attention(llama, "h200") == flash
    activations = activation_estimate(llama, 8 * 1024, 1024, 8 * 1024, flash=flash)
    estimate = activations + 4 * llama.num_params
    assert measured / 1.5 < estimate < measured * 1.5, estimate / 1e9
    chunked = dataclasses.replace(llama, logits_chunk_size=2048)
    saved = activations - activation_estimate(chunked, 8 * 1024, 1024, 8 * 1024, flash=flash)
    assert saved == 2 * 4 * (8 * 1024 - 2048) * 128256


def test_bench_times_the_training_state():
    """`jrlhf bench` compiles the step of the setup training builds: with a separate critic and
    LoRA, its argument bytes equal those of the training setup's step."""
    config = small_config(mesh=MeshConfig(1, 1, 1), **{"ppo.critic": "separate",
                                                       "lora": LoRAConfig(rank=4, alpha=8.0)})
    work = bench.Workload.from_config(config)
    r = bench.bench_step(work, "ppo", steps=1, warmup=0)
    setup = make_setup("ppo", config, CFG, init_params(CFG, config.run.seed))
    compiled = setup.step.lower(setup.state, batch_shapes(setup, config)).compile()
    assert r["memory_per_device"]["argument_bytes"] == \
        compiled.memory_analysis().argument_size_in_bytes
    # LoRA: the base weights are frozen (no Adam moments) and the value model trains its head.
    assert optim.tree_bytes(setup.state.opt_state) < 0.5 * optim.tree_bytes(setup.state.params)


def test_rng_streams_are_named():
    assert stream_seed(0, "sft") == stream_seed(0, "sft") != stream_seed(0, "reward")
    assert stream_seed(0, "round1/ppo") != stream_seed(0, "round2/ppo")
    assert stream_seed(0, "ppo") != stream_seed(1, "ppo")
    np.testing.assert_array_equal(jax.random.key_data(stream_key(3, "ppo", "sample")),
                                  jax.random.key_data(stream_key(3, "ppo", "sample")))


def test_setups_refuse_unknown_algorithms_and_reward_without_head():
    with pytest.raises(ValueError, match="unknown algorithm 'ppo2'"):
        make_setup("ppo2", small_config(), CFG, init_params(CFG, 0))
    with pytest.raises(ValueError, match="reward_model_init"):
        make_setup("reward", small_config(), CFG, init_params(CFG, 0))


# ---------------------------------------------------------------------------------------------
# The shape of the code: tools beside the trainer, short functions.

OUTER = ("cli.py", "stages.py", "loops.py", "bench.py", "plan.py")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_tools_do_not_import_the_trainer():
    for tool in ("bench.py", "plan.py", "setups.py", "rollouts.py"):
        imports = imported_modules(ROOT / "jrlhf" / tool)
        trainer = {m for m in imports if m.startswith(("jrlhf.loops", "jrlhf.stages",
                                                       "jrlhf.pipeline", "jrlhf.cli"))}
        assert not trainer, (tool, trainer)
    assert "jrlhf.bench" not in imported_modules(ROOT / "jrlhf" / "plan.py")
    hardware = imported_modules(ROOT / "jrlhf" / "hardware.py")
    assert not {m for m in hardware if m.startswith("jrlhf")}  # a leaf


def test_outer_half_is_short_functions():
    total = 0
    for name in (*OUTER, "setups.py", "rollouts.py"):
        source = (ROOT / "jrlhf" / name).read_text()
        total += len(source.splitlines()) if name in OUTER else 0
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno - node.lineno + 1 <= 62, (name, node.name)
    assert total < 1737  # the outer half before one setup per algorithm


def test_optimizer_section_has_no_per_stage_fields():
    """The learning rate and schedule length belong to each stage: `--set optim.learning_rate`
    is an unknown key, not a setting that every stage overwrites."""
    from jrlhf.config import apply_overrides

    for key in ("optim.learning_rate=1e-3", "optim.total_steps=10", "ppo.temperature=0.5"):
        with pytest.raises(KeyError, match="unknown config key"):
            apply_overrides(Config(), [key])
    assert apply_overrides(Config(), ["rollout.temperature=0.5"]).rollout.temperature == 0.5


def test_every_config_field_is_read():
    """Each field of each config section is read somewhere in jrlhf (as `.field`) outside the
    schema itself (its derived properties count, its validation does not); a field no code
    reads is a setting that silently does nothing."""
    code = "\n".join(p.read_text() for p in (ROOT / "jrlhf").rglob("*.py")
                     if p.name != "config.py")
    schema = (ROOT / "jrlhf" / "config.py").read_text()
    code += "\n".join(ast.get_source_segment(schema, node) for node in ast.walk(ast.parse(schema))
                      if isinstance(node, ast.FunctionDef) and any(
                          getattr(d, "id", "") == "property" for d in node.decorator_list))
    unread = []
    for section in dataclasses.fields(Config):
        for field in dataclasses.fields(section.type if isinstance(section.type, type)
                                        else type(getattr(Config(), section.name))):
            if not re.search(rf"\.{field.name}\b", code):
                unread.append(f"{section.name}.{field.name}")
    assert not unread, unread


@pytest.mark.slow
def test_bench_and_plan_import_only_what_accelerator_hosts_have():
    """The GPU benchmark hosts have jax, flax, optax, orbax, torch and transformers, not TFDS,
    grain or gguf: importing the tools must not need them."""
    code = ("import sys, jrlhf.bench, jrlhf.plan; "
            "print(sorted(m for m in ('tensorflow_datasets', 'grain', 'gguf', 'tensorboardX') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("algorithm,estimator", [(a, "grpo") for a in ALGORITHMS]
                         + [("grpo", "rloo"), ("grpo", "reinforce++")])
def test_every_step_prints_a_one_line_summary(algorithm, estimator):
    """The progress line of each algorithm's step names some of its metrics (DPO and ORPO
    printed `[dpo 1] ` with nothing after it)."""
    from jrlhf.report import one_line

    config = small_config(mesh=MeshConfig(), **{"grpo.estimator": estimator})
    cfg, params = initial_weights(algorithm, config, CFG, init_params(CFG, 0))
    setup = make_setup(algorithm, config, cfg, params)
    _, metrics = jax.eval_shape(setup.step, setup.state, batch_shapes(setup, config))
    line = one_line(algorithm, 1, {k: 0.5 for k in metrics}, setup.algorithm.summary_keys)
    assert re.fullmatch(rf"\[{algorithm} 1\]( \S+=0\.5)+", line), (line, sorted(metrics))
