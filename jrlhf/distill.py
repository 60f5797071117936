"""On-policy distillation's math: per-token reverse-KL advantages and a chunked generalised JSD.

The student samples responses; a frozen teacher scores the same tokens. Conventions as in
`jrlhf.rl`: B rows, N response columns, `mask [B, N]` 1 on response tokens (up to and including
EOS), 0 on padding; every function gives results that do not depend on what sits at masked
positions. p is the teacher's next-token distribution, q the student's.

- `reverse_kl_advantages`: A_t = log p(y_t) − log q_old(y_t), the per-token advantage whose
  policy gradient minimises the reverse KL(q ‖ p) on the student's own samples
  (Agarwal et al. 2024; Thinking Machines' "On-policy distillation", 2025).
- `chunked_generalized_jsd`: JSD_β(p, q) over the full vocabulary from both models' final
  hidden states and LM heads, a chunk of positions at a time (no `[B, N, V]` float32 logits).
- `check_vocabularies`: a teacher is usable only with the student's vocabulary.
- `load_teacher` / `teacher_head`: the teacher named by `distill.teacher_source`, loaded once
  per process through the policy's own loader (`models.sources.load_policy`).

The `distill` section is `jrlhf.config.DistillConfig` (re-exported here); the step is
`jrlhf.steps.distill`, the algorithm's record `jrlhf.algorithms.DISTILL`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import struct

from jrlhf.config import Config, DistillConfig, ModelSection
from jrlhf.models import transformer as tfm
from jrlhf.models.config import ModelConfig
from jrlhf.models.sources import load_policy, load_tokenizer, model_config, resolve_source

__all__ = ["DistillConfig", "LMHead", "check_vocabularies", "chunked_generalized_jsd",
           "generalized_jsd", "load_teacher", "mix_task_reward", "reverse_kl_advantages",
           "teacher_head", "teacher_scores", "teacher_section", "teacher_tokenizer",
           "teacher_width"]


def reverse_kl_advantages(teacher_logprobs, student_logprobs, mask):
    """Per-token advantages `[B, N]`: log p_teacher(y_t) − log q_student(y_t) on the real tokens
    of `mask [B, N]`, 0 elsewhere.

    `teacher_logprobs, student_logprobs [B, N]`: log-probs of the sampled tokens; the student's
    are the behaviour policy's (the weights that sampled, or the trainer's pre-update
    recomputation of them). Both are data (stop-gradient): with them as a fixed advantage, the
    policy gradient of the summed advantage is that of −KL(q ‖ p) on the sampled tokens.
    Where the two agree the advantage is exactly 0."""
    diff = jax.lax.stop_gradient(teacher_logprobs) - jax.lax.stop_gradient(student_logprobs)
    return jnp.where(mask > 0, diff, 0.0)


def mix_task_reward(advantages, task_advantages, weight: float, mask):
    """`advantages [B, N]` + `weight` · `task_advantages` (`[B]`, one per row broadcast over
    its tokens, or `[B, N]`), 0 where `mask [B, N]` is 0. `weight` 0 returns the distillation
    advantages unchanged."""
    if not weight:
        return jnp.where(mask > 0, advantages, 0.0)
    task = task_advantages[:, None] if task_advantages.ndim == 1 else task_advantages
    return jnp.where(mask > 0, advantages + weight * task, 0.0)


def _kl(logp, logq):
    """KL(p ‖ q) over the last axis from log-probabilities (`[..., V]` -> `[...]`)."""
    return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def generalized_jsd(student_logits, teacher_logits, beta: float, temperature: float = 1.0):
    """Generalised Jensen-Shannon divergence per position, `[..., V]` logits -> `[...]`.

    p = softmax(teacher_logits / temperature), q = softmax(student_logits / temperature),
    m = β·p + (1−β)·q; for 0 < β < 1, JSD_β = β·KL(p ‖ m) + (1−β)·KL(q ‖ m) (Agarwal et al.
    2024, eq. 1; TRL's `GKDTrainer.generalized_jsd_loss`). That value tends to 0 at both ends
    (as β·KL(p ‖ q) and (1−β)·KL(q ‖ p)); the ends are the limits of JSD_β / β and
    JSD_β / (1−β) instead, as in TRL: β = 0 returns the forward KL(p ‖ q) (teacher ‖ student),
    β = 1 the reverse KL(q ‖ p) (student ‖ teacher). No T² factor on the temperature (TRL's
    convention). Float32 throughout.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd: beta must be in [0, 1], got {beta!r}")
    q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    if beta == 0.0:
        return _kl(p, q)
    if beta == 1.0:
        return _kl(q, p)
    m = jnp.logaddexp(p + math.log(beta), q + math.log1p(-beta))
    return beta * _kl(p, m) + (1.0 - beta) * _kl(q, m)


@struct.dataclass
class LMHead:
    """A model's LM head as data: `weight` (`[V, D]` if `transposed`, i.e. a tied embedding,
    else `[D, V]`; possibly a `jrlhf.quant.QuantizedArray`), the compute `dtype` and the
    final-logit `softcap` (Gemma 2; None = off). A pytree whose only leaves are the weight's,
    so it can be a jit argument (the teacher's head: one `[V, D_teacher]` matrix, not a
    model)."""

    weight: jax.Array
    transposed: bool = struct.field(pytree_node=False)
    dtype: str = struct.field(pytree_node=False, default="float32")
    softcap: float | None = struct.field(pytree_node=False, default=None)

    @classmethod
    def of(cls, cfg: ModelConfig, params) -> "LMHead":
        """The head of a model with config `cfg` and params `params` (its own dtype/softcap)."""
        weight, transposed = tfm.bind(cfg, params).lm_head_weight()
        return cls(weight, transposed, cfg.dtype, cfg.final_softcap)

    def logits(self, hidden):
        """Float32 logits `[..., V]` of final hidden states `hidden [..., D]`."""
        return tfm.head_logits(hidden, self.weight, self.transposed, self.dtype, self.softcap)


def chunked_generalized_jsd(student_hidden, student_head: LMHead, teacher_hidden,
                            teacher_head: LMHead, mask, *, beta: float,
                            temperature: float = 1.0, chunk_size: int = 0):
    """Per-token `generalized_jsd` `[B, N]` between the teacher's and the student's next-token
    distributions, 0 where `mask [B, N]` is 0; take `rl.masked_mean` for the loss.

    `student_hidden [B, N, D]`, `teacher_hidden [B, N, D_t]`: each model's final hidden states
    at the positions predicting the N tokens (`D_t` may differ from `D`; the vocabularies must
    be the same size V: `check_vocabularies`). The teacher side is stop-gradient.

    Like `transformer.chunked_token_logprobs`, the B·N positions go through both heads
    `chunk_size` at a time in a `lax.map` whose body is rematerialised: the backward pass
    recomputes one chunk's logits, so the peak extra memory is a few `[chunk_size, V]` float32
    blocks, never `[B, N, V]`. `chunk_size=0` (or at most `chunk_size` positions in all) is one
    block. The value does not depend on the chunking beyond float32 rounding.
    """
    B, N, D = student_hidden.shape
    n = B * N
    hs, ht = student_hidden.reshape(n, D), teacher_hidden.reshape(n, teacher_hidden.shape[-1])

    def block(s, t):
        teacher_logits = jax.lax.stop_gradient(teacher_head.logits(t))
        return generalized_jsd(student_head.logits(s), teacher_logits, beta, temperature)

    if not chunk_size or n <= chunk_size:
        per_token = block(hs, ht)
    else:
        chunks = -(-n // chunk_size)
        pad = chunks * chunk_size - n
        hs = jnp.pad(hs, ((0, pad), (0, 0))).reshape(chunks, chunk_size, D)
        ht = jnp.pad(ht, ((0, pad), (0, 0))).reshape(chunks, chunk_size, ht.shape[-1])
        per_token = jax.lax.map(jax.checkpoint(lambda xs: block(*xs)), (hs, ht))
        per_token = per_token.reshape(-1)[:n]
    return jnp.where(mask > 0, per_token.reshape(B, N), 0.0)


def teacher_scores(teacher_cfg: ModelConfig, teacher_params, input_ids, attention_mask,
                   num_response: int, *, temperature=1.0, with_hidden: bool = False) -> dict:
    """What the distillation batch needs from the teacher, for rollout rows `input_ids,
    attention_mask [B, P+N]` (prompt + response, N = `num_response`): `teacher_logprobs
    [B, N]` of the response tokens under logits / `temperature` (a number or `[B]`, the rows'
    sampling temperature) and, with `with_hidden`, `teacher_hidden [B, N, D_t]`, the final
    hidden states predicting them (the JSD term's input; the teacher's `LMHead` goes to the
    step). One forward of the teacher, its LM head chunked (`cfg.logits_chunk_size`)."""
    model = tfm.bind(teacher_cfg, teacher_params)
    hidden = model(input_ids, attention_mask)[:, -num_response - 1:-1]
    head = LMHead.of(teacher_cfg, teacher_params)
    logprobs, _ = tfm.chunked_token_logprobs(
        hidden, head.weight, head.transposed, input_ids[:, -num_response:], dtype=head.dtype,
        temperature=temperature, chunk_size=teacher_cfg.logits_chunk_size, softcap=head.softcap)
    out = {"teacher_logprobs": logprobs}
    if with_hidden:
        out["teacher_hidden"] = hidden
    return out


def _id_to_token(tokenizer) -> dict:
    return {i: token for token, i in tokenizer.get_vocab().items()}


def check_vocabularies(student_vocab_size: int, teacher_vocab_size: int, student_tokenizer=None,
                       teacher_tokenizer=None) -> None:
    """Refuse a teacher whose vocabulary is not the student's: a ValueError of one line naming
    both sizes (the models' `vocab_size`, their logits' V) and, when both tokenizers are given
    (anything with transformers' `get_vocab() -> {token: id}`), the first token id whose token
    differs, with both tokens. Equal sizes and equal tokens (or no tokenizers) pass."""
    first = None
    if student_tokenizer is not None and teacher_tokenizer is not None:
        student, teacher = _id_to_token(student_tokenizer), _id_to_token(teacher_tokenizer)
        differing = [i for i in sorted(set(student) | set(teacher))
                     if student.get(i) != teacher.get(i)]
        if differing:
            i = differing[0]
            first = (f"; first differing token id {i}: student {student.get(i)!r}, teacher "
                     f"{teacher.get(i)!r}")
    if student_vocab_size != teacher_vocab_size or first:
        raise ValueError(f"distillation needs the teacher to share the student's vocabulary: "
                         f"student vocab_size {student_vocab_size}, teacher vocab_size "
                         f"{teacher_vocab_size}{first or ''}")


# ----------------------------------------------------------------------------------------------
# The teacher: `distill.teacher_source`, loaded as the policy is.


def teacher_section(config: Config) -> ModelSection:
    """The teacher's `ModelSection`: `distill.teacher_source` (an HF folder, a `.gguf` file,
    "smollm2", a hub id in the local cache, a jrlhf run's export folder) with the student's
    compute settings (`model.dtype`, `attention`, `logits_chunk_size`, `residual_barrier`), its
    own tokenizer and no quantization. An empty `teacher_source` is the student's own
    `model` section: the teacher is the student's starting weights (self-distillation: with a
    task reward, a per-token pull towards the start; also what `jrlhf bench` / `plan` time
    without a teacher).

    Raises:
        ValueError / FileNotFoundError: one line, for the source "random" (a teacher has
            trained weights) or a hub id not in the cache.
    """
    source = config.distill.teacher_source
    if not source:
        return dataclasses.replace(config.model, quantize="none")
    if source == "random":
        raise ValueError("distill.teacher_source='random': a teacher has trained weights (an "
                         "HF folder, a .gguf file, a cached hub id or a jrlhf run's export "
                         "folder; empty: the student's own model.source)")
    return dataclasses.replace(config.model, source=resolve_source(
        source, "distill.teacher_source"), arch=None, tokenizer="", quantize="none")


@functools.lru_cache(maxsize=1)
def _load(section: ModelSection, seed: int):
    return load_policy(section, seed, tokenizer=False)


def load_teacher(config: Config):
    """`(teacher_cfg, params)` of `teacher_section(config)`, params as host (NumPy) arrays.
    Loaded once per process (the last teacher is kept): the JSD term's head (`teacher_head`),
    the rollout's teacher forward and the vocabulary check all read the same copy."""
    cfg, params, _ = _load(teacher_section(config), config.run.seed)
    return cfg, params


def teacher_tokenizer(config: Config):
    """The teacher's tokenizer, as `load_policy` picks a source's (for `check_vocabularies`;
    random weights: `model.tokenizer`, default the embedded SmolLM2 one)."""
    section = teacher_section(config)
    tokenizer = _load(section, config.run.seed)[2]
    return tokenizer if tokenizer is not None else load_tokenizer(section.tokenizer or "smollm2")


def teacher_head(config: Config, *, abstract: bool = False) -> LMHead | None:
    """The teacher's `LMHead` for the JSD term (`distill.jsd_coef` > 0; else None). `abstract`:
    its shapes only (`jax.ShapeDtypeStruct` leaves, from the source's metadata: no weights are
    read), for `jrlhf plan`."""
    if not config.distill.jsd_coef:
        return None
    if abstract:
        cfg = model_config(teacher_section(config))
        return jax.eval_shape(lambda: LMHead.of(cfg, tfm.init_params(cfg, 0)))
    return LMHead.of(*load_teacher(config))


def teacher_width(config: Config) -> int:
    """The teacher's hidden size `D_t` (the JSD term's `teacher_hidden [B, N, D_t]`), from the
    source's metadata."""
    return model_config(teacher_section(config)).hidden_size
