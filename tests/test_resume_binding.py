"""What `--resume` is bound to (jrlhf.resume): the checkpoints' own config, shape changes that
are not corruption, and stages never trained over from step 0 unless `run.restart_stages` asks.

Each test runs the CLI in-process on configs/tiny.py (SFT, 4 steps, a checkpoint per 2)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from jrlhf.cli import main

TINY = str(Path(__file__).parent.parent / "configs" / "tiny.py")


def sft(out: Path, *changes: str) -> list[str]:
    argv = ["sft", "--config", TINY, "--set", f"run.out_dir={out}", "--set", "sft.steps=4",
            "--set", "run.save_every=2", "--set", "run.log_every=0", "--set", "run.progress=false"]
    for change in changes:
        argv += ["--set", change]
    return argv


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(argv: list[str], capfd) -> str:
    """The CLI's one error line for `argv` (exit 2, no traceback)."""
    capfd.readouterr()
    assert main(argv) == 2
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, err
    errors = [line for line in (out + err).splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("jrlhf sft: error: "), out + err
    return errors[0]


def ran(argv: list[str], capfd) -> str:
    capfd.readouterr()
    assert main(argv) == 0
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, err
    return out + err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(sft(out)) == 0
    return out


@pytest.fixture
def run_copy(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


@pytest.mark.slow
def test_a_shape_change_is_refused_not_set_aside_and_restart_stages_retrains(run_copy, capfd):
    """lora.rank allowed to change on --resume: the checkpoints hold other arrays than the
    config builds. One line names an array on each side; nothing is moved or changed; the
    original config still resumes; `run.restart_stages=sft` trains again from step 0 and keeps
    the old checkpoints in `sft/replaced_checkpoints/0`."""
    ckpts = run_copy / "sft" / "checkpoints"
    before = digests(ckpts)
    line = refused(sft(run_copy, "lora.rank=4", "run.allow_changed=lora.rank") + ["--resume"],
                   capfd)
    assert "checkpoint step 4" in line and "holds other arrays than the config builds" in line
    assert "the config asks for" in line or "the checkpoint holds" in line
    assert "--set run.restart_stages=sft" in line
    assert digests(ckpts) == before
    assert not (run_copy / "sft" / "corrupt_checkpoints").exists()
    assert "[sft] resumed from step 4" in ran(sft(run_copy) + ["--resume"], capfd)

    text = ran(sft(run_copy, "lora.rank=4", "run.allow_changed=lora.rank",
                   "run.restart_stages=sft") + ["--resume"], capfd)
    assert "training it again from step 0 (run.restart_stages)" in text
    assert "resumed from" not in text
    assert digests(run_copy / "sft" / "replaced_checkpoints" / "0") == before
    assert sorted(p.name for p in ckpts.iterdir()) == ["2", "4"]
    # The retrained checkpoints are bound to the new config: the old one is now the change.
    line = refused(sft(run_copy) + ["--resume"], capfd)
    assert "lora.rank: 4 -> " in line


def test_a_changed_architecture_names_its_field_and_is_refused_by_shape(run_copy, capfd):
    recorded = (run_copy / "config.json").read_text()
    line = refused(sft(run_copy, "model.arch.num_layers=3") + ["--resume"], capfd)
    assert "(model.arch.num_layers: 2 -> 3)" in line
    assert "--set run.allow_changed=model.arch.num_layers" in line
    before = digests(run_copy / "sft" / "checkpoints")
    line = refused(sft(run_copy, "model.arch.num_layers=3",
                       "run.allow_changed=model.arch.num_layers") + ["--resume"], capfd)
    assert "holds other arrays than the config builds" in line and "layers/2/" in line
    assert digests(run_copy / "sft" / "checkpoints") == before
    assert (run_copy / "config.json").read_text() == recorded  # a refused config is no record


def test_the_checkpoint_holds_its_config_when_the_files_beside_it_are_gone(run_copy, capfd):
    (run_copy / "sft" / "config.json").unlink()
    (run_copy / "sft" / "inputs.json").unlink()
    line = refused(sft(run_copy, "sft.learning_rate=0.5") + ["--resume"], capfd)
    assert "(sft.learning_rate: 0.003 -> 0.5)" in line
    assert "[sft] resumed from step 4" in ran(sft(run_copy) + ["--resume"], capfd)


@pytest.mark.slow
def test_checkpoints_all_set_aside_are_not_trained_over_unless_asked(run_copy, capfd):
    """Every checkpoint damaged: each is set aside in one line (no third-party traceback), the
    resume stops; the next --resume still refuses (nothing intact left) until
    `run.restart_stages` names the stage."""
    for step in ("2", "4"):
        manifest = run_copy / "sft" / "checkpoints" / step / "state" / "manifest.ocdbt"
        data = bytearray(manifest.read_bytes())
        data[len(data) // 2] ^= 0xFF
        manifest.write_bytes(bytes(data))
    capfd.readouterr()
    assert main(sft(run_copy) + ["--resume"]) == 2
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "exception was never retrieved" not in err, err
    lines = (out + err).splitlines()
    assert sum("is unreadable or corrupt" in line for line in lines) == 2, out + err
    assert "no intact checkpoint" in lines[-1] and "run.restart_stages=sft" in lines[-1]
    line = refused(sft(run_copy) + ["--resume"], capfd)
    assert "2 set aside" in line and "run.restart_stages=sft" in line
    text = ran(sft(run_copy, "run.restart_stages=sft") + ["--resume"], capfd)
    assert "resumed from" not in text
    assert sorted(p.name for p in (run_copy / "sft" / "checkpoints").iterdir()) == ["2", "4"]
