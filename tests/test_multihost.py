"""Several local processes (jax.distributed on localhost, gloo CPU collectives) == one process.

The step-level test runs three sharded `sft_step`s; the CLI tests run whole `jrlhf` commands
as a pod would: 2 processes x 2 fake CPU devices against 1 process x 4 devices on the same
mesh, plus the failure cases (a killed process, SIGTERM on one host, a damaged checkpoint,
mismatched configs, a bad process id, a coordinator that never answers).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jrlhf.report import read_metrics

ROOT = Path(__file__).parents[1]
WORKER = Path(__file__).with_name("multihost_worker.py")
TINY = str(ROOT / "configs" / "tiny.py")
# Keys that measure time (differ run to run) or exist only with several processes.
UNTIMED = ("time/", "tokens_per_s/", "hosts/")


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


# ----------------------------------------------------------------------------------------------
# The whole CLI on several processes.


class Pod:
    """`num` local processes running one `jrlhf` command (4 fake CPU devices in all)."""

    def __init__(self, num: int, args: list[str], out: Path, *, port: int | None = None,
                 env: dict | None = None, process_env: dict | None = None, label: str = ""):
        self.num, self.out = num, out
        self.logs = [out.parent / f"{out.name}.{args[0]}{label}.p{i}" for i in range(num)]
        port = port or free_port()
        self.procs = []
        for i in range(num):
            e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
            e.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={4 // num}",
                     JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
            e.update({**(env or {}), **(process_env or {}).get(i, {})})
            if num > 1:
                e.update(JRLHF_COORDINATOR=f"127.0.0.1:{port}", JRLHF_NUM_PROCESSES=str(num),
                         JRLHF_PROCESS_ID=str(i))
            cmd = [sys.executable, "-m", "jrlhf.cli", *args, "--set", f"run.out_dir={out}"]
            self.procs.append(subprocess.Popen(
                cmd, cwd=ROOT, env=e, stdout=open(f"{self.logs[i]}.out", "w"),
                stderr=open(f"{self.logs[i]}.err", "w")))

    def wait(self, timeout: float = 600) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in self.procs]
        finally:
            self.kill()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def stdout(self, i: int) -> str:
        return Path(f"{self.logs[i]}.out").read_text()

    def stderr(self, i: int) -> str:
        return Path(f"{self.logs[i]}.err").read_text()

    def errors(self, i: int) -> list[str]:
        """Process i's stderr lines, without the gloo connection chatter."""
        return [line for line in self.stderr(i).splitlines()
                if line.strip() and not line.startswith("[Gloo]")]

    def run(self, timeout: float = 600) -> "Pod":
        codes = self.wait(timeout)
        for i, code in enumerate(codes):
            assert code == 0, (i, self.stdout(i)[-3000:], self.stderr(i)[-5000:])
        return self


def jrlhf(num: int, args: list[str], out: Path, **kwargs) -> Pod:
    return Pod(num, args, out, **kwargs).run()


def weights(folder: Path) -> dict:
    from safetensors.numpy import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert files, list(folder.iterdir())
    return {k: v for f in files for k, v in load_file(f).items()}


def assert_same_weights(a: Path, b: Path, max_step: float = 2e-3) -> None:
    """Equal up to float rounding: gloo's all-reduce / reduce-scatter sums in another order
    than one process does. Adam's first steps move an element by about the learning rate
    whatever its gradient's size, so where a gradient is at rounding level (embedding rows of
    tokens barely seen) that rounding decides a step of up to 2 x lr (`max_step`): a few
    elements in a thousand may differ by that much; training on other data moves nearly all."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        close = np.isclose(wb[k], wa[k], atol=1e-4, rtol=1e-4)
        assert close.mean() > 0.999, (k, close.mean())
        np.testing.assert_allclose(wb[k], wa[k], atol=max_step, rtol=0, err_msg=k)


def assert_same_metrics(one: Path, two: Path) -> None:
    """The same rows (stage, step), each once, with the same values up to float rounding; the
    multi-process rows also carry the straggler metrics."""
    a, b = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [(r["stage"], r["step"]) for r in a] == [(r["stage"], r["step"]) for r in b]
    assert len({(r["stage"], r["step"]) for r in b}) == len(b)  # each row once
    for ra, rb in zip(a, b):
        keys = {k for k in ra if not k.startswith(UNTIMED)}
        assert keys == {k for k in rb if not k.startswith(UNTIMED)}
        for k in keys - {"stage", "step"}:
            # A clip fraction counts elements past a threshold: a rounding-level difference
            # moves one of them across (one of PPO's 192 tokens is 0.0052); allow two.
            atol = 0.011 if "frac" in k else 1e-5
            np.testing.assert_allclose(rb[k], ra[k], rtol=1e-3, atol=atol,
                                       err_msg=f"{ra['stage']} {ra['step']} {k}")
        assert {"hosts/slowest", "hosts/lag", "hosts/busy_max"} <= set(rb)


def assert_no_temp_files(out: Path) -> None:
    assert not [p for p in out.rglob("*.tmp")], list(out.rglob("*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["fsdp"])
def test_pipeline_on_two_processes_equals_one(tmp_path, mesh):
    """`jrlhf pipeline` on 2 processes x 2 devices == 1 process x 4 devices: the rankings, the
    held-out samples and judgements byte for byte, exported weights and every metrics row up to
    float rounding. The default mesh of a pod is data parallel over all its devices (`mesh=
    "default"`, ~140 s; its data-parallel pod mesh is what the GRPO, host-local and SIGTERM
    tests below run on, so CI runs the fsdp mesh alone here)."""
    short = ["--set", "reward.steps=4", "--set", "ppo.iterations=2"]
    reference = ["--set", "mesh.data=4"] if mesh == "default" else ["--set", "mesh.fsdp=4"]
    args = ["pipeline", "--config", TINY, *short]
    pod = jrlhf(2, args + ([] if mesh == "default" else reference), tmp_path / "two")
    jrlhf(1, args + reference, tmp_path / "one")
    one, two = tmp_path / "one", tmp_path / "two"
    for name in ("data/rankings.jsonl", "samples.jsonl", "comparisons.jsonl"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert_same_weights(one / "export", two / "export")
    assert_same_weights(one / "reward" / "export", two / "reward" / "export")
    assert_same_metrics(one, two)
    assert_no_temp_files(two)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["export"] == str(two / "export")
    assert "jrlhf pipeline done" in pod.stdout(0)
    assert not any("error" in line for i in range(2) for line in pod.errors(i))


def write_rankings(path: Path, n: int = 16) -> Path:
    rows = [{"prompt": f"Review the film 'Film {i}'.",
             "responses": [f"Film {i} is a wonderful, moving story.", f"Film {i} bored me.",
                           f"film {i}"], "ranks": [1, 2, 3]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_dpo_on_two_processes_equals_one(tmp_path):
    """`jrlhf dpo` with an fsdp mesh: 2 processes == 1 process (exports, metrics rows each
    once); the pipeline test covers SFT, reward and PPO, the host-local test GRPO on the
    default (data-parallel) pod mesh with a straggling host."""
    args = ["dpo", "--config", str(ROOT / "configs" / "dpo_tiny.py"),
            "--set", f"data.rankings_path={write_rankings(tmp_path / 'r.jsonl')}",
            "--set", "mesh.fsdp=4"]
    two = jrlhf(2, args, tmp_path / "two")
    jrlhf(1, args, tmp_path / "one")
    assert_same_weights(tmp_path / "one" / "dpo" / "export", tmp_path / "two" / "dpo" / "export")
    assert_same_metrics(tmp_path / "one", tmp_path / "two")
    assert_no_temp_files(tmp_path / "two")
    assert not any("error" in line for i in range(2) for line in two.errors(i))


def sft(num: int, out: Path, *more: str, **kwargs) -> Pod:
    return Pod(num, ["sft", "--config", TINY, "--set", "run.save_every=2",
                     "--set", "run.peer_timeout_s=10", *more], out, **kwargs)


def wait_for_rows(out: Path, rows: int, pod: Pod, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in pod.procs), [pod.stderr(i) for i in range(pod.num)]
        if len(read_metrics(out / "metrics.jsonl")) >= rows:
            return
        time.sleep(0.2)
    raise TimeoutError(f"fewer than {rows} metrics rows in {out}")


@pytest.mark.slow
def test_sigterm_on_one_host_stops_all_then_resume_is_identical(tmp_path):
    """SIGTERM on process 1 mid-SFT: both processes save the same step and exit 0; `--resume`
    on 2 processes then ends byte-identical to an uninterrupted 2-process run. Then a damaged
    shard in the last checkpoint is reported on both processes, which both fall back to the
    one before it."""
    whole = sft(2, tmp_path / "whole").run()
    out = tmp_path / "stopped"
    pod = sft(2, out)
    wait_for_rows(out, 5, pod)
    pod.procs[1].send_signal(signal.SIGTERM)
    pod.run()
    saved = [line for i in range(2) for line in pod.stdout(i).splitlines() if "SIGTERM" in line]
    assert len(saved) == 2 and saved[0] == saved[1], saved
    step = int(saved[0].split("saved step ")[1].split(",")[0])
    assert step < 12 and (out / "sft" / "checkpoints" / str(step)).is_dir()
    sft(2, out, "--resume").run()
    a, b = weights(tmp_path / "whole" / "sft" / "export"), weights(out / "sft" / "export")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    strip = [[{k: v for k, v in r.items() if not k.startswith(UNTIMED)}
              for r in read_metrics(d / "metrics.jsonl")] for d in (tmp_path / "whole", out)]
    assert strip[0] == strip[1]
    assert "SIGTERM" not in whole.stdout(0)

    # Damage the latest checkpoint (step 12): both processes fall back to step 10.
    files = [p for p in (out / "sft" / "checkpoints" / "12").rglob("*")
             if p.is_file() and "ocdbt" in str(p) and p.stat().st_size > 10_000]
    target = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF
    target.write_bytes(bytes(data))
    pod = sft(2, out, "--resume", "--set", "sft.steps=14",
              "--set", "run.allow_changed=sft.steps").run()
    for i in range(2):
        text = pod.stdout(i)
        assert "checkpoint step 12" in text and "using step 10" in text, text
        assert "resumed from step 10" in text, text
        assert "Traceback" not in pod.stderr(i)
    assert (out / "sft" / "corrupt_checkpoints" / "12").is_dir()
    rows = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["stage"] == "sft"]
    assert rows == list(range(1, 15))


@pytest.mark.slow
def test_a_killed_process_stops_the_other_within_the_bound(tmp_path):
    """SIGKILL of process 1 mid-SFT: process 0 exits within run.peer_timeout_s (10 s) plus
    slack, with one line naming process 1; `--resume` on 2 processes then completes."""
    out = tmp_path / "killed"
    pod = sft(2, out)
    wait_for_rows(out, 3, pod)
    pod.procs[1].kill()
    killed = time.monotonic()
    code = pod.procs[0].wait(timeout=60)
    took = time.monotonic() - killed
    pod.kill()
    assert code == 3 and took < 10 + 15, (code, took)
    lines = pod.errors(0)
    assert lines[-1].startswith("jrlhf sft: error: lost process 1"), lines
    assert "Traceback" not in pod.stderr(0)
    sft(2, out, "--resume").run()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 13))


@pytest.mark.slow
def test_start_up_refusals_are_one_line(tmp_path):
    """Mismatched configs across processes, a process id out of range, and a coordinator that
    never answers: one line, exit 2, on every process."""
    port = free_port()
    first = Pod(1, ["sft", "--config", TINY], tmp_path / "mismatch", env={
        "JRLHF_COORDINATOR": f"127.0.0.1:{port}", "JRLHF_NUM_PROCESSES": "2",
        "JRLHF_PROCESS_ID": "0", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    second = Pod(1, ["sft", "--config", TINY, "--set", "sft.steps=13"],
                 tmp_path / "mismatch", label="second", env={
                     "JRLHF_COORDINATOR": f"127.0.0.1:{port}", "JRLHF_NUM_PROCESSES": "2",
                     "JRLHF_PROCESS_ID": "1",
                     "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert first.wait(120) == [2] and second.wait(120) == [2]
    assert second.errors(0)[-1] == (
        "jrlhf sft: error: process 1 runs another config than process 0 (sft.steps: 12 on "
        "process 0, 13 here): start every process with the same --config and --set")
    assert first.errors(0)[-1].startswith("jrlhf sft: error: process 1 stopped: process 1 "
                                          "runs another config"), first.errors(0)

    bad_id = Pod(1, ["sft", "--config", TINY], tmp_path / "bad_id", env={
        "JRLHF_COORDINATOR": "127.0.0.1:1", "JRLHF_NUM_PROCESSES": "2",
        "JRLHF_PROCESS_ID": "2"})
    assert bad_id.wait(60) == [2]
    assert bad_id.errors(0) == ["jrlhf sft: error: process_id=2 must be in [0, 2) for "
                                "num_processes=2"]

    started = time.monotonic()
    lonely = Pod(1, ["sft", "--config", TINY, "--set", "run.startup_timeout_s=3"],
                 tmp_path / "lonely", env={
                     "JRLHF_COORDINATOR": f"127.0.0.1:{free_port()}",
                     "JRLHF_NUM_PROCESSES": "2", "JRLHF_PROCESS_ID": "1"})
    assert lonely.wait(120) == [2]
    assert time.monotonic() - started < 60
    errors = lonely.errors(0)
    assert len(errors) == 1 and errors[0].startswith(
        "jrlhf sft: error: could not join the coordinator 127.0.0.1:"), errors


@pytest.mark.slow
def test_host_local_decode_on_two_processes_equals_one(tmp_path):
    """`rollout.host_local`: each device samples its own rows with a whole copy of the policy
    (no collective in the decode loop, `tests/test_continuous.py`); on 2 processes x 2 devices
    (the default, data-parallel pod mesh) the rows, and so the trained weights and every
    metric, are those of 1 process x 4. GRPO's host reward on process 1 is slow: the straggler
    shows in hosts/slowest and hosts/lag."""
    args = ["grpo", "--config", str(ROOT / "configs" / "grpo_tiny.py"),
            "--set", "grpo.prompts_per_iteration=4", "--set", "grpo.iterations=2",
            "--set", "rollout.slots=8", "--set", "rollout.host_local=true",
            "--set", "reward.functions=annotator,tests.multihost_rewards:slow_on_process_1"]
    env = {"JRLHF_TEST_SLOW_SECONDS": "0.5"}
    two = jrlhf(2, args, tmp_path / "two", env=env)
    jrlhf(1, args + ["--set", "mesh.data=4"], tmp_path / "one", env=env)
    assert_same_weights(tmp_path / "one" / "grpo" / "export", tmp_path / "two" / "grpo" / "export")
    assert_same_metrics(tmp_path / "one", tmp_path / "two")
    assert not any("error" in line for i in range(2) for line in two.errors(i))
    # Step 1 compiles on each process (seconds, unequal): the lag is judged after it.
    rows = [r for r in read_metrics(tmp_path / "two" / "metrics.jsonl")
            if r["stage"] == "grpo" and r["step"] > 1]
    assert rows and all(r["hosts/slowest"] == 1 and r["hosts/lag"] > 0.4 for r in rows), rows


@pytest.mark.slow
def test_moe_episodes_on_an_expert_mesh_on_two_processes_equal_one(tmp_path):
    """A mixture of experts on an expert axis (data 2 x expert 2: the experts split over the
    two processes) playing multi-turn episodes of the calculator task in 4 decode slots split
    over the mesh (every process plays every episode; random tool delays of its own on each
    process, so the first process decides which answered episodes enter the slots): 2
    processes x 2 devices == 1 process x 4 devices — weights, every metric, the evaluation's
    episodes byte for byte."""
    args = ["grpo", "--config", str(ROOT / "configs" / "grpo_moe_tiny.py"),
            "--set", "mesh.data=2", "--set", "mesh.expert=2", "--set", "grpo.iterations=1",
            # Episodes do not carry routing across turns (yet): no replay.
            "--set", "rollout.routing_replay=off",
            "--set", "data.task=calculator", "--set", "env.enabled=true",
            "--set", "env.max_turn_tokens=4", "--set", "env.max_episode_tokens=12",
            "--set", "rollout.slots=4", "--set", "env.groups=1", "--set", "env.slot_steps=2",
            "--set", "env.simulated_latency_s=0.05",
            "--set", "rollout.max_new_tokens=12", "--set", "data.max_prompt_length=48",
            "--set", "data.num_eval_prompts=4"]
    two = jrlhf(2, args, tmp_path / "two")
    jrlhf(1, args, tmp_path / "one")
    one, two_dir = tmp_path / "one", tmp_path / "two"
    assert_same_weights(one / "grpo" / "export", two_dir / "grpo" / "export")
    assert_same_metrics(one, two_dir)
    assert (one / "grpo" / "samples.jsonl").read_bytes() == (
        two_dir / "grpo" / "samples.jsonl").read_bytes()
    rows = [r for r in read_metrics(two_dir / "metrics.jsonl") if r["stage"] == "grpo"]
    assert rows and all(r["env/episodes"] == 8 and "grpo/moe/load_max_share" in r
                        for r in rows), rows
    assert not any("error" in line for i in range(2) for line in two.errors(i))
