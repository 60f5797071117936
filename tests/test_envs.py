"""Multi-turn episodes with environments (`jrlhf.envs`), token-in token-out, and the
calculator tool task: exact ids through chat-template boundaries, observation tokens without
loss or gradient, budgets, failing environments, GAE over masks with holes, and a real tiny
model's sampler agreeing with the trainer's forward on the episode batch."""

import json
import random
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrlhf import losses, models, rl
from jrlhf.data.pipeline import Encoder
from jrlhf.data.rows import load_rows
from jrlhf.envs import (EnvError, Environment, encode_observation, observation_template,
                        run_episodes)
from jrlhf.models import ModelConfig, init_params
from jrlhf.models import transformer as tfm
from jrlhf.sampling import generate
from jrlhf.tasks import calculator


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2-Instruct's tokenizer (chat template with <|im_start|> / <|im_end|>), offline."""
    return models.load_gguf_tokenizer(models.smollm2_gguf_path())


def chatml_tokenizer(gpt2_tokenizer):
    """GPT-2's BPE with SmolLM2's chat template and its turn tokens (EOS = <|im_end|>): a
    chat tokenizer in a fraction of a second."""
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(gpt2_tokenizer.name_or_path)
    tok.add_special_tokens({"eos_token": "<|im_end|>",
                            "additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = SMOLLM2_TEMPLATE
    return tok


# SmolLM2-135M-Instruct's template, as its GGUF metadata holds it (checked in the first test).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")


class ScriptedEnv:
    """Answers the k-th step with `script[k]` = (observation, reward, done); records what it
    was sent."""

    def __init__(self, script, first=""):
        self.script, self.first, self.sent = list(script), first, []

    def reset(self, prompt):
        self.prompt = prompt
        return self.first

    def step(self, response):
        self.sent.append(response)
        return self.script[len(self.sent) - 1]


class ScriptedSampler:
    """`sample_turn` playing fixed turns: row b's k-th active turn is `turns[b][k]`, cut to its
    budget; log-prob of the i-th token of a turn = -(i + 1) / 10 - b. Records the contexts."""

    def __init__(self, turns, width=16):
        self.turns, self.width = turns, width
        self.calls = [0] * len(turns)
        self.contexts = []  # (row, context ids without padding, budget)

    def __call__(self, ids, mask, budgets):
        B, M = ids.shape[0], self.width
        tokens, tmask = np.zeros((B, M), np.int32), np.zeros((B, M), np.int32)
        logprobs = np.zeros((B, M), np.float32)
        for b in range(B):
            if budgets[b] == 0:
                continue
            self.contexts.append((b, ids[b][mask[b] > 0].tolist(), int(budgets[b])))
            turn = self.turns[b][self.calls[b]][:budgets[b]]
            self.calls[b] += 1
            tokens[b, :len(turn)], tmask[b, :len(turn)] = turn, 1
            logprobs[b, :len(turn)] = -(np.arange(len(turn)) + 1) / 10 - b
        return tokens, tmask, logprobs


def chat_prompt_ids(tok, question):
    return tok(tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                       add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]


def episode_ids(batch, b, P):
    """Row b's real tokens: prompt then response."""
    return batch["input_ids"][b][batch["attention_mask"][b] > 0].tolist()


def test_episode_ids_are_the_sampled_ids_through_chat_template_boundaries(smollm2_tokenizer):
    tok = smollm2_tokenizer
    eos = tok.eos_token_id
    assert tok.decode([eos]) == "<|im_end|>" and tok.chat_template == SMOLLM2_TEMPLATE
    question = "What is 12 * 7?"
    prompt = chat_prompt_ids(tok, question)
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    # Row 0 samples canonical tokens; row 1 the same text one character per token, which a
    # decode -> re-encode of earlier turns would merge back (drift).
    call, answer = "<calc>12*7</calc>", "The answer is 84."
    split = lambda text: [enc(c)[0] for c in text]  # noqa: E731
    turns = [[enc(call) + [eos], enc(answer) + [eos]], [split(call) + [eos], split(answer) + [eos]]]
    assert turns[1][0] != turns[0][0] and enc(tok.decode(turns[1][0][:-1])) == turns[0][0][:-1]
    envs = [ScriptedEnv([("<result>84</result>", 0.0, False), ("", 1.0, True)]) for _ in turns]
    sampler = ScriptedSampler(turns, width=24)
    out = run_episodes(sampler, envs, [prompt, prompt], tok, max_turn_tokens=24,
                       max_episode_tokens=64, prompts=[question] * 2)
    before, after = observation_template(tok)
    assert (before, after) == ("\n<|im_start|>tool\n", "<|im_end|>\n<|im_start|>assistant\n")
    obs = encode_observation(tok, "<result>84</result>", (before, after))
    assert obs == enc(before + "<result>84</result>" + after)
    P, batch = len(prompt), out.batch
    for b in range(2):
        expected = turns[b][0] + obs + turns[b][1]
        assert episode_ids(batch, b, P) == prompt + expected  # token for token, as sampled
        assert envs[b].sent == [call, answer]  # each turn decoded alone, without its EOS
        # Turn 2 was sampled from exactly prompt + turn 1 + observation (no re-tokenising).
        assert sampler.contexts[2 + b][1] == prompt + turns[b][0] + obs
        np.testing.assert_array_equal(batch["response_mask"][b, :len(expected)],
                                      [1] * len(turns[b][0]) + [0] * len(obs)
                                      + [1] * len(turns[b][1]))
        assert batch["response_mask"][b, len(expected):].sum() == 0
    # The canonical row is exactly what the chat template renders for the whole conversation
    # (every boundary included), minus the newline the template puts after the last turn.
    conversation = [{"role": "user", "content": question}, {"role": "assistant", "content": call},
                    {"role": "tool", "content": "<result>84</result>"},
                    {"role": "assistant", "content": answer}]
    rendered = enc(tok.apply_chat_template(conversation, tokenize=False))
    assert rendered[-1] == enc("\n")[0] and episode_ids(batch, 0, P) == rendered[:-1]
    np.testing.assert_array_equal(batch["scores"], [1.0, 1.0])
    np.testing.assert_array_equal(batch["turns"], [2, 2])
    assert out.counts["done"] == 2 and out.counts["turns"] == 4 and out.counts["skipped"] == 0


def test_without_a_template_observations_are_encoded_alone(gpt2_tokenizer):
    tok = gpt2_tokenizer
    eos = tok.eos_token_id
    prompts = [tok("Compute:")["input_ids"], tok("A longer prompt here:")["input_ids"]]
    # " 12" sampled as " 1", "2": GPT-2 merges it to one token on re-encoding.
    t1 = [tok(" 1")["input_ids"][0], tok("2")["input_ids"][0], eos]
    assert len(tok(" 12")["input_ids"]) == 1
    turns = [[t1, t1], [t1, t1]]
    envs = [ScriptedEnv([(" =12.", 0.5, False), ("", 0.25, True)]) for _ in turns]
    out = run_episodes(ScriptedSampler(turns), envs, prompts, tok, max_turn_tokens=8,
                       max_episode_tokens=16)
    obs = tok(" =12.")["input_ids"]
    P = max(map(len, prompts))
    assert out.batch["input_ids"].shape == (2, P + 16)
    for b in range(2):
        assert episode_ids(out.batch, b, P) == prompts[b] + t1 + obs + t1
        # prompt left-padded to P, response starting at column P
        assert out.batch["input_ids"][b, P:P + 3].tolist() == t1
    assert envs[0].prompt == "Compute:" and envs[0].sent == [" 12", " 12"]
    np.testing.assert_allclose(out.batch["scores"], [0.75, 0.75])


def test_observation_tokens_have_no_loss_and_no_gradient(tiny_tokenizer):
    tok, eos = tiny_tokenizer, tiny_tokenizer.eos_token_id
    turns = [[[5, 6, eos], [7, eos]], [[8, eos], [9, 10, 11, eos]]]
    envs = [ScriptedEnv([("the movie", 0.0, False), ("", 1.0, True)]) for _ in turns]
    out = run_episodes(ScriptedSampler(turns), envs, [[3, 4], [4]], tok, max_turn_tokens=6,
                       max_episode_tokens=12)
    batch, P, N = out.batch, 2, 12
    obs_len = len(tok("the movie", add_special_tokens=False)["input_ids"])
    response = batch["input_ids"][:, P:]
    real = batch["attention_mask"][:, P:]
    observation = (real > 0) & (batch["response_mask"] == 0)
    assert observation.sum(axis=1).tolist() == [obs_len, obs_len]
    assert np.all(batch["sampler_logprobs"][observation] == 0)
    V = len(tok)

    def loss(logits):  # the trainer's view: logits at column P - 1 + t predict response token t
        logprobs = rl.logprobs_from_logits(logits[:, P - 1:P - 1 + N], response)
        return losses.clipped_policy_loss(logprobs, batch["sampler_logprobs"], jnp.ones((2, N)),
                                          batch["response_mask"], clip_low=0.2)[0]

    logits = jax.random.normal(jax.random.key(0), (2, P + N, V))
    grad = np.asarray(jax.jit(jax.grad(loss))(logits))[:, P - 1:P - 1 + N]
    assert np.all(grad[observation] == 0) and np.all(grad[real == 0] == 0)
    assert np.all(np.abs(grad[batch["response_mask"] > 0]).sum(-1) > 0)


def np_gae_skipping(rewards, values, mask, gamma, lam):
    """GAE over each row's masked-in tokens alone, in order (a NumPy loop)."""
    adv = np.zeros(rewards.shape)
    for b in range(rewards.shape[0]):
        cols = np.flatnonzero(mask[b])
        last, next_v = 0.0, 0.0
        for t in cols[::-1]:
            last = rewards[b, t] + gamma * next_v - values[b, t] + gamma * lam * last
            adv[b, t], next_v = last, values[b, t]
    return adv, (adv + values) * mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_over_a_mask_with_holes_skips_observation_tokens(gamma, lam):
    rng = np.random.RandomState(0)
    mask = np.array([[1, 1, 0, 0, 1, 1, 0, 1, 0, 0],  # three turns, two observations
                     [0, 0, 1, 1, 1, 0, 0, 0, 0, 0],  # (a hole first: the first token too)
                     [1, 0, 1, 0, 1, 0, 1, 0, 1, 0],
                     [0] * 10, [1] * 10], np.float32)
    rewards, values = rng.randn(*mask.shape), rng.randn(*mask.shape)
    adv, ret = rl.gae(rewards.astype(np.float32), values.astype(np.float32), mask, gamma, lam)
    ref_adv, ref_ret = np_gae_skipping(rewards * mask, values * mask, mask, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, atol=1e-5)
    # masked == sliced: the policy tokens packed together, holes removed, give the same GAE
    row = mask[0] > 0
    packed = rl.gae(rewards[:1, row].astype(np.float32), values[:1, row].astype(np.float32),
                    np.ones((1, row.sum())), gamma, lam)[0]
    np.testing.assert_allclose(np.asarray(adv)[0, row], packed[0], rtol=1e-6)


def test_budgets_end_episodes_and_are_counted(tiny_tokenizer):
    tok, eos = tiny_tokenizer, tiny_tokenizer.eos_token_id
    obs = len(tok("the movie", add_special_tokens=False)["input_ids"])
    assert obs == 2
    more = ("the movie", 0.0, False)
    turns = [
        [[5, 6, 7, 8, 9, 10]],  # 0: a 6-token turn, no EOS: cut at the turn budget 4
        [[5, 6, eos], [5, 6, eos], [5, 6, 7, 8]],  # 1: 3 + 2 + 3 + 2 = 10 used, then 2 of 4
        [[5, 6, 7, eos], [5, 6, 7, eos]],  # 2: 4 + 2 + 4 = 10, the next observation won't fit
        [[5, eos]] * 5,  # 3: max_turns=3 reached after 3 turns with room left
        [[5, eos], [6, eos]],  # 4: done after its second turn
    ]
    envs = [ScriptedEnv([more] * 5) for _ in range(4)] + [ScriptedEnv([more, ("", 2.0, True)])]
    out = run_episodes(ScriptedSampler(turns), envs, [[3]] * 5, tok, max_turn_tokens=4,
                       max_episode_tokens=12, max_turns=3)
    c, batch = out.counts, out.batch
    assert (c["turn_budget"], c["episode_budget"], c["max_turns"], c["done"]) == (1, 2, 1, 1)
    assert [len(e.sent) for e in envs] == [0, 2, 2, 3, 2]  # a cut turn never reaches the env
    assert batch["attention_mask"][:, 1:].sum(1).tolist() == [4, 12, 10, 2 + 2 + 2 + 2 + 2, 6]
    assert batch["response_mask"].sum(1).tolist() == [4, 8, 8, 6, 4]
    assert batch["turns"].tolist() == [1, 3, 2, 3, 2]
    np.testing.assert_array_equal(batch["scores"], [0, 0, 0, 0, 2.0])
    assert out.metrics()["env/turn_budget"] == 1.0


class RaisingEnv(ScriptedEnv):
    def step(self, response):
        raise RuntimeError("tool crashed\n  second line")


class HangingEnv(ScriptedEnv):
    def step(self, response):
        time.sleep(3.0)


class NanEnv(ScriptedEnv):
    def step(self, response):
        return "", float("nan"), True


class BadResetEnv(ScriptedEnv):
    def reset(self, prompt):
        raise KeyError("no such problem")


BAD_ENVS = [(RaisingEnv, "env_error", "step raised RuntimeError: tool crashed second line"),
            (HangingEnv, "env_timeout", "step gave no answer within timeout_s=0.2 s"),
            (NanEnv, "nan_reward", "step gave the reward nan"),
            (BadResetEnv, "env_error", "reset raised KeyError: 'no such problem'")]


def test_failing_environments_are_skipped_and_counted(tiny_tokenizer):
    tok, eos = tiny_tokenizer, tiny_tokenizer.eos_token_id
    envs = [cls([("", 1.0, True)]) for cls, _, _ in BAD_ENVS] + [ScriptedEnv([("", 1.0, True)])]
    prompts = [f"the film {i}" for i in range(len(envs))]
    start = time.monotonic()
    out = run_episodes(ScriptedSampler([[[5, 6, eos]]] * len(envs)), envs, [[3, 4]] * len(envs),
                       tok, max_turn_tokens=4, max_episode_tokens=8, prompts=prompts,
                       timeout_s=0.2, on_error="skip")
    assert time.monotonic() - start < 2.0  # the hanging call was abandoned at its deadline
    c = out.counts
    assert (c["env_error"], c["env_timeout"], c["nan_reward"], c["skipped"]) == (2, 1, 1, 4)
    assert out.batch["response_mask"].sum(1).tolist() == [0, 0, 0, 0, 3]
    np.testing.assert_array_equal(out.batch["scores"], [0, 0, 0, 0, 1.0])
    assert len(out.errors) == 4
    for i, (cls, _, what) in enumerate(BAD_ENVS):
        line, = [e for e in out.errors if e.startswith(f"environment {cls.__name__} ")]
        assert line == f"environment {cls.__name__} on prompt 'the film {i}': {what}"


@pytest.mark.parametrize("cls,key,what", BAD_ENVS)
def test_failing_environment_stops_the_run_with_one_line(tiny_tokenizer, cls, key, what):
    tok, eos = tiny_tokenizer, tiny_tokenizer.eos_token_id
    with pytest.raises(EnvError) as err:
        run_episodes(ScriptedSampler([[[5, eos]]]), [cls([("", 1.0, True)])], [[3]], tok,
                     max_turn_tokens=4, max_episode_tokens=8, prompts=["the film x"],
                     timeout_s=0.2, on_error="stop")
    line = str(err.value)
    assert line.startswith(f"environment {cls.__name__} on prompt 'the film x': {what}")
    assert "\n" not in line


def test_environment_calls_run_concurrently_and_overlap_sampling(tiny_tokenizer):
    tok, eos = tiny_tokenizer, tiny_tokenizer.eos_token_id
    barrier = threading.Barrier(4, timeout=2.0)  # breaks unless the 4 calls run together

    class Together(ScriptedEnv):
        def step(self, response):
            barrier.wait()
            return "", 1.0, True

    out = run_episodes(ScriptedSampler([[[5, eos]]] * 4), [Together([]) for _ in range(4)],
                       [[3]] * 4, tok, max_turn_tokens=4, max_episode_tokens=8, timeout_s=5.0)
    assert out.counts["done"] == 4 and out.counts["skipped"] == 0
    # groups=2: group 0's environment call waits for the device to sample group 1.
    sampled_second_group = threading.Event()
    contexts = []

    def sample_turn(ids, mask, budgets):
        contexts.append(ids[mask > 0].tolist())
        if len(contexts) == 2:
            sampled_second_group.set()
        return np.array([[5, eos]]), np.ones((1, 2)), np.zeros((1, 2))

    class Waits(ScriptedEnv):
        def step(self, response):
            return "", float(sampled_second_group.wait(timeout=2.0)), True

    out = run_episodes(sample_turn, [Waits([]), Waits([])], [[3], [4]], tok, max_turn_tokens=4,
                       max_episode_tokens=8, groups=2, timeout_s=5.0)
    np.testing.assert_array_equal(out.batch["scores"], [1.0, 1.0])
    assert contexts == [[3], [4]]  # one episode per group, each sampled once


class ScriptedDecoder:
    """A `TurnDecoder` playing fixed turns, one token per busy slot per call (each call taking
    50 ms): episode b's k-th turn is `turns[b][k]` (cut to its budget). Records each call's
    entries and counts calls."""

    def __init__(self, turns, slots):
        self.turns, self.slots, self.calls, self.entries = turns, slots, 0, []

    def open(self, episodes, width):
        self.busy = {}  # slot -> [turn tokens left, tokens so far, episode]
        return self.slots

    def advance(self, entering):
        # The device's time: environment calls started after the last call answer meanwhile.
        time.sleep(0.05)
        self.calls += 1
        for e in entering:
            assert e.slot not in self.busy
            self.entries.append((self.calls, e.episode, e.turn, e.context))
            self.busy[e.slot] = [list(self.turns[e.episode][e.turn][:e.budget]), [], e.episode]
        ended = {}
        for slot, (left, done, b) in list(self.busy.items()):
            done.append(left.pop(0))
            if not left:
                ended[slot] = (done, [-0.5] * len(done))
                del self.busy[slot]
        return ended

    def agree(self, flags):
        return flags


def test_turns_in_slots_start_environment_calls_while_other_rows_decode(tiny_tokenizer):
    """With a `TurnDecoder`: an episode whose turn ends early has its environment answered
    and its next turn decoding while a long turn of another episode is still decoding; the
    batch is what whole-turn sampling gives (same ids, masks, scores)."""
    tok, eos = tiny_tokenizer, tiny_tokenizer.eos_token_id
    turns = [[[5, eos], [6, 7, eos]], [[5, 5, 5, 5, 5, 5, eos]], [[6, eos], [7, eos]]]
    decoder = ScriptedDecoder(turns, slots=2)

    class Records(ScriptedEnv):
        def step(self, response):
            self.calls_then = getattr(self, "calls_then", []) + [decoder.calls]
            return super().step(response)

    def envs():
        return [Records([("obs", 0.5, False), ("", 1.0, True)]), Records([("", 1.0, True)]),
                Records([("obs", 0.5, False), ("", 1.0, True)])]

    slotted, static = envs(), envs()
    out = run_episodes(decoder, slotted, [[3], [4], [3, 4]], tok, max_turn_tokens=8,
                       max_episode_tokens=24, timeout_s=5.0)
    # Episode 1's long turn decodes in calls 1..7; episode 0's first turn ends in call 2, its
    # step runs then, and its second turn enters at call 3; episode 2 takes the slot next.
    assert slotted[0].calls_then[0] == 2 and slotted[1].calls_then == [7]
    entered = {(b, k): call for call, b, k, _ in decoder.entries}
    assert entered[(0, 1)] == 3 < 7 and entered[(2, 0)] == 6
    reference = run_episodes(ScriptedSampler([t + [[]] for t in turns], width=8), static,
                             [[3], [4], [3, 4]], tok, max_turn_tokens=8, max_episode_tokens=24,
                             timeout_s=5.0)
    for key in ("input_ids", "attention_mask", "response_mask", "scores", "turns"):
        np.testing.assert_array_equal(out.batch[key], reference.batch[key], err_msg=key)
    assert out.counts == reference.counts and out.counts["done"] == 3
    # The contexts entered are the exact ids so far: prompt, turn, observation.
    obs = encode_observation(tok, "obs")
    assert [c for _, b, k, c in decoder.entries if (b, k) == (0, 1)] == [[3, 5, eos] + obs]


def test_turns_in_slots_refuse_groups(tiny_tokenizer):
    with pytest.raises(ValueError, match="groups=2: decode slots overlap"):
        run_episodes(ScriptedDecoder([[[5]]], 1), [ScriptedEnv([])], [[3]], tiny_tokenizer,
                     max_turn_tokens=4, max_episode_tokens=8, groups=2)


@pytest.mark.parametrize("expression,value", [
    ("12*7", 84), ("2 + 3 * 4", 14), ("(2 + 3) * 4", 20), ("-3 + 5", 2), ("10 - 2 - 3", 5),
    ("8 / 4 / 2", 1), ("7 / 2", "7/2"), ("-(4 - 10) * -2", -12), ("37 * 48 + 12", 1788)])
def test_calculator_evaluates_hand_derived_cases(expression, value):
    assert calculator.show(calculator.evaluate(expression)) == str(value)


@pytest.mark.parametrize("expression,why", [
    ("__import__('os').system('ls')", "unexpected character '_'"), ("2 ** 10", "unexpected '*'"),
    ("1e9", "unexpected character 'e'"), ("1 / (3 - 3)", "division by zero"),
    ("(1 + 2", "unbalanced parentheses"), ("4 +", "unexpected end"), ("3 4", "unexpected '4'"),
    ("9" * 13, "exceeds"), ("1+" * 40 + "1", "longer than 64"), ("", "unexpected end")])
def test_calculator_refuses_unsafe_or_bad_expressions(expression, why):
    with pytest.raises(calculator.CalcError, match=why.replace("(", r"\(").replace("*", r"\*")):
        calculator.evaluate(expression)


def test_calculator_environment_on_hand_derived_turns():
    env = calculator.CalculatorEnv(max_calls=2)
    assert isinstance(env, Environment)
    prompt = f"<|im_start|>user\nWhat is 37 * 48 + 12? {calculator.INSTRUCTION}<|im_end|>\n"
    assert env.reset(prompt) == "" and env.answer == 1788
    assert env.step("Let me compute <calc>37 * 48 + 12</calc>") == ("<result>1788</result>",
                                                                    0.0, False)
    assert env.step("<calc>1/0</calc>") == ("<result>error: division by zero</result>", 0.0,
                                            False)
    assert env.step("<calc>1+1</calc>") == ("", 0.0, True)  # a third call: over max_calls
    env.reset(prompt)
    assert env.step("The answer is 1788.") == ("", 1.0, True)
    env.reset(prompt)
    assert env.step("The answer is 1,789.") == ("", 0.0, True)
    with pytest.raises(ValueError, match="no calculator question"):
        env.reset("hello")
    rng = random.Random(0)
    for _ in range(200):
        question, answer = calculator.problem(rng)
        assert calculator.answer_of(question) == answer > 0
    assert calculator.score_texts([prompt] * 3, ["1788", "It is 1,788.", "1787"]) == [1, 1, 0]


def test_tool_traces_are_sft_rows_that_render_like_the_episode(tmp_path, gpt2_tokenizer):
    tok = chatml_tokenizer(gpt2_tokenizer)
    files = calculator.write_task_files(tmp_path, num_sft=3, num_prompts=4, num_eval=2, seed=1)
    raw = [json.loads(x) for x in files["sft"].read_text().splitlines()]
    assert len(raw) == 6 and [m["role"] for m in raw[1]["messages"]] == [
        "user", "assistant", "tool", "assistant"]
    rows, _ = load_rows(files["sft"], "sft")
    rows = list(rows)
    call_row, answer_row = rows[0], rows[1]
    question = json.loads(call_row["messages"])[0]["content"]
    answer = calculator.answer_of(question)
    assert call_row["response"] == calculator.trace(question, answer)["call"]
    assert answer_row["response"] == f"The answer is {answer}."
    # The answer row's prompt, as the SFT encoder tokenizes it, is exactly the episode's ids
    # when the policy writes the call: the SFT stage teaches the format the runner plays.
    enc = Encoder(tok, max_prompt_length=256)
    sft_prompt = enc.prompt_ids(answer_row["prompt"], answer_row["messages"])
    call_ids = enc.response_ids(call_row["response"])  # the call + EOS, as SFT trains it
    env = calculator.CalculatorEnv()
    out = run_episodes(ScriptedSampler([[call_ids, [tok.eos_token_id]]], width=64), [env],
                       [enc.prompt_ids(question)], tok, max_turn_tokens=64,
                       max_episode_tokens=128, prompts=[question])
    ids = episode_ids(out.batch, 0, None)
    assert ids[:len(sft_prompt)] == sft_prompt and ids[len(sft_prompt):] == [tok.eos_token_id]
    assert out.batch["scores"].tolist() == [0.0]  # "" is no answer


def test_a_template_that_refuses_the_observation_role_is_one_clear_error(gpt2_tokenizer):
    tok = chatml_tokenizer(gpt2_tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                         "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                         "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="cannot render a 'tool' turn after an assistant turn "
                                         r"\(TemplateError: roles must alternate"):
        observation_template(tok)
    assert observation_template(tok, role="user") == ("\n<|im_start|>user\n",
                                                      "<|im_end|>\n<|im_start|>assistant")


def test_real_model_episode_rescored_by_the_trainer_forward(tiny_tokenizer):
    """Greedy episodes from a tiny jrlhf model: the trainer's forward over the episode batch
    gives the sampler's log-probs of every policy token (token-in token-out)."""
    tok = tiny_tokenizer
    cfg = ModelConfig(family="llama", vocab_size=len(tok), hidden_size=32, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64)
    params = init_params(cfg, 2)
    prompts = [tok("the movie was")["input_ids"], tok("what a fantastic story")["input_ids"]]
    M, N, eos = 6, 24, 9  # token 9: one these weights decode greedily now and then

    def sample_turn(ids, mask, budgets):
        out = generate(cfg, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0),
                       max_new_tokens=M, temperature=0.0, eos_token_id=eos,
                       budgets=jnp.asarray(budgets))
        return out.tokens, out.mask, out.logprobs

    envs = [ScriptedEnv([("the film", 0.5, False)] * 3 + [("", 1.0, True)]) for _ in prompts]
    result = run_episodes(sample_turn, envs, prompts, tok, max_turn_tokens=M,
                          max_episode_tokens=N, eos_token_id=eos)
    batch = result.batch
    assert batch["turns"].min() >= 2  # observations sit between policy turns
    holes = (batch["attention_mask"][:, -N:] > 0) & (batch["response_mask"] == 0)
    assert holes.sum() > 0
    score = jax.jit(lambda p, ids, mask: tfm.token_outputs(cfg, p, ids, mask, last=N).logprobs)
    trainer = score(params, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))
    np.testing.assert_allclose(np.asarray(trainer) * batch["response_mask"],
                               batch["sampler_logprobs"], atol=1e-5)
