"""Built-in tasks: prompt/SFT data generators and programmatic annotators (`data.task`)."""

from jrlhf.tasks import arithmetic, reviews

TASKS = {"reviews": reviews, "arithmetic": arithmetic}
