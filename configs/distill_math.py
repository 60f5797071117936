"""On-policy distillation on the arithmetic task: the GRPO-trained policy of
`configs/grpo_math.py` teaches the untrained SmolLM2-135M-Instruct.

First `jrlhf grpo --config configs/grpo_math.py` (it exports its policy, LoRA merged, to
`runs/grpo_math/grpo/export`), then `jrlhf distill --config configs/distill_math.py`: the student
samples the arithmetic prompts, the teacher scores every sampled token, and the per-token
advantage is A_t = log p_teacher(y_t) − log q_student(y_t). Pure distillation: the task's
checker (1 for the exact answer) is logged, not trained on (`distill.task_reward_weight` 0);
held-out accuracy of the starting model and of the student is printed at the end (the
`distill/eval` stage). Same sampling, LoRA and prompts as the GRPO run. Run from the folder the
GRPO run was started in (the teacher path is relative), or
`--set distill.teacher_source=/path/to/export`.
"""

from pathlib import Path

from jrlhf.config import derive, load_config


def get_config():
    return derive(load_config(Path(__file__).with_name("grpo_math.py")), {
        "distill.teacher_source": "runs/grpo_math/grpo/export",
        "distill.prompts_per_iteration": 4,
        "distill.group_size": 4,
        "distill.iterations": 20,
        "distill.learning_rate": 1e-3,
        "run.out_dir": "runs/distill_math",
    })
