"""Bytes each device moves in the collectives of one compiled MoE `sft_step` with the experts
split over an `expert` mesh axis, beside what a token all-to-all dispatch would move.

    PYTHONPATH=. python benchmarks/moe_collectives.py [--expert 4] [--tokens 2048]

Runs on fake CPU devices (it compiles, it does not time). The experts are stored split over
the `expert` axis (each device holds E / expert of them and their optimizer state). jrlhf's
expert-parallel layer (`jrlhf.models.expert_parallel`) all-gathers the expert group's tokens and
reduce-scatters the outputs; `--gspmd` shows what GSPMD does with the same matmuls left to it
(it replicates every (token, expert) pair and all-reduces the intermediate activations). Printed
beside them: the analytic bytes of gathering the expert weights instead (FSDP-style), and of a
token all-to-all (each token to its k experts' devices and back, forward and backward, without
the capacity padding static shapes would need).
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expert", type=int, default=4)
    parser.add_argument("--data", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per step (all devices)")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--expert-size", type=int, default=512)
    parser.add_argument("--gspmd", action="store_true",
                        help="GSPMD's own partitioning of the grouped matmuls instead of the "
                             "expert-parallel shard_map (for comparison)")
    args = parser.parse_args()
    devices = args.expert * args.data
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import numpy as np

    from jrlhf import models, optim, sharding
    from jrlhf.config import MeshConfig, OptimConfig
    from jrlhf.state import TrainState
    from jrlhf.steps import make_sft_step
    from jrlhf.models import expert_parallel
    from jrlhf.plan import collective_bytes
    from jrlhf.steps.common import place_state

    if args.gspmd:
        expert_parallel.expert_mesh = lambda: None

    cfg = models.ModelConfig(
        family="llama", hf_model_type="qwen3_moe", vocab_size=1024, hidden_size=args.hidden,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=512,
        qk_norm=True, num_experts=args.experts, experts_per_token=args.k,
        expert_size=args.expert_size, norm_topk_prob=True, router_aux_loss_coef=0.001)
    mesh = sharding.make_mesh(MeshConfig(data=args.data, expert=args.expert))
    params = models.init_params(cfg, 0)
    labels = optim.trainable_labels(params)
    state = TrainState.create(params, optim.make_optimizer(OptimConfig(), labels,
                                                           learning_rate=1e-4), 0)
    state = place_state(state, mesh)
    rows, length = args.tokens // 128, 128
    batch = {"input_ids": np.ones((rows, length), np.int32),
             "attention_mask": np.ones((rows, length), np.int32),
             "loss_mask": np.ones((rows, length), np.int32)}
    step = make_sft_step(cfg, labels=labels, state=state, mesh=mesh)
    hlo = step.jitted.lower(state, batch).compile().as_text()
    got = collective_bytes(hlo)
    expert_params = 3 * cfg.hidden_size * cfg.expert_size * cfg.num_experts
    per_device_tokens = args.tokens // (args.data * args.expert)
    share = (args.expert - 1) / args.expert
    # Weights: gathered in the forward and again in the backward, gradients reduce-scattered.
    gather = 3 * expert_params * 4 * share * len(cfg.sparse_layers)
    all_to_all = 4 * args.k * per_device_tokens * cfg.hidden_size * 4 * share * len(
        cfg.sparse_layers)
    how = "GSPMD" if args.gspmd else "expert-parallel shard_map"
    print(f"mesh data={args.data} expert={args.expert} ({how}); {cfg.num_experts} experts x "
          f"({cfg.hidden_size} x {cfg.expert_size}), k={args.k}, {args.tokens} tokens/step")
    for kind, n in sorted(got.items()):
        print(f"  compiled {kind:18s} {n / 2**20:9.2f} MiB per device")
    print(f"  expert weights gathered (analytic)  {gather / 2**20:9.2f} MiB per device")
    print(f"  token all-to-all instead (analytic) {all_to_all / 2**20:9.2f} MiB per device "
          "(no capacity padding)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
