"""Mixtures of experts in the preference steps: DPO and ORPO add the policy's router terms to
their losses and log them, equal to NumPy over transformers' router logits of every chosen and
rejected row run alone (so padding and packing count nothing); a dense model logs none; and a
`mesh.expert` that does not divide the expert count is refused at setup."""

import dataclasses

import jax
import numpy as np
import pytest

from jrlhf import models
from jrlhf.config import Config, DPOConfig, derive
from jrlhf.setups import check_expert_mesh, make_setup
from jrlhf.steps import make_dpo_step
from jrlhf.steps.preference import dpo_step, orpo_step
from test_compute import packed_groups, random_groups
from test_moe import numpy_balance_loss
from test_steps import CFG, make_state

AUX, Z = 0.1, 0.01  # router coefficients large enough that a missing term shows
MOE_KEYS = ("aux_loss", "z_loss", "load_max_share", "load_entropy", "dropped_tokens",
            "routing_differs")
log_sigmoid = lambda x: -np.log1p(np.exp(-x))  # noqa: E731


def rows_alone(torch_model, groups):
    """Each (prompt + response) sequence of `groups` through transformers alone, no padding:
    `[(per sparse layer router logits [n, E], summed response log-prob, response tokens)]`
    in group-major order (pair p: chosen, rejected)."""
    import torch

    rows = []
    for prompt, responses in groups:
        for response in responses:
            seq = np.concatenate([prompt, response])
            with torch.no_grad():
                out = torch_model(torch.tensor(seq[None]), output_router_logits=True)
            logp = torch.log_softmax(out.logits[0, :-1].double(), -1).numpy()
            picked = logp[np.arange(len(seq) - 1), seq[1:]][len(prompt) - 1:]
            rows.append(([r.numpy() for r in out.router_logits], picked.sum(), len(response)))
    return rows


def numpy_router_metrics(rows, k):
    """The `router_loss` metrics over every row's tokens pooled (transformers' load-balancing
    loss as tests/test_moe.py writes it, the z-loss, the per-layer load)."""
    layers = [np.concatenate([row[0][i] for row in rows]) for i in range(len(rows[0][0]))]
    n = len(layers[0])
    lse = np.concatenate([np.log(np.exp(x).sum(-1)) for x in layers])
    shares = []
    for logits in layers:
        top = np.argsort(-logits, axis=-1)[:, :k]
        shares.append(np.bincount(top.reshape(-1), minlength=logits.shape[1]) / (n * k))
    shares = np.array(shares)
    entropy = -np.sum(np.where(shares > 0, shares * np.log(np.maximum(shares, 1e-30)), 0), -1)
    return {"aux_loss": numpy_balance_loss(layers, k, np.ones(n)), "z_loss": np.mean(lse ** 2),
            "load_max_share": shares.max(), "load_entropy": entropy.mean(),
            "dropped_tokens": 0.0, "routing_differs": 0.0}


@pytest.fixture(scope="module")
def moe_pairs(hf_folder):
    """The tiny Qwen3-MoE (5 experts, 3 per token, layer 1 dense) with router coefficients
    `AUX`, `Z`; 4 (prompt, chosen, rejected) groups as right-padded pairs (with two rows moved
    to left padding and spare padding columns) and as packed rows; the rows-alone reference."""
    torch_model, folder = hf_folder("qwen3_moe")
    cfg, params = models.load_pretrained(folder)
    cfg = dataclasses.replace(cfg, router_aux_loss_coef=AUX, router_z_loss_coef=Z)
    groups = random_groups(4, 2, seed=7)
    (ids, mask, loss), packed = packed_groups(groups, 11, 20)
    pairs = {f"{side}_{key}": np.ascontiguousarray(x[:, i])
             for i, side in enumerate(("chosen", "rejected"))
             for key, x in (("ids", ids), ("mask", mask), ("loss_mask", loss))}
    for p, side in ((1, "chosen"), (2, "rejected")):  # left padding: the real run moved right
        pad = 11 - int(pairs[f"{side}_mask"][p].sum())
        for key in ("ids", "mask", "loss_mask"):
            pairs[f"{side}_{key}"][p] = np.roll(pairs[f"{side}_{key}"][p], pad)
    rows = rows_alone(torch_model, groups)
    return cfg, params, pairs, packed, rows


def test_dpo_adds_the_router_terms_of_the_rows_alone(moe_pairs):
    """dpo/moe/* of a padded batch equal NumPy over transformers' router logits of the 8 rows
    run alone, and the loss is the DPO loss of the rows' log-probs + AUX·aux + Z·z."""
    cfg, params, pairs, _, rows = moe_pairs
    ref_c, ref_r = np.array([-20.0, -9.0, -14.0, -11.0]), np.array([-12.0, -15.0, -8.0, -17.0])
    batch = dict(pairs, ref_chosen_logps=ref_c.astype(np.float32),
                 ref_rejected_logps=ref_r.astype(np.float32))
    _, metrics = make_dpo_step(cfg, DPOConfig(beta=0.3))(make_state(params)[0], batch)
    want = numpy_router_metrics(rows, cfg.experts_per_token)
    for key in MOE_KEYS:
        np.testing.assert_allclose(float(metrics[f"dpo/moe/{key}"]), want[key], rtol=1e-5,
                                   atol=1e-7, err_msg=key)
    print({k: round(float(v), 6) for k, v in want.items()})
    logps = np.array([row[1] for row in rows]).reshape(4, 2)
    h = (logps[:, 0] - ref_c) - (logps[:, 1] - ref_r)
    plain = np.mean(-log_sigmoid(0.3 * h))  # the loss with both coefficients 0
    np.testing.assert_allclose(float(metrics["dpo/loss"]),
                               plain + AUX * want["aux_loss"] + Z * want["z_loss"], rtol=1e-5)


def test_packed_orpo_adds_the_same_router_terms(moe_pairs):
    """ORPO over the same pairs packed two to a row: the same router metrics as the rows alone
    (the packing's padding and segment boundaries count nothing), the loss ORPO's + the
    terms."""
    cfg, params, _, packed, rows = moe_pairs
    _, metrics = make_dpo_step(cfg, DPOConfig(orpo_lambda=0.5), orpo=True)(
        make_state(params)[0], packed)
    want = numpy_router_metrics(rows, cfg.experts_per_token)
    for key in MOE_KEYS:
        np.testing.assert_allclose(float(metrics[f"orpo/moe/{key}"]), want[key], rtol=1e-5,
                                   atol=1e-7, err_msg=key)
    means = np.array([row[1] / row[2] for row in rows]).reshape(4, 2)
    odds = means - np.log1p(-np.exp(means))
    plain = np.mean(-means[:, 0] - 0.5 * log_sigmoid(odds[:, 0] - odds[:, 1]))
    np.testing.assert_allclose(float(metrics["orpo/loss"]),
                               plain + AUX * want["aux_loss"] + Z * want["z_loss"], rtol=1e-5)


@pytest.mark.parametrize("step", [dpo_step, orpo_step])
def test_a_dense_model_logs_no_router_metrics(step):
    from test_preference import pair_batch

    batch = pair_batch(P=2, T=6)
    if step is dpo_step:
        batch.update(ref_chosen_logps=np.zeros(2, np.float32),
                     ref_rejected_logps=np.zeros(2, np.float32))
    state, _ = make_state(models.init_params(CFG, 0))
    _, metrics = jax.eval_shape(lambda s, b: step(s, b, model_cfg=CFG, cfg=DPOConfig()),
                                state, batch)
    assert metrics and not [k for k in metrics if "moe" in k], sorted(metrics)


def test_an_expert_count_mesh_expert_does_not_divide_is_refused_at_setup():
    """5 experts over mesh.expert=2: one line naming both, from `make_setup` before it reads
    the weights (None here) or builds a mesh; a divisor or a dense model passes."""
    cfg = models.ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=40,
                             num_experts=5, experts_per_token=2, expert_size=16)
    config = derive(Config(), {"mesh.expert": 2})
    message = "mesh.expert=2 does not divide the model's 5 experts; choose a divisor of 5"
    for algorithm in ("sft", "dpo", "grpo"):
        with pytest.raises(ValueError, match=message):
            make_setup(algorithm, config, cfg, None)
    check_expert_mesh(5, cfg)
    check_expert_mesh(1, cfg)
    check_expert_mesh(2, CFG, None)
