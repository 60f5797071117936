"""Tokenization and grain input pipelines over TFDS data sources.

Shapes are fixed per config (P = max_prompt_length, R = max_response_length, T = P + R), so each
step compiles once:

- SFT:      input_ids, attention_mask, loss_mask `[B, T]` (right-padded; loss on the response
            and its EOS). Packed (`data.pack`): each row holds as many whole examples as fit
            (first-fit), with `segment_ids` (1, 2, ... per example, 0 on padding) and
            `positions` (restarting at every example) `[B, T]` added.
- Rankings: input_ids, attention_mask `[G, K, T]`, ranks `[G, K]` (absent responses rank -1).
- Prompts:  input_ids, attention_mask `[B, P]` (left-padded, ready for generation).

Truncation is explicit: an over-long prompt loses tokens from its *left* (the end of the prompt,
next to the response, is kept); an over-long response is cut at R tokens (and then has no EOS).
Both are counted in `Encoder.stats` and reported. Lengths beyond a model's learned position
table are refused up front (`Encoder.check_positions`), never truncated.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclass
class Encoder:
    """Turns normalised rows (as read back from TFDS) into fixed-shape token arrays."""

    tokenizer: Any
    max_prompt_length: int = 64
    max_response_length: int = 64
    chat_template: bool = True
    stats: collections.Counter = field(default_factory=collections.Counter)

    def __post_init__(self):
        tok = self.tokenizer
        self.eos_id = tok.eos_token_id
        if self.eos_id is None:
            raise ValueError("the tokenizer has no eos_token_id; jrlhf ends responses with EOS")
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id
        self.use_template = bool(self.chat_template and getattr(tok, "chat_template", None))

    @property
    def total_length(self) -> int:
        return self.max_prompt_length + self.max_response_length

    def check_positions(self, model, max_new_tokens: int = 0) -> None:
        """Refuse lengths beyond `model`'s learned position table, before any step runs.

        GPT-2 (`family="gpt2"`) looks positions up in a table of `max_position_embeddings`
        rows; a longer sequence would read past it (non-finite losses, garbage samples). Rotary
        families have no table and are not checked. Training rows hold up to
        `max_prompt_length + max_response_length` tokens, sampled sequences (RL, rankings,
        evaluation) `max_prompt_length + max_new_tokens` (0: none sampled). jrlhf refuses such
        lengths; it does not truncate to fit.

        Args:
            model: the policy's `ModelConfig` (`family`, `max_position_embeddings`).
            max_new_tokens: `rollout.max_new_tokens`, or 0 when nothing is sampled.

        Raises:
            ValueError: one line naming the config keys, their sum and the table's size.
        """
        if model.family != "gpt2":
            return
        table, P = model.max_position_embeddings, self.max_prompt_length
        for key, n in (("data.max_response_length", self.max_response_length),
                       ("rollout.max_new_tokens", max_new_tokens)):
            if P + n > table:
                raise ValueError(
                    f"data.max_prompt_length + {key} = {P} + {n} = {P + n} tokens exceed the "
                    f"model's learned position table (max_position_embeddings={table}); jrlhf "
                    f"refuses longer sequences rather than truncating them: lower "
                    f"data.max_prompt_length or {key} so they sum to at most {table}")

    def prompt_text(self, prompt: str, messages: str = "") -> str:
        """The prompt as the model sees it (chat-formatted when the tokenizer has a template)."""
        if not self.use_template:
            return prompt
        turns = json.loads(messages) if messages else [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(turns, tokenize=False,
                                                  add_generation_prompt=True)

    def prompt_ids(self, prompt: str, messages: str = "") -> list[int]:
        ids = self.tokenizer(self.prompt_text(prompt, messages),
                             add_special_tokens=not self.use_template)["input_ids"]
        if len(ids) > self.max_prompt_length:
            self.stats["prompt_truncated"] += 1
            ids = ids[-self.max_prompt_length:]
        return ids

    def response_ids(self, response: str) -> list[int]:
        ids = self.tokenizer(response, add_special_tokens=False)["input_ids"] + [self.eos_id]
        if len(ids) > self.max_response_length:
            self.stats["response_truncated"] += 1
            ids = ids[: self.max_response_length]
        return ids

    def _sequence(self, prompt_ids, response_ids):
        T = self.total_length
        ids = np.full(T, self.pad_id, np.int32)
        attn = np.zeros(T, np.int32)
        loss = np.zeros(T, np.int32)
        n_p, n_r = len(prompt_ids), len(response_ids)
        ids[: n_p + n_r] = prompt_ids + response_ids
        attn[: n_p + n_r] = 1
        loss[n_p: n_p + n_r] = 1
        return ids, attn, loss

    def sft_example(self, row) -> dict:
        p = self.prompt_ids(_text(row["prompt"]), _text(row.get("messages", b"")))
        r = self.response_ids(_text(row["response"]))
        self.stats["examples"] += 1
        ids, attn, loss = self._sequence(p, r)
        return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}

    def _ranked_sequences(self, row, max_responses: int):
        """`(prompt_ids, [response_ids], ranks [K])` of a rankings row (absent: rank -1)."""
        responses = [_text(r) for r in row["responses"]]
        ranks = [int(r) for r in row["ranks"]]
        if len(responses) > max_responses:
            raise ValueError(f"a ranking has {len(responses)} responses but max_responses="
                             f"{max_responses}")
        p = self.prompt_ids(_text(row["prompt"]), _text(row.get("messages", b"")))
        out_ranks = np.array(ranks + [-1] * (max_responses - len(ranks)), np.int32)
        self.stats["examples"] += 1
        return p, [self.response_ids(t) for t in responses], out_ranks

    def _pair_sequences(self, row) -> list[tuple[list[int], list[int]]]:
        """`[(prompt, chosen), (prompt, rejected)]` token ids of a rankings row: its best-ranked
        response against its worst-ranked (the first of each in case of ties)."""
        responses = [_text(r) for r in row["responses"]]
        ranks = [int(r) for r in row["ranks"]]
        best, worst = ranks.index(min(ranks)), ranks.index(max(ranks))
        p = self.prompt_ids(_text(row["prompt"]), _text(row.get("messages", b"")))
        self.stats["examples"] += 1
        return [(p, self.response_ids(responses[k])) for k in (best, worst)]

    def ranking_example(self, row, max_responses: int) -> dict:
        p, responses, ranks = self._ranked_sequences(row, max_responses)
        K, T = max_responses, self.total_length
        ids = np.full((K, T), self.pad_id, np.int32)
        attn = np.zeros((K, T), np.int32)
        for k, r in enumerate(responses):
            ids[k], attn[k], _ = self._sequence(p, r)
        return {"input_ids": ids, "attention_mask": attn, "ranks": ranks}

    def preference_pair(self, row) -> dict:
        """A rankings row as one (chosen, rejected) pair for DPO / ORPO (`_pair_sequences`)."""
        out = {}
        for side, (p, r) in zip(("chosen", "rejected"), self._pair_sequences(row)):
            ids, attn, loss = self._sequence(p, r)
            out.update({f"{side}_ids": ids, f"{side}_mask": attn, f"{side}_loss_mask": loss})
        return out

    def packed_sequences(self, sequences: list[tuple[list[int], list[int]]], length: int,
                         what: str) -> dict:
        """`(prompt_ids, response_ids)` sequences as the segments 1, 2, ... of one row of
        `length` tokens: `input_ids, attention_mask, loss_mask, segment_ids, positions [L]`."""
        total = sum(len(p) + len(r) for p, r in sequences)
        if total > length:
            raise ValueError(f"a packed {what} needs {total} tokens but data.pack_length is "
                             f"{length}: raise data.pack_length (at most responses x "
                             f"(max_prompt_length + max_response_length) always fits)")
        out = {k: np.zeros(length, np.int32) for k in ("attention_mask", "loss_mask",
                                                       "segment_ids", "positions")}
        out["input_ids"] = np.full(length, self.pad_id, np.int32)
        start = 0
        for segment, (p, r) in enumerate(sequences, 1):
            n = len(p) + len(r)
            cols = slice(start, start + n)
            out["input_ids"][cols] = p + r
            out["attention_mask"][cols] = 1
            out["loss_mask"][start + len(p):start + n] = 1
            out["segment_ids"][cols] = segment
            out["positions"][cols] = np.arange(n)
            start += n
        return out

    def packed_ranking_example(self, row, max_responses: int, length: int) -> dict:
        """A rankings row as one packed row: response k is segment k + 1 (absent ones, rank
        -1, have none), plus `ranks [K]`."""
        p, responses, ranks = self._ranked_sequences(row, max_responses)
        out = self.packed_sequences([(p, r) for r in responses], length, "ranking")
        del out["loss_mask"]  # a reward model reads scores, not tokens (`reward_step`'s layout)
        out["ranks"] = ranks
        return out

    def packed_preference_pair(self, row, length: int) -> dict:
        """`preference_pair` as one packed row: chosen is segment 1, rejected segment 2."""
        return self.packed_sequences(self._pair_sequences(row), length, "preference pair")

    def prompt_example(self, row) -> dict:
        p = self.prompt_ids(_text(row["prompt"]), _text(row.get("messages", b"")))
        P = self.max_prompt_length
        ids = np.full(P, self.pad_id, np.int32)
        attn = np.zeros(P, np.int32)
        ids[P - len(p):] = p
        attn[P - len(p):] = 1
        self.stats["examples"] += 1
        # The prompt's own bound on new tokens; 0: the rollout's (`rollouts.RolloutLoop`).
        return {"input_ids": ids, "attention_mask": attn,
                "max_new_tokens": np.int32(row.get("max_new_tokens", 0))}

    def report(self) -> str:
        s = self.stats
        return (f"{s['examples']} examples tokenized; {s['prompt_truncated']} prompts truncated "
                f"(left) to {self.max_prompt_length} tokens; {s['response_truncated']} responses "
                f"cut at {self.max_response_length} tokens")


def unpadded(example: dict) -> dict:
    """An SFT example cut to its real tokens: `input_ids`, `loss_mask` `[n]` (for packing)."""
    n = int(example["attention_mask"].sum())
    return {"input_ids": example["input_ids"][:n], "loss_mask": example["loss_mask"][:n]}


def packed_row(element: dict) -> dict:
    """grain's first-fit packing output as an SFT row with `segment_ids` and `positions`."""
    segments = element["input_ids_segment_ids"].astype(np.int32)
    return {"input_ids": element["input_ids"].astype(np.int32),
            "attention_mask": (segments > 0).astype(np.int32),
            "loss_mask": element["loss_mask"].astype(np.int32), "segment_ids": segments,
            "positions": element["input_ids_positions"].astype(np.int32)}


def make_loader(source, example_fn, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                rows: tuple[int, int] | None = None, pack_length: int = 0):
    """An endless grain iterator of batches over a TFDS data source.

    Every process sees the same order of examples (shuffled with `seed`, reshuffled each
    epoch); a global batch is `batch_size` consecutive examples of it, so the batches do not
    depend on how many processes read them. `rows=(lo, hi)` makes this iterator yield only rows
    `lo..hi-1` of each global batch (this host's share under the batch sharding,
    `sharding.host_rows`), reading and tokenizing only those examples; None: whole batches. A
    row count that does not divide evenly into files or hosts changes nothing: each host indexes
    the one global order. The iterator has `get_state()` / `set_state()` (the same on every
    host), so a resumed run sees exactly the batches it would have.
    `pack_length > 0` (SFT only) packs whole examples first-fit into `batch_size` rows of that
    length per batch (`packed_row`); an example never straddles two rows. Packing is sequential
    over the stream, so with `rows` every host packs the global batch and keeps its rows.
    """
    import grain

    ds = grain.MapDataset.source(source)
    if len(ds) < batch_size:
        raise ValueError(f"the data source has {len(ds)} examples, fewer than the batch size "
                         f"{batch_size}")
    lo, hi = rows or (0, batch_size)
    share = hi - lo
    if not (0 <= lo < hi <= batch_size and batch_size % share == 0 and lo % share == 0):
        raise ValueError(f"rows={rows} is not an aligned block of a batch of {batch_size}")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    # Small read-ahead: tokenization is cheap next to a step, and counters stay meaningful.
    options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2 * share)
    ds = ds.repeat(None).map(example_fn)
    if not pack_length:
        if share == batch_size:
            return iter(ds.batch(batch_size, drop_remainder=True).to_iter_dataset(
                read_options=options))
        # Blocks of `share` consecutive examples; this host's is block lo/share of every batch.
        blocks = ds.batch(share, drop_remainder=True)[lo // share::batch_size // share]
        return iter(blocks.to_iter_dataset(read_options=options))
    from grain.experimental import FirstFitPackIterDataset

    options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2 * batch_size)
    packed = FirstFitPackIterDataset(
        ds.map(unpadded).to_iter_dataset(read_options=options),
        length_struct={"input_ids": pack_length, "loss_mask": pack_length},
        num_packing_bins=batch_size, seed=seed, shuffle_bins=False)
    batches = packed.map(packed_row).batch(batch_size, drop_remainder=True)
    if share != batch_size:
        batches = batches.map(lambda batch: {k: v[lo:hi] for k, v in batch.items()})
    return iter(batches)
