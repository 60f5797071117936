"""The KV-cache sampler: greedy parity with transformers, the sampled distribution, log-probs
that the trainer agrees with, EOS handling, and sharding."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jrlhf import models, rl, sharding
from jrlhf.config import MeshConfig, PPOConfig
from jrlhf.models import ModelConfig, init_params
from jrlhf.sampling import filter_logits, generate
from jrlhf.steps import make_ppo_step
from jrlhf.steps.rollout import policy_outputs, score_rollout
from test_models import left_padded_batch
from test_steps import OPT_EQ, make_state

CFG = ModelConfig(family="llama", vocab_size=32, hidden_size=32, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, intermediate_size=64, scalar_head=True)


def prompts(B=8, seed=0, vocab=32):
    ids, mask = left_padded_batch(vocab, [3 + (b * 5) % 7 for b in range(B)], seed=seed)
    return jnp.asarray(ids), jnp.asarray(mask)


def sampled_logprobs_by_forward(cfg, params, ids, mask, out, temperature):
    full_ids = jnp.concatenate([ids, out.tokens], 1)
    full_mask = jnp.concatenate([mask, out.mask], 1)
    logits = models.forward(cfg, params, full_ids, full_mask)
    N = out.tokens.shape[1]
    return rl.logprobs_from_logits(logits[:, -N - 1:-1] / temperature, out.tokens) * out.mask


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_greedy_generate_equals_transformers(name, hf_folder):
    torch_model, folder = hf_folder(name)
    cfg, params = models.load_pretrained(folder)
    lengths = [5, 2, 8]
    ids, mask = left_padded_batch(cfg.vocab_size, lengths, seed=9)
    out = generate(cfg, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0),
                   max_new_tokens=6, temperature=0.0, pad_token_id=0)
    T = ids.shape[1]
    for b, n in enumerate(lengths):
        with torch.no_grad():
            ref = torch_model.generate(torch.tensor(ids[b:b + 1, T - n:]), max_new_tokens=6,
                                       do_sample=False, pad_token_id=0, eos_token_id=None)
        np.testing.assert_array_equal(np.asarray(out.tokens[b]), ref[0, n:].numpy())


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_returned_logprobs_equal_full_forward(temperature):
    params = init_params(CFG, 0)
    ids, mask = prompts()
    out = generate(CFG, params, ids, mask, jax.random.key(1), max_new_tokens=7,
                   temperature=temperature, eos_token_id=5, pad_token_id=0)
    ref = sampled_logprobs_by_forward(CFG, params, ids, mask, out, temperature)
    np.testing.assert_allclose(out.logprobs, ref, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_ppo_ratio_is_one_before_any_update(temperature):
    """The trainer's log-probs of sampled tokens equal the sampler's: ratio 1, approx-KL 0.
    The temperature is given once, to the sampler: the scored batch and the step read it from
    the rows (`Generation.temperature`), so no second place can disagree with it."""
    params = {"policy": init_params(CFG, 0)}
    ids, mask = prompts()
    out = generate(CFG, params["policy"], ids, mask, jax.random.key(2), max_new_tokens=6,
                   temperature=temperature, eos_token_id=5, pad_token_id=0)
    np.testing.assert_array_equal(out.temperature, np.full(8, temperature, np.float32))
    full_ids = jnp.concatenate([ids, out.tokens], 1)
    full_mask = jnp.concatenate([mask, out.mask], 1)
    logprobs, _, _ = policy_outputs(params, full_ids, full_mask, 6, policy_cfg=CFG,
                                    value_cfg=None, temperature=temperature)
    log_ratio = np.asarray(logprobs * out.mask - out.logprobs)
    assert np.abs(log_ratio).max() < 1e-5
    batch, scores = score_rollout(params, params["policy"], None, ids, mask, out,
                                  policy_cfg=CFG, value_cfg=None,
                                  reward_fn=lambda *a: jnp.ones(8))
    np.testing.assert_allclose(batch["logprobs"], batch["sampler_logprobs"], atol=1e-5)
    state = make_state(params, OPT_EQ, kl_coef=0.05)[0]
    _, metrics = make_ppo_step(CFG, PPOConfig(epochs=1))(state, dict(batch, scores=scores))
    assert float(metrics["ppo/approx_kl"]) < 1e-10
    assert float(metrics["ppo/clipfrac"]) == 0.0
    assert float(metrics["mismatch/gap_max"]) < 1e-5


def test_greedy_rows_record_temperature_one_and_their_logprobs_under_the_plain_logits():
    params = init_params(CFG, 0)
    ids, mask = prompts()
    out = generate(CFG, params, ids, mask, jax.random.key(0), max_new_tokens=4,
                   temperature=0.0, eos_token_id=5, pad_token_id=0)
    np.testing.assert_array_equal(out.temperature, np.ones(8, np.float32))
    ref = sampled_logprobs_by_forward(CFG, params, ids, mask, out, 1.0)
    np.testing.assert_allclose(out.logprobs, ref, atol=1e-5)
    assert float(jnp.min(jnp.where(out.mask > 0, out.logprobs, -1.0))) < 0  # not zeros


def test_filter_logits_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]]))
    neg = float(jnp.finfo(jnp.float32).min)
    np.testing.assert_array_equal(filter_logits(logits, top_k=2)[0, 2:], [neg, neg])
    kept = np.asarray(filter_logits(logits, top_p=0.65)[0]) > neg
    np.testing.assert_array_equal(kept, [True, True, False, False])  # 0.4 < 0.65 <= 0.7
    kept = np.asarray(filter_logits(logits, top_p=0.7)[0]) > neg
    np.testing.assert_array_equal(kept, [True, True, False, False])
    kept = np.asarray(filter_logits(logits, top_p=0.71)[0]) > neg
    np.testing.assert_array_equal(kept, [True, True, True, False])
    kept = np.asarray(filter_logits(logits, top_p=0.1)[0]) > neg
    np.testing.assert_array_equal(kept, [True, False, False, False])  # the top token always


@pytest.mark.slow
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.8), (6, 0.9)])
def test_sampling_matches_filtered_distribution(top_k, top_p):
    """n=8000 draws of the first token; every frequency within 0.02 of the filtered softmax
    (4.5 sigma for p=0.5) and tokens outside the filtered set never drawn. Fixed seed."""
    n, temperature = 8000, 0.7
    params = init_params(CFG, 3)
    ids = jnp.tile(jnp.array([[4, 9, 2]]), (n, 1))
    out = generate(CFG, params, ids, jnp.ones_like(ids), jax.random.key(4), max_new_tokens=1,
                   temperature=temperature, top_k=top_k, top_p=top_p)
    logits = models.forward(CFG, params, ids[:1], jnp.ones_like(ids[:1]))[0, -1] / temperature
    probs = np.asarray(jax.nn.softmax(filter_logits(logits[None], top_k, top_p))[0])
    freq = np.bincount(np.asarray(out.tokens[:, 0]), minlength=CFG.vocab_size) / n
    assert np.all(freq[probs == 0] == 0)
    assert np.abs(freq - probs).max() < 0.02, (freq, probs)
    if top_k:
        assert (probs > 0).sum() == top_k


def test_eos_stops_rows_and_pads_after():
    params = init_params(CFG, 0)
    ids, mask = prompts()
    free = generate(CFG, params, ids, mask, jax.random.key(5), max_new_tokens=10,
                    temperature=1.0, pad_token_id=31)
    tokens = np.asarray(free.tokens)
    eos = int(tokens[0, 3])  # a token that row 0 emits at step 3: now make it EOS
    out = generate(CFG, params, ids, mask, jax.random.key(5), max_new_tokens=10,
                   temperature=1.0, eos_token_id=eos, pad_token_id=31)
    got, m, lp = np.asarray(out.tokens), np.asarray(out.mask), np.asarray(out.logprobs)
    for b in range(8):
        hits = np.flatnonzero(tokens[b] == eos)
        stop = hits[0] + 1 if len(hits) else 10
        # Identical up to and including EOS (same keys per step), padding after it.
        np.testing.assert_array_equal(got[b, :stop], tokens[b, :stop])
        assert np.all(got[b, stop:] == 31) and np.all(m[b, stop:] == 0) and np.all(m[b, :stop] == 1)
        assert np.all(lp[b, stop:] == 0)
    assert got[0, 3] == eos and m[0, 3] == 1


@pytest.mark.parametrize("num_samples,per_sample", [(1, False), (2, False), (2, True)])
def test_per_row_budgets_stop_each_row_after_its_own_count(num_samples, per_sample):
    """A row with budget b keeps exactly the first b tokens (and log-probs) it samples without
    one, then pads; budgets are one per prompt (its K samples share it) or one per output row;
    the loop ends at the largest."""
    params = init_params(CFG, 0)
    ids, mask = prompts()
    budgets = np.array([3, 10, 1, 0, 7, 2, 5, 4])
    if per_sample:
        budgets = np.concatenate([budgets, budgets[::-1]])
    kwargs = dict(max_new_tokens=8, temperature=1.0, pad_token_id=31, num_samples=num_samples)
    free = generate(CFG, params, ids, mask, jax.random.key(5), **kwargs)
    out = generate(CFG, params, ids, mask, jax.random.key(5), budgets=jnp.asarray(budgets),
                   **kwargs)
    per_row = np.minimum(budgets if per_sample else np.repeat(budgets, num_samples), 8)
    keep = np.arange(8)[None, :] < per_row[:, None]
    np.testing.assert_array_equal(np.asarray(out.mask), keep.astype(np.int32))
    np.testing.assert_array_equal(np.asarray(out.tokens), np.where(keep, free.tokens, 31))
    np.testing.assert_allclose(out.logprobs, np.where(keep, free.logprobs, 0.0), atol=1e-6)
    assert int(out.steps) == 8
    short = generate(CFG, params, ids, mask, jax.random.key(5), budgets=jnp.full(8, 3),
                     **kwargs)
    assert int(short.steps) == 3  # every row done: the loop stops early
    with pytest.raises(ValueError, match=r"budgets of shape \(5,\): expected one per prompt"):
        generate(CFG, params, ids, mask, jax.random.key(5), budgets=jnp.full(5, 3), **kwargs)


def test_loop_ends_when_every_row_is_done():
    params = init_params(CFG, 0)
    ids, mask = prompts()
    greedy = generate(CFG, params, ids, mask, jax.random.key(0), max_new_tokens=12,
                      temperature=0.0)
    assert int(greedy.steps) == 12
    # With every row's second greedy token as EOS... use one row so that token is shared.
    one_ids, one_mask = ids[:1], mask[:1]
    first = generate(CFG, params, one_ids, one_mask, jax.random.key(0), max_new_tokens=12,
                     temperature=0.0)
    eos = int(first.tokens[0, 1])
    out = generate(CFG, params, one_ids, one_mask, jax.random.key(0), max_new_tokens=12,
                   temperature=0.0, eos_token_id=eos)
    stop = int(np.flatnonzero(np.asarray(first.tokens[0]) == eos)[0]) + 1
    assert int(out.steps) == stop <= 2
    assert int(out.mask.sum()) == stop


def on_a_2x2x2_mesh(params, ids, mask):
    """`(params, ids, mask, batch_sharding)` placed on a (data 2, fsdp 2, tensor 2) mesh of the
    fake CPU devices: weights by `param_shardings`, rows over the batch axes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mesh = sharding.make_mesh(MeshConfig(2, 2, 2))
    batch_sh = sharding.batch_sharding(mesh)
    return (jax.device_put(params, sharding.param_shardings(params, mesh)),
            jax.device_put(ids, batch_sh), jax.device_put(mask, batch_sh), batch_sh)


def test_sharded_generate_equals_unsharded():
    params = init_params(CFG, 0)
    ids, mask = prompts()
    ref = generate(CFG, params, ids, mask, jax.random.key(6), max_new_tokens=6, temperature=1.0,
                   eos_token_id=5)
    sharded_params, ids, mask, batch_sh = on_a_2x2x2_mesh(params, ids, mask)
    out = generate(CFG, sharded_params, ids, mask, jax.random.key(6), max_new_tokens=6,
                   temperature=1.0, eos_token_id=5, batch_sharding=batch_sh)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)
    assert out.tokens.sharding.spec[0] == ("data", "fsdp")
