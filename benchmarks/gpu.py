"""jrlhf beside eager PyTorch + transformers on one GPU: the "GPU workload" of
shared/BENCHMARK.md, both sides in one run, a markdown table in benchmarks/gpu_results.md.

    PYTHONPATH=. python benchmarks/gpu.py            # one H100 / H200, about 5 minutes
    PYTHONPATH=. python benchmarks/gpu.py --tiny     # the same code on a tiny model (any host)

Needs jax (CUDA), flax, optax, orbax-checkpoint, torch and transformers; jrlhf runs from the
tree (not installed). Each side runs in its own process, jrlhf first, so neither holds memory
the other needs (XLA preallocates 75% of the card).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from jrlhf.bench import matmul_params, model_flops  # noqa: E402  (pure Python: no device use)
from jrlhf.config import load_config  # noqa: E402
from jrlhf.hardware import PEAK_FLOPS, lookup  # noqa: E402
from jrlhf.models import ModelConfig  # noqa: E402

CONFIG = "configs/bench_llama1b.py"
# A model small enough for a CPU: checks the script end to end, its figures mean nothing.
TINY = {"vocab_size": 1024, "hidden_size": 64, "num_layers": 2, "num_kv_heads": 2,
        "num_heads": 4, "head_dim": 16, "intermediate_size": 128, "bos_token_id": 1021,
        "eos_token_id": 1022, "pad_token_id": 1022}
TINY_SHAPES = {"data.max_prompt_length": 16, "data.max_response_length": 48,
               "rollout.max_new_tokens": 16}
GOALS = {"sft": (0.55, 1.6), "reward": (0.55, 1.6), "sft_long": (0.55, None),
         "ppo_iteration": (None, 8.0)}


def run(cmd, env=None) -> str:
    print("+", " ".join(map(str, cmd)), flush=True)
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    if out.returncode:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{out.stderr[-6000:]}")
    return out.stdout


def jrlhf_bench(steps: list[str], extra: list[str], warmup: int, n: int) -> dict:
    cmd = [sys.executable, "-m", "jrlhf.cli", "bench", "--config", CONFIG, "--json",
           "--warmup", str(warmup), "--steps", str(n), *extra]
    for s in steps:
        cmd += ["--step", s]
    return {r["step"]: r for r in json.loads(run(cmd))}


def policy_config(tiny: bool) -> ModelConfig:
    model = load_config(ROOT / CONFIG).model
    return dataclasses.replace(model.compute(model.arch), **(TINY if tiny else {}))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tiny", action="store_true", help="a tiny model: check the script anywhere")
    p.add_argument("--out", default=str(HERE / "gpu_results.md"))
    args = p.parse_args()
    sets = []
    if args.tiny:
        sets = [x for k, v in TINY.items() for x in ("--set", f"model.arch.{k}={v}")]
        sets += [x for k, v in TINY_SHAPES.items() for x in ("--set", f"{k}={v}")]
    cfg = policy_config(args.tiny)
    P = TINY_SHAPES["data.max_prompt_length"] if args.tiny else 128
    T = P + (TINY_SHAPES["data.max_response_length"] if args.tiny else 896)
    N = TINY_SHAPES["rollout.max_new_tokens"] if args.tiny else 128
    long_T = 64 if args.tiny else 4096
    long = ["--set", "sft.batch_size=2", "--set", f"data.max_response_length={long_T - P}"]

    ours = jrlhf_bench(["sft", "reward", "generate"], sets, warmup=2, n=5)
    ours.update(jrlhf_bench(["ppo_iteration"], sets, warmup=1, n=3))
    ours["sft_long"] = jrlhf_bench(["sft"], sets + long, warmup=2, n=5)["sft"]
    peer_args = ["--sft-length", str(T), "--long-length", str(long_T), "--prompt", str(P),
                 "--new", str(N)]
    if args.tiny:
        peer_args += ["--vocab", str(cfg.vocab_size), "--hidden", str(cfg.hidden_size),
                      "--layers", str(cfg.num_layers), "--heads", str(cfg.num_heads),
                      "--kv-heads", str(cfg.num_kv_heads), "--head-dim", str(cfg.head_dim),
                      "--ffn", str(cfg.intermediate_size)]
    peer = json.loads(run([sys.executable, HERE / "torch_gpu_side.py", *peer_args])
                      .strip().splitlines()[-1])
    table = render(ours, peer, cfg, T, long_T, P, N)
    Path(args.out).write_text(table + "\n")
    print(table)


def render(ours: dict, peer: dict, cfg: ModelConfig, T: int, long_T: int, P: int, N: int) -> str:
    device = ours["sft"]["device"]
    peak = lookup(PEAK_FLOPS, device)
    rm_cfg = dataclasses.replace(cfg, lm_head=False, scalar_head=True)
    flops = {"sft": model_flops(cfg, 8 * T, T, True), "sft_long": model_flops(cfg, 2 * long_T,
                                                                                long_T, True),
             "reward": model_flops(rm_cfg, 8 * T, T, True, read_tokens=8)}

    def mfu(seconds, work):
        return f"{100 * flops[work] / seconds / peak:.1f}% MFU" if peak else "MFU n/a"

    def temp(r):
        m = r.get("memory_per_device") or {}
        return f", XLA temp {m['temp_bytes'] / 1e9:.1f} GB" if "temp_bytes" in m else ""

    def verdict(work, ratio, mfu_value):
        want_mfu, want_ratio = GOALS[work]
        ok = (want_mfu is None or (mfu_value or 0) >= want_mfu) and (
            want_ratio is None or (ratio or 0) >= want_ratio)
        goal = " and ".join(x for x in (f"≥ {100 * want_mfu:.0f}% MFU" if want_mfu else "",
                                        f"≥ {want_ratio}×" if want_ratio else "") if x)
        return f"{goal}: {'met' if ok else '**missed**'}"

    rows = []
    labels = {"sft": f"SFT 8×{T}", "reward": f"reward 4 pairs × {T}",
              "sft_long": f"SFT 2×{long_T}"}
    for work, label in labels.items():
        ours_s, peer_s = ours[work]["median_s"], peer[work]["median_s"]
        mfu_value = flops[work] / ours_s / peak if peak else None
        ratio = peer_s / ours_s
        rows.append(f"| {label} | {ours_s * 1e3:.1f} ms, {mfu(ours_s, work)}{temp(ours[work])} "
                    f"| {peer_s * 1e3:.1f} ms, {mfu(peer_s, work)}, peak "
                    f"{peer[work]['peak_bytes'] / 1e9:.1f} GB | {ratio:.2f}× | "
                    f"{verdict(work, ratio, mfu_value)} |")
    it, pit = ours["ppo_iteration"], peer["ppo_iteration"]
    ph, pph = it["phases"], pit["phases"]
    ratio = pit["median_s"] / it["median_s"]
    rows.append(
        f"| PPO iteration (32 × ({P} + {N}), 2 epochs) | {it['median_s'] * 1e3:.0f} ms: generate "
        f"{ph['generate']['median_s'] * 1e3:.0f}, score {ph['score']['median_s'] * 1e3:.0f}, "
        f"update {ph['update']['median_s'] * 1e3:.0f} | {pit['median_s'] * 1e3:.0f} ms: generate "
        f"{pph['generate'] * 1e3:.0f}, score {pph['score'] * 1e3:.0f}, update "
        f"{pph['update'] * 1e3:.0f} | {ratio:.2f}× | {verdict('ppo_iteration', ratio, None)} |")
    g = ours["generate"]
    roof = g.get("decode_roofline")
    rows.append(
        f"| decode, 32 rows | {g['decode_step_s'] * 1e3:.2f} ms per token step, "
        f"{g['decode_bytes_per_step'] / 1e9:.2f} GB read: "
        f"{'%.0f%% of the HBM roofline' % (100 * roof) if roof else 'bandwidth unknown'} | "
        f"{pit['decode_step_s'] * 1e3:.2f} ms per step (generate / {N}, prefill included) | "
        f"{pit['decode_step_s'] / g['decode_step_s']:.2f}× | ≥ 50% of roofline: "
        f"{'met' if roof and roof >= 0.5 else '**missed**'} |")
    head = (f"Measured {datetime.date.today()} on one {device} ({peer['device']}), jax "
            f"{ours['sft'].get('jax', '?')} vs torch {peer['torch']} + transformers "
            f"{peer['transformers']}; {cfg.num_params / 1e6:,.1f}M parameters "
            f"({matmul_params(cfg) / 1e6:,.1f}M in matmuls), float32 parameters and AdamW "
            f"moments, bfloat16 compute; medians of 5 (PPO: of 3). ")
    head += (f"MFU against the {peak / 1e12:.0f} TFLOP/s datasheet bf16 peak." if peak
             else "MFU: no datasheet peak for this device.")
    return "\n".join([head, "", "| work | jrlhf | eager PyTorch | jrlhf / torch | goal |",
                      "|---|---|---|---|---|", *rows])


if __name__ == "__main__":
    main()
