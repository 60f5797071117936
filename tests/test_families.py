"""The checkpoints people fine-tune now, against transformers built from tiny configs: Llama 3.x
RoPE scaling (llama3 / yarn / linear), Llama biases, Mistral / Qwen2 sliding windows, Qwen3,
Gemma 2 and Gemma 3 (text), the mixtures of experts (Qwen2-MoE, Qwen3-MoE, Mixtral, GPT-OSS).
Norms and biases are perturbed away from their init so a skipped tensor shows; prompts are
longer than the sliding windows."""

import jax
import numpy as np
import pytest
import torch
import transformers

from conftest import FAMILY_CONFIGS as FAMILIES
from jrlhf import models
from jrlhf.sampling import generate
from test_models import TOL, left_padded_batch, torch_logits

LENGTHS = [13, 6, 1, 9]  # left-padded prompts, most longer than the window of 5


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_logits_generation_and_export_match_transformers(name, hf_folder, tmp_path):
    torch_model, folder = hf_folder(name)
    cfg, params = models.load_pretrained(folder)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    assert n_params == cfg.num_params == sum(p.numel() for p in torch_model.parameters())
    ids, mask = left_padded_batch(cfg.vocab_size, LENGTHS)
    ours = np.asarray(models.forward(cfg, params, np.where(mask > 0, ids, 5), mask))
    T = ids.shape[1]
    for b, n in enumerate(LENGTHS):  # rows in a padded batch == rows alone == transformers
        alone = torch_logits(torch_model, ids[b:b + 1, T - n:])[0]
        np.testing.assert_allclose(ours[b, T - n:], alone, atol=TOL, rtol=0)
    # Greedy generate (cached decode, past the window) token for token.
    out = generate(cfg, params, ids, mask, jax.random.key(0), max_new_tokens=10,
                   temperature=0.0, pad_token_id=0)
    with torch.no_grad():
        ref = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                                   max_new_tokens=10, do_sample=False, pad_token_id=0,
                                   eos_token_id=None)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref[:, T:].numpy())
    # Again with an EOS that some rows emit and others never do: those rows stop there and are
    # padded after it, the others run on, token for token as transformers does.
    greedy = ref[:, T:].numpy()
    eos = next(int(t) for t in greedy[:, 1:].ravel() if not all(t in row for row in greedy))
    out = generate(cfg, params, ids, mask, jax.random.key(0), max_new_tokens=10,
                   temperature=0.0, eos_token_id=eos, pad_token_id=0)
    with torch.no_grad():
        ref_eos = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                                       max_new_tokens=10, do_sample=False, pad_token_id=0,
                                       eos_token_id=eos)[:, T:].numpy()
    assert (ref_eos == eos).any(axis=1).sum() in range(1, len(LENGTHS))
    np.testing.assert_array_equal(np.asarray(out.tokens), ref_eos)
    # save_pretrained -> transformers reloads it with the same logits and config.
    models.save_pretrained(tmp_path / "out", cfg, params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    row = ids[:1, T - LENGTHS[0]:]
    np.testing.assert_allclose(torch_logits(reloaded, row)[0], ours[0, T - LENGTHS[0]:],
                               atol=TOL, rtol=0)
    assert models.load_pretrained(tmp_path / "out")[0] == cfg


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_sequence_classification_checkpoints_load_as_reward_models(name, hf_folder, tmp_path):
    torch_model, folder = hf_folder(name, head="score")
    cfg, params = models.load_pretrained(folder)
    assert cfg.scalar_head and not cfg.lm_head
    ids, mask = left_padded_batch(cfg.vocab_size, LENGTHS[:3], seed=2)
    right_ids, right_mask = np.zeros_like(ids), np.zeros_like(mask)
    for b, n in enumerate(LENGTHS[:3]):
        right_ids[b, :n], right_mask[b, :n] = ids[b, -n:], 1
    with torch.no_grad():
        ref = torch_model(torch.tensor(right_ids), attention_mask=torch.tensor(right_mask)).logits
    np.testing.assert_allclose(models.reward_scores(cfg, params, ids, mask), ref[:, 0].numpy(),
                               atol=TOL, rtol=0)
    models.save_pretrained(tmp_path / "rm", cfg, params)
    cls = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        again = cls(torch.tensor(right_ids), attention_mask=torch.tensor(right_mask)).logits
    np.testing.assert_allclose(again.numpy(), ref.numpy(), atol=TOL, rtol=0)


def test_rope_frequencies_equal_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from jrlhf.models.config import rope_frequencies

    for name in ("llama3_rope", "llama_yarn", "llama_linear_biases", "gpt_oss"):
        model_type, kwargs = FAMILIES[name]
        hf = transformers.AutoConfig.for_model(model_type, **kwargs)
        cfg = models.from_hf_config(hf)
        theirs, factor = ROPE_INIT_FUNCTIONS[dict(cfg.rope_scaling)["rope_type"]](hf)
        ours, our_factor = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)
        assert our_factor == pytest.approx(factor)


@pytest.mark.parametrize("field, value, message", [
    ("rope_scaling", dict(rope_type="dynamic", factor=2.0), "rope type 'dynamic'"),
    ("rope_scaling", dict(rope_type="longrope", short_factor=[1.0] * 6, long_factor=[1.0] * 6,
                          original_max_position_embeddings=16), "rope type 'longrope'"),
    ("pretraining_tp", 2, "pretraining_tp=2"),
])
def test_unsupported_fields_are_refused_naming_them(field, value, message):
    model_type, kwargs = FAMILIES["llama3_rope"]
    hf = transformers.AutoConfig.for_model(model_type, **{**kwargs, field: value})
    with pytest.raises(NotImplementedError, match=message):
        models.from_hf_config(hf)


def test_multimodal_gemma3_is_refused_pointing_at_the_text_model():
    hf = transformers.Gemma3Config()
    with pytest.raises(NotImplementedError, match="gemma3_text"):
        models.from_hf_config(hf)


def test_cli_refuses_an_unsupported_model_folder_in_one_line(tmp_path, capsys):
    import re
    from pathlib import Path

    from jrlhf.cli import main

    model_type, kwargs = FAMILIES["llama3_rope"]
    folder = tmp_path / "dynamic"
    transformers.AutoConfig.for_model(model_type, **{
        **kwargs, "rope_scaling": dict(rope_type="dynamic", factor=2.0)}).save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"")
    message = f"{folder}: rope_parameters: rope type 'dynamic' is not supported"
    with pytest.raises(NotImplementedError, match=re.escape(message)):
        models.load_pretrained(folder)
    tiny = Path(__file__).parents[1] / "configs" / "tiny.py"
    code = main(["sft", "--config", str(tiny), "--set", f"model.source={folder}",
                 "--set", f"run.out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


# A saved folder's extra fields per family (transformers fills in the rest): Gemma 3 with a
# sliding window shorter than the pipeline's prompts and a local:global pattern of 1:1. (Dense
# Qwen3 is Qwen3-MoE's attention with untied heads: its folder's pipeline, ~45 s, adds nothing
# the MoE one does not run; its parity is tested above.)
PIPELINE_FAMILIES = {
    "gemma3_text": dict(sliding_window=8, sliding_window_pattern=2, query_pre_attn_scalar=16,
                        rope_local_base_freq=100.0, tie_word_embeddings=True),
    # A mixture of experts: a sparse and a dense layer, 2 of 4 experts per token.
    "qwen3_moe": dict(tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32, mlp_only_layers=[1], norm_topk_prob=True),
}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(PIPELINE_FAMILIES))
def test_pipeline_runs_on_a_saved_family_folder(model_type, tmp_path):
    """`jrlhf pipeline --set model.source=<folder>` end to end (SFT, reward model, PPO, export)
    on a tiny Qwen3, Gemma 3 and Qwen3-MoE saved by transformers; the exported policy reloads
    in transformers with our logits."""
    from jrlhf.cli import main
    from test_run import TINY

    config = transformers.AutoConfig.for_model(
        model_type, vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, **PIPELINE_FAMILIES[model_type])
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    out = tmp_path / "run"
    assert main(["pipeline", "--config", TINY, "--set", f"model.source={tmp_path / 'model'}",
                 "--set", "model.tokenizer=smollm2", "--set", f"run.out_dir={out}",
                 "--set", "reward.steps=2", "--set", "ppo.iterations=1",
                 "--set", "run.log_every=0"]) == 0
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert all(np.isfinite(summary[k]) for k in ("score_sft", "score_ppo", "kl_ppo_to_sft"))
    cfg, params = models.load_pretrained(out / "export")
    assert cfg.hf_model_type == model_type
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "export").eval()
    ids = np.arange(3, 23)[None]  # longer than Gemma 3's window
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(models.forward(cfg, params, ids, np.ones_like(ids)), ref,
                               atol=1e-4, rtol=0)


def test_gpt_oss_mxfp4_experts_are_dequantized_as_transformers_does(tmp_path):
    """A GPT-OSS folder as the hub holds it (expert matrices as MXFP4 `*_blocks` / `*_scales`,
    `quantization_config` in config.json) loads with the weights transformers' own
    dequantization gives, and runs with its logits; an unpaired or other quantization is
    refused naming it."""
    import json

    from safetensors.numpy import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from jrlhf import paths
    from jrlhf.models.hf import WeightsMismatch
    from test_models import TOL, torch_logits

    config = transformers.GptOssConfig(
        vocab_size=97, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=5, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    rng = np.random.RandomState(0)
    packed = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for proj in ("gate_up_proj", "down_proj"):
                weight = getattr(layer.mlp.experts, proj)  # [E, in, out]
                E, d_in, d_out = weight.shape
                blocks = rng.randint(0, 256, (E, d_out, d_in // 32, 16)).astype(np.uint8)
                scales = rng.randint(116, 121, (E, d_out, d_in // 32)).astype(np.uint8)
                weight.copy_(convert_moe_packed_tensors(torch.tensor(blocks),
                                                        torch.tensor(scales),
                                                        dtype=torch.float32))
                packed[f"model.layers.{i}.mlp.experts.{proj}"] = (blocks, scales)
    folder = tmp_path / "mxfp4"
    model.save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    for name, (blocks, scales) in packed.items():
        del tensors[name]
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    raw = json.loads((folder / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
        "lm_head"]}
    (folder / "config.json").write_text(json.dumps(raw))

    cfg, params = models.load_pretrained(folder)
    flat = paths.flatten(params)
    experts = model.model.layers[1].mlp.experts
    gate_up, down = experts.gate_up_proj.detach().numpy(), experts.down_proj.detach().numpy()
    np.testing.assert_array_equal(flat["layers/1/mlp/experts/gate_proj"], gate_up[..., ::2])
    np.testing.assert_array_equal(flat["layers/1/mlp/experts/up_proj"], gate_up[..., 1::2])
    np.testing.assert_array_equal(flat["layers/1/mlp/experts/down_proj"], down)
    ids = np.random.RandomState(1).randint(1, cfg.vocab_size, (2, 11))
    np.testing.assert_allclose(models.forward(cfg, params, ids, np.ones_like(ids)),
                               torch_logits(model, ids), atol=TOL, rtol=0)

    del tensors["model.layers.0.mlp.experts.down_proj_scales"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsMismatch, match="'model.layers.0.mlp.experts.down_proj_blocks' "
                                              "has no scales tensor"):
        models.load_pretrained(folder)
    raw["quantization_config"] = {"quant_method": "fp8"}
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(NotImplementedError, match=f"{folder}: gpt_oss with quantization_config"):
        models.load_pretrained(folder)


def test_attention_sinks_never_choose_cudnn():
    from jrlhf.models.attention import resolve_implementation

    assert resolve_implementation("auto", "bfloat16", 64, on="gpu", sinks=True) == "xla"
    with pytest.raises(ValueError, match="cannot add attention sinks"):
        resolve_implementation("cudnn", "bfloat16", 64, on="gpu", sinks=True)
