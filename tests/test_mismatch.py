"""Sampler-vs-trainer mismatch: the log-prob gap a bf16 sampler causes is measured on every
PPO / GRPO iteration, and truncated importance sampling (TIS) corrects the update exactly as
its definition says — a no-op when sampler and trainer agree."""

import dataclasses

import jax
import numpy as np
import pytest
from test_policy_losses import B, T, np_aggregate, np_policy_loss, random_batch

from jrlhf import losses
from jrlhf.config import Config, GRPOConfig, PPOConfig, RolloutConfig, RunConfig


def sampler_of(trainer, mask, scale=0.4, seed=9):
    """Sampler log-probs that differ from the trainer's (some ratios beyond a cap of 2)."""
    noise = np.random.RandomState(seed).randn(*trainer.shape).astype(np.float32)
    return (trainer + scale * noise * mask).astype(np.float32)


def differ(a, b) -> bool:
    return not all(np.allclose(x, y, atol=1e-6, rtol=0)
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_weights_gap_metrics_and_weighted_loss_equal_their_definitions():
    new, old, adv, mask = random_batch(8)
    sampler = sampler_of(old, mask)
    weights = losses.truncated_importance_weights(old, sampler, mask, 2.0)
    want = np.ones((B, T))
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                want[b, t] = min(np.exp(old[b, t] - sampler[b, t]), 2.0)
    np.testing.assert_allclose(weights, want, rtol=1e-6)
    assert (want == 2.0).any() and (want < 1).any()  # capped and down-weighted tokens

    gaps = [old[b, t] - sampler[b, t] for b in range(B) for t in range(T) if mask[b, t]]
    got = losses.logprob_mismatch(old, sampler, mask)
    np.testing.assert_allclose(got["gap_mean"], np.mean(np.abs(gaps)), rtol=1e-6)
    np.testing.assert_allclose(got["gap_max"], np.max(np.abs(gaps)), rtol=1e-6)
    np.testing.assert_allclose(got["kl_k3"], np.mean([np.exp(g) - 1 - g for g in gaps]),
                               rtol=1e-5)
    same = losses.logprob_mismatch(old, old, mask)
    assert all(float(v) == 0 for v in same.values())

    adv_t = np.broadcast_to(adv[:, None], (B, T))
    for mode in losses.AGGREGATIONS:
        loss, _ = losses.clipped_policy_loss(new, old, adv_t, mask, clip_low=0.2, clip_high=0.28,
                                             aggregation=mode, token_weights=weights)
        np.testing.assert_allclose(
            loss, np_policy_loss(new, old, adv, mask, 0.2, 0.28, 0.0, "token", mode, want),
            rtol=1e-5, atol=1e-7)


def test_ppo_loss_applies_the_weights():
    from jrlhf.steps.ppo import ppo_loss

    new, old, adv, mask = random_batch(6)
    weights = np.asarray(losses.truncated_importance_weights(old, sampler_of(old, mask), mask,
                                                             1.5))
    adv_t = np.broadcast_to(adv[:, None], (B, T)).copy()
    zeros = np.zeros((B, T), np.float32)
    mb = {"input_ids": None, "attention_mask": None, "response_mask": mask, "logprobs": old,
          "temperature": np.ones(B, np.float32), "advantages": adv_t, "values": zeros,
          "returns": zeros, "tis_weights": weights}
    forward = lambda params, ids, attn, n, temperature, with_entropy: (new, zeros, zeros)  # noqa: E731
    _, metrics = ppo_loss(None, mb, cfg=PPOConfig(), forward=forward)
    r = np.exp(new - old)
    want = np_aggregate(weights * np.maximum(-adv_t * r, -adv_t * np.clip(r, 0.8, 1.2)), mask,
                        "token-mean")
    np.testing.assert_allclose(metrics["ppo/policy_loss"], want, rtol=1e-5)


def grpo_batch(params):
    from test_preference import group_rollout

    batch = group_rollout(params)
    batch["ref_logprobs"] = batch["ref_logprobs"] - 0.05 * batch["response_mask"]
    return batch


@pytest.mark.slow
def test_grpo_tis_is_a_no_op_when_the_sampler_agrees_and_otherwise_its_definition():
    from test_preference import CFG
    from test_steps import OPT_EQ, make_state

    from jrlhf.models import init_params
    from jrlhf.steps import make_grpo_step
    from jrlhf.steps.grpo import grpo_loss, sequence_advantages

    params = init_params(CFG, 0)
    batch = grpo_batch(params)
    mask = batch["response_mask"]
    cfg = GRPOConfig(group_size=4, epochs=1, clip_high=0.28)
    tis = dataclasses.replace(cfg, tis_cap=2.0)

    def run(step_cfg, sampler):
        state = make_state(params, OPT_EQ)[0]
        return make_grpo_step(CFG, step_cfg)(state, dict(batch, sampler_logprobs=sampler))

    plain, _ = run(cfg, batch["logprobs"])
    same, m_same = run(tis, batch["logprobs"])  # identical numerics: exactly no change
    jax.tree.map(np.testing.assert_array_equal, same.params, plain.params)
    assert float(m_same["mismatch/gap_max"]) == 0 and float(m_same["mismatch/kl_k3"]) == 0
    assert float(m_same["mismatch/tis_capped"]) == 0

    sampler = sampler_of(batch["logprobs"], mask)
    corrected, m = run(tis, sampler)
    assert float(m["mismatch/gap_mean"]) > 0.1 and 0 < float(m["mismatch/tis_capped"]) < 1
    # By its definition: one optimizer step on the policy loss with every token's term times
    # min(exp(logprobs − sampler_logprobs), 2), the weights computed here in NumPy.
    weights = np.where(mask > 0, np.minimum(np.exp(batch["logprobs"] - sampler), 2.0), 1.0)
    mb = {k: batch[k] for k in ("input_ids", "attention_mask", "response_mask", "temperature",
                                "logprobs", "ref_logprobs")}
    mb["advantages"] = sequence_advantages(batch["scores"], 4, "grpo")
    mb["tis_weights"] = weights.astype(np.float32)
    counts = losses.aggregation_counts(mask)
    grads = jax.grad(lambda p: grpo_loss(p, mb, counts, cfg=tis, model_cfg=CFG)[0])(params)
    by_hand = make_state(params, OPT_EQ)[0].apply_gradients(grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
                 corrected.params, by_hand.params)
    uncorrected, _ = run(cfg, sampler)
    assert differ(corrected.params, uncorrected.params)


@pytest.mark.slow
def test_ppo_tis_is_a_no_op_when_the_sampler_agrees_and_changes_the_update_otherwise():
    from test_steps import OPT_EQ, POLICY_CFG, PPO_CFG, make_state, rollout_batch

    from jrlhf.models import init_params
    from jrlhf.steps import make_ppo_step

    params = {"policy": init_params(POLICY_CFG, 0)}
    batch = rollout_batch(params)
    tis = dataclasses.replace(PPO_CFG, tis_cap=2.0)

    def run(cfg, sampler):
        state = make_state(params, OPT_EQ, kl_coef=cfg.kl_coef)[0]
        step = make_ppo_step(POLICY_CFG, cfg)
        return step(state, dict(batch, sampler_logprobs=sampler))

    plain, _ = run(PPO_CFG, batch["logprobs"])
    same, m_same = run(tis, batch["logprobs"])
    jax.tree.map(np.testing.assert_array_equal, same.params, plain.params)
    assert float(m_same["mismatch/gap_max"]) == 0
    sampler = sampler_of(batch["logprobs"], batch["response_mask"])
    corrected, m = run(tis, sampler)
    uncorrected, m_off = run(PPO_CFG, sampler)
    assert float(m["mismatch/gap_mean"]) > 0.1 and float(m["mismatch/tis_capped"]) > 0
    assert float(m_off["mismatch/gap_mean"]) == float(m["mismatch/gap_mean"])  # logged either way
    assert "mismatch/tis_capped" not in m_off
    assert differ(corrected.params, uncorrected.params)
    with pytest.raises(ValueError, match="ppo.tis_cap needs the rollout batch's sampler_logprobs"):
        make_ppo_step(POLICY_CFG, tis)(make_state(params, OPT_EQ, kl_coef=0.05)[0],
                                       {k: v for k, v in batch.items()})


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo"])  # PPO runs the same RolloutLoop code
def test_a_bf16_sampler_shows_a_log_prob_gap_a_float32_one_does_not(algorithm):
    """One rollout iteration of a float32 model whose sampler runs in bf16 (`rollout.dtype`):
    the logged gap is clearly above float32 rounding; with the sampler in float32 it is not."""
    from test_ppo_loop import CFG, count_target, prompt_stream

    from jrlhf.models import init_params
    from jrlhf.rollouts import Reward, RolloutLoop
    from jrlhf.setups import make_setup

    gaps = {}
    for dtype in ("", "bfloat16"):
        config = Config(ppo=PPOConfig(prompts_per_iteration=16, minibatch_size=8, epochs=1),
                        grpo=GRPOConfig(group_size=4, prompts_per_iteration=4),
                        rollout=RolloutConfig(max_new_tokens=8, dtype=dtype),
                        run=RunConfig(progress=False))
        setup = make_setup(algorithm, config, CFG, init_params(CFG, 0))
        loop = RolloutLoop(setup, config, Reward(fn=count_target), eos_token_id=None)
        prompts = next(prompt_stream(16 if algorithm == "ppo" else 4))
        _, metrics = loop(setup.state, prompts)
        gaps[dtype] = metrics
    print({d: {k: v for k, v in m.items() if k.startswith("mismatch/")} for d, m in gaps.items()})
    assert gaps[""]["mismatch/gap_max"] < 1e-5
    assert gaps["bfloat16"]["mismatch/gap_mean"] > 1e-4
    assert gaps["bfloat16"]["mismatch/gap_mean"] > 20 * gaps[""]["mismatch/gap_max"]
    assert gaps["bfloat16"]["mismatch/kl_k3"] > 0
    for metrics in gaps.values():
        assert metrics["response_length_max"] == 8 and metrics["truncated_share"] == 1.0


@pytest.mark.slow
def test_the_update_logs_its_gradient_norm():
    """`ppo/grad_norm` / `grpo/grad_norm`: the global norm of each optimizer step's gradient
    (before clipping), averaged; with one minibatch and one epoch it is the norm of the loss's
    gradient at the starting weights."""
    import optax

    from jrlhf.models import init_params
    from jrlhf.steps import make_grpo_step
    from jrlhf.steps.grpo import grpo_loss, sequence_advantages
    from test_preference import CFG
    from test_steps import OPT_EQ, make_state

    params = init_params(CFG, 0)
    batch = grpo_batch(params)
    cfg = GRPOConfig(group_size=4, epochs=1)
    _, metrics = make_grpo_step(CFG, cfg)(make_state(params, OPT_EQ)[0], batch)
    mb = {k: batch[k] for k in ("input_ids", "attention_mask", "response_mask", "temperature",
                                "logprobs", "ref_logprobs")}
    mb["advantages"] = sequence_advantages(batch["scores"], 4, "grpo")
    counts = losses.aggregation_counts(batch["response_mask"])
    grads = jax.grad(lambda p: grpo_loss(p, mb, counts, cfg=cfg, model_cfg=CFG)[0])(params)
    np.testing.assert_allclose(metrics["grpo/grad_norm"], optax.tree.norm(grads), rtol=1e-5)
    # The entropy metric is the rollout's (score_rollout with_entropy), masked-averaged.
    assert "grpo/entropy" not in metrics
    entropy = np.random.RandomState(1).rand(*batch["response_mask"].shape).astype(np.float32)
    _, metrics = make_grpo_step(CFG, cfg)(make_state(params, OPT_EQ)[0],
                                          dict(batch, entropy=entropy))
    mask = batch["response_mask"]
    np.testing.assert_allclose(metrics["grpo/entropy"], (entropy * mask).sum() / mask.sum(),
                               rtol=1e-6)
