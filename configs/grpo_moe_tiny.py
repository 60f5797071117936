"""GRPO on a tiny random-weight Qwen3-MoE-shaped policy (8 experts, 2 per token, one dense layer)
with routing replay, the load-balancing loss and expert parallelism available (`jrlhf grpo
--config configs/grpo_moe_tiny.py --set mesh.expert=2`)."""

from pathlib import Path

from jrlhf.config import derive, load_config
from jrlhf.models import ModelConfig

TINY_MOE = ModelConfig(family="llama", hf_model_type="qwen3_moe", vocab_size=49152, hidden_size=64,
                       num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
                       intermediate_size=128, qk_norm=True, num_experts=8, experts_per_token=2,
                       expert_size=32, norm_topk_prob=True, dense_layers=(1,),
                       router_aux_loss_coef=0.001, eos_token_id=2, pad_token_id=2,
                       bos_token_id=1)


def get_config():
    return derive(load_config(Path(__file__).with_name("grpo_tiny.py")), {
        "model.arch": TINY_MOE,
        "rollout.routing_replay": "on",
        "run.out_dir": "runs/grpo_moe_tiny",
    })
