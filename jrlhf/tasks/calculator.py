"""Arithmetic with a calculator tool: the built-in multi-turn task (`jrlhf.envs`).

The policy gets "What is 37 * 48 + 12? ..." and may call the calculator by writing a turn
holding `<calc>37 * 48 + 12</calc>`; the environment answers `<result>1788</result>` as the
next observation. A turn without a call is the final answer: reward 1 when its last number is
the exact answer, else 0, and the episode ends. Expressions are parsed, never `eval`-ed:
integers, + - * /, unary minus and parentheses, at most `MAX_EXPRESSION` characters, every
intermediate value within ±`MAX_VALUE`; division is exact (a fraction prints as "7/2").

`sft_rows` turns a synthetic trace (question, call, result, answer) into two SFT rows in the
chat `messages` layout `jrlhf.data.rows.normalise_sft` reads: the call as the reply to the
question, and the answer as the reply to question + call + tool result. The tool's result is
only ever prompt, never a trained token; with a chat template the second row's prompt renders
exactly as `jrlhf.envs.run_episodes` lays the episode out (the template's tool turn).
"""

from __future__ import annotations

import random
import re
from fractions import Fraction
from pathlib import Path

from jrlhf.tasks.arithmetic import final_answer_scores, final_number, write_problem_files

CALL = re.compile(r"<calc>(.*?)</calc>", re.DOTALL)
QUESTION = re.compile(r"What is ([0-9+\-*/() ]+)\?")
INSTRUCTION = ("You may use a calculator: write <calc>expression</calc> and wait for the "
               "result. End with 'The answer is N.'")
MAX_EXPRESSION = 64
MAX_VALUE = 10 ** 12


class CalcError(ValueError):
    """An expression the calculator refuses (syntax, characters, size, division by zero)."""


def tokens_of(expression: str) -> list[str]:
    """The expression's tokens: integers, operators and parentheses (anything else refused)."""
    if len(expression) > MAX_EXPRESSION:
        raise CalcError(f"expression longer than {MAX_EXPRESSION} characters")
    found = re.findall(r"\d+|[-+*/()]|\s+|.", expression)
    bad = [t for t in found if not re.fullmatch(r"\d+|[-+*/()]|\s+", t)]
    if bad:
        raise CalcError(f"unexpected character {bad[0]!r}")
    return [t for t in found if not t.isspace()]


def evaluate(expression: str) -> Fraction:
    """The exact value of `expression` (integers, + - * /, unary minus, parentheses) by
    recursive descent over `tokens_of`; `CalcError` for anything else."""
    toks, pos = tokens_of(expression), 0

    def peek():
        return toks[pos] if pos < len(toks) else None

    def take():
        nonlocal pos
        pos += 1
        return toks[pos - 1]

    def checked(x: Fraction) -> Fraction:
        if abs(x) > MAX_VALUE:
            raise CalcError(f"a value exceeds {MAX_VALUE:.0e}")
        return x

    def expr():
        x = term()
        while peek() in ("+", "-"):
            x = checked(x + term() if take() == "+" else x - term())
        return x

    def term():
        x = factor()
        while peek() in ("*", "/"):
            op, y = take(), factor()
            if op == "/" and y == 0:
                raise CalcError("division by zero")
            x = checked(x * y if op == "*" else x / y)
        return x

    def factor():
        tok = peek()
        if tok == "-":
            take()
            return -factor()
        if tok == "(":
            take()
            x = expr()
            if peek() != ")":
                raise CalcError("unbalanced parentheses")
            take()
            return x
        if tok is not None and tok.isdigit():
            return checked(Fraction(int(take())))
        raise CalcError("unexpected end" if tok is None else f"unexpected {tok!r}")

    value = expr()
    if pos != len(toks):
        raise CalcError(f"unexpected {toks[pos]!r}")
    return value


def show(value: Fraction) -> str:
    """A value as the calculator prints it: "84", "-3", "7/2"."""
    return str(value.numerator) if value.denominator == 1 else str(value)


def problem(rng: random.Random) -> tuple[str, int]:
    """A random question ("What is 37 * 48 + 12? ..." with `INSTRUCTION`) and its answer:
    two-digit products plus or minus a third number, or a sum times a one-digit number."""
    a, b, c = rng.randint(11, 99), rng.randint(11, 99), rng.randint(2, 99)
    shape = rng.choice(("a * b + c", "a * b - c", "(a + b) * c"))
    if shape == "(a + b) * c":
        c = rng.randint(2, 9)
    expression = shape.replace("a", str(a)).replace("b", str(b)).replace("c", str(c))
    return f"What is {expression}? {INSTRUCTION}", int(evaluate(expression))


def answer_of(prompt: str) -> int | None:
    """The exact answer of the question in `prompt` (also inside a chat template), or None."""
    match = QUESTION.search(prompt)
    if match is None:
        return None
    try:
        value = evaluate(match.group(1))
    except CalcError:
        return None
    return int(value) if value.denominator == 1 else None


def score_texts(prompts: list[str], responses: list[str]) -> list[float]:
    """A final answer's check as a host reward (the `jrlhf.tasks.TASKS` interface, for one-turn
    evaluation): 1 when the response's last number is the question's answer, else 0."""
    return final_answer_scores(prompts, responses, answer_of, "calculator question")


class CalculatorEnv:
    """The calculator `jrlhf.envs.Environment`: a turn with `<calc>expr</calc>` gets
    `<result>value</result>` (or `<result>error: why</result>`), reward 0; a turn without a
    call ends the episode with reward 1 for the exact answer (last number), else 0. After
    `max_calls` calls, another call ends the episode with reward 0."""

    def __init__(self, max_calls: int = 3):
        self.max_calls = max_calls
        self.answer: int | None = None
        self.calls = 0

    def reset(self, prompt: str) -> str:
        self.answer, self.calls = answer_of(prompt), 0
        if self.answer is None:
            raise ValueError("no calculator question in the prompt")
        return ""

    def step(self, response: str) -> tuple[str, float, bool]:
        call = CALL.search(response)
        if call is None:
            return "", float(final_number(response) == self.answer), True
        self.calls += 1
        if self.calls > self.max_calls:
            return "", 0.0, True
        try:
            return f"<result>{show(evaluate(call.group(1)))}</result>", 0.0, False
        except CalcError as err:
            return f"<result>error: {err}</result>", 0.0, False


def environment() -> CalculatorEnv:
    """A fresh environment for one episode (the `jrlhf.tasks.TASKS` interface of a task with
    tools: `env.enabled` rollouts build one per sampled row)."""
    return CalculatorEnv()


def trace(question: str, answer: int) -> dict:
    """A synthetic tool trace of `question`: `{"question", "call", "result", "answer"}`, the
    texts of the user turn, the policy's call, the tool's observation and the final answer."""
    expression = QUESTION.search(question).group(1)
    return {"question": question, "call": f"<calc>{expression}</calc>",
            "result": f"<result>{show(evaluate(expression))}</result>",
            "answer": f"The answer is {answer}."}


def sft_rows(t: dict, role: str = "tool") -> list[dict]:
    """A trace as SFT rows (`messages` layout, the last message the trained reply): the call
    after the question, then the answer after question, call and the tool's result (`role`,
    as `jrlhf.envs.run_episodes(observation_role=...)` renders it)."""
    user = {"role": "user", "content": t["question"]}
    call = {"role": "assistant", "content": t["call"]}
    return [{"messages": [user, call]},
            {"messages": [user, call, {"role": role, "content": t["result"]},
                          {"role": "assistant", "content": t["answer"]}]}]


def write_task_files(folder: str | Path, *, num_sft: int, num_prompts: int, num_eval: int,
                     seed: int = 0) -> dict[str, Path]:
    """SFT rows of `num_sft` synthetic traces (two rows each), training prompts and held-out
    evaluation prompts as JSONL (`arithmetic.write_problem_files`)."""
    return write_problem_files(folder, problem, lambda q, a: sft_rows(trace(q, a)),
                               num_sft=num_sft, num_prompts=num_prompts, num_eval=num_eval,
                               seed=seed)
