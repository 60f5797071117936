"""Jitted autoregressive sampling with a KV cache.

One prefill over the left-padded prompts, then a `lax.while_loop` that decodes one token per
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

from jrlhf.models import transformer as tfm
from jrlhf.models.config import ModelConfig


class Generation(NamedTuple):
    tokens: jax.Array  # [B, N] sampled tokens, pad_token_id after a row's EOS
    mask: jax.Array  # [B, N] 1 on generated tokens up to and including EOS, 0 after
    logprobs: jax.Array  # [B, N] log-prob of each token under logits/temperature (0 where mask 0)
    steps: jax.Array  # () decoding iterations run (< N when every row stopped early)


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


def _sample(rng, logits, temperature, top_k, top_p):
    """(token [B], logprob [B]) from last-position logits [B, V]."""
    if temperature == 0.0:
        token = jnp.argmax(logits, axis=-1)
        return token, jnp.zeros(token.shape, jnp.float32)
    scaled = logits / temperature
    token = jax.random.categorical(rng, filter_logits(scaled, top_k, top_p), axis=-1)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(scaled, -1), token[:, None], -1)[:, 0]
    return token, logprob


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p", "eos_token_id",
                     "pad_token_id"),
)
def generate(cfg: ModelConfig, params, prompt_ids, prompt_mask, rng, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: int | None = None, pad_token_id: int = 0) -> Generation:
    """Sample `max_new_tokens` continuations of left-padded prompts.

    Args:
        cfg: model config (static).
        params: policy params (nested dict).
        prompt_ids: `[B, P]` int, left-padded.
        prompt_mask: `[B, P]`, 1 on prompt tokens, 0 on left padding.
        rng: PRNG key; the token at step t uses `fold_in(rng, t)`.
        max_new_tokens: N, the response length bound (static).
        temperature: 0.0 means greedy; otherwise logits are divided by it.
        top_k, top_p: optional truncation of the sampling set (0 / 1.0 = off).
        eos_token_id: a row stops after emitting it (None: never stops early).
        pad_token_id: written after a row's EOS.

    Returns:
        `Generation(tokens [B, N], mask [B, N], logprobs [B, N], steps)`.
    """
    B, P = prompt_ids.shape
    N = max_new_tokens
    model = tfm.bind(cfg, params)
    cache = tfm.init_cache(cfg, B, P + N)
    kv_mask = jnp.concatenate([prompt_mask.astype(jnp.int32), jnp.zeros((B, N), jnp.int32)], 1)
    hidden, cache = model(prompt_ids, kv_mask, tfm.positions_from_mask(prompt_mask), cache, 0)
    logits = model.logits(hidden[:, -1:])[:, 0]
    lengths = jnp.sum(prompt_mask, axis=-1).astype(jnp.int32)

    def cond(carry):
        t, _, _, _, _, _, _, done = carry
        return (t < N) & ~jnp.all(done)

    def body(carry):
        t, cache, kv_mask, logits, tokens, mask, logprobs, done = carry
        token, logprob = _sample(jax.random.fold_in(rng, t), logits, temperature, top_k, top_p)
        alive = ~done
        token = jnp.where(alive, token, pad_token_id).astype(tokens.dtype)
        tokens = tokens.at[:, t].set(token)
        mask = mask.at[:, t].set(alive.astype(mask.dtype))
        logprobs = logprobs.at[:, t].set(jnp.where(alive, logprob, 0.0))
        if eos_token_id is not None:
            done = done | (token == eos_token_id)
        kv_mask = kv_mask.at[:, P + t].set(alive.astype(kv_mask.dtype))
        hidden, cache = model(token[:, None], kv_mask, (lengths + t)[:, None], cache, P + t)
        return (t + 1, cache, kv_mask, model.logits(hidden)[:, 0], tokens, mask, logprobs, done)

    init = (
        jnp.int32(0), cache, kv_mask, logits,
        jnp.full((B, N), pad_token_id, prompt_ids.dtype),
        jnp.zeros((B, N), jnp.int32),
        jnp.zeros((B, N), jnp.float32),
        jnp.zeros((B,), bool),
    )
    steps, _, _, _, tokens, mask, logprobs, _ = jax.lax.while_loop(cond, body, init)
    return Generation(tokens, mask, logprobs, steps)
