"""The built-in tasks' annotators: the arithmetic checker against the problems' exact answers."""

import json
import random
import re

import pytest

from jrlhf.tasks import arithmetic


def test_every_generated_problem_reads_back_to_its_answer():
    rng = random.Random(0)
    ops = set()
    for _ in range(500):
        question, answer = arithmetic.problem(rng)
        assert arithmetic.answer_of(question) == answer
        # Inside a chat template, as the policy's prompt is decoded during rollouts.
        wrapped = f"system\nYou are a helpful AI assistant.\nuser\n{question}\nassistant\n"
        assert arithmetic.answer_of(wrapped) == answer
        ops.add(next(op for op, (_, pattern, _) in arithmetic.TEMPLATES.items()
                     if re.search(pattern, question)))
        assert answer >= 0
    assert ops == {"+", "-", "*"}


@pytest.mark.parametrize("response, number", [
    ("12 + 7 = 19. The answer is 19.", 19), ("I think 3, no wait, 1,200", 1200),
    ("The answer is -4", -4), ("no idea", None), ("", None)])
def test_the_checker_reads_the_last_number(response, number):
    assert arithmetic.final_number(response) == number


def test_score_texts_is_one_for_the_exact_answer_only():
    prompt = "Tom has 12 apples and gets 7 more. How many apples does Tom have now?"
    assert arithmetic.score_texts([prompt] * 4, ["19", "The answer is 19.", "18", "19 or 20"]) \
        == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="no arithmetic problem in prompt 'hello'"):
        arithmetic.score_texts(["hello"], ["1"])


def test_task_files_keep_evaluation_problems_out_of_training(tmp_path):
    files = arithmetic.write_task_files(tmp_path, num_sft=64, num_prompts=64, num_eval=32)
    rows = {k: [json.loads(x) for x in p.read_text().splitlines()] for k, p in files.items()}
    held_out = {r["prompt"] for r in rows["eval_prompts"]}
    assert len(held_out) == 32
    assert not held_out & {r["prompt"] for r in rows["prompts"] + rows["sft"]}
    for row in rows["sft"]:  # demonstrations are correct by the checker
        assert arithmetic.score_texts([row["prompt"]], [row["response"]]) == [1.0]
