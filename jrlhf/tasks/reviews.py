"""Movie-review sentiment: the classic RLHF demonstration with a programmatic annotator.

The "human" is a sentiment lexicon: it scores a review by its positive minus negative words and
*ranks* the K responses to a prompt by that score (ties allowed). SFT data mixes sentiments, so
the SFT policy is neutral on average; RLHF should make it write warmer reviews.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path


POSITIVE = ("good", "great", "wonderful", "brilliant", "excellent", "beautiful", "fantastic",
            "amazing", "moving", "charming", "delightful", "superb", "fun", "funny", "clever",
            "gripping", "lovely", "memorable", "stunning", "enjoyable", "best", "perfect",
            "love", "loved", "warm", "smart", "masterpiece", "fresh", "touching", "strong")
NEGATIVE = ("bad", "boring", "terrible", "awful", "dull", "weak", "poor", "worst", "horrible",
            "slow", "messy", "bland", "predictable", "disappointing", "tedious", "stupid",
            "flat", "forgettable", "painful", "waste", "hate", "hated", "ugly", "silly",
            "lazy", "clumsy", "confusing", "cheap", "annoying", "mediocre")
_POS, _NEG = frozenset(POSITIVE), frozenset(NEGATIVE)

_FIRST = ("The Silent", "A Distant", "The Last", "Midnight", "The Broken", "Golden", "The Hidden",
          "Crimson", "The Lost", "Electric", "The Quiet", "Winter", "The Long", "Paper",
          "The Secret", "Iron", "The Endless", "Summer", "The Little", "Wild")
_SECOND = ("River", "Garden", "Empire", "Letters", "Station", "Harbor", "Machine", "Mountain",
           "Promise", "Orchard", "Signal", "Kingdom", "Voyage", "Window", "Circus", "Island",
           "Frontier", "Lantern", "Symphony", "Shadow")
_TEMPLATES = (
    "{title} is a {a} film with {b} acting.",
    "I found {title} {a}, and the ending was {b}.",
    "{title} has a {a} story and {b} music.",
    "The cast of {title} is {a}, but the script is {b}.",
    "Overall, {title} felt {a} and {b}.",
)


def titles() -> list[str]:
    return [f"{a} {b}" for a in _FIRST for b in _SECOND]


def prompt_for(title: str) -> str:
    return f"Write a one-sentence review of the movie \"{title}\"."


def sentiment_score(text: str) -> float:
    """Positive minus negative lexicon words."""
    words = re.findall(r"[a-z]+", text.lower())
    return float(sum(w in _POS for w in words) - sum(w in _NEG for w in words))


def score_texts(prompts: list[str], responses: list[str]) -> list[float]:
    """The annotator as a host reward function (`jrlhf.rewards.Reward.host`): each response's
    `sentiment_score` (the prompt does not matter here)."""
    return [sentiment_score(r) for r in responses]


def sft_response(title: str, rng: random.Random) -> str:
    words = [rng.choice(POSITIVE if rng.random() < 0.5 else NEGATIVE) for _ in range(2)]
    return rng.choice(_TEMPLATES).format(title=title, a=words[0], b=words[1])


def write_task_files(folder: str | Path, *, num_sft: int, num_prompts: int, num_eval: int,
                     seed: int = 0) -> dict[str, Path]:
    """SFT demonstrations, PPO/ranking prompts and held-out evaluation prompts as JSONL.

    Evaluation titles never appear in the training files.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    all_titles = titles()
    rng.shuffle(all_titles)
    held_out, train = all_titles[:num_eval], all_titles[num_eval:]
    files = {"sft": folder / "sft.jsonl", "prompts": folder / "prompts.jsonl",
             "eval_prompts": folder / "eval_prompts.jsonl"}
    rows = {
        "sft": [{"prompt": prompt_for(t), "response": sft_response(t, rng)}
                for t in (rng.choice(train) for _ in range(num_sft))],
        "prompts": [{"prompt": prompt_for(rng.choice(train))} for _ in range(num_prompts)],
        "eval_prompts": [{"prompt": prompt_for(t)} for t in held_out],
    }
    for key, path in files.items():
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[key]))
    return files
