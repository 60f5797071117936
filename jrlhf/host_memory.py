"""Host memory reuse for XLA:CPU: stop page-faulting every step's scratch memory afresh.

Why: XLA:CPU allocates a compiled program's whole temp buffer (`memory_analysis()
.temp_size_in_bytes`: ~300 MiB for the CPU reward-step benchmark) with `malloc` on every
execution, from one of its worker threads. glibc serves such a block with a fresh `mmap` (or from
a per-thread arena that it trims back to the kernel on free), so every step touches every page of
it for the first time: ~78,000 minor page faults per reward step on the benchmark machine, about
a sixth of the step. Measured with `/usr/bin/time -f %R` around `jrlhf bench --step reward`.

`keep_freed_memory` makes glibc keep what it frees instead (`mallopt`: one arena for all
threads, no `mmap` for large blocks, no trimming), so from the second execution on the temp
buffer comes back from the free lists, already mapped. It must run before JAX starts its CPU
backend: a worker thread that already holds its own arena keeps it. It only helps, and is only
applied, where XLA:CPU runs the steps; on a GPU/TPU host the device allocator holds the
activations, and host memory (checkpoint staging) should go back to the kernel as usual.

The cost: the process never shrinks below its peak heap, which for a CPU run is the size of
the model, its optimizer state and one step's temps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import sys

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8

_applied = False


def runs_on_cpu_only() -> bool:
    """Whether JAX will pick its CPU backend, judged without starting any backend:
    `JAX_PLATFORMS` / `jax_platforms` names only cpu, or no accelerator plugin (a `jax_plugins`
    entry point or module, `libtpu`) is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if "jax" in sys.modules:
        platforms = sys.modules["jax"].config.jax_platforms or platforms
    if platforms:
        return {p.strip() for p in platforms.split(",") if p.strip()} == {"cpu"}
    if importlib.metadata.entry_points(group="jax_plugins"):
        return False
    if importlib.util.find_spec("libtpu") is not None:
        return False
    try:
        import jax_plugins  # namespace package of the CUDA / ROCm plugins
    except ImportError:
        return True
    import pkgutil

    return not any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def backends_started() -> bool:
    """Whether JAX has created its devices (XLA flags and malloc settings no longer take
    effect then). JAX_PLATFORMS being set does not count."""
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def keep_freed_memory(setting: str = "auto") -> bool:
    """Apply `run.host_memory` (`config.HOST_MEMORY_SETTINGS`): "keep" makes glibc keep freed
    memory for reuse, "system" leaves malloc alone, "auto" keeps it when JAX will run on the
    CPU only (`runs_on_cpu_only`). Returns whether the settings are in force.

    "keep" on a platform without glibc, or after JAX has started a backend (too late: its
    worker threads already hold their own arenas), is an error naming the cause; "auto" then
    quietly does nothing.
    """
    global _applied
    from jrlhf.config import HOST_MEMORY_SETTINGS  # the schema's list (importing JAX starts none)

    if setting not in HOST_MEMORY_SETTINGS:
        raise ValueError(f"run.host_memory must be one of {', '.join(HOST_MEMORY_SETTINGS)}, "
                         f"got {setting!r}")
    if setting == "system":
        return _applied
    if _applied:
        return True
    explicit = setting == "keep"
    if not explicit and not runs_on_cpu_only():
        return False
    libc_name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        if explicit:
            raise ValueError("run.host_memory='keep' needs Linux with glibc (it sets glibc's "
                             "mallopt); use 'auto' or 'system'")
        return False
    if backends_started():
        if explicit:
            raise ValueError("run.host_memory='keep' must be applied before JAX starts a "
                             "backend (its worker threads already hold their own malloc "
                             "arenas); call jrlhf.host_memory.keep_freed_memory first")
        return False
    for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)):
        if libc.mallopt(param, value) != 1:
            raise OSError(f"glibc mallopt({param}, {value}) failed")
    _applied = True
    return True
