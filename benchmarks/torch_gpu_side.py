"""Eager PyTorch + transformers doing the GPU workload of shared/BENCHMARK.md: the peer side of
`benchmarks/gpu.py` (run it through that script, which passes the shapes).

float32 model and AdamW moments, `torch.autocast(bfloat16)` (Trainer's `bf16=True`), sdpa
attention, fused AdamW (on CUDA), grad-norm clip 1.0, lr 1e-5. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time

import torch
import torch.nn.functional as F
import transformers


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, warmup: int, steps: int) -> list:
    """Results of `steps` calls after `warmup` calls; each call returns its own timings."""
    for _ in range(warmup):
        fn()
    return [fn() for _ in range(steps)]


def clock(fn):
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def peak_bytes() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def reset_peak():
    gc.collect()  # the previous work's models
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def random_ids(shape, vocab, device, seed):
    g = torch.Generator().manual_seed(seed)
    # Ids below vocab - 256 never hit the special tokens (bos/eos/pad sit at the top).
    return torch.randint(0, vocab - 256, shape, generator=g).to(device)


class Peer:
    def __init__(self, args):
        self.args = args
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        a = args
        self.cfg = transformers.LlamaConfig(
            vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
            num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, head_dim=a.head_dim,
            intermediate_size=a.ffn, max_position_embeddings=4096, rope_theta=500000.0,
            tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
            pad_token_id=a.vocab - 1)

    def autocast(self):
        return torch.autocast(self.device, dtype=torch.bfloat16)

    def causal_lm(self, seed):
        torch.manual_seed(seed)
        return transformers.AutoModelForCausalLM.from_config(
            self.cfg, dtype=torch.float32, attn_implementation="sdpa").to(self.device)

    def classifier(self, seed):
        torch.manual_seed(seed)
        cfg = copy.deepcopy(self.cfg)
        cfg.num_labels = 1
        return transformers.AutoModelForSequenceClassification.from_config(
            cfg, dtype=torch.float32, attn_implementation="sdpa").to(self.device)

    def optimizer(self, params):
        return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0,
                                 fused=self.device == "cuda")

    def update(self, loss, params, opt):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sft(self, batch, length):
        reset_peak()
        model = self.causal_lm(0).train()
        params = list(model.parameters())
        opt = self.optimizer(params)
        ids = random_ids((batch, length), self.cfg.vocab_size, self.device, 1)

        def step():
            def work():
                with self.autocast():
                    loss = model(input_ids=ids, labels=ids).loss
                self.update(loss, params, opt)
            return clock(work)[0]

        times = timed(step, self.args.warmup, self.args.steps)
        out = {"median_s": statistics.median(times), "peak_bytes": peak_bytes()}
        return out

    def reward(self, pairs, length):
        reset_peak()
        model = self.classifier(0).train()
        params = list(model.parameters())
        opt = self.optimizer(params)
        ids = random_ids((2 * pairs, length), self.cfg.vocab_size, self.device, 2)

        def step():
            def work():
                with self.autocast():
                    r = model(input_ids=ids).logits[:, 0].float()
                loss = -F.logsigmoid(r[:pairs] - r[pairs:]).mean()
                self.update(loss, params, opt)
            return clock(work)[0]

        times = timed(step, self.args.warmup, self.args.steps)
        out = {"median_s": statistics.median(times), "peak_bytes": peak_bytes()}
        return out

    def ppo_iteration(self, rows, prompt, new):
        """generate -> score (policy, reference, reward model) -> GAE (Python loop) ->
        2 epochs x 1 minibatch of clipped policy + value losses (value head on the policy)."""
        reset_peak()
        policy = self.causal_lm(0)
        policy.generation_config.eos_token_id = None
        value_head = torch.nn.Linear(self.cfg.hidden_size, 1, bias=False).to(self.device)
        torch.nn.init.zeros_(value_head.weight)
        ref = copy.deepcopy(policy).eval().requires_grad_(False)
        rm = self.classifier(2).eval().requires_grad_(False)
        params = list(policy.parameters()) + list(value_head.parameters())
        opt = self.optimizer(params)
        prompts = random_ids((rows, prompt), self.cfg.vocab_size, self.device, 3)
        beta, gamma, lam, clip, vclip, vf = 0.05, 1.0, 0.95, 0.2, 0.2, 0.1

        def logprobs_values(model, seq, head=None):
            out = model(input_ids=seq, output_hidden_states=head is not None)
            logits = out.logits[:, prompt - 1:-1].float()
            logp = torch.gather(F.log_softmax(logits, -1), 2, seq[:, prompt:, None])[..., 0]
            if head is None:
                return logp, None
            return logp, head(out.hidden_states[-1][:, prompt - 1:-1]).float()[..., 0]

        def iteration():
            policy.eval()

            def generate():
                with torch.no_grad(), self.autocast():
                    return policy.generate(
                        prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                        min_new_tokens=new, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                        pad_token_id=self.cfg.pad_token_id)

            t_gen, seq = clock(generate)

            def score():
                with torch.no_grad(), self.autocast():
                    logp, values = logprobs_values(policy, seq, value_head)
                    ref_logp, _ = logprobs_values(ref, seq)
                    scores = rm(input_ids=seq).logits[:, 0].float()
                return logp, values, ref_logp, scores

            t_score, (logp, values, ref_logp, scores) = clock(score)

            def update():
                rewards = -beta * (logp - ref_logp)
                rewards[:, -1] += scores
                last, advantages = 0.0, []
                for t in reversed(range(new)):
                    next_value = values[:, t + 1] if t < new - 1 else 0.0
                    delta = rewards[:, t] + gamma * next_value - values[:, t]
                    last = delta + gamma * lam * last
                    advantages.append(last)
                advantages = torch.stack(advantages[::-1], 1)
                returns = advantages + values
                advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
                policy.train()
                for _ in range(2):
                    with self.autocast():
                        new_logp, vpred = logprobs_values(policy, seq, value_head)
                    ratio = torch.exp(new_logp - logp)
                    pg = torch.max(-advantages * ratio,
                                   -advantages * ratio.clamp(1 - clip, 1 + clip)).mean()
                    vclipped = values + (vpred - values).clamp(-vclip, vclip)
                    vf_loss = 0.5 * torch.max((vpred - returns) ** 2,
                                              (vclipped - returns) ** 2).mean()
                    self.update(pg + vf * vf_loss, params, opt)

            t_update, _ = clock(update)
            return t_gen, t_score, t_update

        runs = timed(iteration, 1, self.args.ppo_steps)
        gen, score, upd = (statistics.median(x) for x in zip(*runs))
        out = {"median_s": statistics.median(sum(r) for r in runs),
               "phases": {"generate": gen, "score": score, "update": upd},
               "decode_step_s": gen / new, "peak_bytes": peak_bytes()}
        return out


def main():
    p = argparse.ArgumentParser(description=__doc__)
    for name, default in (("vocab", 128256), ("hidden", 2048), ("layers", 16), ("heads", 32),
                          ("kv_heads", 8), ("head_dim", 64), ("ffn", 8192), ("sft_batch", 8),
                          ("sft_length", 1024), ("long_batch", 2), ("long_length", 4096),
                          ("reward_pairs", 4), ("rows", 32), ("prompt", 128), ("new", 128),
                          ("warmup", 2), ("steps", 5), ("ppo_steps", 3)):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    args = p.parse_args()
    peer = Peer(args)
    result = {"torch": torch.__version__, "transformers": transformers.__version__,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "sft": peer.sft(args.sft_batch, args.sft_length),
              "sft_long": peer.sft(args.long_batch, args.long_length),
              "reward": peer.reward(args.reward_pairs, args.sft_length),
              "ppo_iteration": peer.ppo_iteration(args.rows, args.prompt, args.new)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
