"""On-policy distillation: the student's policy gradient with per-token reverse-KL advantages
(`jrlhf.distill`), one compiled update.

Rollout batch (B rows, the layout of `jrlhf.steps.rollout`; N response columns):
  input_ids, attention_mask [B, P+N]  prompt + the student's sampled response
  response_mask    [B, N]    1 on response tokens up to and including EOS
  temperature      [B]       each row's sampling temperature: every log-prob is of logits / it
  teacher_logprobs [B, N]    the teacher's log-probs of the sampled tokens (`teacher_scores`)
  logprobs         [B, N]    the behaviour policy's (the student before this update); left out
                             for a single-pass update, whose own forward gives them
  sampler_logprobs [B, N]    optional: the sampler's own (mismatch/* metrics, `tis_cap`)
  teacher_hidden   [B, N, D_t]  with `jsd_coef` > 0 only: the teacher's final hidden states
                             predicting each response token (`teacher_scores(with_hidden=True)`)
  scores           [B]       with `task_reward_weight` > 0 (else optional, logged): a task
                             reward per row, K = `group_size` consecutive rows per prompt
  experts / sampler_experts  optional: a mixture of experts' recorded routing (as GRPO's)

The advantage of token t is A_t = teacher_logprobs − logprobs (+ w · the row's GRPO group
advantage of `scores`), fixed data; the loss is GRPO's clipped surrogate against `logprobs`
(token-mean), plus `jsd_coef` · the token-mean of `chunked_generalized_jsd(β)` between the
teacher's and the student's full next-token distributions. The teacher's LM head is an argument
of the step (`teacher_head`), never part of the trained state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jrlhf import losses, sharding
from jrlhf.config import Config, DistillConfig
from jrlhf.distill import (LMHead, check_vocabularies, chunked_generalized_jsd, load_teacher,
                           mix_task_reward, reverse_kl_advantages, teacher_scores)
from jrlhf.models import transformer as tfm
from jrlhf.models.config import ModelConfig
from jrlhf.steps.common import (accumulate_gradients, check_batch, check_factory_args,
                                forward_params, jit_step, minibatch_epochs, router_loss,
                                state_shardings, under_expert_mesh, with_state_check)
from jrlhf.steps.grpo import sequence_advantages
from jrlhf.steps.rollout import recorded_experts, sampler_mismatch

DISTILL_BATCH = ("input_ids", "attention_mask", "response_mask", "temperature",
                 "teacher_logprobs")
DISTILL_OPTIONAL = ("sampler_logprobs", "experts", "sampler_experts")


def single_pass(cfg: DistillConfig, rows: int) -> bool:
    """One optimizer step over `rows` rows with the weights that sampled them: the update's own
    forward (stop-gradient) then gives the behaviour log-probs (`steps.grpo.single_pass`)."""
    return (cfg.epochs == 1 and (cfg.minibatch_size or rows) == rows
            and cfg.grad_accum_steps == 1)


def _token_share(x, mask, counts):
    """Σ over the real tokens of `mask` of `x` / the whole minibatch's token count: a
    micro-batch's part of the minibatch's token mean (the parts sum to it)."""
    return jnp.sum(jnp.where(mask > 0, x, 0.0)) / jnp.maximum(counts["num_tokens"], 1.0)


def distill_loss(params, mb, counts, *, cfg: DistillConfig, model_cfg: ModelConfig,
                 labels=None, lora_scale: float = 0.0, teacher_head: LMHead | None = None):
    """The distillation loss of one (micro-)batch `mb` with the minibatch's `counts`
    (`losses.aggregation_counts`): every term and metric is a token sum over
    `counts["num_tokens"]`, so micro-batches sum to the minibatch's token means. `mb` holds the
    batch's keys (module docstring) plus `task_advantages [b]` with a task reward and
    `tis_weights [b, N]` with TIS. Returns `(loss, metrics)`."""
    mask = mb["response_mask"]
    N = mask.shape[1]
    fp = forward_params(params, labels, lora_scale)
    model = tfm.bind(model_cfg, fp)
    experts, replay = recorded_experts(mb)
    hidden, router = model(mb["input_ids"], mb["attention_mask"], with_router=True,
                           experts=experts, replay=replay)
    hidden = hidden[:, -N - 1:-1]
    head = LMHead.of(model_cfg, fp)
    logprobs, _ = tfm.chunked_token_logprobs(
        hidden, head.weight, head.transposed, mb["input_ids"][:, -N:], dtype=head.dtype,
        temperature=mb["temperature"], chunk_size=model_cfg.logits_chunk_size,
        softcap=head.softcap)
    weights, measured = mb.get("tis_weights"), {}
    if "logprobs" in mb:
        old = mb["logprobs"]
    else:  # single pass: this forward is the behaviour policy's
        old = jax.lax.stop_gradient(logprobs)
        measured = sampler_mismatch(dict(mb, logprobs=old), cfg.tis_cap, "distill")
        weights = measured.pop("tis_weights", None)
    advantages = reverse_kl_advantages(mb["teacher_logprobs"], old, mask)
    if cfg.task_reward_weight:
        advantages = mix_task_reward(advantages, mb["task_advantages"], cfg.task_reward_weight,
                                     mask)
    pg, m = losses.clipped_policy_loss(logprobs, old, advantages, mask, clip_low=cfg.clip_eps,
                                       counts=counts, token_weights=weights)
    m = dict(m, policy_loss=pg,
             reverse_kl=_token_share(old - mb["teacher_logprobs"], mask, counts),
             advantage_mean=_token_share(advantages, mask, counts))
    loss = pg
    if cfg.jsd_coef:
        per_token = chunked_generalized_jsd(
            hidden, head, mb["teacher_hidden"], teacher_head, mask, beta=cfg.beta,
            temperature=cfg.jsd_temperature,
            chunk_size=cfg.chunk_size or model_cfg.logits_chunk_size)
        m["jsd"] = _token_share(per_token, mask, counts)
        loss = loss + cfg.jsd_coef * m["jsd"]
    # Each micro-batch's own router terms, so their sum over micro-batches is the mean.
    term, moe_metrics = router_loss(model_cfg, router, "moe", 1.0 / cfg.grad_accum_steps)
    loss = loss + term
    return loss, dict(m, loss=loss, **moe_metrics, **measured)


def _check(batch, cfg: DistillConfig, teacher_head) -> None:
    required = DISTILL_BATCH + (("teacher_hidden",) if cfg.jsd_coef else ()) + (
        ("scores",) if cfg.task_reward_weight else ())
    optional = DISTILL_OPTIONAL + (() if cfg.task_reward_weight else ("scores",))
    check_batch(batch, "distill step", (required + ("logprobs",), optional),
                (required, optional))
    if cfg.jsd_coef and teacher_head is None:
        raise ValueError("distill step: distill.jsd_coef > 0 needs the teacher's LM head "
                         "(teacher_head=LMHead.of(teacher_cfg, teacher_params))")
    B = batch["response_mask"].shape[0]
    size = cfg.minibatch_size or B
    if B % size or size % cfg.grad_accum_steps:
        raise ValueError(f"distill step: {B} rows are not whole minibatches of "
                         f"distill.minibatch_size={size} rows, each of "
                         f"distill.grad_accum_steps={cfg.grad_accum_steps} micro-batches")
    if cfg.task_reward_weight and B % cfg.group_size:
        raise ValueError(f"distill step: {B} rows are not whole groups of "
                         f"distill.group_size={cfg.group_size}")
    if "logprobs" not in batch and not single_pass(cfg, B):
        raise ValueError(
            f"distill step: the batch has no behaviour logprobs, which only a single-pass "
            f"update takes from its own forward (distill.epochs=1, one minibatch, "
            f"distill.grad_accum_steps=1); this one has epochs={cfg.epochs}, "
            f"minibatch_size={cfg.minibatch_size} of {B} rows, "
            f"grad_accum_steps={cfg.grad_accum_steps}")


def distill_step(state, batch, *, model_cfg: ModelConfig, cfg: DistillConfig, labels=None,
                 lora_scale: float = 0.0, teacher_head: LMHead | None = None):
    """One distillation update phase (`cfg.epochs` × minibatches, each optimizer step's
    minibatch in `cfg.grad_accum_steps` micro-batches) on a rollout batch (module docstring).

    `teacher_head`: the teacher's `LMHead` (`LMHead.of(teacher_cfg, teacher_params)`), read
    only by the JSD term (`cfg.jsd_coef` > 0). Metrics under `distill/`: `loss`,
    `policy_loss`, `reverse_kl` (token mean of behaviour − teacher log-prob), `advantage_mean`
    (token mean of A_t), `jsd` (with the JSD term), `clipfrac`, `approx_kl`, `grad_norm`, and
    `mean_score` with `scores`; averaged over the optimizer steps. A state with an `RLState`
    has its iteration counter advanced.
    """
    _check(batch, cfg, teacher_head)
    B = batch["response_mask"].shape[0]
    data = {k: v for k, v in batch.items() if k != "scores"
            and not (k == "sampler_logprobs" and "logprobs" in batch)}
    mismatch = {}
    if "logprobs" in batch:
        mismatch = sampler_mismatch(batch, cfg.tis_cap, "distill")
        if cfg.tis_cap:
            data["tis_weights"] = mismatch.pop("tis_weights")
    elif cfg.tis_cap and "sampler_logprobs" not in batch:
        raise ValueError("distill.tis_cap needs the rollout batch's sampler_logprobs")
    if cfg.task_reward_weight:
        rows = jnp.any(batch["response_mask"] > 0, axis=1)
        data["task_advantages"] = sequence_advantages(batch["scores"], cfg.group_size, "grpo",
                                                      rows=rows)
    loss_fn = functools.partial(distill_loss, cfg=cfg, model_cfg=model_cfg, labels=labels,
                                lora_scale=lora_scale, teacher_head=teacher_head)

    def grad_fn(params, mb):
        counts = losses.aggregation_counts(mb["response_mask"])
        loss, aux, grads = accumulate_gradients(lambda p, micro: loss_fn(p, micro, counts),
                                                params, mb, cfg.grad_accum_steps)
        return (loss, {k if "/" in k else f"distill/{k}": v for k, v in aux.items()}), grads

    state, metrics = minibatch_epochs(
        state, data, grad_fn, epochs=cfg.epochs, num_minibatches=B // (cfg.minibatch_size or B),
        key=jax.random.fold_in(state.rng, state.step), grad_norm_key="distill/grad_norm")
    if getattr(state, "rl", None) is not None:
        state = state.replace(rl=state.rl.replace(iteration=state.rl.iteration + 1))
    metrics.update(mismatch)
    if "scores" in batch:
        metrics["distill/mean_score"] = jnp.mean(batch["scores"])
    return state, metrics


def make_distill_step(model_cfg: ModelConfig, cfg: DistillConfig, *, labels=None,
                      lora_scale: float = 0.0, teacher_head: LMHead | None = None, state=None,
                      mesh=None):
    """Jitted `distill_step`: one dispatch per update phase, the state donated.

    With the JSD term the teacher's `teacher_head` is a jit argument bound here (not a constant
    baked into the program), placed replicated on `mesh` once; without it `teacher_head` must
    be None. `state` and `mesh` as in `jit_step`."""
    check_factory_args("make_distill_step", model_cfg, cfg, DistillConfig)
    if bool(cfg.jsd_coef) != (teacher_head is not None):
        raise ValueError("make_distill_step: teacher_head is the JSD term's and only its: give "
                         f"it exactly when distill.jsd_coef > 0 (jsd_coef={cfg.jsd_coef}, "
                         f"teacher_head {'given' if teacher_head is not None else 'None'})")
    fn = functools.partial(distill_step, cfg=cfg, model_cfg=model_cfg, labels=labels,
                           lora_scale=lora_scale)
    if teacher_head is None:
        return jit_step(fn, state, mesh)
    # The head rides beside the batch, `(batch, head)`: a jit argument, not a baked constant.
    step = with_state_check(lambda s, pair: fn(s, pair[0], teacher_head=pair[1]))
    if mesh is None:
        jitted = jax.jit(step, donate_argnums=0)

        def plain(s, batch):
            return jitted(s, (batch, teacher_head))

        plain.jitted = _HeadBound(jitted, teacher_head)
        return plain
    head_sh, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    head = (jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=head_sh),
                         teacher_head) if _is_abstract(teacher_head)
            else sharding.put(teacher_head, head_sh))
    jitted = jax.jit(under_expert_mesh(step, mesh),
                     in_shardings=(state_shardings(state, mesh), (batch_sh, head_sh)),
                     out_shardings=(state_shardings(state, mesh), sharding.replicated(mesh)),
                     donate_argnums=0)

    def checked(s, batch):
        sharding.check_batch_divisible(batch, mesh)
        return jitted(s, (sharding.put(batch, batch_sh), head))

    checked.jitted = _HeadBound(jitted, head)
    return checked


def _is_abstract(tree) -> bool:
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


class _HeadBound:
    """The jitted `(state, (batch, head))` update seen as `(state, batch)` by what lowers a
    step without running it (`jrlhf bench` compiles `step.jitted.lower(state, batch)`, `jrlhf
    plan` on abstract shapes; the head may be abstract there)."""

    def __init__(self, jitted, head):
        self.jitted, self.head = jitted, head

    def lower(self, state, batch):
        return self.jitted.lower(state, (batch, self.head))


# ----------------------------------------------------------------------------------------------
# The teacher's part of the rollout iteration (`RolloutSpec.rescore` of the distill record).

# What the step reads of a scored rollout batch (`steps.rollout.score_rollout` + scores).
ROLLOUT_KEYS = DISTILL_BATCH + DISTILL_OPTIONAL + ("logprobs", "scores")


def _teacher_forward(teacher_cfg: ModelConfig, params, input_ids, attention_mask,
                     response_mask, temperature, *, num_response: int, with_hidden: bool):
    out = teacher_scores(teacher_cfg, params, input_ids, attention_mask, num_response,
                         temperature=temperature, with_hidden=with_hidden)
    out["teacher_logprobs"] = out["teacher_logprobs"] * response_mask
    return out


def teacher_rescorer(setup, config: Config):
    """`rescore(batch) -> batch`, built once per rollout loop (`RolloutSpec.rescore`): a scored
    rollout batch (`steps.rollout.score_rollout`, its `scores` set) as `distill_step` takes it.
    One jitted teacher forward (`distill.teacher_scores`) adds `teacher_logprobs [B, N]` of the
    sampled tokens at each row's sampling temperature (0 on padding) and, with the JSD term
    (`distill.jsd_coef` > 0), `teacher_hidden [B, N, D_t]`; keys the step never reads (the
    reference's log-probs, values, entropy) are dropped.

    The teacher (`distill.load_teacher`: loaded once per process) lies on the setup's mesh
    with its own parameter shardings (`sharding.param_shardings` of its shapes: a teacher
    larger than the student is split by the same rules), or on the default device. A teacher
    whose vocabulary size is not the student's is refused (`check_vocabularies`)."""
    teacher_cfg, params = load_teacher(config)
    check_vocabularies(setup.model_cfg.vocab_size, teacher_cfg.vocab_size)
    mesh = setup.mesh
    if mesh is None:
        params = jax.tree.map(jnp.asarray, params)
    else:
        params = sharding.put(params, sharding.param_shardings(params, mesh))
    forward = jax.jit(under_expert_mesh(functools.partial(
        _teacher_forward, teacher_cfg, with_hidden=bool(config.distill.jsd_coef)), mesh),
        static_argnames="num_response")

    def rescore(batch):
        scored = forward(params, batch["input_ids"], batch["attention_mask"],
                         batch["response_mask"], batch["temperature"],
                         num_response=batch["response_mask"].shape[1])
        return {k: v for k, v in batch.items() if k in ROLLOUT_KEYS} | scored

    return rescore
