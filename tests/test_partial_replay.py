"""Routing replay across partial rollouts: a mixture of experts' recorded experts ride in the
pool with the tokens. A token's experts are recorded by the call that samples it and kept; a
resumed row's prefill replays them under the new weights, so the trainer (replaying the whole
row) computes the log-probs the sampler drew the new tokens with."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrlhf import partial
from jrlhf.continuous import Resumption, generate_partial
from jrlhf.models import init_params
from jrlhf.models import transformer as tfm
from jrlhf.rollouts import with_rollout_settings
from jrlhf.state import RolloutPool
from test_continuous import prompts
from test_moe import qwen3_moe_cfg
from test_partial import PromptStream, partial_config

MOE = qwen3_moe_cfg(vocab_size=97)
L_K = (len(MOE.sparse_layers), MOE.experts_per_token)
CONFIG = partial_config(iterations=3, max_staleness=1, routing_replay="on")
K, N, EOS = 4, CONFIG.rollout.max_new_tokens, 5
G = 24  # the loop's queue: 2 × its pool's 12 groups (the sampler compiles once for all tests)
# Group 0 ends after 2 tokens: the first call stops there with 6 rows mid-response.
BUDGETS = np.r_[1, 2, 1, 2, np.full(4 * G - 4, N)].astype(np.int32)
SAMPLE = functools.partial(with_rollout_settings(generate_partial, MOE, CONFIG.rollout, EOS, 0,
                                                 K), slots=CONFIG.rollout.slots,
                           batch_sharding=None, budgets=jnp.asarray(BUDGETS))


def moe_params(seed):
    """The tiny mixture of experts' initial weights (one compiled init), committed to one
    device as the loop's updated weights are: every sampler call here shares one compile."""
    init = jax.jit(init_params, static_argnums=0)
    return jax.device_put(init(MOE, jax.random.key(seed)), jax.devices()[0])


def two_calls(params_a, params_b):
    """One partial call under `params_a` that stops when a group ends, then one under
    `params_b` that resumes the rest to the end (the same key: sequence-keyed sampling draws
    what one uninterrupted call would)."""
    ids, mask = prompts(G=G, seed=2)
    ids, mask = ids[:, -4:], mask[:, -4:]  # the loop's prompt width; some left-padded
    Q, P = G * K, ids.shape[1]
    fresh = Resumption(np.zeros((Q, N), np.int32), np.zeros((Q, N), np.float32),
                       np.zeros(Q, np.int32), np.zeros(Q, bool),
                       np.zeros((Q, P + N, *L_K), np.int32))
    real = np.ones((G,), bool)
    gen_a, fin_a = SAMPLE(params_a, ids, mask, jax.random.key(3), fresh, real, np.int32(1))
    lengths_a = np.asarray(gen_a.mask).sum(1)
    resumed = Resumption(np.asarray(gen_a.tokens), np.asarray(gen_a.logprobs),
                         lengths_a.astype(np.int32), np.asarray(fin_a), np.asarray(gen_a.experts))
    gen_b, fin_b = SAMPLE(params_b, ids, mask, jax.random.key(3), resumed, real, np.int32(G))
    assert np.asarray(fin_b).all()
    carried = (lengths_a > 0) & ~np.asarray(fin_a)
    assert carried.sum() >= 4 and (~np.asarray(fin_a) & (lengths_a == 0)).any()
    return ids, mask, (gen_a, fin_a, lengths_a, carried), gen_b, fresh


def rows_of(ids, mask, gen):
    return (jnp.concatenate([jnp.repeat(ids, K, 0), gen.tokens], 1),
            jnp.concatenate([jnp.repeat(mask, K, 0), gen.mask], 1))


def test_a_row_resumed_under_the_same_weights_records_what_one_uninterrupted_call_records():
    """Position for position: the chained calls' tokens and experts (prompt and response) are
    those of one call that runs every row to its end — nothing shifted by the resumption."""
    params = moe_params(1)
    ids, mask, _, chained, fresh = two_calls(params, params)
    whole, _ = SAMPLE(params, ids, mask, jax.random.key(3), fresh, np.ones((G,), bool),
                      np.int32(G))
    np.testing.assert_array_equal(np.asarray(chained.mask), np.asarray(whole.mask))
    np.testing.assert_array_equal(np.asarray(chained.tokens), np.asarray(whole.tokens))
    P, lengths = ids.shape[1], np.asarray(whole.mask).sum(1)
    for row in range(G * K):
        real = slice(P - int(mask[row // K].sum()), P + int(lengths[row]))
        np.testing.assert_array_equal(np.asarray(chained.experts)[row, real],
                                      np.asarray(whole.experts)[row, real], err_msg=str(row))


def test_a_row_resumed_under_new_weights_keeps_its_experts_and_routes_new_tokens_under_them():
    """Weights A draw the first tokens, B the rest. The experts of what A sampled (prompt and
    tokens) are A's, kept; B's tokens are routed by B over that replayed prefix. Replaying the
    row's experts, A's forward gives A's log-probs of A's tokens and B's gives B's of B's
    (float32); B routing the prefix itself would not."""
    params_a, params_b = moe_params(1), moe_params(2)
    ids, mask, (gen_a, fin_a, lengths_a, carried), gen_b, _ = two_calls(params_a, params_b)
    P = ids.shape[1]
    started = lengths_a > 0
    for row in np.flatnonzero(started):  # prompt and A's tokens: A's experts, kept
        kept = slice(0, P + int(lengths_a[row]))
        np.testing.assert_array_equal(np.asarray(gen_b.experts)[row, kept],
                                      np.asarray(gen_a.experts)[row, kept], err_msg=str(row))
    full, full_mask = rows_of(ids, mask, gen_b)
    by_a = np.arange(N)[None] < lengths_a[:, None]
    response = np.asarray(gen_b.mask) > 0

    @functools.partial(jax.jit, static_argnums=2)
    def scored(params, cut, replay=True):
        """The row's log-probs replaying its experts (or routing itself) and how many (layer,
        token)s of the rows cut after `cut [Q]` response tokens the router would route
        otherwise than recorded."""
        visible = full_mask * (jnp.arange(P + N)[None] < P + cut[:, None])
        out = tfm.token_outputs(MOE, params, full, visible, last=N, experts=gen_b.experts,
                                replay=replay, with_router=True)
        return out.logprobs, jnp.sum(out.router.differs)

    whole, sampled = np.full(G * K, N), np.asarray(gen_b.logprobs)
    (by_a_weights, _), (by_b_weights, differs), (own, _) = (
        scored(params_a, whole), scored(params_b, whole), scored(params_b, whole, False))
    gap_a = np.abs(np.asarray(by_a_weights) - sampled)[by_a & response]
    gap_b = np.abs(np.asarray(by_b_weights) - sampled)[~by_a & response]
    own = np.abs(np.asarray(own) - sampled)
    resumed_by_b = ~by_a & response & carried[:, None]  # B's tokens after A's in one row
    print(f"replayed: gap A {gap_a.max():.1e}, B {gap_b.max():.1e}; B routing itself: "
          f"{own[resumed_by_b].max():.1e}")
    assert gap_a.max() < 1e-5 and gap_b.max() < 1e-5
    assert own[resumed_by_b].max() > 1e-3
    # B's router over the replayed row chooses, at B's tokens, what was recorded for them (and
    # at A's, often not): the rows cut after A's tokens count all of A's positions' differences.
    at_a = float(scored(params_b, lengths_a)[1])
    assert float(differs) - at_a == 0 and at_a > 0


# ---------------------------------------------------------------------------------------------
# The GRPO loop with partial rollouts and routing replay.


def replay_setup(config):
    """A GRPO setup on the tiny mixture of experts whose pool carries experts."""
    from jrlhf.setups import make_setup

    setup = make_setup("grpo", config, MOE, moe_params(0))
    pool = setup.state.rl.pool
    C, P = pool.prompt_ids.shape
    if pool.experts is None:  # what `setups.rollout_pool` builds when routing is replayed
        pool = RolloutPool.empty(C, len(pool.budgets) // C, P, config.rollout.max_new_tokens,
                                 experts=L_K)
    # Committed to one device like every later state (the updated one): compiled once.
    state = jax.device_put(setup.state.replace(rl=setup.state.rl.replace(pool=pool)),
                           jax.devices()[0])
    return dataclasses.replace(setup, state=state)


@pytest.fixture(scope="module")
def replayed_run():
    """Three GRPO iterations with `routing_replay=on, max_staleness=1`: each update's batch,
    the log-probs of its single-pass forward (`policy_outputs` under the pre-update weights,
    the batch's experts replayed), the versions of its tokens (`partial.settle`'s), and the
    final state."""
    from test_ppo_loop import count_target

    from jrlhf.rollouts import Reward, RolloutLoop
    from jrlhf.steps.rollout import policy_outputs, recorded_experts

    setup = replay_setup(CONFIG)
    seen, update, settle = [], setup.step, partial.settle
    forward = jax.jit(functools.partial(policy_outputs, policy_cfg=setup.model_cfg,
                                        value_cfg=None), static_argnums=3)

    def step(state, batch):
        experts, replay = recorded_experts(batch)
        assert replay
        logprobs = forward({"policy": state.params}, batch["input_ids"],
                           batch["attention_mask"], N, temperature=batch["temperature"],
                           experts=experts)[0]
        seen[-1].update(batch=jax.tree.map(np.asarray, batch), logprobs=np.asarray(logprobs))
        return update(state, batch)

    def settled(queue, mask, finished, iteration, groups):
        out = settle(queue, mask, finished, iteration, groups)
        seen.append({"iteration": iteration, "settled": out})
        return out

    stream = PromptStream()
    loop = RolloutLoop(dataclasses.replace(setup, step=step), CONFIG, Reward(fn=count_target),
                       eos_token_id=EOS, more_prompts=stream)
    state, history = setup.state, []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(partial, "settle", settled)
        for _ in range(CONFIG.grpo.iterations):
            state, metrics = loop(state, next(stream))
            history.append(metrics)
    return seen, history, state


def test_replayed_partial_rollouts_score_the_current_versions_tokens_as_sampled(replayed_run):
    """The update's log-probs (pre-update weights: the current version) of the tokens this
    version drew equal their behaviour log-probs in float32 — in rows resumed from an older
    version too, whose earlier tokens' log-probs have moved with the weights."""
    seen, history, _ = replayed_run
    resumed_current, stale_gap, current_gap = 0, 0.0, 0.0
    for it in seen:
        batch, settled = it["batch"], it["settled"]
        assert batch["experts"].shape == (4 * K, 4 + N, *L_K) and "sampler_experts" not in batch
        versions = settled.versions[partial.group_rows(settled.chosen, K)]
        response = batch["response_mask"] > 0
        current = response & (versions == it["iteration"])
        older = response & ~current
        gap = np.abs(it["logprobs"] * response - batch["sampler_logprobs"])
        current_gap = max(current_gap, gap[current].max())
        if older.any():
            stale_gap = max(stale_gap, gap[older].max())
        resumed_current += int((current & older.any(1, keepdims=True)).sum())
    print(f"current version: gap {current_gap:.1e} ({resumed_current} of its tokens follow "
          f"older ones in their rows); older versions: {stale_gap:.1e}")
    assert current_gap < 1e-5
    assert resumed_current > 0 and stale_gap > 1e-3
    assert max(m["partial/version_lag_max"] for m in history) == 1


def test_a_checkpointed_pool_with_experts_round_trips(replayed_run, tmp_path):
    """The pool's experts are saved and restored byte for byte; a template whose pool carries
    none (routing replay off) is refused in one line naming them."""
    from jrlhf.checkpoint import Checkpointer, LayoutMismatch

    _, _, state = replayed_run
    pool = state.rl.pool
    in_flight = np.repeat(np.asarray(pool.occupied), K) & ~np.asarray(pool.finished)
    assert in_flight.any() and np.asarray(pool.experts)[in_flight].any()
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(3, state)
    ckpt.wait()
    template = replay_setup(CONFIG).state
    restored, _ = ckpt.restore(template, log=None)
    jax.tree.map(np.testing.assert_array_equal, restored.rl, state.rl)
    jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)
    without = template.replace(rl=template.rl.replace(pool=template.rl.pool.replace(
        experts=None)))
    with pytest.raises(LayoutMismatch, match=r"holds rl/pool/experts \(48, 12, 2, 2\) int32"):
        ckpt.restore(without, log=None)
    ckpt.close()


def test_the_config_takes_routing_replay_with_partial_rollouts():
    from jrlhf.config import RolloutConfig

    for mode in ("on", "measure"):
        assert RolloutConfig(slots=8, max_staleness=2, routing_replay=mode).max_staleness == 2


def test_replay_off_pools_carry_no_experts():
    """Dense runs and replay-off runs keep the pool (and its checkpoint layout) as before."""
    from jrlhf.checkpoint import _rl_arrays
    from jrlhf.state import RLState

    pool = RolloutPool.empty(2, 2, 3, 4)
    assert pool.experts is None
    assert "experts" not in _rl_arrays(RLState.create(pool=pool))["pool"]
    assert RolloutPool.empty(2, 2, 3, 4, experts=(5, 2)).experts.shape == (4, 7, 5, 2)
