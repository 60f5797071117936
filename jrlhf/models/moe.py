"""Mixture-of-experts MLPs (Qwen2-MoE, Qwen3-MoE, Mixtral, GPT-OSS): routing, dropless grouped
matmuls and the router's statistics, as pure functions over arrays; `transformer.SparseMLP` holds
the weights.

Shapes: N tokens (a layer's `[B, T]` flattened), D hidden size, E experts, k experts per token,
F one expert's intermediate size.

Dropless: every token reaches all k of its experts, however unevenly they are loaded. The N·k
(token, expert) pairs are sorted by expert and each expert's contiguous run goes through one
grouped matmul, `jax.lax.ragged_dot` (XLA's own grouped GEMM: lowered to one kernel per
projection on GPU and TPU, differentiable, no capacity factor and no padding to a per-expert
maximum). Why not a one-hot dense dispatch: it computes all E experts for every token (E/k
times the FLOPs) or drops tokens past a capacity; why not a Pallas megablox kernel: `ragged_dot`
is what JAX lowers to it where it pays, and it runs everywhere, the CPU tests included.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
    """Where each token goes: `experts [N, k]` (int32) and their combine `weights [N, k]`."""

    experts: jax.Array
    weights: jax.Array


class RouterStats(NamedTuple):
    """Per-layer sums over the real tokens of one forward (padding excluded), the inputs of the
    load-balancing loss, the z-loss and the load metrics. Stacked over a model's sparse layers
    they are `[L, E]` / `[L]`."""

    counts: jax.Array  # [E] (token, expert) assignments per expert: sums to k · tokens
    probs: jax.Array  # [E] router probabilities (softmax over all E) summed over tokens
    z: jax.Array  # [] sum over tokens of logsumexp(router logits)²
    tokens: jax.Array  # [] real tokens
    # [] real tokens whose chosen expert set differs from the recorded one (0 without one)
    differs: jax.Array = 0.0


def router_probs(logits: jax.Array) -> jax.Array:
    """Softmax over the experts in float32: `logits [N, E]` -> `[N, E]`."""
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def combine_weights(probs: jax.Array, experts: jax.Array, normalize: bool) -> jax.Array:
    """The chosen experts' probabilities `[N, k]` (`probs [N, E]`, `experts [N, k]`), divided by
    their sum when `normalize` (Mixtral always, Qwen with `norm_topk_prob`). Differentiable in
    `probs` whatever chose `experts`: routing replay passes the experts the sampler recorded and
    the router still gets gradients through these weights."""
    weights = jnp.take_along_axis(probs, experts, axis=-1)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights


def route(logits: jax.Array, k: int, normalize: bool, experts: jax.Array | None = None
          ) -> Routing:
    """Top-k softmax routing of `logits [N, E]`: the k most probable experts per token (or the
    given `experts [N, k]`: routing replay) and their `combine_weights`."""
    probs = router_probs(logits)
    if experts is None:
        experts = jax.lax.top_k(probs, k)[1]
    experts = experts.astype(jnp.int32)
    return Routing(experts, combine_weights(probs, experts, normalize))


def route_topk_softmax(logits: jax.Array, k: int, experts: jax.Array | None = None) -> Routing:
    """GPT-OSS routing of `logits [N, E]`: the k largest logits per token (or the given
    `experts [N, k]`: routing replay), weighted by a softmax over those k logits alone (float32;
    the weights sum to 1 without renormalising)."""
    logits = logits.astype(jnp.float32)
    if experts is None:
        experts = jax.lax.top_k(logits, k)[1]
    experts = experts.astype(jnp.int32)
    chosen = jnp.take_along_axis(logits, experts, axis=-1)  # [N, k]
    return Routing(experts, jax.nn.softmax(chosen, axis=-1))


def clamped_swiglu(gate: jax.Array, up: jax.Array, limit: float, alpha: float) -> jax.Array:
    """GPT-OSS's expert activation, elementwise over `gate, up [..., F]`: the gate clamped above
    at `limit`, the up projection to [−limit, limit], then `(up + 1) · gate · σ(alpha · gate)`."""
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
    return (up + 1) * (gate * jax.nn.sigmoid(gate * alpha))


def grouped_mlp(x: jax.Array, routing: Routing, gate: jax.Array, up: jax.Array,
                down: jax.Array, activation, dtype, *, biases=None, glu=None,
                first_expert=0, num_experts: int | None = None) -> jax.Array:
    """`Σ_j weights[n, j] · down_e(act(gate_e x_n) · up_e x_n)` over each token's experts
    e = experts[n, j]: `x [N, D]`, `gate, up [E, D, F]`, `down [E, F, D]` -> `[N, D]`.

    `biases = (gate_bias [E, F], up_bias [E, F], down_bias [E, D])` (GPT-OSS): each pair's
    expert's biases added to its projections' outputs. `glu(gate x, up x) -> [.., F]` replaces
    `activation(gate x) · up x` (GPT-OSS: `clamped_swiglu`).
    Expert parallelism (`jrlhf.models.expert_parallel`): the weights hold experts
    `first_expert .. first_expert + E − 1` of `num_experts`; only pairs routed to those are
    computed (sorted first), the others add nothing.
    Matmuls run in `dtype` (the compute dtype); the weighted sum of a token's k outputs in that
    dtype too, as the reference implementations add them."""
    N, D = x.shape
    E = gate.shape[0]
    k = routing.experts.shape[1]
    # Key of each pair: its expert's index among these weights (>= E: another device's).
    key = ((routing.experts - first_expert) % (num_experts or E)).reshape(-1)  # [N·k]
    order = jnp.argsort(key, stable=True)  # pairs sorted by expert, ours first
    token = order // k
    sorted_key = jnp.take(key, order)
    group_sizes = jnp.bincount(jnp.minimum(key, E), length=E + 1)[:E].astype(jnp.int32)
    xs = jnp.take(x.astype(dtype), token, axis=0)  # [N·k, D]

    def matmul(a, w, bias=None):
        y = jax.lax.ragged_dot(a, w.astype(dtype), group_sizes, preferred_element_type=dtype)
        if bias is None:
            return y
        return y + jnp.take(bias.astype(dtype), jnp.minimum(sorted_key, E - 1), axis=0)

    gate_bias, up_bias, down_bias = (None,) * 3 if biases is None else biases
    if glu is None:
        h = activation(matmul(xs, gate, gate_bias)) * matmul(xs, up, up_bias)
    else:
        h = glu(matmul(xs, gate, gate_bias), matmul(xs, up, up_bias))
    ys = matmul(h, down, down_bias)  # [N·k, D]
    ys = ys * jnp.take(routing.weights.reshape(-1), order).astype(dtype)[:, None]
    if num_experts is not None and num_experts != E:  # rows past our groups: not computed
        ys = jnp.where((sorted_key < E)[:, None], ys, 0.0)
    return jnp.zeros((N, D), dtype).at[token].add(ys)


def router_stats(logits: jax.Array, experts: jax.Array, real: jax.Array,
                 recorded: jax.Array | None = None) -> RouterStats:
    """`RouterStats` of one layer: `logits [N, E]`, `experts [N, k]` (those used), `real [N]`
    (1 for real tokens, 0 for padding); `recorded [N, k]`: a sampler's experts, against which
    the router's own top-k set (`logits`) is compared (`differs`)."""
    E = logits.shape[-1]
    real = real.astype(jnp.float32)
    probs = router_probs(logits)
    counts = jnp.zeros((E,), jnp.float32).at[experts.reshape(-1)].add(
        jnp.repeat(real, experts.shape[1]))
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    differs = jnp.zeros((), jnp.float32)
    if recorded is not None:
        own = jnp.sort(jax.lax.top_k(logits.astype(jnp.float32), experts.shape[1])[1], axis=-1)
        same = jnp.all(own == jnp.sort(recorded.astype(own.dtype), axis=-1), axis=-1)
        differs = jnp.sum(jnp.where(same, 0.0, real))
    return RouterStats(counts=counts, probs=jnp.sum(probs * real[:, None], axis=0),
                       z=jnp.sum(jnp.square(lse) * real), tokens=jnp.sum(real), differs=differs)


def load_balancing_loss(stats: RouterStats) -> jax.Array:
    """The Switch-Transformer auxiliary loss as transformers computes it for these families
    (`load_balancing_loss_func`): over all sparse layers' real tokens pooled, E · Σ_e f_e · P_e
    with f_e the share of tokens sent to expert e (summed over the k choices) and P_e the mean
    router probability of e. 1·k when perfectly balanced. `stats`: stacked `[L, E]`."""
    total = jnp.maximum(jnp.sum(stats.tokens), 1.0)
    f = jnp.sum(stats.counts, axis=0) / total
    p = jnp.sum(stats.probs, axis=0) / total
    return stats.counts.shape[-1] * jnp.sum(f * p)


def z_loss(stats: RouterStats) -> jax.Array:
    """Router z-loss (ST-MoE): the mean over layers and real tokens of logsumexp(logits)²."""
    return jnp.sum(stats.z) / jnp.maximum(jnp.sum(stats.tokens), 1.0)


def load_metrics(stats: RouterStats) -> dict[str, jax.Array]:
    """Expert load per step: the largest expert's share of its layer's assignments (1/E when
    balanced; the max over layers) and the entropy of the load (ln E when balanced; the mean
    over layers), 0 dropped tokens (the compute is dropless), and the share of (layer, token)
    routings that differ from a sampler's recorded ones (0 when none were compared)."""
    share = stats.counts / jnp.maximum(jnp.sum(stats.counts, axis=-1, keepdims=True), 1.0)
    entropy = -jnp.sum(jnp.where(share > 0, share * jnp.log(jnp.maximum(share, 1e-30)), 0.0),
                       axis=-1)
    differs = jnp.sum(stats.differs) / jnp.maximum(jnp.sum(stats.tokens), 1.0)
    return {"moe/load_max_share": jnp.max(share), "moe/load_entropy": jnp.mean(entropy),
            "moe/dropped_tokens": jnp.zeros((), jnp.float32), "moe/routing_differs": differs}
