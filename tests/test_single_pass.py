"""A single-pass GRPO update (one epoch, one minibatch) takes the pre-update log-probs from its
own forward, so the rollout scores the policy once: same update, same metrics, one forward
fewer."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrlhf import models
from jrlhf.config import Config, GRPOConfig, RolloutConfig, RunConfig
from jrlhf.models import init_params
from jrlhf.steps import make_grpo_step
from jrlhf.steps.grpo import single_pass
from test_preference import CFG, group_rollout
from test_steps import OPT_EQ, make_state


def scored_and_single_pass_batches(params, temperature=0.8):
    """The same rollout twice: as the scoring forward gives it (`logprobs`, `entropy`) and as a
    single-pass update takes it (neither); both with sampler log-probs off by a little."""
    scored = group_rollout(params, temperature=temperature)
    mask = scored["response_mask"]
    out = models.token_outputs(CFG, params, jnp.asarray(scored["input_ids"]),
                               jnp.asarray(scored["attention_mask"]), last=mask.shape[1],
                               temperature=temperature, with_entropy=True)
    noise = np.random.RandomState(3).randn(*mask.shape).astype(np.float32)
    scored["sampler_logprobs"] = (scored["logprobs"] + 0.3 * noise) * mask
    scored["ref_logprobs"] = (scored["logprobs"] - 0.05) * mask
    scored["entropy"] = np.asarray(out.entropy) * mask
    single = {k: v for k, v in scored.items() if k not in ("logprobs", "entropy")}
    return scored, single


@pytest.mark.parametrize("tis_cap", [0.0, 1.5])
def test_a_single_pass_update_equals_the_update_on_the_scored_batch(tis_cap):
    params = init_params(CFG, 0)
    scored, single = scored_and_single_pass_batches(params)
    cfg = GRPOConfig(group_size=4, tis_cap=tis_cap)
    assert single_pass(cfg, 16)
    step = make_grpo_step(CFG, cfg)
    a, ma = step(make_state(params, OPT_EQ)[0], scored)
    b, mb = step(make_state(params, OPT_EQ)[0], single)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=0),
                 a.params, b.params)
    assert set(ma) == set(mb)
    for key in ma:
        # The own forward's ratio is exactly 1; the scored one's within float32 rounding.
        np.testing.assert_allclose(mb[key], ma[key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert float(mb["mismatch/gap_mean"]) > 0.1  # measured, not zero
    assert (float(mb.get("mismatch/tis_capped", 0.0)) > 0) == (tis_cap > 0)
    assert float(mb["grpo/entropy"]) > 0


def test_only_a_single_pass_update_takes_a_batch_without_logprobs():
    params = init_params(CFG, 0)
    _, single = scored_and_single_pass_batches(params)
    for cfg in (GRPOConfig(group_size=4, epochs=2), GRPOConfig(group_size=4, minibatch_size=8),
                GRPOConfig(group_size=4, grad_accum_steps=2)):
        assert not single_pass(cfg, 16)
        with pytest.raises(ValueError, match=r"no pre-update logprobs.*grpo\.epochs=1"):
            make_grpo_step(CFG, cfg)(make_state(params, OPT_EQ)[0], single)


@pytest.mark.slow
def test_a_grpo_iteration_scores_the_policy_once_and_updates_as_if_it_scored_it():
    """The rollout loop of a single-pass GRPO skips the policy's scoring forward, and its
    iteration equals one that scores it; a multi-pass GRPO scores it."""
    from test_ppo_loop import count_target, prompt_stream

    from jrlhf.rollouts import Reward, RolloutLoop
    from jrlhf.setups import make_setup

    config = Config(grpo=GRPOConfig(group_size=4, prompts_per_iteration=4),
                    rollout=RolloutConfig(max_new_tokens=8), run=RunConfig(progress=False))
    results = {}
    for score_policy in (False, True):
        setup = make_setup("grpo", config, CFG, init_params(CFG, 0))
        loop = RolloutLoop(setup, config, Reward(fn=count_target), eos_token_id=None)
        assert loop.spec.score_policy is False  # the default GRPO update is a single pass
        if score_policy:
            loop = RolloutLoop(setup, config, Reward(fn=count_target), eos_token_id=None,
                               spec=dataclasses.replace(loop.spec, score_policy=True,
                                                        with_entropy=True))
        state, metrics = loop(setup.state, next(prompt_stream(4)))
        results[score_policy] = (state, metrics)
    (own, m_own), (scored, m_scored) = results[False], results[True]
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=0),
                 own.params, scored.params)
    for key in ("grpo/policy_loss", "grpo/kl", "grpo/entropy", "score/mean"):
        np.testing.assert_allclose(m_own[key], m_scored[key], rtol=1e-4, atol=1e-6,
                                   err_msg=key)
    assert m_own["mismatch/gap_max"] < 1e-5 and m_scored["mismatch/gap_max"] < 1e-5
    multi = dataclasses.replace(config, grpo=dataclasses.replace(config.grpo, epochs=2))
    setup = make_setup("grpo", multi, CFG, init_params(CFG, 0))
    assert RolloutLoop(setup, multi, Reward(fn=count_target),
                       eos_token_id=None).spec.score_policy
