"""Built-in tasks: prompt/SFT data generators and programmatic annotators (`data.task`).

A task module has `write_task_files(folder, num_sft=, num_prompts=, num_eval=, seed=)` and
`score_texts(prompts, responses) -> scores` (its annotator); a task played as multi-turn
episodes (`env.enabled`) also has `environment() -> jrlhf.envs.Environment`, one per episode.
"""

from jrlhf.tasks import arithmetic, calculator, reviews

TASKS = {"reviews": reviews, "arithmetic": arithmetic, "calculator": calculator}
