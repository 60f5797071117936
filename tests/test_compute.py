"""Accelerator compute paths equal the reference paths on CPU: the attention function against a
NumPy reference, packed rows against rows alone, the chunked LM head against full logits
(values and gradients), and the sampler's shared prefill / bf16 weights / bf16 cache."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrlhf import models, rl
from jrlhf.models import ModelConfig, attention, init_params
from jrlhf.models.transformer import chunked_token_logprobs
from jrlhf.sampling import generate
from test_models import left_padded_batch

CFG = ModelConfig(family="llama", vocab_size=40, hidden_size=24, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=6, intermediate_size=56, scalar_head=True)
GPT2 = ModelConfig(family="gpt2", vocab_size=40, hidden_size=24, num_layers=2, num_heads=4,
                   num_kv_heads=4, head_dim=6, intermediate_size=56, activation="gelu_new",
                   tie_word_embeddings=True, attention_bias=True, output_bias=True, mlp_bias=True)


def reference_attention(q, k, v, allowed):
    """NumPy softmax attention with an explicit boolean `allowed [B, T, S]`."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    G = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(allowed[:, None], scores, -np.inf)
    scores -= scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", probs, v)


def qkv(B, T, S=None, H=4, K=2, Dh=8, seed=0):
    rng = np.random.RandomState(seed)
    S = S or T
    return (rng.randn(B, T, H, Dh).astype(np.float32), rng.randn(B, S, K, Dh).astype(np.float32),
            rng.randn(B, S, K, Dh).astype(np.float32))


@pytest.mark.parametrize("window", [None, 3])
def test_self_attention_equals_reference(window):
    q, k, v = qkv(2, 7)
    i, j = np.arange(7)[:, None], np.arange(7)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    out = attention.self_attention(q, k, v, implementation="xla", window=window)
    np.testing.assert_allclose(out, reference_attention(q, k, v, np.broadcast_to(allowed, (2, 7, 7))),
                               atol=1e-5)


def test_segments_never_cross():
    q, k, v = qkv(2, 8, seed=1)
    seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 2, 2, 2, 2, 2, 2, 2]])
    i, j = np.arange(8)[:, None], np.arange(8)[None, :]
    allowed = (j <= i) & (seg[:, :, None] == seg[:, None, :])
    out = attention.self_attention(q, k, v, implementation="xla", segment_ids=jnp.asarray(seg))
    real = seg > 0
    np.testing.assert_allclose(np.asarray(out)[real], reference_attention(q, k, v, allowed)[real],
                               atol=1e-5)


@pytest.mark.parametrize("window", [None, 2])
def test_cached_attention_equals_reference(window):
    q, k, v = qkv(3, 1, S=9, seed=2)
    first, slot = np.array([0, 3, 5]), 6
    s = np.arange(9)[None, :]
    allowed = (s >= first[:, None]) & (s <= slot) & ((s > slot - window) if window else True)
    as_cache = lambda x: jnp.transpose(x, (0, 2, 3, 1))  # noqa: E731  [B, K, Dh, S]
    out = attention.cached_attention(q, as_cache(k), as_cache(v), jnp.asarray(first), slot,
                                     window=window)
    np.testing.assert_allclose(out, reference_attention(q, k, v, allowed[:, None]), atol=1e-5)
    # the cache's layout as prefill builds it: rows rolled back to their padding, zero tail
    entry = attention.cache_entry(k, jnp.asarray([0, 2, 1]), 12, jnp.float32)
    np.testing.assert_array_equal(entry[:, :, :, :9], as_cache(attention.roll_rows(
        k, -jnp.asarray([0, 2, 1]))))
    assert entry.shape == (3, k.shape[2], k.shape[3], 12) and not np.any(entry[..., 9:])


def test_roll_rows_round_trip():
    x = jnp.arange(2 * 5 * 3).reshape(2, 5, 3)
    shift = jnp.array([2, 0])
    rolled = attention.roll_rows(x, shift)
    np.testing.assert_array_equal(rolled[0, 0], x[0, 2])
    np.testing.assert_array_equal(attention.roll_rows(rolled, -shift), x)


def test_implementation_choice_and_errors():
    assert attention.resolve_implementation("auto", "float32", 64, on="cpu") == "xla"
    assert attention.resolve_implementation("auto", "bfloat16", 64, on="gpu") == "cudnn"
    assert attention.resolve_implementation("auto", "float32", 64, on="gpu") == "xla"
    assert attention.resolve_implementation("auto", "bfloat16", 64, on="tpu") == "xla"
    with pytest.raises(ValueError, match="needs a CUDA GPU.*'cpu'"):
        attention.resolve_implementation("cudnn", "bfloat16", 64, on="cpu")
    with pytest.raises(ValueError, match="bfloat16 or float16.*'float32'"):
        attention.resolve_implementation("cudnn", "float32", 64, on="gpu")
    with pytest.raises(ValueError, match="auto, xla, cudnn.*'flash'"):
        attention.resolve_implementation("flash", "float32", 64, on="gpu")
    params = init_params(CFG, 0)
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        models.forward(dataclasses.replace(CFG, attention="cudnn", dtype="bfloat16"), params, ids,
                       ids)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [CFG, GPT2], ids=["llama", "gpt2"])
def test_packed_rows_equal_rows_alone(cfg):
    """Three examples packed into one row (positions restart, attention never crosses) give the
    logits each gives alone; the padding after them changes nothing."""
    params = init_params(cfg, 0)
    rng = np.random.RandomState(3)
    lengths = [4, 6, 3]
    examples = [rng.randint(1, cfg.vocab_size, n) for n in lengths]
    ids = np.zeros((1, 16), np.int32)
    seg = np.zeros((1, 16), np.int32)
    start = 0
    for s, ex in enumerate(examples, 1):
        ids[0, start:start + len(ex)], seg[0, start:start + len(ex)] = ex, s
        start += len(ex)
    ids[0, start:] = 9
    mask = (seg > 0).astype(np.int32)
    packed = np.asarray(models.forward(cfg, params, ids, mask, segment_ids=jnp.asarray(seg)))
    start = 0
    for ex in examples:
        alone = np.asarray(models.forward(cfg, params, ex[None], np.ones((1, len(ex)))))[0]
        np.testing.assert_allclose(packed[0, start:start + len(ex)], alone, atol=1e-5)
        start += len(ex)
    np.testing.assert_array_equal(models.positions_from_segments(jnp.asarray(seg))[0],
                                  [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1, 2, 0, 0, 0])


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [0, 7])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("per_row", [False, True])
def test_chunked_logprobs_entropy_and_gradients_equal_full_logits(chunk, tied, per_row):
    """Also with one temperature per row (a rollout batch's): chunks of 7 positions cut across
    the rows of 8, so each position must keep its own row's temperature."""
    cfg = dataclasses.replace(CFG, tie_word_embeddings=tied, logits_chunk_size=chunk)
    params = init_params(cfg, 0)
    ids, mask = left_padded_batch(cfg.vocab_size, [9, 5, 7], seed=4)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    weights = jnp.asarray(np.random.RandomState(5).rand(3, 8).astype(np.float32)) * mask[:, 1:]
    temperature = jnp.asarray([0.7, 1.3, 0.5])[:, None, None] if per_row else 0.7

    def chunked(p):
        out = models.token_outputs(cfg, p, ids, mask, with_entropy=True,
                                   temperature=temperature[:, 0, 0] if per_row else temperature)
        return jnp.sum(weights * (out.logprobs + 0.3 * out.entropy)), out

    def reference(p):
        logits = models.forward(cfg, p, ids, mask)[:, :-1] / temperature
        logp = rl.logprobs_from_logits(logits, ids[:, 1:])
        ent = rl.entropy_from_logits(logits)
        return jnp.sum(weights * (logp + 0.3 * ent)), (logp, ent)

    (loss, out), grads = jax.jit(jax.value_and_grad(chunked, has_aux=True))(params)
    (ref_loss, (logp, ent)), ref_grads = jax.jit(jax.value_and_grad(reference, has_aux=True))(
        params)
    np.testing.assert_allclose(out.logprobs, logp, atol=1e-5)
    np.testing.assert_allclose(out.entropy, ent, atol=1e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), grads,
                 ref_grads)


def test_chunked_head_never_holds_all_logits():
    """With chunks, no buffer of the program is [B·T, V]: the compiled program's largest
    float32 array is a chunk's logits."""
    V, D = 4096, 16
    hidden = jax.ShapeDtypeStruct((8, 64, D), jnp.float32)
    weight = jax.ShapeDtypeStruct((D, V), jnp.float32)
    targets = jax.ShapeDtypeStruct((8, 64), jnp.int32)

    def temp_bytes(chunk):
        def loss(h, w, t):
            logp, _ = chunked_token_logprobs(h, w, False, t, dtype="float32", chunk_size=chunk)
            return jnp.sum(logp)
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, weight, targets).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full, chunked = temp_bytes(0), temp_bytes(64)
    assert full >= 8 * 64 * V * 4  # the [512, 4096] float32 logits (8 MiB)
    assert chunked < full / 4


def test_shared_prefill_samples_equal_separate_prefills():
    params = init_params(CFG, 0)
    ids, mask = left_padded_batch(CFG.vocab_size, [5, 2, 7], seed=6)
    K = 3
    shared = generate(CFG, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(7),
                      max_new_tokens=6, temperature=1.0, eos_token_id=3, num_samples=K)
    separate = generate(CFG, params, jnp.asarray(np.repeat(ids, K, 0)),
                        jnp.asarray(np.repeat(mask, K, 0)), jax.random.key(7),
                        max_new_tokens=6, temperature=1.0, eos_token_id=3)
    assert shared.tokens.shape == (9, 6)
    np.testing.assert_array_equal(shared.tokens, separate.tokens)
    np.testing.assert_array_equal(shared.mask, separate.mask)
    np.testing.assert_allclose(shared.logprobs, separate.logprobs, atol=1e-6)
    assert len({tuple(r) for r in np.asarray(shared.tokens[:K])}) > 1  # K different samples


def test_bf16_kv_cache_stays_close_to_float32():
    params = init_params(CFG, 0)
    ids, mask = left_padded_batch(CFG.vocab_size, [5, 2, 7], seed=8)
    args = (CFG, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0))
    ref = generate(*args, max_new_tokens=5, temperature=0.0)
    out = generate(*args, max_new_tokens=5, temperature=0.0, cache_dtype="bfloat16")
    np.testing.assert_array_equal(out.tokens, ref.tokens)  # random tiny model: clear argmaxes
    sampled = generate(*args, max_new_tokens=5, temperature=1.0, cache_dtype="bfloat16")
    full = jnp.concatenate([jnp.asarray(ids), sampled.tokens], 1)
    full_mask = jnp.concatenate([jnp.asarray(mask), sampled.mask], 1)
    logp = models.token_outputs(CFG, params, full, full_mask, last=5).logprobs * sampled.mask
    np.testing.assert_allclose(sampled.logprobs, logp, atol=2e-2)


def test_decode_loop_reads_weights_already_in_compute_dtype():
    """With bf16 compute, the float32 -> bf16 conversion of the weights happens once before the
    decode loop: the loop body converts no weight-shaped array."""
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    params = jax.eval_shape(lambda: init_params(cfg, 0))
    ids = jax.ShapeDtypeStruct((2, 5), jnp.int32)
    hlo = jax.jit(lambda p, i: generate(cfg, p, i, jnp.ones_like(i), jax.random.key(0),
                                        max_new_tokens=4)).lower(params, ids).as_text()
    body = hlo[hlo.index("stablehlo.while"):]
    for shape in ("24x56", "56x24", "40x24", "24x40"):  # MLP and embedding / head matrices
        assert f"tensor<{shape}xf32>) -> tensor<{shape}xbf16>" not in body, shape
    assert "tensor<24x56xf32>) -> tensor<24x56xbf16>" in hlo


def test_packed_sft_step_equals_unpacked():
    """Four examples as four right-padded rows, or packed two per row: same loss, same update."""
    from jrlhf.steps import make_sft_step
    from test_steps import OPT_EQ, make_state

    params = init_params(CFG, 0)
    rng = np.random.RandomState(9)
    examples = [(rng.randint(1, 40, p + r), p) for p, r in ((3, 4), (2, 6), (4, 3), (1, 5))]
    T = 16
    rows = {k: np.zeros((4, T), np.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
    packed = {k: np.zeros((2, T), np.int32) for k in (*rows, "segment_ids", "positions")}
    fill = [0, 0]
    for i, (ids, prompt) in enumerate(examples):
        n = len(ids)
        rows["input_ids"][i, :n], rows["attention_mask"][i, :n] = ids, 1
        rows["loss_mask"][i, prompt:n] = 1
        r, start = i % 2, fill[i % 2]
        cols = slice(start, start + n)
        packed["input_ids"][r, cols], packed["attention_mask"][r, cols] = ids, 1
        packed["loss_mask"][r, start + prompt:start + n] = 1
        packed["segment_ids"][r, cols], packed["positions"][r, cols] = i // 2 + 1, np.arange(n)
        fill[r] += n
    step = make_sft_step(CFG)
    ref_state, ref = step(make_state(params, OPT_EQ)[0], rows)
    state, got = step(make_state(params, OPT_EQ)[0], packed)
    np.testing.assert_allclose(got["sft/loss"], ref["sft/loss"], rtol=1e-6)
    assert float(got["sft/tokens"]) == float(ref["sft/tokens"]) == 18
    np.testing.assert_allclose(got["sft/grad_norm"], ref["sft/grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), state.params,
                 ref_state.params)


def test_loader_packs_whole_examples():
    from jrlhf.data.pipeline import make_loader

    lengths = [3, 5, 2, 6, 4, 7, 1, 8]
    source = [{"input_ids": np.arange(1, n + 1, dtype=np.int32) + 100 * i,
               "attention_mask": np.ones(n, np.int32), "loss_mask": np.ones(n, np.int32)}
              for i, n in enumerate(lengths)]
    batches = make_loader(source, dict, 2, shuffle=False, pack_length=10)
    seen = []
    for _ in range(2):
        batch = next(batches)
        assert batch["input_ids"].shape == (2, 10)
        for row in range(2):
            seg, pos, ids = (batch[k][row] for k in ("segment_ids", "positions", "input_ids"))
            np.testing.assert_array_equal(batch["attention_mask"][row], seg > 0)
            for s in range(1, seg.max() + 1):
                cols = seg == s
                np.testing.assert_array_equal(pos[cols], np.arange(cols.sum()))
                seen.append(ids[cols][0] // 100)
                np.testing.assert_array_equal(ids[cols] % 100, np.arange(1, cols.sum() + 1))
    assert sorted(seen)[:6] == [0, 1, 2, 3, 4, 5]  # whole examples, in first-fit order


def packed_groups(groups, T, L, vocab_pad=0):
    """Groups of (prompt, [responses]) as unpacked `[G, K, T]` right-padded rows and as packed
    `[G, L]` rows (response k = segment k + 1)."""
    G, K = len(groups), max(len(r) for _, r in groups)
    ids, mask, loss = (np.zeros((G, K, T), np.int32) for _ in range(3))
    packed = {k: np.zeros((G, L), np.int32) for k in ("input_ids", "attention_mask", "loss_mask",
                                                      "segment_ids", "positions")}
    for g, (prompt, responses) in enumerate(groups):
        start = 0
        for k, response in enumerate(responses):
            seq = np.concatenate([prompt, response])
            n = len(seq)
            ids[g, k, :n], mask[g, k, :n], loss[g, k, len(prompt):n] = seq, 1, 1
            cols = slice(start, start + n)
            packed["input_ids"][g, cols], packed["attention_mask"][g, cols] = seq, 1
            packed["loss_mask"][g, start + len(prompt):start + n] = 1
            packed["segment_ids"][g, cols], packed["positions"][g, cols] = k + 1, np.arange(n)
            start += n
    return (ids, mask, loss), packed


def random_groups(G, K, seed, absent=()):
    rng = np.random.RandomState(seed)
    groups = []
    for g in range(G):
        prompt = rng.randint(1, 40, rng.randint(2, 5))
        k = K - 1 if g in absent else K
        groups.append((prompt, [rng.randint(1, 40, rng.randint(1, 5)) for _ in range(k)]))
    return groups


def test_packed_reward_step_equals_unpacked():
    from jrlhf.steps import make_reward_step
    from test_steps import OPT_EQ, make_state

    cfg = dataclasses.replace(CFG, lm_head=False, scalar_head=True)
    params = init_params(cfg, 1)
    (ids, mask, _), packed = packed_groups(random_groups(3, 3, 10, absent=(1,)), 9, 27)
    ranks = np.array([[1, 2, 3], [2, 1, -1], [1, 1, 2]], np.int32)
    step = make_reward_step(cfg)
    ref_state, ref = step(make_state(params, OPT_EQ)[0],
                          {"input_ids": ids, "attention_mask": mask, "ranks": ranks})
    packed.pop("loss_mask")
    state, got = step(make_state(params, OPT_EQ)[0], dict(packed, ranks=ranks))
    for k in ("reward/loss", "reward/accuracy", "reward/margin", "reward/num_pairs",
              "reward/grad_norm"):
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), state.params,
                 ref_state.params)


@pytest.mark.slow
@pytest.mark.parametrize("orpo", [False, True])
def test_packed_dpo_and_orpo_steps_equal_unpacked(orpo):
    from jrlhf.config import DPOConfig
    from jrlhf.steps import make_dpo_step, reference_logps
    from test_steps import OPT_EQ, make_state

    params = init_params(CFG, 2)
    (ids, mask, loss), packed = packed_groups(random_groups(4, 2, 11), 9, 20)
    pairs = {f"{side}_{k}": x[:, i] for i, side in enumerate(("chosen", "rejected"))
             for k, x in (("ids", ids), ("mask", mask), ("loss_mask", loss))}
    if not orpo:
        ref_params = init_params(CFG, 3)
        ref = reference_logps(CFG, ref_params, pairs)
        ref_packed = reference_logps(CFG, ref_params, packed)
        for k in ref:
            np.testing.assert_allclose(ref_packed[k], ref[k], rtol=1e-5, err_msg=k)
        pairs, packed = dict(pairs, **ref), dict(packed, **ref)
    step = make_dpo_step(CFG, DPOConfig(beta=0.3), orpo=orpo)
    ref_state, want = step(make_state(params, OPT_EQ)[0], pairs)
    state, got = step(make_state(params, OPT_EQ)[0], packed)
    for k in want:
        if k != "state/finite":
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), state.params,
                 ref_state.params)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [{}, {"scan_layers": True}, {"remat": "full"}])
def test_residual_barrier_leaves_loss_and_gradients_unchanged(variant):
    """The XLA:CPU residual-gradient barrier (a conditional on each layer's output cotangent):
    the same loss and gradients as without it, one conditional per layer in the compiled
    backward (none without it), and "auto" means on here, on CPU."""
    import re

    from jrlhf.models.transformer import gradient_barrier, uses_residual_barrier

    ids, mask = left_padded_batch(GPT2.vocab_size, [9, 6, 3], seed=4)
    params = init_params(GPT2, 0)
    weights = jnp.asarray(np.random.RandomState(0).randn(3, 9, GPT2.vocab_size), jnp.float32)

    def run(barrier):
        cfg = dataclasses.replace(GPT2, residual_barrier=barrier, **variant)
        loss = jax.jit(jax.value_and_grad(
            lambda p: jnp.sum(weights * models.forward(cfg, p, ids, mask))))
        text = loss.lower(params).compile().as_text()
        return loss(params), len(re.findall(r"\bconditional\(", text))

    (loss_on, grads_on), conds_on = run("on")
    (loss_off, grads_off), conds_off = run("off")
    np.testing.assert_allclose(loss_on, loss_off, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 grads_on, grads_off)
    assert conds_off == 0
    assert conds_on == (1 if variant.get("scan_layers") else GPT2.num_layers)
    assert uses_residual_barrier(GPT2) and not uses_residual_barrier(
        dataclasses.replace(GPT2, residual_barrier="off"))
    # A cotangent that is already non-finite comes back all NaN (the step stops on it anyway).
    g = jax.grad(lambda x: jnp.sum(gradient_barrier(x) * jnp.array([jnp.inf, 1.0])))(
        jnp.ones(2))
    assert np.isnan(np.asarray(g)).all()
    with pytest.raises(ValueError, match=re.escape("residual_barrier must be auto|on|off, got "
                                                   "'yes'")):
        dataclasses.replace(GPT2, residual_barrier="yes")


GEMMA_LIKE = dataclasses.replace(
    CFG, num_layers=3, sliding_window=3, layer_types=("sliding_attention", "full_attention",
                                                      "sliding_attention"),
    qk_norm=True, norm_plus_one=True, sandwich_norms=True, scale_embeddings=True,
    attn_softcap=5.0, query_scale=0.3, activation="gelu_pytorch_tanh")


@pytest.mark.slow
@pytest.mark.parametrize("cfg,variant", [
    (CFG, {}), (dataclasses.replace(GPT2, lm_head=False, scalar_head=True), {}),
    (GEMMA_LIKE, {}), (CFG, {"scan_layers": True}), (CFG, {"remat": "full"}),
    (dataclasses.replace(CFG, num_layers=1), {})],
    ids=["llama", "gpt2", "gemma-like", "scan", "remat", "one-layer"])
def test_reading_a_few_positions_equals_the_full_forward(cfg, variant):
    """`token_scores(read=...)` (the last layer's queries at the read columns only) equals the
    full forward's scores gathered there — values and gradients, on left-padded rows, right-
    padded rows and packed rows — and `reward_scores` reads each row's last real token."""
    cfg = dataclasses.replace(cfg, **variant)
    params = init_params(cfg, 0)
    left_ids, left_mask = left_padded_batch(cfg.vocab_size, [9, 6, 3, 1], seed=5)
    right_ids, right_mask = np.zeros_like(left_ids), np.zeros_like(left_mask)
    for b, n in enumerate([9, 6, 3, 1]):
        right_ids[b, :n], right_mask[b, :n] = left_ids[b, -n:], 1
    rng = np.random.RandomState(1)
    for ids, mask in ((left_ids, left_mask), (right_ids, right_mask)):
        real = [np.flatnonzero(row) for row in mask]
        read = np.stack([rng.choice(cols, 2) for cols in real]).astype(np.int32)  # [B, 2]

        def full(p):
            scores = models.token_scores(cfg, p, ids, mask)
            return jnp.take_along_axis(scores, jnp.asarray(read), axis=1)

        def partial(p):
            return models.token_scores(cfg, p, ids, mask, read=jnp.asarray(read))

        np.testing.assert_allclose(partial(params), full(params), atol=1e-5)
        weights = jnp.asarray(rng.randn(*read.shape), jnp.float32)
        g_full = jax.grad(lambda p: jnp.sum(weights * full(p)))(params)
        g_partial = jax.grad(lambda p: jnp.sum(weights * partial(p)))(params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g_partial,
                     g_full)
        last = [cols[-1] for cols in real]
        np.testing.assert_allclose(
            models.reward_scores(cfg, params, ids, mask),
            np.asarray(models.token_scores(cfg, params, ids, mask))[np.arange(4), last],
            atol=1e-5)
    # Packed rows: each segment's last token, attention never crossing segments.
    seg = np.array([[1, 1, 1, 2, 2, 3, 3, 3, 0], [1, 1, 1, 1, 1, 1, 2, 2, 2]], np.int32)
    ids = left_ids[:2]
    mask = (seg > 0).astype(np.int32)
    last = rl.segment_last_index(jnp.asarray(seg), 3)
    full = jnp.take_along_axis(models.token_scores(cfg, params, ids, mask,
                                                   segment_ids=jnp.asarray(seg)), last, axis=1)
    np.testing.assert_allclose(models.token_scores(cfg, params, ids, mask,
                                                   segment_ids=jnp.asarray(seg), read=last),
                               full, atol=1e-5)


def test_attention_at_equals_rows_of_full_attention():
    q, k, v = qkv(2, 7, seed=3)
    index = np.array([[6, 2], [0, 4]], np.int32)
    seg = np.array([[1, 1, 2, 2, 2, 2, 2], [1, 1, 1, 1, 1, 0, 0]], np.int32)
    for window, segments in ((None, None), (3, None), (None, seg)):
        allowed = np.tril(np.ones((7, 7), bool))[None].repeat(2, 0)
        if window:
            allowed &= ~np.tril(np.ones((7, 7), bool), -window)[None]
        if segments is not None:
            allowed &= segments[:, :, None] == segments[:, None, :]
        want = reference_attention(q, k, v, allowed)[np.arange(2)[:, None], index]
        q_at = q[np.arange(2)[:, None], index]
        got = attention.attention_at(q_at, k, v, jnp.asarray(index), window=window,
                                     segment_ids=None if segments is None else
                                     jnp.asarray(segments))
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_token_scores_refuses_last_and_read_together():
    ids, mask = left_padded_batch(CFG.vocab_size, [5, 3], seed=0)
    with pytest.raises(ValueError, match="takes `last` or `read`, not both"):
        models.token_scores(CFG, init_params(CFG, 0), ids, mask, last=2,
                            read=jnp.zeros((2, 1), jnp.int32))
