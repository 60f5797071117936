"""Stages as data: the pipeline, iterative RLHF and each single-algorithm command are lists of
`Stage` descriptions that one runner, `run_stages`, walks in order.

A stage trains one algorithm (its setup from `jrlhf.setups`), has the task's annotator rank
sampled responses, evaluates policies on held-out prompts, or exports weights. The runner
handles what every stage shares, once and in one order: the stage's config settings, its data
loader, its RNG streams (named by the stage: `setups.stream_key(seed, stage.name, ...)`),
checkpoints and exact resume (`run.out_dir/<stage.name>/checkpoints`), and preemption — a
preempted stage ends the run at once, before any later stage uses its half-trained result.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jrlhf import algorithms, distributed, elo, judging, loops, models, sharding, wandb_log
from jrlhf.algorithms import ANNOTATOR, ANNOTATOR_OR_MODEL, REWARD_MODEL_PATH
from jrlhf.config import Config, config_json, derive, parse_reward_functions
from jrlhf.data import Encoder, build_dataset, make_loader
from jrlhf.models.config import ModelConfig
from jrlhf.models.sources import load_policy, model_config, resolve_source
from jrlhf.report import (file_digest, remove_temp_files, sync_folder, write_atomically,
                          write_report)
from jrlhf.rewards import Reward, import_host_reward
from jrlhf.rollouts import decode_texts
from jrlhf.runlock import RunLock
from jrlhf.rng import stream_seed
from jrlhf.setups import check_expert_mesh, default_mesh, initial_weights, make_setup
from jrlhf.tasks import TASKS

KINDS = ("train", "rank", "evaluate", "export")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of a run, as data.

    name: unique in the run: its folder under `run.out_dir` (checkpoints), its metrics rows,
        its RNG streams.
    kind: train | rank | evaluate | export.
    algorithm: (train) the name of a record of `jrlhf.algorithms`.
    data: (train, evaluate) the data file it reads; (rank) the rankings file it extends ("":
        none). A key of `Run.files`.
    start: (train) the weights it starts from; (rank) the policy it samples; (evaluate) the
        KL reference; (export) the weights it writes. A key of `Run.models`.
    reward: (train, an algorithm that samples) a reward model in `Run.models`,
        `REWARD_MODEL_PATH`, `ANNOTATOR` or `ANNOTATOR_OR_MODEL`.
    produces: the key its result is stored under (`Run.models` for train, `Run.files` for rank).
    compare: (evaluate) the policies compared; (rank) earlier versions mixed into the samples.
    folder: (rank, evaluate, export) where it writes, relative to `run.out_dir`.
    settings: config changes for this stage only, e.g. `(("grpo.beta", 0.0),)` (after the
        algorithm's own `settings`).
    """

    name: str
    kind: str
    algorithm: str = ""
    data: str = ""
    start: str = ""
    reward: str = ""
    produces: str = ""
    compare: tuple[str, ...] = ()
    folder: str = ""
    settings: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"stage {self.name!r}: unknown kind {self.kind!r}; choose from "
                             f"{', '.join(KINDS)}")


@dataclasses.dataclass
class Run:
    """What the stages of one run share: config, folder, tokenizer, data files and the weights
    and results that stages produce."""

    config: Config
    out: Path
    tokenizer: Any
    encoder: Encoder
    files: dict[str, Path]
    models: dict[str, tuple[ModelConfig, Any]]
    resume: bool = False
    train: bool = True  # False: restore each stage's latest checkpoint without stepping
    log: Callable[[str], None] = print
    results: dict[str, Any] = dataclasses.field(default_factory=dict)
    lock: RunLock | None = None  # held from `open_run` until `close`
    # SIGTERM between `with` and `close`: a training loop saves and stops its stage; during
    # any other stage (rankings, eval, export) that stage finishes and the run stops before
    # the next; after the last stage the run just finishes.
    preemption: loops.Preemption | None = None

    def __enter__(self) -> Run:
        self.preemption = loops.Preemption().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.close(failed=exc[0] is not None)

    def close(self, failed: bool = False) -> None:
        wandb_log.close_session(self.out, failed)
        if self.preemption is not None:
            self.preemption.__exit__()
            self.preemption = None
        if self.lock is not None:
            self.lock.__exit__()
            self.lock = None

    def weights(self, name: str, stage: Stage) -> tuple[ModelConfig, Any]:
        if name == REWARD_MODEL_PATH and name not in self.models:
            path = self.config.reward.model_path
            if not path:
                raise ValueError(f"the {stage.name} stage needs --set reward.model_path=DIR (a "
                                 "reward model folder written by `jrlhf reward`)")
            path = resolve_source(path, "reward.model_path")  # a folder or a cached hub id
            cfg, params = models.load_pretrained(path, lm_head=False, scalar_head=True)
            params = jax.tree.map(jnp.asarray, params)
            if jax.process_count() > 1:  # beside the policy, on every process's devices
                params = sharding.put(params, sharding.replicated(default_mesh(self.config)))
            self.models[name] = (cfg, params)
        if name not in self.models:
            raise KeyError(f"stage {stage.name!r} needs weights {name!r}, which no earlier stage "
                           "produced")
        return self.models[name]

    def file(self, name: str, stage: Stage) -> Path:
        if name not in self.files:
            if name == "rankings":
                raise ValueError(f"the {stage.name} stage needs --set data.rankings_path=FILE "
                                 "(rankings or pairwise preferences; see README 'Data files')")
            raise KeyError(f"stage {stage.name!r} needs the data file {name!r}, which no earlier "
                           "stage produced")
        return self.files[name]


def task_files(config: Config, out: Path) -> dict[str, Path]:
    """Data files: the configured paths, or the built-in task's generated files for empty ones
    (written by process 0; the others wait for them)."""
    d = config.data
    write = functools.partial(TASKS[d.task].write_task_files, out / "data",
                              num_sft=d.num_sft_examples,
                              num_prompts=max(d.num_ranking_prompts, 64),
                              num_eval=d.num_eval_prompts, seed=config.run.seed)
    files = written_by_one(write, "task_files")
    chosen = {"sft": d.sft_path, "prompts": d.prompts_path, "eval_prompts": d.eval_prompts_path}
    found = {k: Path(v) if v else files[k] for k, v in chosen.items()}
    if d.rankings_path:
        found["rankings"] = Path(d.rankings_path)
    return found


def open_run(config: Config, *, resume: bool = False, train: bool = True, log=print) -> Run:
    """Take `run.out_dir` (one run per folder: see `jrlhf.runlock`), save the resolved config,
    load the policy ("base") and tokenizer. Use as `with open_run(...) as run:`."""
    if config.data.task not in TASKS:
        raise ValueError(f"data.task={config.data.task!r}: unknown task; choose from "
                         f"{', '.join(TASKS)}")
    out = Path(config.run.out_dir)
    # One host per run takes the folder (the others share it, e.g. over NFS).
    lock = RunLock(out).__enter__() if distributed.is_writer() else None
    try:
        distributed.barrier("run_lock")
        distributed.check_shared_folder(out)
        return _open_locked(config, out, lock, resume=resume, train=train, log=log)
    except BaseException:
        wandb_log.close_session(out, failed=True)
        if lock is not None:
            lock.__exit__()
        raise


def _open_locked(config: Config, out: Path, lock, *, resume, train, log) -> Run:
    if lock is not None and lock.previous_holder:
        log(f"[run] took over {lock.path} from a run that ended without releasing it "
            f"(pid {lock.previous_holder})")
    if distributed.is_writer():
        left = remove_temp_files(out)  # before any stage writes: nothing else writes here now
        if left:
            log(f"[run] removed {len(left)} temp file(s) an interrupted run left: "
                + ", ".join(str(p.relative_to(out)) for p in left[:3])
                + (", ..." if len(left) > 3 else ""))
        if not (resume and (out / "config.json").exists()):
            # A resume's config is recorded once every stage accepted it (`run_stages`): a
            # refused one must not replace the record of what the run was made with.
            write_atomically(out / "config.json", config_json(config))
    # W&B on process 0 (a missing package is found here); its run starts with the first row.
    wandb_log.open_session(config, out, resume)
    if config.mesh.expert > 1:  # a bad expert split fails before any weights are read
        check_expert_mesh(config.mesh.expert, model_config(config.model))
    policy_cfg, params, tokenizer = load_policy(config.model, config.run.seed)
    log(f"[model] {config.model.source}: {policy_cfg.family}, {policy_cfg.num_layers} layers, "
        f"{policy_cfg.num_params / 1e6:.1f}M parameters")
    d = config.data
    encoder = Encoder(tokenizer, d.max_prompt_length, d.max_response_length, d.chat_template)
    encoder.check_positions(policy_cfg, config.rollout.max_new_tokens)
    return Run(config, out, tokenizer, encoder, task_files(config, out),
               {"base": (policy_cfg, params)}, resume=resume, train=train, log=log, lock=lock)


def run_stages(run: Run, stages: list[Stage]) -> str | None:
    """Run `stages` in order; returns the name of a preempted stage (the run stops there), or
    None when all finished."""
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique: {names}")
    for i, stage in enumerate(stages):
        if not RUNNERS[stage.kind](run, stage, _stage_config(run, stage)):
            run.log(f"[{stage.name}] preempted; resume with --resume")
            return stage.name
        requested = run.preemption is not None and run.preemption.requested
        if distributed.any_process(requested) and i + 1 < len(stages):  # all hosts stop
            run.log(f"[{stages[i + 1].name}] preempted (SIGTERM) before it started; resume "
                    "with --resume")
            return stages[i + 1].name
    if run.resume and distributed.is_writer():  # a fresh run wrote it when it opened
        write_atomically(run.out / "config.json", config_json(run.config))
    return None


def _stage_config(run: Run, stage: Stage) -> Config:
    """The run config with the stage's algorithm's settings and then its own applied."""
    settings = dict(algorithms.get(stage.algorithm).settings if stage.algorithm else ())
    settings.update(stage.settings)
    return derive(run.config, settings) if settings else run.config


# ----------------------------------------------------------------------------------------------
# Training stages.

def written_by_one(make: Callable, name: str):
    """`make()` on process 0 first (it writes files the others then read), then on the others
    after a barrier: generated data, TFDS builds. One process: just `make()`."""
    if distributed.is_writer():
        result = make()
    distributed.barrier(name)
    if not distributed.is_writer():
        result = make()
    return result


def stage_batches(run: Run, stage: Stage, config: Config, mesh=None):
    """The stage's endless, resumable batch iterator over its data file. On a mesh that spans
    several processes each process reads only its rows of every batch and the iterator yields
    global arrays (`sharding.HostShare`)."""
    record, d = algorithms.get(stage.algorithm), config.data
    path = run.file(stage.data, stage)
    source, _ = written_by_one(functools.partial(
        build_dataset, record.data, path, run.out / "tfds", d.on_bad_row,
        log=run.log if distributed.is_writer() else None), "dataset")
    example = record.example(run.encoder, source, config)
    rows, layout = record.batch_size(config), None
    if mesh is not None and jax.process_count() > 1:
        layout = sharding.rows_layout(mesh, rows)
    loader = make_loader(source, example, rows, seed=stream_seed(d.shuffle_seed, stage.name),
                         rows=None if layout is None else sharding.host_rows(layout, rows),
                         pack_length=d.row_length if d.pack and record.packs_examples else 0)
    return loader if layout is None else sharding.HostShare(loader, layout, rows)


def stage_reward(run: Run, stage: Stage, config: Config) -> Reward:
    """What a PPO / GRPO stage optimises: `reward.functions` (a weighted sum of `model`,
    `annotator` and host functions), or by default the stage's own choice (its reward model,
    or the annotator when no reward model is given)."""
    model = stage.reward
    if model in (ANNOTATOR, ANNOTATOR_OR_MODEL):
        model = REWARD_MODEL_PATH
    spec = parse_reward_functions(config.reward.functions)
    if not spec:
        default = stage.reward
        if default == ANNOTATOR_OR_MODEL:
            default = REWARD_MODEL_PATH if config.reward.model_path else ANNOTATOR
        spec = [("annotator" if default == ANNOTATOR else "model", 1.0)]
    parts = []
    for name, weight in spec:
        if name == "annotator":
            part = judging.annotator_reward(run, config)
        elif name == "model":
            if model == REWARD_MODEL_PATH and not config.reward.model_path:
                raise ValueError("reward.functions names 'model' but reward.model_path is empty")
            part = Reward.from_model(*run.weights(model, stage))
        else:
            part = import_host_reward(name, functools.partial(decode_texts, run.tokenizer))
        parts.append((weight, part))
    return Reward.weighted(parts)


def data_digest(path: Path) -> str:
    """What a resumed stage checks its data against: `file_digest` of a data file; of a
    `datasets` save_to_disk folder, SHA-256 over its files' names and digests."""
    if not path.is_dir():
        return file_digest(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_digest(file)}\n".encode())
    return digest.hexdigest()


def run_train(run: Run, stage: Stage, config: Config) -> bool:
    model_cfg, params = initial_weights(stage.algorithm, config, *run.weights(stage.start, stage))
    setup = make_setup(stage.algorithm, config, model_cfg, params, name=stage.name)
    batches = stage_batches(run, stage, config, setup.mesh)
    rollout = {}
    if setup.algorithm.rollout is not None:
        rollout = dict(reward=stage_reward(run, stage, config), eos_token_id=run.encoder.eos_id,
                       pad_token_id=run.encoder.pad_id, tokenizer=run.tokenizer)
    inputs = {stage.data: data_digest(run.file(stage.data, stage))}
    result = loops.train(setup, config, batches, out_dir=run.out, resume=run.resume,
                         log=run.log, train=run.train, inputs=inputs, **rollout)
    if result.preempted:
        return False
    if setup.algorithm.logs_tokenization and run.train:
        run.log(f"[{stage.name}] {run.encoder.report()}")
    run.models[stage.produces] = setup.exported(result.state.params)
    return True


# ----------------------------------------------------------------------------------------------
# Export (rankings and evaluation: `jrlhf.judging`).


def run_export(run: Run, stage: Stage, config: Config) -> bool:
    """The weights as a Hugging Face folder: gathered from every process's devices, written by
    process 0."""
    cfg, params = run.weights(stage.start, stage)
    params = jax.tree.map(sharding.to_host, params)
    target = None
    if distributed.is_writer():
        target = str(models.save_pretrained(run.out / stage.folder, cfg, params,
                                            tokenizer=run.tokenizer))
    target = distributed.gather_json("export", target)[0]
    run.results[stage.name] = target
    run.log(f"[{stage.name}] exported {target}")
    return True


# stage kind -> runner `(run, stage, config) -> bool` (False: preempted, the run stops)
RUNNERS = {"train": run_train, "rank": judging.run_rank, "evaluate": judging.run_evaluate,
           "export": run_export}


# ----------------------------------------------------------------------------------------------
# The runs: stage lists and their summaries.


def command_stage(algorithm: str) -> Stage:
    """`jrlhf <algorithm>`: its one training stage, from the base model on the data file its
    record reads, against the reward its record names (the CLI adds an export)."""
    record = algorithms.get(algorithm)
    return Stage(record.name, "train", record.name, data=record.data, start="base",
                 reward=record.reward_source, produces=record.name)


def pipeline_stages(config: Config) -> list[Stage]:
    """SFT → rankings by the annotator (unless `data.rankings_path` is given) → reward model →
    PPO → held-out evaluation → export of the policy and the reward model."""
    rank = [] if config.data.rankings_path else [
        Stage("rankings", "rank", start="sft", produces="rankings", folder="data")]
    return [
        Stage("sft", "train", "sft", data="sft", start="base", produces="sft"),
        *rank,
        Stage("reward", "train", "reward", data="rankings", start="sft", produces="reward_model"),
        Stage("ppo", "train", "ppo", data="prompts", start="sft", reward="reward_model",
              produces="ppo"),
        Stage("eval", "evaluate", data="eval_prompts", start="sft", compare=("sft", "ppo")),
        Stage("export", "export", start="ppo", folder="export"),
        Stage("reward/export", "export", start="reward_model", folder="reward/export"),
    ]


def iterate_stages(config: Config) -> list[Stage]:
    """SFT once (version v0), then `iterate.rounds` rounds of: sample from the current and
    earlier versions → the annotator ranks (added to all rankings so far, and to
    `data.rankings_path` if given) → the reward model is refreshed on them → PPO from the
    current version → export → a leaderboard of all versions."""
    stages = [Stage("sft", "train", "sft", data="sft", start="base", produces="v0"),
              Stage("versions/v0", "export", start="v0", folder="versions/v0")]
    rankings = "rankings" if config.data.rankings_path else ""
    reward_model = "v0"
    for r in range(1, config.iterate.rounds + 1):
        versions = tuple(f"v{i}" for i in range(r + 1))
        stages += [
            Stage(f"round{r}/rankings", "rank", data=rankings, start=f"v{r - 1}",
                  compare=versions[:r - 1], produces=f"rankings{r}", folder=f"round{r}"),
            Stage(f"round{r}/reward", "train", "reward", data=f"rankings{r}", start=reward_model,
                  produces=f"reward{r}"),
            Stage(f"round{r}/ppo", "train", "ppo", data="prompts", start=f"v{r - 1}",
                  reward=f"reward{r}", produces=f"v{r}"),
            Stage(f"versions/v{r}", "export", start=f"v{r}", folder=f"versions/v{r}"),
            Stage(f"round{r}/eval", "evaluate", data="eval_prompts", start="v0",
                  compare=versions, folder=f"round{r}"),
        ]
        rankings, reward_model = f"rankings{r}", f"reward{r}"
    return stages


def run_pipeline(config: Config, *, resume: bool = False, log=print) -> dict:
    """The end-to-end pipeline (`pipeline_stages`); returns its summary (also summary.json),
    or `{"preempted": stage}`."""
    started = time.perf_counter()
    with open_run(config, resume=resume, log=log) as run:
        _remove_summary(run)
        preempted = run_stages(run, pipeline_stages(config))
        if preempted:
            return {"preempted": preempted}
        return _pipeline_summary(run, started)


def _remove_summary(run: Run) -> None:
    """summary.json is written when a run finishes; a run starting in the folder first removes
    the previous one, so that it never lies beside outputs it does not describe (until this
    run finishes, or after a kill, there is none)."""
    if distributed.is_writer():
        (run.out / "summary.json").unlink(missing_ok=True)
        sync_folder(run.out)


def _pipeline_summary(run: Run, started: float) -> dict:
    """summary.json, the PNG report and the closing lines of `jrlhf pipeline`."""
    config, log = run.config, run.log
    out, ev = run.out, run.results["eval"]
    scores, kls, board = ev["scores"], ev["kls"], ev["board"]
    png = out / "report.png"
    if distributed.is_writer():
        write_report(out / "metrics.jsonl", png, title="jrlhf pipeline", notes=[
            f"held-out annotator score: SFT {scores['sft']:.2f} -> PPO {scores['ppo']:.2f}",
            f"KL(PPO || SFT) {kls['ppo']:.2f} nats/response"])
        wandb_log.log_image(out, "report", png)
    summary = {
        "score_sft": scores["sft"], "score_ppo": scores["ppo"], "kl_ppo_to_sft": kls["ppo"],
        "leaderboard": [{k: r[k] for k in ("name", "rating", "ci", "wins", "losses", "ties")}
                        for r in board],
        "checkpoints": str(out / "ppo" / "checkpoints"), "report": str(png),
        "export": run.results["export"], "reward_model": run.results["reward/export"],
        "seconds": time.perf_counter() - started,
    }
    if distributed.is_writer():
        write_atomically(out / "summary.json", json.dumps(summary, indent=2))
    distributed.barrier("summary")
    log("\n" + "\n".join([
        "== jrlhf pipeline done ==",
        f"held-out annotator score ({config.data.num_eval_prompts} prompts): SFT "
        f"{scores['sft']:.3f} → PPO {scores['ppo']:.3f}",
        f"KL(PPO ‖ SFT reference): {kls['ppo']:.3f} nats per response",
        elo.format_leaderboard(board),
        f"checkpoints:  {summary['checkpoints']}",
        f"report:       {png}",
        f"exported HF:  {summary['export']}  (transformers.AutoModelForCausalLM.from_pretrained)",
        f"reward model: {summary['reward_model']}",
        f"time:         {summary['seconds']:.0f} s",
    ]))
    return summary


def run_iterate(config: Config, *, resume: bool = False, log=print) -> dict:
    """Iterative RLHF (`iterate_stages`); returns its summary (also summary.json), or
    `{"preempted": stage}`."""
    with open_run(config, resume=resume, log=log) as run:
        _remove_summary(run)
        preempted = run_stages(run, iterate_stages(config))
        if preempted:
            return {"preempted": preempted}
        rounds = range(1, config.iterate.rounds + 1)
        summary = {
            "versions": [f"v{r}" for r in range(config.iterate.rounds + 1)],
            "leaderboards": [[{k: row[k] for k in ("name", "rating", "wins", "losses", "ties")}
                              for row in run.results[f"round{r}/eval"]["board"]]
                             for r in rounds],
            "rankings": str(run.files[f"rankings{config.iterate.rounds}"]) if rounds else "",
        }
        if distributed.is_writer():  # still holding the folder
            write_atomically(run.out / "summary.json", json.dumps(summary, indent=2))
        distributed.barrier("summary")
    return summary
