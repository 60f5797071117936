"""A host reward for tests/test_multihost.py (a plug-in: `reward.functions=...:slow_on_process_1`).

It scores every response 0, but on process 1 it first sleeps `JRLHF_TEST_SLOW_SECONDS`: a
straggler host whose lag the straggler metrics (`hosts/*`) must show.
"""

import os
import time

import jax
import numpy as np


def slow_on_process_1(prompts, responses):
    if jax.process_index() == 1:
        time.sleep(float(os.environ.get("JRLHF_TEST_SLOW_SECONDS", "0")))
    return np.zeros(len(responses), np.float32)
