"""Mixtures of experts in training: the router's auxiliary losses against transformers and NumPy,
padding that changes no router statistic, router gradients, freezing the router, and the
dropless grouped matmul against a loop over experts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import make_hf_model
from jrlhf import models, optim
from jrlhf.models import moe
from jrlhf.models import transformer as tfm
from jrlhf.steps import make_sft_step
from test_steps import OPT, make_state, sft_batch


def qwen3_moe_cfg(**fields) -> models.ModelConfig:
    return models.ModelConfig(**dict(
        family="llama", hf_model_type="qwen3_moe", vocab_size=64, hidden_size=32, num_layers=3,
        num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=40, qk_norm=True,
        num_experts=4, experts_per_token=2, expert_size=16, norm_topk_prob=True,
        dense_layers=(1,), router_aux_loss_coef=0.01) | fields)


def numpy_balance_loss(logits_per_layer, k, mask):
    """transformers' load_balancing_loss_func, written out: logits `[N, E]` per layer, `mask
    [N]`, pooled over layers."""
    E = logits_per_layer[0].shape[-1]
    counts, probs, total = np.zeros(E), np.zeros(E), 0.0
    for logits in logits_per_layer:
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        top = np.argsort(-p, axis=-1)[:, :k]
        for n in range(len(p)):
            for e in top[n]:
                counts[e] += mask[n]
        probs += (p * mask[:, None]).sum(0)
        total += mask.sum()
    return E * np.sum(counts / total * probs / total)


def test_load_balancing_loss_equals_transformers_and_numpy(tmp_path):
    torch_model = make_hf_model("qwen3_moe")
    torch_model.save_pretrained(tmp_path)
    folder_cfg, params = models.load_pretrained(tmp_path)
    ids = np.random.RandomState(0).randint(3, folder_cfg.vocab_size, (3, 11)).astype(np.int32)
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids), output_router_logits=True)
    hidden, stats = tfm.bind(folder_cfg, params)(ids, np.ones_like(ids), with_router=True)
    assert stats.counts.shape == (len(folder_cfg.sparse_layers), folder_cfg.num_experts)
    ours = float(moe.load_balancing_loss(stats))
    np.testing.assert_allclose(ours, float(ref.aux_loss), rtol=1e-5)
    logits = [r.numpy() for r in ref.router_logits]
    np.testing.assert_allclose(
        ours, numpy_balance_loss(logits, folder_cfg.experts_per_token, np.ones(33)), rtol=1e-5)
    # z-loss: mean over layers and tokens of logsumexp(logits)^2.
    lse = [np.log(np.exp(x).sum(-1)) for x in logits]
    np.testing.assert_allclose(float(moe.z_loss(stats)),
                               np.mean(np.concatenate(lse) ** 2), rtol=1e-5)
    # Load metrics from the same counts.
    share = np.asarray(stats.counts) / np.asarray(stats.counts).sum(-1, keepdims=True)
    metrics = moe.load_metrics(stats)
    np.testing.assert_allclose(float(metrics["moe/load_max_share"]), share.max(), rtol=1e-6)
    assert float(metrics["moe/dropped_tokens"]) == 0.0


def test_padding_changes_no_router_statistic():
    """A left-padded batch's router sums equal those of its rows run alone: padded positions
    are routed (dropless) but never counted."""
    cfg = qwen3_moe_cfg()
    params = models.init_params(cfg, 1)
    rng = np.random.RandomState(2)
    lengths = [9, 4, 1]
    ids = rng.randint(3, cfg.vocab_size, (3, 9)).astype(np.int32)
    mask = np.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, 9 - n:] = 1
    model = tfm.bind(cfg, params)
    _, padded = model(np.where(mask > 0, ids, 0), mask, with_router=True)
    alone = [model(ids[b:b + 1, 9 - n:], np.ones((1, n), np.int32), with_router=True)[1]
             for b, n in enumerate(lengths)]
    for field in moe.RouterStats._fields:
        total = sum(np.asarray(getattr(s, field)) for s in alone)
        np.testing.assert_allclose(np.asarray(getattr(padded, field)), total, rtol=1e-5,
                                   atol=1e-5, err_msg=field)
    assert float(jnp.sum(padded.tokens)) == sum(lengths) * len(cfg.sparse_layers)


def test_grouped_matmul_equals_a_loop_over_experts():
    rng = np.random.RandomState(3)
    N, D, E, F, k = 13, 6, 5, 7, 3
    x = rng.randn(N, D).astype(np.float32)
    gate, up = rng.randn(E, D, F).astype(np.float32), rng.randn(E, D, F).astype(np.float32)
    down = rng.randn(E, F, D).astype(np.float32)
    routing = moe.route(jnp.asarray(rng.randn(N, E), jnp.float32), k, normalize=False)
    out = moe.grouped_mlp(jnp.asarray(x), routing, gate, up, down, jax.nn.silu, jnp.float32)
    want = np.zeros((N, D))
    for n in range(N):
        for j in range(k):
            e, w = int(routing.experts[n, j]), float(routing.weights[n, j])
            h = np.asarray(jax.nn.silu(x[n] @ gate[e])) * (x[n] @ up[e])
            want[n] += w * (h @ down[e])
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-4)


def test_sft_step_adds_the_router_terms_and_trains_the_router():
    cfg = dataclasses.replace(qwen3_moe_cfg(), router_z_loss_coef=0.001)
    params = models.init_params(cfg, 0)
    batch = jax.tree.map(np.asarray, sft_batch(vocab=cfg.vocab_size))
    state, labels = make_state(params)
    new, metrics = make_sft_step(cfg, labels=labels)(state, batch)
    # The loss is the NLL plus the weighted router terms of the same forward.
    plain = dataclasses.replace(cfg, router_aux_loss_coef=0.0, router_z_loss_coef=0.0)
    _, plain_metrics = make_sft_step(plain, labels=labels)(make_state(params)[0], batch)
    want = (plain_metrics["sft/loss"] + 0.01 * metrics["sft/moe/aux_loss"]
            + 0.001 * metrics["sft/moe/z_loss"])
    np.testing.assert_allclose(float(metrics["sft/loss"]), float(want), rtol=1e-5)
    assert float(metrics["sft/moe/aux_loss"]) >= 0.99 * cfg.experts_per_token
    # Gradients reach the router and every expert that tokens were sent to.
    for layer in cfg.sparse_layers:
        router = params["layers"][layer]["mlp"]["router"]["kernel"]
        assert np.abs(np.asarray(new.params["layers"][layer]["mlp"]["router"]["kernel"])
                      - np.asarray(router)).max() > 0


def test_a_frozen_router_keeps_no_optimizer_moments_and_does_not_move():
    cfg = qwen3_moe_cfg()
    params = models.init_params(cfg, 0)
    state, labels = make_state(params, OPT, freeze=(r".*mlp/router/.*",))
    assert {label for path, label in _flat(labels).items() if "/router/" in path} == {
        optim.FROZEN}
    moments = jax.tree.leaves(state.opt_state)
    moment_bytes = sum(x.size for x in moments if hasattr(x, "size") and x.ndim)
    trainable = sum(x.size for path, x in _flat(params).items() if "/router/" not in path)
    assert moment_bytes == 2 * trainable  # Adam's two moments, none for the routers
    batch = jax.tree.map(np.asarray, sft_batch(vocab=cfg.vocab_size))
    new, _ = make_sft_step(cfg, labels=labels)(state, batch)
    for path, value in _flat(new.params).items():
        before = _flat(params)[path]
        moved = np.abs(np.asarray(value) - np.asarray(before)).max() > 0
        assert moved == ("/router/" not in path), path


def _flat(tree):
    from jrlhf import paths

    return paths.flatten(tree)


@pytest.mark.parametrize("bad, message", [
    (dict(experts_per_token=5), "experts_per_token must be in 1..num_experts=4"),
    (dict(expert_size=0), "expert_size must be a positive integer"),
    (dict(dense_layers=(3,)), "dense_layers [3] are not layers of a 3-layer model"),
    (dict(scan_layers=True), "dense_layers mixes dense and sparse MLPs"),
])
def test_bad_expert_fields_are_one_line_naming_them(bad, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        qwen3_moe_cfg(**bad)


def test_deepseek_v3_is_refused_naming_what_is_missing():
    import transformers

    hf = transformers.AutoConfig.for_model("deepseek_v3", vocab_size=64, hidden_size=32,
                                           num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(NotImplementedError, match="multi-head latent attention"):
        models.from_hf_config(hf)


def near_tie_router(cfg, params, eps=1e-6, seed=5):
    """`params` with every router's columns equal up to `eps`: float32 rounding that differs
    between the sampler's cached decode and the trainer's full forward flips some tokens'
    experts."""
    rng = np.random.RandomState(seed)
    params = jax.tree.map(np.array, params)
    for layer in cfg.sparse_layers:
        kernel = params["layers"][layer]["mlp"]["router"]["kernel"]
        column = rng.randn(kernel.shape[0], 1).astype(np.float32)
        kernel[...] = column + eps * rng.randn(*kernel.shape).astype(np.float32)
    return params


def test_routing_replay_makes_the_trainer_score_what_the_sampler_sampled():
    """With the sampler's experts replayed, the trainer's log-probs of the sampled tokens equal
    the sampler's (float32); without, a near-tie router routes some tokens elsewhere and the
    log-probs show it, and `routing_differs` counts those tokens. Gradients still reach the
    router through the replayed experts' weights."""
    from jrlhf.sampling import generate

    cfg = qwen3_moe_cfg(num_experts=8, experts_per_token=2, vocab_size=97)
    params = near_tie_router(cfg, models.init_params(cfg, 3))
    rng = np.random.RandomState(0)
    P, N = 9, 10
    ids = rng.randint(3, cfg.vocab_size, (6, P)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :4] = mask[4, :7] = 0  # left padding
    gen = generate(cfg, params, np.where(mask > 0, ids, 0), mask, jax.random.key(1),
                   max_new_tokens=N, temperature=1.0, pad_token_id=0, record_experts=True)
    assert gen.experts.shape == (6, P + N, len(cfg.sparse_layers), cfg.experts_per_token)
    full = np.concatenate([np.where(mask > 0, ids, 0), np.asarray(gen.tokens)], axis=1)
    full_mask = np.concatenate([mask, np.asarray(gen.mask)], axis=1)
    response = np.asarray(gen.mask) > 0

    def scored(replay):
        out = tfm.token_outputs(cfg, params, full, full_mask, last=N, experts=gen.experts,
                                replay=replay, with_router=True)
        gap = np.abs(np.asarray(out.logprobs) - np.asarray(gen.logprobs))[response]
        return gap.max(), float(moe.load_metrics(out.router)["moe/routing_differs"])

    replayed_gap, differs = scored(True)
    free_gap, free_differs = scored(False)
    print(f"replay on: gap {replayed_gap:.2e}; off: gap {free_gap:.2e}, "
          f"routing differs on {free_differs:.1%} of (layer, token)s")
    assert replayed_gap < 1e-5
    assert free_gap > 1e-3 and free_differs > 0
    assert differs > 0  # replayed: the trainer's own router would still have chosen otherwise

    def loss(p):
        return jnp.sum(tfm.token_outputs(cfg, p, full, full_mask, last=N,
                                         experts=gen.experts).logprobs * response)

    grads = jax.grad(loss)(jax.tree.map(jnp.asarray, params))
    for layer in cfg.sparse_layers:
        assert float(jnp.abs(grads["layers"][layer]["mlp"]["router"]["kernel"]).max()) > 0


@pytest.mark.parametrize("mode", ["on", "measure"])
def test_grpo_rollout_and_update_replay_the_sampled_routing(mode):
    """A GRPO rollout scored with the sampler's experts (`rollout.routing_replay=on`): the
    policy's scoring log-probs equal the sampler's; with `measure` they are only compared (the
    gap shows); the update reads them from the batch and logs how often routing differs."""
    from jrlhf.config import GRPOConfig
    from jrlhf.sampling import generate
    from jrlhf.steps import make_grpo_step
    from jrlhf.steps.rollout import score_rollout

    cfg = qwen3_moe_cfg(num_experts=8, experts_per_token=2, vocab_size=97)
    params = near_tie_router(cfg, models.init_params(cfg, 3))
    rng = np.random.RandomState(0)
    ids = rng.randint(3, cfg.vocab_size, (2, 7)).astype(np.int32)
    mask = np.ones_like(ids)
    K, N = 4, 8
    gen = generate(cfg, params, ids, mask, jax.random.key(2), max_new_tokens=N,
                   temperature=1.0, pad_token_id=0, num_samples=K, record_experts=True)
    reward_fn = lambda p, pi, pm, ri, rm: jnp.sum(rm, axis=1).astype(jnp.float32)  # noqa: E731
    batch, scores = score_rollout({"policy": params}, params, None, np.repeat(ids, K, 0),
                                  np.repeat(mask, K, 0), gen, policy_cfg=cfg, value_cfg=None,
                                  reward_fn=reward_fn, replay_experts=mode == "on")
    assert ("experts" in batch) == (mode == "on") and ("sampler_experts" in batch) == (
        mode == "measure")
    gap = np.abs(np.asarray(batch["logprobs"] - batch["sampler_logprobs"])).max()
    assert (gap < 1e-5) if mode == "on" else (gap > 1e-3), gap
    batch = dict(batch, scores=scores)
    state, labels = make_state(params)
    _, metrics = make_grpo_step(cfg, GRPOConfig(group_size=K), labels=labels)(state, batch)
    np.testing.assert_allclose(float(metrics["mismatch/gap_max"]), gap, rtol=1e-4, atol=1e-7)
    assert float(metrics["grpo/moe/routing_differs"]) > 0


def test_lora_adapts_the_router_and_each_expert():
    """LoRA targets can address a router (a 2-D kernel) and the stacked experts (one adapter
    per expert, `gate_proj_lora_a [E, D, r]`): training moves only the adapters, the merged
    stack is W_e + scale · A_e·B_e for every expert, and the base stays the reference."""
    from jrlhf import lora
    from jrlhf.config import LoRAConfig

    cfg = qwen3_moe_cfg()
    base = models.init_params(cfg, 0)
    lcfg = LoRAConfig(rank=4, alpha=8.0, targets=(r".*mlp/router/kernel",
                                                  r".*mlp/experts/(gate_proj|down_proj)"))
    params = lora.add_lora(base, lcfg, jax.random.key(1))
    experts = params["layers"][0]["mlp"]["experts"]
    assert experts["gate_proj_lora_a"].shape == (cfg.num_experts, cfg.hidden_size, 4)
    assert experts["down_proj_lora_b"].shape == (cfg.num_experts, 4, cfg.hidden_size)
    assert "up_proj_lora_a" not in experts
    state, labels = make_state(params, train_only=lora.LORA_TRAINABLE)
    batch = jax.tree.map(np.asarray, sft_batch(vocab=cfg.vocab_size))
    new, _ = make_sft_step(cfg, labels=labels, lora_scale=lcfg.scale)(state, batch)
    for path, value in _flat(new.params).items():
        moved = np.abs(np.asarray(value) - np.asarray(_flat(params)[path])).max() > 0
        assert moved == ("lora_b" in path), path  # B starts at 0, so A's gradient is 0 at step 1
    merged = lora.merge_lora(new.params, lcfg.scale)
    trained = new.params["layers"][2]["mlp"]["experts"]
    for e in range(cfg.num_experts):
        want = (np.asarray(trained["gate_proj"][e]) + lcfg.scale * np.asarray(
            trained["gate_proj_lora_a"][e]) @ np.asarray(trained["gate_proj_lora_b"][e]))
        np.testing.assert_allclose(merged["layers"][2]["mlp"]["experts"]["gate_proj"][e], want,
                                   atol=1e-6)
    assert _flat(lora.base_params(new.params)).keys() == _flat(base).keys()


def test_continuous_slots_record_the_static_samplers_experts():
    """Greedy decoding through 3 continuous-batching slots records, row for row, the tokens and
    the experts of every prompt and response token that the static sampler records."""
    from jrlhf.continuous import generate_continuous
    from jrlhf.sampling import generate

    cfg = qwen3_moe_cfg(vocab_size=97)
    params = models.init_params(cfg, 4)
    rng = np.random.RandomState(1)
    ids = rng.randint(3, cfg.vocab_size, (4, 6)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[2, :3] = 0
    ids = np.where(mask > 0, ids, 0)
    options = dict(max_new_tokens=7, temperature=0.0, pad_token_id=0, num_samples=2,
                   record_experts=True)
    static = generate(cfg, params, ids, mask, jax.random.key(0), **options)
    slots = generate_continuous(cfg, params, ids, mask, jax.random.key(0), slots=3,
                                budgets=np.array([7, 3, 5, 7]), **options)
    lengths = np.asarray(slots.mask).sum(1)
    np.testing.assert_array_equal(np.asarray(slots.tokens)[np.asarray(slots.mask) > 0],
                                  np.asarray(static.tokens)[np.asarray(slots.mask) > 0])
    P = ids.shape[1]
    for row in range(8):  # prompt (real part) and every generated token's experts
        real = slice(P - int(mask[row // 2].sum()), P + int(lengths[row]))
        np.testing.assert_array_equal(np.asarray(slots.experts)[row, real],
                                      np.asarray(static.experts)[row, real], err_msg=str(row))
