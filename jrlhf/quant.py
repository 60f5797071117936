"""A quantized frozen base (QLoRA-style): int8 or 4-bit matrices, float32 LoRA adapters.

`quantize_params(params, qtype)` stores every frozen matrix of a parameter tree — the decoder's
kernels, the LM head, the embedding tables (`QUANTIZED_RULES`) — as a `QuantizedArray`: the
quantized values and float32 absmax scales, both computed by qwix (`qwix.quantize`; the inverse
is `qwix.dequantize`). qtype:

- "int8": one scale per output channel (per row of an embedding table), values in [-128, 127].
- "int4": one scale per `GROUP_SIZE` values along the contraction axis, values in [-8, 7].
- "nf4": QLoRA's 4-bit NormalFloat (16 levels placed at normal quantiles), scaled like int4.

4-bit values are stored two per byte (uint8, packed along the contraction axis): XLA:CPU keeps
`jnp.int4` arrays one value per byte, so packing is what makes "4-bit" half of int8 on every
backend and in checkpoints.

A `QuantizedArray` is a pytree of two plain arrays (`.../kernel/values`, `.../kernel/scale`), so
the state, the optimizer masks, sharding and checkpoints handle it like any other parameters.
The model dequantizes it where it is used (`matmul`, `take`, `dense`: into the compute dtype,
inside the jitted forward), so memory holds the quantized arrays; a LoRA-adapted quantized
kernel is not merged but runs its adapters beside it (`AdaptedKernel`). Base weights stored
this way cannot be trained: `make_setup` refuses `model.quantize` without LoRA.

qwix is an optional dependency (`pip install 'jrlhf[quant]'`), imported only when a tree is
quantized or dequantized.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jrlhf import paths

QTYPES = ("int8", "int4", "nf4")
GROUP_SIZE = 64  # 4-bit: one scale per 64 values along the contraction axis (QLoRA's block)

# Which leaves are stored quantized (first match wins): kernels `[in, out]`, contracted along
# `in`, and embedding tables `[V, D]`, contracted along D (their rows are looked up; a tied LM
# head contracts D). Trained leaves — adapters, scalar heads — and vectors stay float32.
QUANTIZED_RULES: tuple[tuple[str, str], ...] = (
    (r"(.*/)?score/kernel", "keep"),
    (r".*/lora_[ab]", "keep"),
    (r".*_lora_[ab]", "keep"),
    (r"(.*/)?kernel", "kernel"),
    (r"(.*/)?(pos_)?embed/embedding", "table"),
    (r".*", "keep"),
)
_AXES = {"kernel": -2, "table": -1}


def _qwix():
    try:
        import qwix
    except ImportError:
        raise ImportError("model.quantize needs the qwix package: pip install 'jrlhf[quant]'"
                          ) from None
    return qwix


def _static(default=dataclasses.MISSING):
    return dataclasses.field(default=default, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A frozen matrix as `qtype` values and float scales (see the module docstring).

    `values`: int8 of the matrix's shape, or for 4-bit two values per uint8 along `axis` (that
    dimension halved). `scale`: the same rank, one per output channel (int8) or per
    `GROUP_SIZE` values along `axis` (4-bit); its dtype is the dequantized dtype. `axis`
    (negative, static): the contraction axis, -2 for kernels `[in, out]`, -1 for tables.
    """

    values: jax.Array
    scale: jax.Array
    qtype: str = _static()
    axis: int = _static()

    @property
    def packed(self) -> bool:
        return self.qtype != "int8"

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.values.shape)
        if self.packed:
            shape[self.axis] *= 2
        return tuple(shape)

    @property
    def ndim(self) -> int:
        return len(self.values.shape)

    @property
    def dtype(self):
        return self.scale.dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdaptedKernel:
    """A quantized kernel with its LoRA adapters, unmerged: the layer computes
    `x·W + lora_scale · (x·A)·B` (`lora.merge_lora` builds it instead of `W + scale·A·B`)."""

    base: QuantizedArray
    lora_a: jax.Array
    lora_b: jax.Array
    lora_scale: float = _static()

    shape = property(lambda self: self.base.shape)
    ndim = property(lambda self: self.base.ndim)
    dtype = property(lambda self: self.lora_a.dtype)


def is_quantized(x) -> bool:
    return isinstance(x, (QuantizedArray, AdaptedKernel))


def _split(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """The even and odd entries of `x` along `axis`."""
    axis %= x.ndim
    pairs = x.reshape(x.shape[:axis] + (x.shape[axis] // 2, 2) + x.shape[axis + 1:])
    return jnp.take(pairs, 0, axis=axis + 1), jnp.take(pairs, 1, axis=axis + 1)


def pack(q: jax.Array, axis: int) -> jax.Array:
    """4-bit values (int4 in [-8, 7] or uint4 in [0, 15]) two per uint8 along `axis`: entry
    2i in the low nibble, 2i + 1 in the high one."""
    lo, hi = (v.astype(jnp.int8).astype(jnp.uint8) & 0xF for v in _split(q, axis))
    return lo | (hi << 4)


def unpack(packed: jax.Array, axis: int, signed: bool) -> jax.Array:
    """Inverse of `pack` as int8 values (sign-extended when `signed`)."""
    if signed:
        as_int = lambda v: jax.lax.bitcast_convert_type(v, jnp.int8)  # noqa: E731
        lo, hi = as_int(packed << 4) >> 4, as_int(packed) >> 4
    else:
        lo, hi = (packed & 0xF).astype(jnp.int8), (packed >> 4).astype(jnp.int8)
    axis %= packed.ndim
    pairs = jnp.stack([lo, hi], axis=axis + 1)
    return pairs.reshape(packed.shape[:axis] + (2 * packed.shape[axis],)
                         + packed.shape[axis + 1:])


def _qwix_qtype(qtype: str):
    return {"int8": jnp.int8, "int4": jnp.int4, "nf4": "nf4"}[qtype]


@functools.partial(jax.jit, static_argnames=("qtype", "axis"))
def quantize(x: jax.Array, qtype: str, axis: int = -2) -> QuantizedArray:
    """`x` (a matrix, contracted along `axis`) as a `QuantizedArray` of `qtype`."""
    if qtype not in QTYPES:
        raise ValueError(f"unknown quantization {qtype!r}; choose from {', '.join(QTYPES)}")
    n = x.shape[axis]
    axis %= x.ndim
    channel = tuple(a for a in range(x.ndim) if a != axis)
    tiles = {}
    if qtype != "int8":
        if n % 2:
            raise ValueError(f"a {qtype} matrix packs two values per byte along its "
                             f"contraction axis, of odd size {n} here (shape {x.shape})")
        tiles = {axis: GROUP_SIZE if n % GROUP_SIZE == 0 else n}
    q = _qwix().quantize(x, _qwix_qtype(qtype), channelwise_axes=channel, tiled_axes=tiles)
    values = q.qvalue.astype(jnp.int8) if qtype == "int8" else pack(q.qvalue, axis)
    return QuantizedArray(values, q.scale.astype(jnp.float32), qtype, axis - x.ndim)


def dequantize(q: QuantizedArray, dtype=None) -> jax.Array:
    """The matrix `q` stands for, in `dtype` (default: its scale's, float32)."""
    qwix = _qwix()
    values = unpack(q.values, q.axis, q.qtype == "int4") if q.packed else q.values
    scale = q.scale if dtype is None else q.scale.astype(dtype)
    qarray = qwix.QArray(values, scale, qtype=_qwix_qtype(q.qtype))
    return qwix.dequantize(qarray)


def dense(w, dtype=None) -> jax.Array:
    """A plain array for a possibly quantized matrix (adapters merged), in `dtype`."""
    if isinstance(w, AdaptedKernel):
        base = dequantize(w.base, dtype)
        delta = w.lora_scale * (w.lora_a @ w.lora_b)
        return base + delta.astype(base.dtype)
    if isinstance(w, QuantizedArray):
        return dequantize(w, dtype)
    return w if dtype is None else w.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _base_matmul(x: jax.Array, q: QuantizedArray, dtype) -> jax.Array:
    return x @ dequantize(q, dtype)


def _base_matmul_fwd(x, q, dtype):
    return _base_matmul(x, q, dtype), (q,)


def _base_matmul_bwd(dtype, residuals, g):
    """The input's gradient with the kernel dequantized again: the residual is the quantized
    kernel, not its dequantized copy (autodiff would keep that — a float copy of every layer —
    from the forward to the backward pass). The frozen kernel gets no gradient."""
    (q,) = residuals
    # The barrier keeps XLA from merging this dequantization with the forward pass's (CSE).
    dense_q = dequantize(jax.lax.optimization_barrier(q), dtype)
    zero = QuantizedArray(np.zeros(q.values.shape, jax.dtypes.float0),
                          jnp.zeros_like(q.scale), q.qtype, q.axis)
    return g @ dense_q.T.astype(g.dtype), zero


_base_matmul.defvjp(_base_matmul_fwd, _base_matmul_bwd)


def matmul(x: jax.Array, kernel, dtype) -> jax.Array:
    """`x [..., in] · kernel [in, out]` in the compute `dtype`, the kernel dequantized here (and
    an `AdaptedKernel`'s adapters applied unmerged). The backward pass dequantizes the kernel
    again rather than keeping its float copy (`_base_matmul_bwd`)."""
    x = x.astype(dtype)
    base = kernel.base if isinstance(kernel, AdaptedKernel) else kernel
    y = _base_matmul(x, base, dtype)
    if isinstance(kernel, AdaptedKernel):
        a, b = kernel.lora_a.astype(dtype), kernel.lora_b.astype(dtype)
        y = y + (kernel.lora_scale * ((x @ a) @ b)).astype(dtype)
    return y


def take(table: QuantizedArray, ids: jax.Array, dtype) -> jax.Array:
    """Rows `ids` of a quantized embedding table `[V, D]`, dequantized to `dtype`:
    `[*ids.shape, D]`."""
    rows = jax.tree.map(lambda a: jnp.take(a, ids, axis=0), table)
    return dequantize(rows, dtype)


def quantize_params(params, qtype: str):
    """`params` with every leaf `QUANTIZED_RULES` selects stored as a `QuantizedArray`."""
    if qtype not in QTYPES:
        raise ValueError(f"unknown quantization {qtype!r}; choose from {', '.join(QTYPES)}")
    _qwix()  # before any cached trace of `quantize` could skip the import
    kinds = paths.match_rules(params, QUANTIZED_RULES, what="quantization rule",
                              require_all_used=False)
    return jax.tree.map(lambda x, kind: x if kind == "keep" else quantize(x, qtype, _AXES[kind]),
                        params, kinds)


def dequantize_params(params):
    """`params` with every quantized leaf a float32 array (adapters merged): for export."""
    return jax.tree.map(dense, params, is_leaf=is_quantized)


def has_quantized(params) -> bool:
    return any(is_quantized(x) for x in jax.tree.leaves(params, is_leaf=is_quantized))
