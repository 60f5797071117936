"""The GPU benchmark workload (shared/BENCHMARK.md, "GPU workload"): the Llama-3.2-1B shape with
random weights, float32 parameters and AdamW moments, bfloat16 compute.

SFT 8 x 1024 tokens (128 + 896); reward 4 pairs x 1024; PPO 32 prompts x 128 + 128 sampled
tokens, value head on the policy (shared critic), 2 epochs x 1 minibatch, k1 KL beta 0.05,
GAE gamma 1 lambda 0.95, whitened advantages, clip 0.2, value clip 0.2, vf 0.1; AdamW lr 1e-5,
grad-norm clip 1.0. Long context: `--set sft.batch_size=2 --set data.max_response_length=3968`.
`benchmarks/gpu.py` runs it beside eager PyTorch.
"""

from pathlib import Path

from jrlhf.config import derive, load_config
from jrlhf.models import ModelConfig

LLAMA_3_2_1B = ModelConfig(family="llama", vocab_size=128256, hidden_size=2048, num_layers=16,
                           num_heads=32, num_kv_heads=8, head_dim=64, intermediate_size=8192,
                           max_position_embeddings=4096, rope_theta=500000.0,
                           norm_eps=1e-5, activation="silu", tie_word_embeddings=True,
                           hf_model_type="llama", bos_token_id=128000, eos_token_id=128001,
                           pad_token_id=128001)


def get_config():
    return derive(load_config(Path(__file__).with_name("base.py")), {
        "model.source": "random",
        "model.arch": LLAMA_3_2_1B,
        "model.dtype": "bfloat16",
        "data.max_prompt_length": 128,
        "data.max_response_length": 896,
        "sft.batch_size": 8,
        "sft.learning_rate": 1e-5,
        "reward.batch_size": 4,
        "reward.learning_rate": 1e-5,
        "ppo.prompts_per_iteration": 32,
        "ppo.minibatch_size": 0,
        "ppo.epochs": 2,
        "ppo.critic": "shared",
        "ppo.kl_estimator": "k1",
        "ppo.kl_coef": 0.05,
        "ppo.gamma": 1.0,
        "ppo.lam": 0.95,
        "ppo.whiten_advantages": True,
        "ppo.clip_eps": 0.2,
        "ppo.value_clip_eps": 0.2,
        "ppo.vf_coef": 0.1,
        "ppo.learning_rate": 1e-5,
        "rollout.max_new_tokens": 128,
        "rollout.temperature": 1.0,
        "optim.max_grad_norm": 1.0,
        "run.out_dir": "runs/bench-gpu",
    })
