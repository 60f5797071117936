"""The one attention function every forward uses: training, scoring, prefill and cached decode.

Shapes: B batch, T queries, S key slots, H query heads, K key/value heads (H a multiple of K:
grouped-query attention needs no repeated keys), Dh head size. q `[B, T, H, Dh]`,
k / v `[B, S, K, Dh]`.

Layout contract (how padding is honoured without a dense float mask):
- Self-attention (`self_attention`, T == S) is causal over *left-aligned* rows: each row's real
  tokens start at column 0 and padding only follows them. Causality alone then keeps every real
  query away from every padding key, so the fused kernels need no mask at all. The model
  left-aligns rows itself (`left_align`): a left-padded prompt + response row is rolled by its
  padding count before the layers and rolled back after, so callers keep whatever padding side
  they like, provided each row's `attention_mask` is one contiguous run of 1s (true of every
  batch jrlhf builds: right-padded SFT / preference rows, left-padded prompt + response rows).
- Packed rows (several examples per row) carry `segment_ids` `[B, T]` (1, 2, ... per example,
  0 on padding): a query sees only keys of its own segment. That is a boolean `[B, 1, T, T]`
  mask (never a float32 one); with cuDNN it becomes the kernel's bias.
- Reading a few positions (`attention_at`: a reward model's last token per row or per
  segment): the last layer runs its queries at those R columns only, against all T keys, with a
  boolean `[B, 1, R, T]` mask (R ≪ T).
- Cached decode (`cached_attention`) is one query per row against a cache whose row b holds
  real keys in slots `first_slot[b] .. slot` (a left-padded prompt, then one slot per decoded
  token): a `[B, 1, 1, S]` boolean mask, linear work per step. The cache is laid out
  `[B, K, Dh, S]` (`cache_entry`), not like k / v: it is the operand layout XLA's batched
  matmuls read for both products (q·kᵀ and p·v); with slots second, XLA copied every layer's
  whole cache into that layout at every decode step (on the Qwen3-shaped 6M benchmark model
  with 16 rows × 128 slots, ~1 ms of a ~6 ms CPU step).
- `window` (sliding-window attention, as in Mistral / Gemma 2-3's local layers): a query at
  position i sees keys at positions i − window + 1 .. i, the transformers convention.

- `softcap` (Gemma 2): attention logits become `softcap · tanh(logits / softcap)` before the
  softmax. `jax.nn.dot_product_attention` has no such option, so soft-capped attention runs as
  an explicit einsum (`_einsum_attention`) with a boolean mask: quadratic memory in T on
  the cache-free paths, as in transformers' eager Gemma 2 (its sdpa / flash paths refuse
  soft-capping too).
- `sinks [H]` (GPT-OSS's attention sinks): one learned logit per query head joins every
  query's softmax denominator, `p_j = exp(l_j) / (Σ_i exp(l_i) + exp(sink))`, and takes no value
  (the weights of a query sum to less than 1). No fused kernel takes it either: the einsum path
  again, as transformers' eager GPT-OSS (its sdpa path is refused as well). XLA's own attention
  materialises the `[B, H, T, S]` logits too, so this costs the XLA path no extra memory order.

Implementations (`model.attention`): "xla" (XLA's fused softmax attention; every platform),
"cudnn" (cuDNN's flash-attention kernel: CUDA GPUs, bfloat16 / float16 compute), "auto" (cuDNN
where it applies, else XLA; on TPU that is XLA's attention — no Pallas splash kernel is used).
Cached decode always runs on XLA: one query per row is a matrix-vector product bound by reading
the cache, which a flash kernel does not speed up.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn")
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def platform() -> str:
    """The default backend's platform: "cpu", "gpu" or "tpu"."""
    name = jax.default_backend()
    return "gpu" if name in ("gpu", "cuda") else name


def resolve_implementation(name: str, dtype, head_dim: int, on: str | None = None,
                           softcap: float | None = None, sinks: bool = False) -> str:
    """The implementation `name` means for compute `dtype` and `head_dim` on platform `on`
    (default: this process's); `softcap`: the model soft-caps attention logits, `sinks`: it has
    attention sinks, which only the XLA path does. "auto" never fails; naming one that cannot
    run is an error."""
    on = on or platform()
    dtype = jnp.dtype(dtype)
    if name == "cudnn" and softcap is not None:
        raise ValueError("model.attention='cudnn' cannot soft-cap attention logits (this model "
                         f"has attn_softcap={softcap}); use 'auto' or 'xla'")
    if name == "cudnn" and sinks:
        raise ValueError("model.attention='cudnn' cannot add attention sinks to the softmax "
                         "(this model has attention_sinks=True); use 'auto' or 'xla'")
    cudnn_ok = (on == "gpu" and dtype in _CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= 256
                and softcap is None and not sinks)
    if name == "auto":
        return "cudnn" if cudnn_ok else "xla"
    if name == "xla":
        return name
    if name == "cudnn":
        if on != "gpu":
            raise ValueError(f"model.attention='cudnn' needs a CUDA GPU, but JAX runs on {on!r}; "
                             "use 'auto' or 'xla'")
        if dtype not in _CUDNN_DTYPES:
            raise ValueError(f"model.attention='cudnn' needs bfloat16 or float16 compute, got "
                             f"model.dtype={dtype.name!r}")
        if not cudnn_ok:
            raise ValueError(f"model.attention='cudnn' needs head_dim a multiple of 8 and at most "
                             f"256, got {head_dim}")
        return name
    raise ValueError(f"model.attention must be one of {', '.join(IMPLEMENTATIONS)}, got {name!r}")


def leading_padding(attention_mask: jax.Array) -> jax.Array:
    """`[B]` number of padding columns before each row's first real token (0 if none)."""
    return jnp.argmax(attention_mask > 0, axis=-1).astype(jnp.int32)


def roll_rows(x: jax.Array, shift: jax.Array) -> jax.Array:
    """Row b of `x [B, T, ...]` rotated left by `shift[b]` columns (right by a negative one)."""
    T = x.shape[1]
    index = (jnp.arange(T)[None, :] + shift[:, None]) % T
    index = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def causal_visible(query_cols: jax.Array, num_keys: int, window: int | None = None) -> jax.Array:
    """Boolean `[..., R, num_keys]`: which key columns a query at column `query_cols [..., R]`
    sees — those at or before it and, with `window`, fewer than `window` columns back (the
    sliding-window convention of this module)."""
    keys = jnp.arange(num_keys)
    rows = query_cols[..., None]
    visible = keys <= rows
    if window is not None:
        visible &= keys > rows - window
    return visible


def self_attention(q, k, v, *, implementation: str, segment_ids=None,
                   window: int | None = None, scale: float | None = None,
                   softcap: float | None = None, sinks=None) -> jax.Array:
    """Causal attention of T left-aligned tokens over themselves. Returns `[B, T, H, Dh]`.

    `segment_ids [B, T]` restricts each query to keys of its own segment (packed rows).
    `scale`: logit scale (default Dh ** -0.5). `sinks [H]`: attention sinks (GPT-OSS; see the
    module docstring). Padding queries produce finite values that callers mask out.
    """
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    if softcap is not None or sinks is not None:
        visible = causal_visible(jnp.arange(q.shape[1]), q.shape[1], window)
        visible = visible[None, None] if mask is None else visible & mask
        return _einsum_attention(q, k, v, visible, scale, softcap, sinks)
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask,
                                        scale=scale, is_causal=True, local_window_size=local,
                                        implementation=implementation)


def attention_at(q, k, v, query_index, *, segment_ids=None, window: int | None = None,
                 scale: float | None = None, softcap: float | None = None,
                 sinks=None) -> jax.Array:
    """Causal attention of R queries sitting at columns `query_index [B, R]` of left-aligned
    rows over all T keys of those rows (`q [B, R, H, Dh]`, `k / v [B, T, K, Dh]`). Returns
    `[B, R, H, Dh]`, equal to rows `query_index` of `self_attention` over all T queries.

    For R much smaller than T (a reward read at one token per row or per segment): a boolean
    `[B, 1, R, T]` mask on XLA's attention, linear work per query as in cached decode. `sinks
    [H]` as in `self_attention`.
    """
    visible = causal_visible(query_index, k.shape[1], window)
    if segment_ids is not None:
        own = jnp.take_along_axis(segment_ids, query_index, axis=1)
        visible &= own[:, :, None] == segment_ids[:, None, :]
    if softcap is not None or sinks is not None:
        return _einsum_attention(q, k, v, visible[:, None], scale, softcap, sinks)
    return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype),
                                        mask=visible[:, None], scale=scale, implementation="xla")


def cache_entry(x: jax.Array, shift: jax.Array, cache_size: int, dtype) -> jax.Array:
    """One layer's keys or values `x [B, T, K, Dh]` of left-aligned rows as a KV-cache entry
    `[B, K, Dh, cache_size]` in `dtype`: row b rolled back right by `shift[b]` (its padding
    first, as the caller's left-padded ids lay it out), slots T .. cache_size − 1 zero."""
    x = jnp.transpose(roll_rows(x, -shift).astype(dtype), (0, 2, 3, 1))
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, cache_size - x.shape[-1])))


def write_cache(cache: jax.Array, x: jax.Array, slot) -> jax.Array:
    """`cache [B, K, Dh, S]` with this step's keys or values `x [B, 1, K, Dh]` written at slot
    `slot`: one number for every row, or `[B]` (each row its own, as continuous batching's
    slots are)."""
    x = x[:, 0].astype(cache.dtype)
    if jnp.ndim(slot) == 0:
        return jax.lax.dynamic_update_slice(cache, x[..., None], (0, 0, 0, slot))
    return cache.at[jnp.arange(cache.shape[0]), :, :, slot].set(x)


def cached_attention(q, keys, values, first_slot, slot, *, window: int | None = None,
                     scale: float | None = None, softcap: float | None = None, sinks=None):
    """One decode query per row (`q [B, 1, H, Dh]`, sitting at cache slot `slot`: one number,
    or `[B]`, each row's own) against the cache `keys / values [B, K, Dh, S]` (`cache_entry`),
    whose row b is real from `first_slot[b]` to its slot; `sinks [H]` as in `self_attention`.
    Logits and softmax in float32 (as XLA's attention). Returns `[B, 1, H, Dh]` in q's dtype."""
    B, _, H, Dh = q.shape
    K, S = keys.shape[1], keys.shape[3]
    scale = Dh ** -0.5 if scale is None else scale
    visible = ((jnp.arange(S)[None, :] >= first_slot[:, None])
               & causal_visible(jnp.reshape(slot, (-1,)), S, window))  # [B, S]
    qg = q.reshape(B, K, H // K, Dh)
    logits = jnp.einsum("bkgd,bkds->bkgs", qg, keys.astype(q.dtype),
                        preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    logits = jnp.where(visible[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    if sinks is None:
        probs = jax.nn.softmax(logits, axis=-1)
    else:  # the sink joins the denominator only: [B, K, G, 1]
        sink = sinks.astype(jnp.float32).reshape(1, K, H // K, 1)
        probs = jnp.exp(logits - jnp.logaddexp(
            jax.nn.logsumexp(logits, axis=-1, keepdims=True), sink))
    out = jnp.einsum("bkgs,bkds->bkgd", probs.astype(q.dtype), values.astype(q.dtype))
    return out.reshape(B, 1, H, Dh)


def _einsum_attention(q, k, v, visible, scale, softcap, sinks=None):
    """Softmax attention as explicit einsums, with soft-capped logits (`softcap`) and / or
    attention sinks (`sinks [H]`, query head h = kv head h // G): `q [B, T, H, Dh]`,
    `k / v [B, S, K, Dh]`, `visible` boolean, broadcastable to `[B, 1, T, S]`. Logits and
    softmax in float32 (as transformers' eager Gemma 2 / GPT-OSS). Returns `[B, T, H, Dh]` in
    q's dtype."""
    B, T, H, Dh = q.shape
    K = k.shape[2]
    scale = Dh ** -0.5 if scale is None else scale
    qg = q.reshape(B, T, K, H // K, Dh)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(q.dtype),
                        preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    logits = jnp.where(visible[:, :, None], logits, jnp.finfo(jnp.float32).min)
    if sinks is None:
        probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    else:  # the sink joins the denominator only: [B, K, G, T, 1]
        sink = sinks.astype(jnp.float32).reshape(1, K, H // K, 1, 1)
        lse = jnp.logaddexp(jax.nn.logsumexp(logits, axis=-1, keepdims=True), sink)
        probs = jnp.exp(logits - lse).astype(q.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(q.dtype))
    return out.reshape(B, T, H, Dh)


def shared_prompt_attention(q, k, v, *, groups: int, prompt_length: int, prompt_real,
                            prompt_positions, response_positions, implementation: str,
                            window: int | None = None, scale: float | None = None,
                            softcap: float | None = None, sinks=None) -> jax.Array:
    """Attention of grouped rows whose K = B / G rows of a group share one prompt, which is
    computed once (`transformer.Transformer.shared_prompt`).

    The tokens come flat, `q [1, M, H, Dh]`, `k / v [1, M, K_kv, Dh]`, M = G·P + B·N: first the
    G left-aligned prompts of P columns (`prompt_real [G, P]` bool, `prompt_positions [G, P]`),
    then the B right-padded responses of N columns (`response_positions [B, N]`, row b of group
    b // K). A prompt token attends causally within its prompt (`self_attention`); a response
    token attends to its group's real prompt tokens and causally to its own row's response,
    both through `window`. Response-to-response visibility is by column (padding follows the
    real tokens, so a real query never sees it), response-to-prompt by position. Returns
    `[1, M, H, Dh]`: per token what `self_attention` gives the same token in its full
    prompt + response row (up to float32 rounding: the softmax sums the same terms in another
    order). The prompt's keys are never repeated K times: the response logits against them
    are one einsum over `[G, K, ...]`, and in the backward pass their gradients add up over
    the group there.
    """
    G, P = groups, prompt_length
    _, M, H, Dh = q.shape
    Kv = k.shape[2]
    N = response_positions.shape[1]
    B = (M - G * P) // N
    K, g = B // G, H // Kv
    scale = Dh ** -0.5 if scale is None else scale
    qp, kp, vp = (x[0, :G * P].reshape(G, P, *x.shape[2:]) for x in (q, k, v))
    qr, kr, vr = (x[0, G * P:].reshape(B, N, *x.shape[2:]) for x in (q, k, v))
    prompt_out = self_attention(qp, kp, vp, implementation=implementation, window=window,
                                scale=scale, softcap=softcap, sinks=sinks)
    # Response queries [G, K, N, Kv, g, Dh] against the group's prompt keys and their own row.
    qg = qr.reshape(G, K, N, Kv, g, Dh)
    to_prompt = jnp.einsum("gknhqd,gphd->gkhqnp", qg, kp.astype(q.dtype),
                           preferred_element_type=jnp.float32).reshape(B, Kv, g, N, P)
    to_own = jnp.einsum("bnhqd,bmhd->bhqnm", qr.reshape(B, N, Kv, g, Dh), kr.astype(q.dtype),
                        preferred_element_type=jnp.float32)
    logits = jnp.concatenate([to_prompt, to_own], axis=-1) * scale  # [B, Kv, g, N, P + N]
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    key_positions = jnp.repeat(prompt_positions, K, axis=0)  # [B, P]
    sees_prompt = (jnp.repeat(prompt_real, K, axis=0)[:, None, :]
                   & (key_positions[:, None, :] <= response_positions[:, :, None]))
    if window is not None:
        sees_prompt &= key_positions[:, None, :] > response_positions[:, :, None] - window
    sees_own = jnp.broadcast_to(causal_visible(jnp.arange(N), N, window), (B, N, N))
    visible = jnp.concatenate([sees_prompt, sees_own], axis=-1)[:, None, None]
    logits = jnp.where(visible, logits, jnp.finfo(jnp.float32).min)
    if sinks is None:
        probs = jax.nn.softmax(logits, axis=-1)
    else:  # the sink joins the denominator only
        sink = sinks.astype(jnp.float32).reshape(1, Kv, g, 1, 1)
        probs = jnp.exp(logits - jnp.logaddexp(
            jax.nn.logsumexp(logits, axis=-1, keepdims=True), sink))
    probs = probs.astype(q.dtype)
    from_prompt = jnp.einsum("gkhqnp,gphd->gknhqd", probs[..., :P].reshape(G, K, Kv, g, N, P),
                             vp.astype(q.dtype)).reshape(B, N, H, Dh)
    from_own = jnp.einsum("bhqnm,bmhd->bnhqd", probs[..., P:],
                          vr.astype(q.dtype)).reshape(B, N, H, Dh)
    response_out = from_prompt + from_own
    return jnp.concatenate([prompt_out.reshape(G * P, H, Dh),
                            response_out.reshape(B * N, H, Dh)])[None]
