"""Arithmetic word problems with exact answers: a verifiable task for GRPO / RLOO.

Problems are generated locally from templates (addition, subtraction, multiplication of small
numbers), so every prompt's answer is known exactly; the checker reads the problem back from
the prompt text (also with a chat template around it) and the *last* number of the response,
and scores 1 when they agree, else 0. Nothing is learned from a model: the reward is a program.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

NAMES = ("Tom", "Ana", "Lee", "Sam", "Mia", "Raj", "Zoe", "Ben", "Ivy", "Max", "Eva", "Noa")
ITEMS = ("apples", "books", "coins", "stamps", "marbles", "pencils", "cards", "shells",
         "stickers", "cookies")
# op -> (question template, regex reading it back, answer)
TEMPLATES = {
    "+": ("{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
          r"has (\d+) (\w+) and gets (\d+) more\.", lambda a, b: a + b),
    "-": ("{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?",
          r"has (\d+) (\w+) and gives away (\d+)\.", lambda a, b: a - b),
    "*": ("{name} has {a} bags with {b} {item} in each. How many {item} does {name} have?",
          r"has (\d+) bags with (\d+) (\w+) in each\.", lambda a, b: a * b),
}


def problem(rng: random.Random) -> tuple[str, int]:
    """A random word problem and its answer."""
    op = rng.choice(tuple(TEMPLATES))
    if op == "*":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
    else:
        a, b = rng.randint(5, 40), rng.randint(2, 20)
        if op == "-":
            a, b = max(a, b + 1), min(a, b)
    template, _, fn = TEMPLATES[op]
    question = template.format(name=rng.choice(NAMES), item=rng.choice(ITEMS), a=a, b=b)
    return question, fn(a, b)


def operands(prompt: str) -> tuple[str, int, int] | None:
    """`(op, a, b)` of the problem written in `prompt` (also inside a chat template), read back
    with its template's regex; None if it holds none."""
    for op, (_, pattern, _) in TEMPLATES.items():
        match = re.search(pattern, prompt)
        if match:
            a, b = (int(g) for g in match.groups() if g.isdigit())
            return op, a, b
    return None


def answer_of(prompt: str) -> int | None:
    """The exact answer of the problem in `prompt` (None if it holds none)."""
    found = operands(prompt)
    if found is None:
        return None
    op, a, b = found
    return TEMPLATES[op][2](a, b)


def final_number(response: str) -> int | None:
    """The last integer written in `response` ("1,200" reads as 1200), or None."""
    numbers = re.findall(r"-?\d[\d,]*", response)
    if not numbers:
        return None
    try:
        return int(numbers[-1].replace(",", ""))
    except ValueError:
        return None


def final_answer_scores(prompts: list[str], responses: list[str], answer_fn,
                        what: str) -> list[float]:
    """1 for each response whose last number is `answer_fn(prompt)`, else 0; a prompt without
    an answer is an error naming it (`what`: the kind of problem it should hold)."""
    scores = []
    for prompt, response in zip(prompts, responses):
        answer = answer_fn(prompt)
        if answer is None:
            raise ValueError(f"no {what} in prompt {prompt!r}")
        scores.append(float(final_number(response) == answer))
    return scores


def score_texts(prompts: list[str], responses: list[str]) -> list[float]:
    """The checker as a host reward (`jrlhf.rewards.Reward.host`): 1 for a response whose last
    number is the prompt's answer, else 0."""
    return final_answer_scores(prompts, responses, answer_of, "arithmetic problem")


def worked_answer(question: str, answer: int) -> str:
    """The SFT demonstration for `question`: "a op b = answer. The answer is answer." """
    found = operands(question)
    if found is None:
        raise ValueError(f"no arithmetic problem in {question!r}")
    op, a, b = found
    return f"{a} {op} {b} = {answer}. The answer is {answer}."


def write_problem_files(folder: str | Path, problem_fn, sft_of, *, num_sft: int,
                        num_prompts: int, num_eval: int, seed: int = 0) -> dict[str, Path]:
    """A generated task's files as JSONL (`sft`, `prompts`, `eval_prompts`): `num_eval`
    distinct held-out questions drawn first from `problem_fn(rng) -> (question, answer)`,
    then `num_sft` training problems turned into SFT rows by `sft_of(question, answer) ->
    [row, ...]` and `num_prompts` training prompts; no held-out question appears in the
    training files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    held_out: dict[str, int] = {}
    while len(held_out) < num_eval:
        question, answer = problem_fn(rng)
        held_out[question] = answer

    def train_problem():
        while True:
            question, answer = problem_fn(rng)
            if question not in held_out:
                return question, answer

    rows = {
        "sft": [r for _ in range(num_sft) for r in sft_of(*train_problem())],
        "prompts": [{"prompt": train_problem()[0]} for _ in range(num_prompts)],
        "eval_prompts": [{"prompt": q} for q in held_out],
    }
    files = {k: folder / f"{k}.jsonl" for k in rows}
    for key, path in files.items():
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[key]))
    return files


def write_task_files(folder: str | Path, *, num_sft: int, num_prompts: int, num_eval: int,
                     seed: int = 0) -> dict[str, Path]:
    """SFT demonstrations (worked answers), training prompts and held-out evaluation prompts
    as JSONL (`write_problem_files`)."""
    return write_problem_files(
        folder, problem, lambda q, a: [{"prompt": q, "response": worked_answer(q, a)}],
        num_sft=num_sft, num_prompts=num_prompts, num_eval=num_eval, seed=seed)
