"""Rewards as plug-ins: one interface for PPO, GRPO/RLOO, the ranking stage and evaluation.

A `Reward` is one of
- a jittable `fn(params, prompt_ids, prompt_mask, response_ids, response_mask) -> [B]` with its
  `params` (a reward model: `Reward.from_model`), computed on the device inside the rollout's
  scoring function;
- a host function `text_fn(prompts: list[str], responses: list[str]) -> [B]` over the decoded
  texts (`Reward.host`), e.g. a verifier or the task's annotator;
- a weighted sum of several (`Reward.weighted`).

Host functions run while the device computes the rollout's log-probs (the scoring call is
dispatched first). A host function that raises, or any part that returns a non-finite score, is
a `RewardError` naming the reward and the offending prompt: never swallowed, never trained on.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jrlhf.models.config import ModelConfig


class RewardError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Reward:
    """A reward: a device part (`fn`, `params`), a host part (`text_fn` over decoded prompts and
    responses, with `decode(tokens, mask) -> texts`), or a weighted sum (`parts`)."""

    fn: Callable | None = None
    params: Any = None
    text_fn: Callable | None = None
    decode: Callable | None = None
    parts: tuple = ()  # ((weight, Reward), ...) for a weighted sum
    name: str = "reward"

    def __post_init__(self):
        kinds = (self.fn is not None) + (self.text_fn is not None) + bool(self.parts)
        if kinds != 1:
            raise ValueError("a Reward is exactly one of fn (jittable), text_fn (host) or parts "
                             "(a weighted sum)")
        for weight, part in self.parts:
            if not isinstance(part, Reward) or part.parts:
                raise ValueError("Reward.weighted takes (weight, Reward) pairs of single rewards")
            if not np.isfinite(weight):
                raise ValueError(f"reward weight {weight!r} of {part.name!r} is not finite")

    @classmethod
    def from_model(cls, rm_cfg: ModelConfig, rm_params, name: str = "model") -> Reward:
        from jrlhf.steps.rollout import reward_model_fn

        return cls(fn=reward_model_fn(rm_cfg), params=rm_params, name=name)

    @classmethod
    def host(cls, text_fn: Callable, decode: Callable, name: str = "") -> Reward:
        return cls(text_fn=text_fn, decode=decode,
                   name=name or getattr(text_fn, "__name__", "host reward"))

    @classmethod
    def weighted(cls, parts: Sequence[tuple[float, Reward]]) -> Reward:
        parts = tuple((float(w), r) for w, r in parts)
        if len(parts) == 1 and parts[0][0] == 1.0:
            return parts[0][1]
        return cls(parts=parts, name=" + ".join(f"{w:g}·{r.name}" for w, r in parts))

    def _leaves(self) -> tuple[tuple[float, Reward], ...]:
        return self.parts or ((1.0, self),)

    @property
    def on_device(self) -> tuple[tuple[float, Reward], ...]:
        return tuple((w, r) for w, r in self._leaves() if r.fn is not None)

    @property
    def on_host(self) -> tuple[tuple[float, Reward], ...]:
        return tuple((w, r) for w, r in self._leaves() if r.text_fn is not None)

    def device_fn(self) -> Callable:
        """A jittable `fn(params, prompt_ids, prompt_mask, response_ids, response_mask) -> [B]`:
        the weighted sum of the device parts (`device_params()` is its params); zeros when
        there are none."""
        weights = tuple(w for w, _ in self.on_device)
        fns = tuple(r.fn for _, r in self.on_device)

        def fn(params, prompt_ids, *args):
            total = jnp.zeros(prompt_ids.shape[0], jnp.float32)
            for w, f, p in zip(weights, fns, params):
                total = total + w * f(p, prompt_ids, *args).astype(jnp.float32)
            return total

        return fn

    @functools.cached_property
    def _jitted_device_fn(self):
        return jax.jit(self.device_fn())

    def device_params(self) -> tuple:
        return tuple(r.params for _, r in self.on_device)

    def decode_texts(self, prompt_ids, prompt_mask, response_ids, response_mask):
        """`(prompts, responses)` as text, with the first host part's `decode`."""
        decode = self.on_host[0][1].decode
        return decode(prompt_ids, prompt_mask), decode(response_ids, response_mask)

    def host_scores(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """The weighted sum `[B]` of the host parts over decoded texts (0 without any)."""
        total = np.zeros(len(responses), np.float64)
        for weight, part in self.on_host:
            total += weight * _call_host(part, prompts, responses)
        return total.astype(np.float32)

    def scores(self, prompt_ids, prompt_mask, response_ids, response_mask) -> np.ndarray:
        """Every part's weighted sum `[B]` as NumPy, checked finite (the ranking stage and
        evaluation; rollouts split the work to overlap it)."""
        total = np.zeros(len(response_ids), np.float32)
        prompts = None
        if self.on_host:
            prompts, responses = self.decode_texts(prompt_ids, prompt_mask, response_ids,
                                                   response_mask)
            total += self.host_scores(prompts, responses)
        if self.on_device:
            device = self._jitted_device_fn(self.device_params(), *map(jnp.asarray, (
                prompt_ids, prompt_mask, response_ids, response_mask)))
            total += np.asarray(device)
        check_finite(self, total, prompts)
        return total


def _call_host(part: Reward, prompts: list[str], responses: list[str]) -> np.ndarray:
    """`part.text_fn` over the batch; if it raises, the rows are retried one by one to name the
    first prompt it fails on."""
    try:
        out = np.asarray(part.text_fn(prompts, responses), np.float64).reshape(-1)
    except Exception as err:  # noqa: BLE001 - any failure is reported with its prompt
        for prompt, response in zip(prompts, responses):
            try:
                part.text_fn([prompt], [response])
            except Exception as row_err:  # noqa: BLE001
                raise RewardError(f"reward {part.name!r} raised {type(row_err).__name__}: "
                                  f"{row_err} (prompt {prompt!r}, response {response!r})") from None
        raise RewardError(f"reward {part.name!r} raised {type(err).__name__}: {err} on a "
                          f"batch of {len(prompts)} (no single row fails alone)") from None
    if out.shape != (len(responses),):
        raise RewardError(f"reward {part.name!r} returned {out.shape[0]} scores for "
                          f"{len(responses)} responses")
    check_finite(part, out, prompts)
    return out


def check_finite(reward: Reward, scores, prompts: list[str] | None) -> None:
    """Raise naming the reward and the first row's prompt when a score is NaN or infinite."""
    scores = np.asarray(scores)
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        i = int(bad[0])
        where = f"prompt {prompts[i]!r}" if prompts is not None else f"row {i}"
        raise RewardError(f"reward {reward.name!r} returned {scores[i]} for {where} "
                          f"({len(bad)} of {len(scores)} rows not finite)")


def import_host_reward(path: str, decode: Callable) -> Reward:
    """A host reward from `"package.module:function"`: `function(prompts, responses) -> [B]`."""
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ValueError(f"reward function {path!r}: expected 'module:function'")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward function {path!r} cannot be imported: {err}") from None
    return Reward.host(fn, decode, name=path)
