"""Multi-turn episodes with an environment, token-in token-out (host-side orchestration).

An `Environment` is host Python: `reset(prompt) -> first observation` and
`step(response) -> (observation, reward, done)`. `run_episodes` plays one episode per prompt:
each turn the device sampler continues every active episode's exact token ids so far (prompt,
then the policy's sampled tokens and the observations' tokens of earlier turns, never decoded
and re-encoded), the new turn's tokens alone are decoded for the environment, and the
environment's observation is encoded on its own (wrapped in the tokenizer's chat template as a
tool turn when it has one) and appended. So the trainer sees exactly the ids the sampler
produced, and each observation exactly as it was encoded.

The batch is `jrlhf.steps.rollout`'s layout (B episodes, P prompt columns, N =
`max_episode_tokens` response columns):
  input_ids        [B, P+N]  left-padded prompt, then the episode: policy and observation
                             tokens in order, right-padded
  attention_mask   [B, P+N]  1 on prompt, policy and observation tokens
  response_mask    [B, N]    1 on policy-sampled tokens only (observations and padding 0;
                             a skipped episode's row is all 0): the mask has holes between turns
  sampler_logprobs [B, N]    the sampler's log-probs of policy tokens, 0 elsewhere
  scores           [B]       the episode's summed environment reward (0 when skipped)
  turns            [B]       policy turns sampled
The logits predicting response column t sit at column P - 1 + t, as in a one-turn rollout.

Episode ends, each counted in `EpisodeBatch.counts`: the environment said done; a turn used
its `max_turn_tokens` without EOS (`turn_budget`), or the episode's `max_episode_tokens` ran
out mid-turn or would be exceeded by an observation (`episode_budget`); `max_turns` policy
turns sampled (`max_turns`). An environment call that raises (`env_error`), runs past
`timeout_s` (`env_timeout`) or returns a NaN / infinite reward (`nan_reward`) ends its episode
with one line naming the environment class and the prompt: `on_error="stop"` raises it
(`EnvError`), `on_error="skip"` logs it, zeroes the episode's `response_mask` and score and
counts it (`skipped`).

Environment calls run in their own (daemon) threads, concurrently. With a whole-turn sampler
(`SampleTurn`) and `groups > 1` the episodes are split into that many interleaved groups that
take turns on the device, so one group's environment calls run while the device samples
another's. With a `TurnDecoder` (decode slots that persist across device calls) a turn's call
starts as soon as that turn ends, while the other slots decode, and the episode's next turn
enters a free slot as soon as the answer is back. A hung call is abandoned (its thread is left
to finish on its own), never waited for past its deadline.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

import numpy as np

log = logging.getLogger(__name__)

OnError = Literal["skip", "stop"]
COUNT_KEYS = ("episodes", "turns", "done", "turn_budget", "episode_budget", "max_turns",
              "env_error", "env_timeout", "nan_reward", "skipped")
# sample_turn(context_ids [B, T] int32 left-padded, context_mask [B, T], budgets [B] int32)
#   -> (tokens [B, M], mask [B, M], logprobs [B, M]): row b's new tokens, mask 1 on the first
#   budgets[b] or fewer (up to and including EOS). Rows with budget 0 are finished episodes
#   kept for fixed shapes: their outputs are ignored.
SampleTurn = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[Any, Any, Any]]


class Entry(NamedTuple):
    """A turn entering a decode slot (`TurnDecoder.advance`)."""

    slot: int
    context: list[int]  # the episode's exact ids so far: prompt, turns and observations
    budget: int  # at most this many new tokens (1..max_turn_tokens)
    episode: int  # the episode's index in the batch and ...
    turn: int  # ... its turn's (from 0): the turn's sampling key


@runtime_checkable
class TurnDecoder(Protocol):
    """Device decode slots that persist across calls (`rollout.slots`): a turn enters a free
    slot when its context is ready and leaves it when it ends, while the other slots go on."""

    def open(self, episodes: int, width: int) -> int:
        """Fresh slots for a batch of `episodes` episodes whose contexts are at most `width`
        tokens (P + max_episode_tokens); returns how many slots, S."""

    def advance(self, entering: Sequence[Entry]) -> dict[int, tuple[list[int], list[float]]]:
        """Enter `entering` into their (free) slots and decode a few steps; returns the turns
        that ended in this call: `{slot: (tokens up to and including EOS, log-probs)}`."""

    def agree(self, flags: np.ndarray) -> np.ndarray:
        """`flags` as the first process has them (every process calls it: a timing-based
        choice made there, so that every process feeds the device the same rows)."""


@runtime_checkable
class Environment(Protocol):
    """One episode's environment (host Python; one instance per episode, or reused only
    after `reset`)."""

    def reset(self, prompt: str) -> str:
        """Start an episode for `prompt` (its text as the model sees it); returns the first
        observation, encoded as is and appended to the prompt's ids ("" for none)."""

    def step(self, response: str) -> tuple[str, float, bool]:
        """The policy's turn as text (without its EOS) -> `(observation, reward, done)`. The
        observation is appended before the next turn unless `done`."""


class EnvError(RuntimeError):
    """An environment call failed, hung or gave a NaN reward under `on_error="stop"`; the
    message is one line naming the environment and the prompt."""


def error_line(env, prompt: str, what: str) -> str:
    """The one-line report of a failed environment call: environment class, prompt, cause."""
    short = prompt if len(prompt) <= 80 else prompt[:77] + "..."
    name = type(getattr(env, "wrapped", env)).__name__
    return " ".join(f"environment {name} on prompt {short!r}: {what}".split())


class Delayed:
    """`wrapped` whose `step` answers after a random 0..`latency_s` seconds more: a slow tool,
    simulated (`env.simulated_latency_s`), to measure how much tool latency a rollout hides."""

    def __init__(self, wrapped: Environment, latency_s: float, rng: random.Random):
        self.wrapped, self.latency_s, self.rng = wrapped, latency_s, rng

    def reset(self, prompt: str) -> str:
        return self.wrapped.reset(prompt)

    def step(self, response: str) -> tuple[str, float, bool]:
        time.sleep(self.rng.uniform(0.0, self.latency_s))
        return self.wrapped.step(response)


def observation_template(tokenizer, role: str = "tool", eos_text: str | None = None):
    """`(before, after)`: the text the tokenizer's chat template puts around an observation
    turn of `role` that follows an assistant turn, from right after the assistant's end-of-turn
    token (`eos_text`, default the tokenizer's EOS) up to and including the next assistant
    generation prompt. None when the tokenizer has no chat template.

    Rendered once on placeholder turns; only the suffix is used, so the earlier turns' ids are
    never re-tokenised. If the template does not end assistant turns with `eos_text`, the
    suffix starts right after the assistant's text.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    eos_text = tokenizer.eos_token if eos_text is None else eos_text
    reply, obs = "\x00REPLY\x00", "\x00OBSERVATION\x00"
    turns = [{"role": "user", "content": "question"}, {"role": "assistant", "content": reply}]
    try:
        text = tokenizer.apply_chat_template(turns + [{"role": role, "content": obs}],
                                             tokenize=False, add_generation_prompt=True)
        start = text.index(reply) + len(reply)
    except Exception as err:  # noqa: BLE001 - a template's own error, reported in one line
        raise ValueError(f"the tokenizer's chat template cannot render a {role!r} turn after "
                         f"an assistant turn ({type(err).__name__}: {err}); choose another "
                         f"observation_role, or chat_template=False") from None
    if eos_text and text.startswith(eos_text, start):
        start += len(eos_text)
    before, after = text[start:].split(obs)
    return before, after


def encode_observation(tokenizer, text: str, template=None) -> list[int]:
    """Token ids of one observation: `text` alone, or wrapped in `template` (`(before,
    after)` from `observation_template`), encoded without special tokens added."""
    if template is not None:
        text = template[0] + text + template[1]
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def left_pad(rows: Sequence[Sequence[int]], width: int, pad_id: int):
    """`(ids [B, width] int32, mask [B, width] int32)`: each row right-aligned (left-padded)."""
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for b, row in enumerate(rows):
        if len(row) > width:
            raise ValueError(f"row {b} has {len(row)} tokens, more than the width {width}")
        if row:
            ids[b, width - len(row):] = row
            mask[b, width - len(row):] = 1
    return ids, mask


def call_soon(fn, *args) -> concurrent.futures.Future:
    """`fn(*args)` started now in a daemon thread; its result or exception in the future. A
    daemon thread, so a call that never returns cannot keep the process alive."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run():
        try:
            future.set_result(fn(*args))
        except BaseException as err:  # noqa: BLE001 - handed to the waiting caller
            future.set_exception(err)

    threading.Thread(target=run, daemon=True, name="jrlhf-env-call").start()
    return future


@dataclasses.dataclass
class _Episode:
    """One episode's host state: its exact response tokens so far."""

    env: Any
    prompt: str
    prompt_ids: list[int]
    tokens: list[int] = dataclasses.field(default_factory=list)
    policy: list[int] = dataclasses.field(default_factory=list)  # 1 policy, 0 observation
    logprobs: list[float] = dataclasses.field(default_factory=list)
    score: float = 0.0
    turns: int = 0
    active: bool = True
    skipped: bool = False
    end: str = ""  # why it ended: a `COUNT_KEYS` cause ("done", "turn_budget", ...)
    pending: Any = None  # (future, deadline) of the environment call in flight

    def add(self, tokens, policy: int, logprobs=None):
        self.tokens += [int(t) for t in tokens]
        self.policy += [policy] * len(tokens)
        self.logprobs += ([float(x) for x in logprobs] if logprobs is not None
                          else [0.0] * len(tokens))


def ended_by(counts: dict) -> str:
    """How episodes ended, for a log line: the non-zero end and skip counts of `counts`
    (`COUNT_KEYS`, or `env/`-less metric names), e.g. "done 62, turn_budget 1"."""
    return ", ".join(f"{k} {v:g}" for k, v in counts.items()
                     if v and k not in ("episodes", "turns"))


@dataclasses.dataclass
class EpisodeBatch:
    """`batch`: the rollout arrays (module docstring); `counts`: episode ends and skips by
    cause (`COUNT_KEYS`); `errors`: the one-line reports of skipped episodes; `ends`: each
    episode's own end (its `COUNT_KEYS` cause: "done", "turn_budget", "episode_budget",
    "max_turns", or the failure that skipped it); `wait_s`: seconds the host waited on
    environment calls with nothing for the device to decode."""

    batch: dict[str, np.ndarray]
    counts: dict[str, int]
    errors: list[str]
    ends: list[str] = dataclasses.field(default_factory=list)
    wait_s: float = 0.0  # seconds the host sat blocked on environment calls

    @property
    def truncated(self) -> np.ndarray:
        """`[B]` bool: episodes cut by a token budget (`turn_budget`, `episode_budget`), the
        multi-turn counterpart of a response cut at `max_new_tokens` without EOS."""
        return np.array([e in ("turn_budget", "episode_budget") for e in self.ends], bool)

    def metrics(self) -> dict[str, float]:
        """`counts` as `env/<key>` metrics."""
        return {f"env/{k}": float(v) for k, v in self.counts.items()}


def run_episodes(sampler: SampleTurn | TurnDecoder, envs: Sequence[Environment],
                 prompt_ids: Sequence[Sequence[int]], tokenizer, *, max_turn_tokens: int,
                 max_episode_tokens: int, prompts: Sequence[str] | None = None,
                 max_turns: int | None = None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, prompt_width: int | None = None,
                 timeout_s: float = 30.0, on_error: OnError = "skip",
                 chat_template: bool = True, observation_role: str = "tool",
                 groups: int = 1) -> EpisodeBatch:
    """Play one episode per prompt with `envs[b]` (module docstring), token-in token-out.

    Args:
        sampler: the device sampler. A `SampleTurn` samples one turn of a group of episodes
            per call: it continues left-padded contexts `[G, P + max_episode_tokens]` (fixed
            shapes: one compilation) by at most `budgets [G]` new tokens each; G = the group's
            episodes, finished ones with budget 0. A `TurnDecoder` keeps decode slots across
            calls instead: an episode's turn enters a free slot as soon as its observation is
            back (its environment call started the moment its previous turn ended, while the
            other slots went on decoding); the host waits only when no slot decodes and no
            episode is ready. Turn b.k is keyed by (episode b, turn k), so the batch does not
            depend on when environments answer.
        envs: one `Environment` per prompt.
        prompt_ids: each prompt's token ids (chat-formatted already, as the policy sees it).
        tokenizer: decodes each new turn for the environment and encodes observations.
        max_turn_tokens, max_episode_tokens: the token budgets of one policy turn and of an
            episode's whole response region (policy and observation tokens); the latter is N.
        prompts: the text `reset` receives (default: each prompt's ids decoded).
        max_turns: at most this many policy turns (None: no bound but the budgets).
        eos_token_id: ends a policy turn (default the tokenizer's); it stays in the context.
        pad_token_id: padding (default the tokenizer's, else EOS).
        prompt_width: P (default the longest prompt, with its first observation).
        timeout_s: each environment call's limit.
        on_error: "skip" (count, log one line, zero the episode's mask) or "stop" (`EnvError`).
        chat_template: wrap observations in the tokenizer's chat template when it has one.
        observation_role: the template role of an observation turn.
        groups: with a `SampleTurn`, split the episodes into this many interleaved groups
            taking turns on the device, so one group's environment calls overlap another's
            sampling (a `TurnDecoder` overlaps them row by row: 1 only).
    """
    if on_error not in ("skip", "stop"):
        raise ValueError(f"on_error must be skip|stop, got {on_error!r}")
    if len(envs) != len(prompt_ids):
        raise ValueError(f"{len(envs)} environments for {len(prompt_ids)} prompts")
    slotted = isinstance(sampler, TurnDecoder)
    if slotted and groups != 1:
        raise ValueError(f"groups={groups}: decode slots overlap environment calls row by row; "
                         f"groups apply to whole-turn sampling only (set 1)")
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    pad = pad_token_id if pad_token_id is not None else (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    template = (observation_template(tokenizer, observation_role, tokenizer.decode([eos]))
                if chat_template else None)
    if prompts is None:
        prompts = [tokenizer.decode(list(ids)) for ids in prompt_ids]
    counts = collections.Counter({k: 0 for k in COUNT_KEYS})
    errors: list[str] = []
    waited = [0.0]  # seconds spent blocked on environment calls (the device idle meanwhile)
    N = max_episode_tokens
    episodes = [_Episode(env, text, list(ids)) for env, text, ids in zip(envs, prompts,
                                                                          prompt_ids)]
    counts["episodes"] = len(episodes)

    def fail(ep: _Episode, key: str, what: str):
        line = error_line(ep.env, ep.prompt, what)
        if on_error == "stop":
            raise EnvError(line)
        log.warning(line)
        counts[key] += 1
        counts["skipped"] += 1
        errors.append(line)
        ep.active, ep.skipped, ep.end = False, True, key

    def end(ep: _Episode, key: str):
        counts[key] += 1
        ep.active, ep.end = False, key

    def result(ep: _Episode, call: str, future, deadline):
        """The value of `ep`'s `call` ("reset" / "step"), or None after `fail`."""
        started = time.monotonic()
        try:
            return future.result(timeout=max(0.0, deadline - started))
        except concurrent.futures.TimeoutError:
            fail(ep, "env_timeout", f"{call} gave no answer within timeout_s={timeout_s:g} s")
        except Exception as err:  # noqa: BLE001 - any failure of user code ends the episode
            fail(ep, "env_error", f"{call} raised {type(err).__name__}: {err}")
        finally:
            waited[0] += time.monotonic() - started
        return None

    # Resets, all concurrently; the first observations join the prompts.
    started = [(ep, call_soon(ep.env.reset, ep.prompt), time.monotonic() + timeout_s)
               for ep in episodes]
    for ep, future, deadline in started:
        first = result(ep, "reset", future, deadline)
        if first:
            ep.prompt_ids += encode_observation(tokenizer, str(first))
    P = max(len(ep.prompt_ids) for ep in episodes) if prompt_width is None else prompt_width
    if any(len(ep.prompt_ids) > P for ep in episodes):
        raise ValueError(f"a prompt (with its first observation) is longer than prompt_width={P}")

    def finish_step(ep: _Episode):
        """Collect `ep`'s pending `step` and append its observation (or end the episode)."""
        future, deadline = ep.pending
        ep.pending = None
        out = result(ep, "step", future, deadline)
        if out is None:
            return
        observation, reward, done = out
        reward = float(reward)
        if not math.isfinite(reward):
            fail(ep, "nan_reward", f"step gave the reward {reward}")
            return
        ep.score += reward
        if done:
            return end(ep, "done")
        if max_turns is not None and ep.turns >= max_turns:
            return end(ep, "max_turns")
        obs = encode_observation(tokenizer, str(observation), template)
        if len(ep.tokens) + len(obs) >= N:  # no room left for the next turn's first token
            return end(ep, "episode_budget")
        ep.add(obs, 0)

    def budget(ep: _Episode) -> int:
        return min(max_turn_tokens, N - len(ep.tokens))

    def take_turn(ep: _Episode, turn: list[int], logprobs):
        """Record `ep`'s sampled turn; start its `step` call at once, or end the episode."""
        ep.add(turn, 1, logprobs)
        ep.turns += 1
        counts["turns"] += 1
        if not turn or turn[-1] != eos:  # cut by a budget before EOS
            end(ep, "episode_budget" if len(ep.tokens) >= N else "turn_budget")
            return
        text = tokenizer.decode(turn[:-1])
        ep.pending = (call_soon(ep.env.step, text), time.monotonic() + timeout_s)

    def sample(group: list[_Episode]):
        """One turn for the group's active episodes; their `step` calls start at once."""
        rows = [ep.prompt_ids + ep.tokens for ep in group]
        ids, mask = left_pad([[pad] if not r else r for r in rows], P + N, pad)
        budgets = np.array([budget(ep) if ep.active else 0 for ep in group], np.int32)
        tokens, tmask, logprobs = (np.asarray(x) for x in sampler(ids, mask, budgets))
        for b, ep in enumerate(group):
            if ep.active:
                n = min(int(tmask[b].sum()), int(budgets[b]))
                take_turn(ep, tokens[b, :n].tolist(), logprobs[b, :n])

    def wait_for_one(waiting: list[_Episode]):
        """Block until one of `waiting`'s calls answers or the earliest deadline passes."""
        started = time.monotonic()
        concurrent.futures.wait([ep.pending[0] for ep in waiting],
                                timeout=max(0.0, min(ep.pending[1] for ep in waiting) - started),
                                return_when=concurrent.futures.FIRST_COMPLETED)
        waited[0] += time.monotonic() - started

    def play_in_slots(decoder: TurnDecoder):
        """Ready-first: each round collects the environment answers that are in (the first
        process decides which, `decoder.agree`), enters ready episodes into free slots in
        episode order, and runs one device call; turns that ended start their calls."""
        free = list(range(decoder.open(len(episodes), P + N)))
        decoding: dict[int, int] = {}  # slot -> episode
        ready = [b for b, ep in enumerate(episodes) if ep.active]
        while True:
            waiting = [b for b, ep in enumerate(episodes) if ep.pending is not None]
            if waiting:
                if not decoding and not ready:  # the device would idle: wait for an answer
                    wait_for_one([episodes[b] for b in waiting])
                now = time.monotonic()
                answered = decoder.agree(np.array(
                    [episodes[b].pending[0].done() or now >= episodes[b].pending[1]
                     for b in waiting]))
                for b, collect in zip(waiting, answered):
                    if collect:
                        finish_step(episodes[b])
                        if episodes[b].active:
                            ready.append(b)
                ready.sort()
            if not decoding and not ready:
                if waiting:
                    continue
                return
            entering = []
            while free and ready:
                b, slot = ready.pop(0), free.pop(0)
                decoding[slot] = b
                ep = episodes[b]
                entering.append(Entry(slot, ep.prompt_ids + ep.tokens, budget(ep), b, ep.turns))
            for slot, (turn, logprobs) in sorted(decoder.advance(entering).items()):
                take_turn(episodes[decoding.pop(slot)], list(turn), logprobs)
                free.append(slot)
            free.sort()

    if slotted:
        play_in_slots(sampler)
    else:
        groups = max(1, min(groups, len(episodes)))
        parts = [episodes[g::groups] for g in range(groups)]
        while any(ep.active for ep in episodes):
            for group in parts:
                for ep in group:
                    if ep.pending is not None:
                        finish_step(ep)
                if any(ep.active for ep in group):
                    sample(group)
            # the last group's calls are collected at the top of the next round

    return EpisodeBatch(assemble(episodes, P, N, pad), dict(counts), errors,
                        [ep.end for ep in episodes], waited[0])


def assemble(episodes: Sequence[_Episode], P: int, N: int, pad_id: int) -> dict[str, np.ndarray]:
    """The rollout arrays (module docstring) of finished episodes: prompts left-padded to P,
    responses right-padded to N; a skipped episode keeps its tokens but has mask and score 0."""
    B = len(episodes)
    prompt_ids, prompt_mask = left_pad([ep.prompt_ids for ep in episodes], P, pad_id)
    response = np.full((B, N), pad_id, np.int32)
    real = np.zeros((B, N), np.int32)
    response_mask = np.zeros((B, N), np.int32)
    logprobs = np.zeros((B, N), np.float32)
    for b, ep in enumerate(episodes):
        n = len(ep.tokens)
        response[b, :n] = ep.tokens
        real[b, :n] = 1
        if not ep.skipped:
            response_mask[b, :n] = ep.policy
            logprobs[b, :n] = np.where(np.asarray(ep.policy) > 0, ep.logprobs, 0.0)
    return {
        "input_ids": np.concatenate([prompt_ids, response], 1),
        "attention_mask": np.concatenate([prompt_mask, real], 1),
        "response_mask": response_mask,
        "sampler_logprobs": logprobs,
        "scores": np.array([0.0 if ep.skipped else ep.score for ep in episodes], np.float32),
        "turns": np.array([ep.turns for ep in episodes], np.int32),
    }
