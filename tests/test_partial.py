"""Partial rollouts on device (`continuous.generate_partial`): a call stops once enough groups
have ended, the next call resumes the rows left mid-response (prefilled under the weights it is
given) — chained to the end they give the uninterrupted run's tokens; a resumed row's sampler
log-probs are those of the weights that drew each token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrlhf import rl
from jrlhf.continuous import Resumption, generate_continuous, generate_partial
from jrlhf.models import forward, init_params
from test_continuous import CONFIGS, LLAMA, prompts

K, N = 2, 9
BUDGETS = jnp.asarray([7, 2, 9, 0, 4, 9, 1, 5, 9, 3, 6, 8])  # one per output row


def fresh(Q):
    return Resumption(np.zeros((Q, N), np.int32), np.zeros((Q, N), np.float32),
                      np.zeros(Q, np.int32), np.zeros(Q, bool))


def resume_from(gen, finished) -> Resumption:
    mask = np.asarray(gen.mask)
    return Resumption(np.asarray(gen.tokens), np.asarray(gen.logprobs), mask.sum(1).astype(
        np.int32), np.asarray(finished))


def groups_done(finished):
    return np.asarray(finished).reshape(-1, K).all(1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_calls_chained_to_the_end_equal_one_uninterrupted_call(name):
    cfg = CONFIGS[name]
    params = init_params(cfg, 0)
    ids, mask = prompts()
    G = ids.shape[0]
    kwargs = dict(max_new_tokens=N, temperature=0.0, eos_token_id=7, pad_token_id=0,
                  num_samples=K, budgets=BUDGETS, slots=3)
    whole = generate_continuous(cfg, params, ids, mask, jax.random.key(0), **kwargs)
    state, calls, resumed_rows = fresh(G * K), 0, 0
    real = jnp.ones((G,), bool)
    while not state.finished.all():
        before = groups_done(state.finished).sum()
        gen, finished = generate_partial(cfg, params, ids, mask, jax.random.key(calls), state,
                                         real, before + 1, **kwargs)
        after = groups_done(finished)
        # It stopped at the step where one more group ended (or the queue drained).
        assert after.sum() >= before + 1
        in_progress = (np.asarray(gen.mask).sum(1) > 0) & ~np.asarray(finished)
        assert in_progress.sum() <= 3
        resumed_rows += int(in_progress.sum())
        # Rows finished before are left as they were.
        np.testing.assert_array_equal(np.asarray(gen.tokens)[state.finished],
                                      state.tokens[state.finished])
        state, calls = resume_from(gen, finished), calls + 1
    assert calls > 2 and resumed_rows > 0  # rows were carried across calls mid-response
    np.testing.assert_array_equal(state.tokens, np.asarray(whole.tokens))
    np.testing.assert_array_equal(state.lengths, np.asarray(whole.mask).sum(1))
    np.testing.assert_allclose(state.logprobs, np.asarray(whole.logprobs), atol=1e-5)


def test_a_resumed_row_keeps_each_tokens_sampler_logprob_under_the_weights_that_drew_it():
    """Tokens drawn under weights A keep A's log-probs; the rest are B's, and B's cache of the
    whole prefix is recomputed (its log-probs equal B's forward over the full sequence)."""
    params_a, params_b = init_params(LLAMA, 1), init_params(LLAMA, 2)
    ids, mask = prompts(G=4, seed=2)
    Q = ids.shape[0] * K
    kwargs = dict(max_new_tokens=N, temperature=0.9, pad_token_id=0, num_samples=K, slots=4,
                  budgets=jnp.asarray([3, 9, 9, 9, 9, 9, 9, 9]))
    real = jnp.ones((4,), bool)
    gen_a, fin_a = generate_partial(LLAMA, params_a, ids, mask, jax.random.key(3), fresh(Q),
                                    real, 1, **kwargs)
    lengths_a = np.asarray(gen_a.mask).sum(1)
    carried = (lengths_a > 0) & ~np.asarray(fin_a)
    assert carried.any() and not np.asarray(fin_a).all()
    gen_b, fin_b = generate_partial(LLAMA, params_b, ids, mask, jax.random.key(4),
                                    resume_from(gen_a, fin_a), real, 4, **kwargs)
    assert np.asarray(fin_b).all()
    full_ids = jnp.concatenate([jnp.repeat(ids, K, 0), gen_b.tokens], 1)
    full_mask = jnp.concatenate([jnp.repeat(mask, K, 0), gen_b.mask], 1)

    def trainer(params):
        logits = forward(LLAMA, params, full_ids, full_mask)[:, -N - 1:-1] / 0.9
        return np.asarray(rl.logprobs_from_logits(logits, gen_b.tokens) * gen_b.mask)

    by_a = np.arange(N)[None] < lengths_a[:, None]  # the tokens A drew
    np.testing.assert_array_equal(np.asarray(gen_b.tokens)[by_a], np.asarray(gen_a.tokens)[by_a])
    expected = np.where(by_a, trainer(params_a), trainer(params_b))
    np.testing.assert_allclose(np.asarray(gen_b.logprobs), expected, atol=1e-5)
    assert (np.asarray(gen_b.mask) * ~by_a)[carried].sum() > 0  # B extended carried rows


def test_groups_that_are_not_real_never_count_and_finished_rows_are_not_decoded():
    params = init_params(LLAMA, 0)
    ids, mask = prompts(G=4)
    Q = 4 * K
    state = fresh(Q)._replace(finished=np.array([1, 1, 0, 0, 0, 0, 1, 1], bool))
    real = jnp.asarray([True, True, True, False])  # group 3: an empty entry, its rows finished
    gen, finished = generate_partial(LLAMA, params, ids, mask, jax.random.key(0), state, real,
                                     3, max_new_tokens=N, temperature=1.0, pad_token_id=0,
                                     num_samples=K, slots=2)
    assert np.asarray(finished).all()
    mask_out = np.asarray(gen.mask)
    assert mask_out[[0, 1, 6, 7]].sum() == 0 and mask_out[2:6].sum(1).tolist() == [N] * 4
