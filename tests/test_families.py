"""The checkpoints people fine-tune now, against transformers built from tiny configs: Llama 3.x
RoPE scaling (llama3 / yarn / linear), Llama biases, Mistral / Qwen2 sliding windows, Qwen3,
Gemma 2 and Gemma 3 (text). Norms and biases are perturbed away from their init so a skipped
tensor shows; prompts are longer than the sliding windows."""

import jax
import numpy as np
import pytest
import torch
import transformers

from jrlhf import models
from jrlhf.sampling import generate
from test_models import TOL, left_padded_batch, torch_logits

BASE = dict(hidden_size=48, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=97, max_position_embeddings=64, head_dim=12)
FAMILIES = {
    "llama3_rope": ("llama", dict(BASE, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "llama_yarn": ("llama", dict(BASE, rope_scaling=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=16))),
    "llama_linear_biases": ("llama", dict(BASE, rope_scaling=dict(rope_type="linear", factor=2.0),
                                          attention_bias=True, mlp_bias=True)),
    "mistral_window": ("mistral", dict(BASE, sliding_window=5)),
    "qwen2_window": ("qwen2", dict(BASE, use_sliding_window=True, sliding_window=5,
                                   max_window_layers=1)),
    "qwen3": ("qwen3", dict(BASE, tie_word_embeddings=False)),
    "gemma2": ("gemma2", dict(BASE, sliding_window=5, query_pre_attn_scalar=10,
                              attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "gemma3": ("gemma3_text", dict(BASE, num_hidden_layers=4, sliding_window=5,
                                   sliding_window_pattern=2, query_pre_attn_scalar=10,
                                   rope_scaling=dict(rope_type="linear", factor=8.0),
                                   rope_local_base_freq=100.0)),
}
LENGTHS = [13, 6, 1, 9]  # left-padded prompts, most longer than the window of 5


def build(name, head="lm", seed=0):
    model_type, kwargs = FAMILIES[name]
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    config.pad_token_id = 0
    auto = transformers.AutoModelForCausalLM
    if head != "lm":
        config.num_labels = 1
        auto = transformers.AutoModelForSequenceClassification
    torch.manual_seed(seed)
    model = auto.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or "bias" in pname:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    cache = {}

    def get(name, head="lm"):
        if (name, head) not in cache:
            model = build(name, head)
            folder = tmp_path_factory.mktemp(f"{name}_{head}")
            model.save_pretrained(folder)
            cache[(name, head)] = (model, folder)
        return cache[(name, head)]

    return get


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_logits_generation_and_export_match_transformers(name, family, tmp_path):
    torch_model, folder = family(name)
    cfg, params = models.load_pretrained(folder)
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
    # save_pretrained -> transformers reloads it with the same logits and config.
    models.save_pretrained(tmp_path / "out", cfg, params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    row = ids[:1, T - LENGTHS[0]:]
    np.testing.assert_allclose(torch_logits(reloaded, row)[0], ours[0, T - LENGTHS[0]:],
                               atol=TOL, rtol=0)
    assert models.load_pretrained(tmp_path / "out")[0] == cfg


@pytest.mark.parametrize("name", ["qwen3", "gemma2", "gemma3", "llama_linear_biases"])
def test_sequence_classification_checkpoints_load_as_reward_models(name, family, tmp_path):
    torch_model, folder = family(name, head="score")
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

    for name in ("llama3_rope", "llama_yarn", "llama_linear_biases"):
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
