"""Two local processes (jax.distributed on localhost, gloo CPU collectives) == one process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("multihost_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(num: int, out: Path):
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), str(num), port, str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for i in range(num)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text
    return np.load(out)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    one = run_workers(1, tmp_path / "one.npz")
    two = run_workers(2, tmp_path / "two.npz")
    assert set(one.files) == set(two.files)
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-6)
    for key in one.files:
        np.testing.assert_allclose(two[key], one[key], atol=1e-6, rtol=0, err_msg=key)
