"""A quantized frozen base (`jrlhf.quant`, `model.quantize`): qwix's quantization against a
NumPy reference, the bytes it stores, logits against float32, steps that train only the
adapters, sampling, export to transformers, `jrlhf plan`, checkpoints and the refusals."""

import dataclasses
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrlhf import lora, optim, paths, quant
from jrlhf.config import Config, LoRAConfig, MeshConfig, ModelSection, derive
from jrlhf.models import ModelConfig, init_params
from jrlhf.models import transformer as tfm
from jrlhf.sampling import generate
from jrlhf.setups import batch_shapes, initial_weights, make_setup

pytest.importorskip("qwix")

CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, intermediate_size=128, eos_token_id=2,
                  pad_token_id=2)
NF4_LEVELS = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                       0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                       0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                       0.7229568362236023, 1.0], np.float32)


def numpy_quantized(w: np.ndarray, qtype: str):
    """`(dequantized w, scale per entry, tie)` of a matrix `[in, out]` contracted along `in`:
    absmax scales per output column (int8) or per group of 64 rows of a column (4-bit). `tie`
    marks entries within 1e-4 of a step from halfway between two levels — for int8 / int4 the
    entry that sets each scale (at ±bound = ±(max level + 0.5)) and a few more: XLA computes
    the scale as absmax · (1/bound), one float32 ulp from absmax / bound, so a tie may round
    to either level."""
    w = w.astype(np.float32)
    group = w.shape[0] if qtype == "int8" else quant.GROUP_SIZE
    blocks = w.reshape(w.shape[0] // group, group, w.shape[1])
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    if qtype == "nf4":
        scale = absmax
        distance = np.abs(blocks[..., None] / scale[..., None] - NF4_LEVELS)
        index = distance.argmin(-1)
        nearest = np.sort(distance, axis=-1)
        tie = nearest[..., 1] - nearest[..., 0] < 1e-4
        deq = NF4_LEVELS[index] * scale
    else:
        bound = {"int8": 127.5, "int4": 7.5}[qtype]
        lo, hi = {"int8": (-128, 127), "int4": (-8, 7)}[qtype]
        scale = (absmax / np.float32(bound)).astype(np.float32)
        ratio = blocks / scale
        tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-4
        deq = np.clip(np.rint(ratio), lo, hi) * scale
    return (deq.reshape(w.shape), np.broadcast_to(scale, blocks.shape).reshape(w.shape),
            tie.reshape(w.shape))


@pytest.mark.parametrize("qtype", quant.QTYPES)
def test_quantize_dequantize_matches_numpy(qtype):
    """qwix's quantization (through `quant.quantize`) == the NumPy reference, for kernels
    (contracted along rows) and tables (along columns), except at rounding ties; the error is
    within half a step everywhere (int8 / int4: scale / 2; nf4: half the widest gap between
    its levels, 0.139 · scale)."""
    w = np.random.default_rng(0).normal(0, 0.02, (128, 48)).astype(np.float32)
    w[5, 7] = 0.3  # an outlier sets its column's (group's) scale
    expected, scale, tie = numpy_quantized(w, qtype)
    q = quant.quantize(jnp.asarray(w), qtype, -2)
    assert tie.sum() <= q.scale.size + 10  # the scales' own entries, and a few more
    got = np.asarray(quant.dequantize(q))
    np.testing.assert_allclose(got[~tie], expected[~tie], rtol=1e-6, atol=1e-9)
    half_step = 0.5 * (np.diff(NF4_LEVELS).max() if qtype == "nf4" else 1.0)
    # + 1e-4 of a step: float32 rounding of level · scale (up to 127 · ulp at int8's ends)
    assert np.all(np.abs(got - w) <= (half_step + 1e-4) * scale)
    packed = qtype != "int8"
    assert q.values.shape == ((64, 48) if packed else (128, 48)) and q.shape == (128, 48)
    assert q.values.dtype == (np.uint8 if packed else np.int8)
    assert q.scale.shape == ((2, 48) if packed else (1, 48))
    table = quant.quantize(jnp.asarray(w.T), qtype, -1)  # an embedding table [V, D]
    got_table = np.asarray(quant.dequantize(table))
    np.testing.assert_allclose(got_table[~tie.T], expected.T[~tie.T], rtol=1e-6, atol=1e-9)
    rows = np.array([[3, 0], [47, 3]])
    np.testing.assert_array_equal(np.asarray(quant.take(table, jnp.asarray(rows), jnp.float32)),
                                  got_table[rows])


def test_pack_round_trip():
    """Two 4-bit values per byte and back, for every value, along either axis."""
    signed = np.arange(-8, 8, dtype=np.int8)
    for values, is_signed in ((signed, True), (signed + 8, False)):
        grid = np.stack(np.meshgrid(values, values, indexing="ij")).reshape(2, -1)  # [2, 256]
        for axis, x in ((-2, grid), (-1, grid.T)):
            packed = quant.pack(jnp.asarray(x), axis)
            assert packed.dtype == np.uint8 and packed.size == x.size // 2
            np.testing.assert_array_equal(np.asarray(quant.unpack(packed, axis, is_signed)), x)
    with pytest.raises(ValueError, match="odd size 5"):
        quant.quantize(jnp.ones((5, 4)), "int4")


@pytest.mark.parametrize("qtype", quant.QTYPES)
def test_quantized_bytes(qtype):
    """Every kernel and the embedding table stored quantized, norms as they were: the bytes
    of the tree are the values (1 byte, or 1/2 for 4-bit) plus float32 scales."""
    params = init_params(CFG, 0)
    quantized = quant.quantize_params(params, qtype)
    expected = 0
    for path, x in paths.flatten(params).items():
        if x.ndim == 1:  # a norm
            expected += 4 * x.size
            continue
        n, channels = (x.shape[0], x.shape[1]) if path.endswith("kernel") else x.shape[::-1]
        groups = 1 if qtype == "int8" else n // quant.GROUP_SIZE
        expected += x.size // (1 if qtype == "int8" else 2) + 4 * groups * channels
    assert optim.tree_bytes(quantized) == expected
    f32 = optim.tree_bytes(params)
    # This model's 64-wide inputs make the scales' share large: 4 / 64 of a byte per value.
    assert expected / f32 < {"int8": 0.27, "int4": 0.145, "nf4": 0.145}[qtype]


@pytest.mark.parametrize("qtype,tolerance", [("int8", 0.02), ("int4", 0.3), ("nf4", 0.3)])
def test_logits_against_float32(qtype, tolerance):
    """The model on a quantized base == the float model on the dequantized weights (1e-5), and
    its logits (spanning about ±1.4 on this random model) stay within `tolerance` of the float32
    model's: 0.02 for int8, 0.3 for 4-bit (measured 0.007, 0.13 int4, 0.10 nf4)."""
    cfg = dataclasses.replace(CFG, tie_word_embeddings=True)
    params = init_params(cfg, 0)
    ids = jax.random.randint(jax.random.key(1), (3, 12), 0, CFG.vocab_size)
    mask = jnp.ones_like(ids).at[0, :4].set(0)  # a left-padded row
    quantized = quant.quantize_params(params, qtype)
    logits = tfm.forward(cfg, quantized, ids, mask)
    on_dequantized = tfm.forward(cfg, quant.dequantize_params(quantized), ids, mask)
    reference = tfm.forward(cfg, params, ids, mask)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(on_dequantized)[real],
                               atol=1e-5)
    assert np.abs(np.asarray(logits - reference)[real]).max() < tolerance


def test_adapted_kernel_forward_and_gradients():
    """A quantized kernel with unmerged adapters: the output and the gradients of x and the
    adapters equal those of the merged float kernel W + s·A·B (custom backward included)."""
    key = jax.random.key(0)
    w = 0.02 * jax.random.normal(key, (64, 32))
    q = quant.quantize(w, "int4", -2)
    a = 0.1 * jax.random.normal(jax.random.fold_in(key, 1), (64, 4))
    b = 0.1 * jax.random.normal(jax.random.fold_in(key, 2), (4, 32))
    x = jax.random.normal(jax.random.fold_in(key, 3), (5, 7, 64))  # tanh inputs ~ ±0.5
    w_deq = quant.dequantize(q)

    def ours(x, a, b):
        return jnp.sum(jnp.tanh(quant.matmul(x, quant.AdaptedKernel(q, a, b, 2.0),
                                             jnp.dtype(jnp.float32))))

    def merged(x, a, b):
        return jnp.sum(jnp.tanh(x @ (w_deq + 2.0 * a @ b)))

    np.testing.assert_allclose(ours(x, a, b), merged(x, a, b), rtol=1e-5)
    for g1, g2 in zip(jax.grad(ours, (0, 1, 2))(x, a, b), jax.grad(merged, (0, 1, 2))(x, a, b)):
        np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-5)


def small_config(qtype="int8", mesh=MeshConfig(1, 1, 1), **changes) -> Config:
    return derive(Config(), {
        "model.source": "random", "model.arch": CFG, "model.quantize": qtype, "mesh": mesh,
        "lora": LoRAConfig(rank=4, alpha=8.0, targets=(r".*attn/(q_proj|v_proj)/kernel",
                                                       r".*mlp/down_proj/kernel")),
        "data.max_prompt_length": 8, "data.max_response_length": 8, "optim.warmup_steps": 0,
        "rollout.max_new_tokens": 4, "sft.batch_size": 4, "sft.learning_rate": 1e-2,
        "grpo.prompts_per_iteration": 2, "grpo.group_size": 2, "grpo.learning_rate": 1e-2,
        **changes})


def random_batch(setup, config, seed=0):
    rng = np.random.default_rng(seed)
    batch = {}
    for k, s in batch_shapes(setup, config).items():
        if k == "input_ids":
            x = rng.integers(3, CFG.vocab_size, s.shape)
        elif k == "temperature":
            x = np.ones(s.shape)
        elif "mask" in k:
            x = np.ones(s.shape)
        elif np.issubdtype(s.dtype, np.integer):
            x = rng.integers(0, 2, s.shape)
        else:
            x = rng.normal(size=s.shape)
        batch[k] = jnp.asarray(x.astype(s.dtype))
    if "logprobs" in batch:  # an on-policy rollout: the update starts at ratio 1
        batch["logprobs"] = batch["ref_logprobs"] = -jnp.abs(batch["logprobs"])
    return batch


def make(algorithm, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a mesh smaller than the 8 fake devices
        return make_setup(algorithm, config,
                          *initial_weights(algorithm, config, CFG, init_params(CFG, 0)))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["sft", "grpo"])
def test_steps_train_only_the_adapters(algorithm):
    """Two steps on an int8 base + LoRA: both adapters move, every base array (quantized
    values, scales, norms) stays bit-identical, the optimizer holds moments for the adapters
    only (the same bytes as over a float32 base), and the base is ~1/4 of the float32 bytes."""
    config = small_config()
    setup = make(algorithm, config)
    before = paths.flatten(jax.tree.map(np.array, setup.state.params))
    assert isinstance(setup.state.params["layers"][0]["mlp"]["up_proj"]["kernel"],
                      quant.QuantizedArray)
    state = setup.state
    for seed in range(2):
        state, metrics = setup.step(state, random_batch(setup, config, seed))
        assert all(np.isfinite(float(v)) for v in metrics.values())
    after = paths.flatten(jax.tree.map(np.array, state.params))
    moved = {p for p in before if not np.array_equal(before[p], after[p])}
    adapters = {p for p in before if p.endswith(("lora_a", "lora_b"))}
    assert moved == adapters and len(adapters) == 2 * 3 * CFG.num_layers
    float_setup = make(algorithm, small_config("none"))
    assert optim.tree_bytes(state.opt_state) == optim.tree_bytes(float_setup.state.opt_state)
    base = optim.tree_bytes(lora.base_params(state.params))
    assert base / optim.tree_bytes(lora.base_params(float_setup.state.params)) < 0.27


@pytest.mark.slow
def test_sharded_step_equals_one_device():
    """The quantized arrays follow their matrix's sharding rule: an SFT step on a
    data=1, fsdp=2, tensor=2 mesh gives the single device's adapters."""
    results = []
    for mesh in (MeshConfig(1, 1, 1), MeshConfig(1, 2, 2)):
        # Adam moves each entry by about the learning rate whatever its gradient's size, so a
        # reduction-order difference in a near-zero gradient shows at that scale: 1e-4 here.
        config = small_config("int4", mesh, **{"sft.learning_rate": 1e-4})
        setup = make("sft", config)
        state, _ = setup.step(setup.state, random_batch(setup, config))
        state, _ = setup.step(state, random_batch(setup, config, 1))
        results.append(paths.flatten(jax.tree.map(np.asarray, state.params)))
        if mesh.fsdp == 2:
            values = setup.state.params["layers"][0]["mlp"]["up_proj"]["kernel"].values
            assert values.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    for path, x in results[0].items():
        np.testing.assert_allclose(results[1][path], x, atol=1e-6, err_msg=path)


def trained_setup(qtype="int8"):
    """An SFT setup whose adapters are non-zero (as after training)."""
    config = small_config(qtype)
    setup = make("sft", config)
    key = jax.random.key(7)
    params = paths.map_with_path(
        lambda p, x: 0.05 * jax.random.normal(jax.random.fold_in(key, len(p)), x.shape)
        if p.endswith("lora_b") else x, setup.state.params)
    return setup, params


@pytest.mark.slow
def test_sampler_reads_the_quantized_weights():
    """`generate` on the policy as the rollout loop hands it over (base quantized, adapters
    unmerged beside it) samples what it samples on the de-quantized, merged weights."""
    setup, params = trained_setup("int4")
    policy = setup.policy_params(params)
    assert isinstance(policy["layers"][0]["attn"]["q_proj"]["kernel"], quant.AdaptedKernel)
    prompts = jax.random.randint(jax.random.key(3), (3, 6), 3, CFG.vocab_size)
    mask = jnp.ones_like(prompts).at[1, :2].set(0)
    kw = dict(max_new_tokens=6, temperature=0.0, eos_token_id=None, pad_token_id=2)
    ours = generate(CFG, policy, prompts, mask, jax.random.key(0), **kw)
    dense = generate(CFG, quant.dequantize_params(policy), prompts, mask, jax.random.key(0), **kw)
    np.testing.assert_array_equal(ours.tokens, dense.tokens)
    np.testing.assert_allclose(ours.logprobs, dense.logprobs, atol=1e-5)


@pytest.mark.slow
def test_export_reloads_in_transformers(tmp_path):
    """The export merges the adapters into de-quantized float32 weights; transformers loads
    the folder with the logits of our model on the quantized base + adapters."""
    torch = pytest.importorskip("torch")
    import transformers

    from jrlhf.models import save_pretrained

    setup, params = trained_setup("nf4")
    cfg, weights = setup.exported(params)
    assert not quant.has_quantized(weights) and not lora.has_lora(weights)
    save_pretrained(tmp_path / "export", cfg, weights)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    ids = np.random.default_rng(0).integers(3, CFG.vocab_size, (2, 10))
    ours = tfm.forward(CFG, setup.policy_params(params), jnp.asarray(ids), jnp.ones_like(ids))
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)


@pytest.mark.slow
def test_plan_counts_the_quantized_bytes():
    """`jrlhf plan` sizes the quantized state: its parameter bytes per device equal those of
    the state training builds, and the int8 / 4-bit bases are smaller than float32's."""
    from jrlhf.plan import plan

    planned = {}
    for qtype in ("none", "int8", "int4"):
        config = small_config(qtype, MeshConfig(1, 2, 2))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            planned[qtype] = plan(config, "sft", "h100")
        if qtype == "int8":
            setup = make("sft", config)
            device = jax.devices()[0]
            held = sum(s.data.nbytes for x in jax.tree.leaves(setup.state.params)
                       for s in x.addressable_shards if s.device == device)
            assert planned[qtype]["params_bytes_per_device"] == held
        assert planned[qtype]["quantize"] == qtype
    sizes = {q: r["params_bytes_per_device"] for q, r in planned.items()}
    assert sizes["int4"] < sizes["int8"] < 0.35 * sizes["none"]


def test_checkpoint_round_trip(tmp_path):
    """A state with a quantized base saves and restores bit-exactly (values, scales)."""
    from jrlhf.checkpoint import Checkpointer

    setup, _ = trained_setup("int4")
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(1, setup.state)
    ckpt.wait()
    other = make("sft", small_config("int4", **{"run.seed": 5}))
    restored, _ = ckpt.restore(other.state, log=None)
    ckpt.close()
    kernel = restored.params["layers"][1]["mlp"]["gate_proj"]["kernel"]
    assert isinstance(kernel, quant.QuantizedArray) and kernel.qtype == "int4"
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(setup.state.params)):
        np.testing.assert_array_equal(a, b)


def test_refusals(monkeypatch):
    """Quantization without LoRA, an unknown format and a missing qwix: one line each."""
    with pytest.raises(ValueError, match=r"model.quantize=int8 .* set lora.rank > 0"):
        make("sft", small_config(lora=LoRAConfig()))
    with pytest.raises(ValueError, match="model.quantize must be none, int8, int4 or nf4"):
        ModelSection(quantize="fp8")
    monkeypatch.setitem(sys.modules, "qwix", None)
    with pytest.raises(ImportError) as err:
        quant.quantize_params(init_params(CFG, 0), "int8")
    assert str(err.value) == ("model.quantize needs the qwix package: "
                              "pip install 'jrlhf[quant]'")


@pytest.mark.slow
def test_readme_example(monkeypatch, tmp_path, capsys):
    """The README's quantized-base example runs as written."""
    from test_readme import section_blocks

    monkeypatch.chdir(tmp_path)
    blocks = section_blocks("### Quantized frozen base (`model.quantize`, `jrlhf.quant`)")
    assert len(blocks) == 1
    exec(compile(blocks[0], "README: quantized frozen base", "exec"), {})
    out = capsys.readouterr().out
    assert "QuantizedArray int8" in out
