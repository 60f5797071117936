"""A tiny random-weight Llama on SmolLM2's tokenizer: the shortened pipeline CI runs end to end."""

from pathlib import Path

from jrlhf.config import derive, load_config
from jrlhf.models import ModelConfig

TINY = ModelConfig(family="llama", vocab_size=49152, hidden_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, intermediate_size=128, tie_word_embeddings=True,
                   eos_token_id=2, pad_token_id=2, bos_token_id=1)


def get_config():
    return derive(load_config(Path(__file__).with_name("base.py")), {
        "model.source": "random",
        "model.arch": TINY,
        "model.tokenizer": "smollm2",
        "data.max_prompt_length": 64,
        "data.max_response_length": 16,
        "data.num_sft_examples": 64,
        "data.num_ranking_prompts": 16,
        "data.num_eval_prompts": 16,
        "sft.steps": 12,
        "sft.batch_size": 8,
        "sft.learning_rate": 3e-3,
        "reward.steps": 8,
        "reward.batch_size": 4,
        "reward.learning_rate": 1e-3,
        "ppo.iterations": 4,
        "ppo.prompts_per_iteration": 8,
        "ppo.minibatch_size": 4,
        "ppo.epochs": 2,
        "rollout.max_new_tokens": 12,
        "ppo.learning_rate": 1e-3,
        "run.out_dir": "runs/tiny",
        "run.progress": False,
    })
