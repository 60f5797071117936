"""DPO (and IPO) and ORPO steps over (chosen, rejected) pairs.

Batch (P pairs, T tokens): `chosen_ids, chosen_mask, chosen_loss_mask, rejected_ids,
rejected_mask, rejected_loss_mask` `[P, T]` — `*_mask` is the attention mask, `*_loss_mask` is 1
on response tokens. Packed (`data.pack`): `input_ids, attention_mask, loss_mask, segment_ids,
positions` `[P, L]`, one pair per row, prompt + chosen as segment 1 and prompt + rejected as
segment 2 (`packed_pair_logps`). DPO also takes `ref_chosen_logps, ref_rejected_logps` `[P]`
(precompute them once with `reference_logps`); without them, a LoRA policy uses its own frozen
base weights as the reference, inside the step.

A mixture of experts adds the router terms of the policy's forward over chosen and rejected
(`common.router_loss`: real tokens only) to both losses; the frozen reference adds none.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from jrlhf import lora, losses, rl
from jrlhf.config import DPOConfig
from jrlhf.models import transformer as tfm
from jrlhf.models.config import ModelConfig
from jrlhf.steps.common import (PACKED, accumulate_gradients, apply_gradients, check_batch,
                                check_factory_args, forward_params, jit_step, router_loss)


def response_logps(cfg: ModelConfig, params, ids, attention_mask, loss_mask,
                   with_router: bool = False):
    """Summed log-probs `[B]` of the response tokens and their counts `[B]`; with
    `with_router`, also the forward's router sums over the real tokens (`moe.RouterStats`,
    None for a dense model)."""
    out = tfm.token_outputs(cfg, params, ids, attention_mask, with_router=with_router)
    mask = loss_mask[:, 1:] * attention_mask[:, 1:]
    sums = rl.masked_sum(out.logprobs, mask, axis=-1), jnp.sum(mask > 0, axis=-1)
    return (*sums, out.router) if with_router else sums


def packed_pair_logps(cfg: ModelConfig, params, batch, with_router: bool = False):
    """Summed response log-probs and counts of packed pairs: row p of `input_ids,
    attention_mask, loss_mask, segment_ids, positions [P, L]` holds prompt + chosen as segment 1
    and prompt + rejected as segment 2. Returns `((chosen, rejected), (n_chosen, n_rejected))`,
    each `[P]`, and with `with_router` the router sums (`response_logps`)."""
    ids, segments = batch["input_ids"], batch["segment_ids"]
    out = tfm.token_outputs(cfg, params, ids, batch["attention_mask"],
                            positions=batch["positions"], segment_ids=segments,
                            with_router=with_router)
    # Token t + 1 is predicted from t only inside one segment.
    mask = batch["loss_mask"][:, 1:] * (segments[:, 1:] == segments[:, :-1])
    target_segments = jnp.where(mask > 0, segments[:, 1:], 0)
    sums = rl.segment_sums(jnp.where(mask > 0, out.logprobs, 0.0), target_segments, 2)
    counts = rl.segment_sums(mask.astype(jnp.float32), target_segments, 2)
    pairs = (sums[:, 0], sums[:, 1]), (counts[:, 0], counts[:, 1])
    return (*pairs, out.router) if with_router else pairs


def pair_logps(cfg, params, batch, with_router: bool = False):
    """Policy log-probs of chosen and rejected in one forward over `[2P, T]` (or over the
    packed `[P, L]` rows, see `packed_pair_logps`): `((chosen, rejected), (n_chosen,
    n_rejected))`, each `[P]`, and with `with_router` the forward's router sums over both
    sides' real tokens (`moe.RouterStats`; None for a dense model)."""
    if "segment_ids" in batch:
        return packed_pair_logps(cfg, params, batch, with_router)
    cat = lambda k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])  # noqa
    logps, counts, *router = response_logps(cfg, params, cat("ids"), cat("mask"),
                                            cat("loss_mask"), with_router)
    P = batch["chosen_ids"].shape[0]
    return ((logps[:P], logps[P:]), (counts[:P], counts[P:]), *router)


def pair_count(batch) -> int:
    """Pairs in a batch: rows of `chosen_ids`, or of packed `input_ids` (one pair per row)."""
    return batch["input_ids" if "segment_ids" in batch else "chosen_ids"].shape[0]


def reference_logps(cfg: ModelConfig, ref_params, batch) -> dict:
    """`{"ref_chosen_logps", "ref_rejected_logps"}` for a batch (jit it; run once per batch)."""
    (chosen, rejected), _ = pair_logps(cfg, ref_params, batch)
    return {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}


def _pair_metrics(prefix, losses_sum, aux, num_pairs, grads):
    n = jnp.maximum(num_pairs, 1.0)
    return {f"{prefix}/loss": losses_sum, f"{prefix}/accuracy": aux["correct"] / n,
            f"{prefix}/margin": aux["margin"] / n, f"{prefix}/grad_norm": optax.tree.norm(grads),
            **{f"{prefix}/{k}": v / n for k, v in aux.items() if k not in ("correct", "margin")}}


def pair_layouts(optional: tuple[str, ...] = ()):
    """The two batch layouts of a preference step: chosen/rejected rows, or packed pairs."""
    sides = tuple(f"{side}_{k}" for side in ("chosen", "rejected")
                  for k in ("ids", "mask", "loss_mask"))
    return ((sides, optional),
            (("input_ids", "attention_mask", "loss_mask", *PACKED), optional))


def dpo_step(state, batch, *, model_cfg: ModelConfig, cfg: DPOConfig, labels=None,
             lora_scale: float = 0.0, grad_accum_steps: int = 1):
    """One optimizer step of DPO / IPO. Metrics: loss, accuracy (implicit chosen reward >
    rejected), margin, chosen/rejected implicit rewards, grad norm; for a mixture of experts
    `dpo/moe/aux_loss`, `dpo/moe/z_loss` and the expert load of the policy's forward
    (`router_loss`, its terms added to the loss; the reference's forward adds nothing)."""
    check_batch(batch, "dpo_step", *pair_layouts(("ref_chosen_logps", "ref_rejected_logps")))
    P = pair_count(batch)
    if "ref_chosen_logps" not in batch:
        if not lora_scale:
            raise ValueError("dpo_step needs ref_chosen_logps/ref_rejected_logps in the batch "
                             "(see reference_logps), or a LoRA policy whose base is the reference")
        ref = reference_logps(model_cfg, jax.lax.stop_gradient(lora.base_params(state.params)),
                              batch)
        batch = dict(batch, **ref)

    def loss_fn(params, micro):
        fp = forward_params(params, labels, lora_scale)
        (chosen, rejected), _, stats = pair_logps(model_cfg, fp, micro, with_router=True)
        pair_losses, m = losses.dpo_loss(chosen, rejected, micro["ref_chosen_logps"],
                                         micro["ref_rejected_logps"], cfg.beta,
                                         cfg.label_smoothing, cfg.loss)
        margin = m["chosen_rewards"] - m["rejected_rewards"]
        aux = {"correct": jnp.sum(margin > 0), "margin": jnp.sum(margin),
               "chosen_reward": jnp.sum(m["chosen_rewards"]),
               "rejected_reward": jnp.sum(m["rejected_rewards"])}
        term, router = router_loss(model_cfg, stats, "dpo/moe", 1.0 / grad_accum_steps)
        aux = jax.tree.map(lambda x: x.astype(jnp.float32), aux)
        return jnp.sum(pair_losses) / P + term, (aux, router)

    loss, (aux, router), grads = accumulate_gradients(loss_fn, state.params, batch,
                                                      grad_accum_steps)
    return apply_gradients(state, grads), {**_pair_metrics("dpo", loss, aux, P, grads), **router}


def orpo_step(state, batch, *, model_cfg: ModelConfig, cfg: DPOConfig, labels=None,
              lora_scale: float = 0.0, grad_accum_steps: int = 1):
    """One optimizer step of ORPO: SFT on the chosen response plus the odds-ratio term; no
    reference model. Metrics: loss, nll, log_odds_ratio, accuracy (log odds ratio > 0); for a
    mixture of experts `orpo/moe/...` as `dpo_step` logs them (the router terms in the loss)."""
    check_batch(batch, "orpo_step", *pair_layouts())
    P = pair_count(batch)

    def loss_fn(params, micro):
        fp = forward_params(params, labels, lora_scale)
        (chosen, rejected), (n_c, n_r), stats = pair_logps(model_cfg, fp, micro,
                                                           with_router=True)
        mean_c = chosen / jnp.maximum(n_c, 1)
        mean_r = rejected / jnp.maximum(n_r, 1)
        pair_losses, ratio = losses.orpo_loss(mean_c, mean_r, -mean_c, cfg.orpo_lambda)
        aux = {"correct": jnp.sum(ratio > 0).astype(jnp.float32), "margin": jnp.sum(ratio),
               "nll": -jnp.sum(mean_c)}
        term, router = router_loss(model_cfg, stats, "orpo/moe", 1.0 / grad_accum_steps)
        return jnp.sum(pair_losses) / P + term, (aux, router)

    loss, (aux, router), grads = accumulate_gradients(loss_fn, state.params, batch,
                                                      grad_accum_steps)
    metrics = {**_pair_metrics("orpo", loss, aux, P, grads), **router}
    metrics["orpo/log_odds_ratio"] = metrics.pop("orpo/margin")
    return apply_gradients(state, grads), metrics


def make_dpo_step(model_cfg, cfg: DPOConfig, *, orpo: bool = False, labels=None,
                  lora_scale: float = 0.0, grad_accum_steps: int = 1, state=None, mesh=None):
    """Jitted `dpo_step` (or `orpo_step`) with hyper-parameters bound; sharded with a mesh."""
    check_factory_args("make_dpo_step", model_cfg, cfg, DPOConfig)
    fn = functools.partial(orpo_step if orpo else dpo_step, model_cfg=model_cfg, cfg=cfg,
                           labels=labels, lora_scale=lora_scale,
                           grad_accum_steps=grad_accum_steps)
    return jit_step(fn, state, mesh)
