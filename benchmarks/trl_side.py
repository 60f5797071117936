"""The TRL half of the side-by-side benchmark (runs in benchmarks/.venv-trl, never in jrlhf's).

Workload: shared/BENCHMARK.md (GPT-2 4x256, random weights, float32, random tokens that never
hit pad/EOS). Dropout is set to 0 on every model, because jrlhf has none: the two sides do the
same arithmetic. Prints one JSON object: median seconds and tokens/s per work item.
"""

import json
import sys
import tempfile
import time

import numpy as np
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config,
                          PreTrainedTokenizerFast, TrainerCallback)

STEPS, WARMUP = int(sys.argv[1]) if len(sys.argv) > 1 else 5, 2
EOS = 50256


class StepTimer(TrainerCallback):
    def __init__(self):
        self.ends = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def median_step(timer) -> float:
    return float(np.median(np.diff(timer.ends)[WARMUP - 1:]))


def tokenizer():
    vocab = {f"t{i}": i for i in range(EOS)} | {"<|endoftext|>": EOS}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", bos_token="<|endoftext|>")


def config(**kw):
    return GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=256, vocab_size=50257,
                      bos_token_id=EOS, eos_token_id=EOS, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, **kw)


def causal_lm(seed):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config(), dtype=torch.float32)


def scalar_model(seed):
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(
        config(num_labels=1, pad_token_id=EOS), dtype=torch.float32)


def ids(rng, n, length):
    return rng.randint(0, EOS, (n, length)).tolist()


COMMON = dict(bf16=False, fp16=False, use_cpu=True, report_to="none", save_strategy="no",
              disable_tqdm=True, logging_steps=1000, dataloader_num_workers=0, seed=0,
              learning_rate=1e-5, lr_scheduler_type="constant", weight_decay=0.0,
              max_grad_norm=1.0, gradient_checkpointing=False)


def sft(out):
    from trl import SFTConfig, SFTTrainer

    n = STEPS + WARMUP
    data = Dataset.from_dict({"input_ids": ids(np.random.RandomState(0), 8 * n, 128)})
    args = SFTConfig(output_dir=out, per_device_train_batch_size=8, max_length=128, max_steps=n,
                     loss_type="nll", packing=False, **COMMON)
    timer = StepTimer()
    SFTTrainer(model=causal_lm(0), args=args, train_dataset=data, processing_class=tokenizer(),
               callbacks=[timer]).train()
    return median_step(timer), 8 * 128


def reward(out):
    from trl import RewardConfig, RewardTrainer

    n = STEPS + WARMUP
    rng = np.random.RandomState(1)
    data = Dataset.from_dict({"chosen_ids": ids(rng, 8 * n, 128),
                              "rejected_ids": ids(rng, 8 * n, 128)})
    args = RewardConfig(output_dir=out, per_device_train_batch_size=8, max_length=128,
                        max_steps=n, **COMMON)
    timer = StepTimer()
    RewardTrainer(model=scalar_model(0), args=args, train_dataset=data,
                  processing_class=tokenizer(), callbacks=[timer]).train()
    return median_step(timer), 2 * 8 * 128


def ppo(out):
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    n = STEPS + WARMUP
    rng = np.random.RandomState(2)
    data = Dataset.from_dict({"input_ids": ids(rng, 8 * n, 64)})
    evald = Dataset.from_dict({"input_ids": ids(rng, 8, 64)})
    common = {k: v for k, v in COMMON.items() if k != "gradient_checkpointing"}
    args = PPOConfig(output_dir=out, per_device_train_batch_size=8, gradient_accumulation_steps=1,
                     num_ppo_epochs=4, num_mini_batches=1, response_length=64,
                     local_rollout_forward_batch_size=8, kl_coef=0.05, cliprange=0.2,
                     vf_coef=0.1, cliprange_value=0.2, gamma=1.0, lam=0.95,
                     missing_eos_penalty=None, whiten_rewards=False, temperature=1.0,
                     stop_token_id=None, total_episodes=8 * n, num_sample_generations=0,
                     **common)
    timer = StepTimer()
    trainer = PPOTrainer(args=args, processing_class=tokenizer(), model=causal_lm(0),
                         ref_model=causal_lm(0), reward_model=scalar_model(2),
                         value_model=scalar_model(1), train_dataset=data, eval_dataset=evald,
                         callbacks=[timer])
    trainer.train()
    return median_step(timer), 8 * (64 + 64)


if __name__ == "__main__":
    result = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    import trl

    result["trl"] = trl.__version__
    for name, fn in (("sft", sft), ("reward", reward), ("ppo_iteration", ppo)):
        with tempfile.TemporaryDirectory() as out:
            seconds, tokens = fn(out)
        result[name] = {"median_s": seconds, "tokens_per_s": tokens / seconds}
        print(f"[trl] {name}: {seconds:.3f} s", file=sys.stderr)
    print(json.dumps(result))
