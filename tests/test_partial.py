"""Partial rollouts on device (`continuous.generate_partial`): a call stops once enough groups
have ended, the next call resumes the rows left mid-response (prefilled under the weights it is
given) — chained to the end they give the uninterrupted run's tokens; a resumed row's sampler
log-probs are those of the weights that drew each token."""

import dataclasses

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


@pytest.mark.parametrize("name", [n if n == "llama" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in CONFIGS])
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


@pytest.mark.slow
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


# ---------------------------------------------------------------------------------------------
# The rollout loop with partial rollouts (`rollout.max_staleness`).

BUDGETS_PER_PROMPT = np.array([8, 2, 6, 3])


class PromptStream:
    """Prompt batches of 4 with per-prompt budgets, resumable (`get_state` / `set_state`)."""

    def __init__(self, budgets=BUDGETS_PER_PROMPT):
        self.i, self.budgets = 0, np.asarray(budgets)

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.RandomState(self.i)
        self.i += 1
        ids = rng.randint(4, 16, (4, 4)).astype(np.int32)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids),
                "max_new_tokens": np.roll(self.budgets, self.i)}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


def partial_config(iterations=4, out_dir="runs/partial", **rollout):
    from jrlhf.config import Config, DataConfig, GRPOConfig, RolloutConfig, RunConfig

    rollout = dict(dict(max_new_tokens=8, slots=8, max_staleness=2), **rollout)
    return Config(grpo=GRPOConfig(group_size=4, prompts_per_iteration=4, iterations=iterations,
                                  tis_cap=2.0, learning_rate=1e-2),
                  rollout=RolloutConfig(**rollout), data=DataConfig(max_prompt_length=4),
                  run=RunConfig(progress=False, out_dir=out_dir, save_every=1,
                                allow_changed=("grpo.iterations",)))


def train_partial(config, out_dir=None, resume=False, budgets=BUDGETS_PER_PROMPT, eos=5):
    from test_ppo_loop import CFG, count_target

    from jrlhf.loops import train
    from jrlhf.rollouts import Reward
    from jrlhf.setups import make_setup

    setup = make_setup("grpo", config, CFG, init_params(CFG, 0))
    return train(setup, config, PromptStream(budgets), reward=Reward(fn=count_target),
                 eos_token_id=eos, out_dir=out_dir, resume=resume, log=None)


@pytest.mark.slow
def test_partial_rollouts_carry_groups_and_train_on_tokens_of_older_versions():
    result = train_partial(partial_config(iterations=5))
    history = result.history
    lags = [m["partial/version_lag_max"] for m in history]
    assert max(m["partial/carried_in_progress"] for m in history) > 0
    assert 0 < max(lags) <= 2  # trained on tokens of earlier versions, never staler than 2
    assert all(m["partial/carried_groups"] <= 12 for m in history)  # the pool: (k + 1)·G
    # The behaviour log-probs differ from the updated policy's once tokens are stale.
    assert max(m["mismatch/gap_max"] for m in history if m["partial/version_lag_max"] > 0) > 1e-3
    # Slots stay busy: each call stops as soon as 4 groups end, with the queue not drained.
    assert np.mean([m["partial/slot_utilisation"] for m in history[1:]]) > 0.85
    pool = result.state.rl.pool
    assert int(np.asarray(pool.occupied).sum()) == history[-1]["partial/carried_groups"]
    assert int(result.state.rl.iteration) == 5


@pytest.mark.slow
def test_stale_groups_are_dropped_and_counted():
    """One prompt of each batch needs 32 tokens, the others 1 (no EOS): an iteration ends
    within a few steps, so a long group started at iteration i still runs at i + 2 and, with
    max_staleness 1, is dropped then; nothing trained is staler than 1."""
    config = partial_config(iterations=6, max_staleness=1, max_new_tokens=32, slots=16)
    history = train_partial(config, budgets=[32, 1, 1, 1], eos=None).history
    assert sum(m["partial/dropped_groups"] for m in history) >= 2
    assert max(m["partial/version_lag_max"] for m in history) == 1


@pytest.mark.slow
def test_a_partial_rollout_run_preempted_and_resumed_equals_an_uninterrupted_one(tmp_path):
    """The carried groups (mid-response rows, versions, behaviour log-probs) are in the
    checkpoint: a run stopped after 2 iterations and resumed to 4 is byte-identical."""
    full = train_partial(partial_config(4, str(tmp_path / "a")), tmp_path / "a")
    train_partial(partial_config(2, str(tmp_path / "b")), tmp_path / "b")
    resumed = train_partial(partial_config(4, str(tmp_path / "b")), tmp_path / "b", resume=True)
    assert len(resumed.history) == 2
    assert full.history[1]["partial/carried_in_progress"] > 0  # the checkpoint held some
    jax.tree.map(np.testing.assert_array_equal, resumed.state.params, full.state.params)
    jax.tree.map(np.testing.assert_array_equal, resumed.state.rl, full.state.rl)
    def untimed(history):
        return [{k: v for k, v in m.items() if not k.startswith(("time/", "tokens_per_s/"))}
                for m in history]

    assert untimed(resumed.history) == untimed(full.history[2:])


def test_the_pool_keeps_rows_waiting_for_the_slots_and_never_overflows():
    from jrlhf.partial import batches_to_draw, pool_groups

    assert pool_groups(16, 4, 64) == 64  # rows per batch 64: k = 1 + 2 → (k + 1)·16
    assert pool_groups(4, 4, 8) == 12 and pool_groups(4, 8, 1) == 12
    assert pool_groups(4, 4, 40) == 28  # ⌈80 / 16⌉ = 5
    assert [batches_to_draw(n, 64, 16) for n in (0, 15, 16, 30, 48)] == [4, 3, 3, 2, 1]
    occupied = 0  # drawing, training G, dropping some and carrying the rest stays within C
    for dropped in (0, 3, 16, 0, 7, 0):
        real = occupied + batches_to_draw(occupied, 64, 16) * 16
        assert 16 <= real <= 64
        occupied = max(real - 16 - dropped, 0)
    assert occupied == 38  # 48, 45, 29, 45, 38, 38 by hand


def test_partial_rollouts_refuse_what_they_cannot_do():
    from jrlhf.config import RolloutConfig

    with pytest.raises(ValueError, match=r"rollout.max_staleness=2 needs continuous batching"):
        RolloutConfig(max_staleness=2)
    with pytest.raises(ValueError, match=r"rollout.max_staleness=-1 is out of range"):
        RolloutConfig(max_staleness=-1, slots=2)
    config = partial_config()
    no_tis = dataclasses.replace(config, grpo=dataclasses.replace(config.grpo, tis_cap=0.0))
    with pytest.raises(ValueError, match=r"older policy versions.*set grpo.tis_cap"):
        train_partial(no_tis)
    dynamic = dataclasses.replace(config, grpo=dataclasses.replace(config.grpo,
                                                                   dynamic_sampling=True))
    with pytest.raises(ValueError, match=r"with dynamic sampling: the two do not combine"):
        train_partial(dynamic)


@pytest.mark.slow
def test_partial_rollouts_on_a_2x2x2_mesh_train_on_the_one_device_rows():
    """The partial sampler's slots split over a (data 2, fsdp 2, tensor 2) mesh: two
    iterations (the second resuming carried rows) train on the rows one device samples."""
    from test_ppo_loop import CFG, count_target

    from jrlhf import sharding
    from jrlhf.config import MeshConfig
    from jrlhf.rollouts import Reward, RolloutLoop
    from jrlhf.setups import make_setup

    def batches(mesh):
        config = partial_config(iterations=2)
        setup = make_setup("grpo", config, CFG, init_params(CFG, 0), mesh=mesh)
        seen, update = [], setup.step

        def step(state, batch):
            seen.append({k: sharding.to_host(v) for k, v in batch.items()})
            return update(state, batch)

        stream = PromptStream()
        loop = RolloutLoop(dataclasses.replace(setup, step=step), config,
                           Reward(fn=count_target), eos_token_id=5, more_prompts=stream)
        state, first = loop(setup.state, next(stream))
        _, second = loop(state, next(stream))
        assert second["partial/version_lag_max"] == 1  # carried rows were resumed
        return seen

    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    for sharded, single in zip(batches(mesh), batches(None)):
        np.testing.assert_array_equal(sharded["input_ids"], single["input_ids"])
        np.testing.assert_allclose(sharded["sampler_logprobs"], single["sampler_logprobs"],
                                   atol=1e-5)
