"""The fixed benchmark workload (shared/BENCHMARK.md): a 4-layer GPT-2 of width 256 with random
weights, float32. SFT 8 x 128 tokens; reward 8 pairs x 128; PPO 8 prompts x 64 + 64 sampled
tokens, 4 epochs of 1 minibatch, k1 KL with beta 0.05; AdamW lr 1e-5, grad-norm clip 1.0."""

from pathlib import Path

from jrlhf.config import derive, load_config
from jrlhf.models import ModelConfig

GPT2_BENCH = ModelConfig(family="gpt2", vocab_size=50257, hidden_size=256, num_layers=4,
                         num_heads=4, num_kv_heads=4, head_dim=64, intermediate_size=1024,
                         max_position_embeddings=256, activation="gelu_new",
                         tie_word_embeddings=True, attention_bias=True, output_bias=True,
                         mlp_bias=True,
                         hf_model_type="gpt2", bos_token_id=50256, eos_token_id=50256,
                         pad_token_id=50256)


def get_config():
    return derive(load_config(Path(__file__).with_name("base.py")), {
        "model.source": "random",
        "model.arch": GPT2_BENCH,
        "data.max_prompt_length": 64,
        "data.max_response_length": 64,
        "sft.batch_size": 8,
        "sft.learning_rate": 1e-5,
        "reward.batch_size": 8,
        "reward.learning_rate": 1e-5,
        "ppo.prompts_per_iteration": 8,
        "ppo.minibatch_size": 0,
        "ppo.epochs": 4,
        "rollout.max_new_tokens": 64,
        "ppo.kl_coef": 0.05,
        "ppo.vf_coef": 0.1,
        "ppo.learning_rate": 1e-5,
        "ppo.whiten_advantages": True,
        "ppo.critic": "separate",  # TRL: a separate value model (and a reward model)
        "optim.max_grad_norm": 1.0,
        "run.out_dir": "runs/bench",
    })
