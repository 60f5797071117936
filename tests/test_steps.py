"""sft_step, reward_step, ppo_step: losses fall, accumulation is exact, freezing and LoRA hold,
and a whole PPO update is one compiled call."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrlhf import lora, optim, paths, rl
from jrlhf.config import LoRAConfig, OptimConfig, PPOConfig
from jrlhf.models import ModelConfig, forward, init_params
from jrlhf.state import TrainState
from jrlhf.steps import (make_ppo_step, make_reward_step, make_sft_step, pairs_to_groups,
                         ppo_step, rollout_advantages)
from jrlhf.steps.rollout import policy_outputs

CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, intermediate_size=64)
GPT2 = ModelConfig(family="gpt2", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                   num_kv_heads=4, head_dim=8, intermediate_size=64, activation="gelu_new",
                   tie_word_embeddings=True, attention_bias=True, output_bias=True,
                   mlp_bias=True,
                   hf_model_type="gpt2", max_position_embeddings=64)
OPT = (OptimConfig(max_grad_norm=1.0), 3e-3)  # (optimizer config, learning rate)
# For equality checks: Adam's first step is lr * g / (|g| + eps), which turns gradients that are
# zero in exact arithmetic (e.g. the key bias, to which softmax is invariant) but ~1e-12 in
# float32 into full-size steps in either direction, and moves a parameter by up to lr * dg / eps
# for a summation-order difference dg in its gradient. With eps=1e-6 that amplification (300x)
# made a 1e-8 gradient difference fail atol=1e-6 (packed vs unpacked reward step, 2026-12-03);
# eps=1e-4 bounds it at 3x, while a real gradient error above ~3e-7 still moves a parameter by
# more than the atol=1e-6 the tests compare at.
OPT_EQ = (dataclasses.replace(OPT[0], eps=1e-4), 3e-4)


def make_state(params, optim_cfg=OPT, freeze=(), train_only=(), kl_coef=None):
    params = jax.tree.map(jnp.array, params)  # steps donate their state: keep the caller's copy
    labels = optim.trainable_labels(params, freeze, train_only)
    cfg, learning_rate = optim_cfg
    tx = optim.make_optimizer(cfg, labels, learning_rate=learning_rate)
    return TrainState.create(params, tx, 0, kl_coef), labels


def sft_batch(B=8, T=12, seed=0, vocab=64):
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, vocab, (B, T)).astype(np.int32)
    attn = np.ones((B, T), np.int32)
    loss_mask = np.zeros((B, T), np.int32)
    for b in range(B):
        pad = b % 3
        prompt = 2 + b % 4
        attn[b, T - pad:] = 0
        ids[b, T - pad:] = 0
        loss_mask[b, prompt:T - pad] = 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}


def reward_batch(G=8, K=3, T=10, seed=1, vocab=64):
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, vocab, (G, K, T)).astype(np.int32)
    mask = np.ones((G, K, T), np.int32)
    mask[:, :, :2] = rng.randint(0, 2, (G, K, 2))  # some left padding
    ranks = np.stack([rng.permutation(K) + 1 for _ in range(G)]).astype(np.int32)
    ranks[0, 2] = ranks[0, 1]  # a tie
    ranks[1, 0] = -1  # an absent response
    # Make the data learnable: the best response ends in token 1.
    for g in range(G):
        ids[g, np.argmin(np.where(ranks[g] > 0, ranks[g], 99)), -1] = 1
    return {"input_ids": ids, "attention_mask": mask, "ranks": ranks}


def test_sft_loss_counts_response_tokens_only():
    params = init_params(CFG, 0)
    batch = sft_batch()
    state, _ = make_state(params)
    _, metrics = make_sft_step(CFG)(state, batch)
    logits = np.asarray(forward(CFG, params, batch["input_ids"], batch["attention_mask"]))
    logp = np.asarray(rl.logprobs_from_logits(logits[:, :-1], batch["input_ids"][:, 1:]))
    m = batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]
    np.testing.assert_allclose(metrics["sft/loss"], -(logp * m).sum() / m.sum(), rtol=1e-5)
    assert int(metrics["sft/tokens"]) == m.sum()
    # Prompt and padding tokens have no effect on the loss of the response tokens they do
    # not precede... but they are context, so we change only padding and targets' masks here:
    noisy = dict(batch, input_ids=np.where(batch["attention_mask"] > 0, batch["input_ids"], 63))
    state2, _ = make_state(params)
    _, metrics2 = make_sft_step(CFG)(state2, noisy)
    np.testing.assert_allclose(metrics2["sft/loss"], metrics["sft/loss"], rtol=1e-6)


def test_sft_step_reduces_loss():
    state, _ = make_state(init_params(CFG, 0))
    step = make_sft_step(CFG)
    batch = sft_batch()
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["sft/loss"]))
    assert losses[-1] < 0.8 * losses[0], losses
    assert int(state.step) == 8


@pytest.mark.slow
@pytest.mark.parametrize("family_cfg", [CFG, GPT2], ids=["llama", "gpt2"])
def test_grad_accumulation_equals_full_batch(family_cfg):
    params = init_params(family_cfg, 1)
    batch = sft_batch(B=8)  # micro-batches hold different numbers of response tokens
    out = {}
    for k in (1, 2, 4):
        state, _ = make_state(params, OPT_EQ)
        new, metrics = make_sft_step(family_cfg, grad_accum_steps=k)(state, batch)
        out[k] = (new.params, metrics)
    for k in (2, 4):
        np.testing.assert_allclose(out[k][1]["sft/loss"], out[1][1]["sft/loss"], rtol=1e-6)
        jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6, rtol=0),
                     out[k][0], out[1][0])


def test_frozen_params_bit_identical_and_without_moments():
    params = init_params(CFG, 0)
    freeze = (r"embed/.*", r"layers/0/.*")
    state, labels = make_state(params, freeze=freeze)
    step = make_sft_step(CFG, labels=labels)
    before = jax.tree.map(np.asarray, params)
    for _ in range(3):
        state, _ = step(state, sft_batch())
    flat_before, flat_after = paths.flatten(before), paths.flatten(state.params)
    flat_labels = paths.flatten(labels)
    frozen = [p for p, label in flat_labels.items() if label == optim.FROZEN]
    assert frozen and all(p.startswith(("embed/", "layers/0/")) for p in frozen)
    for p in flat_before:
        same = np.array_equal(flat_before[p], np.asarray(flat_after[p]))
        assert same == (flat_labels[p] == optim.FROZEN), p
    trainable_bytes = sum(flat_before[p].nbytes for p in flat_before if p not in frozen)
    # Adam keeps mu and nu for trainable leaves only (plus a few scalar counters).
    assert 2 * trainable_bytes <= optim.tree_bytes(state.opt_state) <= 2 * trainable_bytes + 64


def test_freeze_regex_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"'layerz/.\*'"):
        optim.trainable_labels(init_params(CFG, 0), (r"layerz/.*",))


def test_lora_trains_adapters_only_and_merges():
    lcfg = LoRAConfig(rank=4, alpha=8.0, targets=(r".*attn/(q_proj|v_proj)/kernel",))
    base = init_params(CFG, 0)
    params = lora.add_lora(base, lcfg, jax.random.key(1))
    adapters = [p for p in paths.flatten(params) if "lora_" in p]
    assert len(adapters) == 2 * 2 * CFG.num_layers
    state, labels = make_state(params, train_only=lora.LORA_TRAINABLE)
    step = make_sft_step(CFG, labels=labels, lora_scale=lcfg.scale)
    losses = []
    for _ in range(6):
        state, metrics = step(state, sft_batch())
        losses.append(float(metrics["sft/loss"]))
    assert losses[-1] < losses[0]
    # Base weights bit-identical; the reference model is the base (no second copy needed).
    jax.tree.map(np.testing.assert_array_equal, lora.base_params(state.params),
                 jax.tree.map(np.asarray, base))
    adapter_bytes = sum(x.nbytes for p, x in paths.flatten(params).items() if "lora_" in p)
    assert optim.tree_bytes(state.opt_state) <= 2 * adapter_bytes + 64
    # merge_lora = W + scale * A @ B, and forward through it is what the step trained.
    merged = lora.merge_lora(state.params, lcfg.scale)
    q = state.params["layers"][0]["attn"]["q_proj"]
    np.testing.assert_allclose(merged["layers"][0]["attn"]["q_proj"]["kernel"],
                               q["kernel"] + lcfg.scale * q["lora_a"] @ q["lora_b"], rtol=1e-6)
    assert not lora.has_lora(merged)
    b = sft_batch()
    fresh, _ = make_state(state.params, train_only=lora.LORA_TRAINABLE)
    _, m = make_sft_step(CFG, labels=labels, lora_scale=lcfg.scale)(fresh, b)
    logits = forward(CFG, merged, b["input_ids"], b["attention_mask"])
    logp = rl.logprobs_from_logits(logits[:, :-1], b["input_ids"][:, 1:])
    w = b["loss_mask"][:, 1:] * b["attention_mask"][:, 1:]
    np.testing.assert_allclose(m["sft/loss"], -(np.asarray(logp) * w).sum() / w.sum(), rtol=1e-5)


def test_reward_step_reduces_loss_and_reports_accuracy():
    rm_cfg = dataclasses.replace(CFG, lm_head=False, scalar_head=True)
    state, _ = make_state(init_params(rm_cfg, 0))
    step = make_reward_step(rm_cfg)
    batch = reward_batch()
    history = []
    for _ in range(10):
        state, metrics = step(state, batch)
        history.append({k: float(v) for k, v in metrics.items()})
    assert history[-1]["reward/loss"] < 0.7 * history[0]["reward/loss"]
    assert history[-1]["reward/accuracy"] == 1.0
    # 8 groups of 3: 3 pairs each, minus the tie (group 0) and 2 pairs with the absent response.
    assert history[0]["reward/num_pairs"] == 8 * 3 - 1 - 2


@pytest.mark.slow
def test_reward_step_pairs_and_accumulation():
    rm_cfg = dataclasses.replace(CFG, lm_head=False, scalar_head=True)
    params = init_params(rm_cfg, 0)
    rng = np.random.RandomState(0)
    ids = rng.randint(1, 64, (4, 2, 9)).astype(np.int32)
    batch = pairs_to_groups(ids[:, 0], np.ones((4, 9), np.int32), ids[:, 1],
                            np.ones((4, 9), np.int32))
    s1, _ = make_state(params, OPT_EQ)
    s2, _ = make_state(params, OPT_EQ)
    n1, m1 = make_reward_step(rm_cfg)(s1, batch)
    n2, m2 = make_reward_step(rm_cfg, grad_accum_steps=2)(s2, batch)
    np.testing.assert_allclose(m1["reward/loss"], m2["reward/loss"], rtol=1e-6)
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6, rtol=0),
                 n1.params, n2.params)
    from jrlhf.models import reward_scores
    r = np.asarray(reward_scores(rm_cfg, params, ids.reshape(8, 9), np.ones((8, 9)))).reshape(4, 2)
    np.testing.assert_allclose(m1["reward/loss"], np.mean(np.log1p(np.exp(-(r[:, 0] - r[:, 1])))),
                               rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# PPO

PPO_CFG = PPOConfig(epochs=2, minibatch_size=4, kl_coef=0.05, vf_coef=0.1,
                    entropy_coef=0.01)
TEMPERATURE = 0.7  # the sampler's: the rollout batch carries it per row
POLICY_CFG = dataclasses.replace(CFG, scalar_head=True)


def rollout_batch(params, policy_cfg=POLICY_CFG, value_cfg=None, cfg=PPO_CFG, B=8, P=5, N=6,
                  seed=0):
    """A rollout whose `logprobs`/`values` are the current policy's (as the sampler gives)."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, 64, (B, P + N)).astype(np.int32)
    attn = np.ones((B, P + N), np.int32)
    resp_mask = np.ones((B, N), np.int32)
    for b in range(B):
        attn[b, : b % 3] = 0  # left-padded prompts
        n = N - (b % 4)  # responses of different lengths (then right padding)
        resp_mask[b, n:] = 0
        attn[b, P + n:] = 0
        ids[b, P + n:] = 0
    logprobs, _, values = policy_outputs(params, ids, attn, N, policy_cfg=policy_cfg,
                                         value_cfg=value_cfg, temperature=TEMPERATURE)
    logprobs = logprobs * resp_mask
    ref = logprobs + 0.1 * rng.randn(B, N).astype(np.float32) * resp_mask
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp_mask,
            "temperature": np.full(B, TEMPERATURE, np.float32),
            "logprobs": np.asarray(logprobs), "ref_logprobs": np.asarray(ref),
            "values": np.asarray(values) * resp_mask,
            "scores": rng.randn(B).astype(np.float32)}


def ppo_state(params, cfg=PPO_CFG, optim_cfg=OPT):
    return make_state(params, optim_cfg, kl_coef=cfg.kl_coef)[0]


def test_ppo_step_improves_its_objective():
    params = {"policy": init_params(POLICY_CFG, 0)}
    batch = rollout_batch(params)
    step = make_ppo_step(POLICY_CFG, PPO_CFG)
    state = ppo_state(params)
    state, first = step(state, batch)
    for _ in range(4):
        state, last = step(state, batch)
    # The clipped surrogate can improve by at most ~clip_eps * mean|A| (~0.16 here).
    assert float(last["ppo/policy_loss"]) < float(first["ppo/policy_loss"]) - 0.02
    assert float(last["value/loss"]) < float(first["value/loss"])
    assert int(state.step) == 5 * PPO_CFG.epochs * 2


def test_ppo_first_minibatch_has_ratio_one():
    """Before any update the policy is the sampling policy: approx-KL and clipfrac are 0."""
    cfg = dataclasses.replace(PPO_CFG, epochs=1, minibatch_size=0)
    params = {"policy": init_params(POLICY_CFG, 0)}
    step = make_ppo_step(POLICY_CFG, cfg)
    _, metrics = step(ppo_state(params, cfg), rollout_batch(params))
    assert float(metrics["ppo/approx_kl"]) < 1e-12
    assert float(metrics["ppo/clipfrac"]) == 0.0


def test_ppo_metrics_match_the_math():
    params = {"policy": init_params(POLICY_CFG, 0)}
    batch = rollout_batch(params)
    step = make_ppo_step(POLICY_CFG, PPO_CFG)
    _, metrics = step(ppo_state(params), batch)
    m = batch["response_mask"]
    kl = (batch["logprobs"] - batch["ref_logprobs"]) * m
    np.testing.assert_allclose(metrics["ppo/kl"], kl.sum(1).mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["ppo/mean_score"], batch["scores"].mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["ppo/advantages_mean"], 0.0, atol=1e-6)  # whitened
    np.testing.assert_allclose(metrics["ppo/advantages_std"], 1.0, atol=1e-4)
    np.testing.assert_allclose(metrics["ppo/response_length"], m.sum(1).mean())


@pytest.mark.slow
def test_ppo_update_is_one_dispatch_and_equals_a_minibatch_loop():
    """The whole update (2 epochs x 2 minibatches) runs as one compiled call with no host
    transfer, and gives the same params as a Python loop of single-minibatch updates."""
    params = {"policy": init_params(POLICY_CFG, 0)}
    batch = jax.device_put(rollout_batch(params))
    state = jax.device_put(ppo_state(params, optim_cfg=OPT_EQ))
    step = make_ppo_step(POLICY_CFG, PPO_CFG)
    compiled = step.lower(state, batch).compile()
    reference_state = jax.tree.map(jnp.copy, state)
    with jax.transfer_guard("disallow"):
        new_state, metrics = compiled(state, batch)
        jax.block_until_ready(new_state)
    # One executable, whose while loops are the scans over epochs and minibatches.
    assert "while" in compiled.as_text()

    # Reference: the same arithmetic with a host loop over epochs and minibatches.
    from jrlhf.steps.ppo import ppo_loss

    cfg = PPO_CFG
    _, _, adv, returns = rollout_advantages(batch, reference_state.rl.kl_coef, cfg)
    data = dict(batch, advantages=adv, returns=returns)
    forward_fn = functools.partial(policy_outputs, policy_cfg=POLICY_CFG, value_cfg=None)
    grad_fn = jax.jit(jax.grad(lambda p, mb: ppo_loss(p, mb, cfg=cfg, forward=forward_fn)[0]))
    s = reference_state
    keys = jax.random.split(jax.random.fold_in(s.rng, s.step), cfg.epochs)
    for e in range(cfg.epochs):
        perm = np.asarray(jax.random.permutation(keys[e], 8))
        for i in range(2):
            idx = perm[i * 4:(i + 1) * 4]
            mb = {k: v[idx] for k, v in data.items() if k not in ("scores", "ref_logprobs")}
            s = s.apply_gradients(grad_fn(s.params, mb))
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6, rtol=0),
                 new_state.params, s.params)


def test_ppo_separate_critic_and_adaptive_kl():
    cfg = dataclasses.replace(PPO_CFG, critic="separate", adaptive_kl=True, target_kl=0.01,
                              kl_horizon=100.0)
    value_cfg = dataclasses.replace(CFG, lm_head=False, scalar_head=True)
    params = {"policy": init_params(CFG, 0), "value": init_params(value_cfg, 1)}
    batch = rollout_batch(params, policy_cfg=CFG, value_cfg=value_cfg, cfg=cfg)
    state = ppo_state(params, cfg)
    new, metrics = make_ppo_step(CFG, cfg, value_cfg=value_cfg)(state, batch)
    kl = float(metrics["ppo/kl"])
    expected = 0.05 * (1 + np.clip(kl / 0.01 - 1, -0.2, 0.2) * 8 / 100.0)
    np.testing.assert_allclose(new.rl.kl_coef, expected, rtol=1e-6)
    assert int(new.rl.iteration) == 1
    for part in ("policy", "value"):
        changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), params[part],
                               new.params[part])
        assert any(jax.tree.leaves(changed)), part
    with pytest.raises(ValueError, match="critic"):
        make_ppo_step(CFG, cfg, value_cfg=None)


def test_ppo_normalises_raw_scores_with_the_moments_its_state_carries():
    """Two updates with `normalize_rewards` and `reward_clip`: the state's RLState holds the
    running count / mean / population variance of every raw score seen (NumPy), the advantages
    are computed from the normalised and clipped scores, and the iteration counter advances."""
    cfg = dataclasses.replace(PPO_CFG, normalize_rewards=True, reward_clip=1.0)
    params = {"policy": init_params(POLICY_CFG, 0)}
    step = make_ppo_step(POLICY_CFG, cfg)
    state, seen = ppo_state(params, cfg), []
    for seed in (0, 1):
        batch = rollout_batch(state.params, cfg=cfg, seed=seed)
        batch["scores"] = batch["scores"] * 3.0 + 2.0
        seen.extend(batch["scores"])
        state, metrics = step(state, batch)
        scores = np.clip((batch["scores"] - np.mean(seen)) / np.sqrt(np.var(seen) + 1e-8),
                         -1.0, 1.0)
        np.testing.assert_allclose(metrics["ppo/mean_score"], scores.mean(), rtol=1e-5,
                                   atol=1e-6)
    moments = state.rl.moments
    np.testing.assert_allclose([moments.count, moments.mean, moments.var],
                               [len(seen), np.mean(seen), np.var(seen)], rtol=1e-5)
    assert int(state.rl.iteration) == 2


def test_ppo_padding_has_no_effect():
    params = {"policy": init_params(POLICY_CFG, 0)}
    batch = rollout_batch(params)
    noisy = dict(batch)
    m = batch["response_mask"]
    for key in ("logprobs", "ref_logprobs", "values"):
        noisy[key] = np.where(m > 0, batch[key], 123.0).astype(np.float32)
    pad = batch["attention_mask"] == 0
    noisy["input_ids"] = np.where(pad, 17, batch["input_ids"])
    step = make_ppo_step(POLICY_CFG, PPO_CFG)
    a, ma = step(ppo_state(params, optim_cfg=OPT_EQ), batch)
    b, mb = step(ppo_state(params, optim_cfg=OPT_EQ), noisy)
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6, rtol=0),
                 a.params, b.params)
    for k in ("ppo/loss", "ppo/kl", "value/error"):
        np.testing.assert_allclose(ma[k], mb[k], rtol=1e-5, err_msg=k)


def test_ppo_step_is_a_plain_pure_function():
    """`ppo_step` itself is importable and jittable by research code with partial()."""
    params = {"policy": init_params(POLICY_CFG, 0)}
    fn = jax.jit(functools.partial(ppo_step, cfg=PPO_CFG, policy_cfg=POLICY_CFG))
    _, metrics = fn(ppo_state(params), rollout_batch(params))
    assert np.isfinite(float(metrics["ppo/loss"]))
