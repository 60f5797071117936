"""RLHF math against plain NumPy loops and hand-derived values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrlhf import losses, rl


def random_masked_batch(seed=0, B=5, T=7):
    """Right-padded response masks: varying lengths, an all-padding row, a length-1 row."""
    rng = np.random.RandomState(seed)
    lengths = [T, 4, 0, 1, 3][:B]
    mask = np.zeros((B, T), np.float32)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return rng, mask


def np_gae(rewards, values, mask, gamma, lam):
    B, T = rewards.shape
    adv = np.zeros((B, T))
    for b in range(B):
        n = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    returns = (adv + values) * mask
    return adv, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)])
def test_gae_matches_numpy_loop(gamma, lam):
    rng, mask = random_masked_batch()
    rewards = rng.randn(*mask.shape).astype(np.float32)
    values = rng.randn(*mask.shape).astype(np.float32)
    adv, ret = rl.gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = np_gae(rewards * mask, values * mask, mask, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, atol=1e-5)
    # Padding has no effect: garbage at masked positions changes nothing.
    noisy = np.where(mask > 0, rewards, 1e6), np.where(mask > 0, values, -1e6)
    adv2, ret2 = rl.gae(*noisy, mask, gamma, lam)
    np.testing.assert_array_equal(adv2, adv)
    np.testing.assert_array_equal(ret2, ret)
    assert np.all(np.asarray(adv)[mask == 0] == 0)


def test_gae_hand_derived():
    # Two tokens, gamma=0.5, lam=0.5: delta1 = 1 - 2 = -1 (terminal); delta0 = 0 + 0.5*2 - 1 = 0
    # A1 = -1, A0 = 0 + 0.25 * -1 = -0.25.
    adv, ret = rl.gae(jnp.array([[0.0, 1.0, 9.0]]), jnp.array([[1.0, 2.0, 9.0]]),
                      jnp.array([[1, 1, 0]]), 0.5, 0.5)
    np.testing.assert_allclose(adv, [[-0.25, -1.0, 0.0]])
    np.testing.assert_allclose(ret, [[0.75, 1.0, 0.0]])


def test_masked_stats_match_numpy():
    rng, mask = random_masked_batch(1)
    x = rng.randn(*mask.shape).astype(np.float32)
    sel = x[mask > 0]
    np.testing.assert_allclose(rl.masked_mean(x, mask), sel.mean(), rtol=1e-6)
    np.testing.assert_allclose(rl.masked_var(x, mask), sel.var(ddof=1), rtol=1e-5)
    np.testing.assert_allclose(rl.masked_var(x, mask, unbiased=False), sel.var(), rtol=1e-5)
    rows = rl.masked_mean(x, mask, axis=1)
    for b in range(mask.shape[0]):
        expected = x[b][mask[b] > 0].mean() if mask[b].any() else 0.0
        np.testing.assert_allclose(rows[b], expected, rtol=1e-6)
    white = np.asarray(rl.masked_whiten(x, mask))
    np.testing.assert_allclose(white[mask > 0], (sel - sel.mean()) / np.sqrt(sel.var(ddof=1)),
                               rtol=1e-4, atol=1e-5)
    assert np.all(white[mask == 0] == 0)
    kept = np.asarray(rl.masked_whiten(x, mask, shift_mean=False))
    np.testing.assert_allclose(kept[mask > 0], (sel - sel.mean()) / sel.std(ddof=1) + sel.mean(),
                               rtol=1e-4, atol=1e-5)
    noisy = np.where(mask > 0, x, np.nan)
    np.testing.assert_array_equal(rl.masked_whiten(noisy, mask), white)


def test_masked_mean_of_empty_mask_is_zero():
    assert float(rl.masked_mean(jnp.ones(3), jnp.zeros(3))) == 0.0


def test_logprobs_and_entropy_match_numpy():
    rng = np.random.RandomState(2)
    logits = rng.randn(2, 3, 11).astype(np.float32)
    tokens = rng.randint(0, 11, (2, 3))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(rl.logprobs_from_logits(logits, tokens), expected, rtol=1e-5)
    np.testing.assert_allclose(rl.entropy_from_logits(logits),
                               -(np.exp(logp) * logp).sum(-1), rtol=1e-5)


def test_kl_estimators_hand_derived():
    logp, ref = jnp.array([-1.0, -2.0]), jnp.array([-1.5, -1.0])
    d = np.array([0.5, -1.0])
    np.testing.assert_allclose(rl.kl_penalty(logp, ref, "k1"), d)
    np.testing.assert_allclose(rl.kl_penalty(logp, ref, "k2"), 0.5 * d ** 2)
    np.testing.assert_allclose(rl.kl_penalty(logp, ref, "k3"), (np.exp(-d) - 1) + d, rtol=1e-6)
    np.testing.assert_allclose(rl.kl_penalty(logp, ref, "abs"), np.abs(d))
    with pytest.raises(ValueError, match="'k9'"):
        rl.kl_penalty(logp, ref, "k9")


def test_kl_estimators_are_unbiased_where_claimed():
    # Sample from p, average the estimators, compare with the exact KL(p || q).
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([0.2, 0.3, 0.5])
    exact = np.sum(p * np.log(p / q))
    samples = jax.random.categorical(jax.random.key(0), jnp.log(p), shape=(200_000,))
    logp, logq = jnp.log(p)[samples], jnp.log(q)[samples]
    for kind in ("k1", "k3"):
        assert abs(float(rl.kl_penalty(logp, logq, kind).mean()) - exact) < 0.01, kind


def test_token_rewards_put_score_on_last_response_token():
    _, mask = random_masked_batch(3)
    kl = np.full(mask.shape, 0.5, np.float32)
    scores = np.arange(mask.shape[0], dtype=np.float32) + 1
    r = np.asarray(rl.token_rewards(scores, kl, mask, 0.1))
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        expected = np.zeros(mask.shape[1])
        expected[:n] = -0.05
        if n:
            expected[n - 1] += scores[b]
        np.testing.assert_allclose(r[b], expected, rtol=1e-6)


def test_adaptive_kl_controller():
    # KL twice the target: error clipped to 0.2; beta grows by 0.2 * n/horizon.
    np.testing.assert_allclose(
        rl.adaptive_kl_coef(0.1, 12.0, target=6.0, horizon=10000, n_steps=256),
        0.1 * (1 + 0.2 * 256 / 10000))
    np.testing.assert_allclose(
        rl.adaptive_kl_coef(0.1, 5.4, target=6.0, horizon=100, n_steps=10), 0.1 * (1 - 0.01))


def np_policy_loss(logp, old, adv, mask, eps):
    total, clipped_n, kl, n = 0.0, 0, 0.0, 0
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[b, t]:
                continue
            ratio = np.exp(logp[b, t] - old[b, t])
            a = -adv[b, t] * ratio
            c = -adv[b, t] * min(max(ratio, 1 - eps), 1 + eps)
            total += max(a, c)
            clipped_n += c > a
            kl += 0.5 * (logp[b, t] - old[b, t]) ** 2
            n += 1
    return total / n, clipped_n / n, kl / n


def test_ppo_policy_loss_matches_numpy():
    rng, mask = random_masked_batch(4)
    logp = rng.randn(*mask.shape).astype(np.float32) * 0.3 - 1
    old = logp + rng.randn(*mask.shape).astype(np.float32) * 0.3
    adv = rng.randn(*mask.shape).astype(np.float32)
    loss, m = losses.ppo_policy_loss(logp, old, adv, mask, 0.2)
    ref_loss, ref_clip, ref_kl = np_policy_loss(logp, old, adv, mask, 0.2)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(m["clipfrac"], ref_clip, rtol=1e-6)
    np.testing.assert_allclose(m["approx_kl"], ref_kl, rtol=1e-5)
    noisy = [np.where(mask > 0, x, 50.0) for x in (logp, old, adv)]
    loss2, _ = losses.ppo_policy_loss(*noisy, mask, 0.2)
    np.testing.assert_array_equal(loss2, loss)


def test_ppo_policy_loss_hand_derived():
    # ratio = e^0.5 ≈ 1.6487 > 1.2 with A = 1: clipped term -1.2 is larger than -1.6487.
    loss, m = losses.ppo_policy_loss(jnp.array([[0.0]]), jnp.array([[-0.5]]), jnp.array([[1.0]]),
                                     jnp.array([[1.0]]), 0.2)
    np.testing.assert_allclose(loss, -1.2, rtol=1e-6)
    assert float(m["clipfrac"]) == 1.0
    np.testing.assert_allclose(m["approx_kl"], 0.125)


def test_ppo_value_loss_matches_numpy():
    rng, mask = random_masked_batch(5)
    v, old, ret = (rng.randn(*mask.shape).astype(np.float32) for _ in range(3))
    loss, m = losses.ppo_value_loss(v, old, ret, mask, 0.2)
    clipped = old + np.clip(v - old, -0.2, 0.2)
    err = np.maximum((v - ret) ** 2, (clipped - ret) ** 2)
    np.testing.assert_allclose(loss, 0.5 * err[mask > 0].mean(), rtol=1e-5)
    moved = np.abs(v - old) > 0.2
    frac = (moved & ((clipped - ret) ** 2 > (v - ret) ** 2))[mask > 0].mean()
    np.testing.assert_allclose(m["clipfrac"], frac, rtol=1e-6)
    # Hand case: v=1, old=0, R=0, eps=0.2 -> max(1, 0.04) / 2 = 0.5.
    loss1, _ = losses.ppo_value_loss(jnp.ones((1, 1)), jnp.zeros((1, 1)), jnp.zeros((1, 1)),
                                     jnp.ones((1, 1)), 0.2)
    np.testing.assert_allclose(loss1, 0.5)


def test_values_inside_the_clip_range_are_never_counted_as_clipped():
    """Every value within V_old ± ε: clipfrac is exactly 0 and the loss is ½·mean (V − R)².
    (`V_old + (V − V_old)` lands a rounding step off V for some tokens; comparing errors then
    counted them as clipped, and two processes disagreed on which.)"""
    rng = np.random.RandomState(0)
    v = rng.randn(64, 256).astype(np.float32) * 3
    old = (v + rng.uniform(-0.19, 0.19, v.shape)).astype(np.float32)
    ret = rng.randn(*v.shape).astype(np.float32)
    assert (old + (v - old) != v).any()  # the rounding the definition must not see
    loss, m = losses.ppo_value_loss(v, old, ret, np.ones_like(v), 0.2)
    assert float(m["clipfrac"]) == 0.0
    np.testing.assert_allclose(loss, 0.5 * np.mean((v - ret) ** 2), rtol=1e-6)


def test_pairwise_loss_hand_derived():
    np.testing.assert_allclose(losses.pairwise_loss(jnp.array([0.0]), jnp.array([0.0])),
                               [np.log(2)], rtol=1e-6)
    np.testing.assert_allclose(losses.pairwise_loss(jnp.array([2.0]), jnp.array([1.0]), 1.0),
                               [np.log(2)], rtol=1e-6)
    np.testing.assert_allclose(losses.pairwise_loss(jnp.array([3.0]), jnp.array([1.0])),
                               [np.log1p(np.exp(-2.0))], rtol=1e-6)


def test_ranking_to_pairs_with_ties_and_absent():
    better, worse, valid = losses.ranking_to_pairs(jnp.array([2, 1, 2, -1]))
    pairs = {(int(b), int(w)) for b, w, v in zip(better, worse, valid) if v}
    assert pairs == {(1, 0), (1, 2)}  # 0 and 2 tie; 3 is absent
    assert better.shape == (6,)
    b, w, v = losses.ranking_to_pairs(jnp.array([[1, 2, 3], [3, 2, 1]]))
    assert v.all()
    assert {(int(x), int(y)) for x, y in zip(b[0], w[0])} == {(0, 1), (0, 2), (1, 2)}
    assert {(int(x), int(y)) for x, y in zip(b[1], w[1])} == {(1, 0), (2, 0), (2, 1)}


def test_ranking_loss_weights_each_prompt_once():
    rewards = jnp.array([[1.0, 0.0, -1.0], [0.5, 0.0, 0.0]])
    ranks = jnp.array([[1, 2, 3], [1, 2, -1]])  # 3 pairs, 1 pair
    loss, m = losses.ranking_loss(rewards, ranks)
    g1 = np.mean([np.log1p(np.exp(-1)), np.log1p(np.exp(-2)), np.log1p(np.exp(-1))])
    g2 = np.log1p(np.exp(-0.5))
    np.testing.assert_allclose(loss, (g1 + g2) / 2, rtol=1e-6)
    per_pair, _ = losses.ranking_loss(rewards, ranks, per_prompt=False)
    np.testing.assert_allclose(per_pair, (3 * g1 + g2) / 4, rtol=1e-6)
    assert float(m["correct"]) == 4 and float(m["num_pairs"]) == 4
    np.testing.assert_allclose(m["margin_sum"], 1 + 2 + 1 + 0.5)
    # A reward tie on a ranked pair counts as wrong.
    _, m = losses.ranking_loss(jnp.zeros((1, 2)), jnp.array([[1, 2]]))
    assert float(m["correct"]) == 0
