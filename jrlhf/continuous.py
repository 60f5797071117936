"""Continuous batching: S decode slots over the queue of all sequences to sample, refilled on
device as rows end.

Static batching (`sampling.generate`) decodes every row until the longest one ends; with
long-tailed response lengths most slot-steps then compute padding. Here a `lax.while_loop`
keeps S slots busy: at each step every slot whose row ended (EOS or its budget) takes the next
sequence of the queue, whose prompt's KV cache and first-token logits are copied into the slot,
and decoding goes on until the queue is drained. RL knows its prompts up front, so the queue is
the whole batch and nothing leaves the device until every sequence is done.

KV layout, per-slot contiguous: slot s owns `[P + N]` cache positions; its prompt sits left-padded
in positions 0..P−1 exactly as in the static sampler and its response from P on. Memory: the
slots' cache, `S · (P + N)` positions per layer, plus the prompt store, the prefill of every
prompt once (`G · P` positions: the K samples of a prompt share it, as the static sampler's
prefill is shared), against the static sampler's `G · K · (P + N)`. Copying a prompt into a slot
is a select over the slots' prompt positions, skipped (`lax.cond`) at steps where no slot is
refilled.

Sampling is keyed per sequence, `fold_in(fold_in(rng, sequence), t)`: a sequence's tokens do not
depend on which slot decodes it, or on how many slots there are. Greedy decoding gives the
static sampler's tokens (tested token for token).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jrlhf.heads import without_scalar_head
from jrlhf.models import transformer as tfm
from jrlhf.models.config import ModelConfig
from jrlhf.sampling import Generation, _sample, compute_dtype_params, row_budgets


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "max_new_tokens", "slots", "temperature", "top_k", "top_p",
                     "eos_token_id", "pad_token_id", "num_samples", "cache_dtype",
                     "batch_sharding"),
)
def generate_continuous(cfg: ModelConfig, params, prompt_ids, prompt_mask, rng, *,
                        max_new_tokens: int, slots: int, temperature: float = 1.0,
                        top_k: int = 0, top_p: float = 1.0, eos_token_id: int | None = None,
                        pad_token_id: int = 0, num_samples: int = 1,
                        cache_dtype: str | None = None, budgets=None,
                        batch_sharding=None) -> Generation:
    """`sampling.generate`'s output (same fields, rows in prompt order: the K samples of prompt
    b at rows bK .. bK+K−1) from `slots` decode slots refilled as rows end.

    `prompt_ids, prompt_mask [G, P]` left-padded; `budgets` as in `generate` (`[G]` or
    `[G·K]`, ≤ N = `max_new_tokens`). `Generation.steps` counts the decode steps run: slot
    utilisation is `mask.sum() / (slots · steps)`. `batch_sharding`: on a mesh, the slots are
    split that way (`jrlhf.sharding.batch_sharding`; S a multiple of the batch devices).
    """
    G, P = prompt_ids.shape
    N, S, K = max_new_tokens, slots, num_samples
    Q = G * K  # sequences in the queue; sequence q samples prompt q // K
    if not 1 <= S <= Q:
        raise ValueError(f"slots={S}: expected 1 to the {Q} sequences to sample "
                         f"({G} prompts × {K} samples)")
    cfg, params = without_scalar_head(cfg, params)
    model = tfm.bind(cfg, compute_dtype_params(params, cfg.dtype))
    hidden, store = model.prefill(prompt_ids, prompt_mask, P, cache_dtype)
    first_logits = model.logits(hidden[:, -1])
    lengths = jnp.sum(prompt_mask, axis=-1).astype(jnp.int32)
    budgets = row_budgets(budgets, Q, K, N)
    dtype = store[0][0].dtype

    def slots_split(tree):
        if batch_sharding is None:
            return tree
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, batch_sharding), tree)

    cache = slots_split(tuple(tuple(jnp.zeros((S, P + N) + k.shape[2:], dtype) for k in layer)
                              for layer in store))
    prompt_positions = (jnp.arange(P + N) < P)[None, :, None, None]

    def refill(carry):
        """Free slots take the next sequences of the queue: their prompt's cache and
        first-token logits."""
        cache, logits, seq, t, active, head = carry
        free = ~active
        candidate = head + jnp.cumsum(free) - 1
        take = free & (candidate < Q)
        seq = jnp.where(take, candidate, seq)
        prompt = seq // K
        where = take[:, None, None, None] & prompt_positions
        cache = tuple(tuple(jnp.where(where, jnp.pad(s[prompt], ((0, 0), (0, N), (0, 0),
                                                                 (0, 0))), c)
                            for s, c in zip(layer_store, layer_cache))
                      for layer_store, layer_cache in zip(store, cache))
        logits = jnp.where(take[:, None], first_logits[prompt], logits)
        return (slots_split(cache), slots_split(logits), seq, jnp.where(take, 0, t),
                active | take, head + jnp.sum(take))

    def cond(carry):
        (_, _, _, _, active, head), _, _ = carry
        return (head < Q) | jnp.any(active)

    def body(carry):
        slot_state, outputs, steps = carry
        cache, logits, seq, t, active, head = slot_state
        needed = jnp.any(~active) & (head < Q)
        cache, logits, seq, t, active, head = jax.lax.cond(
            needed, refill, lambda c: c, (cache, logits, seq, t, active, head))
        queued = jnp.minimum(seq, Q - 1)  # an idle slot's seq is Q: any real one will do
        budget = budgets[queued]
        live = active & (t < budget)  # a sequence with budget 0 ends without a token
        keys = jax.vmap(lambda q, s: jax.random.fold_in(jax.random.fold_in(rng, q), s))(seq, t)
        token, logprob = jax.vmap(
            lambda key, row: _sample(key, row[None], temperature, top_k, top_p))(keys, logits)
        token = jnp.where(live, token[:, 0], pad_token_id).astype(prompt_ids.dtype)
        tokens, mask, logprobs = outputs
        row = jnp.where(live, seq, Q)  # idle slots write to a discarded row
        col = jnp.minimum(t, N - 1)
        tokens = tokens.at[row, col].set(token)
        mask = mask.at[row, col].set(live.astype(mask.dtype))
        logprobs = logprobs.at[row, col].set(jnp.where(live, logprob[:, 0], 0.0))
        ended = ~live | (t + 1 >= budget)
        if eos_token_id is not None:
            ended = ended | (token == eos_token_id)
        prompt = queued // K
        hidden, cache = model.decode(token[:, None], (lengths[prompt] + col)[:, None], cache,
                                     P - lengths[prompt], P + col)
        slot_state = (slots_split(cache), slots_split(model.logits(hidden[:, 0])), seq, t + live,
                      active & ~ended, head)
        return slot_state, (tokens, mask, logprobs), steps + 1

    slot_state = (cache, jnp.zeros((S, first_logits.shape[-1]), first_logits.dtype),
                  jnp.full((S,), Q, jnp.int32), jnp.zeros((S,), jnp.int32),
                  jnp.zeros((S,), bool), jnp.int32(0))
    outputs = (jnp.full((Q + 1, N), pad_token_id, prompt_ids.dtype),
               jnp.zeros((Q + 1, N), jnp.int32), jnp.zeros((Q + 1, N), jnp.float32))
    _, (tokens, mask, logprobs), steps = jax.lax.while_loop(
        cond, body, (slot_state, outputs, jnp.int32(0)))
    return Generation(tokens[:Q], mask[:Q], logprobs[:Q], steps,
                      jnp.full((Q,), temperature or 1.0, jnp.float32))
