"""Sharded steps on 8 fake CPU devices give the numbers of one device."""

import dataclasses
import functools
import warnings

import jax
import numpy as np
import pytest

from jrlhf import sharding
from jrlhf.config import GRPOConfig, MeshConfig
from jrlhf.models import init_params
from jrlhf.steps import (make_grpo_step, make_ppo_step, make_reward_step, make_sft_step,
                         place_state)
from test_steps import (CFG, OPT_EQ, PPO_CFG, make_state, reward_batch,
                        rollout_batch, sft_batch)

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 1, 1)]


def close(a, b, atol=1e-6):
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=atol, rtol=0), a, b)


def run(kind, mesh=None, cfg=CFG):
    """One step of `kind` (sft, reward, ppo, grpo) for a model shaped like `cfg`, unsharded
    (mesh None) or on `mesh`; returns (params, metrics)."""
    if kind == "sft":
        state, labels = make_state(init_params(cfg, 0), OPT_EQ)
        batch, factory = sft_batch(), functools.partial(make_sft_step, cfg, labels=labels)
    elif kind == "reward":
        rm_cfg = dataclasses.replace(cfg, lm_head=False, scalar_head=True)
        state, labels = make_state(init_params(rm_cfg, 0), OPT_EQ)
        batch, factory = reward_batch(), functools.partial(make_reward_step, rm_cfg, labels=labels)
    elif kind == "ppo":
        policy_cfg = dataclasses.replace(cfg, scalar_head=True)
        params = {"policy": init_params(policy_cfg, 0)}
        state = make_state(params, OPT_EQ, kl_coef=PPO_CFG.kl_coef)[0]
        batch = rollout_batch(params, policy_cfg=policy_cfg)
        factory = functools.partial(make_ppo_step, policy_cfg, PPO_CFG)
    else:
        from test_preference import group_rollout

        params = init_params(cfg, 0)
        state = make_state(params, OPT_EQ)[0]
        batch = group_rollout(params, cfg=cfg)
        factory = functools.partial(make_grpo_step, cfg,
                                    GRPOConfig(group_size=4, minibatch_size=8))
    if mesh is not None:
        state = place_state(state, mesh)
    step = factory(state=state, mesh=mesh)
    new, metrics = step(state, batch)
    return jax.tree.map(np.asarray, new.params), {k: float(v) for k, v in metrics.items()}


@pytest.fixture(scope="module")
def unsharded():
    return {kind: run(kind) for kind in ("sft", "reward", "ppo")}


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["sft", "reward", "ppo"])
def test_sharded_step_equals_single_device(kind, shape, unsharded):
    """float32; params within 1e-6 (~0.3% of one update), metrics within 1e-5 relative."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mesh = sharding.make_mesh(MeshConfig(*shape))
    params, metrics = run(kind, mesh)
    ref_params, ref_metrics = unsharded[kind]
    close(params, ref_params)
    assert metrics.keys() == ref_metrics.keys()
    for k in metrics:
        np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_params_are_really_sharded():
    mesh = sharding.make_mesh(MeshConfig(2, 2, 2))
    state, _ = make_state(init_params(CFG, 0), OPT_EQ)
    state = place_state(state, mesh)
    q = state.params["layers"][0]["attn"]["q_proj"]["kernel"]  # [32, 32] over (fsdp, tensor)
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (16, 16)
    mu = state.opt_state.inner_states["trainable"].inner_state[1][0].mu
    assert mu["layers"][0]["attn"]["q_proj"]["kernel"].sharding == q.sharding


def test_bad_mesh_and_batch_are_clear_errors():
    with pytest.raises(ValueError, match="3 = 12 devices does not divide the 8"):
        sharding.make_mesh(MeshConfig(2, 2, 3))
    mesh = sharding.make_mesh(MeshConfig(4, 2, 1))
    state, labels = make_state(init_params(CFG, 0), OPT_EQ)
    state = place_state(state, mesh)
    step = make_sft_step(CFG, labels=labels, state=state, mesh=mesh)
    with pytest.raises(ValueError, match=r"leading size 6, not divisible by data x fsdp = 8"):
        step(state, sft_batch(B=6))


def per_device_state_bytes(fsdp: int) -> int:
    """Parameter + optimizer bytes per device of the compiled SFT step (XLA memory analysis)."""
    mesh = sharding.make_mesh(MeshConfig(8 // fsdp, fsdp, 1))
    cfg = dataclasses.replace(CFG, hidden_size=64, intermediate_size=128, vocab_size=128,
                              head_dim=16)
    state, labels = make_state(init_params(cfg, 0), OPT_EQ)
    state = place_state(state, mesh)
    step = make_sft_step(cfg, labels=labels, state=state, mesh=mesh)
    batch = jax.tree.map(np.asarray, sft_batch(vocab=128))
    compiled = step.jitted.lower(state, batch).compile()
    batch_bytes = sum(x.nbytes for x in batch.values()) // 8
    return compiled.memory_analysis().argument_size_in_bytes - batch_bytes


def test_fsdp_shrinks_per_device_state_bytes():
    full, sharded = per_device_state_bytes(1), per_device_state_bytes(8)
    print(f"per-device params+optimizer bytes: fsdp=1 {full}, fsdp=8 {sharded}")
    assert full / sharded > 6  # norms and scalars stay replicated


def _family_config(model_type: str, **fields):
    """A tiny config of a 2026 checkpoint family, translated from transformers' own config."""
    import transformers

    from jrlhf.models import from_hf_config

    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return from_hf_config(transformers.AutoConfig.for_model(model_type, **base, **fields))


# Llama 3.2's shape (llama3 RoPE scaling, tied head, grouped-query attention) and Qwen3's
# (QK-norm, a head_dim independent of hidden_size / heads, untied head), at test size.
FAMILY_SHAPES = {
    "llama3.2": lambda: _family_config(
        "llama", head_dim=8, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=16)),
    "qwen3": lambda: _family_config("qwen3", head_dim=16, tie_word_embeddings=False,
                                    rope_theta=1e6),
}


def moe_config():
    """A Qwen3-MoE shape: sparse and dense layers, 2 of 4 experts per token, the load-balancing
    and z losses on."""
    return dataclasses.replace(_family_config(
        "qwen3_moe", head_dim=16, tie_word_embeddings=False, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=24, mlp_only_layers=[1],
        norm_topk_prob=True, router_aux_loss_coef=0.01), router_z_loss_coef=0.001)


@pytest.fixture(scope="module")
def moe_one_device():
    cfg = moe_config()
    return cfg, {kind: run(kind, None, cfg) for kind in ("sft", "reward", "ppo", "grpo")}


def assert_same_step(kind, cfg, mesh, reference=None):
    """`kind`'s step on `mesh` gives one device's params and metrics (`reference`: one
    device's `run` result, computed here when None). Returns the metrics."""
    ref_params, ref_metrics = reference or run(kind, None, cfg)
    params, metrics = run(kind, mesh, cfg)
    close(params, ref_params)
    assert metrics.keys() == ref_metrics.keys()
    for k in metrics:
        # A clip fraction counts tokens on either side of a threshold: summation order may
        # move one token (1/72 of PPO's) across it, which changes no parameter beyond 1e-6.
        atol = 0.02 if k.endswith("clipfrac") else 1e-6
        np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, atol=atol,
                                   err_msg=f"{kind}: {k}")
    return metrics


@pytest.mark.slow
@pytest.mark.parametrize("shape", [dict(data=2, expert=4), dict(fsdp=2, expert=2, tensor=2)],
                         ids=["data2_expert4", "fsdp2_expert2_tensor2"])
def test_moe_steps_on_expert_meshes_equal_one_device(shape, moe_one_device):
    """A Qwen3-MoE-shaped model's sft, reward, ppo and grpo steps with the experts split over
    an `expert` mesh axis give one device's params and metrics (router losses included)."""
    cfg, reference = moe_one_device
    mesh = sharding.make_mesh(MeshConfig(**shape))
    for kind in ("sft", "reward", "ppo", "grpo"):
        metrics = assert_same_step(kind, cfg, mesh, reference[kind])
        assert any("moe/aux_loss" in k for k in metrics), (kind, sorted(metrics))
    # The experts are stored split: each device holds E / expert of them.
    state, _ = make_state(init_params(cfg, 0), OPT_EQ)
    placed = place_state(state, mesh)
    experts = placed.params["layers"][0]["mlp"]["experts"]["gate_proj"]
    assert experts.addressable_shards[0].data.shape[0] == cfg.num_experts // shape["expert"]
    # The rollout sampler decodes expert-parallel too (traced under the expert mesh), and
    # samples what one device samples, with the experts it records.
    from jrlhf.config import RolloutConfig
    from jrlhf.rollouts import make_sampler

    rollout = RolloutConfig(max_new_tokens=6, temperature=1.0, routing_replay="on")
    ids = np.random.default_rng(3).integers(3, cfg.vocab_size, (8, 5)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # a left-padded prompt
    key = jax.random.key(7)
    one = make_sampler(cfg, rollout, None, 0, num_samples=2)(state.params, ids, mask, key)
    from jrlhf.models import expert_parallel

    traced = []
    spy = lambda: traced.append(real()) or traced[-1]  # noqa: E731
    real, expert_parallel.expert_mesh = expert_parallel.expert_mesh, spy
    try:
        sampled = make_sampler(cfg, rollout, None, 0, num_samples=2, mesh=mesh)(
            placed.params, *sharding.put((ids, mask), sharding.batch_sharding(mesh)), key)
    finally:
        expert_parallel.expert_mesh = real
    assert traced and all(m is not None for m in traced)  # traced here, expert-parallel
    np.testing.assert_array_equal(sampled.tokens, one.tokens)
    np.testing.assert_array_equal(sampled.experts, one.experts)
    np.testing.assert_allclose(sampled.logprobs, one.logprobs, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILY_SHAPES))
def test_family_steps_on_a_2x2x2_mesh_equal_one_device(family):
    """sft_step, reward_step, ppo_step and grpo_step of a Llama 3.2- and a Qwen3-shaped model
    give on a (data 2, fsdp 2, tensor 2) mesh the params and metrics of one device."""
    cfg = FAMILY_SHAPES[family]()
    assert (cfg.qk_norm, cfg.tie_word_embeddings) == ((True, False) if family == "qwen3"
                                                      else (False, True))
    mesh = sharding.make_mesh(MeshConfig(2, 2, 2))
    for kind in ("sft", "reward", "ppo", "grpo"):
        assert_same_step(kind, cfg, mesh)


@pytest.mark.slow
def test_expert_parallel_moves_tokens_not_activations(monkeypatch):
    """On (data 2, expert 4) the compiled MoE sft step dispatches by all-gathering the expert
    group's tokens and combines by a reduce-scatter (`jrlhf.models.expert_parallel`): its
    collectives move under a fifth of the bytes of GSPMD's own partitioning of the same grouped
    matmuls (which all-reduces every (token, expert) pair's activations)."""
    from jrlhf.models import expert_parallel
    from jrlhf.plan import collective_bytes

    cfg = moe_config()
    mesh = sharding.make_mesh(MeshConfig(data=2, expert=4))
    batch = jax.tree.map(np.asarray, sft_batch(B=16, T=32, vocab=cfg.vocab_size))

    def compiled_bytes():
        state, labels = make_state(init_params(cfg, 0), OPT_EQ)
        state = place_state(state, mesh)
        step = make_sft_step(cfg, labels=labels, state=state, mesh=mesh)
        return collective_bytes(step.jitted.lower(state, batch).compile().as_text())

    ours = compiled_bytes()
    monkeypatch.setattr(expert_parallel, "expert_mesh", lambda: None)
    gspmd = compiled_bytes()
    print(f"collective bytes per device: expert-parallel {ours}, GSPMD {gspmd}")
    assert ours.get("reduce-scatter", 0) > 0
    assert sum(ours.values()) * 5 < sum(gspmd.values())
