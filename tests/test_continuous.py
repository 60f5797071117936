"""Continuous batching (`jrlhf.continuous`): S slots refilled on device give the static
sampler's greedy tokens for every prompt, sampled log-probs the trainer agrees with, and a
sequence's samples independent of the slot count."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrlhf import rl
from jrlhf.continuous import generate_continuous
from jrlhf.models import ModelConfig, forward, init_params
from jrlhf.sampling import generate
from test_models import left_padded_batch

LLAMA = ModelConfig(family="llama", vocab_size=32, hidden_size=32, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, intermediate_size=64)
GPT2 = ModelConfig(family="gpt2", vocab_size=32, hidden_size=32, num_layers=2, num_heads=4,
                   num_kv_heads=4, head_dim=8, intermediate_size=64, max_position_embeddings=64,
                   activation="gelu_new", tie_word_embeddings=True, attention_bias=True,
                   output_bias=True, mlp_bias=True)
WINDOWED = dataclasses.replace(LLAMA, sliding_window=4)
# GPT-OSS's pieces: attention sinks in every decode step, sliding and full layers, experts.
SINKS = dataclasses.replace(
    WINDOWED, layer_types=("sliding_attention", "full_attention"), attention_sinks=True,
    attention_bias=True, output_bias=True, num_experts=4, experts_per_token=2, expert_size=16,
    routing="topk_softmax", router_bias=True, expert_bias=True, swiglu_limit=7.0)
CONFIGS = {"llama": LLAMA, "gpt2": GPT2, "sliding_window": WINDOWED, "sinks": SINKS}


def prompts(G=6, seed=0):
    ids, mask = left_padded_batch(32, [3 + (g * 5) % 7 for g in range(G)], seed=seed)
    return jnp.asarray(ids), jnp.asarray(mask)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("slots", [1, 3, 12])
def test_greedy_continuous_equals_static_for_every_prompt(name, slots):
    cfg = CONFIGS[name]
    params = init_params(cfg, 0)
    ids, mask = prompts()
    budgets = jnp.asarray([7, 2, 9, 0, 4, 9, 1, 5, 9, 3, 6, 8])  # one per output row (K = 2)
    kwargs = dict(max_new_tokens=9, temperature=0.0, eos_token_id=7, pad_token_id=0,
                  num_samples=2, budgets=budgets)
    static = generate(cfg, params, ids, mask, jax.random.key(0), **kwargs)
    cont = generate_continuous(cfg, params, ids, mask, jax.random.key(0), slots=slots,
                               **kwargs)
    np.testing.assert_array_equal(cont.mask, static.mask)
    np.testing.assert_array_equal(cont.tokens, static.tokens)
    np.testing.assert_allclose(cont.logprobs, static.logprobs, atol=1e-5)
    assert int(np.asarray(static.mask).sum()) > 20
    # Every slot-step but the queue's tail is used: at least one token per step overall.
    assert int(cont.steps) <= int(np.asarray(cont.mask).sum()) + int(budgets.max())


@pytest.mark.slow
def test_sampled_logprobs_equal_the_trainers_forward_and_do_not_depend_on_the_slots():
    params = init_params(LLAMA, 1)
    ids, mask = prompts(G=4, seed=2)
    kwargs = dict(max_new_tokens=8, temperature=0.8, pad_token_id=0, num_samples=3,
                  eos_token_id=5)
    outs = [generate_continuous(LLAMA, params, ids, mask, jax.random.key(3), slots=s, **kwargs)
            for s in (2, 5, 12)]
    for out in outs[1:]:
        np.testing.assert_array_equal(out.tokens, outs[0].tokens)
        np.testing.assert_allclose(out.logprobs, outs[0].logprobs, atol=1e-5)
    out = outs[1]
    full_ids = jnp.concatenate([jnp.repeat(ids, 3, 0), out.tokens], 1)
    full_mask = jnp.concatenate([jnp.repeat(mask, 3, 0), out.mask], 1)
    logits = forward(LLAMA, params, full_ids, full_mask)[:, -9:-1] / 0.8
    trainer = rl.logprobs_from_logits(logits, out.tokens) * out.mask
    np.testing.assert_allclose(out.logprobs, trainer, atol=1e-5)
    np.testing.assert_array_equal(out.temperature, np.full(12, 0.8, np.float32))
    # Samples differ between the K samples of a prompt (keyed per sequence).
    assert not np.array_equal(out.tokens[0], out.tokens[1])


def test_slot_counts_outside_the_queue_are_refused():
    params = init_params(LLAMA, 0)
    ids, mask = prompts(G=2)
    for slots in (0, 5):
        with pytest.raises(ValueError, match=rf"slots={slots}: expected 1 to the 4 sequences"):
            generate_continuous(LLAMA, params, ids, mask, jax.random.key(0), slots=slots,
                                max_new_tokens=4, num_samples=2)


@pytest.mark.slow
def test_a_grpo_iteration_samples_through_the_slots_and_trains_on_what_they_sampled():
    """`rollout.slots`: the rollout loop's sampler is the continuous one; the trainer's
    log-probs of its tokens equal the sampler's (gap at float32 rounding), and a slot count
    above the iteration's rows is one line naming the setting."""
    from test_ppo_loop import CFG, count_target, prompt_stream

    from jrlhf.config import Config, GRPOConfig, RolloutConfig, RunConfig
    from jrlhf.rollouts import Reward, RolloutLoop
    from jrlhf.setups import make_setup

    def loop_with(slots):
        config = Config(grpo=GRPOConfig(group_size=4, prompts_per_iteration=4),
                        rollout=RolloutConfig(max_new_tokens=8, slots=slots),
                        run=RunConfig(progress=False))
        setup = make_setup("grpo", config, CFG, init_params(CFG, 0))
        return RolloutLoop(setup, config, Reward(fn=count_target), eos_token_id=3), setup

    loop, setup = loop_with(5)
    prompts = next(prompt_stream(4))
    budgets = np.array([2, 8, 5, 3])
    state, metrics = loop(setup.state, dict(prompts, max_new_tokens=budgets))
    assert metrics["mismatch/gap_max"] < 1e-5
    assert metrics["response_length_max"] <= 8 and metrics["response_length"] <= 4.5
    assert int(state.step) == 1
    with pytest.raises(ValueError, match=r"rollout.slots=17 is more than the 16 rows grpo "
                                         r"samples per iteration"):
        loop_with(17)


@pytest.mark.slow
def test_slots_split_over_a_2x2x2_mesh_give_the_unsharded_tokens():
    from test_sampling import on_a_2x2x2_mesh

    params = init_params(LLAMA, 0)
    ids, mask = prompts(G=4)
    kwargs = dict(max_new_tokens=6, slots=4, temperature=1.0, eos_token_id=5, num_samples=2)
    ref = generate_continuous(LLAMA, params, ids, mask, jax.random.key(6), **kwargs)
    sharded, ids, mask, batch_sh = on_a_2x2x2_mesh(params, ids, mask)
    out = generate_continuous(LLAMA, sharded, ids, mask, jax.random.key(6),
                              batch_sharding=batch_sh, **kwargs)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)


@pytest.mark.slow
def test_lora_through_the_slots_samples_what_the_trainer_scores_in_float32_and_bf16():
    """The sampler merges the adapters as the trainer's forward does (W + s·A·B in float32,
    then the compute dtype): through the slots with trained adapters the float32 gap is
    rounding, and a bf16 sampler's gap with LoRA is that of the same model without it."""
    from test_ppo_loop import CFG, count_target, prompt_stream

    from jrlhf.config import Config, GRPOConfig, LoRAConfig, RolloutConfig, RunConfig
    from jrlhf.rollouts import Reward, RolloutLoop
    from jrlhf.setups import make_setup

    def second_iteration_gap(rank, dtype):
        config = Config(grpo=GRPOConfig(group_size=4, prompts_per_iteration=4,
                                        learning_rate=3e-2),
                        rollout=RolloutConfig(max_new_tokens=8, slots=6, dtype=dtype),
                        lora=LoRAConfig(rank=rank, targets=(".*(q_proj|v_proj|up_proj)/kernel",)),
                        run=RunConfig(progress=False))
        setup = make_setup("grpo", config, CFG, init_params(CFG, 0))
        loop = RolloutLoop(setup, config, Reward(fn=count_target), eos_token_id=3)
        stream = prompt_stream(4)
        state, _ = loop(setup.state, next(stream))  # adapters move off zero
        if rank:
            b = state.params["layers"][0]["attn"]["q_proj"]["lora_b"]
            assert float(jnp.abs(b).max()) > 1e-3
        _, metrics = loop(state, next(stream))
        return metrics["mismatch/gap_max"]

    assert second_iteration_gap(4, "") < 1e-5
    with_lora, without = second_iteration_gap(4, "bfloat16"), second_iteration_gap(0, "bfloat16")
    print(f"bf16 sampler, mismatch/gap_max: LoRA {with_lora:.4f}, no LoRA {without:.4f}")
    assert 1e-3 < with_lora < 2 * without


def collectives(hlo_text: str) -> dict[str, int]:
    """How many of each cross-device operation a compiled program's text holds."""
    import re

    ops = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
    return {op: len(re.findall(rf"\b{op}(-start)?\(", hlo_text)) for op in ops}


@pytest.mark.slow
def test_host_local_decode_has_no_collective_and_samples_what_one_device_samples():
    """`rollout.host_local` on a (data 2, fsdp 2, tensor 2) mesh: every device decodes its own
    rows with a whole copy of the policy — the compiled decode program holds no collective at
    all (the mesh's own slot-split decode holds dozens) — and the rows are token for token
    those of one call over the whole batch on one device."""
    from test_ppo_loop import CFG, count_target, prompt_stream

    from jrlhf import sharding
    from jrlhf.config import Config, GRPOConfig, MeshConfig, RolloutConfig, RunConfig
    from jrlhf.rollouts import Reward, RolloutLoop
    from jrlhf.setups import make_setup

    def loop_with(host_local, mesh):
        config = Config(grpo=GRPOConfig(group_size=4, prompts_per_iteration=4),
                        rollout=RolloutConfig(max_new_tokens=8, slots=8, host_local=host_local),
                        run=RunConfig(progress=False))
        setup = make_setup("grpo", config, CFG, init_params(CFG, 0), mesh=mesh)
        seen, update = [], setup.step

        def step(state, batch):
            seen.append({k: sharding.to_host(v) for k, v in batch.items()})
            return update(state, batch)

        loop = RolloutLoop(dataclasses.replace(setup, step=step), config,
                           Reward(fn=count_target), eos_token_id=3)
        loop(setup.state, next(prompt_stream(4)))
        return loop, seen[0]

    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    local, batch = loop_with(True, mesh)
    _, reference = loop_with(False, None)
    for key in ("input_ids", "response_mask", "sampler_logprobs"):
        np.testing.assert_allclose(batch[key], reference[key], atol=1e-5, err_msg=key)
    assert batch["response_mask"].sum() > 40
    setup_params = sharding.put(init_params(CFG, 0), sharding.replicated(mesh))
    ids = jnp.zeros((4, 4), jnp.int32)
    text = local.decode_rows.lower(setup_params, ids, jnp.ones_like(ids), jax.random.key(0),
                                   jnp.full((16,), 8, jnp.int32)).compile().as_text()
    assert collectives(text) == dict.fromkeys(collectives(""), 0), collectives(text)
    # The mesh's own decode (slots split, parameters sharded) communicates at every step.
    sharded = sharding.put(init_params(CFG, 0), sharding.param_shardings(init_params(CFG, 0),
                                                                          mesh))
    text = generate_continuous.lower(
        CFG, sharded, ids, jnp.ones_like(ids), jax.random.key(0), max_new_tokens=8, slots=8,
        num_samples=4, batch_sharding=sharding.batch_sharding(mesh)).compile().as_text()
    assert sum(collectives(text).values()) > 10


def test_host_local_refusals_are_one_line():
    from jrlhf.config import RolloutConfig

    with pytest.raises(ValueError, match=r"rollout.host_local needs continuous batching"):
        RolloutConfig(host_local=True)
    with pytest.raises(ValueError, match=r"host_local and rollout.max_staleness do not combine"):
        RolloutConfig(host_local=True, slots=4, max_staleness=1)
