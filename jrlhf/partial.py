"""Partial rollouts' host bookkeeping (`rollout.max_staleness > 0`), as pure NumPy functions.

The pool carries up to C groups between iterations (C = `pool_groups(...)`: enough groups in
flight that the slots still have rows to start when an iteration's G groups end). An
iteration's queue is the pool's C entries followed by C entries for new prompt batches (as many
batches as keep C groups in flight; the rest empty), the same shape every iteration so the
sampler (`continuous.generate_partial`) compiles once. The sampler stops once G real groups have
ended; `settle` picks those to train on (oldest first) and the rest stay in flight
(`next_pool`). Each generated token carries the iteration (policy version) that drew it and,
with routing replay, the experts it was routed to then (`RolloutPool.experts`).

Shapes: K rows per group, N = `rollout.max_new_tokens`, P the prompt width; a group's rows
are consecutive (group g: rows gK .. gK+K−1), as everywhere in the rollout code.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jrlhf.continuous import Resumption
from jrlhf.state import RolloutPool


def pool_groups(groups: int, group_size: int, slots: int) -> int:
    """The pool's capacity C for G = `groups` prompts of `group_size` samples per iteration and
    `slots` decode slots: (k + 1)·G with k = 1 + ⌈2·slots / rows per batch⌉, so after an
    iteration trains its G groups k·G stay in flight — at least 2·slots rows more than a batch
    holds — and the next iteration ends while unstarted rows still wait for slots."""
    rows = groups * group_size
    return (2 + -(-2 * slots // rows)) * groups


def batches_to_draw(occupied: int, capacity: int, groups: int) -> int:
    """New prompt batches of `groups` for an iteration whose pool holds `occupied` groups: at
    least one (the iteration's own), then as many as keep at most `capacity` in flight."""
    return max(1, (capacity - occupied) // groups)


class Queue(NamedTuple):
    """One iteration's groups: the pool's C, then C entries for new prompts (`Q = 2C`)."""

    prompt_ids: np.ndarray  # [Q, P]
    prompt_mask: np.ndarray  # [Q, P] (an empty entry has one real token: finite prefill)
    budgets: np.ndarray  # [Q·K] int32
    real: np.ndarray  # [Q] bool: the entry holds a group
    born: np.ndarray  # [Q] int32: the iteration its prompt was taken in
    versions: np.ndarray  # [Q·K, N] int32: the version that drew each token so far
    resumed: Resumption  # what the rows have so far


def stale_groups(pool: RolloutPool, iteration: int, max_staleness: int) -> np.ndarray:
    """`[C]` bool: pool groups holding a token drawn more than `max_staleness` versions before
    `iteration` (trained now or later, it would be staler than allowed)."""
    C = len(pool.occupied)
    N = pool.tokens.shape[1]
    generated = np.arange(N)[None] < pool.lengths[:, None]
    oldest = np.where(generated, pool.versions, iteration).min(1).reshape(C, -1).min(1)
    return pool.occupied & (oldest < iteration - max_staleness)


def build_queue(pool: RolloutPool, occupied: np.ndarray, new: list, iteration: int) -> Queue:
    """The queue of the pool's `occupied [C]` groups and `new`, a list of prompt batches
    `(ids [G, P'], mask [G, P'], row budgets [G·K])` (P' ≤ P: left-padded to P; at most C
    groups in all)."""
    C, P = pool.prompt_ids.shape
    K, N = len(pool.budgets) // C, pool.tokens.shape[1]
    drawn = sum(len(b[0]) for b in new)
    empty = np.zeros((C - drawn, P), np.int32)
    ids, mask = (np.concatenate([np.pad(b[i], ((0, 0), (P - b[i].shape[1], 0))) for b in new]
                                + [empty]) for i in (0, 1))
    budgets = np.concatenate([b[2] for b in new] + [np.zeros(len(empty) * K, np.int32)])
    real = np.concatenate([occupied, np.arange(C) < drawn])
    prompt_mask = np.concatenate([pool.prompt_mask, mask]).astype(np.int32)
    prompt_mask[~real, -1] = 1
    rows_real = np.repeat(real, K)
    zeros = np.zeros((C * K, N))
    experts = None
    if pool.experts is not None:  # new entries' rows have recorded nothing yet
        experts = np.concatenate([pool.experts, np.zeros_like(pool.experts)]).astype(np.int32)
    resumed = Resumption(
        np.concatenate([pool.tokens, zeros]).astype(np.int32),
        np.concatenate([pool.logprobs, zeros]).astype(np.float32),
        np.where(rows_real, np.concatenate([pool.lengths, zeros[:, 0]]), 0).astype(np.int32),
        ~rows_real | np.concatenate([pool.finished, np.zeros(C * K, bool)]), experts)
    return Queue(np.concatenate([pool.prompt_ids, ids]).astype(np.int32), prompt_mask,
                 np.concatenate([pool.budgets, budgets]).astype(np.int32), real,
                 np.concatenate([pool.born, np.full(C, iteration, np.int32)]),
                 np.concatenate([pool.versions, zeros]).astype(np.int32), resumed)


class Settled(NamedTuple):
    chosen: np.ndarray  # [G] queue groups to train on, oldest first
    carried: np.ndarray  # the other real groups, in queue order
    versions: np.ndarray  # [Q·K, N] with this call's tokens tagged
    drawn_now: np.ndarray  # [Q·K, N] bool: tokens this call drew


def settle(queue: Queue, mask: np.ndarray, finished: np.ndarray, iteration: int,
           groups: int) -> Settled:
    """After the sampler: tag the tokens it drew (`mask [Q·K, N]` past each row's resumed
    length) with `iteration`, and pick the first `groups` ended real groups by age (born, then
    queue order) to train on."""
    K = len(finished) // len(queue.real)
    N = mask.shape[1]
    drawn_now = (mask > 0) & ~(np.arange(N)[None] < queue.resumed.lengths[:, None])
    versions = np.where(drawn_now, iteration, queue.versions).astype(np.int32)
    ended = finished.reshape(-1, K).all(1) & queue.real
    by_age = sorted(np.flatnonzero(ended), key=lambda g: (queue.born[g], g))
    chosen = np.asarray(by_age[:groups], int)
    return Settled(chosen, np.setdiff1d(np.flatnonzero(queue.real), chosen), versions,
                   drawn_now)


def group_rows(groups: np.ndarray, K: int) -> np.ndarray:
    """The rows of `groups`, group by group."""
    return (np.asarray(groups, int)[:, None] * K + np.arange(K)).ravel()


def next_pool(capacity: int, queue: Queue, settled: Settled, tokens, logprobs, lengths,
              finished, experts=None) -> dict[str, np.ndarray]:
    """The next pool's fields (`RolloutPool`'s, NumPy) from the sampler's `tokens, logprobs
    [Q·K, N]`, `lengths, finished [Q·K]` and (routing replay) `experts [Q·K, P + N, L_sparse,
    k]`: the carried groups in queue order, then empty entries up to `capacity`."""
    K = len(finished) // len(queue.real)
    carried = settled.carried
    rows = group_rows(carried, K)

    def filled(values, entries, per_group: bool):
        out = np.zeros((capacity * (1 if per_group else K),) + values.shape[1:], values.dtype)
        out[:len(entries)] = values[entries]
        return out

    fields = {} if experts is None else {"experts": filled(experts, rows, False)}
    return dict(prompt_ids=filled(queue.prompt_ids, carried, True),
                prompt_mask=filled(queue.prompt_mask, carried, True),
                budgets=filled(queue.budgets, rows, False), tokens=filled(tokens, rows, False),
                logprobs=filled(logprobs, rows, False),
                versions=filled(settled.versions, rows, False),
                lengths=filled(lengths, rows, False),
                finished=filled(finished, rows, False),
                occupied=np.arange(capacity) < len(carried),
                born=filled(queue.born, carried, True), **fields)
