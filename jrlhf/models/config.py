"""Model configuration: one frozen dataclass for both decoder families.

The two families share one code path wherever they agree; the fields below are the places they
differ. `from_hf_config` / `to_hf_config` are the only translation to and from transformers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

Family = Literal["gpt2", "llama"]

# The sizes every model has; each must be a positive integer.
SIZE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
               "intermediate_size", "max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer.

    `family="gpt2"`: learned positions, LayerNorm, GELU MLP, fused-QKV checkpoints.
    `family="llama"`: RoPE, RMSNorm, gated MLP, grouped-query attention — and, through the
    fields below, the variants built on it: Mistral / Qwen2 sliding windows, Llama 3.x RoPE
    scaling, Qwen3's per-head QK-norm, Gemma 2 / 3's (1 + w) norms, sandwich norms, scaled
    embeddings and soft-capping, GPT-OSS's attention sinks, and mixtures of experts.
    `lm_head` / `scalar_head` pick the heads: a policy has the LM head, a reward or value model
    has the scalar head, a policy with a shared-backbone critic has both.
    """

    family: Family = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 16
    intermediate_size: int = 128
    max_position_embeddings: int = 512
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # RoPE scaling of the (global) layers as sorted (key, value) pairs of transformers'
    # `rope_parameters`: rope_type llama3 | linear | yarn and its fields; () = plain RoPE.
    rope_scaling: tuple = ()
    local_rope_theta: float | None = None  # RoPE base of sliding-window layers (Gemma 3)
    activation: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (GPT-2, Qwen2, Llama attention_bias)
    output_bias: bool = False  # bias on the attention output projection (GPT-2, Llama)
    mlp_bias: bool = False  # bias on the MLP projections (GPT-2, Llama mlp_bias)
    # Sliding-window attention: a query at position i sees keys i − window + 1 .. i. Applies to
    # the layers `layer_types` marks "sliding_attention" (every layer when layer_types is ()).
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # per layer: "full_attention" | "sliding_attention"
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (Qwen3, Gemma 3)
    norm_plus_one: bool = False  # RMSNorms scale by (1 + w), w initialised at 0 (Gemma)
    sandwich_norms: bool = False  # norms after attention and after the MLP too (Gemma 2 / 3)
    scale_embeddings: bool = False  # embeddings times sqrt(hidden_size) (Gemma)
    query_scale: float | None = None  # attention logit scale; None = head_dim ** -0.5
    attn_softcap: float | None = None  # attention logits -> cap · tanh(logits / cap) (Gemma 2)
    final_softcap: float | None = None  # the same on the LM logits (Gemma 2)
    # GPT-OSS: a learned logit per query head joins each query's softmax denominator (param
    # `attn/sinks [H]`; `jrlhf.models.attention`).
    attention_sinks: bool = False
    hf_model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    lm_head: bool = True
    scalar_head: bool = False
    dtype: str = "float32"  # compute dtype; parameters keep their own dtype
    scan_layers: bool = False  # one compiled layer body (lax.scan) for cache-free forwards
    remat: str = "none"  # rematerialise each layer in the backward pass: none | full | dots
    attention: str = "auto"  # auto | xla | cudnn (see jrlhf.models.attention)
    # Materialise the residual stream's gradient between layers (`transformer.gradient_barrier`):
    # auto | on | off; auto = on where it pays (XLA:CPU), off on GPU / TPU.
    residual_barrier: str = "auto"
    # Positions per LM-head block in the losses (`token_outputs`); 0 = all at once.
    logits_chunk_size: int = 2048
    # Mixture of experts (Qwen2-MoE, Qwen3-MoE, Mixtral, GPT-OSS; `jrlhf.models.moe`). 0 experts:
    # every MLP is dense. A sparse layer's MLP routes each token to `experts_per_token` of
    # `num_experts` gated MLPs of width `expert_size` (top-k of a softmax router).
    num_experts: int = 0
    experts_per_token: int = 0
    expert_size: int = 0
    norm_topk_prob: bool = False  # the k chosen probabilities renormalised to sum to 1
    dense_layers: tuple[int, ...] = ()  # layers whose MLP stays dense (intermediate_size wide)
    shared_expert_size: int = 0  # Qwen2-MoE: a sigmoid-gated shared expert beside the routed ones
    # How the router's logits choose and weight the experts (`ROUTINGS`): "softmax_topk" (softmax
    # over all E, the top k kept: Qwen, Mixtral) | "topk_softmax" (the top k logits, softmax
    # over those k alone: GPT-OSS).
    routing: str = "softmax_topk"
    router_bias: bool = False  # a bias on the router's logits (GPT-OSS)
    expert_bias: bool = False  # biases on every expert's gate, up and down projections (GPT-OSS)
    # GPT-OSS's clamped SwiGLU experts (`moe.clamped_swiglu`): None = act(gate) · up.
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702  # its sigmoid gain (with swiglu_limit only)
    router_aux_loss_coef: float = 0.0  # the checkpoint's load-balancing weight (training default)
    router_z_loss_coef: float = 0.0  # weight of the router z-loss (training only; not saved)

    def __post_init__(self):
        # JSON round trips give lists; the config must stay hashable (it is a static jit arg).
        object.__setattr__(self, "rope_scaling",
                           tuple(sorted((str(k), v) for k, v in dict(self.rope_scaling).items())))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "dense_layers", tuple(sorted(int(i) for i in self.dense_layers)))
        if self.family not in ("gpt2", "llama"):
            raise ValueError(f"ModelConfig.family must be 'gpt2' or 'llama', got {self.family!r}")
        for name in SIZE_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if not (self.lm_head or self.scalar_head):
            raise ValueError("a model needs at least one head: lm_head or scalar_head")
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"remat must be none|full|dots, got {self.remat!r}")
        if self.attention not in ("auto", "xla", "cudnn"):
            raise ValueError(f"attention must be auto|xla|cudnn, got {self.attention!r}")
        if self.residual_barrier not in ("auto", "on", "off"):
            raise ValueError(f"residual_barrier must be auto|on|off, got "
                             f"{self.residual_barrier!r}")
        if self.logits_chunk_size < 0:
            raise ValueError(f"logits_chunk_size must be >= 0, got {self.logits_chunk_size}")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                             f"{self.num_layers} layers")
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ValueError(f"layer_types: unknown {bad}; known: {', '.join(LAYER_TYPES)}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")
        rope_type = dict(self.rope_scaling).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope type {rope_type!r} is not supported; supported: "
                             f"{', '.join(ROPE_TYPES)}")
        if self.scan_layers and len({self.layer_window(i) for i in range(self.num_layers)}) > 1:
            raise ValueError("scan_layers needs every layer alike, but layer_types mixes "
                             "sliding-window and full attention layers; use scan_layers=False")
        self._check_experts()

    def _check_experts(self):
        if self.num_experts < 0:
            raise ValueError(f"num_experts must be >= 0, got {self.num_experts}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be {'|'.join(ROUTINGS)}, got {self.routing!r}")
        if not self.num_experts:
            expert_only = dict(experts_per_token=self.experts_per_token,
                               dense_layers=self.dense_layers,
                               shared_expert_size=self.shared_expert_size,
                               routing=self.routing != ROUTINGS[0],
                               router_bias=self.router_bias, expert_bias=self.expert_bias,
                               swiglu_limit=self.swiglu_limit is not None)
            if any(expert_only.values()):
                raise ValueError(f"{', '.join(k for k, v in expert_only.items() if v)} need "
                                 "num_experts > 0")
            return
        if self.routing == "topk_softmax" and self.norm_topk_prob:
            raise ValueError("norm_topk_prob renormalises softmax_topk routing; topk_softmax "
                             "weights already sum to 1: set norm_topk_prob=False")
        if self.swiglu_limit is not None and not self.swiglu_limit > 0:
            raise ValueError(f"swiglu_limit must be > 0 (or None), got {self.swiglu_limit}")
        if self.family != "llama":
            raise ValueError("mixture-of-experts layers need family='llama'")
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise ValueError(f"experts_per_token must be in 1..num_experts={self.num_experts}, "
                             f"got {self.experts_per_token}")
        if self.expert_size < 1:
            raise ValueError(f"expert_size must be a positive integer, got {self.expert_size}")
        if self.shared_expert_size < 0:
            raise ValueError(f"shared_expert_size must be >= 0, got {self.shared_expert_size}")
        bad = [i for i in self.dense_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"dense_layers {bad} are not layers of a {self.num_layers}-layer "
                             "model")
        if self.scan_layers and len({self.layer_is_sparse(i)
                                     for i in range(self.num_layers)}) > 1:
            raise ValueError("scan_layers needs every layer alike, but dense_layers mixes dense "
                             "and sparse MLPs; use scan_layers=False")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def layer_is_sparse(self, layer: int) -> bool:
        """Whether layer `layer`'s MLP is a mixture of experts."""
        return self.num_experts > 0 and layer not in self.dense_layers

    @property
    def sparse_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.layer_is_sparse(i))

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (None: full causal attention)."""
        if self.sliding_window is None:
            return None
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def layer_rope(self, layer: int) -> tuple[float, tuple]:
        """`(theta, rope_scaling)` of layer `layer`: Gemma 3's local layers use their own base
        and plain RoPE; every other layer the global ones."""
        if self.local_rope_theta is not None and self.layer_window(layer) is not None:
            return self.local_rope_theta, ()
        return self.rope_theta, self.rope_scaling

    @property
    def layer_params(self) -> int:
        """Parameters of one (the last) decoder layer: attention, MLP, norms."""
        return self.layer_param_count(self.num_layers - 1)

    def layer_param_count(self, layer: int, active: bool = False) -> int:
        """Parameters of decoder layer `layer`; with `active`, those one token uses (a sparse
        layer's router, k of its experts and the shared expert)."""
        d, f = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = d * (q + 2 * kv) + q * d
        if self.attention_bias:
            attn += q + 2 * kv
        if self.output_bias:
            attn += d
        if self.qk_norm:
            attn += 2 * self.head_dim
        if self.attention_sinks:
            attn += self.num_heads
        if self.family == "gpt2":
            return attn + 2 * d * f + (f + d if self.mlp_bias else 0) + 4 * d
        mlp = 3 * d * f + (2 * f + d if self.mlp_bias else 0)
        if self.layer_is_sparse(layer):
            experts = self.experts_per_token if active else self.num_experts
            fe = self.expert_size
            per_expert = 3 * d * fe + (2 * fe + d if self.expert_bias else 0)
            mlp = (d + int(self.router_bias)) * self.num_experts + experts * per_expert
            if self.shared_expert_size:
                mlp += 3 * d * self.shared_expert_size + d
        return attn + mlp + (4 if self.sandwich_norms else 2) * d

    @property
    def kv_projection_params(self) -> int:
        """Parameters of one layer's key and value projections."""
        kv = self.num_kv_heads * self.head_dim
        return 2 * self.hidden_size * kv + (2 * kv if self.attention_bias else 0)

    @property
    def num_params(self) -> int:
        """Analytic parameter count (embeddings and heads included)."""
        return self.param_count()

    @property
    def active_params(self) -> int:
        """Parameters one token uses: `num_params` with each sparse layer's k experts only."""
        return self.param_count(active=True)

    def param_count(self, active: bool = False) -> int:
        d = self.hidden_size
        final = 2 * d if self.family == "gpt2" else d
        extra = self.max_position_embeddings * d if self.family == "gpt2" else 0
        layers = sum(self.layer_param_count(i, active) for i in range(self.num_layers))
        total = self.vocab_size * d + extra + layers + final
        if self.lm_head and not self.tie_word_embeddings:
            total += self.vocab_size * d
        if self.scalar_head:
            total += d
        return total


LAYER_TYPES = ("full_attention", "sliding_attention")
ROUTINGS = ("softmax_topk", "topk_softmax")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@functools.lru_cache(maxsize=64)
def rope_frequencies(head_dim: int, theta: float, scaling: tuple = ()):
    """RoPE's inverse frequencies `[head_dim // 2]` (float32 NumPy) and the factor that scales
    cos and sin (YaRN's attention factor; 1 otherwise), for `scaling` pairs as in
    `ModelConfig.rope_scaling` — transformers' `rope_parameters` definitions:
    - linear: every frequency divided by `factor`;
    - llama3: wavelengths above original_max_position_embeddings / low_freq_factor divided by
      `factor`, below original / high_freq_factor kept, smoothly interpolated between;
    - yarn: interpolated (÷ factor) and extrapolated frequencies blended by a linear ramp over
      the dimensions whose rotation counts fall between beta_slow and beta_fast; attention
      factor `attention_factor`, else 0.1·ln(factor) + 1 (or the mscale / mscale_all_dim ratio).

    Computed once per (head_dim, theta, scaling) and cached: every layer's q and k ask for it
    at trace time. The returned array is read-only.
    """
    p = dict(scaling)
    rope_type = p.get("rope_type", "default")
    dim = head_dim
    # In float32 by XLA, bit-equal to transformers' inv_freq buffer (NumPy's float32 pow is
    # not); at SmolLM2's |h| ~ 1e4 one ulp of a frequency shows in the logits.

    with jax.ensure_compile_time_eval():
        base = 1.0 / (theta ** (jnp.arange(0, dim // 2, dtype=jnp.float32) * 2.0 / dim))
    inv_freq = np.asarray(base, np.float64)
    factor = p.get("factor")
    attention_factor = 1.0
    if rope_type == "linear":
        inv_freq = inv_freq / factor
    elif rope_type == "llama3":
        old = p["original_max_position_embeddings"]
        low, high = p["low_freq_factor"], p["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        inv_freq = np.where(medium, smoothed, scaled)
    elif rope_type == "yarn":
        old = p["original_max_position_embeddings"]

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention_factor = p.get("attention_factor")
        if attention_factor is None:
            if p.get("mscale") and p.get("mscale_all_dim"):
                attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
            else:
                attention_factor = mscale(factor)
        beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

        def correction_dim(rotations):
            return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if p.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - lo) / (hi - lo), 0, 1)
        extrapolation = 1 - ramp
        inv_freq = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
    elif rope_type != "default":
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: "
                         f"{', '.join(ROPE_TYPES)}")
    inv_freq = inv_freq.astype(np.float32)
    inv_freq.setflags(write=False)  # shared by the cache
    return inv_freq, float(attention_factor)


def _first_id(value) -> int | None:
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


# transformers model types and what they turn on beyond the Llama block.
MOE = ("qwen2_moe", "qwen3_moe", "mixtral", "gpt_oss")
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", *MOE)
GEMMA = ("gemma2", "gemma3_text")
QWEN = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")  # sliding windows behind use_sliding_window
# Architectures people ask for that stay refused, and why (one line each).
REFUSED = {
    "deepseek_v3": "its multi-head latent attention (kv_lora_rank) and grouped sigmoid routing "
                   "(topk_method, n_group) are not implemented",
    "deepseek_v2": "its multi-head latent attention (kv_lora_rank) is not implemented",
}
_KNOWN_ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


def _rope(params: dict | None, where: str) -> tuple[float | None, tuple]:
    """`(theta, rope_scaling pairs)` of one transformers `rope_parameters` dict."""
    params = dict(params or {})
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise NotImplementedError(f"{where}: partial_rotary_factor="
                                  f"{params['partial_rotary_factor']} is not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise NotImplementedError(f"{where}: rope type {rope_type!r} is not supported; "
                                  f"supported: {', '.join(ROPE_TYPES)}")
    theta = params.get("rope_theta")
    if rope_type == "default":
        return theta, ()
    scaling = {k: v for k, v in params.items()
               if k not in ("rope_theta", "partial_rotary_factor", "type")}
    scaling["rope_type"] = rope_type
    return theta, tuple(sorted(scaling.items()))


def _rope_fields(hf) -> dict:
    """rope_theta / rope_scaling / local_rope_theta from a config's `rope_parameters` (nested
    by layer type for Gemma 3: its sliding layers have their own base and no scaling)."""
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    fallback = float(getattr(hf, "rope_theta", None) or 10000.0)
    if "full_attention" in params or "sliding_attention" in params:
        theta, scaling = _rope(params.get("full_attention"), "rope_parameters.full_attention")
        local, local_scaling = _rope(params.get("sliding_attention"),
                                     "rope_parameters.sliding_attention")
        if local_scaling:
            raise NotImplementedError("rope_parameters.sliding_attention: RoPE scaling on the "
                                      f"sliding-window layers is not supported ({local_scaling})")
        return dict(rope_theta=float(theta or fallback), rope_scaling=scaling,
                    local_rope_theta=None if local is None else float(local))
    theta, scaling = _rope(params, "rope_parameters")
    return dict(rope_theta=float(theta or fallback), rope_scaling=scaling)


def _window_fields(hf, model_type: str) -> dict:
    """sliding_window / layer_types: transformers 5 configs list a type per layer (Qwen2/3
    from use_sliding_window and max_window_layers, Gemma's alternating pattern); Mistral's
    window, when set, covers every layer."""
    window = getattr(hf, "sliding_window", None)
    if model_type in QWEN and not getattr(hf, "use_sliding_window", False):
        window = None
    layer_types = tuple(getattr(hf, "layer_types", None) or ())
    unknown = sorted(set(layer_types) - set(LAYER_TYPES))
    if unknown:
        raise NotImplementedError(f"{model_type}: layer_types {unknown} are not supported; "
                                  f"supported: {', '.join(LAYER_TYPES)}")
    if window is None or (layer_types and "sliding_attention" not in layer_types):
        return dict(sliding_window=None, layer_types=())
    if "full_attention" not in layer_types:
        layer_types = ()  # every layer slides
    return dict(sliding_window=int(window), layer_types=layer_types)


def quant_method(quantization_config) -> str | None:
    """The `quant_method` of a config's `quantization_config` (a dict, or transformers' object)."""
    if isinstance(quantization_config, dict):
        return quantization_config.get("quant_method")
    return getattr(quantization_config, "quant_method", None)


def _refuse(hf, field: str, why: str, ok=lambda v: not v) -> None:
    value = getattr(hf, field, None)
    if not ok(value):
        raise NotImplementedError(f"{hf.model_type} with {field}={value!r} is not supported: {why}")


def _expert_fields(hf, model_type: str) -> dict:
    """The mixture-of-experts fields of a Qwen2-MoE / Qwen3-MoE / Mixtral config (dense: {})."""
    if model_type not in MOE:
        return {}
    experts = getattr(hf, "num_local_experts", None) or getattr(hf, "num_experts", None) or 0
    if not experts:
        return {}
    coef = float(getattr(hf, "router_aux_loss_coef", 0.0) or 0.0)
    common = dict(num_experts=int(experts), experts_per_token=int(hf.num_experts_per_tok),
                  router_aux_loss_coef=coef)
    if model_type == "mixtral":
        _refuse(hf, "router_jitter_noise", "training-time router noise is not implemented")
        return dict(common, expert_size=int(hf.intermediate_size), norm_topk_prob=True)
    if model_type == "gpt_oss":
        return dict(common, expert_size=int(hf.intermediate_size), routing="topk_softmax",
                    router_bias=True, expert_bias=True, swiglu_limit=float(hf.swiglu_limit),
                    swiglu_alpha=float(getattr(hf, "swiglu_alpha", 1.702)))
    step = int(getattr(hf, "decoder_sparse_step", 1) or 1)
    only = set(getattr(hf, "mlp_only_layers", None) or ())
    dense = tuple(i for i in range(hf.num_hidden_layers) if i in only or (i + 1) % step)
    shared = int(getattr(hf, "shared_expert_intermediate_size", 0) or 0)
    return dict(common, expert_size=int(hf.moe_intermediate_size),
                norm_topk_prob=bool(getattr(hf, "norm_topk_prob", False)), dense_layers=dense,
                shared_expert_size=shared if model_type == "qwen2_moe" else 0)


def from_hf_config(hf: Any, **overrides) -> ModelConfig:
    """Translate a transformers `PretrainedConfig` into a `ModelConfig`.

    Anything that changes the computation and is not implemented is refused naming the field;
    nothing is accepted and then computed differently.
    """
    model_type = hf.model_type
    ids = dict(
        bos_token_id=_first_id(getattr(hf, "bos_token_id", None)),
        eos_token_id=_first_id(getattr(hf, "eos_token_id", None)),
        pad_token_id=_first_id(getattr(hf, "pad_token_id", None)),
    )
    if model_type == "gpt2":
        if getattr(hf, "scale_attn_by_inverse_layer_idx", False) or getattr(
            hf, "reorder_and_upcast_attn", False
        ):
            raise NotImplementedError("GPT-2 variants with layer-scaled attention are not supported")
        if not getattr(hf, "scale_attn_weights", True):
            raise NotImplementedError("GPT-2 with scale_attn_weights=False is not supported")
        d = hf.n_embd
        cfg = ModelConfig(
            family="gpt2",
            vocab_size=hf.vocab_size,
            hidden_size=d,
            num_layers=hf.n_layer,
            num_heads=hf.n_head,
            num_kv_heads=hf.n_head,
            head_dim=d // hf.n_head,
            intermediate_size=hf.n_inner or 4 * d,
            max_position_embeddings=hf.n_positions,
            norm_eps=hf.layer_norm_epsilon,
            activation=hf.activation_function,
            tie_word_embeddings=True,
            attention_bias=True,
            output_bias=True,
            mlp_bias=True,
            hf_model_type="gpt2",
            **ids,
        )
    elif model_type in LLAMA_LIKE:
        heads = hf.num_attention_heads
        gemma = model_type in GEMMA
        _refuse(hf, "use_bidirectional_attention", "jrlhf's models are causal decoders")
        _refuse(hf, "pretraining_tp", "tensor-parallel pretraining splits are not implemented",
                ok=lambda v: v in (None, 1))
        if model_type == "gemma3_text":
            _refuse(hf, "attn_logit_softcapping", "Gemma 3 uses QK-norm, not soft-capping")
        if model_type == "gpt_oss":  # MXFP4 experts are dequantized on load (`hf.py`)
            _refuse(hf, "quantization_config", "only MXFP4 expert weights are dequantized on "
                    "load", ok=lambda v: not v or quant_method(v) == "mxfp4")
        # Mistral's / Mixtral's projections never have biases; Qwen2's q/k/v always do, Qwen2-MoE's
        # when qkv_bias (see below).
        bias = model_type not in ("mistral", "mixtral") and bool(getattr(hf, "attention_bias",
                                                                        False))
        activation = (getattr(hf, "hidden_activation", None) if gemma else None) or hf.hidden_act
        if activation not in _KNOWN_ACTIVATIONS:
            raise NotImplementedError(f"{model_type} with activation {activation!r} is not "
                                      f"supported; supported: {', '.join(_KNOWN_ACTIVATIONS)}")
        cfg = ModelConfig(
            family="llama",
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
            intermediate_size=hf.intermediate_size,
            max_position_embeddings=hf.max_position_embeddings,
            norm_eps=hf.rms_norm_eps,
            **_rope_fields(hf),
            activation=activation,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            # Qwen2 always biases q/k/v and never o; elsewhere attention_bias biases all four.
            attention_bias=(model_type == "qwen2" or bias if model_type != "qwen2_moe"
                            else bool(getattr(hf, "qkv_bias", False))),
            output_bias=bias and model_type not in ("qwen2", "qwen2_moe"),
            mlp_bias=model_type == "llama" and bool(getattr(hf, "mlp_bias", False)),
            **_window_fields(hf, model_type),
            qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
            norm_plus_one=gemma,
            sandwich_norms=gemma,
            scale_embeddings=gemma,
            query_scale=float(hf.query_pre_attn_scalar) ** -0.5 if gemma else None,
            attn_softcap=getattr(hf, "attn_logit_softcapping", None) if gemma else None,
            final_softcap=getattr(hf, "final_logit_softcapping", None) if gemma else None,
            attention_sinks=model_type == "gpt_oss",
            hf_model_type=model_type,
            **_expert_fields(hf, model_type),
            **ids,
        )
    elif model_type in REFUSED:
        raise NotImplementedError(f"model_type {model_type!r} is not supported: "
                                  f"{REFUSED[model_type]}")
    else:
        hint = (" (the multimodal Gemma 3; its text model is model_type 'gemma3_text')"
                if model_type == "gemma3" else "")
        raise NotImplementedError(
            f"model_type {model_type!r} is not supported{hint}; supported: gpt2, "
            f"{', '.join(LLAMA_LIKE)}"
        )
    return dataclasses.replace(cfg, **overrides)


def _rope_parameters(theta: float, scaling: tuple) -> dict:
    return {"rope_theta": theta, **(dict(scaling) or {"rope_type": "default"})}


def to_hf_config(cfg: ModelConfig):
    """The transformers config that describes `cfg` (for `save_pretrained`)."""
    import transformers

    ids = dict(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
               pad_token_id=cfg.pad_token_id)
    if cfg.family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.max_position_embeddings,
            n_embd=cfg.hidden_size,
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            n_inner=cfg.intermediate_size,
            activation_function=cfg.activation,
            layer_norm_epsilon=cfg.norm_eps,
            tie_word_embeddings=True,
            **ids,
        )
    model_type = cfg.hf_model_type
    config_class = transformers.AutoConfig.for_model(model_type).__class__
    gemma = model_type in GEMMA
    kwargs = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        sliding_window=cfg.sliding_window,
        **ids,
    )
    kwargs["hidden_activation" if gemma else "hidden_act"] = cfg.activation
    if model_type == "gemma3_text":
        kwargs["rope_parameters"] = {
            "full_attention": _rope_parameters(cfg.rope_theta, cfg.rope_scaling),
            "sliding_attention": _rope_parameters(cfg.local_rope_theta or cfg.rope_theta, ())}
    else:
        kwargs["rope_parameters"] = _rope_parameters(cfg.rope_theta, cfg.rope_scaling)
    if model_type not in ("qwen2", "mistral", "qwen2_moe", "mixtral"):
        kwargs["attention_bias"] = cfg.attention_bias
    if model_type == "qwen2_moe":
        kwargs["qkv_bias"] = cfg.attention_bias
    if model_type == "llama":
        kwargs["mlp_bias"] = cfg.mlp_bias
    if model_type in QWEN:
        kwargs["use_sliding_window"] = cfg.sliding_window is not None
        kwargs["max_window_layers"] = 0
    kwargs.update(_hf_expert_fields(cfg))
    if model_type not in ("llama", "mistral", "mixtral", "qwen3_moe"):
        kwargs["layer_types"] = [
            "full_attention" if cfg.layer_window(i) is None else "sliding_attention"
            for i in range(cfg.num_layers)]
    if gemma:
        scalar = (cfg.query_scale or cfg.head_dim ** -0.5) ** -2
        kwargs.update(query_pre_attn_scalar=round(scalar) if abs(scalar - round(scalar)) < 1e-6
                      else scalar,
                      final_logit_softcapping=cfg.final_softcap)
        if model_type == "gemma2":
            kwargs["attn_logit_softcapping"] = cfg.attn_softcap
    return config_class(**kwargs)


def _hf_expert_fields(cfg: ModelConfig) -> dict:
    """The transformers config fields of `cfg`'s experts (the inverse of `_expert_fields`)."""
    if cfg.hf_model_type not in MOE:
        return {}
    common = dict(num_experts_per_tok=max(cfg.experts_per_token, 1),
                  router_aux_loss_coef=cfg.router_aux_loss_coef)
    if cfg.hf_model_type == "mixtral":
        return dict(common, num_local_experts=cfg.num_experts, router_jitter_noise=0.0,
                    intermediate_size=cfg.expert_size or cfg.intermediate_size)
    if cfg.hf_model_type == "gpt_oss":
        return dict(common, num_local_experts=cfg.num_experts,
                    intermediate_size=cfg.expert_size or cfg.intermediate_size,
                    swiglu_limit=cfg.swiglu_limit, swiglu_alpha=cfg.swiglu_alpha)
    fields = dict(common, num_experts=cfg.num_experts, moe_intermediate_size=cfg.expert_size,
                  norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1,
                  mlp_only_layers=list(cfg.dense_layers))
    if cfg.hf_model_type == "qwen2_moe":
        fields["shared_expert_intermediate_size"] = cfg.shared_expert_size
    return fields


# ----------------------------------------------------------------------------------------------
# Checks before anything is allocated.

# Size keys of a transformers config.json (GPT-2's names, then the Llama family's); the ones in
# _HF_OPTIONAL_SIZES may be null (derived by transformers).
_HF_SIZE_KEYS = ("vocab_size", "n_embd", "n_head", "n_layer", "n_positions", "n_inner",
                 "hidden_size", "num_attention_heads", "num_key_value_heads",
                 "num_hidden_layers", "intermediate_size", "max_position_embeddings", "head_dim")
_HF_OPTIONAL_SIZES = ("n_inner", "num_key_value_heads", "head_dim")


def check_hf_sizes(raw: dict, where: str) -> None:
    """Refuse a config.json dict whose sizes describe no model, before transformers sees it.

    Every size present is a positive integer, the heads divide the hidden size where the head
    size is derived from it (GPT-2 always; the Llama family when `head_dim` is not given), and
    the query heads are a multiple of the key/value heads.

    Raises:
        ValueError: one line naming `where`, the key and its value.
    """
    for key in _HF_SIZE_KEYS:
        value = raw.get(key)
        if key not in raw or (value is None and key in _HF_OPTIONAL_SIZES):
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}: {key}={value!r} must be a positive integer")
    gpt2 = raw.get("model_type") == "gpt2"
    hidden, heads = ("n_embd", "n_head") if gpt2 else ("hidden_size", "num_attention_heads")
    derived = gpt2 or raw.get("head_dim") is None
    if hidden in raw and heads in raw and derived and raw[hidden] % raw[heads]:
        raise ValueError(f"{where}: {heads}={raw[heads]} does not divide {hidden}={raw[hidden]} "
                         f"(the head size is {hidden} / {heads}"
                         f"{'' if gpt2 else ' when head_dim is not given'})")
    kv_heads = None if gpt2 else raw.get("num_key_value_heads")
    if kv_heads and heads in raw and raw[heads] % kv_heads:
        raise ValueError(f"{where}: {heads}={raw[heads]} must be a multiple of "
                         f"num_key_value_heads={kv_heads}")


# Fields that say how a model is computed, not what its checkpoint holds.
_COMPUTE_FIELDS = ("dtype", "scan_layers", "remat", "attention", "residual_barrier",
                   "logits_chunk_size", "router_z_loss_coef")


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b


def _explicit_query_scale(cfg: ModelConfig) -> float | None:
    """`cfg.query_scale`, None where it is the default head_dim ** -0.5."""
    scale = cfg.query_scale
    return None if scale is None or _same(scale, cfg.head_dim ** -0.5) else scale


def check_exportable(cfg: ModelConfig, where: str) -> None:
    """Refuse a config that its own Hugging Face form would not describe.

    What `save_pretrained` writes must load back as the same model: a GPT-2 checkpoint has
    every bias and `hf_model_type="gpt2"`, Qwen2 biases q/k/v, Mistral has no biases, ... A
    random-weight `model.arch` is checked here before training, not when its export fails.

    Raises:
        ValueError: one line naming `where` and each field that would not round-trip.
    """
    try:
        back = from_hf_config(to_hf_config(cfg), lm_head=cfg.lm_head,
                              scalar_head=cfg.scalar_head)
    except Exception as err:  # noqa: BLE001 - transformers' validators raise their own types
        text = " ".join(str(err).split())
        raise ValueError(f"{where}: cannot be written as a {cfg.hf_model_type} checkpoint "
                         f"({type(err).__name__}: {text})") from None
    ours, theirs = (dataclasses.replace(c, query_scale=_explicit_query_scale(c))
                    for c in (cfg, back))
    differ = [f"{f.name}={getattr(ours, f.name)!r} (it has {getattr(theirs, f.name)!r})"
              for f in dataclasses.fields(cfg)
              if f.name not in _COMPUTE_FIELDS
              and not _same(getattr(ours, f.name), getattr(theirs, f.name))]
    if differ:
        raise ValueError(f"{where}: a {back.hf_model_type} checkpoint cannot hold this model: "
                         f"{', '.join(differ)}; set these fields to match")


def host_memory_bytes() -> int:
    """Physical memory of this host, in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def format_bytes(n: float) -> str:
    """`n` bytes as a short human size (`3.6 TiB`)."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    power = 0
    while n >= 1024 and power < len(units) - 1:
        n, power = n / 1024, power + 1
    return f"{n:.1f} {units[power]}"


def check_memory(cfg: ModelConfig, where: str, *, bytes_per_param: int = 4,
                 limit: int | None = None) -> None:
    """Refuse a model whose parameters alone exceed `limit` (default: this host's memory).

    Parameters are built on the host (float32 master weights: 4 bytes each), so a config that
    asks for more than the host has is refused before the first array is allocated.

    Raises:
        ValueError: one line naming `where`, the estimate, the limit and the sizes behind it.
    """
    limit = host_memory_bytes() if limit is None else limit
    need = cfg.num_params * bytes_per_param
    if need > limit:
        raise ValueError(
            f"{where}: {cfg.num_params:,} parameters need {format_bytes(need)} "
            f"({bytes_per_param} bytes each), more than the {format_bytes(limit)} of memory "
            f"this host has (vocab_size={cfg.vocab_size}, hidden_size={cfg.hidden_size}, "
            f"num_layers={cfg.num_layers}, intermediate_size={cfg.intermediate_size})")
