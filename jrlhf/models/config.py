"""Model configuration: one frozen dataclass for both decoder families.

The two families share one code path wherever they agree; the fields below are the places they
differ. `from_hf_config` / `to_hf_config` are the only translation to and from transformers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

Family = Literal["gpt2", "llama"]

# transformers model types that are the Llama architecture for our purposes (no sliding window).
LLAMA_LIKE = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer.

    `family="gpt2"`: learned positions, LayerNorm, GELU MLP, fused-QKV checkpoints.
    `family="llama"`: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention.
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
    activation: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (GPT-2, Qwen2)
    output_bias: bool = False  # bias on the attention output and MLP projections (GPT-2)
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
    # Positions per LM-head block in the losses (`token_outputs`); 0 = all at once.
    logits_chunk_size: int = 2048

    def __post_init__(self):
        if self.family not in ("gpt2", "llama"):
            raise ValueError(f"ModelConfig.family must be 'gpt2' or 'llama', got {self.family!r}")
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
        if self.logits_chunk_size < 0:
            raise ValueError(f"logits_chunk_size must be >= 0, got {self.logits_chunk_size}")

    @property
    def num_params(self) -> int:
        """Analytic parameter count (embeddings and heads included)."""
        d, f, L = self.hidden_size, self.intermediate_size, self.num_layers
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = d * (q + 2 * kv) + q * d
        if self.attention_bias:
            attn += q + 2 * kv
        if self.family == "gpt2":
            mlp = 2 * d * f + (f + d if self.output_bias else 0)
            attn += d if self.output_bias else 0
            norms = 4 * d
            final = 2 * d
            extra = self.max_position_embeddings * d
        else:
            mlp = 3 * d * f
            norms = 2 * d
            final = d
            extra = 0
        total = self.vocab_size * d + extra + L * (attn + mlp + norms) + final
        if self.lm_head and not self.tie_word_embeddings:
            total += self.vocab_size * d
        if self.scalar_head:
            total += d
        return total


def _rope_theta(hf) -> float:
    params = getattr(hf, "rope_parameters", None) or {}
    scaling = getattr(hf, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise NotImplementedError(
            f"rope type {rope_type!r} is not supported yet (only plain RoPE); config: {params or scaling}"
        )
    return float(params.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))


def _first_id(value) -> int | None:
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def from_hf_config(hf: Any, **overrides) -> ModelConfig:
    """Translate a transformers `PretrainedConfig` into a `ModelConfig`."""
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
            hf_model_type="gpt2",
            **ids,
        )
    elif model_type in LLAMA_LIKE:
        window = getattr(hf, "sliding_window", None)
        uses_window = getattr(hf, "use_sliding_window", model_type == "mistral")
        if uses_window and window and window < hf.max_position_embeddings:
            raise NotImplementedError(
                f"{model_type} with sliding_window={window} < max_position_embeddings is not supported"
            )
        heads = hf.num_attention_heads
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
            rope_theta=_rope_theta(hf),
            activation=hf.hidden_act,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(hf, "attention_bias", model_type == "qwen2")),
            output_bias=False,
            hf_model_type=model_type,
            **ids,
        )
        if getattr(hf, "mlp_bias", False):
            raise NotImplementedError("Llama configs with mlp_bias=True are not supported")
    else:
        raise NotImplementedError(
            f"model_type {model_type!r} is not supported; supported: gpt2, {', '.join(LLAMA_LIKE)}"
        )
    return dataclasses.replace(cfg, **overrides)


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
    config_class = transformers.AutoConfig.for_model(cfg.hf_model_type).__class__
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
        rope_theta=cfg.rope_theta,
        hidden_act=cfg.activation,
        tie_word_embeddings=cfg.tie_word_embeddings,
        **ids,
    )
    if cfg.hf_model_type == "llama":
        kwargs["attention_bias"] = cfg.attention_bias
    return config_class(**kwargs)
