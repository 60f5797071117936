"""jrlhf vs TRL on the same work (shared/BENCHMARK.md), measured one after the other.

Run through benchmarks/compare.sh, which sets up both environments. Prints a markdown table of
tokens/s for both and the ratio jrlhf / TRL, and writes it to benchmarks/results.md.
"""

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent
STEPS = int(os.environ.get("BENCH_STEPS", "5"))
GOALS = {"sft": 1.5, "reward": 1.5, "ppo_iteration": 2.0}
LABELS = {"sft": "SFT step (8 x 128)", "reward": "reward step (8 pairs x 128)",
          "ppo_iteration": "PPO iteration (8 x (64 + 64), 4 epochs)"}


def run(cmd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{out.stderr[-4000:]}")
    return out.stdout


def main():
    trl = json.loads(run([HERE / ".venv-trl" / "bin" / "python", HERE / "trl_side.py",
                          str(STEPS)]).strip().splitlines()[-1])
    ours = json.loads(run([ROOT / ".venv" / "bin" / "jrlhf", "bench", "--config",
                           "configs/bench_gpt2.py", "--step", "sft", "--step", "reward",
                           "--step", "ppo_iteration", "--steps", str(STEPS), "--json"]))
    ours = {r["step"]: r for r in ours}
    cpu = platform.processor() or platform.machine()
    lines = [f"Measured {datetime.date.today()} on {os.cpu_count()} CPU cores ({cpu}), float32, "
             f"torch {trl['torch']} + trl {trl['trl']} vs jrlhf (jax), median of {STEPS} steps "
             "after warm-up, dropout off on both sides.", "",
             "| work | TRL s | TRL tokens/s | jrlhf s | jrlhf tokens/s | jrlhf / TRL | goal |",
             "|---|---|---|---|---|---|---|"]
    for name, label in LABELS.items():
        t, j = trl[name], ours[name]
        ratio = j["tokens_per_s"] / t["tokens_per_s"] if name != "ppo_iteration" else \
            t["median_s"] / j["median_s"]
        met = "met" if ratio >= GOALS[name] else "**missed**"
        # A PPO iteration's tokens: 8 rows x (64 prompt + 64 sampled), the same on both sides.
        ours_tps = j["tokens_per_s"] if name != "ppo_iteration" else 8 * 128 / j["median_s"]
        lines.append(f"| {label} | {t['median_s']:.3f} | {t['tokens_per_s']:,.0f} | "
                     f"{j['median_s']:.3f} | {ours_tps:,.0f} | {ratio:.2f}x | "
                     f"≥{GOALS[name]}x {met} |")
    phases = ours["ppo_iteration"].get("phases", {})
    if phases:
        lines += ["", "jrlhf PPO iteration split: " + ", ".join(
            f"{k} {v['median_s']:.2f} s" for k, v in phases.items())]
    table = "\n".join(lines)
    (HERE / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
