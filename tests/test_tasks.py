"""The built-in tasks' annotators: the arithmetic checker against the problems' exact answers,
the reviews annotator against hand-scored reviews."""

import json
import random

import pytest

from jrlhf.tasks import arithmetic, reviews


def test_every_generated_problem_reads_back_to_its_answer():
    rng = random.Random(0)
    ops = set()
    for _ in range(500):
        question, answer = arithmetic.problem(rng)
        assert arithmetic.answer_of(question) == answer
        # Inside a chat template, as the policy's prompt is decoded during rollouts.
        wrapped = f"system\nYou are a helpful AI assistant.\nuser\n{question}\nassistant\n"
        assert arithmetic.answer_of(wrapped) == answer
        ops.add(arithmetic.operands(question)[0])
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


REVIEW_PROMPT = 'Write a one-sentence review of the movie "Wild Garden".'


@pytest.mark.parametrize("response, score", [
    # Well-formed: warmth alone (distinct positive − distinct negative words, capped at ±3).
    ("Wild Garden is a beautiful story with enjoyable music.", 2.0),
    ("Wild Garden is a dull film with terrible acting.", -2.0),
    ("The cast of Wild Garden is great, but the script is weak.", 0.0),
    ("Wild Garden is great, wonderful, brilliant, moving and fun!", 3.0),  # capped at 3
    ("Wild Garden is great, great, great and great.", 1.0),  # repeating a word adds nothing
    ('"Wild Garden" is a good film, I think.', 1.0),  # title quoted, lower-case "wild" fine
    # The film not named: warmth − 7.
    ("It is a beautiful story with enjoyable music.", 2.0 - 7),
    # Not one complete sentence (too short, cut off, two sentences, lower-case start): − 7.
    ("Wild Garden: best film.", 1.0 - 7),
    ("Wild Garden is a beautiful story with", 1.0 - 7),
    ("Wild Garden is good. I loved the music.", 2.0 - 7),
    ("wild Garden is a good film with fine acting.", 1.0 - 7),
    # Both objections: − 14.
    ("Best film.", 1.0 - 14),
    ("", -14.0),
])
def test_reviews_annotator_wants_one_sentence_naming_the_film_then_warmth(response, score):
    assert reviews.score_texts([REVIEW_PROMPT], [response]) == [score]
    # Inside a chat template, as the policy's prompt is decoded during rollouts.
    wrapped = f"system\nYou are a helpful AI assistant.\nuser\n{REVIEW_PROMPT}\nassistant\n"
    assert reviews.score_texts([wrapped], [response]) == [score]


def test_reviews_annotator_ranks_any_well_formed_review_above_any_malformed_one():
    coldest_review = reviews.review_score("Wild Garden", "Wild Garden is bad, dull and awful.")
    warmest_fragment = reviews.review_score("Wild Garden", "Wild Garden: great, fun, superb")
    assert coldest_review == -3.0 and warmest_fragment == 3.0 - 7 < coldest_review
    # A prompt that names no film is judged on the sentence and its warmth only.
    assert reviews.score_texts(["Review a film."], ["It was a lovely film indeed."]) == [1.0]


def test_reviews_sft_demonstrations_are_well_formed():
    rng = random.Random(0)
    for title in reviews.titles():
        response = reviews.sft_response(title, rng)
        assert reviews.is_one_sentence(response), response
        assert reviews.review_score(title, response) == reviews.warmth(response)
