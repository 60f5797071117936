"""Jitted autoregressive sampling with a KV cache.

Weights are cast to the compute dtype once, one prefill runs over the left-padded prompts (shared
by the K samples of a prompt when `num_samples=K`), then a `lax.while_loop` decodes one token per
iteration for every row, stops each row at its EOS (later slots hold `pad_token_id` and have
mask 0) and ends as soon as every row is done.

Log-probs agree with the trainer: the returned `logprobs` are `log_softmax(logits / temperature)`
of the sampled token, the same quantity `jrlhf.rl.logprobs_from_logits(logits / temperature, ...)`
gives on a full forward. top-k / top-p only choose *which* tokens may be sampled; they are off by
default (`top_k=0, top_p=1.0`) because with them on the sampling distribution is the truncated
one and the PPO ratio would no longer start at exactly 1.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jrlhf.heads import without_scalar_head
from jrlhf.models import transformer as tfm
from jrlhf.models.config import ModelConfig


class Generation(NamedTuple):
    tokens: jax.Array  # [B, N] sampled tokens, pad_token_id after a row's EOS
    mask: jax.Array  # [B, N] 1 on generated tokens up to and including EOS, 0 after
    logprobs: jax.Array  # [B, N] log-prob of each token under logits/temperature (0 where mask 0)
    steps: jax.Array  # () decoding iterations run (< N when every row stopped early)
    # [B] what each row's logits were divided by (1 when greedy): the trainer's log-probs of
    # these tokens are taken at the same temperature because it travels with the rows.
    temperature: jax.Array
    # [B, P + N, L_sparse, k] a mixture of experts' experts for every prompt and response token
    # (`generate(record_experts=True)`; routing replay), else None
    experts: jax.Array | None = None


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Set logits outside the top-k / nucleus (top-p) set to -inf. logits: [B, V].

    The nucleus keeps the smallest set of most-likely tokens whose probability reaches `top_p`
    (the most likely token is always kept).
    """
    neg_inf = jnp.finfo(logits.dtype).min
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < top_p
        # Smallest kept logit is the threshold; ties at the threshold are kept.
        threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg_inf, logits)
    return logits


def first_argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=-1)` (the first index of the maximum) of `x [B, V]`, as two plain
    reductions: XLA:CPU runs argmax's (value, index) pair reduction unvectorised, 3-4x slower
    than a max and a min over a [16, 5632] row block (the sampler pays it at every token)."""
    best = jnp.max(x, axis=-1, keepdims=True)
    index = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(x == best, index, x.shape[-1]), axis=-1)


def _sample(rng, logits, temperature, top_k, top_p):
    """(token [B], logprob [B]) from last-position logits [B, V]."""
    if temperature == 0.0:  # greedy: the log-prob of the argmax under the plain logits
        scaled = logits.astype(jnp.float32)
        token = first_argmax(logits)
    else:
        scaled = logits / temperature
        # `jax.random.categorical(rng, filtered)`, token for token (the same Gumbel draws),
        # with the cheaper argmax.
        filtered = filter_logits(scaled, top_k, top_p)
        token = first_argmax(filtered + jax.random.gumbel(rng, filtered.shape, filtered.dtype))
    logprob = jnp.take_along_axis(jax.nn.log_softmax(scaled, -1), token[:, None], -1)[:, 0]
    return token, logprob


def row_budgets(budgets, rows: int, num_samples: int, max_new_tokens: int) -> jax.Array:
    """Each output row's bound on new tokens `[rows]` (int32, ≤ `max_new_tokens`) from
    `budgets`: None (every row `max_new_tokens`), one per prompt `[rows / num_samples]` (its K
    samples share it) or one per output row `[rows]`."""
    if budgets is None:
        return jnp.full((rows,), max_new_tokens, jnp.int32)
    budgets = jnp.minimum(jnp.asarray(budgets, jnp.int32), max_new_tokens)
    if budgets.shape not in ((rows,), (rows // num_samples,)):
        raise ValueError(f"budgets of shape {budgets.shape}: expected one per prompt "
                         f"({rows // num_samples},) or one per output row ({rows},)")
    if budgets.shape[0] != rows:  # one per prompt: its K samples share it
        budgets = jnp.repeat(budgets, num_samples, axis=0)
    return budgets


def compute_dtype_params(params, dtype):
    """Floating-point leaves of `params` in the compute `dtype` (the sampler reads bf16 weights
    from HBM once per step instead of float32 weights converted at every step)."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def sampling_model(cfg: ModelConfig, params) -> tfm.Transformer:
    """The model a sampler runs: the LM head alone (a scalar head dropped), the weights cast to
    `cfg.dtype`."""
    cfg, params = without_scalar_head(cfg, params)
    return tfm.bind(cfg, compute_dtype_params(params, cfg.dtype))


def split_rows(tree, batch_sharding):
    """`tree`'s arrays constrained to `batch_sharding` (their leading, row axis split over the
    mesh's batch axes); `tree` itself when it is None (one device, or replicated rows)."""
    if batch_sharding is None:
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, batch_sharding), tree)


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p", "eos_token_id",
                     "pad_token_id", "num_samples", "cache_dtype", "batch_sharding",
                     "record_experts"),
)
def generate(cfg: ModelConfig, params, prompt_ids, prompt_mask, rng, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: int | None = None, pad_token_id: int = 0, num_samples: int = 1,
             cache_dtype: str | None = None, batch_sharding=None,
             budgets=None, record_experts: bool = False) -> Generation:
    """Sample `max_new_tokens` continuations of left-padded prompts.

    Args:
        cfg: model config (static). The weights are cast to `cfg.dtype` once per call.
        params: policy params (nested dict); a scalar (value) head is ignored, whichever of
            `cfg` and `params` has one.
        prompt_ids: `[B, P]` int, left-padded.
        prompt_mask: `[B, P]`, 1 on prompt tokens, 0 on left padding.
        rng: PRNG key; the token at step t uses `fold_in(rng, t)`.
        max_new_tokens: N, the response length bound (static).
        temperature: 0.0 means greedy (log-probs then under the plain logits, temperature 1);
            otherwise logits are divided by it. The output records it per row.
        top_k, top_p: optional truncation of the sampling set (0 / 1.0 = off).
        eos_token_id: a row stops after emitting it (None: never stops early).
        pad_token_id: written after a row's EOS.
        num_samples: K responses per prompt from one shared prefill (its cache is broadcast K
            times); the output has B·K rows, the K samples of prompt b at rows bK .. bK+K−1.
        cache_dtype: the KV cache's dtype (default `cfg.dtype`; "bfloat16" halves the cache
            of a float32 model).
        batch_sharding: on a mesh, the rows' sharding (`jrlhf.sharding.batch_sharding`): the
            decode state and outputs are kept split that way rather than left to propagation.
        budgets: optional int bounds on new tokens (≤ N), `[B]` one per prompt (its K samples
            share it) or `[B·K]` one per output row: a row stops after its budget as it would
            at EOS. N stays the buffer width and the loop ends when every row is done.
        record_experts: a mixture of experts records the experts every prompt token (in the
            prefill) and every sampled token (when it is fed back) was routed to, for routing
            replay in the trainer (`Generation.experts`, the prompt's columns then the
            response's, as a rollout row lays them out).

    Returns:
        `Generation(tokens [B·K, N], mask [B·K, N], logprobs [B·K, N], steps,
        temperature [B·K], experts [B·K, P + N, L_sparse, k] or None)`.
    """
    P = prompt_ids.shape[1]
    N = max_new_tokens
    model = sampling_model(cfg, params)
    record = record_experts and cfg.is_moe
    hidden, cache, *prompt_experts = model.prefill(prompt_ids, prompt_mask, P + N, cache_dtype,
                                                   with_experts=record)
    logits = model.logits(hidden[:, -1])  # left-padded: every row's prompt ends at column P-1
    lengths = jnp.sum(prompt_mask, axis=-1).astype(jnp.int32)
    if num_samples > 1:
        repeat = lambda x: jnp.repeat(x, num_samples, axis=0)  # noqa: E731
        cache, logits, lengths, prompt_experts = jax.tree.map(
            repeat, (cache, logits, lengths, prompt_experts))
    B = lengths.shape[0]
    first_slot = P - lengths
    budgets = row_budgets(budgets, B, num_samples, N)

    rows_split = functools.partial(split_rows, batch_sharding=batch_sharding)
    logits = rows_split(logits)

    def cond(carry):
        t, _, _, _, _, _, done, _ = carry
        return (t < N) & ~jnp.all(done)

    def body(carry):
        t, cache, logits, tokens, mask, logprobs, done, experts = carry
        token, logprob = _sample(jax.random.fold_in(rng, t), logits, temperature, top_k, top_p)
        alive = ~done
        token = jnp.where(alive, token, pad_token_id).astype(tokens.dtype)
        tokens = tokens.at[:, t].set(token)
        mask = mask.at[:, t].set(alive.astype(mask.dtype))
        logprobs = logprobs.at[:, t].set(jnp.where(alive, logprob, 0.0))
        if eos_token_id is not None:
            done = done | (token == eos_token_id)
        done = done | (t + 1 >= budgets)
        hidden, cache, *chosen = model.decode(token[:, None], (lengths + t)[:, None], cache,
                                              first_slot, P + t, with_experts=record)
        if record:  # the experts of the token just sampled, as the trainer will see it
            experts = experts.at[:, t].set(chosen[0])
        return (t + 1, cache, rows_split(model.logits(hidden[:, 0])), tokens, mask, logprobs,
                done, experts)

    response_experts = None
    if record:
        response_experts = rows_split(jnp.zeros(
            (B, N, len(cfg.sparse_layers), cfg.experts_per_token), jnp.int32))
    init = (
        jnp.int32(0), cache, logits,
        *map(rows_split, (jnp.full((B, N), pad_token_id, prompt_ids.dtype),
                          jnp.zeros((B, N), jnp.int32), jnp.zeros((B, N), jnp.float32),
                          budgets <= 0)),
        response_experts,
    )
    steps, _, _, tokens, mask, logprobs, _, response_experts = jax.lax.while_loop(cond, body,
                                                                                   init)
    experts = None
    if record:
        experts = jnp.concatenate([prompt_experts[0], response_experts], axis=1)
    return Generation(tokens, mask, logprobs, steps,
                      rows_split(jnp.full((B,), temperature or 1.0, jnp.float32)), experts)
