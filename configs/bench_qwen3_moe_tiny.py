"""A Qwen3-MoE-shaped twin of `configs/bench_qwen3_tiny.py` for `jrlhf bench`: the same
attention, width, depth, vocabulary and workload, each layer's MLP of 768 replaced by 8 routed
experts of 384 with 2 per token (softmax top-k, `norm_topk_prob`). A token's active parameters
are the dense model's plus the router (256 x 8 per layer): the two configs side by side give
the cost of routing, sorting and grouped matmuls (`jax.lax.ragged_dot`) against one dense
matmul of the same active size, with MFU on active FLOPs.

    jrlhf bench --config configs/bench_qwen3_moe_tiny.py --step sft
    jrlhf bench --config configs/bench_qwen3_tiny.py --step sft
"""

import dataclasses
from pathlib import Path

from jrlhf.config import derive, load_config

DENSE = load_config(Path(__file__).with_name("bench_qwen3_tiny.py"))
QWEN3_MOE_TINY = dataclasses.replace(
    DENSE.model.arch, hf_model_type="qwen3_moe", num_experts=8, experts_per_token=2,
    expert_size=384, norm_topk_prob=True, router_aux_loss_coef=0.001)


def get_config():
    return derive(DENSE, {"model.arch": QWEN3_MOE_TINY,
                          "run.out_dir": "runs/bench_qwen3_moe_tiny"})
