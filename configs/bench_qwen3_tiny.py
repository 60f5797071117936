"""The jrlhf-vs-tunix workload (`benchmarks/compare_tunix.sh`): a ~6M-parameter Qwen3-shaped
model with random weights, float32, that jrlhf and google-tunix (`tunix.models.qwen3`) both
build. 4 layers of width 256, 4 query heads and 2 key/value heads of 64 (per-head QK-norm),
SiLU MLP of 768, RoPE θ 1e6, RMSNorm ε 1e-6, untied LM head (tunix's critic replaces it with a
1-wide head), vocabulary 5632.

GRPO iteration: 4 prompts x 4 samples of (64 + 64 sampled) tokens, 1 epoch of 1 minibatch, k3
KL loss β 0.04. PPO iteration: 8 prompts x (64 + 64), a separate critic, 4 epochs of 1
minibatch, k1 KL in the reward β 0.05, GAE γ 1 λ 0.95, whitened advantages. Temperature 1, no
top-k / top-p; AdamW lr 1e-5, grad-norm clip 1.0."""

from pathlib import Path

from jrlhf.config import derive, load_config
from jrlhf.models import ModelConfig

QWEN3_TINY = ModelConfig(family="llama", vocab_size=5632, hidden_size=256, num_layers=4,
                         num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=768,
                         max_position_embeddings=256, norm_eps=1e-6, rope_theta=1_000_000.0,
                         activation="silu", tie_word_embeddings=False, qk_norm=True,
                         hf_model_type="qwen3", bos_token_id=None, eos_token_id=1,
                         pad_token_id=0)


def get_config():
    return derive(load_config(Path(__file__).with_name("base.py")), {
        "model.source": "random",
        "model.arch": QWEN3_TINY,
        "data.max_prompt_length": 64,
        "data.max_response_length": 64,
        "rollout.max_new_tokens": 64,
        "rollout.temperature": 1.0,
        "grpo.group_size": 4,
        "grpo.prompts_per_iteration": 4,
        "grpo.epochs": 1,
        "grpo.minibatch_size": 0,
        "grpo.kl_coef": 0.04,
        "grpo.learning_rate": 1e-5,
        "ppo.prompts_per_iteration": 8,
        "ppo.minibatch_size": 0,
        "ppo.epochs": 4,
        "ppo.kl_coef": 0.05,
        "ppo.kl_estimator": "k1",
        "ppo.vf_coef": 0.1,
        "ppo.whiten_advantages": True,
        "ppo.critic": "separate",  # tunix's PPO trains a separate critic model
        "ppo.learning_rate": 1e-5,
        "optim.max_grad_norm": 1.0,
        "run.out_dir": "runs/bench_qwen3_tiny",
    })
