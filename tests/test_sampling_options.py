"""Rollout options around the GRPO family's update: overlong handling (DAPO's soft punishment,
or cut responses masked out) and dynamic sampling (all-equal groups dropped, refilled from the
next prompts, bounded, counted)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_ppo_loop import CFG, TARGET, prompt_stream

from jrlhf import rl
from jrlhf.config import Config, GRPOConfig, PPOConfig, RolloutConfig, RunConfig

N = 8


def test_overlong_penalty_equals_dapo_definition():
    lengths = np.array([1, 4, 5, 6, 7, 8, 8])
    truncated = np.array([0, 0, 0, 0, 0, 0, 1], bool)
    got = rl.overlong_penalty(jnp.asarray(lengths), jnp.asarray(truncated), 8, 3, 0.5)
    # DAPO: 0 while |y| <= L_max − L_cache, then (L_max − L_cache − |y|) / L_cache, scaled
    # by the penalty; −penalty past L_max (here: cut without EOS).
    want = [-0.5 if cut else (0.0 if n <= 5 else 0.5 * (5 - n) / 3)
            for n, cut in zip(lengths, truncated)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    only_cut = rl.overlong_penalty(jnp.asarray(lengths), jnp.asarray(truncated), 8, 0, 1.0)
    np.testing.assert_allclose(only_cut, [0, 0, 0, 0, 0, 0, -1])  # no buffer: only the cut one


def loop_for(algorithm, rollout=None, grpo=None, reward_fn=None, more_prompts=None):
    from jrlhf.models import init_params
    from jrlhf.rollouts import Reward, RolloutLoop
    from jrlhf.setups import make_setup

    config = Config(ppo=PPOConfig(prompts_per_iteration=8, minibatch_size=8, epochs=1),
                    grpo=grpo or GRPOConfig(group_size=4, prompts_per_iteration=4),
                    rollout=rollout or RolloutConfig(max_new_tokens=N),
                    run=RunConfig(progress=False))
    setup = make_setup(algorithm, config, CFG, init_params(CFG, 0))
    seen, update = [], setup.step

    def step(state, batch):  # the update, recording the batch it is given
        seen.append({k: np.asarray(v) for k, v in batch.items()})
        return update(state, batch)

    setup = dataclasses.replace(setup, step=step)
    loop = RolloutLoop(setup, config, Reward(fn=reward_fn), eos_token_id=TARGET,
                       more_prompts=more_prompts)
    return loop, setup, seen


def count_target(_, prompt_ids, prompt_mask, response_ids, response_mask):
    return jnp.sum((response_ids == 5) & (response_mask > 0), axis=1).astype(jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["keep", "mask", "penalty"])
def test_cut_responses_are_kept_masked_or_penalised(mode):
    rollout = RolloutConfig(max_new_tokens=N, overlong=mode, overlong_buffer=2,
                            overlong_penalty=0.5)
    loop, setup, seen = loop_for("grpo", rollout, reward_fn=count_target)
    prompts = next(prompt_stream(4))
    _, metrics = loop(setup.state, prompts)
    batch = seen[0]
    lengths = batch["sampler_logprobs"].astype(bool).sum(1)  # the sampled lengths
    cut = (lengths == N) & (batch["input_ids"][:, -1] != TARGET)
    assert 0 < cut.sum() < len(cut)  # this prompt batch has both kinds
    np.testing.assert_allclose(metrics["truncated_share"], cut.mean())
    kept_rows = batch["response_mask"].sum(1) > 0
    raw = np.asarray(count_target(None, None, None, batch["input_ids"][:, -N:],
                                  batch["sampler_logprobs"] != 0))
    if mode == "mask":
        assert (kept_rows == ~cut).all()
        np.testing.assert_allclose(batch["scores"], raw)
    else:
        assert kept_rows.all()
        penalty = rl.overlong_penalty(jnp.asarray(lengths), jnp.asarray(cut), N, 2, 0.5)
        np.testing.assert_allclose(batch["scores"], raw + (np.asarray(penalty)
                                                            if mode == "penalty" else 0))


@pytest.mark.slow
def test_each_prompt_samples_up_to_its_own_budget_and_is_cut_against_it():
    """A prompt batch with `max_new_tokens [G]`: each group's rows stop at their prompt's
    budget; a row that used it without EOS is cut (truncated share, overlong penalty against
    that budget, not the buffer's width)."""
    rollout = RolloutConfig(max_new_tokens=N, overlong="penalty", overlong_buffer=2,
                            overlong_penalty=0.5)
    loop, setup, seen = loop_for("grpo", rollout, reward_fn=count_target)
    prompts = dict(next(prompt_stream(4)), max_new_tokens=np.array([3, 8, 5, 12]))
    _, metrics = loop(setup.state, prompts)
    batch = seen[0]
    budgets = np.repeat([3, 8, 5, 8], 4)
    lengths = batch["sampler_logprobs"].astype(bool).sum(1)
    assert (lengths <= budgets).all() and (lengths[:4] <= 3).all()
    assert (batch["sampler_logprobs"][:4, 3:] == 0).all()
    last = batch["input_ids"][np.arange(16), batch["input_ids"].shape[1] - N + lengths - 1]
    cut = (lengths == budgets) & (last != TARGET)
    assert cut[:4].any() and not cut.all()
    np.testing.assert_allclose(metrics["truncated_share"], cut.mean())
    raw = np.asarray(count_target(None, None, None, batch["input_ids"][:, -N:],
                                  batch["sampler_logprobs"] != 0))
    penalty = rl.overlong_penalty(jnp.asarray(lengths), jnp.asarray(cut),
                                  jnp.asarray(budgets), 2, 0.5)
    np.testing.assert_allclose(batch["scores"], raw + np.asarray(penalty), rtol=1e-6)


def test_row_budgets_equal_their_prompts_budgets_repeated_and_a_wrong_count_is_one_line():
    """`max_new_tokens [G·K]` (one per sampled row; the long-tail benchmark's) samples what
    the same budgets given per prompt do; rows of one group may differ."""
    loop, setup, seen = loop_for("grpo", RolloutConfig(max_new_tokens=N), reward_fn=count_target)
    prompts, states = next(prompt_stream(4)), [jax.tree.map(jnp.copy, setup.state)
                                               for _ in range(3)]  # each update donates one
    loop(states[0], dict(prompts, max_new_tokens=np.array([3, 8, 5, 2])))
    loop(states[1], dict(prompts, max_new_tokens=np.repeat([3, 8, 5, 2], 4)))
    jax.tree.map(np.testing.assert_array_equal, seen[0], seen[1])
    loop(states[2], dict(prompts, max_new_tokens=np.array([1, 2, 3, 4] * 4)))
    lengths = seen[2]["sampler_logprobs"].astype(bool).sum(1)
    assert (lengths <= np.array([1, 2, 3, 4] * 4)).all() and lengths[3] > lengths[0]
    with pytest.raises(ValueError, match=r"max_new_tokens has 5 entries: expected one per "
                                         r"prompt \(4\) or per sampled row \(16\)"):
        loop(setup.state, dict(prompts, max_new_tokens=np.arange(5)))  # refused before use


def prompt_parity(_, prompt_ids, prompt_mask, response_ids, response_mask):
    """Rewards only for prompts whose last token is odd: the even ones' groups are all 0."""
    odd = (prompt_ids[:, -1] % 2 == 1).astype(jnp.float32)
    return odd * count_target(_, prompt_ids, prompt_mask, response_ids, response_mask)


def test_dynamic_sampling_trains_only_on_groups_with_a_signal_and_refills_them():
    stream = prompt_stream(4, seed=1)  # each batch: two odd prompts, two even
    refills = prompt_stream(4, seed=4)
    pulled = []

    def more():
        for batch in refills:
            pulled.append(batch)
            yield batch

    grpo = GRPOConfig(group_size=4, prompts_per_iteration=4, dynamic_sampling=True,
                      max_refills=5)
    loop, setup, seen = loop_for("grpo", grpo=grpo, reward_fn=prompt_parity,
                                 more_prompts=more())
    state = setup.state
    for _ in range(2):
        state, metrics = loop(state, next(stream))
        batch = seen[-1]
        groups = batch["scores"].reshape(-1, 4)
        real = batch["response_mask"].reshape(4, -1).sum(1) > 0
        # Every group the update trains on has a learning signal; fillers are masked out.
        assert all(g.max() > g.min() for g, r in zip(groups, real) if r)
        assert metrics["dynamic/dropped_groups"] > 0
        assert metrics["dynamic/filler_groups"] == (~real).sum()
        assert metrics["dynamic/refills"] <= 5
    assert len(pulled) > 0 and all(m.shape == (4, 4) for m in [b["input_ids"] for b in pulled])


def test_dynamic_sampling_never_loops_forever():
    """A reward that is the same for every response: every group is dropped, the refills stop
    at the bound, and the update sees only masked-out filler groups."""
    constant = lambda *args: jnp.zeros(args[1].shape[0], jnp.float32)  # noqa: E731
    grpo = GRPOConfig(group_size=4, prompts_per_iteration=4, dynamic_sampling=True,
                      max_refills=2)
    loop, setup, seen = loop_for("grpo", grpo=grpo, reward_fn=constant,
                                 more_prompts=prompt_stream(4, seed=5))
    _, metrics = loop(setup.state, next(prompt_stream(4)))
    assert metrics["dynamic/refills"] == 2 and metrics["dynamic/dropped_groups"] == 12
    assert metrics["dynamic/filler_groups"] == 4 and metrics["dynamic/dropped_share"] == 1
    assert seen[0]["response_mask"].sum() == 0
    assert metrics["grpo/loss"] == 0


def test_a_grpo_stage_refills_from_its_own_prompt_batches():
    """Through `loops.train`: the refills come from the stage's prompt iterator (so a
    checkpoint's iterator position covers them), one batch per refill round."""
    from jrlhf.loops import train
    from jrlhf.models import init_params
    from jrlhf.rollouts import Reward
    from jrlhf.setups import make_setup

    config = Config(grpo=GRPOConfig(group_size=4, prompts_per_iteration=4, iterations=2,
                                    dynamic_sampling=True, max_refills=3),
                    rollout=RolloutConfig(max_new_tokens=N), run=RunConfig(progress=False))
    setup = make_setup("grpo", config, CFG, init_params(CFG, 0))
    taken = []

    def prompts():
        for batch in prompt_stream(4, seed=1):
            taken.append(batch)
            yield batch

    result = train(setup, config, prompts(), reward=Reward(fn=prompt_parity),
                   eos_token_id=None, log=None)
    refills = sum(m["dynamic/refills"] for m in result.history)
    assert len(result.history) == 2 and refills > 0
    assert len(taken) == 2 + refills
