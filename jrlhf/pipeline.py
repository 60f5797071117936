"""The end-to-end RLHF pipeline: SFT → reward model from rankings → PPO → evaluation.

Every stage checkpoints under `run.out_dir/<stage>/`; `resume=True` skips finished stages
(their final checkpoint is restored) and continues an interrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jrlhf import elo, lora, models, rl
from jrlhf.config import Config, save_config
from jrlhf.data import Encoder, build_dataset, make_loader
from jrlhf.loops import train_ppo, train_reward, train_sft
from jrlhf.models.config import ModelConfig
from jrlhf.report import write_report
from jrlhf.sampling import generate
from jrlhf.steps.ppo import reward_model_fn
from jrlhf.tasks import reviews

TASKS = {"reviews": reviews}


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    if source in ("smollm2", ""):
        return models.load_gguf_tokenizer(models.smollm2_gguf_path())
    if source.endswith(".gguf"):
        return models.load_gguf_tokenizer(source)
    return AutoTokenizer.from_pretrained(source, local_files_only=True)


def load_policy(config: Config):
    """`(ModelConfig, params, tokenizer)` for `config.model`."""
    m = config.model
    if m.source == "random":
        if m.arch is None:
            raise ValueError("model.source='random' needs model.arch (a ModelConfig)")
        cfg = dataclasses.replace(m.arch, dtype=m.dtype)
        params = jax.tree.map(np.asarray, models.init_params(cfg, config.run.seed))
        return cfg, params, load_tokenizer(m.tokenizer or "smollm2")
    if m.source == "smollm2" or m.source.endswith(".gguf"):
        path = models.smollm2_gguf_path() if m.source == "smollm2" else m.source
        cfg, params, tok = models.load_gguf(path)
    else:
        cfg, params = models.load_pretrained(m.source)
        tok = None
    tok = load_tokenizer(m.tokenizer) if m.tokenizer else tok or load_tokenizer(m.source)
    return dataclasses.replace(cfg, dtype=m.dtype), params, tok


def reward_model_init(policy_cfg: ModelConfig, params, num_layers: int):
    """A reward model from the policy's first `num_layers` layers plus a zero scalar head."""
    n = num_layers or policy_cfg.num_layers
    if n > policy_cfg.num_layers:
        raise ValueError(f"reward.num_layers={n} exceeds the policy's {policy_cfg.num_layers}")
    cfg = dataclasses.replace(policy_cfg, num_layers=n, lm_head=False, scalar_head=True)
    rm = {k: v for k, v in params.items() if k not in ("lm_head", "score", "layers")}
    rm["layers"] = {i: params["layers"][i] for i in range(n)}
    rm["score"] = {"kernel": np.zeros((cfg.hidden_size, 1), np.float32)}
    return cfg, jax.tree.map(jnp.array, rm)


def decode(tokenizer, tokens, mask) -> list[str]:
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    return [tokenizer.decode(t[m > 0], skip_special_tokens=True) for t, m in zip(tokens, mask)]


def sample_texts(cfg, params, tokenizer, prompt_ids, prompt_mask, key, *, max_new_tokens,
                 temperature, batch_size):
    """Sample one response per prompt row, in batches; returns (texts, tokens, masks)."""
    texts, toks, masks = [], [], []
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    for start in range(0, len(prompt_ids), batch_size):
        ids = jnp.asarray(prompt_ids[start:start + batch_size])
        mask = jnp.asarray(prompt_mask[start:start + batch_size])
        out = generate(cfg, params, ids, mask, jax.random.fold_in(key, start),
                       max_new_tokens=max_new_tokens, temperature=temperature,
                       eos_token_id=eos, pad_token_id=pad)
        texts += decode(tokenizer, out.tokens, out.mask)
        toks.append(np.asarray(out.tokens))
        masks.append(np.asarray(out.mask))
    return texts, np.concatenate(toks), np.concatenate(masks)


def encode_prompts(encoder: Encoder, path) -> tuple[list[str], np.ndarray, np.ndarray]:
    from jrlhf.data import load_rows

    rows, _ = load_rows(path, "prompts")
    examples = [encoder.prompt_example(r) for r in rows]
    return ([r["prompt"] for r in rows], np.stack([e["input_ids"] for e in examples]),
            np.stack([e["attention_mask"] for e in examples]))


def write_rankings(path: Path, config: Config, task, cfg, params, encoder: Encoder, log):
    """The annotator ranks K sampled responses per prompt → a rankings JSONL file."""
    d = config.data
    prompts, ids, mask = encode_prompts(encoder, d.prompts_path or path.parent / "prompts.jsonl")
    n = min(d.num_ranking_prompts, len(prompts))
    K = d.responses_per_prompt
    rep_ids, rep_mask = np.repeat(ids[:n], K, axis=0), np.repeat(mask[:n], K, axis=0)
    texts, _, _ = sample_texts(cfg, params, encoder.tokenizer, rep_ids, rep_mask,
                               jax.random.key(config.run.seed + 7),
                               max_new_tokens=config.ppo.max_new_tokens,
                               temperature=config.ppo.temperature,
                               batch_size=config.ppo.rollout_batch_size)
    rows = []
    for i in range(n):
        responses = [t if t.strip() else "(empty)" for t in texts[i * K:(i + 1) * K]]
        ranks = task.rank(responses)
        if len(set(ranks)) > 1:  # all-tie groups carry no preference
            rows.append({"prompt": prompts[i], "responses": responses, "ranks": ranks})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    log(f"[rankings] {len(rows)} of {n} prompts ranked by the {config.data.task} annotator "
        f"({K} responses each) → {path}")
    return path


def evaluate(config: Config, task, tokenizer, encoder, policies: dict, eval_path, out: Path,
             ref_cfg, ref_params):
    """Annotator score of each policy on held-out prompts, KL of each to `ref`, Elo table."""
    prompts, ids, mask = encode_prompts(encoder, eval_path)
    key = jax.random.key(config.run.seed + 11)
    texts, scores, kls = {}, {}, {}
    temperature = config.ppo.temperature
    for name, (cfg, params) in policies.items():
        t, toks, tmask = sample_texts(cfg, params, tokenizer, ids, mask, key,
                                      max_new_tokens=config.ppo.max_new_tokens,
                                      temperature=temperature,
                                      batch_size=config.ppo.rollout_batch_size)
        texts[name] = t
        scores[name] = float(np.mean([task.sentiment_score(x) for x in t]))
        full = jnp.concatenate([jnp.asarray(ids), jnp.asarray(toks)], 1)
        fmask = jnp.concatenate([jnp.asarray(mask), jnp.asarray(tmask)], 1)
        N = toks.shape[1]

        def logp(c, p):
            logits = models.forward(c, p, full, fmask, last=N) / temperature
            return rl.logprobs_from_logits(logits, jnp.asarray(toks))

        kl = (logp(cfg, params) - logp(ref_cfg, ref_params)) * tmask
        kls[name] = float(jnp.mean(jnp.sum(kl, axis=1)))
    names = list(policies)
    games = []
    for i in range(len(prompts)):
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                games.append((names[a], names[b],
                              task.compare(texts[names[a]][i], texts[names[b]][i])))
    with open(out / "comparisons.jsonl", "w") as f:
        for a, b, outcome in games:
            f.write(json.dumps({"a": a, "b": b, "winner": outcome}) + "\n")
    board = elo.leaderboard(games, samples=200, seed=config.run.seed)
    (out / "leaderboard.txt").write_text(elo.format_leaderboard(board) + "\n")
    with open(out / "samples.jsonl", "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"prompt": p, **{n: texts[n][i] for n in names}}) + "\n")
    return scores, kls, board


def task_files(config: Config, out: Path) -> dict[str, Path]:
    """Data files: the configured paths, or the built-in task's generated files for empty ones."""
    d = config.data
    files = reviews.write_task_files(out / "data", num_sft=d.num_sft_examples,
                                     num_prompts=max(d.num_ranking_prompts, 64),
                                     num_eval=d.num_eval_prompts, seed=config.run.seed)
    return {"sft": Path(d.sft_path) if d.sft_path else files["sft"],
            "prompts": Path(d.prompts_path) if d.prompts_path else files["prompts"],
            "eval_prompts": Path(d.eval_prompts_path) if d.eval_prompts_path
            else files["eval_prompts"]}


def make_encoder(config: Config, tokenizer) -> Encoder:
    d = config.data
    return Encoder(tokenizer, d.max_prompt_length, d.max_response_length, d.chat_template)


def sft_stage(config: Config, policy_cfg, params, encoder: Encoder, sft_path, out: Path, *,
              resume=False, train=True, log=print):
    """SFT on `sft_path`; returns `(merged SFT params, StageResult)`."""
    d = config.data
    source, _ = build_dataset("sft", sft_path, out / "tfds", d.on_bad_row, log=log)
    batches = make_loader(source, encoder.sft_example, config.sft.batch_size, seed=d.shuffle_seed)
    result = train_sft(config, policy_cfg, params, batches, out_dir=out, resume=resume, log=log,
                       train=train)
    if train:
        log(f"[sft] {encoder.report()}")
    return lora.merge_lora(result.state.params, config.lora.scale), result


def reward_stage(config: Config, rm_cfg, rm_params, encoder: Encoder, rankings_path, out: Path,
                 *, resume=False, train=True, log=print):
    """Reward model on a rankings file; returns the StageResult (params in `.state.params`)."""
    d = config.data
    source, _ = build_dataset("rankings", rankings_path, out / "tfds", d.on_bad_row, log=log)
    K = max(len(source[i]["ranks"]) for i in range(len(source)))
    batches = make_loader(source, functools.partial(encoder.ranking_example, max_responses=K),
                          config.reward.batch_size, seed=d.shuffle_seed + 1)
    return train_reward(config, rm_cfg, rm_params, batches, out_dir=out, resume=resume, log=log,
                        train=train)


def preference_stage(config: Config, policy_cfg, params, encoder: Encoder, rankings_path,
                     out: Path, *, orpo=False, resume=False, train=True, log=print):
    """DPO / ORPO on a rankings or pairwise file; returns `(merged params, StageResult)`."""
    from jrlhf.loops import train_preference

    d = config.data
    source, _ = build_dataset("rankings", rankings_path, out / "tfds", d.on_bad_row, log=log)
    batches = make_loader(source, encoder.preference_pair, config.dpo.batch_size,
                          seed=d.shuffle_seed + 3)
    result = train_preference(config, policy_cfg, params, batches, orpo=orpo, out_dir=out,
                              resume=resume, log=log, train=train)
    return lora.merge_lora(result.state.params, config.lora.scale), result


def grpo_stage(config: Config, policy_cfg, params, encoder: Encoder, prompts_path, out: Path, *,
               rm=None, resume=False, train=True, log=print):
    """GRPO / RLOO (`config.grpo.estimator`) against a reward model `(rm_cfg, rm_params)`, or
    without one against the task's annotator on the decoded responses. Returns
    `(merged params, StageResult)`."""
    from jrlhf.loops import train_grpo

    d = config.data
    source, _ = build_dataset("prompts", prompts_path, out / "tfds", d.on_bad_row, log=log)
    batches = make_loader(source, encoder.prompt_example, config.grpo.prompts_per_iteration,
                          seed=d.shuffle_seed + 4)
    kwargs = dict(reward_fn=reward_model_fn(rm[0]), reward_params=rm[1]) if rm else dict(
        text_reward=lambda texts: [TASKS[d.task].sentiment_score(t) for t in texts],
        decode=functools.partial(decode, encoder.tokenizer))
    result = train_grpo(config, policy=(policy_cfg, params), prompt_batches=batches,
                        eos_token_id=encoder.eos_id, pad_token_id=encoder.pad_id, out_dir=out,
                        resume=resume, log=log, train=train, **kwargs)
    return lora.merge_lora(result.state.params, config.lora.scale), result


def ppo_stage(config: Config, policy_cfg, params, rm_cfg, rm_params, encoder: Encoder,
              prompts_path, out: Path, *, resume=False, train=True, log=print):
    """PPO against a reward model; returns `(final policy config, merged params, PPOResult)`."""
    d = config.data
    source, _ = build_dataset("prompts", prompts_path, out / "tfds", d.on_bad_row, log=log)
    batches = make_loader(source, encoder.prompt_example, config.ppo.rollout_batch_size,
                          seed=d.shuffle_seed + 2)
    result = train_ppo(config, policy=(policy_cfg, params), reward_fn=reward_model_fn(rm_cfg),
                       reward_params=rm_params, prompt_batches=batches,
                       eos_token_id=encoder.eos_id, pad_token_id=encoder.pad_id, out_dir=out,
                       resume=resume, log=log, train=train)
    final = {k: v for k, v in lora.merge_lora(result.state.params["policy"],
                                              config.lora.scale).items() if k != "score"}
    return dataclasses.replace(result.policy_cfg, scalar_head=False), final, result


def run_pipeline(config: Config, *, resume: bool = False, log=print) -> dict:
    """SFT → rankings by the annotator → reward model → PPO → held-out evaluation → export."""
    started = time.perf_counter()
    out = Path(config.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.json")
    task = TASKS[config.data.task]
    d = config.data
    files = task_files(config, out)
    policy_cfg, base_params, tokenizer = load_policy(config)
    log(f"[model] {config.model.source}: {policy_cfg.family}, {policy_cfg.num_layers} layers, "
        f"{policy_cfg.num_params / 1e6:.1f}M parameters")
    encoder = make_encoder(config, tokenizer)

    sft_params, sft = sft_stage(config, policy_cfg, base_params, encoder, files["sft"], out,
                                resume=resume, log=log)
    if sft.preempted:
        return {"preempted": "sft"}

    rankings_path = Path(d.rankings_path) if d.rankings_path else out / "data" / "rankings.jsonl"
    if not d.rankings_path and not (resume and rankings_path.exists()):
        write_rankings(rankings_path, config, task, policy_cfg, sft_params, encoder, log)
    rm_cfg, rm_init = reward_model_init(policy_cfg, sft_params, config.reward.num_layers)
    rm = reward_stage(config, rm_cfg, rm_init, encoder, rankings_path, out, resume=resume,
                      log=log)
    if rm.preempted:
        return {"preempted": "reward"}

    final_cfg, ppo_params, ppo = ppo_stage(config, policy_cfg, sft_params, rm_cfg,
                                           rm.state.params, encoder, files["prompts"], out,
                                           resume=resume, log=log)
    if ppo.preempted:
        return {"preempted": "ppo"}

    scores, kls, board = evaluate(config, task, tokenizer, encoder,
                                  {"sft": (policy_cfg, sft_params), "ppo": (final_cfg, ppo_params)},
                                  files["eval_prompts"], out, policy_cfg, sft_params)
    export_dir = models.save_pretrained(out / "export", final_cfg, ppo_params, tokenizer=tokenizer)
    rm_dir = models.save_pretrained(out / "reward" / "export", rm_cfg, rm.state.params,
                                    tokenizer=tokenizer)
    notes = [f"held-out annotator score: SFT {scores['sft']:.2f} -> PPO {scores['ppo']:.2f}",
             f"KL(PPO || SFT) {kls['ppo']:.2f} nats/response"]
    png = write_report(out / "metrics.jsonl", out / "report.png", title="jrlhf pipeline",
                       notes=notes)
    summary = {
        "score_sft": scores["sft"], "score_ppo": scores["ppo"], "kl_ppo_to_sft": kls["ppo"],
        "leaderboard": [{k: r[k] for k in ("name", "rating", "ci", "wins", "losses", "ties")}
                        for r in board],
        "checkpoints": str(out / "ppo" / "checkpoints"), "report": str(png),
        "export": str(export_dir), "reward_model": str(rm_dir),
        "seconds": time.perf_counter() - started,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log("\n" + "\n".join([
        "== jrlhf pipeline done ==",
        f"held-out annotator score ({d.num_eval_prompts} prompts): SFT {scores['sft']:.3f} → "
        f"PPO {scores['ppo']:.3f}",
        f"KL(PPO ‖ SFT reference): {kls['ppo']:.3f} nats per response",
        elo.format_leaderboard(board),
        f"checkpoints:  {out / 'ppo' / 'checkpoints'}",
        f"report:       {png}",
        f"exported HF:  {export_dir}  (transformers.AutoModelForCausalLM.from_pretrained)",
        f"reward model: {rm_dir}",
        f"time:         {summary['seconds']:.0f} s",
    ]))
    return summary


def _sample_for_ranking(config, policies: dict, encoder, prompts_path, round_index: int):
    """K responses per ranking prompt: the current policy's and earlier versions' mixed."""
    d = config.data
    prompts, ids, mask = encode_prompts(encoder, prompts_path)
    n, K = min(d.num_ranking_prompts, len(prompts)), d.responses_per_prompt
    names = list(policies)
    current, earlier = names[-1], names[:-1]
    n_old = int(round(K * config.iterate.earlier_versions_share)) if earlier else 0
    sources = [current] * (K - n_old) + [earlier[j % len(earlier)] for j in range(n_old)]
    texts = {}
    for j, name in enumerate(sources):
        cfg, params = policies[name]
        key = jax.random.fold_in(jax.random.key(config.run.seed + 13), round_index * 100 + j)
        texts[j], _, _ = sample_texts(cfg, params, encoder.tokenizer, ids[:n], mask[:n], key,
                                      max_new_tokens=config.ppo.max_new_tokens,
                                      temperature=config.ppo.temperature,
                                      batch_size=config.ppo.rollout_batch_size)
    return [{"prompt": prompts[i], "responses": [texts[j][i] or "(empty)" for j in range(K)],
             "sources": sources} for i in range(n)]


def run_iterate(config: Config, *, resume: bool = False, log=print) -> dict:
    """Iterative RLHF: SFT once, then `iterate.rounds` rounds of (sample from the current and
    earlier policy versions → the annotator ranks (or `data.rankings_path` adds human ranks) →
    the reward model is refreshed on all rankings so far → PPO from the current policy), with
    every version exported and a Bradley-Terry/Elo leaderboard of all versions after each
    round."""
    out = Path(config.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.json")
    task = TASKS[config.data.task]
    files = task_files(config, out)
    policy_cfg, base_params, tokenizer = load_policy(config)
    encoder = make_encoder(config, tokenizer)
    sft_params, sft = sft_stage(config, policy_cfg, base_params, encoder, files["sft"], out,
                                resume=resume, log=log)
    if sft.preempted:
        return {"preempted": "sft"}
    versions = {"v0": (policy_cfg, sft_params)}
    models.save_pretrained(out / "versions" / "v0", policy_cfg, sft_params, tokenizer=tokenizer)
    all_rankings = out / "data" / "rankings_all.jsonl"
    if not resume:
        all_rankings.write_text(Path(config.data.rankings_path).read_text()
                                if config.data.rankings_path else "")
    rm_cfg, rm_params = reward_model_init(policy_cfg, sft_params, config.reward.num_layers)
    boards = []
    for r in range(1, config.iterate.rounds + 1):
        round_dir = out / f"round{r}"
        round_dir.mkdir(exist_ok=True)
        marker = round_dir / "rankings_added"
        if not marker.exists():
            rows = _sample_for_ranking(config, versions, encoder, files["prompts"], r)
            ranked = [dict(row, ranks=task.rank(row["responses"])) for row in rows]
            ranked = [row for row in ranked if len(set(row["ranks"])) > 1]
            with open(all_rankings, "a") as f:
                f.write("".join(json.dumps(row) + "\n" for row in ranked))
            marker.write_text(str(len(ranked)))
            log(f"[round {r}] {len(ranked)} new rankings (annotator: {config.data.task}); "
                f"{sum(1 for _ in open(all_rankings))} in all")
        rm = reward_stage(config, rm_cfg, rm_params, encoder, all_rankings, round_dir,
                          resume=resume, log=log)
        rm_params = rm.state.params
        cur_cfg, cur_params = versions[f"v{r - 1}"]
        final_cfg, new_params, ppo = ppo_stage(config, cur_cfg, cur_params, rm_cfg, rm_params,
                                               encoder, files["prompts"], round_dir,
                                               resume=resume, log=log)
        if rm.preempted or ppo.preempted:
            return {"preempted": f"round {r}"}
        versions[f"v{r}"] = (final_cfg, new_params)
        models.save_pretrained(out / "versions" / f"v{r}", final_cfg, new_params,
                               tokenizer=tokenizer)
        scores, kls, board = evaluate(config, task, tokenizer, encoder, versions,
                                      files["eval_prompts"], round_dir, policy_cfg, sft_params)
        boards.append(board)
        log(f"[round {r}] leaderboard of all versions (held-out annotator scores: "
            + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()) + ")\n"
            + elo.format_leaderboard(board))
    summary = {"versions": list(versions), "leaderboards": [
        [{k: row[k] for k in ("name", "rating", "wins", "losses", "ties")} for row in b]
        for b in boards], "rankings": str(all_rankings)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
