"""The PPO and GRPO/RLOO stages (setup + rollout loop) on a reward that is a known function of
the tokens."""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrlhf import lora, rl
from jrlhf.config import (Config, LoRAConfig, MeshConfig, OptimConfig, PPOConfig, RolloutConfig,
                          RunConfig)
from jrlhf.loops import train
from jrlhf.models import ModelConfig, forward, init_params
from jrlhf.rollouts import Reward
from jrlhf.sampling import Generation
from jrlhf.setups import make_setup
from jrlhf.steps.rollout import score_rollout

CFG = ModelConfig(family="llama", vocab_size=16, hidden_size=32, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, intermediate_size=64)
TARGET = 3
N = 8


def count_target(_, prompt_ids, prompt_mask, response_ids, response_mask):
    """Score = how many times the response says token 3."""
    return jnp.sum((response_ids == TARGET) & (response_mask > 0), axis=1).astype(jnp.float32)


def prompt_stream(B=16, P=4, seed=0):
    rng = np.random.RandomState(seed)
    while True:
        ids = rng.randint(4, 16, (B, P)).astype(np.int32)
        mask = np.ones((B, P), np.int32)
        ids[::3, 0], mask[::3, 0] = 0, 0  # some left padding
        yield {"input_ids": ids, "attention_mask": mask}


def train_with(algorithm, config, prompts):
    """The PPO / GRPO stage on `CFG` against `count_target`: `(setup, StageResult)`."""
    setup = make_setup(algorithm, config, CFG, init_params(CFG, 0))
    return setup, train(setup, config, prompts, reward=Reward(fn=count_target),
                        eos_token_id=None, log=None)


def run(kl_coef, iterations=30, **overrides):
    ppo = PPOConfig(iterations=iterations, prompts_per_iteration=16, minibatch_size=8, epochs=4,
                    learning_rate=2e-3, kl_coef=kl_coef)
    config = Config(ppo=dataclasses.replace(ppo, **overrides.pop("ppo", {})),
                    rollout=RolloutConfig(max_new_tokens=N), run=RunConfig(progress=False),
                    optim=OptimConfig(max_grad_norm=1.0), **overrides)
    return train_with("ppo", config, prompt_stream())


def tail_mean(history, key, n=5):
    return float(np.mean([m[key] for m in history[-n:]]))


@pytest.mark.slow
def test_ppo_raises_score_with_bounded_kl():
    """β=0.3: the KL-regularised optimum puts p(3) ≈ 0.65 (count ≈ 5.2 of 8) at a KL of
    ≈ 9.4 nats per sequence. Start: uniform-ish policy, count ≈ 0.5."""
    history = run(0.3)[1].history
    assert history[0]["score/mean"] < 1.0
    assert tail_mean(history, "score/mean") > 3.0
    assert tail_mean(history, "ppo/kl") < 15.0
    for key in ("time/generate", "time/score", "time/update", "tokens_per_s/generate",
                "score/min", "score/max", "ppo/entropy", "ppo/clipfrac", "value/error",
                "ppo/response_length"):
        assert np.isfinite(history[-1][key]), key


@pytest.mark.slow
def test_large_beta_keeps_policy_near_reference():
    """β=5: the optimum barely differs from the reference (p(3) ≈ 0.077, count ≈ 0.6)."""
    history = run(5.0)[1].history
    assert tail_mean(history, "score/mean") < 1.0
    assert tail_mean(history, "ppo/kl") < 0.5


@pytest.mark.slow
def test_lora_separate_critic_on_a_mesh():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        setup, result = run(0.1, iterations=3,
                            ppo={"critic": "separate", "normalize_rewards": True},
                            lora=LoRAConfig(rank=4, alpha=8.0), mesh=MeshConfig(2, 2, 2))
    assert setup.value_cfg is not None and setup.ref_params is None
    base = lora.base_params(result.state.params["policy"])
    jax.tree.map(np.testing.assert_array_equal, base,
                 jax.tree.map(np.asarray, init_params(CFG, 0)))
    assert lora.has_lora(result.state.params["policy"])
    assert len(result.history) == 3


@pytest.mark.slow
def test_score_rollout_penalty_and_reference():
    params = {"policy": init_params(dataclasses.replace(CFG, scalar_head=True), 0)}
    cfg_v = dataclasses.replace(CFG, scalar_head=True)
    prompt = jnp.array([[5, 6], [0, 7]])
    pmask = jnp.array([[1, 1], [0, 1]])
    resp = jnp.array([[9, 2, 0], [9, 9, 9]])  # row 0 ends with EOS=2, row 1 never does
    rmask = jnp.array([[1, 1, 0], [1, 1, 1]])
    # Responses sampled at temperature 0.9 (the sampler's own log-probs are not read here).
    sampled = Generation(resp, rmask, jnp.zeros(resp.shape), jnp.int32(3), jnp.full(2, 0.9))
    batch, scores = score_rollout(params, params["policy"], None, prompt, pmask, sampled,
                                  missing_eos_penalty=1.5, policy_cfg=cfg_v,
                                  value_cfg=None, reward_fn=count_target, eos_token_id=2)
    np.testing.assert_array_equal(batch["temperature"], np.full(2, 0.9, np.float32))
    np.testing.assert_allclose(scores, [0.0, -1.5])
    # Reference == policy here: identical log-probs, so KL 0.
    np.testing.assert_allclose(batch["logprobs"], batch["ref_logprobs"], atol=1e-6)
    assert np.all(np.asarray(batch["logprobs"])[0, 2] == 0)
    assert "entropy" not in batch
    # with_entropy (GRPO's metric): the tempered distribution's entropy at each response
    # position, from full logits, zero on padding.
    batch, _ = score_rollout(params, params["policy"], None, prompt, pmask, sampled,
                             policy_cfg=cfg_v, value_cfg=None, reward_fn=count_target,
                             with_entropy=True)
    full = jnp.concatenate([prompt, resp], 1)
    logits = forward(cfg_v, params["policy"], full, jnp.concatenate([pmask, rmask], 1))
    want = rl.entropy_from_logits(logits[:, 1:-1] / 0.9) * rmask
    np.testing.assert_allclose(batch["entropy"], want, atol=1e-5)
    assert float(np.asarray(batch["entropy"])[0, 2]) == 0.0 and float(batch["entropy"][0, 0]) > 0


def test_running_moments_match_numpy():
    rng = np.random.RandomState(0)
    chunks = [rng.randn(n) * 3 + 2 for n in (5, 8, 3)]
    m = rl.RunningMoments.create()
    for c in chunks:
        m = rl.update_moments(m, jnp.asarray(c, jnp.float32))
    allx = np.concatenate(chunks)
    np.testing.assert_allclose(m.mean, allx.mean(), rtol=1e-5)
    np.testing.assert_allclose(m.var, allx.var(), rtol=1e-4)
    z = rl.normalize_scores(jnp.asarray(allx, jnp.float32), m, clip=1.0)
    np.testing.assert_allclose(z, np.clip((allx - allx.mean()) / allx.std(), -1, 1), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_methods_raise_the_score(estimator):
    """GRPO / RLOO with the same token-count reward: the score rises clearly, and a larger
    KL coefficient keeps the policy closer to the reference."""
    from jrlhf.config import GRPOConfig

    def run(kl_coef):
        grpo = GRPOConfig(estimator=estimator, group_size=4, prompts_per_iteration=4,
                          iterations=25, learning_rate=2e-3, kl_coef=kl_coef, epochs=2,
                          minibatch_size=8)
        config = Config(grpo=grpo, rollout=RolloutConfig(max_new_tokens=N),
                        run=RunConfig(progress=False))
        prompts = ({k: v[:4] for k, v in b.items()} for b in prompt_stream())
        return train_with("grpo", config, prompts)[1].history

    loose, tight = run(0.01), run(1.0)
    assert loose[0]["score/mean"] < 1.0
    assert tail_mean(loose, "score/mean") > 2.5
    assert tail_mean(tight, f"{estimator}/kl") < 0.5 * tail_mean(loose, f"{estimator}/kl")
