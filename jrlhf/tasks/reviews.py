"""Movie-review sentiment: the classic RLHF demonstration with a programmatic annotator.

The "human" wants what the prompt asks for — a one-sentence review of the named film — and
prefers warmer ones: `review_score` is the review's warmth (distinct positive minus distinct
negative lexicon words, capped at ±`WARMTH_CAP`) minus `FORM_PENALTY` for each thing a reader
would object to first: the film is not named, or the response is not one complete sentence.
The penalty exceeds the whole warmth range, so any well-formed review outranks any malformed
one, and repeating a warm word, or dropping the sentence for a string of adjectives, gains
nothing. The annotator *ranks* the K responses to a prompt by that score (ties allowed). SFT
data mixes sentiments, so the SFT policy is neutral on average; RLHF should make it write
warmer reviews that are still reviews.
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


WARMTH_CAP = 3  # more than three distinct warm words is not a warmer review
FORM_PENALTY = 2 * WARMTH_CAP + 1  # per objection; > the warmth range, so form comes first
MIN_SENTENCE_WORDS = 5


def warmth(text: str) -> int:
    """Distinct positive minus distinct negative lexicon words, clipped to ±`WARMTH_CAP`."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    return max(-WARMTH_CAP, min(WARMTH_CAP, len(words & _POS) - len(words & _NEG)))


def title_of(prompt: str) -> str | None:
    """The film a review prompt names (`prompt_for`), also inside a chat template; None if the
    prompt names none."""
    match = re.search(r'movie "([^"]+)"', prompt)
    return match.group(1) if match else None


def is_one_sentence(text: str) -> bool:
    """One complete sentence: starts with a capital letter (or a quote or digit), has at least
    `MIN_SENTENCE_WORDS` words, ends with `.` or `!` (a closing quote may follow), and holds no
    other sentence end (a cut-off or run-on response fails)."""
    text = text.strip()
    if not text or not (text[0].isupper() or text[0].isdigit() or text[0] in "\"'“"):
        return False
    if len(re.findall(r"[A-Za-z0-9']+", text)) < MIN_SENTENCE_WORDS:
        return False
    body = text.rstrip("\"'”")
    if not body.endswith((".", "!")):
        return False
    return re.search(r"[.!?]\s", body[:-1]) is None and "\n" not in body


def review_score(title: str | None, text: str) -> float:
    """`warmth` − `FORM_PENALTY` × (film not named + not one sentence). `title` None (a prompt
    that names no film) skips the naming check."""
    names_film = title is None or title.lower() in text.lower()
    objections = (not names_film) + (not is_one_sentence(text))
    return float(warmth(text) - FORM_PENALTY * objections)


def score_texts(prompts: list[str], responses: list[str]) -> list[float]:
    """The annotator as a host reward function (`jrlhf.rewards.Reward.host`): each response's
    `review_score` against the film its prompt names."""
    return [review_score(title_of(p), r) for p, r in zip(prompts, responses)]


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
