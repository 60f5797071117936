"""Decoder-only transformer in Flax NNX: GPT-2 and Llama families on one code path.

Shapes: B batch, T query tokens, S key slots (T without a cache, the cache length with one),
D hidden size, H query heads, K key/value heads, G = H // K query heads per key/value head,
Dh head size.

Masks: `attention_mask` is 1 for real tokens and 0 for padding, one contiguous run of real
tokens per row on either side of the padding; packed rows use `segment_ids` instead. Positions
are derived from the mask (`positions_from_mask`) or the segments (`positions_from_segments`),
so a padded row gives the logits it gives alone. How attention honours padding without a dense
mask is described in `jrlhf.models.attention`. Padded query positions produce finite garbage
that callers must mask out.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jrlhf import quant
from jrlhf.models import attention as attn
from jrlhf.models import expert_parallel, moe
from jrlhf.models.config import ModelConfig, rope_frequencies

Params = dict[str, Any]
# One (keys, values) pair per layer, each [B, K, Dh, S] (`attention.cache_entry`).
KVCache = tuple[tuple[jax.Array, jax.Array], ...]

_INIT = nnx.initializers.normal(0.02)

ACTIVATIONS = {
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids `[B, T]`: 0 at each row's first real token, counting real tokens only."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Position ids `[B, T]` of packed rows: 0 at the first token of every segment (and on
    padding, segment 0)."""
    T = segment_ids.shape[-1]
    cols = jnp.broadcast_to(jnp.arange(T), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    positions = cols - jax.lax.cummax(jnp.where(starts, cols, 0), axis=1)
    return jnp.where(segment_ids > 0, positions, 0)


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index `[B]` of each row's last real token (works for left and right padding)."""
    T = attention_mask.shape[-1]
    return T - 1 - jnp.argmax(attention_mask[:, ::-1].astype(jnp.int32), axis=-1)


@jax.custom_vjp
def gradient_barrier(x: jax.Array) -> jax.Array:
    """Identity in both directions (for finite gradients) whose cotangent passes through a
    `lax.cond`, which XLA must materialise as one buffer.

    Why: in the backward pass XLA:CPU does not store the residual stream's gradient once per
    layer; it re-fuses the chain of later layers' norm-backward terms into every consumer
    (growing with depth, through a strided transpose for the weight-gradient matmuls).
    `optimization_barrier` does not stop that on CPU (it is expanded before fusion); a
    conditional is a real buffer boundary. On GPU a conditional would cost a host sync, so
    `ModelConfig.residual_barrier="auto"` uses it on CPU only.
    """
    return x


def _barrier_fwd(x):
    return x, None


def _barrier_bwd(_, g):
    # A runtime predicate and branches that differ, or XLA removes the conditional. The other
    # branch runs only when g already holds a non-finite value; it makes all of g NaN, which
    # changes nothing a step does with it (one non-finite gradient entry already makes the
    # clipped update non-finite, and the loops stop on it).
    finite = jnp.isfinite(g.reshape(-1)[0])
    return (jax.lax.cond(finite, lambda t: t, lambda t: jnp.full_like(t, jnp.nan), g),)


gradient_barrier.defvjp(_barrier_fwd, _barrier_bwd)


def uses_residual_barrier(cfg: ModelConfig) -> bool:
    """Whether `cfg.residual_barrier` ("auto": on XLA:CPU only) is on in this process."""
    if cfg.residual_barrier == "auto":
        return attn.platform() == "cpu"
    return cfg.residual_barrier == "on"


class Linear(nnx.Linear):
    """`nnx.Linear` whose kernel may be stored quantized (`jrlhf.quant`): dequantized to the
    compute dtype where it is used, LoRA adapters beside it applied unmerged.

    Inputs `[..., in]` are multiplied as one `[rows, in]` matrix. XLA:CPU lays out the weight
    gradient of a `[B, T, in]` product by transposing the upstream gradient inside the fusion
    that computes it, a strided loop several times slower than the matmul itself: on the
    Qwen3-shaped benchmark model's PPO update those fusions were a quarter of the time. The
    flat product's gradient is a plain matmul (the reshapes are free)."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        lead = inputs.shape[:-1]
        x = inputs.reshape(-1, inputs.shape[-1])
        kernel = self.kernel.get_value()
        if not quant.is_quantized(kernel):
            y = super().__call__(x)
        else:
            y = quant.matmul(x, kernel, jnp.dtype(self.dtype))
            if self.bias is not None:
                y = y + self.bias[...].astype(y.dtype)
        return y.reshape(lead + y.shape[-1:])


class Embed(nnx.Embed):
    """`nnx.Embed` whose table may be stored quantized: only the looked-up rows dequantized."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        table = self.embedding.get_value()
        if not quant.is_quantized(table):
            return super().__call__(inputs)
        return quant.take(table, inputs, jnp.dtype(self.dtype))


def _linear(cfg: ModelConfig, d_in: int, d_out: int, bias: bool, rngs: nnx.Rngs) -> Linear:
    return Linear(d_in, d_out, use_bias=bias, kernel_init=_INIT, dtype=jnp.dtype(cfg.dtype),
                  param_dtype=jnp.float32, rngs=rngs)


class RMSNorm(nnx.Module):
    """RMSNorm normalising in float32 like the reference implementations. Llama's multiplies by
    `w` in the input dtype; Gemma's (`plus_one`) by `1 + w` in float32 (w starts at 0)."""

    def __init__(self, dim: int, eps: float, plus_one: bool = False):
        init = jnp.zeros if plus_one else jnp.ones
        self.scale = nnx.Param(init((dim,), jnp.float32))
        self.eps = eps
        self.plus_one = plus_one

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return (y * (1.0 + self.scale[...])).astype(x.dtype)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


class LayerNorm(nnx.Module):
    """GPT-2's LayerNorm, with float32 statistics."""

    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> RMSNorm | LayerNorm:
    dim = dim or cfg.hidden_size
    if cfg.family == "gpt2":
        return LayerNorm(dim, cfg.norm_eps)
    return RMSNorm(dim, cfg.norm_eps, plus_one=cfg.norm_plus_one)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float, scaling: tuple = ()) -> jax.Array:
    """Rotary embedding (half-split convention of the HF checkpoints). x: [B, T, N, Dh].

    `scaling`: `ModelConfig.rope_scaling` pairs (llama3 / linear / yarn, see
    `jrlhf.models.config.rope_frequencies`); YaRN's attention factor scales cos and sin."""
    half = x.shape[-1] // 2
    inv_freq, factor = rope_frequencies(x.shape[-1], theta, scaling)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, half]
    cos = (jnp.cos(angles) * factor)[:, :, None, :].astype(x.dtype)
    sin = (jnp.sin(angles) * factor)[:, :, None, :].astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class SharedPrompt(NamedTuple):
    """How the flat tokens of `Transformer.shared_prompt` split: `groups` (G) left-aligned
    prompts of `prompt_length` (P) columns, then the groups' rows' responses. Arrays:
    `prompt_real [G, P]` bool, `prompt_positions [G, P]`, `response_positions [B, N]`."""

    groups: int
    prompt_length: int
    prompt_real: jax.Array
    prompt_positions: jax.Array
    response_positions: jax.Array


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layer: int = 0):
        d, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.cfg = cfg
        self.window = cfg.layer_window(layer)  # static per layer (sliding or full attention)
        self.rope = cfg.layer_rope(layer)
        self.q_proj = _linear(cfg, d, q, cfg.attention_bias, rngs)
        self.k_proj = _linear(cfg, d, kv, cfg.attention_bias, rngs)
        self.v_proj = _linear(cfg, d, kv, cfg.attention_bias, rngs)
        self.o_proj = _linear(cfg, q, d, cfg.output_bias, rngs)
        if cfg.qk_norm:
            self.q_norm = make_norm(cfg, cfg.head_dim)
            self.k_norm = make_norm(cfg, cfg.head_dim)
        if cfg.attention_sinks:  # GPT-OSS: one learned softmax-denominator logit per head [H]
            self.sinks = nnx.Param(_INIT(rngs.params(), (cfg.num_heads,), jnp.float32))

    def __call__(self, x, positions, segment_ids=None, cache=None, first_slot=None, slot=None,
                 query_index=None, shared: SharedPrompt | None = None):
        """Without `cache`: causal self-attention over left-aligned rows (see
        `jrlhf.models.attention`); returns the output and this call's `(k, v)` (for a prefill).
        With `shared`: x is the flat `[1, M, D]` tokens of prompts shared by groups of rows
        (`Transformer.shared_prompt`; `attn.shared_prompt_attention`).
        With `query_index [B, R]`: queries (and the output) only at those columns, keys and
        values at all T (`attn.attention_at`).
        With `cache = (keys, values)`: x is one token per row, written at cache slot `slot`
        (one for all rows, or `[B]`: each row its own, as continuous batching's slots are);
        returns the output and the updated cache."""
        cfg = self.cfg
        B, T, _ = x.shape
        q_in, q_positions = x, positions
        if query_index is not None:
            q_in = jnp.take_along_axis(x, query_index[:, :, None], axis=1)
            q_positions = jnp.take_along_axis(positions, query_index, axis=1)
        R = q_in.shape[1]
        q = self.q_proj(q_in).reshape(B, R, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.family == "llama":
            q = apply_rope(q, q_positions, *self.rope)
            k = apply_rope(k, positions, *self.rope)
        options = dict(window=self.window, scale=cfg.query_scale, softcap=cfg.attn_softcap)
        if cfg.attention_sinks:
            options["sinks"] = self.sinks[...]
        if query_index is not None:
            out = attn.attention_at(q, k, v, query_index, segment_ids=segment_ids, **options)
            new = (k, v)
        elif cache is None:
            impl = attn.resolve_implementation(cfg.attention, cfg.dtype, cfg.head_dim,
                                               softcap=cfg.attn_softcap,
                                               sinks=cfg.attention_sinks)
            if shared is not None:
                out = attn.shared_prompt_attention(
                    q, k, v, groups=shared.groups, prompt_length=shared.prompt_length,
                    prompt_real=shared.prompt_real, prompt_positions=shared.prompt_positions,
                    response_positions=shared.response_positions, implementation=impl,
                    **options)
            else:
                out = attn.self_attention(q, k, v, implementation=impl,
                                          segment_ids=segment_ids, **options)
            new = (k, v)
        else:
            keys, values = attn.write_cache(cache[0], k, slot), attn.write_cache(cache[1], v, slot)
            out = attn.cached_attention(q, keys, values, first_slot, slot, **options)
            new = (keys, values)
        return self.o_proj(out.reshape(B, R, cfg.num_heads * cfg.head_dim)), new


class MLP(nnx.Module):
    """GPT-2: fc_out(act(fc_in x)). Llama: down(act(gate x) * up x)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, width: int | None = None):
        d, f = cfg.hidden_size, width or cfg.intermediate_size
        self.act = ACTIVATIONS[cfg.activation]
        self.gated = cfg.family == "llama"
        if self.gated:
            self.gate_proj = _linear(cfg, d, f, cfg.mlp_bias, rngs)
            self.up_proj = _linear(cfg, d, f, cfg.mlp_bias, rngs)
            self.down_proj = _linear(cfg, f, d, cfg.mlp_bias, rngs)
        else:
            self.fc_in = _linear(cfg, d, f, cfg.mlp_bias, rngs)
            self.fc_out = _linear(cfg, f, d, cfg.mlp_bias, rngs)

    def __call__(self, x):
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.fc_out(self.act(self.fc_in(x)))


class Experts(nnx.Module):
    """E gated MLPs stacked: `gate_proj, up_proj [E, D, F]`, `down_proj [E, F, D]`; with
    `cfg.expert_bias` (GPT-OSS) their biases `gate_bias, up_bias [E, F]`, `down_bias [E, D]`."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        E, d, f = cfg.num_experts, cfg.hidden_size, cfg.expert_size
        key = rngs.params()
        keys = jax.random.split(key, 3)
        self.gate_proj = nnx.Param(_INIT(keys[0], (E, d, f), jnp.float32))
        self.up_proj = nnx.Param(_INIT(keys[1], (E, d, f), jnp.float32))
        self.down_proj = nnx.Param(_INIT(keys[2], (E, f, d), jnp.float32))
        if cfg.expert_bias:
            self.gate_bias = nnx.Param(jnp.zeros((E, f), jnp.float32))
            self.up_bias = nnx.Param(jnp.zeros((E, f), jnp.float32))
            self.down_bias = nnx.Param(jnp.zeros((E, d), jnp.float32))

    def biases(self) -> tuple[jax.Array, jax.Array, jax.Array] | None:
        """`(gate_bias, up_bias, down_bias)`, or None without `expert_bias`."""
        if not hasattr(self, "gate_bias"):
            return None
        return self.gate_bias[...], self.up_bias[...], self.down_bias[...]


class SparseMLP(nnx.Module):
    """A mixture-of-experts MLP (`jrlhf.models.moe`): a router (`router`; a bias with
    `cfg.router_bias`) sends each token to its top-k experts (`cfg.routing`), computed dropless
    with grouped matmuls; Qwen2-MoE adds a shared expert scaled by sigmoid(shared_gate x);
    GPT-OSS's experts have biases and a clamped SwiGLU (`cfg.swiglu_limit`)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.act = ACTIVATIONS[cfg.activation]
        self.router = _linear(cfg, cfg.hidden_size, cfg.num_experts, cfg.router_bias, rngs)
        self.experts = Experts(cfg, rngs)
        if cfg.shared_expert_size:
            self.shared = MLP(cfg, rngs, width=cfg.shared_expert_size)
            self.shared_gate = _linear(cfg, cfg.hidden_size, 1, False, rngs)

    def __call__(self, x, experts=None):
        """`x [B, T, D]` -> `(y [B, T, D], router logits [B·T, E] float32, experts [B·T, k])`;
        `experts [B·T, k]`: route to these instead of the router's top-k (routing replay)."""
        cfg = self.cfg
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        logits = self.router(flat).astype(jnp.float32)
        if cfg.routing == "topk_softmax":
            routing = moe.route_topk_softmax(logits, cfg.experts_per_token, experts)
        else:
            routing = moe.route(logits, cfg.experts_per_token, cfg.norm_topk_prob, experts)
        e = self.experts
        glu = None
        if cfg.swiglu_limit is not None:
            glu = functools.partial(moe.clamped_swiglu, limit=cfg.swiglu_limit,
                                    alpha=cfg.swiglu_alpha)
        y = expert_parallel.grouped_mlp(flat, routing, e.gate_proj[...], e.up_proj[...],
                                        e.down_proj[...], self.act, jnp.dtype(cfg.dtype),
                                        biases=e.biases(), glu=glu)
        if cfg.shared_expert_size:
            y = y + jax.nn.sigmoid(self.shared_gate(flat)) * self.shared(flat)
        return y.reshape(B, T, D).astype(x.dtype), logits, routing.experts


class Block(nnx.Module):
    """Pre-norm residual block; with `sandwich_norms` (Gemma 2 / 3) the attention and MLP
    outputs are normalised again before they join the residual stream."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layer: int = 0):
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, rngs, layer)
        self.mlp_norm = make_norm(cfg)
        self.sparse = cfg.layer_is_sparse(layer)
        self.mlp = SparseMLP(cfg, rngs) if self.sparse else MLP(cfg, rngs)
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:
            self.attn_post_norm = make_norm(cfg)
            self.mlp_post_norm = make_norm(cfg)

    def __call__(self, x, positions, segment_ids=None, cache=None, first_slot=None, slot=None,
                 query_index=None, experts=None, shared: SharedPrompt | None = None):
        """Returns `(x, kv, route)`: `route` is None for a dense MLP, else the router's logits
        `[B·R, E]` and the chosen experts `[B·R, k]` (`SparseMLP`; `experts` replays given ones).
        `query_index [B, R]`: the block's output only at those columns (`Attention`).
        `shared`: x holds prompts shared by groups of rows, flat (`Transformer.shared_prompt`)."""
        attn_out, kv = self.attn(self.attn_norm(x), positions, segment_ids, cache, first_slot,
                                 slot, query_index, shared)
        if query_index is not None:
            x = jnp.take_along_axis(x, query_index[:, :, None], axis=1)
        x = x + (self.attn_post_norm(attn_out) if self.sandwich else attn_out)
        route = None
        if self.sparse:
            out, logits, chosen = self.mlp(self.mlp_norm(x), experts)
            route = (logits, chosen)
        else:
            out = self.mlp(self.mlp_norm(x))
        return x + (self.mlp_post_norm(out) if self.sandwich else out), kv, route


class Transformer(nnx.Module):
    """Backbone plus the heads `cfg` asks for (LM logits and/or a per-token scalar)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = jnp.dtype(cfg.dtype)
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=_INIT,
                           dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        if cfg.family == "gpt2":
            self.pos_embed = Embed(cfg.max_position_embeddings, cfg.hidden_size,
                                   embedding_init=_INIT, dtype=dtype,
                                   param_dtype=jnp.float32, rngs=rngs)
        self.layers = nnx.List([Block(cfg, rngs, i) for i in range(cfg.num_layers)])
        self.final_norm = make_norm(cfg)
        if cfg.lm_head and not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg, cfg.hidden_size, cfg.vocab_size, False, rngs)
        if cfg.scalar_head:
            self.score = _linear(cfg, cfg.hidden_size, 1, False, rngs)

    def _embed(self, input_ids, positions):
        x = self.embed(input_ids)
        if self.cfg.scale_embeddings:  # Gemma: sqrt(d) rounded to the weights' dtype first
            scale = jnp.asarray(self.cfg.hidden_size ** 0.5, self.embed.embedding.dtype)
            x = x * scale.astype(x.dtype)
        if self.cfg.family == "gpt2":
            x = x + self.pos_embed(positions)
        return x

    def __call__(self, input_ids, attention_mask, positions=None, segment_ids=None, read=None,
                 with_router: bool = False, experts=None, replay: bool = True):
        """Final hidden states `[B, T, D]` of `input_ids [B, T]`.

        `attention_mask [B, T]`: each row one contiguous run of real tokens (any padding side).
        Packed rows pass `segment_ids [B, T]` (1, 2, ... per example, 0 on padding) instead of
        relying on the mask; positions then restart at every segment.
        `read [B, R]` (column indices of real tokens): only those positions' hidden states,
        `[B, R, D]`. The last layer then runs its queries, attention, MLP and the final norm at
        those R positions only (its keys and values still cover all T): all a reward model
        needs from its last token, and 10 of a GPT-style last layer's 12 d² matmuls per token
        saved.
        `with_router`: return `(hidden, stats)`, `stats` the sparse layers' `moe.RouterStats`
        stacked `[L_sparse, ...]` over the real tokens (None for a dense model).
        `experts [B, T, L_sparse, k]`: the experts a sampler chose for each token (in the
        layout of `input_ids`; `generate(record_experts=True)`). With `replay`, every sparse
        layer routes each token to those (routing replay; the router's weights over them stay
        differentiable); without, they are only compared: `stats.differs` counts the tokens
        whose own top-k set differs from the recorded one.
        """
        x, positions, segment_ids, shift, real = self._aligned_inputs(
            input_ids, attention_mask, positions, segment_ids)
        if shift is not None:  # experts and read columns as the left-aligned rows have them
            if experts is not None:
                experts = attn.roll_rows(experts, shift)
            if read is not None:
                read = (read - shift[:, None]) % input_ids.shape[1]
        x, stats = self._layers_without_cache(  # a read (reward model) routes itself
            x, positions, segment_ids, real, read, experts=None if read is not None else experts,
            replay=replay)
        hidden = self.final_norm(x)
        if read is None and shift is not None:
            hidden = attn.roll_rows(hidden, -shift)
        return (hidden, stats) if with_router else hidden

    def _aligned_inputs(self, input_ids, attention_mask, positions, segment_ids):
        """Embeddings, positions and segment ids with every row left-aligned (see
        `jrlhf.models.attention`), the per-row shift to undo (None for packed rows) and the
        aligned real-token mask `[B, T]`."""
        if segment_ids is not None:
            if positions is None:
                positions = positions_from_segments(segment_ids)
            return (self._embed(input_ids, positions), positions, segment_ids, None,
                    segment_ids > 0)
        shift = attn.leading_padding(attention_mask)
        input_ids = attn.roll_rows(input_ids, shift)
        real = attn.roll_rows(attention_mask, shift)
        if positions is None:
            positions = positions_from_mask(real)
        else:
            positions = attn.roll_rows(positions, shift)
        return self._embed(input_ids, positions), positions, None, shift, real > 0

    def _layers_without_cache(self, x, positions, segment_ids, real, read=None, experts=None,
                              replay: bool = True, shared: SharedPrompt | None = None):
        """All layers, unrolled or as one `lax.scan` body (layers alike: `ModelConfig` checks),
        each optionally rematerialised. Each layer runs under its own graphdef: layers differ
        statically (sliding window, RoPE base, dense or sparse MLP). With `read [B, R]`
        (aligned columns) the last layer runs apart, its queries at those columns only.
        Returns `(x, stats)`: `x [B, T, D]` (`[B, R, D]` with `read`) and the sparse layers'
        `moe.RouterStats` over the tokens where `real [B, T]` (stacked; None if no layer is
        sparse). `experts [B, T, L_sparse, k]` (aligned): replayed or compared (`__call__`).
        `shared`: x is `Transformer.shared_prompt`'s flat `[1, M, D]` tokens (`real [1, M]` then
        weighs each token's router statistics)."""

        barrier = uses_residual_barrier(self.cfg)

        def block(block_def, layer_state, x, query_index=None, recorded=None):
            out, _, route = nnx.merge(block_def, layer_state)(
                x, positions, segment_ids, query_index=query_index,
                experts=recorded if replay else None, shared=shared)
            stats = None
            if route is not None:
                mask = real if query_index is None else jnp.take_along_axis(real, query_index, 1)
                stats = moe.router_stats(*route, mask.reshape(-1), recorded=recorded)
            return (gradient_barrier(out) if barrier else out), stats

        if self.cfg.remat == "full":
            block = jax.checkpoint(block, static_argnums=0)
        elif self.cfg.remat == "dots":
            block = jax.checkpoint(block, static_argnums=0,
                                   policy=jax.checkpoint_policies.dots_saveable)
        split = [nnx.split(layer) for layer in self.layers]
        if read is not None:
            split, (last_def, last_state) = split[:-1], split[-1]
        # Per layer: the recorded experts `[B·T, k]` of a sparse layer, else None.
        per_layer = [None] * len(self.layers)
        if experts is not None:
            B, T = x.shape[:2]
            for j, i in enumerate(self.cfg.sparse_layers):
                per_layer[i] = experts[:, :, j].reshape(B * T, -1)
        stats = []
        if not self.cfg.scan_layers:
            for (block_def, state), recorded in zip(split, per_layer):
                x, layer_stats = block(block_def, state, x, recorded=recorded)
                stats.append(layer_stats)
        elif split:
            block_def = split[0][0]
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(state for _, state in split))
            if experts is not None:  # scan_layers: every layer alike, so every layer sparse
                stacked = (stacked, jnp.stack(per_layer[:len(split)]))
                scan_body = lambda h, xs: block(block_def, xs[0], h, recorded=xs[1])  # noqa: E731
            else:
                scan_body = lambda h, state: block(block_def, state, h)  # noqa: E731
            x, scanned = jax.lax.scan(scan_body, x, stacked)
            if scanned is not None:
                stats.extend(jax.tree.map(lambda a, i=i: a[i], scanned)
                             for i in range(len(split)))
        if read is not None:
            x, layer_stats = block(last_def, last_state, x, read)
            stats.append(layer_stats)
        stats = [st for st in stats if st is not None]
        return x, (jax.tree.map(lambda *xs: jnp.stack(xs), *stats) if stats else None)

    def shared_prompt(self, prompt_ids, prompt_mask, response_ids, response_mask,
                      group_size: int, *, experts=None, replay: bool = True):
        """Final hidden states `[B, N, D]` predicting each response token (position t holds what
        `__call__` gives at column P + t − 1 of the full prompt + response row), for B = G·K rows
        whose K consecutive rows share a prompt, the prompt run through every layer once per
        group instead of K times (its forward and backward: GRPO's K samples of one prompt).

        `prompt_ids, prompt_mask [G, P]`: each group's prompt (one contiguous run of real tokens;
        left-padded as sampled). `response_ids, response_mask [B, N]`: each row's response,
        right-padded (real tokens from column 0). Equal to `__call__` on the rows
        `concat(prompt, response)` up to float32 rounding (`attn.shared_prompt_attention`).
        `experts [B, P + N, L_sparse, k]`: recorded routing in the full rows' layout (a group's
        prompt columns are taken from its first row), replayed or compared as in `__call__`.
        Returns `(hidden, stats)`; a prompt token's router statistics count K times, as in the
        full rows.
        """
        G, P = prompt_ids.shape
        B, N = response_ids.shape
        K = group_size
        if G * K != B:
            raise ValueError(f"shared_prompt: {B} response rows are not {G} prompts x "
                             f"group_size {K}")
        shift = attn.leading_padding(prompt_mask)
        prompt_real = attn.roll_rows(prompt_mask, shift) > 0
        prompt_positions = positions_from_mask(prompt_real)
        lengths = jnp.sum(prompt_real, axis=1, dtype=jnp.int32)
        response_positions = (jnp.repeat(lengths, K)[:, None]
                              + positions_from_mask(response_mask))
        D = self.cfg.hidden_size
        x = jnp.concatenate([
            self._embed(attn.roll_rows(prompt_ids, shift), prompt_positions).reshape(G * P, D),
            self._embed(response_ids, response_positions).reshape(B * N, D)])[None]
        positions = jnp.concatenate([prompt_positions.reshape(-1),
                                     response_positions.reshape(-1)])[None]
        weights = jnp.concatenate([prompt_real.reshape(-1).astype(jnp.float32) * K,
                                   (response_mask > 0).reshape(-1).astype(jnp.float32)])[None]
        if experts is not None:
            prompt_experts = attn.roll_rows(experts.reshape(G, K, *experts.shape[1:])[:, 0, :P],
                                            shift)
            experts = jnp.concatenate([
                prompt_experts.reshape(G * P, *experts.shape[2:]),
                experts[:, P:].reshape(B * N, *experts.shape[2:])])[None]
        layout = SharedPrompt(G, P, prompt_real, prompt_positions, response_positions)
        x, stats = self._layers_without_cache(x, positions, None, weights, experts=experts,
                                              replay=replay, shared=layout)
        hidden = self.final_norm(x[0])
        prompt_last = hidden[:G * P].reshape(G, P, D)[jnp.arange(G), jnp.maximum(lengths - 1, 0)]
        response = hidden[G * P:].reshape(B, N, D)
        return jnp.concatenate([jnp.repeat(prompt_last, K, axis=0)[:, None], response[:, :-1]],
                               axis=1), stats

    def prefill(self, input_ids, attention_mask, cache_size: int, cache_dtype=None,
                with_experts: bool = False, experts=None):
        """Run a left-padded prompt `[B, P]` and build its KV cache of `cache_size` slots.

        Returns `(hidden [B, P, D], cache)`: the prompt sits in slots 0 .. P−1 exactly as laid
        out in `input_ids` (row b real from slot P − len_b), later slots are zero. With
        `with_experts`, also the experts each prompt token was routed to, `[B, P, L_sparse, k]`
        (int32, in the layout of `input_ids`; None for a dense model). `experts [B, P,
        L_sparse, k]` (that layout too): every sparse layer routes each token to these recorded
        experts instead of its router's top-k (a partial rollout's resumed row, prefilled as its
        tokens were routed when sampled).
        """
        x, positions, _, shift, _ = self._aligned_inputs(input_ids, attention_mask, None, None)
        B, P = input_ids.shape
        dtype = jnp.dtype(cache_dtype or self.cfg.dtype)
        if experts is not None:
            experts = attn.roll_rows(experts, shift)  # as the left-aligned rows have them
        cache, chosen, sparse = [], [], 0
        for layer in self.layers:
            recorded = None
            if experts is not None and layer.sparse:
                recorded, sparse = experts[:, :, sparse].reshape(B * P, -1), sparse + 1
            x, (k, v), route = layer(x, positions, experts=recorded)
            cache.append(tuple(attn.cache_entry(t, shift, cache_size, dtype) for t in (k, v)))
            if route is not None:
                chosen.append(route[1].reshape(B, P, -1))
        hidden = attn.roll_rows(self.final_norm(x), -shift)
        if not with_experts:
            return hidden, tuple(cache)
        experts = attn.roll_rows(jnp.stack(chosen, axis=2), -shift) if chosen else None
        return hidden, tuple(cache), experts

    def decode(self, tokens, positions, cache: KVCache, first_slot, slot,
               with_experts: bool = False):
        """One token per row (`tokens, positions [B, 1]`) written at cache slot `slot` (a number,
        or `[B]`: one per row); row b attends to slots `first_slot[b] .. slot[b]`. Returns
        `(hidden [B, 1, D], cache)`, and with `with_experts` the experts each row's token was
        routed to, `[B, L_sparse, k]` (None for a dense model)."""
        x = self._embed(tokens, positions)
        new_cache, chosen = [], []
        for layer, layer_cache in zip(self.layers, cache):
            x, layer_cache, route = layer(x, positions, None, layer_cache, first_slot, slot)
            new_cache.append(layer_cache)
            if route is not None:
                chosen.append(route[1])
        if not with_experts:
            return self.final_norm(x), tuple(new_cache)
        experts = jnp.stack(chosen, axis=1) if chosen else None
        return self.final_norm(x), tuple(new_cache), experts

    def lm_head_weight(self) -> tuple[jax.Array, bool]:
        """The LM head's matrix (possibly a `jrlhf.quant.QuantizedArray`) and whether it is
        `[V, D]` (tied embedding) rather than `[D, V]`."""
        if self.cfg.tie_word_embeddings:
            return self.embed.embedding.get_value(), True
        return self.lm_head.kernel.get_value(), False

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM logits `[..., V]` in float32 (every position: see `token_logprobs` for the
        memory-bounded path the losses use)."""
        weight, transposed = self.lm_head_weight()
        return head_logits(hidden, weight, transposed, self.cfg.dtype, self.cfg.final_softcap)

    def scores(self, hidden: jax.Array) -> jax.Array:
        """Per-token scalar head `[B, T]` in float32 (values for a critic, rewards for an RM)."""
        return self.score(hidden)[..., 0].astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Functional API over plain nested-dict params (what optimizers, checkpoints and sharding see).


@functools.lru_cache(maxsize=64)
def graphdef(cfg: ModelConfig) -> nnx.GraphDef:
    """The static structure of `Transformer(cfg)`, built without allocating weights."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    return nnx.split(abstract)[0]


def init_params(cfg: ModelConfig, rng: jax.Array | int = 0) -> Params:
    """Randomly initialised parameters (normal(0.02) weights, unit norms) as a nested dict."""
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    return nnx.to_pure_dict(nnx.split(Transformer(cfg, nnx.Rngs(params=rng)))[1])


def abstract_params(cfg: ModelConfig) -> Params:
    """`jax.ShapeDtypeStruct` tree of the parameters (no memory allocated)."""
    return jax.eval_shape(lambda: init_params(cfg, 0))


def bind(cfg: ModelConfig, params: Params) -> Transformer:
    """A `Transformer` module over `params` (use inside jit / a loss)."""
    return nnx.merge(graphdef(cfg), params)


def head_logits(hidden: jax.Array, weight: jax.Array, transposed: bool, dtype,
                softcap: float | None = None) -> jax.Array:
    """`hidden [..., D]` times the LM head (`weight [V, D]` if `transposed` else `[D, V]`) in the
    compute `dtype`, returned in float32 `[..., V]`; with `softcap` (Gemma 2's final-logit
    soft-capping) mapped through `softcap · tanh(logits / softcap)`. A quantized `weight`
    (`jrlhf.quant`) is dequantized here."""
    dtype = jnp.dtype(dtype)
    w = quant.dense(weight, dtype)
    out = jnp.dot(hidden.astype(dtype), w.T if transposed else w).astype(jnp.float32)
    return out if softcap is None else softcap * jnp.tanh(out / softcap)


def chunked_token_logprobs(hidden, weight, transposed: bool, targets, *, dtype,
                           temperature=1.0, chunk_size: int = 0,
                           with_entropy: bool = False, softcap: float | None = None):
    """Log-probs `[B, T]` of `targets [B, T]` under `softmax(head(hidden [B, T, D]) / temperature)`
    and, with `with_entropy`, the entropy `[B, T]` of that distribution (else None).
    `temperature`: one number, or one per row `[B]` (a rollout batch's, as it was sampled).

    The `[B·T, V]` float32 logits are never materialised: positions are processed
    `chunk_size` at a time in a `lax.map` whose body is rematerialised, so the backward pass
    recomputes one chunk's logits at a time (peak extra memory: one `[chunk_size, V]` block).
    `chunk_size=0`, or at most `chunk_size` positions in all, computes everything in one block.
    """
    B, T, D = hidden.shape
    n = B * T
    flat_hidden, flat_targets = hidden.reshape(n, D), targets.reshape(n).astype(jnp.int32)
    # Per position [n, 1]: the rows' temperatures travel with the positions through the chunks.
    flat_temperature = jnp.broadcast_to(
        jnp.asarray(temperature, jnp.float32).reshape(-1, 1), (B, T)).reshape(n, 1)

    def block(h, t, temp):
        logits = head_logits(h, weight, transposed, dtype, softcap) / temp
        lse = jax.nn.logsumexp(logits, axis=-1)
        logp = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0] - lse
        if not with_entropy:
            return logp, None
        probs = jnp.exp(logits - lse[:, None])
        return logp, lse - jnp.sum(probs * logits, axis=-1)

    if not chunk_size or n <= chunk_size:
        logp, entropy = block(flat_hidden, flat_targets, flat_temperature)
    else:
        chunks = -(-n // chunk_size)
        pad = chunks * chunk_size - n
        h = jnp.pad(flat_hidden, ((0, pad), (0, 0))).reshape(chunks, chunk_size, D)
        t = jnp.pad(flat_targets, (0, pad)).reshape(chunks, chunk_size)
        temp = jnp.pad(flat_temperature, ((0, pad), (0, 0)), constant_values=1.0).reshape(
            chunks, chunk_size, 1)
        logp, entropy = jax.lax.map(jax.checkpoint(lambda xs: block(*xs)), (h, t, temp))
        logp = logp.reshape(-1)[:n]
        entropy = None if entropy is None else entropy.reshape(-1)[:n]
    return logp.reshape(B, T), None if entropy is None else entropy.reshape(B, T)


class TokenOutputs(NamedTuple):
    """Per predicted token `[B, n]`: log-prob of the actual next token, optionally the entropy
    of the predicted distribution and the scalar head (values)."""

    logprobs: jax.Array
    entropy: jax.Array | None
    values: jax.Array | None
    router: moe.RouterStats | None = None  # a mixture of experts' router sums (`with_router`)


def token_outputs(cfg: ModelConfig, params: Params, input_ids, attention_mask, *,
                  last: int | None = None, temperature=1.0,
                  with_entropy: bool = False, with_values: bool = False, positions=None,
                  segment_ids=None, with_router: bool = False, experts=None,
                  replay: bool = True, group_size: int = 1) -> TokenOutputs:
    """What every loss needs from the LM head, without `[B, T, V]` logits.

    `input_ids, attention_mask [B, T]`. The predicted tokens are `input_ids[:, -n:]` with
    n = `last` (the response of a prompt + response row), or n = T − 1 (every next token) when
    `last` is None. Logits are divided by `temperature` (a number, or `[B]`: one per row); the
    LM head runs `cfg.logits_chunk_size` positions at a time (`chunked_token_logprobs`).
    `positions` / `segment_ids` as in `Transformer.__call__` (packed rows). `with_router`: also
    the sparse layers' `moe.RouterStats` over the real tokens (None for a dense model).
    `experts [B, T, L_sparse, k]`: the sampler's recorded experts, replayed (`replay`) or
    compared (`Transformer.__call__`).
    `group_size` K > 1 (with `last`): the rows come in groups of K consecutive rows whose
    prompt columns (all but the last n) are the same — a group's K samples of one prompt — and
    each group's prompt goes through the model once (`Transformer.shared_prompt`; the result
    equals K = 1's up to float32 rounding). Rows whose prompts differ within a group get wrong
    outputs: the caller guarantees the layout.
    """
    model = bind(cfg, params)
    n = input_ids.shape[1] - 1 if last is None else last
    if group_size > 1 and last is not None:
        if positions is not None or segment_ids is not None:
            raise ValueError("token_outputs: group_size > 1 takes neither positions nor "
                             "segment_ids (prompt + response rows only)")
        B, T = input_ids.shape
        P = T - n
        hidden, router = model.shared_prompt(
            input_ids.reshape(-1, group_size, T)[:, 0, :P],
            attention_mask.reshape(-1, group_size, T)[:, 0, :P], input_ids[:, P:],
            attention_mask[:, P:], group_size, experts=experts, replay=replay)
    else:
        hidden, router = model(input_ids, attention_mask, positions, segment_ids,
                               with_router=True, experts=experts, replay=replay)
        hidden = hidden[:, -n - 1:-1]
    logprobs, entropy = None, None
    if cfg.lm_head:
        weight, transposed = model.lm_head_weight()
        logprobs, entropy = chunked_token_logprobs(
            hidden, weight, transposed, input_ids[:, -n:], dtype=cfg.dtype,
            temperature=temperature, chunk_size=cfg.logits_chunk_size, with_entropy=with_entropy,
            softcap=cfg.final_softcap)
    values = model.scores(hidden) if with_values else None
    return TokenOutputs(logprobs, entropy, values, router if with_router else None)


def forward(cfg: ModelConfig, params: Params, input_ids, attention_mask, *, positions=None,
            segment_ids=None, last: int | None = None):
    """LM logits `[B, T, V]` (float32) for `input_ids [B, T]` with `attention_mask [B, T]`.

    `last=n` returns only the logits of positions T−n−1 .. T−2 (those predicting the last n
    tokens). Losses use `token_outputs`, which never holds all logits at once; this is the
    reference path and what `generate`-free callers (evaluation, tests) use.
    """
    model = bind(cfg, params)
    hidden = model(input_ids, attention_mask, positions, segment_ids)
    return model.logits(_predicting_last(hidden, last))


def _predicting_last(x, last: int | None):
    return x if last is None else x[:, -last - 1:-1]


def token_scores(cfg, params, input_ids, attention_mask, *, positions=None, segment_ids=None,
                 last: int | None = None, read=None, with_router: bool = False):
    """Per-token scalar head `[B, T]` (a value model's values; `last` as in `forward`), or with
    `read [B, R]` (columns of real tokens) the head at those positions only, `[B, R]`, the last
    layer's queries run there only (`Transformer.__call__`). `with_router`: `(scores, router
    stats)` as in `token_outputs`."""
    if read is not None and last is not None:
        raise ValueError("token_scores takes `last` or `read`, not both")
    model = bind(cfg, params)
    hidden, router = model(input_ids, attention_mask, positions, segment_ids, read=read,
                           with_router=True)
    scores = model.scores(_predicting_last(hidden, last))
    return (scores, router) if with_router else scores


def reward_scores(cfg, params, input_ids, attention_mask, with_router: bool = False):
    """A reward model's scalar `[B]`, read at each row's last real token (the last layer runs
    there only); with `with_router`, `(scores, router stats)`."""
    idx = last_token_index(attention_mask)
    scores, router = token_scores(cfg, params, input_ids, attention_mask, read=idx[:, None],
                                  with_router=True)
    return (scores[:, 0], router) if with_router else scores[:, 0]
