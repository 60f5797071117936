"""Training objectives as pure functions (token-level math lives in `jrlhf.rl`).

Losses over tokens take an explicit `[B, T]` mask and average over unmasked tokens only.
Pairwise losses return one value per pair; callers choose the weighting.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from jrlhf.config import AGGREGATIONS
from jrlhf.rl import masked_mean, masked_sum


def aggregation_counts(mask) -> dict:
    """The normalisers `aggregate` needs, counted over `mask [B, T]`: `num_tokens` (real
    tokens), `num_sequences` (rows with at least one real token) and `num_rows` (all rows).
    Count them over the whole batch and pass them to `aggregate` on each micro-batch, so the
    micro-batches' losses (and gradients) sum to the full batch's."""
    real = mask > 0
    return {"num_tokens": jnp.sum(real).astype(jnp.float32),
            "num_sequences": jnp.sum(jnp.any(real, axis=-1)).astype(jnp.float32),
            "num_rows": jnp.float32(mask.shape[0])}


def aggregate(token_losses, mask, mode: str = "token-mean", counts: dict | None = None):
    """One loss from per-token losses `[B, T]` over the real tokens of `mask [B, T]`.

    - "token-mean": the sum over all real tokens / the number of real tokens (every token
      weighs the same; longer responses weigh more).
    - "seq-mean-token-mean": each sequence's mean over its tokens, averaged over the sequences
      that have a token (every response weighs the same; empty rows count for nothing).
    - "seq-mean-token-sum-norm" (Dr. GRPO): the sum over all real tokens / (rows × T), a
      constant normaliser: no per-sequence length division, T the response length bound.

    `counts`: `aggregation_counts` of the whole batch when `mask` is one micro-batch of it
    (default: this batch's own).
    """
    counts = aggregation_counts(mask) if counts is None else counts
    real = mask > 0
    total = jnp.where(real, token_losses, 0.0)
    if mode == "token-mean":
        return jnp.sum(total) / jnp.maximum(counts["num_tokens"], 1.0)
    if mode == "seq-mean-token-mean":
        lengths = jnp.sum(real, axis=-1)
        per_sequence = jnp.sum(total, axis=-1) / jnp.maximum(lengths, 1)
        return jnp.sum(per_sequence) / jnp.maximum(counts["num_sequences"], 1.0)
    if mode == "seq-mean-token-sum-norm":
        return jnp.sum(total) / (jnp.maximum(counts["num_rows"], 1.0) * mask.shape[-1])
    raise ValueError(f"loss aggregation must be one of {', '.join(AGGREGATIONS)}, got {mode!r}")


def sequence_log_ratio(logprobs, old_logprobs, mask):
    """GSPO's sequence-level log importance ratio, broadcast over each row's tokens `[B, T]`:
    the mean over the row's real tokens of log π − log π_old, i.e. log of
    (π(y|x) / π_old(y|x)) ** (1 / |y|). 0 on empty rows."""
    real = mask > 0
    diff = jnp.where(real, logprobs - old_logprobs, 0.0)
    mean = jnp.sum(diff, axis=-1) / jnp.maximum(jnp.sum(real, axis=-1), 1)
    return jnp.broadcast_to(mean[:, None], logprobs.shape)


def clipped_policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_low: float,
                        clip_high: float | None = None, dual_clip: float = 0.0,
                        ratio_level: str = "token", aggregation: str = "token-mean",
                        counts: dict | None = None, token_weights=None):
    """Clipped surrogate objective, negated for minimisation, with the GRPO family's options.

    Args:
        logprobs: `[B, T]` current policy log-probs of the taken tokens.
        old_logprobs: `[B, T]` log-probs under the policy that sampled them.
        advantages: `[B, T]`.
        mask: `[B, T]` response-token mask.
        clip_low, clip_high: the ratio is clipped to [1 − clip_low, 1 + clip_high] (DAPO's
            clip-higher: clip_high > clip_low); clip_high None = clip_low (PPO).
        dual_clip: c > 1 bounds the loss of a negative-advantage token by −c·A (dual-clip PPO,
            Ye et al. 2020); 0 = off.
        ratio_level: "token" (PPO) or "sequence" (GSPO: every token of a row uses the row's
            length-normalised sequence ratio, `sequence_log_ratio`).
        aggregation, counts: how token losses become one loss (`aggregate`).
        token_weights: `[B, T]` factors on each token's loss (truncated importance sampling:
            `truncated_importance_weights`); None = 1.

    Returns:
        `(loss, metrics)`: per token max(−A·r, −A·clip(r)) (then min(·, −c·A) where A < 0 with
        dual-clip), aggregated. Metrics: `clipfrac` (share of tokens where the clipped term is
        active), `clipfrac_low` / `clipfrac_high` (active at the lower / upper bound),
        `dual_clipfrac`, `approx_kl` (mean of ½(log r)²) — token means over this batch, or
        with `counts` (a micro-batch of a larger batch) its sums over `counts["num_tokens"]`:
        the micro-batches' metrics then sum to the whole batch's.
    """
    clip_high = clip_low if clip_high is None else clip_high
    if ratio_level == "token":
        log_ratio = jnp.where(mask > 0, logprobs - old_logprobs, 0.0)
    elif ratio_level == "sequence":
        log_ratio = sequence_log_ratio(logprobs, old_logprobs, mask)
    else:
        raise ValueError(f"ratio_level must be token|sequence, got {ratio_level!r}")
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    token_loss = jnp.maximum(unclipped, clipped)
    dual_active = jnp.zeros_like(token_loss, bool)
    if dual_clip:
        bound = -dual_clip * advantages
        dual_active = (advantages < 0) & (token_loss > bound)
        token_loss = jnp.where(advantages < 0, jnp.minimum(token_loss, bound), token_loss)
    if token_weights is not None:
        token_loss = token_loss * token_weights
    clip_active = clipped > unclipped
    if counts is None:
        frac = lambda x: masked_mean(x.astype(jnp.float32), mask)  # noqa: E731
    else:  # a micro-batch's part of the whole batch's share: the parts sum to it
        frac = lambda x: (jnp.sum(jnp.where(mask > 0, x.astype(jnp.float32), 0.0))  # noqa: E731
                          / jnp.maximum(counts["num_tokens"], 1.0))
    metrics = {
        "clipfrac": frac(clip_active),
        "clipfrac_low": frac(clip_active & (ratio < 1.0)),
        "clipfrac_high": frac(clip_active & (ratio > 1.0)),
        "dual_clipfrac": frac(dual_active),
        "approx_kl": frac(0.5 * jnp.square(log_ratio)),
    }
    return aggregate(token_loss, mask, aggregation, counts), metrics


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps: float,
                    aggregation: str = "token-mean", token_weights=None):
    """PPO's clipped surrogate (symmetric clip ε, token ratios): `clipped_policy_loss`.

    Returns `(loss, metrics)`: loss = the `aggregation` (default the mean over tokens) of
    max(−A·r, −A·clip(r, 1−ε, 1+ε)) (times `token_weights` when given); metrics as
    `clipped_policy_loss`'s.
    """
    return clipped_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=clip_eps,
                               aggregation=aggregation, token_weights=token_weights)


def truncated_importance_weights(trainer_logprobs, sampler_logprobs, mask, cap: float):
    """Truncated importance sampling (TIS; Yao et al. 2025) weights `[B, T]`: per sampled token
    min(π_trainer / π_sampler, `cap`), the trainer's log-probs before the update over the
    sampler's. They correct the policy gradient for a sampler whose numerics (dtype, kernels)
    differ from the trainer's; data, not differentiated. 1 on padded positions of `mask`."""
    real = mask > 0
    log_ratio = jnp.where(real, trainer_logprobs - sampler_logprobs, 0.0)
    return jax.lax.stop_gradient(jnp.minimum(jnp.exp(log_ratio), cap))


def logprob_mismatch(trainer_logprobs, sampler_logprobs, mask) -> dict:
    """How far the sampler's log-probs of the sampled tokens are from the trainer's for the same
    weights, over the real tokens of `mask [B, T]` with Δ = trainer − sampler: `gap_mean` (mean
    |Δ|), `gap_max` (max |Δ|) and `kl_k3` (the k3 estimate of KL(sampler ‖ trainer) from the
    sampled tokens: the mean of e^Δ − 1 − Δ; ≥ 0, 0 when they agree). All 0 with no tokens."""
    real = mask > 0
    gap = jnp.where(real, trainer_logprobs - sampler_logprobs, 0.0)
    return {"gap_mean": masked_mean(jnp.abs(gap), mask), "gap_max": jnp.max(jnp.abs(gap)),
            "kl_k3": masked_mean(jnp.expm1(gap) - gap, mask)}


def ppo_value_loss(values, old_values, returns, mask, clip_eps: float):
    """Clipped value loss: ½·mean over tokens of max((V − R)², (clip(V, V_old ± ε) − R)²).

    Returns `(loss, metrics)` with `clipfrac` (share of tokens whose value moved past ±ε and
    whose clipped error is the larger).

    A value inside V_old ± ε is used as it is: `V_old + (V − V_old)` can land a rounding step
    off V, and comparing the two errors then let rounding count unclipped tokens as clipped
    (two processes and one disagreed on 4 of 192 tokens)."""
    moved = jnp.abs(values - old_values) > clip_eps
    clipped_values = jnp.where(moved, old_values + jnp.clip(values - old_values, -clip_eps,
                                                            clip_eps), values)
    err = jnp.square(values - returns)
    err_clipped = jnp.square(clipped_values - returns)
    loss = 0.5 * masked_mean(jnp.maximum(err, err_clipped), mask)
    return loss, {"clipfrac": masked_mean((moved & (err_clipped > err)).astype(jnp.float32),
                                          mask)}


def token_cross_entropy(logprobs, mask):
    """`(sum, count)` of next-token NLL over unmasked tokens; divide after accumulating."""
    return -masked_sum(logprobs, mask), jnp.sum(mask > 0)


def pairwise_loss(chosen_rewards, rejected_rewards, margin=None):
    """Bradley-Terry loss per pair: −log σ(r_chosen − r_rejected − margin). Shapes `[P]`."""
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -jax.nn.log_sigmoid(diff)


def ranking_pair_indices(num_responses: int) -> tuple[np.ndarray, np.ndarray]:
    """All K·(K−1)/2 unordered index pairs (i < j) of a K-way group, as two `[M]` arrays."""
    pairs = np.array(list(itertools.combinations(range(num_responses), 2)), np.int32)
    pairs = pairs.reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def ranking_to_pairs(ranks):
    """Ordered (better, worse) pairs from a K-way ranking. Lower rank is better; ties allowed.

    Args:
        ranks: `[..., K]` ranks (1 = best). A negative rank marks an absent response.

    Returns:
        `(better, worse, valid)`, each `[..., K·(K−1)/2]`: indices into the K responses and a
        bool that is False for ties and for pairs with an absent response.
    """
    ranks = jnp.asarray(ranks)
    i, j = ranking_pair_indices(ranks.shape[-1])
    ri, rj = ranks[..., i], ranks[..., j]
    i_better = ri < rj
    better = jnp.where(i_better, i, j)
    worse = jnp.where(i_better, j, i)
    valid = (ri != rj) & (ri >= 0) & (rj >= 0)
    return better, worse, valid


def ranking_pair_weights(ranks, per_prompt: bool = True):
    """Weights `[G, M]` of the ranked pairs of `ranks [G, K]`, summing to 1 over valid pairs.

    `per_prompt`: each group with at least one valid pair counts once (its pairs share 1/G');
    otherwise every valid pair counts once. Depends only on the ranks, so it can be computed for
    a whole batch before splitting it into micro-batches.
    """
    _, _, valid = ranking_to_pairs(ranks)
    valid_f = valid.astype(jnp.float32)
    if per_prompt:
        pairs_per_group = jnp.sum(valid_f, axis=-1, keepdims=True)
        groups = jnp.sum(pairs_per_group > 0)
        return valid_f / jnp.maximum(pairs_per_group, 1.0) / jnp.maximum(groups, 1)
    return valid_f / jnp.maximum(jnp.sum(valid_f), 1.0)


def ranking_loss(rewards, ranks, per_prompt: bool = True, weights=None):
    """Bradley-Terry loss over every ranked pair of K-way groups.

    Args:
        rewards: `[G, K]` reward-model scores of each group's responses.
        ranks: `[G, K]` ranks (1 = best, ties equal, negative = absent).
        per_prompt: weight pairs so each group counts once (default); else every pair counts
            once.
        weights: precomputed `ranking_pair_weights` (e.g. of a whole batch, when `rewards` is one
            micro-batch of it); overrides `per_prompt`.

    Returns:
        `(loss, metrics)`; loss = Σ weight · −log σ(r_better − r_worse); metrics (sums, so
        micro-batches add up): `correct` (valid pairs ordered correctly; a reward tie is wrong),
        `margin_sum` (Σ r_better − r_worse), `num_pairs`.
    """
    better, worse, valid = ranking_to_pairs(ranks)
    if weights is None:
        weights = ranking_pair_weights(ranks, per_prompt)
    r_better = jnp.take_along_axis(rewards, better, axis=-1)
    r_worse = jnp.take_along_axis(rewards, worse, axis=-1)
    loss = jnp.sum(jnp.where(valid, pairwise_loss(r_better, r_worse) * weights, 0.0))
    margin = r_better - r_worse
    metrics = {
        "correct": masked_sum((margin > 0).astype(jnp.float32), valid),
        "margin_sum": masked_sum(margin, valid),
        "num_pairs": jnp.sum(valid.astype(jnp.float32)),
    }
    return loss, metrics


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float,
             label_smoothing: float = 0.0, kind: str = "sigmoid"):
    """Direct Preference Optimisation per pair (Rafailov et al. 2023); IPO (Azar et al. 2023).

    Args:
        *_logps: `[P]` summed response log-probs under the policy and the reference.
        beta: strength of the implicit KL constraint.
        label_smoothing: ε, the assumed share of flipped preference labels (sigmoid only).
        kind: "sigmoid" (DPO) or "ipo".

    Returns:
        `(losses [P], metrics)` with the implicit rewards β·(log π − log π_ref) of both sides.
        sigmoid: −(1−ε)·log σ(β·h) − ε·log σ(−β·h); ipo: (h − 1/(2β))²; h is the difference of
        the chosen and rejected log-ratios.
    """
    h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    if kind == "sigmoid":
        losses = (-(1 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
                  - label_smoothing * jax.nn.log_sigmoid(-beta * h))
    elif kind == "ipo":
        losses = jnp.square(h - 1.0 / (2.0 * beta))
    else:
        raise ValueError(f"unknown DPO loss {kind!r}; choose sigmoid or ipo")
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    return losses, {"chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards}


def orpo_loss(chosen_mean_logps, rejected_mean_logps, chosen_nll, lam: float):
    """ORPO (Hong et al. 2024) per pair: NLL of the chosen response − λ·log σ(log odds ratio).

    `*_mean_logps [P]` are per-token mean log-probs (so exp(·) is in (0, 1)); odds(y) =
    p / (1 − p). Returns `(losses [P], log_odds_ratio [P])`; no reference model is involved.
    """
    def log_odds(mean_logp):
        return mean_logp - jnp.log1p(-jnp.exp(jnp.minimum(mean_logp, -1e-6)))

    ratio = log_odds(chosen_mean_logps) - log_odds(rejected_mean_logps)
    return chosen_nll - lam * jax.nn.log_sigmoid(ratio), ratio


def group_advantages(scores, eps: float = 1e-6, scale: bool = True):
    """GRPO: scores `[G, K]` of K samples per prompt, normalised within each group:
    (r − mean_g) / (std_g + eps); `scale=False` (Dr. GRPO) keeps r − mean_g.

    Each group is first shifted by its first score (the same advantages in exact arithmetic):
    an all-equal group is then exactly 0 (float32's mean of K equal values can land a rounding
    step off them, and dividing that step by a std of the same size made it ~0.1–0.5)."""
    shifted = scores - scores[..., :1]
    centred = shifted - jnp.mean(shifted, axis=-1, keepdims=True)
    if not scale:
        return centred
    return centred / (jnp.std(shifted, axis=-1, keepdims=True) + eps)


def batch_baseline_advantages(scores, eps: float = 1e-6, scale: bool = True, rows=None):
    """REINFORCE++ with a batch baseline: scores `[G, K]` minus the mean of the whole batch,
    divided by the batch's std (+ eps) when `scale`. `[G, K]`.

    `rows [G, K]` (bool; None = all) marks the real rows: only they make the mean and std, and
    the others (dynamic sampling's fillers) get advantage 0. Scores are shifted by the first
    real one first, so an all-equal batch is exactly 0 (as in `group_advantages`)."""
    rows = jnp.ones(scores.shape, bool) if rows is None else rows
    shifted = jnp.where(rows, scores - scores.reshape(-1)[jnp.argmax(rows.reshape(-1))], 0.0)
    count = jnp.maximum(jnp.sum(rows), 1)
    centred = jnp.where(rows, shifted - jnp.sum(shifted) / count, 0.0)
    if not scale:
        return centred
    return centred / (jnp.sqrt(jnp.sum(jnp.square(centred)) / count) + eps)


def leave_one_out_advantages(scores):
    """RLOO: each sample's score minus the mean of the other K−1 in its group. `[G, K]`.
    (Shifted by the group's first score first: an all-equal group is exactly 0.)"""
    K = scores.shape[-1]
    shifted = scores - scores[..., :1]
    total = jnp.sum(shifted, axis=-1, keepdims=True)
    return shifted - (total - shifted) / (K - 1)


def clipped_kl_regularised_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask,
                                clip_eps: float, kl_coef: float, *,
                                clip_high: float | None = None, dual_clip: float = 0.0,
                                ratio_level: str = "token", aggregation: str = "token-mean",
                                counts: dict | None = None, token_weights=None):
    """GRPO/RLOO token loss: clipped surrogate (`clipped_policy_loss`, lower clip `clip_eps`,
    `token_weights` on it) with a per-sequence advantage `[B]` broadcast over its tokens, plus
    `kl_coef`·k3 KL to the reference as a loss term, both aggregated the same way. Returns
    (loss, metrics)."""
    from jrlhf.rl import kl_penalty

    adv = jnp.broadcast_to(advantages[:, None], logprobs.shape)
    pg, metrics = clipped_policy_loss(logprobs, old_logprobs, adv, mask, clip_low=clip_eps,
                                      clip_high=clip_high, dual_clip=dual_clip,
                                      ratio_level=ratio_level, aggregation=aggregation,
                                      counts=counts, token_weights=token_weights)
    # Padded positions are zeroed before k3's exp: a large log-prob gap there would overflow
    # and, through the masked sum's backward (inf · 0), turn every gradient NaN.
    real = mask > 0
    kl = aggregate(kl_penalty(jnp.where(real, logprobs, 0.0), jnp.where(real, ref_logprobs, 0.0),
                              "k3"), mask, aggregation, counts)
    return pg + kl_coef * kl, dict(metrics, kl=kl, policy_loss=pg)
