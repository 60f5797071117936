"""The steps imported into research code as the README shows them, without the traps a
researcher hit (#25): the caller's arrays survive the donating steps, β has one home, and a
batch key no step reads is an error instead of being ignored."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jrlhf.config import GRPOConfig, MeshConfig
from jrlhf.models import init_params
from jrlhf.sharding import make_mesh
from jrlhf.state import TrainState
from jrlhf.steps import make_grpo_step, make_ppo_step, make_sft_step, place_state
from test_steps import CFG, POLICY_CFG, PPO_CFG, rollout_batch, sft_batch


def leaves_alive(tree) -> bool:
    return not any(x.is_deleted() for x in jax.tree.leaves(tree) if isinstance(x, jax.Array))


def test_a_reference_that_is_the_policy_survives_the_updates():
    """`ref_params = policy` then `TrainState.create(policy, ...)`: the steps donate the state,
    and used to delete the reference with it (the second PPO iteration then failed with
    "Buffer has been deleted or donated")."""
    policy = jax.tree.map(jnp.asarray, {"policy": init_params(POLICY_CFG, 0)})
    ref_params = policy["policy"]
    state = TrainState.create(policy, optax.adam(1e-3), 0, kl_coef=PPO_CFG.kl_coef)
    step = make_ppo_step(POLICY_CFG, PPO_CFG)
    before = jax.tree.map(np.asarray, ref_params)
    for _ in range(2):
        state, _ = step(state, rollout_batch({"policy": ref_params}))
    assert leaves_alive(ref_params)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, ref_params), before)


def test_place_state_leaves_the_callers_state_usable():
    params = jax.tree.map(jnp.asarray, init_params(CFG, 0))
    state = TrainState.create(params, optax.adam(1e-3), 0, copy=False)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2))
    placed = place_state(state, mesh)
    step = make_sft_step(CFG, state=placed, mesh=mesh)
    placed, _ = step(placed, sft_batch())
    assert leaves_alive(state) and leaves_alive(params)


def test_beta_lives_in_the_state_and_its_absence_is_named():
    params = {"policy": init_params(POLICY_CFG, 0)}
    state = TrainState.create(params, optax.adam(1e-3), 0)  # no kl_coef
    step = make_ppo_step(POLICY_CFG, PPO_CFG)
    with pytest.raises(ValueError, match=r"ppo_step: the state holds no KL coefficient β.*"
                                         r"kl_coef=ppo_cfg\.kl_coef"):
        step(state, rollout_batch(params))


def test_a_batch_key_no_step_reads_is_an_error_naming_it():
    params = init_params(CFG, 0)
    sft = make_sft_step(CFG)
    batch = sft_batch()
    with pytest.raises(ValueError, match=r"sft_step: .*unknown loss_weights \(never read\)"):
        sft(TrainState.create(params, optax.adam(1e-3), 0), dict(batch, loss_weights=1))
    del batch["loss_mask"]
    with pytest.raises(ValueError, match=r"sft_step: .*missing loss_mask"):
        sft(TrainState.create(params, optax.adam(1e-3), 0), batch)

    grpo = make_grpo_step(CFG, GRPOConfig(group_size=4))
    rollout = rollout_batch({"policy": init_params(POLICY_CFG, 0)})
    advantages = np.ones(8, np.float32)  # the fused step computes its own: refused, not ignored
    with pytest.raises(ValueError, match=r"grpo step: .*unknown advantages \(never read\)"):
        grpo(TrainState.create(params, optax.adam(1e-3), 0), dict(rollout, advantages=advantages))


def test_every_step_factory_takes_the_model_config_first():
    """`make_*_step(model_cfg, cfg, *, ...)` for every algorithm; the old orders (PPO's and
    GRPO's took the algorithm's config first) are a TypeError naming the factory."""
    from jrlhf.config import DPOConfig
    from jrlhf.steps import make_dpo_step, make_reward_step

    make_sft_step(CFG), make_reward_step(CFG), make_dpo_step(CFG, DPOConfig())
    make_grpo_step(CFG, GRPOConfig()), make_ppo_step(POLICY_CFG, PPO_CFG)
    with pytest.raises(TypeError, match=r"make_ppo_step\(model_cfg, cfg, \.\.\.\): the model's "
                                        r"ModelConfig comes first, got PPOConfig"):
        make_ppo_step(PPO_CFG, POLICY_CFG)
    with pytest.raises(TypeError, match=r"make_grpo_step\(model_cfg, cfg, \.\.\.\): .*GRPOConfig"):
        make_grpo_step(GRPOConfig(), CFG)
    with pytest.raises(TypeError, match=r"make_dpo_step.*cfg must be a DPOConfig, got GRPOConfig"):
        make_dpo_step(CFG, GRPOConfig())


@pytest.mark.slow
def test_a_state_of_ones_own_works_with_the_steps_on_a_mesh():
    """A research state (no `apply_gradients` method, an extra field of its own) that follows
    the protocol of `steps.apply_gradients` trains through a fused GRPO step on a mesh and
    equals `TrainState` (it failed with "'MyState' object has no attribute 'apply_gradients'")."""
    from flax import struct

    from jrlhf.steps import state_shardings
    from test_preference import group_rollout

    @struct.dataclass
    class MyState:
        params: dict
        opt_state: tuple
        step: jax.Array
        rng: jax.Array
        seen: jax.Array  # a field of the research code's own (replicated)
        tx: optax.GradientTransformation = struct.field(pytree_node=False)

    params = init_params(CFG, 0)
    tx = optax.adam(1e-3)
    mine = MyState(jax.tree.map(jnp.array, params), tx.init(params), jnp.zeros((), jnp.int32),
                   jax.random.key(0), jnp.zeros(()), tx)
    theirs = TrainState.create(params, tx, 0)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2))
    batch = group_rollout(params)
    results = []
    for state in (mine, theirs):
        state = place_state(state, mesh)
        step = make_grpo_step(CFG, GRPOConfig(group_size=4, minibatch_size=4), state=state,
                              mesh=mesh)
        for _ in range(2):
            state, metrics = step(state, batch)
        results.append((state, metrics))
    (mine, m1), (theirs, m2) = results
    assert int(mine.step) == int(theirs.step) == 8  # 2 updates x 4 minibatches of 4 rows
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), mine.params,
                 theirs.params)
    assert state_shardings(mine, mesh).seen.is_fully_replicated


def _trained(step, state, batch):
    new, metrics = step(state, batch)
    return new.params, metrics


@pytest.mark.slow
def test_grpo_takes_a_custom_advantage_function_and_an_extra_loss_term():
    """`advantage_fn` replaces the estimator: group-centred scores equal Dr. GRPO's unscaled
    advantages (`scale_advantages=False`). `extra_loss` is added to the loss: β·k3 KL written by
    the researcher with `kl_coef=0` equals the built-in `kl_coef=β` term."""
    from jrlhf.rl import kl_penalty
    from test_mismatch import grpo_batch
    from test_steps import OPT_EQ, make_state

    params = init_params(CFG, 0)
    batch = grpo_batch(params)
    cfg = GRPOConfig(group_size=4, minibatch_size=8, epochs=2, kl_coef=0.0)

    def fresh():
        return make_state(params, OPT_EQ)[0]

    def centred(scores, rows):
        groups = scores.reshape(-1, 4)
        return (groups - groups.mean(axis=1, keepdims=True)).reshape(-1)

    unscaled = dataclasses.replace(cfg, scale_advantages=False)
    custom, m1 = _trained(make_grpo_step(CFG, cfg, advantage_fn=centred), fresh(), batch)
    builtin, m2 = _trained(make_grpo_step(CFG, unscaled), fresh(), batch)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), custom, builtin)
    np.testing.assert_allclose(m1["grpo/advantages_std"], m2["grpo/advantages_std"], rtol=1e-6)
    with pytest.raises(ValueError, match=r"advantage_fn returned shape \(4, 4\)"):
        make_grpo_step(CFG, cfg, advantage_fn=lambda s, r: s.reshape(-1, 4))(fresh(), batch)

    beta = 0.5

    def k3(params_, mb, logprobs):
        real = mb["response_mask"] > 0
        kl = kl_penalty(jnp.where(real, logprobs, 0.0), jnp.where(real, mb["ref_logprobs"], 0.0),
                        "k3")
        term = beta * jnp.sum(kl * real) / jnp.sum(real)  # token-mean, as the built-in
        return term, {"my_kl": term / beta}

    theirs, metrics = _trained(make_grpo_step(CFG, cfg, extra_loss=k3), fresh(), batch)
    builtin, reference = _trained(
        make_grpo_step(CFG, dataclasses.replace(cfg, kl_coef=beta)), fresh(), batch)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), theirs, builtin)
    np.testing.assert_allclose(metrics["grpo/my_kl"], reference["grpo/kl"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grpo/loss"], reference["grpo/loss"], rtol=1e-5)


@pytest.mark.slow
def test_ppo_takes_a_custom_advantage_function_and_an_extra_loss_term():
    """`advantage_fn` replaces GAE: Monte-Carlo returns written by the researcher equal the
    built-in GAE with γ = λ = 1. `extra_loss` is added to the loss: the clipped value loss
    computed by the researcher with `vf_coef=0` equals the built-in `vf_coef` term."""

    from jrlhf import losses
    from jrlhf.steps.rollout import policy_outputs
    from test_steps import ppo_state

    params = {"policy": init_params(POLICY_CFG, 0)}
    batch = rollout_batch(params)

    def fresh(cfg):
        return ppo_state(params, cfg)

    def monte_carlo(rewards, values, mask):
        returns = jnp.flip(jnp.cumsum(jnp.flip(rewards * mask, 1), 1), 1) * mask
        return (returns - values) * mask, returns

    plain = dataclasses.replace(PPO_CFG, whiten_advantages=False)
    mc = dataclasses.replace(plain, gamma=1.0, lam=1.0)
    custom, _ = _trained(make_ppo_step(POLICY_CFG, plain, advantage_fn=monte_carlo),
                         fresh(plain), batch)
    builtin, _ = _trained(make_ppo_step(POLICY_CFG, mc), fresh(mc), batch)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), custom, builtin)

    no_value = dataclasses.replace(PPO_CFG, vf_coef=0.0)

    def value_loss(p, mb, logprobs):
        N = mb["response_mask"].shape[1]
        _, _, values = policy_outputs(p, mb["input_ids"], mb["attention_mask"], N,
                                      policy_cfg=POLICY_CFG, value_cfg=None,
                                      temperature=mb["temperature"])
        vf, _ = losses.ppo_value_loss(values, mb["values"], mb["returns"], mb["response_mask"],
                                      PPO_CFG.value_clip_eps)
        return PPO_CFG.vf_coef * vf, {"my_value_loss": vf}

    theirs, metrics = _trained(make_ppo_step(POLICY_CFG, no_value, extra_loss=value_loss),
                               fresh(no_value), batch)
    builtin, reference = _trained(make_ppo_step(POLICY_CFG, PPO_CFG), fresh(PPO_CFG), batch)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), theirs, builtin)
    np.testing.assert_allclose(metrics["ppo/my_value_loss"], reference["value/loss"], rtol=1e-5)
