"""Rankings and held-out evaluation by the task's annotator: the `rank` and `evaluate` stages.

`run_rank` samples K responses per ranking prompt (the current policy's, earlier versions'
mixed in) and has the annotator rank them; `run_evaluate` samples each compared policy on the
held-out prompts, scores it with the annotator, measures its KL to a reference (the losses'
jitted `token_outputs` path, no `[B, N, V]` logits) and writes pairwise judgements and a
Bradley-Terry / Elo leaderboard. Both are runners of `jrlhf.stages.run_stages`:
`(run, stage, config) -> bool`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from jrlhf import distributed, elo, models, sharding, wandb_log
from jrlhf.config import Config
from jrlhf.data import Encoder, load_rows, ranks_from_scores
from jrlhf.envs import ended_by
from jrlhf.report import (EVALUATION_MARKER, IncompleteEvaluation, evaluation_files,
                          write_atomically, write_evaluation)
from jrlhf.rewards import Reward
from jrlhf.rng import stream_key
from jrlhf.rollouts import decode_texts, play_batched, sample_batched, task_environment
from jrlhf.tasks import TASKS

if TYPE_CHECKING:  # the runner's types; stages imports this module
    from jrlhf.stages import Run, Stage


def annotator_reward(run: Run, config: Config) -> Reward:
    """The task's annotator as a host reward over decoded (prompt, response) texts: what the
    ranking stage ranks by and evaluation scores with."""
    task = TASKS[config.data.task]
    return Reward.host(task.score_texts, functools.partial(decode_texts, run.tokenizer),
                       name=f"{config.data.task} annotator")


def encode_prompts(encoder: Encoder, path) -> tuple[list[str], np.ndarray, np.ndarray]:
    rows, _ = load_rows(path, "prompts")
    examples = [encoder.prompt_example(r) for r in rows]
    return ([r["prompt"] for r in rows], np.stack([e["input_ids"] for e in examples]),
            np.stack([e["attention_mask"] for e in examples]))


def rankings_jsonl(path: Path, on_bad_row: str = "error") -> str:
    """The rankings that new ones are appended to, as JSONL text: a `.jsonl` file's own text;
    any other source's (`.gz`, Parquet, a `datasets` folder) validated rows, written as rows
    that read back the same (a chat prompt as its `messages`)."""
    if path.is_file() and path.name.lower().endswith(".jsonl"):
        return path.read_text()
    rows, _ = load_rows(path, "rankings", on_bad_row)
    prompts = [{"messages": json.loads(r["messages"])} if r["messages"] else
               {"prompt": r["prompt"]} for r in rows]
    return "".join(json.dumps({**p, "responses": r["responses"], "ranks": r["ranks"]}) + "\n"
                   for p, r in zip(prompts, rows))


def run_rank(run: Run, stage: Stage, config: Config) -> bool:
    """K responses per ranking prompt (the current policy's, and earlier versions' mixed in),
    ranked by the annotator; written with the rankings of `stage.data` before them."""
    path = run.out / stage.folder / "rankings.jsonl"
    if not (run.resume and path.exists()):
        d = config.data
        prompts, ids, mask = encode_prompts(run.encoder, run.file("prompts", stage))
        n, K = min(d.num_ranking_prompts, len(prompts)), d.responses_per_prompt
        earlier = list(stage.compare)
        n_old = int(round(K * config.iterate.earlier_versions_share)) if earlier else 0
        sources = [stage.start] * (K - n_old) + [earlier[j % len(earlier)] for j in range(n_old)]
        sources = sorted(sources, key=sources.index)  # a version's responses side by side
        key = stream_key(config.run.seed, stage.name, "sample")
        texts = [[] for _ in range(n)]  # texts[i]: prompt i's K responses, as in `sources`
        for j, name in enumerate(dict.fromkeys(sources)):
            # A version's share of each prompt's K responses comes from one shared prefill.
            share = sources.count(name)
            sampled = decode_texts(run.tokenizer, *sample_batched(
                *run.weights(name, stage), ids[:n], mask[:n], jax.random.fold_in(key, j),
                config.rollout, eos_token_id=run.encoder.eos_id, pad_token_id=run.encoder.pad_id,
                num_samples=share))
            for i in range(n):
                texts[i] += sampled[i * share:(i + 1) * share]
        judge = annotator_reward(run, config)
        rows = []
        for i in range(n):
            responses = [text if text.strip() else "(empty)" for text in texts[i]]
            ranks = ranks_from_scores(judge.host_scores([prompts[i]] * K, responses).tolist())
            if len(set(ranks)) > 1:  # all-tie groups carry no preference
                rows.append({"prompt": prompts[i], "responses": responses, "ranks": ranks,
                             "sources": sources})
        before = rankings_jsonl(run.file(stage.data, stage), d.on_bad_row) if stage.data else ""
        if distributed.is_writer():
            write_atomically(path, before + "".join(json.dumps(r) + "\n" for r in rows))
        distributed.barrier("rankings")
        run.log(f"[{stage.name}] {len(rows)} of {n} prompts ranked by the {d.task} annotator "
                f"({K} responses each) → {path}")
    run.files[stage.produces] = path
    return True


def sequence_kl(cfg, params, ref_cfg, ref_params, ids, mask, tokens, tmask, temperature,
                attention=None):
    """Mean over rows of the summed per-token log-ratio log π(y) − log π_ref(y) of sampled
    responses `tokens [B, N]` (mask `tmask`) after prompts `ids [B, P]`. `attention [B, N]`:
    the response region's attention mask when it differs from `tmask` (an episode's
    observation tokens: attended to, not the policy's, so not summed)."""
    full = np.concatenate([np.asarray(ids), np.asarray(tokens)], 1)
    fmask = np.concatenate([np.asarray(mask), np.asarray(
        tmask if attention is None else attention)], 1)
    tokens, tmask = np.asarray(tokens), np.asarray(tmask)
    mesh = sharding.mesh_of(params)
    if mesh is not None:  # the rows split over the mesh the weights lie on
        full, fmask, tokens, tmask = sharding.put((full, fmask, tokens, tmask),
                                                  sharding.rows_layout(mesh, len(full)))
    N = tokens.shape[1]
    kl = (_token_outputs(cfg, params, full, fmask, last=N, temperature=temperature).logprobs
          - _token_outputs(ref_cfg, ref_params, full, fmask, last=N,
                           temperature=temperature).logprobs) * tmask
    return float(jnp.mean(jnp.sum(kl, axis=1)))


# The losses' log-probs (no [B, N, V] logits), jitted: op by op, every operation on a
# multi-host array would be its own collective program.
_token_outputs = jax.jit(models.token_outputs, static_argnames=("cfg", "last", "temperature"))


def run_evaluate(run: Run, stage: Stage, config: Config) -> bool:
    """Annotator score of each policy in `stage.compare` on held-out prompts, KL of each to
    `stage.start`, pairwise judgements and a Bradley-Terry / Elo leaderboard."""
    out = run.out / stage.folder
    prompts, ids, mask = encode_prompts(run.encoder, run.file(stage.data, stage))
    key = stream_key(config.run.seed, stage.name, "sample")
    ref_cfg, ref_params = run.weights(stage.start, stage)
    texts, row_scores, scores, kls, ends = {}, {}, {}, {}, {}
    play = episode_player(run, config) if config.env.enabled else None
    judge = None if play else annotator_reward(run, config)
    for name in stage.compare:
        cfg, params = run.weights(name, stage)
        attention = None
        if play:  # an episode per prompt, scored by its environment (the summed reward)
            episodes = play(cfg, params, ids, mask, key)
            tokens = episodes.batch["input_ids"][:, ids.shape[1]:]
            tmask = episodes.batch["response_mask"]
            attention = episodes.batch["attention_mask"][:, ids.shape[1]:]
            texts[name] = decode_texts(run.tokenizer, tokens, attention)  # with observations
            row_scores[name] = episodes.batch["scores"]
            ends[name] = episodes.counts
        else:
            tokens, tmask = sample_batched(cfg, params, ids, mask, key, config.rollout,
                                           eos_token_id=run.encoder.eos_id,
                                           pad_token_id=run.encoder.pad_id)
            texts[name] = decode_texts(run.tokenizer, tokens, tmask)
            row_scores[name] = judge.host_scores(prompts, texts[name])
        scores[name] = float(np.mean(row_scores[name]))
        kls[name] = sequence_kl(cfg, params, ref_cfg, ref_params, ids, mask, tokens, tmask,
                                config.rollout.temperature, attention)
    names = list(stage.compare)
    games = [(a, b, _judged(row_scores[a][i], row_scores[b][i])) for i in range(len(prompts))
             for x, a in enumerate(names) for b in names[x + 1:]]
    board = elo.leaderboard(games, samples=200, seed=config.run.seed)
    if distributed.is_writer():
        samples = [{"prompt": p, **{n: texts[n][i] for n in names}} for i, p in enumerate(prompts)]
        try:
            evaluation_files(out)
        except IncompleteEvaluation as err:
            if (out / EVALUATION_MARKER).exists():
                run.log(f"[{stage.name}] replacing an incomplete evaluation: {err}")
        write_evaluation(out, stage.name, {
            "comparisons.jsonl": "".join(json.dumps({"a": a, "b": b, "winner": w}) + "\n"
                                         for a, b, w in games),
            "leaderboard.txt": elo.format_leaderboard(board) + "\n",
            "samples.jsonl": "".join(json.dumps(row) + "\n" for row in samples)})
        wandb_log.log_table(run.out, f"{stage.name}/samples", samples)
    distributed.barrier("evaluate")
    run.results[stage.name] = {"scores": scores, "kls": kls, "board": board}
    if ends:
        run.results[stage.name]["episode_ends"] = ends
    what = "episode rewards" if play else "annotator scores"
    run.log(f"[{stage.name}] held-out {what} ({len(prompts)} prompts): "
            + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()) + "\n"
            + "".join(f"[{stage.name}] {k}: {v['episodes']} episodes, {v['turns']} policy "
                      f"turns; ended by {ended_by(v)}\n"
                      for k, v in ends.items())
            + elo.format_leaderboard(board))
    return True


def episode_player(run: Run, config: Config):
    """`play(cfg, params, ids, mask, key) -> jrlhf.envs.EpisodeBatch`: one episode per
    held-out prompt against `data.task`'s environment, with the `env` budgets and the rollout's
    sampling settings (`rollouts.play_batched`)."""
    environment = task_environment(config)

    def play(cfg, params, ids, mask, key):
        return play_batched(cfg, params, ids, mask, key, config.rollout, config.env,
                            tokenizer=run.tokenizer, environment=environment,
                            eos_token_id=run.encoder.eos_id, pad_token_id=run.encoder.pad_id,
                            chat_template=config.data.chat_template)

    return play


def _judged(score_a: float, score_b: float) -> str:
    """A pairwise judgement from two scores: "a", "b" or "tie"."""
    return "a" if score_a > score_b else "b" if score_b > score_a else "tie"
