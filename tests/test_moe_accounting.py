"""`jrlhf bench` and `jrlhf plan` on mixture-of-experts models: parameters, FLOPs and memory
against hand counts. FLOPs (and so MFU) are on the parameters a token uses (router, k experts,
shared expert); memory on all of them."""

import dataclasses
import warnings

import jax
import pytest

from jrlhf import bench
from jrlhf.config import Config, MeshConfig, derive
from jrlhf.models import ModelConfig, init_params
from jrlhf.plan import activation_estimate, format_plan, layer_activation_bytes, plan

# Qwen3-MoE-shaped: QK-norm, 8 experts of width 32, 2 per token, layer 1 dense (width 128).
QWEN3_MOE = ModelConfig(family="llama", hf_model_type="qwen3_moe", qk_norm=True, vocab_size=64,
                        hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                        intermediate_size=128, num_experts=8, experts_per_token=2,
                        expert_size=32, dense_layers=(1,), eos_token_id=2, pad_token_id=2)
# Qwen2-MoE-shaped: q/k/v biases, 4 experts of width 16, 2 per token, a shared expert of 48.
QWEN2_MOE = ModelConfig(family="llama", hf_model_type="qwen2_moe", attention_bias=True,
                        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=8, intermediate_size=96, num_experts=4, experts_per_token=2,
                        expert_size=16, shared_expert_size=48, eos_token_id=2, pad_token_id=2)

# Hand counts. Both: vocabulary 64, hidden 32, 4 query heads and 2 key/value heads of 8.
EMBED = HEAD = 64 * 32  # token embedding; untied LM head
FINAL, NORMS = 32, 2 * 32  # final norm; each layer's two norms
# Qwen3-MoE layer: q, k, v; o; q_norm, k_norm. MLPs: dense [32, 128]; router [32, 8]; experts.
Q3_ATTN = 32 * (32 + 16 + 16) + 32 * 32 + 8 + 8
Q3_DENSE, Q3_ROUTER, Q3_EXPERT = 3 * 32 * 128, 32 * 8, 3 * 32 * 32
Q3_TOTAL = (EMBED + HEAD + FINAL + 3 * (Q3_ATTN + NORMS) + Q3_DENSE
            + 2 * (Q3_ROUTER + 8 * Q3_EXPERT))
Q3_ACTIVE = (EMBED + HEAD + FINAL + 3 * (Q3_ATTN + NORMS) + Q3_DENSE
             + 2 * (Q3_ROUTER + 2 * Q3_EXPERT))
# Qwen2-MoE layer: q, k, v; their biases; o. Router [32, 4]; experts; shared MLP and its gate.
Q2_ATTN = 32 * (32 + 16 + 16) + (32 + 16 + 16) + 32 * 32
Q2_ROUTER, Q2_EXPERT, Q2_SHARED = 32 * 4, 3 * 32 * 16, 3 * 32 * 48 + 32
Q2_TOTAL = EMBED + HEAD + FINAL + 2 * (Q2_ATTN + NORMS) + 2 * (Q2_ROUTER + 4 * Q2_EXPERT
                                                                + Q2_SHARED)
Q2_ACTIVE = EMBED + HEAD + FINAL + 2 * (Q2_ATTN + NORMS) + 2 * (Q2_ROUTER + 2 * Q2_EXPERT
                                                                 + Q2_SHARED)
# name: (config, all parameters, active parameters, the last layer's active parameters,
#        per-token activation bytes of a sparse layer minus a dense one (float32, tensor=1))
CASES = {
    "qwen3_moe": (QWEN3_MOE, Q3_TOTAL, Q3_ACTIVE, Q3_ATTN + NORMS + Q3_ROUTER + 2 * Q3_EXPERT,
                  # gate/up/act/product 2·32 wide, not 128; 2 copies of 2 dispatched [32];
                  # router probabilities [8]
                  4 * 4 * (2 * 32 - 128) + 4 * 2 * 2 * 32 + 4 * 8),
    "qwen2_moe": (QWEN2_MOE, Q2_TOTAL, Q2_ACTIVE,
                  Q2_ATTN + NORMS + Q2_ROUTER + 2 * Q2_EXPERT + Q2_SHARED,
                  # ... 2·16 + 48 wide, not 96; dispatch; the shared expert's output [32];
                  # router probabilities [4]
                  4 * 4 * (2 * 16 + 48 - 96) + 4 * 2 * 2 * 32 + 4 * 32 + 4 * 4),
}
SPARSE_LAYERS = {"qwen3_moe": 2, "qwen2_moe": 2}
SEQ, TOKENS = 16, 10


def dense_version(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with every MLP dense (`intermediate_size` wide)."""
    return dataclasses.replace(cfg, num_experts=0, experts_per_token=0, expert_size=0,
                               dense_layers=(), shared_expert_size=0)


def small_config(cfg: ModelConfig) -> Config:
    """A random-weight `cfg` on one device; SFT rows of 4 x (8 + 8) = 64 tokens."""
    return derive(Config(), {
        "model.source": "random", "model.arch": cfg, "mesh": MeshConfig(1, 1, 1),
        "data.max_prompt_length": 8, "data.max_response_length": 8, "sft.batch_size": 4})


@pytest.mark.parametrize("name", CASES)
def test_parameter_counts_by_hand(name):
    """All parameters == the initialised tree's size == the hand count; active parameters ==
    the hand count with k of the E experts."""
    cfg, total, active, last, _ = CASES[name]
    assert sum(x.size for x in jax.tree.leaves(init_params(cfg))) == cfg.num_params == total
    assert cfg.active_params == active < total
    assert cfg.layer_param_count(cfg.num_layers - 1, active=True) == last


@pytest.mark.parametrize("name", CASES)
def test_model_flops_count_active_parameters(name):
    """6·(active matmul parameters + attention)·tokens: the embedding lookup is no matmul, the
    untied LM head is; (E − k) experts per sparse layer fewer than counting every expert."""
    cfg, total, active, last, _ = CASES[name]
    attn = 2 * cfg.num_layers * SEQ * 4 * 8  # 2·L·T·H·Dh per token
    matmul = active - EMBED
    assert bench.matmul_params(cfg) == matmul
    assert bench.matmul_params(cfg, active=False) == total - EMBED
    flops = bench.model_flops(cfg, TOKENS, SEQ, True)
    assert flops == 6 * (matmul + attn) * TOKENS
    every_expert = 6 * (total - EMBED + attn) * TOKENS
    E, k, expert = cfg.num_experts, cfg.experts_per_token, 3 * 32 * cfg.expert_size
    assert every_expert - flops == 6 * TOKENS * SPARSE_LAYERS[name] * (E - k) * expert > 0
    # The LM head on 4 positions of 10, forward only.
    assert bench.model_flops(cfg, TOKENS, SEQ, False, lm_tokens=4) == \
        2 * ((matmul - HEAD + attn) * TOKENS + HEAD * 4)
    # Reading 2 of 10 positions: the last (sparse) layer's query side, with its k experts,
    # runs on 2 tokens; its key / value projections on all 10.
    kv = 2 * 32 * 16 + (2 * 16 if cfg.attention_bias else 0)
    assert flops - bench.model_flops(cfg, TOKENS, SEQ, True, read_tokens=2) == \
        6 * (last - kv + 2 * SEQ * 4 * 8) * 8


def test_dense_models_count_as_before():
    """A dense model has no inactive parameters: FLOPs count all of them."""
    cfg = dense_version(QWEN3_MOE)
    assert bench.matmul_params(cfg) == bench.matmul_params(cfg, active=False) == \
        cfg.num_params - EMBED
    assert bench.decode_weight_params(cfg, 64) == bench.matmul_params(cfg)


def test_decode_reads_the_experts_its_rows_reach():
    """One decode step of B rows reads min(E, B·k) experts per sparse layer: k for one row,
    4 for two rows, all 8 from four rows on."""
    cfg = QWEN3_MOE
    assert bench.decode_weight_params(cfg, 1) == Q3_ACTIVE - EMBED
    assert bench.decode_weight_params(cfg, 2) == Q3_ACTIVE - EMBED + 2 * 2 * Q3_EXPERT
    assert bench.decode_weight_params(cfg, 4) == bench.decode_weight_params(cfg, 64) == \
        Q3_TOTAL - EMBED
    kv = 64 * 100 * 3 * 2 * 2 * 8 * 4  # rows · cached tokens · L · (k, v) · KV heads · Dh · 4
    assert bench.decode_bytes_per_step(cfg, 64, 100) == 4 * (Q3_TOTAL - EMBED) + kv


@pytest.mark.parametrize("name", CASES)
def test_layer_activations_by_hand(name):
    """A sparse layer keeps its k experts' (and the shared expert's) MLP activations, the
    dispatched copies, the router's probabilities; a dense layer what the dense model's does."""
    cfg, _, _, _, per_token = CASES[name]
    dense = dense_version(cfg)
    for layer in range(cfg.num_layers):
        moe_bytes = layer_activation_bytes(cfg, TOKENS, SEQ, layer=layer)
        dense_bytes = layer_activation_bytes(dense, TOKENS, SEQ, layer=layer)
        assert moe_bytes - dense_bytes == (TOKENS * per_token if cfg.layer_is_sparse(layer)
                                           else 0)
    sparse = SPARSE_LAYERS[name]
    assert activation_estimate(cfg, TOKENS, SEQ, TOKENS) - \
        activation_estimate(dense, TOKENS, SEQ, TOKENS) == sparse * TOKENS * per_token
    # remat="full": each layer's input [D] in float32, then the largest layer recomputed.
    full, dense_full = (dataclasses.replace(c, remat="full") for c in (cfg, dense))
    largest = max(layer_activation_bytes(cfg, TOKENS, SEQ, layer=i)
                  for i in range(cfg.num_layers))
    assert activation_estimate(full, TOKENS, SEQ, TOKENS) - \
        activation_estimate(dense_full, TOKENS, SEQ, TOKENS) == \
        largest - layer_activation_bytes(dense, TOKENS, SEQ)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_plan_counts_every_expert_in_memory(name):
    """Weights, gradients and Adam moments of every expert (float32, one device); the
    activations differ from the all-dense model's by the sparse layers' hand-derived bytes on
    4 x 16 = 64 tokens; the printout names the active parameters."""
    cfg, total, active, _, per_token = CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a mesh smaller than the 8 fake devices
        r = plan(small_config(cfg), "sft", "h100")
        d = plan(small_config(dense_version(cfg)), "sft", "h100")
    assert r["model_params"] == total and r["active_params"] == active
    assert r["params_bytes_per_device"] == 4 * total
    assert r["optimizer_bytes_per_device"] - 2 * 4 * total in range(64)  # + Adam's counters
    grads = r["temp_bytes_per_device"] - r["activation_estimate_bytes_per_device"]
    assert grads == 4 * total
    assert r["activation_estimate_bytes_per_device"] - \
        d["activation_estimate_bytes_per_device"] == SPARSE_LAYERS[name] * 64 * per_token
    assert f"{total / 1e6:.1f}M parameters ({active / 1e6:.1f}M active)" in format_plan(r)
    assert "active" not in format_plan(d)


@pytest.mark.slow
def test_bench_reports_active_parameters_and_flops():
    """`jrlhf bench sft` on the Qwen2-MoE shape: both parameter counts, and the analytic FLOPs
    of its 64 tokens on the active parameters (XLA:CPU's cost analysis counts a grouped matmul
    against every expert, so it is no check here)."""
    work = bench.Workload.from_config(small_config(QWEN2_MOE))
    r = bench.bench_step(work, "sft", steps=1, warmup=0)
    assert r["model_params"] == Q2_TOTAL and r["active_params"] == Q2_ACTIVE
    assert r["tokens_per_step"] == 64
    assert r["model_flops_per_step"] == 6 * (Q2_ACTIVE - EMBED + 2 * 2 * 16 * 4 * 8) * 64
    assert bench.format_params(r) in bench.format_result(r)
    assert bench.format_params({"model_params": 30_532_000, "active_params": 3_340_000}) == \
        "30.5M parameters (3.3M active)"
    assert bench.format_params({"model_params": 1_235_000}) == "1.2M parameters"
