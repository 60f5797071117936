"""On-policy distillation: the per-token reverse-KL advantages, the step's loss and metrics
against NumPy loops; teacher == student is exactly no update; the chunked JSD(β) equals its
dense definition (value and gradient); a teacher of another vocabulary is refused; `jrlhf
distill` end to end on a tiny model, its config section."""

import dataclasses
import functools
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jrlhf import models, optim, sharding
from jrlhf.cli import main
from jrlhf.config import Config, MeshConfig, OptimConfig, apply_overrides
from jrlhf.distill import (DistillConfig, LMHead, check_vocabularies, chunked_generalized_jsd,
                           mix_task_reward, reverse_kl_advantages, teacher_scores)
from jrlhf.models import ModelConfig, forward, init_params
from jrlhf.models import transformer as tfm
from jrlhf.report import read_metrics
from jrlhf.state import TrainState
from jrlhf.steps.common import place_state, value_and_grad
from jrlhf.steps.distill import distill_loss, make_distill_step

# The student's LM head runs 20 positions at a time (48 response positions: 3 chunks, the last
# one padded); the teacher is wider, with a tied (transposed) head.
STUDENT = ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, intermediate_size=64, logits_chunk_size=20)
TEACHER = ModelConfig(family="llama", vocab_size=64, hidden_size=48, num_layers=2, num_heads=6,
                      num_kv_heads=2, head_dim=8, intermediate_size=96,
                      tie_word_embeddings=True)
OPT = OptimConfig(max_grad_norm=1.0)  # weight_decay 0
B, P, N = 8, 5, 6


def sharpened(cfg, seed, scale=30.0):
    """Random params with a scaled-up LM head, so next-token distributions are far from
    uniform and the two models' log-probs differ by O(1)."""
    params = init_params(cfg, seed)
    if cfg.tie_word_embeddings:
        params["embed"]["embedding"] = params["embed"]["embedding"] * scale
    else:
        params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * scale
    return params


def make_state(params, learning_rate=1e-3):
    labels = optim.trainable_labels(params, (), ())
    tx = optim.make_optimizer(OPT, labels, learning_rate=learning_rate)
    return TrainState.create(params, tx, 0)


def rollout_rows(seed=0):
    """Rows with left-padded prompts and right-padded responses (an empty and a length-1
    response among them), two sampling temperatures."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, 64, (B, P + N)).astype(np.int32)
    attn = np.ones((B, P + N), np.int32)
    resp = np.ones((B, N), np.int32)
    lengths = [6, 1, 0, 4, 6, 3, 5, 2]
    for b in range(B):
        attn[b, : b % 3] = 0
        resp[b, lengths[b]:] = 0
        attn[b, P + lengths[b]:] = 0
        ids[b, P + lengths[b]:] = 0
    temperature = np.where(np.arange(B) % 2, 0.7, 1.0).astype(np.float32)
    return ids, attn, resp, temperature


@jax.jit
def student_logprobs(params, ids, attn, temperature):
    return tfm.token_outputs(STUDENT, params, ids, attn, last=N,
                             temperature=temperature).logprobs


score_teacher = jax.jit(teacher_scores, static_argnums=(0, 4),
                        static_argnames=("with_hidden",))
dense_logits = jax.jit(forward, static_argnums=0, static_argnames="last")


def distill_batch(student, teacher, seed=0, behaviour_noise=0.3, with_hidden=False):
    """A rollout batch: the teacher's scores of the rows, and behaviour log-probs that are the
    student's own plus noise (ratios well outside the clip range)."""
    ids, attn, resp, temperature = rollout_rows(seed)
    rng = np.random.RandomState(seed + 1)
    own = np.asarray(student_logprobs(student, ids, attn, temperature))
    scored = score_teacher(TEACHER, teacher, ids, attn, N, temperature=temperature,
                           with_hidden=with_hidden)
    batch = {"input_ids": ids, "attention_mask": attn, "response_mask": resp,
             "temperature": temperature,
             "logprobs": (own + behaviour_noise * rng.randn(B, N).astype(np.float32)) * resp,
             "scores": rng.randn(B).astype(np.float32)}
    batch.update({k: np.asarray(v) for k, v in scored.items()})
    batch["teacher_logprobs"] = batch["teacher_logprobs"] * resp
    return batch


# ---------------------------------------------------------------------------------------------
# NumPy references, written from the definitions as loops.


def np_log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_jsd(student_logits, teacher_logits, beta, temperature=1.0):
    """JSD_β of one position's logits `[V]`: β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q; the
    ends are KL(p‖q) (β = 0) and KL(q‖p) (β = 1)."""
    q = np.exp(np_log_softmax(student_logits / temperature))
    p = np.exp(np_log_softmax(teacher_logits / temperature))
    kl = lambda a, b: float(np.sum(a * np.log(a / b)))  # noqa: E731
    if beta == 0:
        return kl(p, q)
    if beta == 1:
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def np_group_advantages(scores, K):
    out = np.zeros(len(scores))
    for g in range(0, len(scores), K):
        s = scores[g:g + K].astype(np.float64)
        out[g:g + K] = (s - s.mean()) / (s.std() + 1e-6)
    return out


def np_distill_reference(new, batch, cfg, student_logits=None, teacher_logits=None):
    """`(loss, reverse_kl, advantage_mean, jsd)` of one full-batch optimizer step, by loops."""
    mask, old, teacher = batch["response_mask"], batch["logprobs"], batch["teacher_logprobs"]
    task = (np_group_advantages(batch["scores"], cfg.group_size) if cfg.task_reward_weight
            else np.zeros(B))
    tokens = [(b, t) for b in range(B) for t in range(N) if mask[b, t]]
    pg = rkl = adv_sum = jsd = 0.0
    for b, t in tokens:
        a = float(teacher[b, t]) - float(old[b, t]) + cfg.task_reward_weight * task[b]
        r = np.exp(float(new[b, t]) - float(old[b, t]))
        pg += max(-a * r, -a * min(max(r, 1 - cfg.clip_eps), 1 + cfg.clip_eps))
        rkl += float(old[b, t]) - float(teacher[b, t])
        adv_sum += a
        if cfg.jsd_coef:
            jsd += np_jsd(student_logits[b, t], teacher_logits[b, t], cfg.beta,
                          cfg.jsd_temperature)
    n = len(tokens)
    return pg / n + cfg.jsd_coef * jsd / n, rkl / n, adv_sum / n, jsd / n


# ---------------------------------------------------------------------------------------------
# (a) advantages, mixing and the step's loss against NumPy; padding has no effect.


def test_advantages_and_mixing_equal_numpy_loops():
    rng = np.random.RandomState(3)
    mask = (np.arange(N)[None] < np.array([6, 1, 0, 4, 6, 3, 5, 2])[:, None]).astype(np.int32)
    teacher = -np.abs(rng.randn(B, N)).astype(np.float32)
    student = -np.abs(rng.randn(B, N)).astype(np.float32)
    task = rng.randn(B).astype(np.float32)
    adv = np.asarray(reverse_kl_advantages(teacher, student, mask))
    mixed = np.asarray(mix_task_reward(adv, task, 0.5, mask))
    for b in range(B):
        for t in range(N):
            want = teacher[b, t] - student[b, t] if mask[b, t] else 0.0
            assert adv[b, t] == np.float32(want)
            np.testing.assert_allclose(mixed[b, t], want + 0.5 * task[b] if mask[b, t] else 0.0,
                                       rtol=1e-6, atol=1e-7)
    # Whatever sits under mask 0 (here inf and NaN) changes nothing.
    garbage = np.where(mask > 0, teacher, np.inf), np.where(mask > 0, student, np.nan)
    np.testing.assert_array_equal(reverse_kl_advantages(*garbage, mask), adv)
    np.testing.assert_array_equal(mix_task_reward(adv, task, 0.0, mask), adv)
    assert np.count_nonzero(adv) == mask.sum()


JSD_CFG = DistillConfig(clip_eps=0.2, task_reward_weight=0.5, group_size=4, jsd_coef=0.3,
                        beta=0.5, jsd_temperature=1.5)


def test_step_loss_and_metrics_equal_numpy_and_ignore_padding():
    student, teacher = sharpened(STUDENT, 0), sharpened(TEACHER, 1)
    batch = distill_batch(student, teacher, with_hidden=True)
    step = make_distill_step(STUDENT, JSD_CFG, teacher_head=LMHead.of(TEACHER, teacher))
    after, metrics = step(make_state(student), batch)

    new = np.asarray(student_logprobs(student, batch["input_ids"], batch["attention_mask"],
                                      batch["temperature"]))
    s_logits = np.asarray(dense_logits(STUDENT, student, batch["input_ids"],
                                       batch["attention_mask"], last=N))
    t_logits = np.asarray(dense_logits(TEACHER, teacher, batch["input_ids"],
                                       batch["attention_mask"], last=N))
    loss, rkl, adv_mean, jsd = np_distill_reference(new, batch, JSD_CFG, s_logits, t_logits)
    np.testing.assert_allclose(metrics["distill/loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["distill/reverse_kl"], rkl, rtol=1e-5)
    np.testing.assert_allclose(metrics["distill/advantage_mean"], adv_mean, rtol=1e-5)
    np.testing.assert_allclose(metrics["distill/jsd"], jsd, rtol=1e-5)
    np.testing.assert_allclose(metrics["distill/mean_score"], batch["scores"].mean(), rtol=1e-6)
    assert abs(rkl) > 0.3 and jsd > 0.05  # the two models really differ on these tokens
    assert 0 < float(metrics["distill/clipfrac"]) < 1  # the clip is exercised
    assert float(metrics["distill/grad_norm"]) > 0

    # Values under mask 0 (log-probs, the teacher's hidden states) change nothing at all.
    rng = np.random.RandomState(7)
    pad = batch["response_mask"] == 0
    noisy = dict(batch)
    for key in ("logprobs", "teacher_logprobs"):
        noisy[key] = np.where(pad, 50 * rng.randn(B, N), batch[key]).astype(np.float32)
    noisy["teacher_hidden"] = np.where(pad[..., None], 10 * rng.randn(*batch["teacher_hidden"]
                                                                      .shape),
                                       batch["teacher_hidden"]).astype(np.float32)
    after_noisy, metrics_noisy = step(make_state(student), noisy)
    for key in metrics:
        np.testing.assert_array_equal(metrics_noisy[key], metrics[key], err_msg=key)
    jax.tree.map(np.testing.assert_array_equal, after_noisy.params, after.params)


# ---------------------------------------------------------------------------------------------
# (b) teacher == student: no gradient, no update.


def test_teacher_equal_to_student_is_exactly_no_update():
    params = sharpened(STUDENT, 0)
    ids, attn, resp, temperature = rollout_rows()
    scored = score_teacher(STUDENT, params, ids, attn, N, temperature=temperature)
    same = np.asarray(scored["teacher_logprobs"]) * resp
    batch = {"input_ids": ids, "attention_mask": attn, "response_mask": resp,
             "temperature": temperature, "teacher_logprobs": same, "logprobs": same,
             "sampler_logprobs": same}
    cfg = DistillConfig()
    counts = {"num_tokens": jnp.float32(resp.sum())}
    (loss, _), grads = jax.jit(value_and_grad(
        lambda p: distill_loss(p, batch, counts, cfg=cfg, model_cfg=STUDENT),
        has_aux=True))(params)
    assert float(loss) == 0.0
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert not np.any(np.asarray(g)), jax.tree_util.keystr(path)

    before = jax.tree.map(np.array, params)
    state, metrics = make_distill_step(STUDENT, cfg)(make_state(params), batch)
    for key in ("distill/loss", "distill/reverse_kl", "distill/advantage_mean",
                "distill/grad_norm", "mismatch/gap_max"):
        assert float(metrics[key]) == 0.0, key
    assert int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, state.params, before)


# ---------------------------------------------------------------------------------------------
# (c) the chunked JSD equals the dense definition, value and gradient.


def jsd_inputs(seed=0, rows=3, positions=5, D=16, Dt=24, V=40):
    rng = np.random.RandomState(seed)
    hs = rng.randn(rows, positions, D).astype(np.float32)
    ht = rng.randn(rows, positions, Dt).astype(np.float32)
    ws = (0.5 * rng.randn(D, V)).astype(np.float32)  # the student's [D, V] kernel
    wt = (0.5 * rng.randn(V, Dt)).astype(np.float32)  # the teacher's tied [V, D_t] embedding
    mask = np.ones((rows, positions), np.int32)
    mask[0, 3:] = 0
    mask[2, :] = 0
    mask[1, 0] = 0  # a hole too (the function does not assume right padding)
    return hs, ws, ht, wt, mask


def dense_jsd_mean(hs, ws, ht, wt, mask, beta, temperature):
    """The masked token mean of JSD_β from the full `[rows, positions, V]` logits, plain jnp."""
    q = jax.nn.log_softmax(hs @ ws / temperature, axis=-1)
    p = jax.nn.log_softmax(ht @ wt.T / temperature, axis=-1)
    m = jnp.log(beta * jnp.exp(p) + (1 - beta) * jnp.exp(q))
    per = (beta * jnp.sum(jnp.exp(p) * (p - m), -1)
           + (1 - beta) * jnp.sum(jnp.exp(q) * (q - m), -1))
    return jnp.sum(jnp.where(mask > 0, per, 0.0)) / mask.sum()


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_chunked_jsd_equals_the_dense_definition(beta):
    hs, ws, ht, wt, mask = jsd_inputs()
    temperature = 1.3
    want = np.array([[np_jsd(hs[b, t] @ ws, ht[b, t] @ wt.T, beta, temperature) if mask[b, t]
                      else 0.0 for t in range(mask.shape[1])] for b in range(mask.shape[0])])
    want_grad = jax.jit(jax.grad(dense_jsd_mean), static_argnums=(5, 6))(
        hs, ws, ht, wt, mask, beta, temperature)
    assert np.abs(want_grad).max() > 1e-3

    @functools.partial(jax.jit, static_argnums=1)
    @functools.partial(jax.value_and_grad, has_aux=True)
    def chunked_mean(h, chunk_size):
        per = chunked_generalized_jsd(h, LMHead(ws, False), ht, LMHead(wt, True), mask,
                                      beta=beta, temperature=temperature,
                                      chunk_size=chunk_size)
        return jnp.sum(per) / mask.sum(), per

    # 15 positions: one block (0), chunks of 4 and 7 (neither divides 15: the last is padded).
    for chunk_size in (0, 4, 7):
        (mean, per), grad = chunked_mean(hs, chunk_size)
        np.testing.assert_allclose(per, want, rtol=1e-5, atol=1e-7, err_msg=str(chunk_size))
        np.testing.assert_allclose(mean, want.sum() / mask.sum(), rtol=1e-5)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6,
                                   err_msg=str(chunk_size))
        assert not np.any(np.asarray(grad)[mask == 0])  # masked positions get no gradient
    # Masked positions are excluded: other hidden states there change nothing.
    rng = np.random.RandomState(1)
    ht_other = np.where(mask[..., None] > 0, ht, 5 * rng.randn(*ht.shape)).astype(np.float32)
    np.testing.assert_array_equal(
        chunked_generalized_jsd(hs, LMHead(ws, False), ht_other, LMHead(wt, True), mask,
                                beta=beta, chunk_size=4),
        chunked_generalized_jsd(hs, LMHead(ws, False), ht, LMHead(wt, True), mask, beta=beta,
                                chunk_size=4))


def test_jsd_ends_are_the_forward_and_reverse_kl():
    """β = 0: KL(teacher ‖ student); β = 1: KL(student ‖ teacher) (TRL's convention)."""
    hs, ws, ht, wt, mask = jsd_inputs(seed=2)
    per = {beta: np.asarray(chunked_generalized_jsd(
        hs, LMHead(ws, False), ht, LMHead(wt, True), mask, beta=beta, chunk_size=4))
        for beta in (0.0, 1.0)}
    for b, t in zip(*np.nonzero(mask)):
        q = np.exp(np_log_softmax(hs[b, t] @ ws))
        p = np.exp(np_log_softmax(ht[b, t] @ wt.T))
        forward_kl, reverse_kl = np.sum(p * np.log(p / q)), np.sum(q * np.log(q / p))
        np.testing.assert_allclose(per[0.0][b, t], forward_kl, rtol=1e-5)
        np.testing.assert_allclose(per[1.0][b, t], reverse_kl, rtol=1e-5)
    assert np.all(per[0.0][mask > 0] > 0.1)


# ---------------------------------------------------------------------------------------------
# (d) vocabularies, and the config's checks.


class Vocab:
    def __init__(self, tokens):
        self.tokens = tokens

    def get_vocab(self):
        return {token: i for i, token in enumerate(self.tokens)}


def test_a_teacher_of_another_vocabulary_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"student vocab_size 64, teacher vocab_size 65$") as e:
        check_vocabularies(64, 65)
    assert "\n" not in str(e.value)
    same = Vocab(["a", "b", "c", "d"])
    with pytest.raises(ValueError, match=r"vocab_size 4, teacher vocab_size 4; first differing "
                                         r"token id 2: student 'c', teacher 'x'$"):
        check_vocabularies(4, 4, same, Vocab(["a", "b", "x", "d"]))
    with pytest.raises(ValueError, match=r"first differing token id 4: student None, teacher "
                                         r"'\\n'$") as e:
        check_vocabularies(4, 5, same, Vocab(["a", "b", "c", "d", "\n"]))
    assert "\n" not in str(e.value)
    check_vocabularies(64, 64)
    check_vocabularies(4, 4, same, Vocab(["a", "b", "c", "d"]))


def test_config_and_factory_checks():
    with pytest.raises(ValueError, match=r"distill.beta=1.5 is out of range"):
        DistillConfig(beta=1.5)
    with pytest.raises(ValueError, match=r"distill.group_size >= 2"):
        DistillConfig(task_reward_weight=1.0)
    with pytest.raises(ValueError, match=r"distill.tis_cap=0.5"):
        DistillConfig(tis_cap=0.5)
    with pytest.raises(ValueError, match=r"teacher_head is the JSD term's"):
        make_distill_step(STUDENT, dataclasses.replace(DistillConfig(), jsd_coef=0.1))
    with pytest.raises(TypeError, match=r"model_cfg, cfg"):
        make_distill_step(DistillConfig(), STUDENT)


# ---------------------------------------------------------------------------------------------
# Micro-batches, minibatches and a mesh change nothing; a single pass is its own behaviour.

# Adam's eps at 1e-4 for equality checks (see test_steps.OPT_EQ).
OPT_EQ = dataclasses.replace(OPT, eps=1e-4)


@pytest.mark.slow
def test_micro_batched_and_sharded_equal_the_plain_update():
    student, teacher = sharpened(STUDENT, 0), sharpened(TEACHER, 1)
    batch = distill_batch(student, teacher, with_hidden=True)
    head = LMHead.of(TEACHER, teacher)
    cfg = dataclasses.replace(JSD_CFG, epochs=2, minibatch_size=4)

    def run(grad_accum_steps, mesh=None):
        labels = optim.trainable_labels(student, (), ())
        state = TrainState.create(student, optim.make_optimizer(OPT_EQ, labels,
                                                                learning_rate=1e-3), 0)
        if mesh is not None:
            state = place_state(state, mesh)
        step = make_distill_step(STUDENT, dataclasses.replace(
            cfg, grad_accum_steps=grad_accum_steps), teacher_head=head, state=state, mesh=mesh)
        new, m = step(state, batch)
        assert int(new.step) == 4
        return jax.tree.map(np.asarray, new.params), {k: float(v) for k, v in m.items()}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mesh = sharding.make_mesh(MeshConfig(2, 2, 2))
    ref_params, ref_m = run(1)
    for got_params, got_m in (run(2), run(2, mesh)):
        jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6, rtol=0),
                     got_params, ref_params)
        assert set(got_m) == set(ref_m)
        for k in ref_m:
            np.testing.assert_allclose(got_m[k], ref_m[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_single_pass_takes_the_behaviour_logprobs_from_its_own_forward():
    student, teacher = sharpened(STUDENT, 0), sharpened(TEACHER, 1)
    batch = distill_batch(student, teacher, behaviour_noise=0.0)
    batch["sampler_logprobs"] = batch["logprobs"]
    cfg = DistillConfig(task_reward_weight=0.5, group_size=4)
    step = make_distill_step(STUDENT, cfg)
    given, m_given = step(make_state(student), batch)
    own, m_own = step(make_state(student), {k: v for k, v in batch.items() if k != "logprobs"})
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6, rtol=0),
                 own.params, given.params)
    for k in ("distill/loss", "distill/reverse_kl", "distill/advantage_mean"):
        np.testing.assert_allclose(m_own[k], m_given[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert float(m_own["mismatch/gap_max"]) < 1e-5  # its own forward vs the sampler's
    with pytest.raises(ValueError, match=r"no behaviour logprobs.*epochs=2"):
        make_distill_step(STUDENT, dataclasses.replace(cfg, epochs=2))(
            make_state(student), {k: v for k, v in batch.items() if k != "logprobs"})


# ---------------------------------------------------------------------------------------------
# `jrlhf distill` end to end: a tiny student saved as an HF folder with a small BPE tokenizer
# (conftest's `tiny_tokenizer`: no 8 s GGUF tokenizer load), teachers as HF folders.

ROOT = Path(__file__).parent.parent
TINY = str(ROOT / "configs" / "tiny.py")
SMALL = ModelConfig(family="llama", vocab_size=120, hidden_size=32, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, intermediate_size=64, eos_token_id=2,
                    pad_token_id=1)


@pytest.fixture(scope="module")
def student_folder(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("distill") / "student"
    models.save_pretrained(folder, SMALL, init_params(SMALL, 0), tokenizer=tiny_tokenizer)
    return folder


def distill_argv(out, student, *settings):
    argv = ["distill", "--config", TINY, "--set", f"run.out_dir={out}", "--set",
            f"model.source={student}", "--set", "model.tokenizer=", "--set", "run.log_every=0",
            "--set", "distill.prompts_per_iteration=2", "--set", "distill.group_size=2",
            "--set", "rollout.max_new_tokens=6", "--set", "data.num_eval_prompts=2"]
    for setting in settings:
        argv += ["--set", setting]
    return argv


@pytest.mark.slow
def test_the_distill_command_with_the_student_as_teacher_changes_nothing(tmp_path,
                                                                         student_folder):
    """`jrlhf distill` with teacher == student: every iteration's advantage, reverse KL, loss
    and gradient are exactly 0 (the behaviour log-probs come from the scoring forward: 2
    epochs), the task reward is logged, and the exported student is the starting one, bit for
    bit."""
    out = tmp_path / "run"
    assert main(distill_argv(out, student_folder, f"distill.teacher_source={student_folder}",
                             "distill.iterations=2", "distill.epochs=2")) == 0
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["stage"] == "distill"]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("distill/advantage_mean", "distill/reverse_kl", "distill/loss",
                    "distill/policy_loss", "distill/grad_norm", "distill/clipfrac"):
            assert r[key] == 0.0, (key, r)
        np.testing.assert_allclose(r["distill/mean_score"], r["score/mean"], rtol=1e-6)
        assert r["time/rescore"] > 0 and "distill/jsd" not in r
    exported = load_file(out / "distill" / "export" / "model.safetensors")
    start = load_file(student_folder / "model.safetensors")
    assert set(exported) == set(start)
    for name in start:
        np.testing.assert_array_equal(exported[name], start[name], err_msg=name)


def test_a_teacher_of_another_vocabulary_is_refused_by_the_command(tmp_path, capfd,
                                                                   student_folder,
                                                                   tiny_tokenizer):
    """A teacher whose vocabulary is not the student's, or the source "random", ends the
    command with one line and exit code 2, before any rollout."""
    wider = dataclasses.replace(SMALL, vocab_size=128, hidden_size=48, num_heads=6)
    teacher = models.save_pretrained(tmp_path / "teacher", wider, init_params(wider, 1),
                                     tokenizer=tiny_tokenizer)
    for source, expected in (
            (teacher, "distillation needs the teacher to share the student's vocabulary: "
                      "student vocab_size 120, teacher vocab_size 128"),
            ("random", "distill.teacher_source='random': a teacher has trained weights")):
        argv = distill_argv(tmp_path / "run", student_folder, f"distill.teacher_source={source}")
        assert main(argv) == 2
        out, err = capfd.readouterr()
        errors = [line for line in err.splitlines() if "error" in line.lower()]
        assert errors == [err.strip().splitlines()[-1]] and "Traceback" not in out + err, err
        assert errors[0].startswith(f"jrlhf distill: error: {expected}"), err
        assert not (tmp_path / "run" / "metrics.jsonl").exists() or not any(
            r["stage"] == "distill" for r in read_metrics(tmp_path / "run" / "metrics.jsonl"))


def test_the_distill_section_of_the_config():
    config = apply_overrides(Config(), ["distill.teacher_source=runs/x/grpo/export",
                                        "distill.jsd_coef=0.1", "distill.group_size=4",
                                        "distill.task_reward_weight=0.5"])
    assert config.distill.teacher_source == "runs/x/grpo/export"
    assert (config.distill.jsd_coef, config.distill.group_size) == (0.1, 4)
    for setting, message in (
            ("distill.beta=1.5", r"distill.beta=1.5 is out of range: expected >= 0 and <= 1"),
            ("distill.clip_eps=nan", r"distill.clip_eps=nan is out of range"),
            ("distill.task_reward_weight=1", r"needs distill.group_size >= 2"),
            ("distill.minibatch_size=3", r"the 4 rows of an iteration .* distill.minibatch_size=3"),
            ("distill.temperature=2", r"unknown config key 'distill.temperature'")):
        with pytest.raises((ValueError, KeyError), match=message):
            apply_overrides(Config(), [setting])
