"""What both halves of the jrlhf-vs-tunix benchmark share (imported by `compare_tunix.py` in
jrlhf's venv and by `tunix_side.py` in tunix's; NumPy only): the prompts and the reward.

Token ids 0 (pad) and 1 (EOS) never occur in the prompts. Texts are token ids joined by spaces
("12 345 ..."), so both sides' reward sees the same strings.
"""

import numpy as np

PAD, EOS = 0, 1


def prompt_ids(vocab_size: int, batches: int, prompts: int, length: int, seed: int) -> np.ndarray:
    """`[batches, prompts, length]` int32 ids uniform in [2, vocab_size)."""
    rng = np.random.RandomState(seed)
    return rng.randint(2, vocab_size, (batches, prompts, length)).astype(np.int32)


def ids_to_text(ids) -> str:
    return " ".join(str(int(i)) for i in ids)


def reward_fn(prompts, completions, **kwargs) -> list[float]:
    """An integer score per response: its even token ids minus half its length (range ±32 for
    64 tokens, so a group's scores differ). Integers, because tunix 0.1.7's PPO truncates
    per-sequence scores to int32 (`jnp.zeros_like(completion_ids).at[...].add(scores)`)."""
    out = []
    for text in completions:
        ids = [int(t) for t in str(text).split()]
        out.append(float(sum(i % 2 == 0 for i in ids) - len(ids) // 2))
    return out
