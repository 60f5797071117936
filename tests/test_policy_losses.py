"""The GRPO family's loss options against NumPy written from each paper's definition, on random
masked batches with a length-1 and an empty row; micro-batched gradients == full-batch ones for
every loss aggregation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrlhf import losses
from jrlhf.config import GRPOConfig, PPOConfig

B, T = 6, 7


def random_batch(seed=0):
    rng = np.random.RandomState(seed)
    lengths = np.array([7, 1, 0, 4, 6, 3])  # a length-1 row and an empty one
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    old = -np.abs(rng.randn(B, T)).astype(np.float32)
    new = old + 0.4 * rng.randn(B, T).astype(np.float32)  # ratios well outside [0.8, 1.28]
    adv = rng.randn(B).astype(np.float32)
    return new, old, adv, mask


def np_aggregate(token_loss, mask, mode, rows=None):
    """The three aggregations by their definitions, as loops."""
    rows = mask.shape[0] if rows is None else rows
    T = mask.shape[1]
    if mode == "token-mean":
        return sum(token_loss[b, t] for b in range(len(mask)) for t in range(T)
                   if mask[b, t]) / mask.sum()
    if mode == "seq-mean-token-mean":
        means = [token_loss[b][mask[b] > 0].mean() for b in range(len(mask)) if mask[b].any()]
        return sum(means) / len(means)
    assert mode == "seq-mean-token-sum-norm"  # Dr. GRPO: a constant normaliser
    return (token_loss * mask).sum() / (rows * T)


def np_policy_loss(new, old, adv, mask, clip_low, clip_high, dual_clip, ratio_level, mode,
                   weights=None):
    """max(−A r, −A clip(r, 1−εl, 1+εh)) per token; dual-clip: min(that, −c A) where A < 0;
    GSPO: r is the row's (π/π_old)^(1/|y|); times `weights[b, t]` when given (TIS)."""
    loss = np.zeros(mask.shape)
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        seq_ratio = np.exp((new[b, :n] - old[b, :n]).sum() / max(n, 1))
        for t in range(n):
            r = seq_ratio if ratio_level == "sequence" else np.exp(new[b, t] - old[b, t])
            a = adv[b]
            value = max(-a * r, -a * min(max(r, 1 - clip_low), 1 + clip_high))
            if dual_clip and a < 0:
                value = min(value, -dual_clip * a)
            loss[b, t] = value * (1.0 if weights is None else weights[b, t])
    return np_aggregate(loss, mask, mode)


@pytest.mark.parametrize("mode", losses.AGGREGATIONS)
@pytest.mark.parametrize("clip_high, dual_clip, ratio_level", [
    (0.2, 0.0, "token"),       # PPO / GRPO
    (0.28, 0.0, "token"),      # DAPO clip-higher
    (0.28, 1.5, "token"),      # + dual-clip (c = 1.5: active on this batch)
    (0.2, 0.0, "sequence"),    # GSPO
])
def test_clipped_policy_loss_equals_its_definition(mode, clip_high, dual_clip, ratio_level):
    new, old, adv, mask = random_batch()
    adv_t = np.broadcast_to(adv[:, None], (B, T))
    got, m = losses.clipped_policy_loss(new, old, adv_t, mask, clip_low=0.2, clip_high=clip_high,
                                        dual_clip=dual_clip, ratio_level=ratio_level,
                                        aggregation=mode)
    want = np_policy_loss(new, old, adv, mask, 0.2, clip_high, dual_clip, ratio_level, mode)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert 0 < float(m["clipfrac"]) < 1
    np.testing.assert_allclose(m["clipfrac_low"] + m["clipfrac_high"], m["clipfrac"], atol=1e-7)
    assert (float(m["dual_clipfrac"]) > 0) == bool(dual_clip)


def test_options_change_the_loss_and_defaults_are_ppo():
    new, old, adv, mask = random_batch()  # a batch where every option is active
    adv_t = np.broadcast_to(adv[:, None], (B, T))
    base = losses.ppo_policy_loss(new, old, adv_t, mask, 0.2)[0]
    same = losses.clipped_policy_loss(new, old, adv_t, mask, clip_low=0.2)[0]
    assert float(base) == float(same)
    for options in (dict(clip_high=0.28), dict(dual_clip=1.5), dict(ratio_level="sequence"),
                    dict(aggregation="seq-mean-token-sum-norm")):
        changed = losses.clipped_policy_loss(new, old, adv_t, mask, clip_low=0.2, **options)[0]
        assert float(changed) != float(base), options


def test_advantage_estimators_equal_their_definitions():
    scores = np.random.RandomState(2).randn(3, 4).astype(np.float32)
    centred = scores - scores.mean(1, keepdims=True)
    np.testing.assert_allclose(losses.group_advantages(scores, scale=False), centred, atol=1e-6)
    np.testing.assert_allclose(losses.group_advantages(scores),
                               centred / (scores.std(1, keepdims=True) + 1e-6), rtol=1e-5)
    batch = scores - scores.mean()  # REINFORCE++: one baseline for the whole batch
    np.testing.assert_allclose(losses.batch_baseline_advantages(scores, scale=False), batch,
                               atol=1e-6)
    np.testing.assert_allclose(losses.batch_baseline_advantages(scores),
                               batch / (scores.std() + 1e-6), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", losses.AGGREGATIONS)
def test_micro_batch_gradients_sum_to_the_full_batch_gradient(mode):
    """Each micro-batch normalised with the whole batch's counts: the gradients (w.r.t. the
    log-probs) of the micro-batches, concatenated, equal the full batch's — also with an empty
    row alone in one micro-batch."""
    new, old, adv, mask = random_batch(3)

    def loss(logp, sl, counts=None):
        return losses.clipped_kl_regularised_loss(
            logp, old[sl], old[sl] - 0.1, adv[sl], mask[sl], 0.2, 0.04, clip_high=0.28,
            aggregation=mode, counts=counts)[0]

    full = jax.grad(loss)(jnp.asarray(new), slice(None))
    counts = losses.aggregation_counts(mask)
    for splits in ([0, 2, 4, 6], [0, 3, 6], [0, 2, 3, 6]):  # the empty row 2 alone in one
        parts = [jax.grad(loss)(jnp.asarray(new[a:b]), slice(a, b), counts)
                 for a, b in zip(splits, splits[1:])]
        np.testing.assert_allclose(np.concatenate(parts), full, rtol=1e-5, atol=1e-8)
    assert np.abs(np.asarray(full)[2]).max() == 0  # the empty row has no gradient


@pytest.mark.slow
@pytest.mark.parametrize("mode", losses.AGGREGATIONS)
def test_grpo_step_with_micro_batches_equals_the_full_minibatch(mode):
    """`grpo.grad_accum_steps` micro-batches give the parameters of one full minibatch, for
    every aggregation (rows of different lengths, so per-micro normalising would differ)."""
    from jrlhf.models import init_params
    from jrlhf.steps import make_grpo_step
    from test_preference import CFG, group_rollout
    from test_steps import OPT_EQ, make_state

    params = init_params(CFG, 0)
    batch = group_rollout(params)
    batch["response_mask"][2::4, 2:] = 0  # more distinct lengths
    batch["attention_mask"][2::4, -3:] = 0
    # The sampler's log-probs off the trainer's: ratios away from 1, so some tokens clip.
    batch["logprobs"] = batch["logprobs"] + np.random.RandomState(4).normal(
        0, 0.3, batch["logprobs"].shape).astype(np.float32)
    cfg = GRPOConfig(group_size=4, minibatch_size=8, epochs=1, loss_aggregation=mode,
                     clip_high=0.28, dual_clip=2.0)
    out = {}
    for k in (1, 4):
        step = make_grpo_step(CFG, dataclasses.replace(cfg, grad_accum_steps=k))
        state, metrics = step(make_state(params, OPT_EQ)[0], batch)
        out[k] = jax.tree.map(np.asarray, state.params), metrics
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), out[4][0],
                 out[1][0])
    # Clip fractions and approx_kl too: the share over the whole minibatch, not a mean of the
    # micro-batches' shares (rows of different lengths make those differ).
    for key in ("grpo/loss", "grpo/policy_loss", "grpo/kl", "grpo/clipfrac", "grpo/clipfrac_low",
                "grpo/clipfrac_high", "grpo/dual_clipfrac", "grpo/approx_kl"):
        np.testing.assert_allclose(out[4][1][key], out[1][1][key], rtol=1e-5, atol=1e-7)
    assert 0 < float(out[1][1]["grpo/clipfrac"]) < 1  # something to compare


@pytest.mark.slow
@pytest.mark.parametrize("size", range(2, 10))
def test_an_all_equal_group_has_advantage_exactly_zero(size):
    """K = 2…9 equal scores of magnitudes up to 1e4 (float32's mean of them can be a rounding
    step off): GRPO, Dr. GRPO, RLOO and REINFORCE++ give exactly 0 to every member; a group
    beside them that differs is unaffected."""
    for value in (-1.3, 2.9, 12.7, 0.1, -977.31, 1e4 / 3):
        equal = jnp.full((1, size), value, jnp.float32)
        for adv in (losses.group_advantages(equal), losses.group_advantages(equal, scale=False),
                    losses.leave_one_out_advantages(equal),
                    losses.batch_baseline_advantages(equal)):
            assert np.all(np.asarray(adv) == 0), (size, value, adv)
        mixed = jnp.stack([equal[0], equal[0] + jnp.arange(size, dtype=jnp.float32)])
        adv = np.asarray(losses.group_advantages(mixed))
        assert np.all(adv[0] == 0)
        want = np.arange(size) - (size - 1) / 2
        np.testing.assert_allclose(adv[1], want / (np.arange(size).std() + 1e-6), atol=1e-3)


def test_reinforce_plus_plus_baseline_excludes_filler_rows():
    """Dynamic sampling's filler groups (response mask all 0) take no part in the batch
    baseline's mean and std, and get advantage 0; the real rows' advantages are those of a
    batch without the fillers."""
    from jrlhf.steps.grpo import sequence_advantages

    scores = np.random.RandomState(3).randn(4, 4).astype(np.float32)
    scores[1] = 5.0  # a filler group: all equal, far from the rest
    rows = np.ones((4, 4), bool)
    rows[1] = False
    got = np.asarray(losses.batch_baseline_advantages(jnp.asarray(scores), rows=rows))
    real = scores[rows]
    np.testing.assert_allclose(got[rows], (real - real.mean()) / (real.std() + 1e-6),
                               rtol=1e-5)
    assert np.all(got[1] == 0)
    via_step = sequence_advantages(jnp.asarray(scores.reshape(-1)), 4, "reinforce++",
                                   rows=jnp.asarray(rows.reshape(-1)))
    np.testing.assert_array_equal(np.asarray(via_step), got.reshape(-1))


@pytest.mark.parametrize("mode", losses.AGGREGATIONS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_padded_positions_have_no_effect(mode, ratio_level):
    """Garbage log-probs and advantages on padded positions change neither the loss, the
    metrics nor the gradient, and the padded positions get zero gradient."""
    new, old, adv, mask = random_batch(4)
    adv_t = np.broadcast_to(adv[:, None], (B, T)).copy()
    pad = mask == 0
    junk = np.random.RandomState(5).randn(B, T).astype(np.float32) * 30

    def loss(logp, old_logp, a):
        return losses.clipped_kl_regularised_loss(
            logp, old_logp, old_logp - 0.1, a[:, 0], mask, 0.2, 0.04, clip_high=0.28,
            dual_clip=1.5, ratio_level=ratio_level, aggregation=mode)

    clean, m_clean = loss(new, old, adv_t)
    dirty, m_dirty = loss(np.where(pad, junk, new), np.where(pad, -junk, old), adv_t)
    np.testing.assert_allclose(dirty, clean, rtol=1e-6)
    for k in m_clean:
        np.testing.assert_allclose(m_dirty[k], m_clean[k], rtol=1e-6, err_msg=k)
    grad = jax.grad(lambda x: loss(x, np.where(pad, -junk, old), adv_t)[0])(
        jnp.asarray(np.where(pad, junk, new)))
    np.testing.assert_allclose(grad, jax.grad(lambda x: loss(x, old, adv_t)[0])(jnp.asarray(new)),
                               rtol=1e-5, atol=1e-9)
    assert np.abs(np.asarray(grad)[pad]).max() == 0


@pytest.mark.parametrize("mode", losses.AGGREGATIONS)
def test_ppo_loss_uses_its_aggregation(mode):
    """`ppo_loss` with `ppo.loss_aggregation`: its policy loss is the NumPy definition's."""
    from jrlhf.steps.ppo import ppo_loss

    new, old, adv, mask = random_batch(6)
    adv_t = np.broadcast_to(adv[:, None], (B, T)).copy() * np.linspace(0.5, 1.5, T)
    zeros = np.zeros((B, T), np.float32)
    mb = {"input_ids": None, "attention_mask": None, "response_mask": mask, "logprobs": old,
          "temperature": np.ones(B, np.float32), "advantages": adv_t, "values": zeros,
          "returns": zeros}
    forward = lambda params, ids, attn, n, temperature, with_entropy: (new, zeros, zeros)  # noqa: E731
    _, metrics = ppo_loss(None, mb, cfg=PPOConfig(loss_aggregation=mode), forward=forward)
    want = np_aggregate(np.maximum(-adv_t * np.exp(new - old),
                                   -adv_t * np.clip(np.exp(new - old), 0.8, 1.2)), mask, mode)
    np.testing.assert_allclose(metrics["ppo/policy_loss"], want, rtol=1e-5)


def test_grpo_loss_applies_every_option_of_its_config():
    """`grpo_loss` with clip-higher, dual-clip, GSPO ratios and Dr. GRPO aggregation equals the
    NumPy definition over the model's log-probs (policy term + 0.04 · k3 KL)."""
    from jrlhf.models import init_params, token_outputs
    from jrlhf.steps.grpo import grpo_loss
    from test_preference import CFG, group_rollout

    params = init_params(CFG, 0)
    batch = group_rollout(params)
    mask = batch["response_mask"].astype(np.float32)
    N = mask.shape[1]
    rng = np.random.RandomState(7)
    old = batch["logprobs"] + 0.5 * rng.randn(*mask.shape).astype(np.float32) * mask
    adv = rng.randn(mask.shape[0]).astype(np.float32)
    mb = dict(batch, logprobs=old, advantages=adv)
    cfg = GRPOConfig(clip_high=0.28, dual_clip=1.5, importance_ratio="sequence",
                     loss_aggregation="seq-mean-token-sum-norm")
    loss, metrics = grpo_loss(params, mb, losses.aggregation_counts(mask), cfg=cfg, model_cfg=CFG)
    logp = np.asarray(token_outputs(CFG, params, batch["input_ids"], batch["attention_mask"],
                                    last=N).logprobs)
    policy = np_policy_loss(logp, old, adv, mask, 0.2, 0.28, 1.5, "sequence",
                            "seq-mean-token-sum-norm")
    gap = batch["ref_logprobs"] - logp
    kl = np_aggregate(np.exp(gap) - gap - 1, mask, "seq-mean-token-sum-norm")
    assert float(metrics["dual_clipfrac"]) > 0 and float(metrics["clipfrac"]) > 0
    np.testing.assert_allclose(metrics["policy_loss"], policy, rtol=1e-4)
    np.testing.assert_allclose(loss, policy + 0.04 * kl, rtol=1e-4)


def test_bad_loss_options_are_errors_naming_the_field():
    with pytest.raises(ValueError, match="grpo.loss_aggregation must be"):
        GRPOConfig(loss_aggregation="sum")
    with pytest.raises(ValueError, match="grpo.dual_clip=0.5 is out of range"):
        GRPOConfig(dual_clip=0.5)
    with pytest.raises(ValueError, match="grpo.importance_ratio must be token|sequence"):
        GRPOConfig(importance_ratio="segment")
    with pytest.raises(ValueError, match="grpo.clip_high=-0.1 is out of range"):
        GRPOConfig(clip_high=-0.1)
    with pytest.raises(ValueError, match="ppo.loss_aggregation must be"):
        PPOConfig(loss_aggregation="mean")
