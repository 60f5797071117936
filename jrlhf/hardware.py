"""Accelerator facts: dense bf16 peak FLOP/s, memory bandwidth and memory per device kind (vendor
datasheets),
the measured CPU peak, and what XLA reports about a compiled program (FLOPs, memory).

A leaf module: `jrlhf bench` and `jrlhf plan` read it; it imports nothing from jrlhf.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per chip (no sparsity). Keys are matched as substrings of
# `jax.Device.device_kind` (lower-cased) or of the name given to `jrlhf plan --device`.
PEAK_FLOPS = {
    "h100": 989e12, "h200": 989e12, "a100": 312e12, "tpu v4": 275e12, "tpu v5 lite": 197e12,
    "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v5": 459e12, "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
}
# Memory bandwidth per chip in bytes/s (HBM; the decode roofline of `jrlhf bench --step generate`).
HBM_BANDWIDTH = {
    "h100 pcie": 2.0e12, "h100": 3.35e12, "h200": 4.8e12, "a100": 2.04e12, "tpu v4": 1.2e12,
    "tpu v5 lite": 0.82e12, "tpu v5e": 0.82e12, "tpu v5p": 2.76e12, "tpu v5": 2.76e12,
    "tpu v6 lite": 1.64e12, "tpu v6e": 1.64e12,
}
# Memory per chip in bytes.
DEVICE_MEMORY = {"h100": 80e9, "h200": 141e9, "a100": 80e9, "a100-40gb": 40e9, "tpu v4": 32e9,
                 "tpu v5e": 16e9, "tpu v5p": 95e9, "tpu v6e": 32e9}


def lookup(table: dict[str, float], kind: str) -> float | None:
    """The entry of `table` whose key occurs in `kind` (case-insensitive), else None."""
    kind = kind.lower()
    for name, value in table.items():
        if name in kind:
            return value
    return None


def device_memory(device: str) -> float:
    """Bytes of memory of a named device kind (`jrlhf plan --device`); unknown names fail."""
    capacity = DEVICE_MEMORY.get(device.lower())
    if capacity is None:
        raise ValueError(f"unknown device {device!r}; known: {', '.join(DEVICE_MEMORY)}")
    return capacity


def matmul_peak(n: int = 1024, repeats: int = 5) -> float:
    """Measured float32 matmul FLOP/s of the default device (the CPU 'peak')."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(a))
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / min(times)


def device_peak() -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) for the default device."""
    kind = jax.devices()[0].device_kind
    peak = lookup(PEAK_FLOPS, kind)
    if peak is not None:
        return peak, f"{kind} bf16 peak"
    return matmul_peak(), f"measured float32 matmul on {kind}"


def device_bandwidth() -> float | None:
    """Datasheet memory bandwidth (bytes/s) of the default device, None if not in the table."""
    return lookup(HBM_BANDWIDTH, jax.devices()[0].device_kind)


def xla_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None else None


def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    return {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
            "temp_bytes": m.temp_size_in_bytes, "alias_bytes": m.alias_size_in_bytes,
            "code_bytes": m.generated_code_size_in_bytes}
