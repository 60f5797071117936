"""Shared prompts (`grpo.shared_prompt`): a group's K samples run their common prompt through the
model once. The forward, its gradients and its router statistics equal the full rows' on every
attention variant (GQA, sliding windows, soft-capping, sinks, mixtures of experts with replayed
routing); padding changes nothing; the GRPO update equals the unshared one; minibatches hold
whole groups; bench counts the tokens once."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from conftest import FAMILY_CONFIGS, TINY_CONFIGS
from jrlhf.algorithms import ModelPass
from jrlhf.config import GRPOConfig
from jrlhf.models import transformer as tfm
from jrlhf.models.config import from_hf_config
from jrlhf.steps import make_grpo_step
from jrlhf.steps.common import minibatch_epochs
from jrlhf.steps.grpo import prompt_group_size
from test_preference import group_rollout
from test_steps import CFG, OPT_EQ, make_state

G, K, P, N = 3, 4, 9, 7


def model(name):
    model_type, kwargs = {**TINY_CONFIGS, **FAMILY_CONFIGS}[name]
    cfg = from_hf_config(transformers.AutoConfig.for_model(model_type, **kwargs))
    return cfg, tfm.init_params(cfg, 1)


def grouped_rows(vocab, seed=0):
    """`(ids, mask [G·K, P+N], response_mask [G·K, N])`: G left-padded prompts of different
    lengths (one full, most longer than the families' window of 5), each repeated K times,
    then right-padded responses of different lengths (one empty, one full)."""
    rng = np.random.RandomState(seed)
    prompt_lengths, response_lengths = [P, 1, 6], rng.randint(1, N, G * K)
    response_lengths[:2] = (N, 0)
    prompt_ids, prompt_mask = np.zeros((G, P), np.int32), np.zeros((G, P), np.int32)
    for g, n in enumerate(prompt_lengths):
        prompt_ids[g, P - n:], prompt_mask[g, P - n:] = rng.randint(2, vocab, n), 1
    response_ids, response_mask = np.zeros((G * K, N), np.int32), np.zeros((G * K, N), np.int32)
    for b, n in enumerate(response_lengths):
        response_ids[b, :n], response_mask[b, :n] = rng.randint(2, vocab, n), 1
    ids = np.concatenate([np.repeat(prompt_ids, K, 0), response_ids], 1)
    mask = np.concatenate([np.repeat(prompt_mask, K, 0), response_mask], 1)
    return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(response_mask)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "mistral_window", "gemma2", "qwen3_moe",
                                  "gpt_oss"])
def test_shared_prompt_forward_equals_the_full_rows(name):
    """Log-probs and entropies within 2e-6, gradients within 1e-5 of their scale, router
    statistics (a prompt token counted K times) within 1e-5 relative; recorded experts
    replayed the same way in both."""
    cfg, params = model(name)
    ids, mask, response_mask = grouped_rows(cfg.vocab_size)
    temperature = jnp.linspace(0.7, 1.0, G * K)
    experts = None
    if cfg.is_moe:  # recorded routing, the prompt's the same for a group's rows
        sampled = np.random.RandomState(3).randint(
            0, cfg.num_experts, (G, P + N, len(cfg.sparse_layers), cfg.experts_per_token))
        experts = jnp.asarray(np.repeat(sampled, K, 0))
        experts = experts.at[:, P:].set(np.random.RandomState(4).randint(
            0, cfg.num_experts, experts[:, P:].shape))

    def outputs(p, group_size):
        return tfm.token_outputs(cfg, p, ids, mask, last=N, temperature=temperature,
                                 with_entropy=True, with_router=cfg.is_moe, experts=experts,
                                 group_size=group_size)

    def objective(p, group_size):
        out = outputs(p, group_size)
        return (jnp.sum(out.logprobs * response_mask)
                + 0.1 * jnp.sum(out.entropy * response_mask)), out

    # One compiled forward and backward per layout: outputs and gradients together.
    run = jax.jit(jax.grad(objective, has_aux=True), static_argnums=1)
    (full_grads, full), (shared_grads, shared) = run(params, 1), run(params, K)
    m = np.asarray(response_mask)
    np.testing.assert_allclose(np.asarray(shared.logprobs) * m, np.asarray(full.logprobs) * m,
                               atol=2e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(shared.entropy) * m, np.asarray(full.entropy) * m,
                               atol=2e-6, rtol=0)
    if cfg.is_moe:
        for a, b in zip(jax.tree.leaves(shared.router), jax.tree.leaves(full.router)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    for a, b in zip(jax.tree.leaves(shared_grads), jax.tree.leaves(full_grads)):
        np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(np.abs(b).max())), rtol=0)


def test_padding_has_no_effect_on_the_shared_forward():
    """Other ids on the padded prompt and response columns: the same log-probs, bit for bit
    on the real tokens' neighbours' scale (1e-6)."""
    cfg, params = model("mistral_window")
    ids, mask, response_mask = grouped_rows(cfg.vocab_size)
    noisy = jnp.where(mask > 0, ids, (ids * 7 + 5) % cfg.vocab_size)

    @jax.jit
    def logprobs(x):
        return tfm.token_outputs(cfg, params, x, mask, last=N, group_size=K).logprobs * (
            response_mask)

    np.testing.assert_allclose(logprobs(noisy), logprobs(ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("options", [dict(), dict(epochs=2), dict(grad_accum_steps=2, epochs=2),
                                     dict(minibatch_size=8)])
def test_grpo_update_with_shared_prompts_equals_the_unshared_one(options):
    """Same parameters within 1e-6 after the update (one minibatch: the groups' order is the
    only other difference) and `prompt_mismatch` 0; with minibatches of two groups the shared
    update runs (whole groups per minibatch) and logs the metric too."""
    params = tfm.init_params(CFG, 0)
    batch = group_rollout(params)
    results = {}
    for shared in (True, False):
        cfg = GRPOConfig(group_size=4, shared_prompt=shared, **options)
        assert prompt_group_size(cfg, 16) == (4 if shared else 1)
        state = make_state(params, OPT_EQ)[0]
        new, metrics = make_grpo_step(CFG, cfg, state=state)(state, batch)
        results[shared] = (jax.tree.map(np.asarray, new.params), metrics)
    assert float(results[True][1]["grpo/prompt_mismatch"]) == 0.0
    assert "grpo/prompt_mismatch" not in results[False][1]
    if "minibatch_size" not in options:  # the same minibatch, groups in another order
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
                     results[True][0], results[False][0])
        np.testing.assert_allclose(float(results[True][1]["grpo/loss"]),
                                   float(results[False][1]["grpo/loss"]), atol=1e-6)


def test_prompt_mismatch_reports_rows_that_do_not_share_their_prompt():
    params = tfm.init_params(CFG, 0)
    batch = group_rollout(params)
    batch["input_ids"] = batch["input_ids"].copy()
    batch["input_ids"][5, 0] += 1  # one row of the second group
    cfg = GRPOConfig(group_size=4)
    state = make_state(params, OPT_EQ)[0]
    _, metrics = make_grpo_step(CFG, cfg, state=state)(state, batch)
    assert float(metrics["grpo/prompt_mismatch"]) == pytest.approx(1 / 16)


def test_whole_groups_are_shuffled_into_minibatches_and_otherwise_not_used():
    """`minibatch_epochs(group_size=4)`: every minibatch of 8 rows is two whole groups in
    order, over 3 epochs; `prompt_group_size` turns sharing off when a minibatch or a
    micro-batch would split a group."""
    state = make_state({"w": jnp.zeros(3)}, OPT_EQ)[0]
    data = {"row": jnp.arange(16)}

    def grad_fn(params, mb):
        rows = mb["row"].reshape(2, 4)
        whole = jnp.all(rows == rows[:, :1] + jnp.arange(4)) & jnp.all(rows[:, 0] % 4 == 0)
        return (0.0, {"whole": whole.astype(jnp.float32)}), jax.tree.map(jnp.zeros_like, params)

    _, metrics = minibatch_epochs(state, data, grad_fn, epochs=3, num_minibatches=2,
                                  key=jax.random.key(0), group_size=4)
    assert float(metrics["whole"]) == 1.0
    assert prompt_group_size(GRPOConfig(group_size=4, minibatch_size=6), 12) == 1
    assert prompt_group_size(GRPOConfig(group_size=4, minibatch_size=8, grad_accum_steps=4),
                             16) == 1
    assert prompt_group_size(GRPOConfig(group_size=4, minibatch_size=8, grad_accum_steps=2),
                             16) == 4


def test_a_shared_prompt_is_counted_once_in_the_cost():
    """16 rows of 64 + 64 tokens in groups of 4: 4·64 + 16·64 = 1280 backbone tokens."""
    full = ModelPass(CFG, rows=16, length=128, live_rows=16, lm_positions=64)
    assert full.tokens(16) == 16 * 128
    assert dataclasses.replace(full, group_size=4, prompt_positions=64).tokens(16) == 1280
