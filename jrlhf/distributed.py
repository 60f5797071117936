"""Multi-host runs: start-up, one writer, barriers, agreement between processes, and bounded
failure.

A pod is many processes running the same program (SPMD). The rules every jrlhf command follows:

- **Start-up** (`maybe_initialize`): `jax.distributed.initialize` from the config or the
  environment (`JRLHF_COORDINATOR` / `JRLHF_NUM_PROCESSES` / `JRLHF_PROCESS_ID`, or
  `JRLHF_DISTRIBUTED=auto` for jax's own cluster detection: TPU pods, SLURM, Open MPI), the gloo
  collectives on CPU, and a bounded wait for the coordinator (`run.startup_timeout_s`).
- **Same run everywhere** (`check_same_run`): every process compares a fingerprint of its
  resolved config and of jrlhf's code with process 0's; a difference is one line naming it.
- **One writer** (`is_writer`, `barrier`): process 0 writes every file the run shares (config,
  generated data, TFDS builds, metrics, rankings, reports, exports, the run lock); the others
  wait at a named barrier until it has. Checkpoints are Orbax's multi-host saves (every process
  writes its own shards). The run folder must be one folder all processes see
  (`check_shared_folder`).
- **Agreement** (`any_process`, `gather_floats`, `gather_json`): decisions that end a loop
  (SIGTERM on any host) are taken by all processes at the same step.
- **Bounded failure** (`Watchdog`, `fail`): each process beats a heartbeat in the coordinator's
  key-value store; a process that stops beating for `run.peer_timeout_s` (SIGKILL, a dead
  host) or that reports an error makes every other one exit with one line naming it, instead
  of waiting forever in a collective.

With one process every function here is a no-op (or the trivial answer), so single-host code
never pays for any of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np

from jrlhf.config import RunConfig

PREFIX = "jrlhf"  # key-value store namespace
EXIT_BAD_INPUT = 2  # the CLI's exit code for a one-line error (here: also a peer's)
EXIT_LOST_PEER = 3  # a peer died or stopped answering


def process_count() -> int:
    return jax.process_count()


def process_index() -> int:
    return jax.process_index()


def is_writer() -> bool:
    """Process 0 writes every file the processes share."""
    return jax.process_index() == 0


def initialized() -> bool:
    """Whether `jax.distributed` has been initialised in this process."""
    return _client() is not None


def _client():
    from jax._src import distributed

    return distributed.global_state.client


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return int(default)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def _use_gloo_on_cpu() -> None:
    """Cross-process collectives on CPU need gloo (the default CPU client has none)."""
    platforms = os.environ.get("JAX_PLATFORMS", "") or (jax.config.jax_platforms or "")
    if platforms in ("", "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def maybe_initialize(run: RunConfig | None = None, *, label: str = "jrlhf") -> bool:
    """Initialise jax.distributed when the config or environment asks for several processes,
    then start the `Watchdog`. Returns True if it initialised.

    Environment (overrides the config): `JRLHF_COORDINATOR=host:port`, `JRLHF_NUM_PROCESSES`,
    `JRLHF_PROCESS_ID`; or `JRLHF_DISTRIBUTED=auto` to let jax find the cluster itself (TPU pod
    metadata, SLURM variables). On CPU the gloo collectives are selected. The coordinator is
    waited for at most `run.startup_timeout_s`; a process id outside [0, N), a missing
    coordinator address or a coordinator that never answers is a ValueError (one line).
    """
    run = run or RunConfig()
    if _client() is not None:  # already initialised (a library user, or a second command)
        return False
    timeouts = dict(initialization_timeout=run.startup_timeout_s,
                    # jax's own dead-task detection aborts the process with a stack dump: it
                    # must fire after ours (the Watchdog's one line).
                    heartbeat_timeout_seconds=int(2 * run.peer_timeout_s) + 30)
    auto = os.environ.get("JRLHF_DISTRIBUTED", "")
    if auto not in ("", "auto"):
        raise ValueError(f"JRLHF_DISTRIBUTED={auto!r}: the only value is 'auto'")
    if auto == "auto":
        _use_gloo_on_cpu()
        where = "the cluster's coordinator (JRLHF_DISTRIBUTED=auto)"
        _initialize(where, run, **timeouts)
    else:
        coordinator = os.environ.get("JRLHF_COORDINATOR", run.coordinator_address)
        num = _int_env("JRLHF_NUM_PROCESSES", run.num_processes)
        pid = _int_env("JRLHF_PROCESS_ID", run.process_id)
        if num <= 1:
            return False
        if not coordinator:
            raise ValueError(f"num_processes={num} needs a coordinator address "
                             "(run.coordinator_address or JRLHF_COORDINATOR=host:port)")
        if not 0 <= pid < num:
            raise ValueError(f"process_id={pid} must be in [0, {num}) for num_processes={num}")
        _use_gloo_on_cpu()
        if pid != 0:  # process 0 hosts the coordinator
            _wait_for_coordinator(coordinator, run.startup_timeout_s)
        _initialize(f"the coordinator {coordinator}", run, coordinator_address=coordinator,
                    num_processes=num, process_id=pid, **timeouts)
    if jax.process_count() > 1:
        Watchdog.start_once(run.peer_timeout_s, label)
    return True


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Wait until the coordinator's port accepts connections, at most `timeout_s`: jax's own
    client aborts the process with a stack dump when its deadline passes."""
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"coordinator address {address!r} is not host:port")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
            return
        except OSError as err:
            if time.monotonic() > deadline:
                raise ValueError(f"could not join the coordinator {address} within "
                                 f"run.startup_timeout_s={timeout_s:g} s ({err.strerror or err}):"
                                 " is process 0 running, and is the address right?") from None
            time.sleep(0.5)


def _initialize(where: str, run: RunConfig, **kwargs) -> None:
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as err:  # noqa: BLE001 - jax raises its runtime error types here
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise ValueError(f"could not join {where} within run.startup_timeout_s="
                         f"{run.startup_timeout_s} s: {first}") from None


# ----------------------------------------------------------------------------------------------
# Barriers and agreement.

_counters: dict[str, int] = {}
_waited = [0.0]  # seconds this process spent waiting for the others (barriers, gathers)


def waited_seconds() -> float:
    """Seconds this process has spent waiting for the others in `barrier` / `gather_*` so far
    (what a straggler's peers lose; `jrlhf.loops.host_metrics`)."""
    return _waited[0]


class _Waiting:
    def __enter__(self):
        self.started = time.perf_counter()

    def __exit__(self, *exc):
        _waited[0] += time.perf_counter() - self.started


def _unique(name: str) -> str:
    """`name` made unique per use: every process calls the same barriers in the same order."""
    n = _counters.get(name, 0)
    _counters[name] = n + 1
    return f"{PREFIX}/{name}/{n}"


def barrier(name: str, timeout_s: float = 7 * 24 * 3600) -> None:
    """Wait until every process reached this point (the coordinator's barrier, not a device
    collective). The long default timeout is deliberate: the writer may be building a large
    dataset or export meanwhile; a dead or failed process ends the wait through the
    `Watchdog`, not through this timeout."""
    if jax.process_count() == 1:
        return
    with _Waiting():
        _client().wait_at_barrier(_unique("barrier/" + name), int(timeout_s * 1000))


def gather_json(name: str, value) -> list:
    """Every process's JSON-able `value`, in process order (through the key-value store)."""
    if jax.process_count() == 1:
        return [value]
    client, key = _client(), _unique("gather/" + name)
    client.key_value_set(f"{key}/{jax.process_index()}", json.dumps(value))
    with _Waiting():
        return [json.loads(client.blocking_key_value_get(f"{key}/{p}", 7 * 24 * 3600 * 1000))
                for p in range(jax.process_count())]


def gather_floats(values) -> np.ndarray:
    """`[num_processes, n]`: every process's `values [n]` (one small device all-gather)."""
    values = np.asarray(values, np.float32)[None]
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    with _Waiting():
        return np.asarray(multihost_utils.process_allgather(values[0])).reshape(
            jax.process_count(), -1)


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on any (e.g. SIGTERM reached one host)."""
    return bool(gather_floats([float(flag)]).max() > 0)


def all_processes(flag: bool, name: str) -> bool:
    """True on every process when `flag` is True on all; through the key-value store, so it
    also works when a process's device state is unusable (e.g. after a failed restore)."""
    return all(gather_json(name, bool(flag)))


# ----------------------------------------------------------------------------------------------
# The same run on every process, in one folder.


def code_digests() -> dict[str, str]:
    """SHA-256 (first 16 hex digits) of each source file of the jrlhf package."""
    root = Path(__file__).parent
    return {str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            for p in sorted(root.rglob("*.py"))}


def check_same_run(config_json: dict) -> None:
    """Refuse to run when this process's resolved config or jrlhf code differs from process
    0's (one line naming the first differences)."""
    if jax.process_count() == 1:
        return
    from jrlhf.config import flatten_dict

    config_json = json.loads(json.dumps(config_json))  # tuples as lists, as gathered
    mine = {"config": config_json, "code": code_digests()}
    first = gather_json("fingerprint", mine if is_writer() else None)[0]
    pid = jax.process_index()
    if pid == 0:
        return
    theirs, ours = flatten_dict(first["config"]), flatten_dict(config_json)
    diff = [f"{k}: {theirs.get(k)!r} on process 0, {ours.get(k)!r} here"
            for k in sorted(set(theirs) | set(ours))
            if k != "run.process_id" and theirs.get(k) != ours.get(k)]
    if diff:
        raise ValueError(f"process {pid} runs another config than process 0 ("
                         + "; ".join(diff[:5]) + ("; ..." if len(diff) > 5 else "")
                         + "): start every process with the same --config and --set")
    files = [f for f in sorted(set(first["code"]) | set(mine["code"]))
             if first["code"].get(f) != mine["code"].get(f)]
    if files:
        raise ValueError(f"process {pid} runs other jrlhf code than process 0 ("
                         + ", ".join(files[:5]) + (", ..." if len(files) > 5 else "")
                         + " differ): install the same jrlhf version on every host")


def check_shared_folder(folder: Path) -> None:
    """Every process must see the run folder process 0 writes (shared storage: NFS, a cluster
    file system, or one machine). Process 0 leaves a token file there; a process that cannot
    read it back is refused with one line."""
    if jax.process_count() == 1:
        return
    token = f"{os.getpid()}-{time.time_ns()}"
    path = Path(folder) / ".jrlhf_shared_check"
    if is_writer():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(token)
    expected = gather_json("shared_folder", token if is_writer() else None)[0]
    try:
        seen = path.read_text()
    except OSError:
        seen = None
    ok = all_processes(seen == expected, "shared_folder_seen")
    if not ok and seen != expected:
        raise ValueError(f"run.out_dir={str(folder)!r} is not the folder process 0 writes "
                         f"(process {jax.process_index()} cannot see its files): every process "
                         "must use one folder on shared storage (see README 'Multi-host launch')")
    if not ok:  # another process failed the check and reports it
        raise ValueError(f"run.out_dir={str(folder)!r} is not shared by every process")


# ----------------------------------------------------------------------------------------------
# Bounded failure.


def _stop(message: str, code: int) -> None:
    """One line on stderr, then exit at once: jax's own shutdown would wait for the lost or
    failed process (minutes) and then abort with a stack dump."""
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    os._exit(code)


class Watchdog(threading.Thread):
    """Heartbeats through the coordinator's key-value store, checked every second.

    A peer whose heartbeat has not moved for `timeout_s` (measured on this host's clock: no
    clock agreement needed), a peer that reported an error (`fail`), or a coordinator that no
    longer answers ends this process with one line naming the process.
    """

    _instance: Watchdog | None = None

    def __init__(self, timeout_s: float, label: str):
        super().__init__(daemon=True, name="jrlhf-watchdog")
        self.timeout_s, self.label = timeout_s, label
        self.pid, self.count = jax.process_index(), jax.process_count()
        self.stopped = threading.Event()
        self.beat = 0
        self.seen: dict[int, tuple[str, float]] = {}

    @classmethod
    def start_once(cls, timeout_s: float, label: str) -> None:
        if cls._instance is None:
            cls._instance = cls(timeout_s, label)
            cls._instance.start()

    @classmethod
    def stop_all(cls) -> None:
        if cls._instance is not None:
            cls._instance.stopped.set()
            cls._instance.join(timeout=5)
            cls._instance = None

    def run(self) -> None:
        client = _client()
        started = time.monotonic()
        while not self.stopped.wait(1.0):
            try:
                self.beat += 1
                client.key_value_set(f"{PREFIX}/alive/{self.pid}", str(self.beat),
                                     allow_overwrite=True)
                beats = dict(client.key_value_dir_get(f"{PREFIX}/alive/"))
                failed = dict(client.key_value_dir_get(f"{PREFIX}/failed/"))
            except Exception:  # noqa: BLE001 - the coordinator's process is gone
                if self.stopped.is_set():
                    return
                if self.pid != 0:
                    _stop(f"{self.label}: error: lost process 0 (the coordinator stopped "
                          "answering); stopping", EXIT_LOST_PEER)
                continue
            if self.stopped.is_set():
                return
            for key, message in sorted(failed.items()):
                peer = key.rsplit("/", 1)[-1]
                if peer != str(self.pid):
                    _stop(f"{self.label}: error: process {peer} stopped: {message}",
                          EXIT_BAD_INPUT)
            now = time.monotonic()
            for peer in range(self.count):
                if peer == self.pid:
                    continue
                value = next((v for k, v in beats.items() if k.rsplit("/", 1)[-1] == str(peer)),
                             None)
                last = self.seen.get(peer)
                if last is None or last[0] != value:
                    self.seen[peer] = (value, now)
                elif now - last[1] > self.timeout_s and now - started > self.timeout_s:
                    _stop(f"{self.label}: error: lost process {peer} (no heartbeat for "
                          f"{now - last[1]:.0f} s, run.peer_timeout_s={self.timeout_s:g}); "
                          "stopping", EXIT_LOST_PEER)


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """This process cannot go on: tell the others (their `Watchdog` stops them with this
    message), print the one line and exit now."""
    if jax.process_count() > 1 and _client() is not None:
        try:
            _client().key_value_set(f"{PREFIX}/failed/{jax.process_index()}",
                                    message.split(": error: ", 1)[-1][:500], allow_overwrite=True)
        except Exception:  # noqa: BLE001, S110 - the coordinator is gone: nobody to tell
            pass
    _stop(message, code)


def crashed(err: BaseException, label: str) -> None:
    """An unexpected exception ends this process: a collective that lost its peer waits for
    the `Watchdog` to name the lost process; anything else (a bug) prints its traceback. The
    other processes are stopped either way."""
    first = (str(err).strip().splitlines() or [""])[0][:300]
    line = f"{label}: error: {type(err).__name__}: {first}"
    if type(err).__name__ == "JaxRuntimeError":
        wait_for_verdict(line)
    import traceback

    traceback.print_exc()
    fail(line, 1)


def wait_for_verdict(message: str) -> None:
    """A collective failed (a peer's connection dropped): give the `Watchdog` up to its timeout
    to name the lost process, then report `message` ourselves."""
    dog = Watchdog._instance
    deadline = time.monotonic() + (dog.timeout_s + 5 if dog else 0)
    while time.monotonic() < deadline:
        time.sleep(0.5)
    fail(message, EXIT_LOST_PEER)


def finish() -> None:
    """The command's work is done on this process: wait for the others (bounded by the
    `Watchdog`), then stop the heartbeats before jax's own shutdown."""
    if jax.process_count() > 1:
        barrier("finish")
    Watchdog.stop_all()
