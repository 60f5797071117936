"""Decoder-only transformer in Flax NNX: GPT-2 and Llama families on one code path.

Shapes: B batch, T query tokens, S key slots (T without a cache, the cache length with one),
D hidden size, H query heads, K key/value heads, G = H // K query heads per key/value head,
Dh head size.

Masks: `attention_mask` / `kv_mask` are 1 for real tokens and 0 for padding. Positions are
derived from the mask (`positions_from_mask`), so a left-padded row gives the logits it gives
alone. Padded query positions produce finite garbage that callers must mask out.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jrlhf.models.config import ModelConfig

Params = dict[str, Any]
# One (keys, values) pair per layer, each [B, S, K, Dh].
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


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index `[B]` of each row's last real token (works for left and right padding)."""
    T = attention_mask.shape[-1]
    return T - 1 - jnp.argmax(attention_mask[:, ::-1].astype(jnp.int32), axis=-1)


def _linear(cfg: ModelConfig, d_in: int, d_out: int, bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=bias, kernel_init=_INIT, dtype=jnp.dtype(cfg.dtype),
                      param_dtype=jnp.float32, rngs=rngs)


class RMSNorm(nnx.Module):
    """Llama's RMSNorm, normalising in float32 like the reference implementation."""

    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
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


def make_norm(cfg: ModelConfig) -> RMSNorm | LayerNorm:
    norm = LayerNorm if cfg.family == "gpt2" else RMSNorm
    return norm(cfg.hidden_size, cfg.norm_eps)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding (half-split convention of the HF checkpoints). x: [B, T, N, Dh]."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / x.shape[-1]))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, half]
    cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention_weights_mask(kv_mask: jax.Array, cache_index: jax.Array | int, T: int) -> jax.Array:
    """Boolean `[B, T, S]`: query t (at slot cache_index + t) may see key slot s."""
    S = kv_mask.shape[-1]
    query_slot = cache_index + jnp.arange(T)
    causal = jnp.arange(S)[None, :] <= query_slot[:, None]
    return causal[None] & (kv_mask[:, None, :] > 0)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.cfg = cfg
        self.q_proj = _linear(cfg, d, q, cfg.attention_bias, rngs)
        self.k_proj = _linear(cfg, d, kv, cfg.attention_bias, rngs)
        self.v_proj = _linear(cfg, d, kv, cfg.attention_bias, rngs)
        self.o_proj = _linear(cfg, q, d, cfg.output_bias, rngs)

    def __call__(self, x, positions, kv_mask, layer_cache, cache_index):
        cfg = self.cfg
        B, T, _ = x.shape
        K, G, Dh = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
        q = self.q_proj(x).reshape(B, T, K * G, Dh)
        k = self.k_proj(x).reshape(B, T, K, Dh)
        v = self.v_proj(x).reshape(B, T, K, Dh)
        if cfg.family == "llama":
            q = apply_rope(q, positions, cfg.rope_theta)
            k = apply_rope(k, positions, cfg.rope_theta)
        if layer_cache is None:
            keys, values = k, v
        else:
            cache_k, cache_v = layer_cache
            start = (0, cache_index, 0, 0)
            keys = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
            values = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
        q = q.reshape(B, T, K, G, Dh)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, keys.astype(q.dtype)).astype(jnp.float32)
        scores = scores * (Dh ** -0.5)
        allowed = attention_weights_mask(kv_mask, cache_index, T)[:, None, None]
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, values.astype(q.dtype))
        new_cache = None if layer_cache is None else (keys, values)
        return self.o_proj(out.reshape(B, T, K * G * Dh)), new_cache


class MLP(nnx.Module):
    """GPT-2: fc_out(act(fc_in x)). Llama: down(act(gate x) * up x)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.act = ACTIVATIONS[cfg.activation]
        self.gated = cfg.family == "llama"
        if self.gated:
            self.gate_proj = _linear(cfg, d, f, False, rngs)
            self.up_proj = _linear(cfg, d, f, False, rngs)
            self.down_proj = _linear(cfg, f, d, False, rngs)
        else:
            self.fc_in = _linear(cfg, d, f, cfg.output_bias, rngs)
            self.fc_out = _linear(cfg, f, d, cfg.output_bias, rngs)

    def __call__(self, x):
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.fc_out(self.act(self.fc_in(x)))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, kv_mask, layer_cache, cache_index):
        attn_out, new_cache = self.attn(self.attn_norm(x), positions, kv_mask, layer_cache,
                                        cache_index)
        x = x + attn_out
        return x + self.mlp(self.mlp_norm(x)), new_cache


class Transformer(nnx.Module):
    """Backbone plus the heads `cfg` asks for (LM logits and/or a per-token scalar)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = jnp.dtype(cfg.dtype)
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=_INIT,
                               dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        if cfg.family == "gpt2":
            self.pos_embed = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                                       embedding_init=_INIT, dtype=dtype,
                                       param_dtype=jnp.float32, rngs=rngs)
        self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = make_norm(cfg)
        if cfg.lm_head and not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg, cfg.hidden_size, cfg.vocab_size, False, rngs)
        if cfg.scalar_head:
            self.score = _linear(cfg, cfg.hidden_size, 1, False, rngs)

    def __call__(self, input_ids, attention_mask, positions=None, cache=None, cache_index=0):
        """Final hidden states `[B, T, D]` and the updated cache (None without one).

        Without a cache, `attention_mask` is `[B, T]`. With a cache, it is the `[B, S]` mask of
        every cache slot (including the T slots being written at `cache_index`).
        """
        if positions is None:
            positions = positions_from_mask(attention_mask)
        x = self.embed(input_ids)
        if self.cfg.family == "gpt2":
            x = x + self.pos_embed(positions)
        if cache is None:
            return self.final_norm(self._layers_without_cache(x, positions, attention_mask)), None
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, layer_new = layer(x, positions, attention_mask, cache[i], cache_index)
            new_cache.append(layer_new)
        return self.final_norm(x), tuple(new_cache)

    def _layers_without_cache(self, x, positions, attention_mask):
        """All layers, unrolled or as one `lax.scan` body, each optionally rematerialised."""
        block_def = nnx.graphdef(self.layers[0])

        def block(layer_state, x):
            out, _ = nnx.merge(block_def, layer_state)(x, positions, attention_mask, None, 0)
            return out

        if self.cfg.remat == "full":
            block = jax.checkpoint(block)
        elif self.cfg.remat == "dots":
            block = jax.checkpoint(block, policy=jax.checkpoint_policies.dots_saveable)
        states = [nnx.state(layer) for layer in self.layers]
        if not self.cfg.scan_layers:
            for state in states:
                x = block(state, x)
            return x
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
        x, _ = jax.lax.scan(lambda h, state: (block(state, h), None), x, stacked)
        return x

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM logits `[B, T, V]` in float32."""
        if self.cfg.tie_word_embeddings:
            return self.embed.attend(hidden).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

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


class ModelOutput(NamedTuple):
    hidden: jax.Array  # [B, T, D]
    cache: KVCache | None


def apply(cfg, params, input_ids, attention_mask, *, positions=None, cache=None, cache_index=0):
    """Backbone forward. See `Transformer.__call__` for the mask/cache contract."""
    model = bind(cfg, params)
    return ModelOutput(*model(input_ids, attention_mask, positions, cache, cache_index))


def forward(cfg: ModelConfig, params: Params, input_ids, attention_mask, *, positions=None,
            last: int | None = None):
    """LM logits `[B, T, V]` (float32) for `input_ids [B, T]` with `attention_mask [B, T]`.

    `last=n` returns only the logits of positions T−n−1 .. T−2 (those predicting the last n
    tokens), so the LM head — a vocabulary-sized matmul — never runs on prompt positions.
    """
    model = bind(cfg, params)
    hidden, _ = model(input_ids, attention_mask, positions)
    return model.logits(_predicting_last(hidden, last))


def _predicting_last(x, last: int | None):
    return x if last is None else x[:, -last - 1:-1]


def forward_with_values(cfg, params, input_ids, attention_mask, *, positions=None,
                        last: int | None = None):
    """`(logits [B, T, V], values [B, T])` for a policy with a shared-backbone value head
    (`last` as in `forward`, for both)."""
    model = bind(cfg, params)
    hidden, _ = model(input_ids, attention_mask, positions)
    hidden = _predicting_last(hidden, last)
    return model.logits(hidden), model.scores(hidden)


def token_scores(cfg, params, input_ids, attention_mask, *, positions=None,
                 last: int | None = None):
    """Per-token scalar head `[B, T]` (a value model's values; `last` as in `forward`)."""
    model = bind(cfg, params)
    hidden, _ = model(input_ids, attention_mask, positions)
    return model.scores(_predicting_last(hidden, last))


def reward_scores(cfg, params, input_ids, attention_mask):
    """A reward model's scalar `[B]`, read at each row's last real token."""
    scores = token_scores(cfg, params, input_ids, attention_mask)
    idx = last_token_index(attention_mask)
    return jnp.take_along_axis(scores, idx[:, None], axis=1)[:, 0]


def init_cache(cfg: ModelConfig, batch_size: int, max_length: int, dtype=None) -> KVCache:
    """Zeroed KV cache: per layer, keys and values of shape `[B, S, K, Dh]`."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (batch_size, max_length, cfg.num_kv_heads, cfg.head_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers))
