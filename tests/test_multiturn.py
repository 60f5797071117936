"""Multi-turn episodes through the training loop (`env.enabled`): a GRPO `RolloutLoop`
iteration whose sampling phase plays episodes against an environment (`jrlhf.envs`). The
update's batch attends to observations it never trains on, the reference log-probs are the
reference's forward over the episode rows, the environment's reward is the score, episode ends
are logged; a (2, 2, 2) mesh gives one device's iteration; bad `env` settings are one line."""

import dataclasses

import jax
import numpy as np
import pytest

from jrlhf import sharding
from jrlhf.config import (Config, DataConfig, EnvConfig, GRPOConfig, MeshConfig, RolloutConfig,
                          RunConfig, apply_overrides, load_config)
from jrlhf.envs import Environment
from jrlhf.models import ModelConfig, init_params
from jrlhf.models import transformer as tfm
from jrlhf.tasks import TASKS, calculator

WORDS = ["<pad>", "<eos>", "the", "film", "was", "good", "bad", "what"]
PAD, EOS = 0, 1
OBSERVATION = "the film"
K, G, P = 4, 4, 4  # samples per prompt, prompts per iteration, prompt columns
CONFIG = Config(grpo=GRPOConfig(group_size=K, prompts_per_iteration=G, kl_coef=0.1),
                rollout=RolloutConfig(temperature=1.0),
                env=EnvConfig(enabled=True, max_turn_tokens=5, max_episode_tokens=16,
                              max_turns=3, groups=2),
                data=DataConfig(chat_template=False), run=RunConfig(progress=False))


@pytest.fixture(scope="module")
def word_tokenizer():
    """Eight whole words, EOS among them: a random tiny model ends a turn within five tokens
    about half the time, so a batch holds two-turn episodes and budget cuts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


MODEL = ModelConfig(family="llama", vocab_size=len(WORDS), hidden_size=32, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64)


class TwoTurnEnv:
    """The first turn is answered with `OBSERVATION` (reward 0.5), the second ends the episode
    (reward 1); records what it returned."""

    def __init__(self):
        self.rewards = []

    def reset(self, prompt):
        return ""

    def step(self, response):
        done = len(self.rewards) == 1
        self.rewards.append(1.0 if done else 0.5)
        return ("" if done else OBSERVATION), self.rewards[-1], done


def prompts():
    rng = np.random.RandomState(0)
    ids = rng.randint(2, len(WORDS), (G, P)).astype(np.int32)
    mask = np.ones((G, P), np.int32)
    ids[1, :2], mask[1, :2] = PAD, 0  # a left-padded prompt
    # As the stage's prompt batches carry it: 0 = no bound of the prompt's own.
    return {"input_ids": ids, "attention_mask": mask, "max_new_tokens": np.zeros(G, np.int32)}


# PPO plays one episode per prompt: G·K prompts, so its batch has GRPO's rows.
PPO_SETTINGS = (f"ppo.prompts_per_iteration={G * K}", "ppo.epochs=2", "ppo.minibatch_size=8")


def ppo_prompts():
    """`prompts()` with each prompt repeated K times (PPO's batch of G·K episodes)."""
    return {k: np.repeat(v, K, axis=0) for k, v in prompts().items()}


def iteration(tok, mesh_config=None, settings=(), algorithm="grpo", params=None):
    """One iteration of `algorithm` on episodes: `(update's batch, metrics, environments, new
    params)`."""
    from jrlhf.rollouts import Reward, RolloutLoop
    from jrlhf.setups import make_setup

    config = CONFIG if mesh_config is None else dataclasses.replace(CONFIG, mesh=mesh_config)
    config = apply_overrides(config, list(settings) + list(
        PPO_SETTINGS if algorithm == "ppo" else ()))
    setup = make_setup(algorithm, config, MODEL,
                       init_params(MODEL, 0) if params is None else params)
    seen, update, envs = [], setup.step, []

    def step(state, batch):
        seen.append({k: sharding.to_host(v) for k, v in batch.items()})
        return update(state, batch)

    def environment():
        envs.append(TwoTurnEnv())
        return envs[-1]

    loop = RolloutLoop(dataclasses.replace(setup, step=step), config,
                       Reward(fn=lambda *a: 0.0), eos_token_id=EOS, pad_token_id=PAD,
                       tokenizer=tok, environment=environment)
    state, metrics = loop(setup.state, ppo_prompts() if algorithm == "ppo" else prompts())
    return seen[0], metrics, envs, jax.tree.map(sharding.to_host, state.params)


@pytest.fixture(scope="module")
def one_device(word_tokenizer):
    return iteration(word_tokenizer)


def test_a_grpo_iteration_trains_on_episodes(one_device, word_tokenizer):
    batch, metrics, envs, _ = one_device
    B, N = G * K, CONFIG.env.max_episode_tokens
    ids, attention, mask = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    assert ids.shape == (B, P + N) and mask.shape == (B, N)
    # Observation tokens: attended to, never trained on; they are the observation's encoding.
    holes = (attention[:, P:] > 0) & (mask == 0)
    observation = word_tokenizer(OBSERVATION, add_special_tokens=False)["input_ids"]
    assert holes.sum() > 0 and np.all(mask <= attention[:, P:])
    np.testing.assert_array_equal(ids[:, P:][holes].reshape(-1, len(observation)),
                                  np.tile(observation, (holes.sum() // len(observation), 1)))
    # A group's rows share their prompt columns (grpo.shared_prompt holds).
    np.testing.assert_array_equal(ids[:, :P], np.repeat(prompts()["input_ids"], K, 0))
    assert metrics["grpo/prompt_mismatch"] == 0
    # The reference's (the initial policy's) forward over the episode rows, on policy tokens.
    ref = tfm.token_outputs(MODEL, init_params(MODEL, 0), ids, attention, last=N,
                            temperature=CONFIG.rollout.temperature).logprobs
    np.testing.assert_allclose(batch["ref_logprobs"], np.asarray(ref) * mask, atol=2e-5)
    np.testing.assert_allclose(batch["sampler_logprobs"], np.asarray(ref) * mask, atol=2e-5)
    # The score is the episode's summed environment reward.
    np.testing.assert_allclose(batch["scores"], [sum(e.rewards) for e in envs])
    ends = {k: metrics[f"env/{k}"] for k in ("done", "turn_budget", "episode_budget",
                                             "max_turns", "skipped")}
    assert metrics["env/episodes"] == B == sum(ends.values()) and ends["skipped"] == 0
    assert ends["done"] == sum(len(e.rewards) == 2 for e in envs) > 0
    assert ends["turn_budget"] > 0  # some first turns ran out of tokens
    assert metrics["env/turns"] >= sum(len(e.rewards) for e in envs) + ends["turn_budget"]
    assert metrics["truncated_share"] == (ends["turn_budget"] + ends["episode_budget"]) / B
    assert np.isfinite(metrics["grpo/policy_loss"]) and metrics["score/max"] == 1.5


def test_an_episode_iteration_on_a_2x2x2_mesh_equals_one_device(one_device, word_tokenizer):
    batch, metrics, _, params = one_device
    m_batch, m_metrics, _, m_params = iteration(word_tokenizer, MeshConfig(2, 2, 2))
    for key in ("input_ids", "attention_mask", "response_mask", "scores"):
        np.testing.assert_array_equal(m_batch[key], batch[key], err_msg=key)
    for key in ("ref_logprobs", "sampler_logprobs"):
        np.testing.assert_allclose(m_batch[key], batch[key], atol=1e-5, err_msg=key)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), m_params, params)
    for key in ("grpo/policy_loss", "grpo/kl", "env/done", "env/turns"):
        np.testing.assert_allclose(m_metrics[key], metrics[key], rtol=1e-4, atol=1e-6)


def test_greedy_episodes_through_the_slots_equal_static_turns(word_tokenizer):
    """`rollout.slots`: each turn decodes through continuous-batching slots (3 for 16 rows: a
    row that ends early frees its slot); greedy episodes are the static turns' token for
    token, so the update's batch is the same."""
    greedy = ("rollout.top_k=1",)  # argmax whatever the key
    # EOS takes the place of "good" (its head column, a little larger): the argmax then ends
    # some turns early, so episodes have one, two or a budget's worth of turns.
    params = init_params(MODEL, 0)
    head = params["lm_head"]["kernel"]
    params["lm_head"]["kernel"] = head.at[:, EOS].set(head[:, WORDS.index("good")] * 1.05)
    static, s_metrics, _, _ = iteration(word_tokenizer, settings=greedy, params=params)
    slots, metrics, _, _ = iteration(word_tokenizer, settings=greedy + (
        "rollout.slots=3", "env.groups=1"), params=params)
    for key in ("input_ids", "attention_mask", "response_mask", "scores"):
        np.testing.assert_array_equal(slots[key], static[key], err_msg=key)
    np.testing.assert_allclose(slots["sampler_logprobs"], static["sampler_logprobs"], atol=1e-5)
    assert metrics["env/turns"] == s_metrics["env/turns"] > 16
    assert metrics["env/done"] > 0 and metrics["env/turn_budget"] > 0


class Recorded:
    """A `TurnDecoder` that records each call's entering (episode, turn) pairs."""

    def __init__(self, decoder):
        self.decoder, self.calls = decoder, []

    def open(self, episodes, width):
        return self.decoder.open(episodes, width)

    def advance(self, entering):
        self.calls.append([(e.episode, e.turn) for e in entering])
        return self.decoder.advance(entering)

    def agree(self, flags):
        return self.decoder.agree(flags)


def slot_episodes(tok, params, settings, latency_s=0.0, mesh=None):
    """16 episodes of `TwoTurnEnv` through `rollout.slots` decode slots (`SlotTurnDecoder`):
    `(EpisodeBatch, recorded calls)`; with `latency_s`, each step answers after a random
    0..latency_s seconds."""
    from jrlhf.rollouts import play_episodes, turn_sampler, turn_samplers

    config = apply_overrides(CONFIG, ["env.groups=1", *settings,
                                      f"env.simulated_latency_s={latency_s}"])
    decoder = Recorded(turn_sampler(
        turn_samplers(MODEL, config.rollout, config.env, EOS, PAD, mesh), params,
        jax.random.key(7), mesh))
    ids, mask = (ppo_prompts()[k] for k in ("input_ids", "attention_mask"))
    out = play_episodes(decoder, TwoTurnEnv, ids, mask, tok, config.env, eos_token_id=EOS,
                        pad_token_id=PAD, chat_template=False)
    return out, decoder.calls


def test_slot_episodes_do_not_depend_on_when_environments_answer(word_tokenizer):
    """Turns in slots that persist across device calls: a turn enters a free slot as soon as
    its observation is back, so random environment delays reorder what each call decodes, yet
    the episodes are the same bytes (keys per episode and turn, row-wise numerics); with
    fewer slots too, and with the slots split over a (2, 2, 2) mesh."""
    params = init_params(MODEL, 0)
    settings = ("rollout.slots=4", "env.slot_steps=2")
    quiet, quiet_calls = slot_episodes(word_tokenizer, params, settings)
    late, late_calls = slot_episodes(word_tokenizer, params, settings, latency_s=0.03)
    few, _ = slot_episodes(word_tokenizer, params, ("rollout.slots=3", "env.slot_steps=5"))
    mesh = sharding.make_mesh(MeshConfig(2, 2, 2))
    meshed, _ = slot_episodes(word_tokenizer, sharding.put(params, sharding.replicated(mesh)),
                              settings, mesh=mesh)
    assert late_calls != quiet_calls  # the delays did change the schedule
    for other in (late, few, meshed):
        for key in ("input_ids", "attention_mask", "response_mask", "scores", "turns"):
            np.testing.assert_array_equal(other.batch[key], quiet.batch[key], err_msg=key)
        np.testing.assert_allclose(other.batch["sampler_logprobs"],
                                   quiet.batch["sampler_logprobs"], atol=1e-5)
        assert other.counts == quiet.counts
    assert quiet.counts["done"] > 0 and quiet.counts["turn_budget"] > 0
    # Second turns entered while other episodes' first turns were still decoding.
    first_entry = {pair: i for i, call in enumerate(quiet_calls) for pair in call}
    second = [i for (b, turn), i in first_entry.items() if turn == 1]
    assert second and min(second) < max(i for (b, turn), i in first_entry.items() if turn == 0)
    assert late.wait_s > 0


def test_budget_cuts_are_the_truncated_episodes(one_device, word_tokenizer):
    """`rollout.overlong=mask` and `missing_eos_penalty` act on the episodes a token budget
    cut (the runner's end reasons), not on rows without an EOS token."""
    batch, _, envs, _ = one_device
    masked, metrics, m_envs, _ = iteration(word_tokenizer, settings=(
        "rollout.overlong=mask", "rollout.missing_eos_penalty=0.25"))
    np.testing.assert_array_equal(masked["input_ids"], batch["input_ids"])  # same episodes
    cut = np.array([len(e.rewards) < 2 for e in m_envs])  # TwoTurnEnv never ends otherwise
    assert 0 < cut.sum() < len(cut) and metrics["truncated_share"] == cut.mean()
    np.testing.assert_array_equal(masked["response_mask"],
                                  batch["response_mask"] * ~cut[:, None])
    np.testing.assert_allclose(masked["scores"],
                               [sum(e.rewards) for e in m_envs] - 0.25 * cut)


@pytest.fixture(scope="module")
def ppo_one_device(word_tokenizer):
    return iteration(word_tokenizer, algorithm="ppo")


def test_a_ppo_iteration_trains_on_episodes(ppo_one_device, word_tokenizer):
    """PPO on episodes: the policy's and the critic's scoring forwards attend to the
    observations; values, log-probs and the KL live on the policy's tokens only; the score is
    the summed environment reward; the update changes the weights."""
    from jrlhf.steps.rollout import policy_outputs

    batch, metrics, envs, params = ppo_one_device
    B, N = G * K, CONFIG.env.max_episode_tokens
    ids, attention, mask = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    assert ids.shape == (B, P + N) and ((attention[:, P:] > 0) & (mask == 0)).sum() > 0
    np.testing.assert_array_equal(ids[:, :P], ppo_prompts()["input_ids"])
    from jrlhf.setups import make_setup
    setup = make_setup("ppo", apply_overrides(CONFIG, list(PPO_SETTINGS)), MODEL,
                       init_params(MODEL, 0))
    logprobs, _, values = policy_outputs(setup.state.params, ids, attention, N,
                                         policy_cfg=setup.model_cfg, value_cfg=setup.value_cfg,
                                         temperature=batch["temperature"])
    np.testing.assert_allclose(batch["logprobs"], np.asarray(logprobs) * mask, atol=2e-5)
    np.testing.assert_allclose(batch["values"], np.asarray(values) * mask, atol=2e-5)
    np.testing.assert_allclose(batch["sampler_logprobs"], batch["logprobs"], atol=2e-5)
    assert np.all(batch["values"][mask == 0] == 0)  # (a fresh critic's head is zero)
    np.testing.assert_allclose(batch["scores"], [sum(e.rewards) for e in envs])
    assert metrics["env/episodes"] == B and metrics["env/done"] > 0
    for key in ("ppo/policy_loss", "value/loss", "ppo/approx_kl"):
        assert np.isfinite(metrics[key]), key
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), params,
                           jax.tree.map(sharding.to_host, setup.state.params))
    assert any(jax.tree.leaves(changed))


def test_a_ppo_episode_iteration_on_a_2x2x2_mesh_equals_one_device(ppo_one_device,
                                                                    word_tokenizer):
    batch, metrics, _, params = ppo_one_device
    m_batch, m_metrics, _, m_params = iteration(word_tokenizer, MeshConfig(2, 2, 2),
                                                algorithm="ppo")
    for key in ("input_ids", "attention_mask", "response_mask", "scores"):
        np.testing.assert_array_equal(m_batch[key], batch[key], err_msg=key)
    for key in ("ref_logprobs", "logprobs", "values"):
        np.testing.assert_allclose(m_batch[key], batch[key], atol=1e-5, err_msg=key)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), m_params, params)
    for key in ("ppo/policy_loss", "value/loss", "env/done", "env/turns"):
        np.testing.assert_allclose(m_metrics[key], metrics[key], rtol=1e-4, atol=1e-6)


def test_evaluation_plays_episodes_in_chunks(word_tokenizer):
    """`rollouts.play_batched` (the evaluation stage's episodes): chunk i of
    `rollout.eval_batch_size` prompts is `play_episodes` with key `fold_in(key, start)`, the
    scores are the environments' summed rewards, the end counts add up; `judging.sequence_kl`
    with the episode's attention sums log π − log π_ref over the policy's tokens of forwards
    that attend to the observations."""
    from jrlhf import judging
    from jrlhf.models import token_outputs
    from jrlhf.rollouts import play_batched, play_episodes, turn_sampler, turn_samplers

    config = apply_overrides(CONFIG, ["rollout.eval_batch_size=3"])
    params, ref = init_params(MODEL, 0), init_params(MODEL, 1)
    ids, mask = (ppo_prompts()[k][:7] for k in ("input_ids", "attention_mask"))
    envs = []

    def environment():
        envs.append(TwoTurnEnv())
        return envs[-1]

    key = jax.random.key(3)
    episodes = play_batched(MODEL, params, ids, mask, key, config.rollout, config.env,
                            tokenizer=word_tokenizer, environment=environment,
                            eos_token_id=EOS, pad_token_id=PAD, chat_template=False)
    b = episodes.batch
    assert b["input_ids"].shape == (7, P + config.env.max_episode_tokens)
    np.testing.assert_allclose(b["scores"], [sum(e.rewards) for e in envs])
    assert episodes.counts["episodes"] == 7 == len(episodes.ends)
    samplers = turn_samplers(MODEL, config.rollout, config.env, EOS, PAD)
    for start in (0, 3, 6):
        alone = play_episodes(turn_sampler(samplers, params, jax.random.fold_in(key, start)),
                              TwoTurnEnv, ids[start:start + 3], mask[start:start + 3],
                              word_tokenizer, config.env, eos_token_id=EOS, pad_token_id=PAD,
                              chat_template=False)
        for k, v in alone.batch.items():
            np.testing.assert_array_equal(b[k][start:start + 3], v, err_msg=f"{k} @ {start}")
    tokens, tmask = b["input_ids"][:, P:], b["response_mask"]
    attention = b["attention_mask"][:, P:]
    assert ((attention > 0) & (tmask == 0)).any()  # observations to attend to
    kl = judging.sequence_kl(MODEL, params, MODEL, ref, ids, mask, tokens, tmask, 1.0,
                             attention)
    lp, lp_ref = (np.asarray(token_outputs(MODEL, p, b["input_ids"], b["attention_mask"],
                                           last=tokens.shape[1], temperature=1.0).logprobs)
                  for p in (params, ref))
    np.testing.assert_allclose(kl, np.mean(np.sum((lp - lp_ref) * tmask, 1)), rtol=1e-5)
    assert abs(judging.sequence_kl(MODEL, params, MODEL, ref, ids, mask, tokens, tmask,
                                   1.0) - kl) > 1e-5  # without the observations: another KL


class PromptStream:
    """G word prompts per batch from a seeded stream whose position checkpoints resume."""

    def __init__(self):
        self.i = 0

    def __next__(self):
        self.i += 1
        rng = np.random.RandomState(self.i)
        ids = rng.randint(2, len(WORDS), (G, P)).astype(np.int32)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, saved):
        self.i = saved["i"]


class Preempted(BaseException):
    """What a kill is to the run: nothing below the test catches it."""


class PreemptingTokenizer:
    """The word tokenizer, raising `Preempted` on its `at`-th `decode` (None: never): the
    episode runner decodes each finished turn, so that is mid-episode."""

    def __init__(self, tokenizer, at=None):
        self.tokenizer, self.at, self.decodes = tokenizer, at, 0

    def decode(self, *args, **kwargs):
        self.decodes += 1
        if self.decodes == self.at:
            raise Preempted
        return self.tokenizer.decode(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.mark.slow
def test_preempted_mid_episode_and_resumed_equals_uninterrupted(tmp_path, word_tokenizer):
    """A run killed in the middle of an iteration's episodes (a turn sampled, its environment
    call not made) resumes from its last checkpoint and replays that iteration's episodes:
    weights, RL state and every untimed metric equal an uninterrupted run's."""
    from jrlhf.checkpoint import Checkpointer
    from jrlhf.loops import train
    from jrlhf.report import read_metrics
    from jrlhf.rollouts import Reward
    from jrlhf.setups import make_setup

    def run(out, tokenizer, resume=False):
        config = apply_overrides(CONFIG, [f"run.out_dir={out}", "grpo.iterations=3",
                                          "run.save_every=1"])
        return train(make_setup("grpo", config, MODEL, init_params(MODEL, 0)), config,
                     PromptStream(), reward=Reward(fn=lambda *a: 0.0), eos_token_id=EOS,
                     pad_token_id=PAD, tokenizer=tokenizer, environment=TwoTurnEnv,
                     out_dir=out, resume=resume, log=None)

    counting = PreemptingTokenizer(word_tokenizer)
    full = run(tmp_path / "a", counting)
    with pytest.raises(Preempted):
        run(tmp_path / "b", PreemptingTokenizer(word_tokenizer, at=counting.decodes * 2 // 3))
    checkpoints = Checkpointer(tmp_path / "b" / "grpo" / "checkpoints")
    assert 1 <= checkpoints.latest_step() < 3  # killed inside iteration 2 or 3
    checkpoints.close()
    replaying = PreemptingTokenizer(word_tokenizer)
    resumed = run(tmp_path / "b", replaying, resume=True)
    assert 0 < replaying.decodes < counting.decodes  # it resumed; it did not start over
    jax.tree.map(np.testing.assert_array_equal, resumed.state.params, full.state.params)
    jax.tree.map(np.testing.assert_array_equal, resumed.state.rl, full.state.rl)

    def untimed(path):
        return [{k: v for k, v in row.items() if not k.startswith(("time/", "tokens_per"))}
                for row in read_metrics(path / "metrics.jsonl")]

    assert untimed(tmp_path / "b") == untimed(tmp_path / "a")
    assert len(untimed(tmp_path / "a")) == 3


@pytest.mark.parametrize("setting,message", [
    ("env.on_error=ignore", r"env\.on_error must be skip\|stop, got 'ignore'"),
    ("env.max_turn_tokens=0", r"env\.max_turn_tokens=0 is out of range: expected >= 1"),
    ("env.max_turn_tokens=300", r"env\.max_turn_tokens=300 is out of range: expected <= "
                                r"env\.max_episode_tokens=256"),
    ("env.max_turns=-1", r"env\.max_turns=-1 is out of range"),
    ("env.timeout_s=0", r"env\.timeout_s=0\.0 is out of range: expected > 0"),
    ("env.timeout_s=nan", r"env\.timeout_s=nan is out of range"),
    ("env.groups=0", r"env\.groups=0 is out of range"),
    ("env.observation_role= ", r"env\.observation_role is empty"),
    ("env.enabled=maybe", r"--set env\.enabled='maybe': expected bool"),
])
def test_bad_env_settings_are_one_line_errors(setting, message):
    with pytest.raises(ValueError, match=message) as err:
        apply_overrides(Config(), [setting])
    assert "\n" not in str(err.value)


def test_episodes_refuse_what_they_cannot_do_in_one_line(word_tokenizer):
    from jrlhf.rollouts import Reward, RolloutLoop
    from jrlhf.setups import make_setup

    setup = make_setup("grpo", CONFIG, MODEL, init_params(MODEL, 0))
    reward = Reward(fn=lambda *a: 0.0)
    cases = [
        ({"data.task": "arithmetic"}, {}, r"data\.task='arithmetic' has no environment; tasks "
                                          r"with one: calculator"),
        ({}, {"tokenizer": None}, r"needs the run's tokenizer"),
        ({"reward.functions": "annotator"}, {}, r"leave reward\.functions and "
                                               r"reward\.model_path empty"),
        ({"rollout.slots": 4, "rollout.max_staleness": 1, "grpo.tis_cap": 2},
         {}, r"set rollout\.max_staleness=0, not 1"),
        ({"rollout.slots": 4, "rollout.host_local": "true"}, {},
         r"set rollout\.host_local=false"),
        ({"rollout.overlong": "penalty"}, {}, r"rollout\.overlong=penalty is not defined"),
    ]
    for settings, kwargs, message in cases:
        config = apply_overrides(CONFIG, [f"{k}={v}" for k, v in settings.items()])
        kwargs = {"tokenizer": word_tokenizer, "environment": TwoTurnEnv, **kwargs}
        if "data.task" in settings:
            kwargs.pop("environment")
        with pytest.raises(ValueError, match=message) as err:
            RolloutLoop(setup, config, reward, eos_token_id=EOS, **kwargs)
        assert "\n" not in str(err.value)


def test_the_calculator_task_and_its_config():
    """`calculator` is a task with an environment; configs/grpo_tools.py plays it."""
    assert isinstance(TASKS["calculator"].environment(), Environment)
    assert TASKS["calculator"] is calculator
    config = load_config("configs/grpo_tools.py")
    assert config.env.enabled and config.data.task == "calculator"
    assert config.rollout.max_new_tokens == config.env.max_episode_tokens  # plan / bench sizes
