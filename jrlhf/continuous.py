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
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jrlhf.models.config import ModelConfig
from jrlhf.sampling import Generation, _sample, row_budgets, sampling_model, split_rows


class Resumption(NamedTuple):
    """Where the sequences of a partial rollout stand when a `generate_partial` call starts: what
    earlier calls (under earlier policy versions) generated of each. Rows as in `generate`."""

    tokens: jax.Array  # [Q, N] tokens generated so far, pad_token_id after
    logprobs: jax.Array  # [Q, N] their sampler log-probs (0 after)
    lengths: jax.Array  # [Q] int32: tokens generated so far
    finished: jax.Array  # [Q] bool: ended (EOS or budget) in an earlier call, not decoded again
    # [Q, P + N, L_sparse, k] int32 a mixture of experts' routing recorded so far, laid out as
    # `Generation.experts` (`record_experts`; None otherwise)
    experts: jax.Array | None = None


_STATIC = ("cfg", "max_new_tokens", "slots", "temperature", "top_k", "top_p", "eos_token_id",
           "pad_token_id", "num_samples", "cache_dtype", "batch_sharding")


@functools.partial(jax.jit, static_argnames=(*_STATIC, "record_experts"))
def generate_continuous(cfg: ModelConfig, params, prompt_ids, prompt_mask, rng, *,
                        max_new_tokens: int, slots: int, temperature: float = 1.0,
                        top_k: int = 0, top_p: float = 1.0, eos_token_id: int | None = None,
                        pad_token_id: int = 0, num_samples: int = 1,
                        cache_dtype: str | None = None, budgets=None,
                        batch_sharding=None, first_sequence=0,
                        record_experts: bool = False) -> Generation:
    """`sampling.generate`'s output (same fields, rows in prompt order: the K samples of prompt
    b at rows bK .. bK+K−1) from `slots` decode slots refilled as rows end.

    `prompt_ids, prompt_mask [G, P]` left-padded; `budgets` as in `generate` (`[G]` or
    `[G·K]`, ≤ N = `max_new_tokens`). `Generation.steps` counts the decode steps run: slot
    utilisation is `mask.sum() / (slots · steps)`. `batch_sharding`: on a mesh, the slots are
    split that way (`jrlhf.sharding.batch_sharding`; S a multiple of the batch devices).
    `first_sequence`: the global index of row 0 (sequence q is keyed `first_sequence + q`), so
    a host sampling rows lo.. of a larger batch draws what the whole batch's call draws there.
    `record_experts`: a mixture of experts' routing of every prompt and response token, as
    `generate` records it (`Generation.experts`).
    """
    generation, _ = _decode_slots(
        cfg, params, prompt_ids, prompt_mask, rng, max_new_tokens=max_new_tokens, slots=slots,
        temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, num_samples=num_samples, cache_dtype=cache_dtype,
        budgets=budgets, batch_sharding=batch_sharding, first_sequence=first_sequence,
        record_experts=record_experts)
    return generation


@functools.partial(jax.jit, static_argnames=(*_STATIC, "record_experts"))
def generate_partial(cfg: ModelConfig, params, prompt_ids, prompt_mask, rng,
                     resumed: Resumption, group_real, target_groups, *, max_new_tokens: int,
                     slots: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     eos_token_id: int | None = None, pad_token_id: int = 0,
                     num_samples: int = 1, cache_dtype: str | None = None, budgets=None,
                     batch_sharding=None,
                     record_experts: bool = False) -> tuple[Generation, jax.Array]:
    """One call of a partial rollout: `generate_continuous` over the sequences `resumed` has not
    finished, stopping as soon as `target_groups` real groups (all K rows of a prompt, `group_real
    [G]` true) have ended — counting groups that ended in earlier calls.

    A sequence an earlier call left mid-response (`resumed.lengths > 0`, not finished) starts
    in a slot of its own: its prompt and the tokens it has are prefilled with these `params`
    (the KV cache is recomputed under the current weights; nothing of an earlier version's
    cache is kept), and it goes on from there; such sequences must number at most `slots` (a
    call stops with at most `slots` of them). Then sequences not started, in row order.
    Budgets count every token of a row, earlier calls' included.

    `record_experts` (routing replay; `resumed.experts` then holds what earlier calls
    recorded): a token's experts are recorded once, by the call that samples it, and kept.
    A resumed row's prefill replays them — its prompt and earlier tokens are routed as when
    they were sampled, under these weights — so the trainer, replaying the same experts over
    the whole row, computes what this call's sampler computed for the tokens it draws. A row
    that starts in this call takes this call's routing of its prompt.

    Returns `(generation, finished [Q] bool)`: every row's tokens so far (earlier calls' as
    given, `logprobs` the sampler's of whichever call drew them, `experts` likewise) and which
    rows have ended. `generation.steps` counts this call's decode steps only.
    """
    return _decode_slots(
        cfg, params, prompt_ids, prompt_mask, rng, max_new_tokens=max_new_tokens, slots=slots,
        temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, num_samples=num_samples, cache_dtype=cache_dtype,
        budgets=budgets, batch_sharding=batch_sharding, resumed=resumed,
        group_real=group_real, target_groups=target_groups, record_experts=record_experts)


def _decode_slots(cfg, params, prompt_ids, prompt_mask, rng, *, max_new_tokens, slots,
                  temperature, top_k, top_p, eos_token_id, pad_token_id, num_samples,
                  cache_dtype, budgets, batch_sharding, resumed=None, group_real=None,
                  target_groups=None, first_sequence=0, record_experts=False):
    """The slots' `lax.while_loop` behind `generate_continuous` and `generate_partial`."""
    G, P = prompt_ids.shape
    N, S, K = max_new_tokens, slots, num_samples
    Q = G * K  # sequences in the queue; sequence q samples prompt q // K
    if not 1 <= S <= Q:
        raise ValueError(f"slots={S}: expected 1 to the {Q} sequences to sample "
                         f"({G} prompts × {K} samples)")
    model = sampling_model(cfg, params)
    record = record_experts and cfg.is_moe
    if record and resumed is not None and resumed.experts is None:
        raise ValueError("generate_partial(record_experts=True) needs resumed.experts, the "
                         "experts recorded so far ([Q, P + N, L_sparse, k]; zeros at first)")
    hidden, store, *prompt_experts = model.prefill(prompt_ids, prompt_mask, P, cache_dtype,
                                                   with_experts=record)
    first_logits = model.logits(hidden[:, -1])
    lengths = jnp.sum(prompt_mask, axis=-1).astype(jnp.int32)
    budgets = row_budgets(budgets, Q, K, N)
    dtype = store[0][0].dtype

    slots_split = functools.partial(split_rows, batch_sharding=batch_sharding)

    def empty_slots():
        cache = tuple(tuple(jnp.zeros((S,) + k.shape[1:3] + (P + N,), dtype) for k in layer)
                      for layer in store)
        return cache, jnp.zeros((S, first_logits.shape[-1]), first_logits.dtype)

    if resumed is None:
        order, queue_len, started = jnp.arange(Q), Q, jnp.int32(0)
        cache, logits = empty_slots()
        seq, t = jnp.full((S,), Q, jnp.int32), jnp.zeros((S,), jnp.int32)
        outputs = (jnp.full((Q + 1, N), pad_token_id, prompt_ids.dtype),
                   jnp.zeros((Q + 1, N), jnp.int32), jnp.zeros((Q + 1, N), jnp.float32))
        if record:  # each response token's experts, written when the token is fed back
            outputs += (jnp.zeros((Q + 1, N, len(cfg.sparse_layers), cfg.experts_per_token),
                                  jnp.int32),)
        finished = jnp.zeros((Q + 1,), bool)
        group_real, target_groups = jnp.ones((G,), bool), G
    else:
        in_progress = (resumed.lengths > 0) & ~resumed.finished
        # Queue: mid-response sequences first (straight into the first slots), then the ones
        # not started, in row order; finished ones are not queued.
        category = jnp.where(resumed.finished, 2, jnp.where(in_progress, 0, 1))
        order = jnp.argsort(category * Q + jnp.arange(Q)).astype(jnp.int32)
        queue_len = jnp.sum(category < 2).astype(jnp.int32)
        started = jnp.minimum(jnp.sum(in_progress), S).astype(jnp.int32)
        slot_seq = order[:S]
        resuming = jnp.arange(S) < started
        prefix = resumed.lengths[slot_seq]

        def prefill_resumed():
            """Each resuming slot's prompt and generated tokens, prefilled in the slot layout
            (prompt in 0..P−1, response from P), and the logits after its last token."""
            ids = jnp.concatenate([prompt_ids[slot_seq // K],
                                   resumed.tokens[slot_seq].astype(prompt_ids.dtype)], axis=1)
            generated = (jnp.arange(N)[None] < prefix[:, None]) & resuming[:, None]
            mask = jnp.concatenate([prompt_mask[slot_seq // K],
                                    generated.astype(prompt_mask.dtype)], axis=1)
            # With replay, routed as when sampled (the trainer replays the same experts).
            h, cache = model.prefill(ids, mask, P + N, cache_dtype,
                                     experts=resumed.experts[slot_seq] if record else None)
            last = h[jnp.arange(S), P + jnp.maximum(prefix, 1) - 1]
            return tuple(tuple(x.astype(dtype) for x in layer) for layer in cache), \
                model.logits(last).astype(first_logits.dtype)

        cache, logits = jax.lax.cond(started > 0, prefill_resumed, empty_slots)
        seq = jnp.where(resuming, slot_seq, Q).astype(jnp.int32)
        t = jnp.where(resuming, prefix, 0).astype(jnp.int32)
        generated = (jnp.arange(N)[None] < resumed.lengths[:, None]).astype(jnp.int32)
        outputs = tuple(jnp.concatenate([x.astype(dt), jnp.full((1, N), fill, dt)])
                        for x, dt, fill in ((resumed.tokens, prompt_ids.dtype, pad_token_id),
                                            (generated, jnp.int32, 0),
                                            (resumed.logprobs, jnp.float32, 0)))
        if record:  # the response's experts so far; this call's tokens' are written after
            response = resumed.experts[:, P:].astype(jnp.int32)
            outputs += (jnp.concatenate([response, jnp.zeros_like(response[:1])]),)
        finished = jnp.concatenate([resumed.finished, jnp.zeros((1,), bool)])
    group_left = jnp.concatenate([K - jnp.sum(finished[:Q].reshape(G, K), axis=1),
                                  jnp.zeros((1,), jnp.int32)]).astype(jnp.int32)
    prompt_positions = (jnp.arange(P + N) < P)[None, None, None, :]  # cache: slots last

    def refill(carry):
        """Free slots take the next sequences of the queue: their prompt's cache and
        first-token logits."""
        cache, logits, seq, t, active, head = carry
        free = ~active
        candidate = head + jnp.cumsum(free) - 1
        take = free & (candidate < queue_len)
        seq = jnp.where(take, order[jnp.minimum(candidate, Q - 1)], seq)
        prompt = seq // K
        where = take[:, None, None, None] & prompt_positions
        cache = tuple(tuple(jnp.where(where, jnp.pad(s[prompt], ((0, 0), (0, 0), (0, 0),
                                                                 (0, N))), c)
                            for s, c in zip(layer_store, layer_cache))
                      for layer_store, layer_cache in zip(store, cache))
        logits = jnp.where(take[:, None], first_logits[prompt], logits)
        return (slots_split(cache), slots_split(logits), seq, jnp.where(take, 0, t),
                active | take, head + jnp.sum(take))

    def cond(carry):
        (_, _, _, _, active, head), _, _, group_left, _ = carry
        completed = jnp.sum((group_left[:G] == 0) & group_real)
        return ((head < queue_len) | jnp.any(active)) & (completed < target_groups)

    def body(carry):
        slot_state, outputs, finished, group_left, steps = carry
        cache, logits, seq, t, active, head = slot_state
        needed = jnp.any(~active) & (head < queue_len)
        cache, logits, seq, t, active, head = jax.lax.cond(
            needed, refill, lambda c: c, (cache, logits, seq, t, active, head))
        queued = jnp.minimum(seq, Q - 1)  # an idle slot's seq is Q: any real one will do
        budget = budgets[queued]
        live = active & (t < budget)  # a sequence with budget 0 ends without a token
        keys = jax.vmap(lambda q, s: jax.random.fold_in(jax.random.fold_in(rng, q), s))(
            first_sequence + seq, t)
        token, logprob = jax.vmap(
            lambda key, row: _sample(key, row[None], temperature, top_k, top_p))(keys, logits)
        token = jnp.where(live, token[:, 0], pad_token_id).astype(prompt_ids.dtype)
        tokens, mask, logprobs, *experts = outputs
        row = jnp.where(live, seq, Q)  # idle slots write to a discarded row
        col = jnp.minimum(t, N - 1)
        tokens = tokens.at[row, col].set(token)
        mask = mask.at[row, col].set(live.astype(mask.dtype))
        logprobs = logprobs.at[row, col].set(jnp.where(live, logprob[:, 0], 0.0))
        ended = ~live | (t + 1 >= budget)
        if eos_token_id is not None:
            ended = ended | (token == eos_token_id)
        ending = active & ended
        finished = finished.at[jnp.where(ending, seq, Q)].set(True)
        group_left = group_left.at[jnp.where(ending, seq // K, G)].add(-1)
        prompt = queued // K
        hidden, cache, *chosen = model.decode(token[:, None], (lengths[prompt] + col)[:, None],
                                              cache, P - lengths[prompt], P + col,
                                              with_experts=record)
        if record:
            experts = [experts[0].at[row, col].set(chosen[0])]
        slot_state = (slots_split(cache), slots_split(model.logits(hidden[:, 0])), seq, t + live,
                      active & ~ended, head)
        return slot_state, (tokens, mask, logprobs, *experts), finished, group_left, steps + 1

    slot_state = (slots_split(cache), slots_split(logits), seq, t, seq < Q, started)
    _, (tokens, mask, logprobs, *experts), finished, _, steps = jax.lax.while_loop(
        cond, body, (slot_state, outputs, finished, group_left, jnp.int32(0)))
    if record:  # the prompt's experts (one prefill per prompt) before the response's
        prompt = jnp.repeat(prompt_experts[0], K, axis=0)
        if resumed is not None:  # rows started earlier keep the routing they were sampled with
            earlier = (resumed.lengths > 0) | resumed.finished
            prompt = jnp.where(earlier[:, None, None, None], resumed.experts[:, :P], prompt)
        experts = jnp.concatenate([prompt, experts[0][:Q]], axis=1)
    return (Generation(tokens[:Q], mask[:Q], logprobs[:Q], steps,
                       jnp.full((Q,), temperature or 1.0, jnp.float32),
                       experts if record else None), finished[:Q])


# ----------------------------------------------------------------------------------------------
# Episode turns in slots that persist across device calls (`jrlhf.envs.run_episodes` with
# `rollout.slots`): the host enters a row when its context is ready (prompt, then earlier turns
# and observations), a call decodes a few steps, and a row whose turn ended leaves its slot for
# the host (which starts its environment call at once) while the other slots go on decoding.


class TurnSlots(NamedTuple):
    """The decode slots of episode turns between device calls (S slots; context width W, at
    most M = `max_new_tokens` tokens per turn). Slot s's cache holds its context left-padded in
    positions 0..W−1 and its turn's tokens from W on."""

    cache: tuple  # per layer, the KV cache arrays `[S, ..., W + M]` (positions last)
    logits: jax.Array  # [S, V] float32: the logits of the slot's next token
    lengths: jax.Array  # [S] int32: real context tokens
    episode: jax.Array  # [S] int32: the episode it decodes (its key's first index)
    turn: jax.Array  # [S] int32: which of the episode's turns (its key's second index)
    t: jax.Array  # [S] int32: tokens sampled in this turn
    budget: jax.Array  # [S] int32: at most this many tokens in this turn
    active: jax.Array  # [S] bool: decoding (False: free, or its turn ended)
    tokens: jax.Array  # [S, M] this turn's tokens, pad_token_id after
    mask: jax.Array  # [S, M] int32: 1 on sampled tokens (up to and including EOS)
    logprobs: jax.Array  # [S, M] float32: their sampler log-probs, 0 elsewhere


@functools.partial(jax.jit, static_argnames=("cfg", "slots", "width", "max_new_tokens",
                                             "cache_dtype", "pad_token_id", "batch_sharding"))
def empty_turn_slots(cfg: ModelConfig, params, *, slots: int, width: int, max_new_tokens: int,
                     cache_dtype: str | None = None, pad_token_id: int = 0,
                     batch_sharding=None) -> TurnSlots:
    """`slots` free slots for contexts of `width` tokens and turns of `max_new_tokens`."""
    model = sampling_model(cfg, params)
    S, M = slots, max_new_tokens

    def prefill_one(ids):
        hidden, cache = model.prefill(ids, ids, width, cache_dtype)
        return model.logits(hidden[:, -1]), cache

    logits, cache = jax.eval_shape(prefill_one, jnp.zeros((1, width), jnp.int32))
    vocab = logits.shape[-1]
    zeros = functools.partial(jnp.zeros, (S,), jnp.int32)
    state = TurnSlots(
        tuple(tuple(jnp.zeros((S,) + c.shape[1:-1] + (width + M,), c.dtype) for c in layer)
              for layer in cache),
        jnp.zeros((S, vocab), jnp.float32), zeros(), zeros(), zeros(), zeros(), zeros(),
        jnp.zeros((S,), bool), jnp.full((S, M), pad_token_id, jnp.int32),
        jnp.zeros((S, M), jnp.int32), jnp.zeros((S, M), jnp.float32))
    return split_rows(state, batch_sharding)


@functools.partial(jax.jit, donate_argnames=("slots",), static_argnames=(
    "cfg", "steps", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id",
    "cache_dtype", "batch_sharding"))
def advance_turn_slots(cfg: ModelConfig, params, slots: TurnSlots, enter_ids, enter_mask,
                       enter_slot, enter_count, episode, turn, budget, rng, *, steps: int,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       eos_token_id: int | None = None, pad_token_id: int = 0,
                       cache_dtype: str | None = None, batch_sharding=None) -> TurnSlots:
    """Enter new turns into free slots, then decode at most `steps` steps (fewer when every
    slot is idle). A slot whose turn ends (EOS, or its budget) stops decoding and keeps its
    tokens for the host to read (`active` False, `mask` its tokens) until a row enters it.

    Entries (fixed shapes, `[E, ...]`, the first `enter_count` real): `enter_ids, enter_mask
    [E, W]` left-padded contexts, `enter_slot [E]` the (free) slot each enters, `episode,
    turn [E]` its key, `budget [E]` (1..M) its token bound. Each entry is prefilled on its own
    (`[1, W]`: the work is the entries', not the slots'). Token t of turn `turn` of episode
    `episode` is sampled with key `fold_in(fold_in(fold_in(rng, episode), turn), t)`, so a
    turn's tokens depend only on its context and key, never on which slot or call decodes it,
    nor on the rows beside it (row-wise numerics at these fixed shapes).
    """
    model = sampling_model(cfg, params)
    S, M = slots.tokens.shape
    W = enter_ids.shape[1]

    constrain = functools.partial(split_rows, batch_sharding=batch_sharding)

    def enter(i, state: TurnSlots) -> TurnSlots:
        ids = jax.lax.dynamic_slice_in_dim(enter_ids, i, 1)
        mask = jax.lax.dynamic_slice_in_dim(enter_mask, i, 1)
        hidden, cache = model.prefill(ids, mask, W, cache_dtype)
        logits = model.logits(hidden[:, -1]).astype(jnp.float32)
        s = enter_slot[i]

        def put(whole, row):
            return jax.lax.dynamic_update_slice_in_dim(whole, row.astype(whole.dtype), s, 0)

        cache = tuple(tuple(put(c, jnp.pad(r.astype(c.dtype), [(0, 0)] * (r.ndim - 1) +
                                           [(0, M)])) for c, r in zip(layer, rows))
                      for layer, rows in zip(state.cache, cache))
        return state._replace(
            cache=cache, logits=put(state.logits, logits),
            lengths=state.lengths.at[s].set(jnp.sum(mask).astype(jnp.int32)),
            episode=state.episode.at[s].set(episode[i]), turn=state.turn.at[s].set(turn[i]),
            t=state.t.at[s].set(0), budget=state.budget.at[s].set(budget[i]),
            active=state.active.at[s].set(True),
            tokens=state.tokens.at[s].set(pad_token_id), mask=state.mask.at[s].set(0),
            logprobs=state.logprobs.at[s].set(0.0))

    slots = constrain(jax.lax.fori_loop(0, enter_count, enter, slots))

    def cond(carry):
        state, step = carry
        return (step < steps) & jnp.any(state.active)

    def body(carry):
        state, step = carry
        live = state.active & (state.t < state.budget)
        keys = jax.vmap(lambda e, n, t: jax.random.fold_in(jax.random.fold_in(
            jax.random.fold_in(rng, e), n), t))(state.episode, state.turn, state.t)
        token, logprob = jax.vmap(
            lambda key, row: _sample(key, row[None], temperature, top_k, top_p))(keys,
                                                                              state.logits)
        token = jnp.where(live, token[:, 0], pad_token_id).astype(jnp.int32)
        col = jnp.minimum(state.t, M - 1)
        rows = jnp.arange(S)
        write = jnp.where(live, col, M)  # out of range: dropped
        tokens = state.tokens.at[rows, write].set(token, mode="drop")
        mask = state.mask.at[rows, write].set(1, mode="drop")
        logprobs = state.logprobs.at[rows, write].set(logprob[:, 0], mode="drop")
        ended = ~live | (state.t + 1 >= state.budget)
        if eos_token_id is not None:
            ended = ended | (token == eos_token_id)
        hidden, cache = model.decode(token[:, None], (state.lengths + col)[:, None],
                                     state.cache, W - state.lengths, W + col)
        state = TurnSlots(cache, model.logits(hidden[:, 0]).astype(jnp.float32),
                          state.lengths, state.episode, state.turn, state.t + live,
                          state.budget, state.active & ~ended, tokens, mask, logprobs)
        return constrain(state), step + 1

    slots, _ = jax.lax.while_loop(cond, body, (slots, jnp.int32(0)))
    return slots
