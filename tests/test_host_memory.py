"""`jrlhf.host_memory`: glibc keeps XLA:CPU's per-execution temp buffer mapped between steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jrlhf import host_memory

ROOT = Path(__file__).parent.parent

# A gradient step (an MLP over 4096 rows, ~68 MiB of temp buffer) run 9 times after 3 warm-ups;
# reports the minor page faults of each of those 9 executions.
_FAULTS = """
import json, resource, sys
from jrlhf.host_memory import keep_freed_memory
applied = keep_freed_memory(sys.argv[1])
import jax, jax.numpy as jnp
def loss(w, x):
    return jnp.sum(jnp.square(jnp.tanh(x @ w["a"]) @ w["b"]))
def step(w, x):
    return jax.tree.map(lambda p, d: p - 1e-6 * d, w, jax.grad(loss)(w, x))
x = jnp.ones((4096, 256), jnp.float32)
w = {"a": jnp.full((256, 2048), 0.01), "b": jnp.full((2048, 256), 0.01)}
compiled = jax.jit(step).lower(w, x).compile()
temp = compiled.memory_analysis().temp_size_in_bytes
for _ in range(3):
    w = jax.block_until_ready(compiled(w, x))
faults = []
for _ in range(9):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    w = jax.block_until_ready(compiled(w, x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(dict(applied=applied, temp=temp, faults=faults)))
"""


def _faults(setting: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _FAULTS, setting], env=env, check=True,
                         capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_kept_memory_stops_the_temp_buffer_page_faulting_every_execution():
    system = _faults("system")
    kept = _faults("auto")  # JAX_PLATFORMS=cpu: auto keeps
    assert (system["applied"], kept["applied"]) == (False, True)
    assert system["temp"] >= 48 * 2**20 and kept["temp"] == system["temp"]
    pages = system["temp"] // 4096
    # Without: every execution first-touches (nearly) all of its temp buffer again.
    assert np.median(system["faults"]) >= 0.5 * pages, (system, pages)
    # With: the buffer comes back from malloc's free lists, already mapped (the heap may still
    # grow once in a while as its free lists settle: hence the median).
    assert np.median(kept["faults"]) <= 0.02 * pages, (kept, pages)


def test_cpu_only_is_judged_from_the_platforms_setting(monkeypatch):
    previous = jax.config.jax_platforms
    try:
        for platforms, cpu_only in (("cpu", True), ("cuda", False), ("cpu,cuda", False),
                                    ("tpu,cpu", False), (" cpu ", True)):
            jax.config.update("jax_platforms", platforms)
            assert host_memory.runs_on_cpu_only() is cpu_only, platforms
    finally:
        jax.config.update("jax_platforms", previous)


def test_settings_are_checked_and_keep_refuses_a_started_backend(monkeypatch):
    # An in-process CLI test earlier in this worker may have applied "auto" before its backend
    # started; what is checked here is a process that has not.
    monkeypatch.setattr(host_memory, "_applied", False)
    jax.devices()  # this process's backend is up: too late for the arenas
    assert host_memory.keep_freed_memory("system") is False
    assert host_memory.keep_freed_memory("auto") is False
    with pytest.raises(ValueError, match="before JAX starts a backend"):
        host_memory.keep_freed_memory("keep")
    with pytest.raises(ValueError, match="run.host_memory must be one of auto, keep, system, "
                                         "got 'yes'"):
        host_memory.keep_freed_memory("yes")
