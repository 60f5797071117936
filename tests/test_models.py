"""Model parity against transformers' PyTorch implementation (the acceptance for the model)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from conftest import FAMILY_CONFIGS, TINY_CONFIGS
from jrlhf import models, rl

TOL = 1e-4  # float32 max abs difference against transformers


def torch_logits(model, ids, mask=None, positions=None):
    kwargs = {}
    if mask is not None:
        kwargs["attention_mask"] = torch.tensor(np.asarray(mask))
    if positions is not None:
        kwargs["position_ids"] = torch.tensor(np.asarray(positions))
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids)), **kwargs).logits.float().numpy()


def left_padded_batch(vocab, lengths, seed=0):
    rng = np.random.RandomState(seed)
    T = max(lengths)
    ids = np.zeros((len(lengths), T), np.int32)
    mask = np.zeros((len(lengths), T), np.int32)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = rng.randint(1, vocab, n)
        mask[b, T - n:] = 1
    return ids, mask


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_logits_match_transformers(name, hf_folder):
    torch_model, folder = hf_folder(name)
    cfg, params = models.load_pretrained(folder)
    ids = np.random.RandomState(1).randint(0, cfg.vocab_size, (3, 17))
    ours = np.asarray(models.forward(cfg, params, ids, np.ones_like(ids)))
    np.testing.assert_allclose(ours, torch_logits(torch_model, ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "qwen2_bias"])
def test_left_padded_rows_equal_rows_alone(name, hf_folder):
    torch_model, folder = hf_folder(name)
    cfg, params = models.load_pretrained(folder)
    lengths = [11, 4, 1, 8]
    ids, mask = left_padded_batch(cfg.vocab_size, lengths)
    # Garbage in the padding must not matter.
    ids_noisy = np.where(mask > 0, ids, 7)
    ours = np.asarray(models.forward(cfg, params, ids_noisy, mask))
    T = ids.shape[1]
    for b, n in enumerate(lengths):
        alone = torch_logits(torch_model, ids[b:b + 1, T - n:])[0]
        np.testing.assert_allclose(ours[b, T - n:], alone, atol=TOL, rtol=0)
    # transformers on the same padded batch with mask-derived positions agrees too.
    positions = np.asarray(models.positions_from_mask(mask))
    ref = torch_logits(torch_model, ids, mask, positions)
    np.testing.assert_allclose(ours * mask[..., None], ref * mask[..., None], atol=TOL, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "llama_mqa_tied", *FAMILY_CONFIGS])
def test_kv_cache_decoding_equals_full_forward(name, hf_folder):
    """Prefill then one cached decode step per token == the full forward; for the sliding-window
    families (window 5) the rows run past the window."""
    _, folder = hf_folder(name)
    cfg, params = models.load_pretrained(folder)
    lengths = [6, 3, 9]
    ids, mask = left_padded_batch(cfg.vocab_size, lengths, seed=3)
    extra = np.random.RandomState(4).randint(1, cfg.vocab_size, (3, 5))
    full_ids = np.concatenate([ids, extra], 1)
    full_mask = np.concatenate([mask, np.ones_like(extra)], 1)
    full = np.asarray(models.forward(cfg, params, full_ids, full_mask))

    P, N = ids.shape[1], extra.shape[1]
    model = models.bind(cfg, params)
    hidden, cache = model.prefill(jnp.asarray(ids), jnp.asarray(mask), P + N)
    step_logits = [np.asarray(model.logits(hidden))[:, -1]]
    first_slot = jnp.asarray(P - mask.sum(1))
    for t in range(N - 1):
        pos = (mask.sum(1) + t)[:, None]
        hidden, cache = model.decode(jnp.asarray(extra[:, t:t + 1]), pos, cache, first_slot,
                                     P + t)
        step_logits.append(np.asarray(model.logits(hidden))[:, 0])
    np.testing.assert_allclose(np.stack(step_logits, 1), full[:, P - 1:P + N - 1], atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "llama_mqa_tied", "qwen2_bias"])
def test_save_then_transformers_load_gives_same_logits(name, hf_folder, tmp_path):
    torch_model, folder = hf_folder(name)
    cfg, params = models.load_pretrained(folder)
    # Perturb so we are not just copying the original file back.
    params = jax.tree.map(lambda p: p + 0.01 * jnp.sign(p), params)
    models.save_pretrained(tmp_path / "out", cfg, params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = np.random.RandomState(5).randint(0, cfg.vocab_size, (2, 12))
    ours = np.asarray(models.forward(cfg, params, ids, np.ones_like(ids)))
    np.testing.assert_allclose(torch_logits(reloaded, ids), ours, atol=TOL, rtol=0)
    cfg2, params2 = models.load_pretrained(tmp_path / "out")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, jax.tree.map(np.asarray, params))


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_reward_head_matches_sequence_classification(name, hf_folder, tmp_path):
    torch_model, folder = hf_folder(name, head="score")
    cfg, params = models.load_pretrained(folder)
    assert cfg.scalar_head and not cfg.lm_head
    ids, mask = left_padded_batch(cfg.vocab_size, [7, 3, 5], seed=2)
    # transformers reads the score at the last non-pad token; give it right padding.
    right_ids = np.zeros_like(ids)
    right_mask = np.zeros_like(mask)
    for b in range(3):
        n = mask[b].sum()
        right_ids[b, :n], right_mask[b, :n] = ids[b, -n:], 1
    with torch.no_grad():
        ref = torch_model(torch.tensor(right_ids), attention_mask=torch.tensor(right_mask)).logits
    for i, m in ((ids, mask), (right_ids, right_mask)):
        ours = np.asarray(models.reward_scores(cfg, params, i, m))
        np.testing.assert_allclose(ours, ref[:, 0].numpy(), atol=TOL, rtol=0)
    models.save_pretrained(tmp_path / "rm", cfg, params)
    cls = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        again = cls(torch.tensor(right_ids), attention_mask=torch.tensor(right_mask)).logits
    np.testing.assert_allclose(again.numpy(), ref.numpy(), atol=TOL, rtol=0)


def test_an_exported_reward_model_without_a_pad_id_scores_batches_in_transformers(hf_folder,
                                                                                  tmp_path):
    """A reward model grown from a policy whose config has no pad id: the export names one
    (EOS here: no tokenizer) and transformers scores a right-padded batch of 2 as we do."""
    from jrlhf.setups import reward_model_init

    _, folder = hf_folder("llama_gqa")
    cfg, params = models.load_pretrained(folder)
    cfg = dataclasses.replace(cfg, pad_token_id=None)
    cfg, params = reward_model_init(cfg, params)
    params["score"]["kernel"] = jnp.asarray(
        np.random.RandomState(0).normal(0, 0.1, params["score"]["kernel"].shape), jnp.float32)
    ids, mask = left_padded_batch(cfg.vocab_size, [7, 4], seed=3)
    ids = np.where(ids == cfg.eos_token_id, 1, ids)  # no real token equals the pad id
    right_ids, right_mask = np.full_like(ids, cfg.eos_token_id), np.zeros_like(mask)
    for b, n in enumerate((7, 4)):
        right_ids[b, :n], right_mask[b, :n] = ids[b, -n:], 1
    models.save_pretrained(tmp_path / "rm", cfg, params)
    saved = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert saved["pad_token_id"] == cfg.eos_token_id is not None
    cls = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        theirs = cls(torch.tensor(right_ids), attention_mask=torch.tensor(right_mask)).logits
    np.testing.assert_allclose(theirs[:, 0].numpy(), models.reward_scores(cfg, params, ids, mask),
                               atol=TOL, rtol=0)


def test_value_head_added_to_lm_checkpoint_starts_at_zero(hf_folder):
    _, folder = hf_folder("llama_gqa")
    cfg, params = models.load_pretrained(folder, scalar_head=True)
    assert cfg.lm_head and cfg.scalar_head
    ids = np.ones((2, 5), np.int32)
    out = models.token_outputs(cfg, params, ids, np.ones_like(ids), with_values=True)
    np.testing.assert_array_equal(np.asarray(out.values), 0.0)
    logits = models.forward(cfg, params, ids, np.ones_like(ids))
    np.testing.assert_allclose(out.logprobs,
                               rl.logprobs_from_logits(logits[:, :-1], ids[:, 1:]), atol=1e-6)


def test_bfloat16_compute_stays_close(hf_folder):
    """bf16 compute (float32 params): logits within 0.05 abs of float32 on a tiny model."""
    _, folder = hf_folder("llama_gqa")
    cfg, params = models.load_pretrained(folder)
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 16))
    ref = np.asarray(models.forward(cfg, params, ids, np.ones_like(ids)))
    cfg16 = dataclasses.replace(cfg, dtype="bfloat16")
    out = np.asarray(models.forward(cfg16, params, ids, np.ones_like(ids)))
    assert np.isfinite(out).all()
    assert np.abs(out - ref).max() < 0.05
    assert np.abs(out - ref).max() > 0  # it really ran in bfloat16


def test_analytic_param_count_matches_tree(hf_folder):
    for name in TINY_CONFIGS:
        torch_model, folder = hf_folder(name)
        cfg, params = models.load_pretrained(folder)
        n = sum(x.size for x in jax.tree.leaves(params))
        assert n == cfg.num_params == sum(p.numel() for p in torch_model.parameters()), name


def test_pickle_only_folder_is_refused(tmp_path, hf_folder):
    _, folder = hf_folder("gpt2")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin.*never loaded"):
        models.load_pretrained(tmp_path)


def test_sharded_safetensors_folder(tmp_path, hf_folder):
    torch_model, _ = hf_folder("llama_gqa")
    torch_model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    cfg, params = models.load_pretrained(tmp_path)
    ids = np.arange(1, 11)[None]
    np.testing.assert_allclose(models.forward(cfg, params, ids, np.ones_like(ids)),
                               torch_logits(torch_model, ids), atol=TOL, rtol=0)


def test_unsupported_architecture_is_named(tmp_path):
    transformers.BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1,
                            num_attention_heads=1, intermediate_size=8).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(NotImplementedError, match="'bert'"):
        models.load_pretrained(tmp_path)
