"""Rewards as plug-ins: a reward model, host functions over decoded (prompt, response) texts and
weighted sums of them, through one interface; a failing or NaN reward is an error naming the
prompt, never swallowed."""

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from test_ppo_loop import CFG, TARGET, prompt_stream

from jrlhf.config import Config, GRPOConfig, RewardConfig, RolloutConfig, RunConfig
from jrlhf.rewards import Reward, RewardError, import_host_reward

N = 6
ROOT = Path(__file__).parent.parent


def decode(tokens, mask):
    """Texts of token ids: "t1 t2 ..." of the unmasked positions."""
    return [" ".join(str(int(t)) for t, m in zip(row, mrow) if m)
            for row, mrow in zip(np.asarray(tokens), np.asarray(mask))]


def count_target(_, prompt_ids, prompt_mask, response_ids, response_mask):
    return jnp.sum((response_ids == TARGET) & (response_mask > 0), axis=1).astype(jnp.float32)


def length_of_text(prompts, responses):
    """A host reward: the number of tokens in the decoded response."""
    return [float(len(r.split())) for r in responses]


def nan_for_prompts_ending_in_7(prompts, responses):
    return [float("nan") if p.split()[-1] == "7" else 1.0 for p in prompts]


def raises_for_prompts_ending_in_7(prompts, responses):
    for p in prompts:
        if p.split()[-1] == "7":
            raise ZeroDivisionError("no answer")
    return [0.0] * len(prompts)


def make_loop(reward):
    from jrlhf.models import init_params
    from jrlhf.rollouts import RolloutLoop
    from jrlhf.setups import make_setup

    config = Config(grpo=GRPOConfig(group_size=2, prompts_per_iteration=4),
                    rollout=RolloutConfig(max_new_tokens=N), run=RunConfig(progress=False))
    setup = make_setup("grpo", config, CFG, init_params(CFG, 0))
    return RolloutLoop(setup, config, reward, eos_token_id=None), setup


def test_a_weighted_sum_of_a_device_and_a_host_reward():
    model_like = Reward(fn=count_target, name="count")
    host = Reward.host(length_of_text, decode)
    mixed = Reward.weighted([(2.0, model_like), (-0.5, host)])
    assert mixed.name == "2·count + -0.5·length_of_text"
    rng = np.random.RandomState(0)
    ids, mask = rng.randint(4, 16, (5, 3)), np.ones((5, 3), np.int32)
    tokens = rng.randint(0, 16, (5, N))
    tmask = (np.arange(N)[None] < np.array([6, 1, 0, 3, 5])[:, None]).astype(np.int32)
    want = 2.0 * ((tokens == TARGET) & (tmask > 0)).sum(1) - 0.5 * tmask.sum(1)
    np.testing.assert_allclose(mixed.scores(ids, mask, tokens, tmask), want, rtol=1e-6)
    # In a rollout: the device part is computed inside the scoring call, the host part beside
    # it, and the step trains on their sum.
    loop, setup = make_loop(mixed)
    seen = []

    def record(state, batch):  # the update's input, instead of an update
        seen.append(batch)
        return state, {}

    loop.setup = dataclasses.replace(setup, step=record)
    loop(setup.state, next(prompt_stream(4)))
    batch = seen[0]
    resp = np.asarray(batch["input_ids"])[:, -N:]
    rmask = np.asarray(batch["response_mask"])
    want = 2.0 * ((resp == TARGET) & (rmask > 0)).sum(1) - 0.5 * rmask.sum(1)
    np.testing.assert_allclose(batch["scores"], want, rtol=1e-6)


@pytest.mark.parametrize("fn, message", [
    (nan_for_prompts_ending_in_7, r"returned nan for prompt '[0-9 ]*7'"),
    (raises_for_prompts_ending_in_7, r"raised ZeroDivisionError: no answer \(prompt '[0-9 ]*7'"),
])
def test_a_failing_reward_names_the_prompt(fn, message):
    reward = Reward.host(fn, decode)
    prompts = next(prompt_stream(16, seed=0))
    assert (prompts["input_ids"][:, -1] == 7).any()
    loop, setup = make_loop(reward)
    with pytest.raises(RewardError, match=rf"reward '{fn.__name__}' {message}"):
        loop(setup.state, prompts)


def test_a_non_finite_device_reward_is_an_error_too():
    def inf_reward(_, prompt_ids, *args):
        return jnp.where(prompt_ids[:, -1] == 7, jnp.inf, 0.0)

    prompts = next(prompt_stream(16, seed=0))
    loop, setup = make_loop(Reward(fn=inf_reward, name="inf"))
    with pytest.raises(RewardError, match=r"reward 'inf' returned inf for row \d+"):
        loop(setup.state, prompts)


def test_reward_functions_config_and_import():
    from jrlhf.config import parse_reward_functions

    assert parse_reward_functions("model, annotator=0.5,test_rewards:length_of_text=-1") == [
        ("model", 1.0), ("annotator", 0.5), ("test_rewards:length_of_text", -1.0)]
    with pytest.raises(ValueError, match="reward.functions: weight 'x' of 'model' is not a num"):
        RewardConfig(functions="model=x")
    with pytest.raises(ValueError, match="'lenght' is not model, annotator or a"):
        RewardConfig(functions="lenght")
    reward = import_host_reward("test_rewards:length_of_text", decode)
    assert reward.name == "test_rewards:length_of_text"
    np.testing.assert_array_equal(reward.host_scores(["p"], ["a b c"]), [3.0])
    with pytest.raises(ValueError, match="'no_such_mod:f' cannot be imported"):
        import_host_reward("no_such_mod:f", decode)


@pytest.mark.slow
def test_a_failing_reward_function_from_the_config_is_one_line_exit_2(tmp_path, capfd):
    """`--set reward.functions=test_rewards:all_nan`: the GRPO stage imports the function and
    stops at its first NaN in one line naming the reward and prompt (exit 2)."""
    from jrlhf.cli import main

    assert main(["grpo", "--config", str(ROOT / "configs" / "grpo_tiny.py"), "--set",
                 "grpo.iterations=1", "--set", f"run.out_dir={tmp_path}", "--set",
                 "reward.functions=annotator=1,test_rewards:all_nan=0.1"]) == 2
    err = capfd.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("jrlhf grpo: error: reward 'test_rewards:all_nan' returned nan for "
                          "prompt '"), err


def all_nan(prompts, responses):
    return [float("nan")] * len(prompts)



def test_a_reward_model_scores_like_its_forward():
    """`Reward.from_model(...).scores` (the ranking / evaluation path) equals the reward
    model's scalar head at each row's last real token."""
    from jrlhf.models import init_params, reward_scores
    from jrlhf.setups import with_scalar_head

    rm_cfg, rm_params = with_scalar_head(CFG, init_params(CFG, 1))
    rm_params["score"]["kernel"] = jnp.asarray(
        np.random.RandomState(3).randn(CFG.hidden_size, 1).astype(np.float32))
    reward = Reward.weighted([(0.5, Reward.from_model(rm_cfg, rm_params))])
    rng = np.random.RandomState(2)
    ids, mask = rng.randint(4, 16, (3, 4)), np.ones((3, 4), np.int32)
    tokens, tmask = rng.randint(4, 16, (3, N)), np.ones((3, N), np.int32)
    tmask[1, 3:] = 0
    want = 0.5 * np.asarray(reward_scores(rm_cfg, rm_params, np.concatenate([ids, tokens], 1),
                                          np.concatenate([mask, tmask], 1)))
    assert np.abs(want).min() > 1e-3  # a head that scores
    np.testing.assert_allclose(reward.scores(ids, mask, tokens, tmask), want, rtol=1e-5)
