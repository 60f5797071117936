"""launch/: shellcheck-clean, the dry-run output of each script, its input errors, and
`JRLHF_DISTRIBUTED=auto` starting jax.distributed from SLURM's variables."""

import os
import random
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(LAUNCH.iterdir())
MULTI = LAUNCH / "multi_gpu.sh"
SLURM_WORKER = Path(__file__).with_name("slurm_worker.py")
# The variables the scripts read; the tests give each run exactly the ones it names.
SCRIPT_VARS = ("JRLHF_", "NUM_HOSTS", "HOST_ID", "COORDINATOR", "SLURM_")


def launch(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Runs launch/`script` with `args` and, on top of a clean environment, `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(SCRIPT_VARS)}
    return subprocess.run([str(LAUNCH / script), *args], env={**base, **env}, check=False,
                          capture_output=True, text=True, timeout=30)


def dry_run(script: str, *args: str, **env: str) -> list[str]:
    """The lines a script prints with JRLHF_DRY_RUN=1; asserts it exits 0 silently on stderr."""
    result = launch(script, *args, JRLHF_DRY_RUN="1", **env)
    assert (result.returncode, result.stderr) == (0, ""), result
    return result.stdout.splitlines()


def test_launch_scripts_pass_shellcheck():
    shellcheck = Path(sys.executable).parent / "shellcheck"
    assert shellcheck.exists(), "pip install -c constraints.txt -e '.[test]' installs it"
    assert [p.name for p in SCRIPTS] == ["multi_gpu.sh", "slurm.sbatch", "tpu_pod.sh"]
    result = subprocess.run([str(shellcheck), "--shell=bash", *map(str, SCRIPTS)], check=False,
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.parametrize("script", [p.name for p in SCRIPTS])
def test_launch_scripts_are_executable_bash(script):
    assert os.access(LAUNCH / script, os.X_OK)
    assert (LAUNCH / script).read_text().startswith("#!/usr/bin/env bash\n")


def test_multi_gpu_dry_run_names_this_host_and_quotes_the_command():
    lines = dry_run("multi_gpu.sh", "ppo", "--config", "configs/a b.py", "--set", "x='y'",
                    NUM_HOSTS="2", HOST_ID="1", COORDINATOR="10.0.0.1:1234")
    assert lines == [
        "# multi_gpu.sh dry run: host 1 of 2 (this host); nothing is started",
        f"cd {shlex.quote(str(ROOT))}",
        "unset JRLHF_DISTRIBUTED JRLHF_COORDINATOR JRLHF_NUM_PROCESSES JRLHF_PROCESS_ID",
        "export HF_HUB_OFFLINE=1",
        "export JRLHF_COORDINATOR=10.0.0.1:1234",
        "export JRLHF_NUM_PROCESSES=2",
        "export JRLHF_PROCESS_ID=1",
        ".venv/bin/jrlhf ppo --config 'configs/a b.py' --set 'x='\\''y'\\'''",
    ]
    # The printed command is valid shell for the same arguments.
    words = subprocess.run(["bash", "-c", f'for w in {lines[-1]}; do echo "<$w>"; done'],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert words == ["<.venv/bin/jrlhf>", "<ppo>", "<--config>", "<configs/a b.py>", "<--set>",
                     "<x='y'>"]


def test_multi_gpu_dry_run_single_host_starts_no_distributed_runtime():
    # An inherited JRLHF_DISTRIBUTED=auto would make jrlhf look for a cluster: it is unset.
    lines = dry_run("multi_gpu.sh", "sft", "--config", "configs/tiny.py",
                    JRLHF_DISTRIBUTED="auto", COORDINATOR="10.0.0.1:1234")
    assert lines == [
        "# multi_gpu.sh dry run: host 0 of 1 (this host); nothing is started",
        f"cd {shlex.quote(str(ROOT))}",
        "unset JRLHF_DISTRIBUTED JRLHF_COORDINATOR JRLHF_NUM_PROCESSES JRLHF_PROCESS_ID",
        "export HF_HUB_OFFLINE=1",
        ".venv/bin/jrlhf sft --config configs/tiny.py",
    ]


def test_tpu_pod_dry_run_prints_the_gcloud_command_for_all_workers():
    lines = dry_run("tpu_pod.sh", "my-tpu", "us-central2-b", "pipeline", "--config",
                    "configs/a b.py", "--set", "mesh.fsdp=8", JRLHF_REPO="/opt/my repo")
    remote = ("cd '/opt/my repo' && JRLHF_DISTRIBUTED=auto HF_HUB_OFFLINE=1 "
              ".venv/bin/jrlhf pipeline --config 'configs/a b.py' --set mesh.fsdp=8")
    assert lines == [
        ("# tpu_pod.sh dry run: every worker of my-tpu (us-central2-b) runs the same; "
         "nothing is started"),
        "# worker: cd '/opt/my repo'",
        "# worker: export JRLHF_DISTRIBUTED=auto",
        "# worker: export HF_HUB_OFFLINE=1",
        "# worker: .venv/bin/jrlhf pipeline --config 'configs/a b.py' --set mesh.fsdp=8",
        "gcloud compute tpus tpu-vm ssh my-tpu --zone us-central2-b --worker=all --command '"
        + remote.replace("'", "'\\''") + "'",
    ]
    # Parsed once locally (gcloud's argv) the remote command is the one the worker shell gets.
    argv = subprocess.run(["bash", "-c", f'printf "%s\\n" {lines[-1]}'], capture_output=True,
                          text=True, check=True).stdout.splitlines()
    assert argv[-2:] == ["--command", remote]


def test_tpu_pod_dry_run_default_repo_is_relative_to_the_worker_home():
    lines = dry_run("tpu_pod.sh", "pod-1", "europe-west4-a", "sft")
    assert lines[1] == "# worker: cd jrlhf"
    assert lines[-1] == ("gcloud compute tpus tpu-vm ssh pod-1 --zone europe-west4-a --worker=all "
                         "--command 'cd jrlhf && JRLHF_DISTRIBUTED=auto HF_HUB_OFFLINE=1 "
                         ".venv/bin/jrlhf sft'")


def test_slurm_dry_run_prints_srun_and_one_line_per_node():
    lines = dry_run("slurm.sbatch", "pipeline", "--config", "configs/a b.py",
                    SLURM_JOB_NUM_NODES="3", SLURM_NNODES="3")
    assert lines == [
        ("# slurm.sbatch dry run: srun starts one task (one jax process) per node; "
         "nothing is started"),
        f"cd {shlex.quote(str(ROOT))}",
        "export JRLHF_DISTRIBUTED=auto",
        "export HF_HUB_OFFLINE=1",
        "srun --ntasks-per-node=1 .venv/bin/jrlhf pipeline --config 'configs/a b.py'",
        "# node 0 of 3: SLURM_PROCID=0 SLURM_LOCALID=0 -> jax process 0 of 3",
        "# node 1 of 3: SLURM_PROCID=1 SLURM_LOCALID=0 -> jax process 1 of 3",
        "# node 2 of 3: SLURM_PROCID=2 SLURM_LOCALID=0 -> jax process 2 of 3",
    ]


def test_slurm_dry_run_in_the_submit_dir_and_outside_an_allocation(tmp_path):
    lines = dry_run("slurm.sbatch", "sft", SLURM_SUBMIT_DIR=str(tmp_path))
    assert lines[1] == f"cd {shlex.quote(str(tmp_path))}"
    assert lines[4:] == [
        "srun --ntasks-per-node=1 .venv/bin/jrlhf sft",
        "# nodes: SLURM_JOB_NUM_NODES and SLURM_NNODES unset (not in an allocation)",
    ]
    assert dry_run("slurm.sbatch", "sft", SLURM_NNODES="2")[-2:] == [
        "# node 0 of 2: SLURM_PROCID=0 SLURM_LOCALID=0 -> jax process 0 of 2",
        "# node 1 of 2: SLURM_PROCID=1 SLURM_LOCALID=0 -> jax process 1 of 2",
    ]


@pytest.mark.parametrize("script, args, env, error", [
    ("multi_gpu.sh", ["ppo"], {"NUM_HOSTS": "2", "HOST_ID": "2", "COORDINATOR": "h:1"},
     "multi_gpu.sh: HOST_ID must be in [0, 2), got '2'"),
    ("multi_gpu.sh", ["ppo"], {"HOST_ID": "-1"},
     "multi_gpu.sh: HOST_ID must be in [0, 1), got '-1'"),
    ("multi_gpu.sh", ["ppo"], {"NUM_HOSTS": "3", "HOST_ID": "01", "COORDINATOR": "h:1"},
     "multi_gpu.sh: HOST_ID must be in [0, 3), got '01'"),
    ("multi_gpu.sh", ["ppo"], {"NUM_HOSTS": "0"},
     "multi_gpu.sh: NUM_HOSTS must be a positive integer, got '0'"),
    ("multi_gpu.sh", ["ppo"], {"NUM_HOSTS": "two"},
     "multi_gpu.sh: NUM_HOSTS must be a positive integer, got 'two'"),
    ("multi_gpu.sh", ["ppo"], {"NUM_HOSTS": "2", "HOST_ID": "0"},
     "multi_gpu.sh: NUM_HOSTS=2 needs COORDINATOR=host:port (host 0's address)"),
    ("multi_gpu.sh", ["ppo"], {"NUM_HOSTS": "2", "COORDINATOR": "10.0.0.1:1234"},
     "multi_gpu.sh: NUM_HOSTS=2 needs HOST_ID in [0, 2)"),
    ("multi_gpu.sh", ["ppo"], {"NUM_HOSTS": "2", "HOST_ID": "0", "COORDINATOR": "10.0.0.1"},
     "multi_gpu.sh: COORDINATOR must be host:port, got '10.0.0.1'"),
    ("multi_gpu.sh", [], {},
     f"multi_gpu.sh: usage: [COORDINATOR=host:port NUM_HOSTS=N HOST_ID=i] {MULTI} JRLHF_ARGS..."),
    ("multi_gpu.sh", ["ppo"], {"JRLHF_DRY_RUN": "yes"},
     "multi_gpu.sh: JRLHF_DRY_RUN must be 0 or 1, got 'yes'"),
    ("tpu_pod.sh", ["my-tpu", "us-central2-b"], {},
     f"tpu_pod.sh: usage: {LAUNCH}/tpu_pod.sh TPU_NAME ZONE JRLHF_ARGS..."),
    ("tpu_pod.sh", ["us-central2-b", "my-tpu", "sft"], {},
     "tpu_pod.sh: ZONE must be a zone like us-central2-b, got 'my-tpu'"),
    ("tpu_pod.sh", ["My_TPU", "us-central2-b", "sft"], {},
     "tpu_pod.sh: TPU_NAME must be lowercase letters, digits and hyphens, got 'My_TPU'"),
    ("slurm.sbatch", [], {},
     f"slurm.sbatch: usage: sbatch --nodes=N {LAUNCH}/slurm.sbatch JRLHF_ARGS..."),
    ("slurm.sbatch", ["sft"], {"SLURM_NNODES": "0"},
     "slurm.sbatch: SLURM_NNODES must be a positive integer, got '0'"),
    ("slurm.sbatch", ["sft"], {"SLURM_JOB_NUM_NODES": "4x", "SLURM_NNODES": "4"},
     "slurm.sbatch: SLURM_JOB_NUM_NODES must be a positive integer, got '4x'"),
])
@pytest.mark.parametrize("dry", ["1", "0"])
def test_bad_inputs_exit_2_with_one_line(script, args, env, error, dry):
    result = launch(script, *args, **{"JRLHF_DRY_RUN": dry, **env})
    assert (result.returncode, result.stdout, result.stderr) == (2, "", error + "\n")


# A stand-in for .venv/bin/jrlhf (and srun, gcloud): prints where it runs, the variables jrlhf
# reads and one argument per line.
ECHO_JRLHF = """#!/usr/bin/env bash
echo "cwd $PWD"
env | grep -E '^(JRLHF_|HF_HUB_OFFLINE=)' | sort
printf '<%s>\\n' "$@"
"""


def stub(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def repo_copy(tmp_path: Path) -> Path:
    """launch/ copied into a fake checkout whose .venv/bin/jrlhf is ECHO_JRLHF."""
    repo = tmp_path / "re po"
    for script in SCRIPTS:
        stub(repo / "launch" / script.name, script.read_text())
    stub(repo / ".venv/bin/jrlhf", ECHO_JRLHF)
    return repo


def run_copy(repo: Path, script: str, *args: str, path: Path | None = None, **env: str):
    """The stdout lines of `repo`'s launch/`script` (asserted to exit 0 silently on stderr)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(SCRIPT_VARS)}
    if path is not None:
        base["PATH"] = f"{path}:{base['PATH']}"
    result = subprocess.run([str(repo / "launch" / script), *args], env={**base, **env},
                            check=False, capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stderr) == (0, ""), result
    return result.stdout.splitlines()


def test_multi_gpu_runs_what_its_dry_run_prints(tmp_path):
    repo = repo_copy(tmp_path)
    args = ("ppo", "--config", "configs/a b.py", "--set", "x='y'")
    env = {"NUM_HOSTS": "2", "HOST_ID": "1", "COORDINATOR": "10.0.0.1:1234",
           "JRLHF_DISTRIBUTED": "auto"}
    dry = run_copy(repo, "multi_gpu.sh", *args, JRLHF_DRY_RUN="1", **env)
    ran = run_copy(repo, "multi_gpu.sh", *args, **env)
    assert ran == [f"cwd {repo}", "HF_HUB_OFFLINE=1", "JRLHF_COORDINATOR=10.0.0.1:1234",
                   "JRLHF_NUM_PROCESSES=2", "JRLHF_PROCESS_ID=1", "<ppo>", "<--config>",
                   "<configs/a b.py>", "<--set>", "<x='y'>"]
    exports = sorted(line.removeprefix("export ") for line in dry if line.startswith("export "))
    assert dry[1] == f"cd '{repo}'" and exports == ran[1:5]


def test_slurm_runs_what_its_dry_run_prints(tmp_path):
    repo = repo_copy(tmp_path)
    stub(tmp_path / "bin/srun", '#!/usr/bin/env bash\necho "srun $1"\nshift\nexec "$@"\n')
    env = {"SLURM_SUBMIT_DIR": str(repo), "SLURM_JOB_NUM_NODES": "2"}
    dry = run_copy(repo, "slurm.sbatch", "sft", "--set", "a=b c", JRLHF_DRY_RUN="1", **env)
    ran = run_copy(repo, "slurm.sbatch", "sft", "--set", "a=b c", path=tmp_path / "bin", **env)
    assert dry[4] == "srun --ntasks-per-node=1 .venv/bin/jrlhf sft --set 'a=b c'"
    assert ran == ["srun --ntasks-per-node=1", f"cwd {repo}", "HF_HUB_OFFLINE=1",
                   "JRLHF_DISTRIBUTED=auto", "<sft>", "<--set>", "<a=b c>"]


def test_tpu_pod_worker_runs_what_its_dry_run_prints(tmp_path):
    repo = repo_copy(tmp_path)
    # gcloud's stand-in runs the --command as ssh would: a fresh environment, the worker's home.
    stub(tmp_path / "bin/gcloud", '#!/usr/bin/env bash\nprintf "<%s>\\n" "${@:1:8}"\n'
         'cd "$WORKER_HOME" && exec env -i PATH="$PATH" HOME="$WORKER_HOME" bash -c "${10}"\n')
    args = ("tpu-1", "us-east5-a", "pipeline", "--config", "configs/a b.py", "--set", "x='y'")
    env = {"JRLHF_REPO": repo.name, "WORKER_HOME": str(tmp_path)}
    dry = run_copy(repo, "tpu_pod.sh", *args, JRLHF_DRY_RUN="1", **env)
    ran = run_copy(repo, "tpu_pod.sh", *args, path=tmp_path / "bin", **env)
    assert ran == ["<compute>", "<tpus>", "<tpu-vm>", "<ssh>", "<tpu-1>", "<--zone>",
                   "<us-east5-a>", "<--worker=all>", f"cwd {repo}", "HF_HUB_OFFLINE=1",
                   "JRLHF_DISTRIBUTED=auto", "<pipeline>", "<--config>", "<configs/a b.py>",
                   "<--set>", "<x='y'>"]
    assert dry[1:5] == ["# worker: cd 're po'", "# worker: export JRLHF_DISTRIBUTED=auto",
                        "# worker: export HF_HUB_OFFLINE=1",
                        ("# worker: .venv/bin/jrlhf pipeline --config 'configs/a b.py' "
                         "--set 'x='\\''y'\\'''")]


def test_slurm_refuses_a_submit_dir_without_the_venv(tmp_path):
    result = launch("slurm.sbatch", "sft", SLURM_SUBMIT_DIR=str(tmp_path))
    assert (result.returncode, result.stdout, result.stderr) == (
        2, "", f"slurm.sbatch: no .venv/bin/jrlhf in {tmp_path}: submit from the repository root\n")


def _bind_hosts() -> list[tuple[socket.AddressFamily, str]]:
    """The wildcard addresses to probe: jax's coordinator binds `[::]:port` where IPv6 works."""
    hosts = [(socket.AF_INET, "0.0.0.0")]
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::", 0))
        hosts.append((socket.AF_INET6, "::"))
    except OSError:
        pass
    return hosts


def free_slurm_port() -> int:
    """A port in the range jax's SlurmCluster derives from the job id that is free right now."""
    hosts = _bind_hosts()
    for port in random.Random().sample(range(65536 - 2**12, 65536), 200):
        try:
            for family, host in hosts:
                with socket.socket(family) as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port in [61440, 65535]")


def slurm_task_env(job_id: int, procid: int) -> dict[str, str]:
    """The variables `srun` sets for task `procid` of a 2-task step on one node (localhost)."""
    return {"SLURM_JOB_ID": str(job_id), "SLURM_JOBID": str(job_id), "SLURM_STEP_ID": "0",
            "SLURM_JOB_NODELIST": "localhost", "SLURM_STEP_NODELIST": "localhost",
            "SLURM_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1",
            "SLURM_STEP_NUM_NODES": "1", "SLURM_NTASKS": "2", "SLURM_NPROCS": "2",
            "SLURM_STEP_NUM_TASKS": "2", "SLURM_TASKS_PER_NODE": "2",
            "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_NODEID": "0", "SLURM_PROCID": str(procid),
            "SLURM_LOCALID": str(procid)}


@pytest.mark.slow
def test_distributed_auto_starts_from_slurm_variables(tmp_path):
    port = free_slurm_port()
    job_id = 7 * 2**12 + port - (65536 - 2**12)  # jax: port = job_id % 4096 + 61440
    # Nothing from this environment may pick the coordinator, cluster or devices instead.
    drop = ("SLURM_", "JRLHF_", "JAX_COORDINATOR", "JAX_LOCAL_DEVICE_IDS", "JAX_NUM_PROCESSES",
            "JAX_PROCESS_ID", "OMPI_", "TPU_", "XLA_FLAGS", "KUBERNETES_SERVICE_HOST")
    base = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    base.update(JRLHF_DISTRIBUTED="auto", JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_force_host_platform_device_count=2")
    logs = [tmp_path / f"task{i}.log" for i in range(2)]
    procs = []
    try:
        for i, log in enumerate(logs):
            with log.open("w") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, str(SLURM_WORKER)], cwd=ROOT, stdout=out,
                    stderr=subprocess.STDOUT, env={**base, **slurm_task_env(job_id, i)}))
        deadline = time.monotonic() + 180
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break  # one failed: the other would wait for it until jax's own timeout
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
    for i, (p, log) in enumerate(zip(procs, logs, strict=True)):
        text = log.read_text()
        assert p.returncode == 0, f"task {i} (port {port}, job {job_id}):\n{text}"
        assert f"process {i} of 2: devices 4 allgather sum 28 jit sum 28\n" in text, text
