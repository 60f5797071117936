"""The google-tunix half of `benchmarks/compare_tunix.py` (runs in benchmarks/.venv-tunix, never
in jrlhf's venv; tunix never becomes a jrlhf dependency).

Times whole GRPO and PPO iterations of tunix 0.1.7's own learners (`tunix.rl.grpo.grpo_learner.
GRPOLearner`, `tunix.rl.ppo.ppo_learner.PPOLearner`) on an `RLCluster` with the vanilla rollout
engine (tunix's KV-cache `Sampler`), all roles on one single-device mesh, so the sampler shares
the actor's weights (no weight sync). The model is `tunix.models.qwen3.Qwen3` built from a
`ModelConfig` of the workload's shape (the driver passes it as JSON), random weights. The
critic is `tunix.rl.utils.create_critic_model(actor)`: a copy of the actor whose untied
`lm_head` becomes a 1-wide head. The reference is a copy of the actor.

Rewards: one host function over the decoded texts, the same one jrlhf's side calls, returning
integers (`reward_fn`): tunix 0.1.7's PPO scatters the per-sequence scores into
`jnp.zeros_like(completion_ids)`, an int32 array, so a fractional score is truncated (0.7 -> 0);
integer scores pass through exactly.

Tokens: `IdTokenizer` maps the text "12 345 ..." to those ids and back, so the prompts are the
driver's random ids exactly (no BOS added). Pad id 0 and EOS id 1 never occur in prompts; the
rollout's `eos_tokens=[-1]` means sampling never stops early, as on jrlhf's side (there a
sampled 0 would still count as a response token; here tunix would mask it as padding).

Timing: per iteration (one `_run_global_step`), wall time between consecutive iteration ends,
after `warmup` untimed iterations (compilation). Phases: generate = `RLCluster.generate`;
score = the rest of `_generate_and_compute_advantage` (reference / old-policy log-probs,
critic values, rewards, advantages), awaited; update = `update_actor` + `update_critic`.

Usage: tunix_side.py '<workload json>'   (prints one JSON object on its last line)
"""

import ctypes
import json
import os
import sys
import time

if os.environ.get("TUNIX_MALLOPT") == "1":  # jrlhf's `run.host_memory=keep`, before JAX starts
    _libc = ctypes.CDLL("libc.so.6")
    for _param, _value in ((-8, 1), (-4, 0), (-1, 2**31 - 1)):  # arena max, mmap max, trim
        assert _libc.mallopt(_param, _value) == 1

from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from tunix.models.qwen3 import model as qwen3
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl import utils as rl_utils
from tunix.rl.grpo import grpo_learner
from tunix.rl.ppo import ppo_learner
from tunix.rl.rollout import base_rollout
from tunix_workload import EOS, PAD, ids_to_text, prompt_ids, reward_fn


class IdTokenizer:
    """Text "12 345 ..." <-> token ids; no BOS (bos_id() is None)."""

    def encode(self, text, **kwargs):
        return [int(t) for t in text.split()]

    def decode(self, ids, **kwargs):
        return ids_to_text(ids)

    def bos_id(self):
        return None

    def eos_id(self):
        return EOS

    def pad_id(self):
        return PAD


def prompt_batches(w, prompts: int, n: int, seed: int):
    """`n` batches of `prompts` prompts as text: `tunix_workload.prompt_ids`, the ids jrlhf's
    side draws. An array, as a grain batch gives it (the learner `np.repeat`s each leaf)."""
    ids = prompt_ids(w["vocab_size"], n, prompts, w["prompt_length"], seed)
    return [{"prompts": np.array([ids_to_text(row) for row in batch])} for batch in ids]


def build_model(w, seed: int) -> qwen3.Qwen3:
    cfg = qwen3.ModelConfig(
        num_layers=w["num_layers"], vocab_size=w["vocab_size"], embed_dim=w["hidden_size"],
        hidden_dim=w["intermediate_size"], num_heads=w["num_heads"], head_dim=w["head_dim"],
        num_kv_heads=w["num_kv_heads"], rope_theta=int(w["rope_theta"]),
        norm_eps=w["norm_eps"], use_tied_embedding=False, dtype=jnp.float32,
        param_dtype=jnp.float32)
    model = qwen3.Qwen3(cfg, rngs=nnx.Rngs(seed))
    # tunix initialises the MLP kernels to zero; give every matrix N(0, 0.02) like jrlhf's
    # random weights (norm scales stay 1).
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [0.02 * jax.random.normal(k, x.shape, x.dtype) if x.ndim >= 2 else x
              for k, x in zip(keys, leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


def copy_model(model):
    graph, state = nnx.split(model)
    return nnx.merge(graph, jax.tree.map(jnp.copy, state))


def optimizer(w, lr: float):
    return optax.chain(optax.clip_by_global_norm(w["max_grad_norm"]),
                       optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8,
                                   weight_decay=0.0))


def num_params(model) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


class IterationTimer:
    """Wraps the learner's and cluster's methods to record per-iteration phase seconds."""

    def __init__(self, learner):
        self.iters, self.ends, self.lengths = [], [], []
        cluster = learner.rl_cluster
        self._wrap(cluster, "generate", "generate",
                   block=lambda out: self.lengths.extend(len(t) for t in out.tokens))
        self._wrap(learner, "_generate_and_compute_advantage", "rollout",
                   block=lambda ex: ex)
        self._wrap(cluster, "update_actor", "update",
                   block=lambda _: nnx.state(cluster.actor_trainer.model))
        if hasattr(cluster, "critic_trainer"):
            self._wrap(cluster, "update_critic", "update",
                       block=lambda _: nnx.state(cluster.critic_trainer.model))
        step = learner._run_global_step

        def run_global_step(*args, **kwargs):
            self.iters.append({"generate": 0.0, "rollout": 0.0, "update": 0.0})
            out = step(*args, **kwargs)
            self.ends.append(time.perf_counter())
            return out

        learner._run_global_step = run_global_step

    def _wrap(self, obj, name, phase, block=None):
        fn = getattr(obj, name)

        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            if block is not None:
                jax.block_until_ready(block(out))
            self.iters[-1][phase] += time.perf_counter() - start
            return out

        setattr(obj, name, wrapped)

    def result(self, start: float, warmup: int) -> dict:
        ends = [start] + self.ends
        walls = np.diff(ends)[warmup:]
        timed = self.iters[warmup:]
        phases = {
            "generate": [p["generate"] for p in timed],
            "score": [p["rollout"] - p["generate"] for p in timed],
            "update": [p["update"] for p in timed],
        }
        return {"median_s": float(np.median(walls)), "iteration_s": [float(x) for x in walls],
                "first_iteration_s": float(ends[1] - ends[0]),
                "phases": {k: {"median_s": float(np.median(v))} for k, v in phases.items()},
                "response_length": {"min": int(min(self.lengths)),
                                    "max": int(max(self.lengths))}}


def cluster(w, actor, *, critic=None, lr: float, epochs: int, iterations: int):
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
    roles = [rl_cluster_lib.Role.ACTOR, rl_cluster_lib.Role.REFERENCE,
             rl_cluster_lib.Role.ROLLOUT, rl_cluster_lib.Role.CRITIC,
             rl_cluster_lib.Role.REWARD]
    rollout = base_rollout.RolloutConfig(
        max_tokens_to_generate=w["new_tokens"], max_prompt_length=w["prompt_length"],
        kv_cache_size=w["prompt_length"] + w["new_tokens"], temperature=w["temperature"],
        top_p=1.0, top_k=None, eos_tokens=[-1])
    training = rl_cluster_lib.RLTrainingConfig(
        actor_optimizer=optimizer(w, lr), critic_optimizer=optimizer(w, lr) if critic else None,
        eval_every_n_steps=10**9, max_steps=iterations * epochs)
    config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={r: mesh for r in roles}, rollout_engine="vanilla", offload_to_cpu=False,
        training_config=training, rollout_config=rollout)
    return rl_cluster_lib.RLCluster(actor=actor, critic=critic, reference=copy_model(actor),
                                    tokenizer=IdTokenizer(), cluster_config=config)


def timed_training(learner, w, settings: dict, actor) -> dict:
    """Train `learner` on the warm-up + measured iterations' prompt batches, timed per
    iteration."""
    timer = IterationTimer(learner)
    n = w["warmup"] + w["steps"]
    data = prompt_batches(w, settings["prompts"], n, seed=settings["seed"])
    start = time.perf_counter()
    learner.train(data)
    return {**timer.result(start, w["warmup"]), "model_params": num_params(actor)}


def run_grpo(w) -> dict:
    g = w["grpo"]
    n = w["warmup"] + w["steps"]
    actor = build_model(w, seed=0)
    rl = cluster(w, actor, lr=g["learning_rate"], epochs=g["epochs"], iterations=n)
    config = grpo_learner.GRPOConfig(
        num_generations=g["group_size"], num_iterations=g["epochs"], beta=g["kl_coef"],
        epsilon=g["clip_eps"], kl_loss_mode="low_var_kl", loss_agg_mode="token-mean")
    learner = grpo_learner.GRPOLearner(rl_cluster=rl, algo_config=config, reward_fns=reward_fn)
    return timed_training(learner, w, g, actor)


def run_ppo(w) -> dict:
    p = w["ppo"]
    n = w["warmup"] + w["steps"]
    actor = build_model(w, seed=0)
    critic = rl_utils.create_critic_model(actor, seed=1)
    rl = cluster(w, actor, critic=critic, lr=p["learning_rate"], epochs=p["epochs"],
                 iterations=n)
    config = ppo_learner.PPOConfig(
        num_iterations=p["epochs"], gamma=p["gamma"], gae_lambda=p["lam"], beta=p["kl_coef"],
        epsilon=p["clip_eps"], clip_range_value=p["value_clip_eps"], kl_method="kl")
    learner = ppo_learner.PPOLearner(rl_cluster=rl, ppo_config=config, reward_fns=reward_fn)
    return timed_training(learner, w, p, actor)


def main():
    w = json.loads(sys.argv[1])
    result = {"tunix": metadata.version("google-tunix"), "jax": jax.__version__,
              "mallopt": os.environ.get("TUNIX_MALLOPT") == "1",
              "flax": metadata.version("flax"), "optax": metadata.version("optax"),
              "device": jax.devices()[0].device_kind}
    for name, fn in (("grpo_iteration", run_grpo), ("ppo_iteration", run_ppo)):
        if name in w["steps_to_run"]:
            result[name] = fn(w)
            print(f"[tunix] {name}: {result[name]['median_s']:.3f} s", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
