"""DPO/IPO, ORPO, GRPO and RLOO: losses against NumPy and hand values, steps that learn,
sharded == unsharded."""

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrlhf import lora, losses, sharding
from jrlhf.config import DPOConfig, GRPOConfig, LoRAConfig, MeshConfig
from jrlhf.models import init_params
from jrlhf.steps import make_dpo_step, make_grpo_step, place_state, reference_logps
from jrlhf.steps.grpo import rloo_step, sequence_advantages
from test_steps import CFG, OPT_EQ, make_state

log_sigmoid = lambda x: -np.log1p(np.exp(-x))  # noqa: E731


def test_dpo_loss_matches_numpy_and_hand_values():
    rng = np.random.RandomState(0)
    pc, pr, rc, rr = (rng.randn(5) for _ in range(4))
    h = (pc - rc) - (pr - rr)
    got, m = losses.dpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=0.1)
    want = -0.9 * log_sigmoid(0.3 * h) - 0.1 * log_sigmoid(-0.3 * h)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(m["chosen_rewards"], 0.3 * (pc - rc), rtol=1e-6)
    ipo, _ = losses.dpo_loss(pc, pr, rc, rr, beta=0.3, kind="ipo")
    np.testing.assert_allclose(ipo, (h - 1 / 0.6) ** 2, rtol=1e-5)
    # Policy == reference: h = 0, DPO loss log 2, IPO loss 1/(2β)².
    z = jnp.zeros(1)
    np.testing.assert_allclose(losses.dpo_loss(z, z, z, z, 0.1)[0], [np.log(2)], rtol=1e-6)
    np.testing.assert_allclose(losses.dpo_loss(z, z, z, z, 0.5, kind="ipo")[0], [1.0])
    with pytest.raises(ValueError, match="'hinge'"):
        losses.dpo_loss(z, z, z, z, 0.1, kind="hinge")


def test_orpo_loss_matches_numpy():
    mc, mr = np.array([-0.5, -2.0]), np.array([-1.0, -0.3])
    nll = np.array([0.5, 2.0])
    got, ratio = losses.orpo_loss(mc, mr, nll, 0.2)
    odds = lambda lp: lp - np.log1p(-np.exp(lp))  # noqa: E731
    want_ratio = odds(mc) - odds(mr)
    np.testing.assert_allclose(ratio, want_ratio, rtol=1e-5)
    np.testing.assert_allclose(got, nll - 0.2 * log_sigmoid(want_ratio), rtol=1e-5)


def test_group_advantages_match_numpy_loops():
    scores = np.random.RandomState(1).randn(3, 4).astype(np.float32)
    grpo = np.asarray(losses.group_advantages(scores))
    rloo = np.asarray(losses.leave_one_out_advantages(scores))
    for g in range(3):
        for k in range(4):
            others = [scores[g, j] for j in range(4) if j != k]
            np.testing.assert_allclose(rloo[g, k], scores[g, k] - np.mean(others), rtol=1e-5)
            np.testing.assert_allclose(grpo[g, k], (scores[g, k] - scores[g].mean()) /
                                       (scores[g].std() + 1e-6), rtol=1e-4)
    np.testing.assert_allclose(sequence_advantages(jnp.asarray(scores.reshape(-1)), 4, "rloo"),
                               rloo.reshape(-1), rtol=1e-6)
    # Hand: group (1, 3): GRPO ±1, RLOO ∓2.
    np.testing.assert_allclose(losses.group_advantages(jnp.array([[1.0, 3.0]])), [[-1, 1]],
                               atol=1e-5)
    np.testing.assert_allclose(losses.leave_one_out_advantages(jnp.array([[1.0, 3.0]])),
                               [[-2, 2]])


def test_kl_regularised_loss_hand_value():
    logp = jnp.log(jnp.array([[0.5, 0.25]]))
    mask = jnp.ones((1, 2))
    # Ratio 1 everywhere, reference == policy: loss = −A (mean over tokens), KL 0.
    loss, m = losses.clipped_kl_regularised_loss(logp, logp, logp, jnp.array([2.0]), mask, 0.2,
                                                 0.5)
    np.testing.assert_allclose(loss, -2.0)
    assert float(m["kl"]) == 0.0
    # Reference differs: k3 with r = exp(ref − logp) = 2 on token 0: (2 − 1) − log 2.
    ref = logp.at[0, 0].add(np.log(2))
    loss2, m2 = losses.clipped_kl_regularised_loss(logp, logp, ref, jnp.array([0.0]), mask,
                                                   0.2, 0.5)
    np.testing.assert_allclose(m2["kl"], (1 - np.log(2)) / 2, rtol=1e-6)
    np.testing.assert_allclose(loss2, 0.5 * (1 - np.log(2)) / 2, rtol=1e-6)


def pair_batch(P=8, T=10, seed=0):
    rng = np.random.RandomState(seed)
    batch = {}
    for side, last in (("chosen", 1), ("rejected", 2)):
        ids = rng.randint(3, 64, (P, T)).astype(np.int32)
        ids[:, -1] = last  # learnable: chosen responses end in token 1
        mask = np.ones((P, T), np.int32)
        mask[::3, :2] = 0
        loss_mask = (np.arange(T) >= 5).astype(np.int32)[None].repeat(P, 0)
        batch.update({f"{side}_ids": ids, f"{side}_mask": mask, f"{side}_loss_mask": loss_mask})
    return batch


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_dpo_step_learns_the_preference(kind):
    params = init_params(CFG, 0)
    batch = pair_batch()
    batch.update(jax.tree.map(np.asarray, reference_logps(CFG, params, batch)))
    state, _ = make_state(params)
    step = make_dpo_step(CFG, DPOConfig(beta=0.5, loss=kind))
    history = []
    for _ in range(8):
        state, m = step(state, batch)
        history.append({k: float(v) for k, v in m.items()})
    if kind == "sigmoid":
        np.testing.assert_allclose(history[0]["dpo/loss"], np.log(2), rtol=1e-5)
    assert history[-1]["dpo/loss"] < 0.7 * history[0]["dpo/loss"]
    assert history[-1]["dpo/accuracy"] == 1.0 and history[-1]["dpo/margin"] > 0


@pytest.mark.slow
def test_dpo_with_lora_uses_its_base_as_reference():
    lcfg = LoRAConfig(rank=2, alpha=4.0)
    params = lora.add_lora(init_params(CFG, 0), lcfg, jax.random.key(0))
    batch = pair_batch()
    from jrlhf import optim

    labels = optim.trainable_labels(params, train_only=lora.LORA_TRAINABLE)
    step = make_dpo_step(CFG, DPOConfig(), labels=labels, lora_scale=lcfg.scale)
    state, _ = make_state(params, train_only=lora.LORA_TRAINABLE)
    _, in_step = step(state, batch)
    pre = dict(batch, **reference_logps(CFG, lora.base_params(params), batch))
    state, _ = make_state(params, train_only=lora.LORA_TRAINABLE)
    _, precomputed = step(state, pre)
    np.testing.assert_allclose(in_step["dpo/loss"], precomputed["dpo/loss"], rtol=1e-6)
    state, _ = make_state(init_params(CFG, 0))
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        make_dpo_step(CFG, DPOConfig())(state, batch)


def test_orpo_step_learns_without_reference():
    state, _ = make_state(init_params(CFG, 0))
    step = make_dpo_step(CFG, DPOConfig(orpo_lambda=0.5), orpo=True)
    first = None
    for _ in range(8):
        state, m = step(state, pair_batch())
        first = first or {k: float(v) for k, v in m.items()}
    assert float(m["orpo/loss"]) < 0.8 * first["orpo/loss"]
    assert float(m["orpo/log_odds_ratio"]) > first["orpo/log_odds_ratio"]


def group_rollout(params, G=4, K=4, P=4, N=5, seed=0, temperature=1.0, cfg=CFG):
    from jrlhf import rl
    from jrlhf.models import forward

    rng = np.random.RandomState(seed)
    ids = rng.randint(3, 64, (G * K, P + N)).astype(np.int32)
    ids[:, :P] = np.repeat(ids[::K, :P], K, axis=0)  # a group: K samples of one prompt
    attn = np.ones_like(ids)
    resp = np.ones((G * K, N), np.int32)
    resp[1::4, 3:] = 0
    attn[1::4, P + 3:] = 0
    logits = forward(cfg, params, ids, attn)[:, -N - 1:-1] / temperature
    logp = np.asarray(rl.logprobs_from_logits(logits, ids[:, -N:])) * resp
    scores = ((ids[:, -N:] == 7) * resp).sum(1).astype(np.float32) + rng.rand(G * K) * 0.1
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp,
            "temperature": np.full(G * K, temperature, np.float32), "logprobs": logp,
            "ref_logprobs": logp, "scores": scores}


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_step_improves_the_objective(estimator):
    params = init_params(CFG, 0)
    batch = group_rollout(params)
    cfg = GRPOConfig(estimator=estimator, group_size=4, epochs=2, minibatch_size=8)
    step = make_grpo_step(CFG, cfg)
    state, _ = make_state(params)
    state, first = step(state, batch)
    for _ in range(4):
        state, last = step(state, batch)
    key = f"{estimator}/policy_loss"
    assert float(last[key]) < float(first[key])
    assert float(last[f"{estimator}/kl"]) > 0  # it moved away from the reference
    # The update made high-advantage responses more likely and low-advantage ones less.
    new = group_rollout(state.params)
    adv = np.asarray(sequence_advantages(jnp.asarray(batch["scores"]), 4, estimator))
    delta = (new["logprobs"] - batch["logprobs"]).sum(1)
    assert np.corrcoef(adv, delta)[0, 1] > 0.5
    assert int(state.step) == 5 * 2 * 2


@pytest.mark.slow
def test_rloo_step_is_grpo_with_leave_one_out():
    params = init_params(CFG, 0)
    batch = group_rollout(params)
    cfg = GRPOConfig(group_size=4)
    a = jax.jit(functools.partial(rloo_step, cfg=cfg, model_cfg=CFG))(make_state(params)[0], batch)
    b = make_grpo_step(CFG, dataclasses.replace(cfg, estimator="rloo"))(make_state(params)[0],
                                                                          batch)
    jax.tree.map(np.testing.assert_array_equal, a[0].params, b[0].params)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1)], ids=["2x2x2", "1x8x1"])
@pytest.mark.parametrize("kind", ["dpo", "orpo", "grpo"])
def test_sharded_equals_unsharded(kind, shape):
    params = init_params(CFG, 0)

    def run(mesh):
        state, _ = make_state(params, OPT_EQ)
        if mesh is not None:
            state = place_state(state, mesh)
        if kind == "grpo":
            batch = group_rollout(params)
            step = make_grpo_step(CFG, GRPOConfig(group_size=4, minibatch_size=8), state=state,
                                  mesh=mesh)
        else:
            batch = pair_batch()
            # A reference other than the policy, so no margin is an exact tie at 0 (where
            # summation order alone would flip the accuracy metric).
            other = init_params(CFG, 1)
            if kind == "dpo":  # ORPO has no reference (a batch key it never reads is refused)
                batch.update(jax.tree.map(np.asarray, reference_logps(CFG, other, batch)))
            step = make_dpo_step(CFG, DPOConfig(), orpo=kind == "orpo", state=state, mesh=mesh)
        new, m = step(state, batch)
        return jax.tree.map(np.asarray, new.params), {k: float(v) for k, v in m.items()}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mesh = sharding.make_mesh(MeshConfig(*shape))
    ref_params, ref_m = run(None)
    got_params, got_m = run(mesh)
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6, rtol=0), got_params,
                 ref_params)
    for k in ref_m:
        np.testing.assert_allclose(got_m[k], ref_m[k], rtol=1e-5, atol=1e-6, err_msg=k)
