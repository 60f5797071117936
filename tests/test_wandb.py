"""W&B beside metrics.jsonl (`jrlhf.wandb_log`), offline: what the local run files hold equals
what jrlhf wrote; a resumed run continues the same W&B run; only process 0 logs; a missing
package is one line. No network: `WANDB_MODE=offline`, every W&B folder in tmp_path."""

import json
import struct
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
import wandb
from wandb.proto import wandb_internal_pb2

from jrlhf import cli, distributed, wandb_log
from jrlhf.config import Config, apply_overrides, derive, load_config, to_dict
from jrlhf.loops import run_stage
from jrlhf.report import MetricsWriter, read_metrics, write_report
from jrlhf.state import TrainState

ROOT = Path(__file__).parent.parent


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """W&B offline and silent, its every folder under tmp_path; sessions closed after. W&B
    reads its environment once per process (`wandb.setup`): torn down before and after."""
    wandb.teardown()
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true",
                        "WANDB_DISABLE_GIT": "true", "WANDB_ERROR_REPORTING": "false",
                        "WANDB_DIR": tmp_path / "wandb_dir", "WANDB_CONFIG_DIR": tmp_path / "cfg",
                        "WANDB_CACHE_DIR": tmp_path / "cache",
                        "WANDB_DATA_DIR": tmp_path / "data"}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / "wandb_dir").mkdir()
    yield
    for folder in list(wandb_log._SESSIONS):
        wandb_log.close_session(folder)
    wandb.teardown()


# ----------------------------------------------------------------------------------------------
# Reading the offline run back: `run-<id>.wandb` is a LevelDB-style log (a 7-byte header, then
# 32 KiB blocks of records: crc32c, length, type) of `wandb_internal_pb2.Record` messages.

def records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, part = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding (a preallocated block)
            pos += left
            continue
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            part = b""
            yield record


def process_ends(out: Path, failed: bool = False) -> None:
    """What the end of a process does: finish the folder's W&B run, then wait for W&B's service
    to write everything out (`wandb.teardown`, which `atexit` runs), so the files can be read."""
    wandb_log.close_session(out, failed)
    wandb.teardown()


def offline_runs(folder: Path) -> list[Path]:
    """The offline run folders W&B made under `folder` (WANDB_DIR, or else the run folder),
    oldest first."""
    return sorted((folder / "wandb").glob("offline-run-*"))


def read_run(folder: Path) -> dict:
    """`{"id", "config", "history": [row, ...]}` of one offline run folder."""
    (log,) = folder.glob("run-*.wandb")
    run = {"history": [], "config": {}}
    for record in records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"] = record.run.run_id
            run["config"].update({u.key: json.loads(u.value_json)
                                  for u in record.run.config.update})
        elif kind == "config":
            run["config"].update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            run["history"].append({item.key or "/".join(item.nested_key):
                                   json.loads(item.value_json) for item in record.history.item})
        run["exit"] = kind == "exit"
    assert run["exit"], f"{log}: not a finished run's complete log"
    run["config"].pop("_wandb", None)
    return run


def stage_rows(history: list[dict], stage: str) -> list[dict]:
    """A stage's metrics rows as W&B holds them: `{"step", key: value}` with the stage prefix
    taken off; rows of other stages and W&B's own columns left out."""
    prefix = stage + "/"
    return [{"step" if k == prefix + "step" else k[len(prefix):]: v for k, v in row.items()
             if k.startswith(prefix)} for row in history if prefix + "step" in row]


def last_per_step(rows: list[dict]) -> list[dict]:
    """The last row W&B holds for each step (a resumed stage logs its replayed steps again)."""
    return [row for _, row in sorted({row["step"]: row for row in rows}.items())]


def jsonl_rows(out: Path, stage: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "stage"}
            for r in read_metrics(out / "metrics.jsonl") if r["stage"] == stage]


# ----------------------------------------------------------------------------------------------

def toy_config(out: Path, **run) -> Config:
    return derive(Config(), {"run.out_dir": str(out), "run.wandb_project": "jrlhf-test",
                             "run.log_every": 0, "run.progress": False,
                             **{f"run.{k}": v for k, v in run.items()}})


def toy_state() -> TrainState:
    return TrainState.create({"w": np.zeros(2, np.float32)}, optax.sgd(0.1), 0)


def toy_step(crash_at: int = 0):
    """A step whose metrics follow from the state it is given (a resume replays them exactly),
    with values that are not short decimals; raises at step `crash_at` (a dying process)."""
    def step(state, batch):
        n = int(state.step) + 1
        if n == crash_at:
            raise RuntimeError("killed")
        metrics = {"toy/loss": 1.0 / (3 * n), "toy/norm": float(np.sqrt(n)), "time/s": 0.1 * n}
        return state.replace(step=state.step + 1), metrics

    return step


def test_metrics_and_config_reach_the_offline_run_and_a_resume_continues_it(tmp_path):
    """A stage crashes after step 3 (checkpoint at 2); `--resume` replays 3 and runs 4, 5.
    Both processes' W&B runs have the id saved in the run folder, the config is the resolved
    config, and the last value W&B holds for each step equals metrics.jsonl's row."""
    out = tmp_path / "run"
    config = toy_config(out, save_every=2)
    with pytest.raises(RuntimeError, match="killed"):
        run_stage("toy", config, toy_state(), toy_step(crash_at=4), iter(range(100)), 5,
                  out_dir=out, log=None)
    process_ends(out, failed=True)
    run_id = wandb_log.saved_id(out)
    assert run_id and json.loads((out / wandb_log.ID_FILE).read_text()) == {"id": run_id}
    (first,) = map(read_run, offline_runs(tmp_path / "wandb_dir"))
    assert first["id"] == run_id
    assert stage_rows(first["history"], "toy") == jsonl_rows(out, "toy")  # steps 1..3
    assert [r["step"] for r in jsonl_rows(out, "toy")] == [1, 2, 3]

    # A second run without --resume is refused by the stage: the saved id stays.
    with pytest.raises(FileExistsError, match="pass --resume"):
        run_stage("toy", config, toy_state(), toy_step(), iter(range(100)), 5, out_dir=out,
                  log=None)
    process_ends(out)
    assert wandb_log.saved_id(out) == run_id and len(offline_runs(tmp_path / "wandb_dir")) == 1

    run_stage("toy", config, toy_state(), toy_step(), iter(range(100)), 5, out_dir=out,
              resume=True, log=None)
    process_ends(out)
    first, second = map(read_run, offline_runs(tmp_path / "wandb_dir"))
    assert first["id"] == second["id"] == run_id == wandb_log.saved_id(out)
    expected = jsonl_rows(out, "toy")
    assert [r["step"] for r in expected] == [1, 2, 3, 4, 5]
    assert expected[0] == {"step": 1, "toy/loss": 1 / 3, "toy/norm": 1.0, "time/s": 0.1}
    assert [r["step"] for r in stage_rows(second["history"], "toy")] == [3, 4, 5]
    assert last_per_step(stage_rows(first["history"] + second["history"], "toy")) == expected
    assert first["config"] == second["config"] == json.loads(json.dumps(to_dict(config)))


def test_report_picture_and_samples_table(tmp_path, monkeypatch):
    """The report PNG goes to W&B byte for byte; the samples table holds samples.jsonl's rows
    (columns in its keys' order, non-ASCII text intact). Without WANDB_DIR, W&B's files go
    into the run folder."""
    monkeypatch.delenv("WANDB_DIR")
    out = tmp_path / "run"
    writer = MetricsWriter(out, "sft")
    for step in (1, 2, 3):
        writer.write(step, {"sft/loss": 1.0 / step})
    writer.close()
    png = write_report(out / "metrics.jsonl", out / "report.png")
    samples = [{"prompt": "Amélie", "sft": "fine.", "ppo": "A superb film, “Amélie”!"},
               {"prompt": "Heat", "sft": "", "ppo": "Heat is great."}]
    wandb_log.open_session(toy_config(out), out, resume=False)
    wandb_log.log_image(out, "report", png)
    wandb_log.log_table(out, "eval/samples", samples)
    process_ends(out)
    assert not list((tmp_path / "wandb_dir").iterdir())
    (folder,) = offline_runs(out)
    image, table = read_run(folder)["history"]
    assert image["report/_type"] == "image-file"
    assert (folder / "files" / image["report/path"]).read_bytes() == png.read_bytes()
    assert table["eval/samples/_type"] == "table-file"
    saved = json.loads((folder / "files" / table["eval/samples/path"]).read_text())
    assert saved["columns"] == ["prompt", "sft", "ppo"]
    assert [dict(zip(saved["columns"], row)) for row in saved["data"]] == samples


def test_processes_other_than_0_log_nothing(tmp_path, monkeypatch):
    """Process 1 of a multi-host run (simulated): no session, no W&B call, no id file, no
    W&B folder, while the stage itself runs."""
    out = tmp_path / "run"
    config = toy_config(out)

    def refuse(*args, **kwargs):
        raise AssertionError("wandb.init called on a process other than 0")

    monkeypatch.setattr(wandb, "init", refuse)
    with monkeypatch.context() as m:
        m.setattr(jax, "process_index", lambda: 1)
        assert wandb_log.open_session(config, out, resume=False) is None
    monkeypatch.setattr(distributed, "is_writer", lambda: False)
    result = run_stage("toy", config, toy_state(), toy_step(), iter(range(100)), 3,
                       out_dir=out, log=None)
    assert len(result.history) == 3
    assert wandb_log.session(out) is None and not (out / wandb_log.ID_FILE).exists()
    assert not list(tmp_path.rglob("offline-run-*")) and not (out / "wandb").exists()


def test_a_missing_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ValueError) as err:
        wandb_log.open_session(toy_config(tmp_path / "run"), tmp_path / "run", resume=False)
    assert str(err.value) == ("run.wandb_project is set but the wandb package is not "
                              "installed: pip install 'jrlhf[wandb]'")
    # Through the CLI: one line on stderr, before any model is loaded; the run folder is free.
    code = cli.main(["sft", "--config", str(ROOT / "configs" / "tiny.py"), "--set",
                     f"run.out_dir={tmp_path / 'cli'}", "--set", "run.wandb_project=x"])
    assert code == 2
    assert capsys.readouterr().err == f"jrlhf sft: error: {err.value}\n"
    assert wandb_log.session(tmp_path / "cli") is None


@pytest.mark.slow
def test_the_pipeline_logs_every_stage_the_report_and_the_samples(tmp_path):
    """`jrlhf pipeline` on the tiny config with W&B on: every stage's rows equal
    metrics.jsonl's, the config equals config.json, the report and samples.jsonl are there."""
    from jrlhf.stages import run_pipeline

    out = tmp_path / "run"
    config = apply_overrides(load_config(ROOT / "configs" / "tiny.py"), [
        f"run.out_dir={out}", "run.wandb_project=jrlhf-test", "reward.steps=3",
        "ppo.iterations=2", "data.num_ranking_prompts=16", "reward.batch_size=2",
        "data.num_eval_prompts=4"])
    run_pipeline(config, log=lambda _: None)
    assert wandb_log.session(out) is None  # finished with the run
    wandb.teardown()
    (folder,) = offline_runs(tmp_path / "wandb_dir")
    run = read_run(folder)
    assert run["id"] == wandb_log.saved_id(out)
    assert run["config"] == json.loads((out / "config.json").read_text())
    for stage in ("sft", "reward", "ppo"):
        assert jsonl_rows(out, stage), stage
        assert stage_rows(run["history"], stage) == jsonl_rows(out, stage), stage
    (image,) = [r for r in run["history"] if "report/path" in r]
    assert (folder / "files" / image["report/path"]).read_bytes() == \
        (out / "report.png").read_bytes()
    (table,) = [r for r in run["history"] if "eval/samples/path" in r]
    saved = json.loads((folder / "files" / table["eval/samples/path"]).read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [dict(zip(saved["columns"], row)) for row in saved["data"]] == samples
