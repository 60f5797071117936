"""Token-level RLHF math as small pure functions.

Conventions: B rows, T tokens. `mask` is `[B, T]`, 1 where a token counts (response tokens,
up to and including EOS) and 0 elsewhere (prompt, padding). Every function here is jittable and
gives results that do not depend on what sits at masked positions.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import struct

KLKind = Literal["k1", "k2", "k3", "abs"]


def logprobs_from_logits(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Log-probability of each token. logits `[B, T, V]`, tokens `[B, T]` -> `[B, T]` float32.

    Computed as logit[token] − logsumexp(logits): no `[B, T, V]` log-softmax is materialised.
    """
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """Entropy of the categorical at each position. `[B, T, V]` -> `[B, T]` float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Sum of `x` where `mask` is 1 (masked entries contribute exactly 0, even if NaN/inf)."""
    return jnp.sum(jnp.where(mask > 0, x, 0.0), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Mean of `x` over entries where `mask` is 1; 0 where nothing is unmasked."""
    count = jnp.sum(mask > 0, axis=axis)
    return masked_sum(x, mask, axis) / jnp.maximum(count, 1)


def masked_var(x: jax.Array, mask: jax.Array, unbiased: bool = True) -> jax.Array:
    """Variance of all unmasked entries (scalar). Bessel-corrected when `unbiased`."""
    mean = masked_mean(x, mask)
    sq = masked_mean(jnp.square(x - mean), mask)
    if unbiased:
        n = jnp.sum(mask > 0)
        sq = sq * n / jnp.maximum(n - 1, 1)
    return sq


def masked_whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True,
                  eps: float = 1e-8) -> jax.Array:
    """Normalise unmasked entries to unit variance (and zero mean if `shift_mean`).

    Statistics use only unmasked entries; masked entries of the result are 0.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(mask > 0, out, 0.0)


def kl_penalty(logprobs: jax.Array, ref_logprobs: jax.Array, kind: KLKind = "k1") -> jax.Array:
    """Per-token estimate of KL(policy || reference) from sampled-token log-probs `[B, T]`.

    k1: logp - ref (unbiased, can be negative); k2: (logp - ref)^2 / 2; k3: (r - 1) - log r with
    r = exp(ref - logp) (unbiased and non-negative); abs: |logp - ref|.
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * jnp.square(log_ratio)
    if kind == "k3":
        return jnp.expm1(-log_ratio) + log_ratio
    if kind == "abs":
        return jnp.abs(log_ratio)
    raise ValueError(f"unknown KL estimator {kind!r}; choose from k1, k2, k3, abs")


def last_valid_index(mask: jax.Array) -> jax.Array:
    """Index `[B]` of the last 1 in each row of a right-padded `[B, T]` mask (0 if none)."""
    T = mask.shape[-1]
    positions = jnp.arange(T)
    return jnp.max(jnp.where(mask > 0, positions, 0), axis=-1)


def token_rewards(scores: jax.Array, kl: jax.Array, mask: jax.Array, kl_coef) -> jax.Array:
    """Per-token rewards `[B, T]`: `-kl_coef * kl` on every response token, plus the scalar
    `scores [B]` on each row's last response token. Zero where `mask` is 0."""
    rewards = jnp.where(mask > 0, -kl_coef * kl, 0.0)
    last = last_valid_index(mask)
    has_tokens = jnp.any(mask > 0, axis=-1)
    bonus = jax.nn.one_hot(last, mask.shape[-1]) * jnp.where(has_tokens, scores, 0.0)[:, None]
    return rewards + bonus


def overlong_penalty(lengths, truncated, max_new_tokens, buffer: int, penalty: float):
    """DAPO's soft overlong punishment `[B]` to add to the scores: 0 up to
    `max_new_tokens − buffer` tokens, then falling linearly to −`penalty` at `max_new_tokens`;
    −`penalty` for a response cut at `max_new_tokens` (`truncated`, no EOS). `lengths [B]`
    count the response tokens up to and including EOS; `max_new_tokens` is one number or each
    row's budget `[B]`."""
    start = max_new_tokens - buffer
    over = jnp.clip(lengths.astype(jnp.float32) - start, 0.0, None) / max(buffer, 1)
    return jnp.where(truncated, -penalty, -penalty * jnp.minimum(over, 1.0))


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float):
    """Generalised advantage estimation over the response tokens of `mask`.

    Args:
        rewards, values: `[B, T]`.
        mask: `[B, T]`, 1 on the tokens the policy chose, 0 elsewhere: right padding, and also
            holes between turns (a multi-turn episode's observation tokens, `jrlhf.envs`).
            GAE runs over the masked-in tokens alone, as if the others were not there: a
            token's successor is the next 1 of its row, and the last 1 is terminal (the value
            after it is 0).
        gamma, lam: discount and GAE lambda.

    Returns:
        `(advantages, returns)`, both `[B, T]`, with returns = advantages + values, both 0
        where `mask` is 0. With t' the next masked-in token after t (none: V = A = 0 there):
        δ_t = r_t + γ·V_t' − V_t; A_t = δ_t + γλ·A_t'. On a contiguous mask t' = t + 1.
    """
    mask = (mask > 0).astype(jnp.float32)
    rewards = jnp.where(mask > 0, rewards, 0.0)
    values = jnp.where(mask > 0, values, 0.0)
    T = mask.shape[-1]
    # t' of every t: the first masked-in column after it (T when there is none).
    columns = jnp.where(mask > 0, jnp.arange(T), T)
    after = jnp.pad(jax.lax.cummin(columns, axis=1, reverse=True)[:, 1:], ((0, 0), (0, 1)),
                    constant_values=T)
    next_mask = (after < T).astype(jnp.float32)
    next_values = jnp.take_along_axis(values, jnp.minimum(after, T - 1), axis=1)
    deltas = rewards + gamma * next_values * next_mask - values

    def backward(next_adv, xs):  # next_adv: A of the next masked-in token (0 past the last)
        delta, m_next, m = xs
        adv = delta + gamma * lam * m_next * next_adv
        return jnp.where(m > 0, adv, next_adv), adv  # a masked-out token passes A_t' on

    _, adv_t = jax.lax.scan(backward, jnp.zeros(rewards.shape[0], jnp.float32),
                            (deltas.T, next_mask.T, mask.T), reverse=True)
    advantages = adv_t.T * mask
    return advantages, (advantages + values) * mask


def explained_variance(predictions: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """1 - Var[targets - predictions] / Var[targets] over unmasked entries."""
    return 1.0 - masked_var(targets - predictions, mask) / jnp.maximum(masked_var(targets, mask),
                                                                       1e-8)


def adaptive_kl_coef(kl_coef, observed_kl, *, target: float, horizon: float, n_steps: int):
    """Ziegler et al. (2019) adaptive KL controller: one update of the coefficient β.

    β ← β · (1 + clip(KL / target − 1, −0.2, 0.2) · n_steps / horizon).
    """
    error = jnp.clip(observed_kl / target - 1.0, -0.2, 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)


@struct.dataclass
class RunningMoments:
    """Running mean / variance of a stream of scalars (for reward normalisation)."""

    count: jax.Array
    mean: jax.Array
    var: jax.Array  # population variance

    @classmethod
    def create(cls) -> "RunningMoments":
        # Three buffers, not one shared zero: a donating step may not receive one twice.
        return cls(count=jnp.zeros((), jnp.float32), mean=jnp.zeros((), jnp.float32),
                   var=jnp.ones((), jnp.float32))


def update_moments(moments: RunningMoments, x: jax.Array) -> RunningMoments:
    """Merge a batch `x [B]` into the running moments (Chan et al.'s parallel update)."""
    n = jnp.asarray(x.size, jnp.float32)
    batch_mean, batch_var = jnp.mean(x), jnp.var(x)
    total = moments.count + n
    delta = batch_mean - moments.mean
    mean = moments.mean + delta * n / total
    m2 = moments.var * moments.count + batch_var * n + delta ** 2 * moments.count * n / total
    return RunningMoments(count=total, mean=mean, var=m2 / total)


def normalize_scores(scores: jax.Array, moments: RunningMoments, clip: float = 0.0) -> jax.Array:
    """(scores − mean) / std with the running moments, then clipped to ±clip if clip > 0."""
    out = (scores - moments.mean) * jax.lax.rsqrt(moments.var + 1e-8)
    return jnp.clip(out, -clip, clip) if clip > 0 else out


def segment_sums(x: jax.Array, segments: jax.Array, num_segments: int) -> jax.Array:
    """`[B, S]`: the sum of `x [B, T]` over the positions of each segment 1..S of `segments
    [B, T]` (0 = padding, never counted; a segment with no positions sums to 0)."""
    ids = jnp.arange(1, num_segments + 1)
    return jnp.einsum("bt,bts->bs", x, (segments[..., None] == ids).astype(x.dtype))


def segment_last_index(segments: jax.Array, num_segments: int) -> jax.Array:
    """`[B, S]`: the index of the last position of each segment 1..S in `segments [B, T]`
    (0 for a segment that does not occur)."""
    positions = jnp.arange(segments.shape[-1])[:, None]
    hit = segments[..., None] == jnp.arange(1, num_segments + 1)
    return jnp.max(jnp.where(hit, positions, 0), axis=1)
