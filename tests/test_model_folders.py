"""Model folders: checked before any array is built (shard paths, tensor shapes, config sizes,
memory, tokenizers), and exports that a failure or a kill at any moment leaves whole."""

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from conftest import FAMILY_CONFIGS, TINY_CONFIGS
from jrlhf import models, paths
from jrlhf.cli import main
from jrlhf.models.config import check_exportable, check_memory, format_bytes, host_memory_bytes
from jrlhf.models.hf import param_shape

ROOT = Path(__file__).parent.parent
TINY = str(ROOT / "configs" / "tiny.py")


def edited(src: Path, dst: Path, config: dict | None = None, tensors=None) -> Path:
    """A copy of model folder `src` with config.json keys replaced (None: removed) and
    `tensors(dict) -> dict` applied to its single safetensors file."""
    shutil.copytree(src, dst)
    raw = json.loads((dst / "config.json").read_text())
    for key, value in (config or {}).items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    (dst / "config.json").write_text(json.dumps(raw))
    if tensors is not None:
        weights = dst / "model.safetensors"
        save_file(tensors(load_file(weights)), weights, metadata={"format": "pt"})
    return dst


def replaced(name: str, array: np.ndarray):
    return lambda tensors: {**tensors, name: array}


def one_line_exit_2(argv: list[str], expected: str, capfd) -> str:
    """Run `jrlhf.cli.main(argv)`: exit 2, one error line holding `expected`, no traceback."""
    code = main(argv)
    out, err = capfd.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in out + err, err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert errors == [err.strip().splitlines()[-1]], err
    assert errors[0].startswith(f"jrlhf {argv[0]}: error: ") and expected in errors[0], err
    return errors[0]


# ----------------------------------------------------------------------------------------------
# Shard indexes: every file inside the folder.


@pytest.fixture
def sharded(tmp_path, hf_folder):
    """A llama_gqa folder in several shards, and a valid shard outside it."""
    torch_model, _ = hf_folder("llama_gqa")
    folder = tmp_path / "model"
    torch_model.save_pretrained(folder, max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shutil.copy(folder / min(index["weight_map"].values()),
                tmp_path / "outside.safetensors")
    return folder, index


@pytest.mark.parametrize("entry", ["../outside.safetensors", "shards/../../outside.safetensors",
                                   "{tmp}/outside.safetensors"])
def test_a_shard_outside_the_folder_is_refused(entry, sharded, tmp_path):
    folder, index = sharded
    entry = entry.format(tmp=tmp_path)
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = entry
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"shard '{entry}' is outside {folder}"):
        models.load_pretrained(folder)


def test_a_missing_shard_or_a_broken_index_is_named(sharded):
    folder, index = sharded
    path = folder / "model.safetensors.index.json"
    index["weight_map"][next(iter(index["weight_map"]))] = "model-gone.safetensors"
    path.write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=rf"{path}: shard 'model-gone.safetensors' is not"):
        models.load_pretrained(folder)
    path.write_text('{"weight_map": ["model-00001.safetensors"]}')
    with pytest.raises(ValueError, match=rf"{path}: not a shard index \(AttributeError"):
        models.load_pretrained(folder)


def test_cli_refuses_an_index_pointing_outside(sharded, capfd):
    folder, index = sharded
    index["weight_map"] = {k: "../outside.safetensors" for k in index["weight_map"]}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    one_line_exit_2(["generate", "--model", str(folder)],
                    "shard '../outside.safetensors' is outside", capfd)


# ----------------------------------------------------------------------------------------------
# Tensor shapes against the config.


def test_param_shape_is_the_model_built(hf_folder):
    """The shapes the checks expect are the shapes the model builds, for every family."""
    for name, (model_type, kwargs) in {**TINY_CONFIGS, **FAMILY_CONFIGS}.items():
        hf = transformers.AutoConfig.for_model(model_type, **kwargs)
        cfg = models.from_hf_config(hf, scalar_head=True)
        for path, leaf in paths.flatten(models.abstract_params(cfg)).items():
            assert param_shape(cfg, path) == leaf.shape, (name, path)


@pytest.mark.parametrize("name, tensor, array, found, expected", [
    ("llama_gqa", "model.layers.0.self_attn.q_proj.weight", np.zeros((24, 32), np.float32),
     "[24, 32]", "[32, 32]"),
    ("llama_gqa", "model.layers.1.self_attn.k_proj.weight", np.zeros(512, np.float32),
     "[512]", "[16, 32]"),
    ("llama_gqa", "model.norm.weight", np.zeros((32, 1), np.float32), "[32, 1]", "[32]"),
    ("gpt2", "transformer.h.1.attn.c_attn.weight", np.zeros((32, 32), np.float32),
     "[32, 32]", "[32, 96]"),
    ("gpt2", "transformer.wpe.weight", np.zeros((16, 32), np.float32), "[16, 32]", "[64, 32]"),
])
def test_a_wrong_shape_tensor_is_one_line_naming_it(name, tensor, array, found, expected,
                                                    hf_folder, tmp_path):
    _, src = hf_folder(name)
    folder = edited(src, tmp_path / "m", tensors=replaced(tensor, array))
    short = tensor.split(".", 1)[1]
    with pytest.raises(ValueError, match=rf"{folder}: tensor '{short}' has shape "
                                         rf"\{found}; the config \(.*\) expects \{expected}$"):
        models.load_pretrained(folder)


def test_a_missing_tensor_is_named(hf_folder, tmp_path):
    _, src = hf_folder("gpt2")
    folder = edited(src, tmp_path / "m", tensors=lambda t: {
        k: v for k, v in t.items() if k != "transformer.h.0.attn.c_attn.bias"})
    with pytest.raises(ValueError, match=r"tensor 'h.0.attn.c_attn.bias' is missing"):
        models.load_pretrained(folder)


def test_vocab_size_must_match_the_embedding_rows(hf_folder, tmp_path, capfd):
    _, src = hf_folder("llama_gqa")
    folder = edited(src, tmp_path / "m", config={"vocab_size": 1000})
    with pytest.raises(ValueError, match=r"tensor 'embed_tokens.weight' has shape \[97, 32\]; "
                                         r"the config \(llama: vocab_size 1000, .*\) expects "
                                         r"\[1000, 32\]"):
        models.load_pretrained(folder)
    _, src = hf_folder("gpt2")
    folder = edited(src, tmp_path / "g", config={"vocab_size": 50})
    one_line_exit_2(["generate", "--model", str(folder)],
                    "tensor 'wte.weight' has shape [97, 32]", capfd)


def test_a_scalar_head_of_the_wrong_width_is_refused(hf_folder, tmp_path):
    _, src = hf_folder("llama_gqa", head="score")
    folder = edited(src, tmp_path / "m",
                    tensors=replaced("score.weight", np.zeros((2, 32), np.float32)))
    with pytest.raises(ValueError, match=r"tensor 'score.weight' has shape \[2, 32\]; .* "
                                         r"expects \[1, 32\]"):
        models.load_pretrained(folder, lm_head=False, scalar_head=True)


# ----------------------------------------------------------------------------------------------
# Config sizes and the memory estimate, before allocating.


@pytest.mark.parametrize("name, change, message", [
    ("llama_gqa", {"num_attention_heads": 0}, "num_attention_heads=0 must be a positive integer"),
    ("llama_gqa", {"num_key_value_heads": 0}, "num_key_value_heads=0 must be a positive integer"),
    ("llama_gqa", {"hidden_size": -32}, "hidden_size=-32 must be a positive integer"),
    ("llama_gqa", {"num_hidden_layers": 1.5}, "num_hidden_layers=1.5 must be a positive integer"),
    ("llama_gqa", {"num_attention_heads": 3, "num_key_value_heads": 3, "head_dim": None},
     ("num_attention_heads=3 does not divide hidden_size=32 (the head size is hidden_size / "
      "num_attention_heads when head_dim is not given)")),
    ("llama_gqa", {"num_attention_heads": 8, "num_key_value_heads": 3},
     "num_attention_heads=8 must be a multiple of num_key_value_heads=3"),
    ("gpt2", {"n_head": 3},
     "n_head=3 does not divide n_embd=32 (the head size is n_embd / n_head)"),
    ("gpt2", {"n_head": 0}, "n_head=0 must be a positive integer"),
    ("gpt2", {"vocab_size": 0}, "vocab_size=0 must be a positive integer"),
])
def test_config_sizes_out_of_bounds_are_refused(name, change, message, hf_folder, tmp_path):
    _, src = hf_folder(name)
    folder = edited(src, tmp_path / "m", config=change)
    with pytest.raises(ValueError) as err:
        models.load_pretrained(folder)
    assert str(err.value) == f"{folder / 'config.json'}: {message}"


def test_the_memory_estimate_counts_every_parameter():
    cfg = models.ModelConfig(vocab_size=10, hidden_size=4, num_layers=1, num_heads=1,
                             num_kv_heads=1, head_dim=4, intermediate_size=8,
                             tie_word_embeddings=True)
    # embedding 40 + attention 4*12 + 16 + gated MLP 3*4*8 + two norms 8 + final norm 4
    assert cfg.num_params == 212
    check_memory(cfg, "m", limit=848)
    with pytest.raises(ValueError, match=r"^m: 212 parameters need 848.0 B \(4 bytes each\), "
                                         r"more than the 847.0 B of memory this host has"):
        check_memory(cfg, "m", limit=847)


def test_an_absurd_hidden_size_is_refused_before_allocating(hf_folder, tmp_path, capfd):
    """hidden_size=10**12 in a reward model's config: the estimate and the host's memory, not
    a MemoryError after trying to allocate terabytes."""
    _, src = hf_folder("llama_gqa", head="score")
    folder = edited(src, tmp_path / "rm", config={"hidden_size": 10**12, "head_dim": 8})
    host = format_bytes(host_memory_bytes())
    with pytest.raises(ValueError, match=rf"^{folder}: [\d,]+ parameters need [\d.]+ PiB "
                                         rf"\(4 bytes each\), more than the {host} of memory"):
        models.load_pretrained(folder, lm_head=False, scalar_head=True)
    _, src = hf_folder("gpt2")
    folder = edited(src, tmp_path / "vocab", config={"vocab_size": 10**12})
    one_line_exit_2(["generate", "--model", str(folder)], f"more than the {host} of memory",
                    capfd)


def test_a_random_arch_too_large_for_the_host_is_refused(tmp_path, capfd):
    line = one_line_exit_2(["sft", "--config", TINY, "--set", f"run.out_dir={tmp_path / 'run'}",
                            "--set", "model.arch.hidden_size=1000000000000"],
                           "model.arch: ", capfd)
    assert "hidden_size=1000000000000" in line and "PiB" in line
    assert not (tmp_path / "run" / "sft").exists()


@pytest.mark.parametrize("setting, message", [
    ("model.arch.num_heads=0", "ModelConfig.num_heads must be a positive integer, got 0"),
    ("model.arch.vocab_size=-5", "ModelConfig.vocab_size must be a positive integer, got -5"),
    ("model.arch.num_kv_heads=0", "ModelConfig.num_kv_heads must be a positive integer, got 0"),
])
def test_zero_or_negative_sizes_in_model_arch_are_one_line(setting, message, tmp_path, capfd):
    one_line_exit_2(["sft", "--config", TINY, "--set", f"run.out_dir={tmp_path / 'run'}",
                     "--set", setting], message, capfd)


# ----------------------------------------------------------------------------------------------
# A random-weight arch its export could not hold is refused at load, not at export.


GPT2_ARCH_CONFIG = """
from pathlib import Path
from jrlhf.config import derive, load_config
from jrlhf.models import ModelConfig

def get_config():
    return derive(load_config({tiny!r}), {{"model.arch": ModelConfig(
        family="gpt2", vocab_size=49152, hidden_size=64, num_layers=2, num_heads=4,
        num_kv_heads=4, head_dim=16, intermediate_size=128, activation="gelu_new",
        tie_word_embeddings=True, {fields})}})
"""


@pytest.mark.parametrize("fields, missing", [
    ("", ["attention_bias=False (it has True)", "output_bias=False (it has True)",
          "mlp_bias=False (it has True)", "hf_model_type='llama' (it has 'gpt2')"]),
    ("hf_model_type='gpt2', attention_bias=True, output_bias=True",
     ["mlp_bias=False (it has True)"]),
])
def test_a_gpt2_arch_without_its_biases_is_refused_before_training(fields, missing, tmp_path,
                                                                   capfd):
    """(The probe's case trained, then its export failed on layers/0/attn/q_proj/bias.)"""
    config = tmp_path / "gpt2_arch.py"
    config.write_text(GPT2_ARCH_CONFIG.format(tiny=TINY, fields=fields))
    line = one_line_exit_2(["sft", "--config", str(config), "--set",
                            f"run.out_dir={tmp_path / 'run'}"],
                           "model.arch: a gpt2 checkpoint cannot hold this model: ", capfd)
    assert line.endswith(", ".join(missing) + "; set these fields to match"), line
    assert not (tmp_path / "run" / "sft").exists()


def test_a_gpt2_arch_with_what_gpt2_has_is_accepted():
    cfg = models.ModelConfig(family="gpt2", vocab_size=64, hidden_size=32, num_layers=2,
                             num_heads=4, num_kv_heads=4, head_dim=8, intermediate_size=64,
                             activation="gelu_new", tie_word_embeddings=True, attention_bias=True,
                             output_bias=True, mlp_bias=True, hf_model_type="gpt2")
    check_exportable(cfg, "arch")
    with pytest.raises(ValueError, match=r"^arch: a gpt2 checkpoint cannot hold this model: "
                                         r"head_dim=6 \(it has 8\); set these fields to match$"):
        check_exportable(dataclasses.replace(cfg, head_dim=6), "arch")
    qwen2 = dataclasses.replace(cfg, family="llama", hf_model_type="qwen2", activation="silu",
                                attention_bias=False, output_bias=False, mlp_bias=False)
    with pytest.raises(ValueError, match=r"^arch: a qwen2 checkpoint cannot hold this model: "
                                         r"attention_bias=False \(it has True\);"):
        check_exportable(qwen2, "arch")


def test_every_supported_family_config_is_exportable():
    import runpy

    for name, (model_type, kwargs) in {**TINY_CONFIGS, **FAMILY_CONFIGS}.items():
        for heads in ({"scalar_head": True}, {"lm_head": False, "scalar_head": True}):
            check_exportable(models.from_hf_config(
                transformers.AutoConfig.for_model(model_type, **kwargs), **heads), name)
    for config in ("tiny.py", "bench_gpt2.py", "bench_llama1b.py"):
        for value in runpy.run_path(str(ROOT / "configs" / config)).values():
            if isinstance(value, models.ModelConfig):
                check_exportable(value, config)


# ----------------------------------------------------------------------------------------------
# Tokenizers: the path and what it lacks.


def truncated_gguf(path: Path, size: int) -> Path:
    with open(models.smollm2_gguf_path(), "rb") as f:
        path.write_bytes(f.read(size))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("where, expected", [
    ("/etc", "/etc: no tokenizer files (expected one of tokenizer.json"),
    ("{tmp}/nowhere", "{tmp}/nowhere: not a tokenizer folder"),
    ("{tmp}/notes.txt", "{tmp}/notes.txt: not a tokenizer folder"),
    ("{tmp}/broken", "{tmp}/broken: its tokenizer files cannot be loaded"),
    ("{tmp}/header.gguf", "{tmp}/header.gguf: not a complete, readable GGUF file (error: "),
    ("{tmp}/cut.gguf", "{tmp}/cut.gguf: not a complete, readable GGUF file (ValueError: "),
    ("{tmp}/missing.gguf", "{tmp}/missing.gguf: GGUF file not found"),
])
def test_tokenizer_errors_name_the_path_and_what_is_missing(where, expected, tmp_path, capfd):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    truncated_gguf(tmp_path / "header.gguf", 100)  # cut inside the metadata
    truncated_gguf(tmp_path / "cut.gguf", 3_000_000)  # cut inside the first tensor
    line = one_line_exit_2(["sft", "--config", TINY, "--set", f"run.out_dir={tmp_path / 'run'}",
                            "--set", f"model.tokenizer={where.format(tmp=tmp_path)}"],
                           expected.format(tmp=tmp_path), capfd)
    assert "sentencepiece" not in line


# ----------------------------------------------------------------------------------------------
# Atomic exports.


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir())}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if ".jrlhf-" in p.name)


@pytest.fixture
def exported(hf_folder, tiny_tokenizer, tmp_path):
    """`(cfg, params, new_params, folder)`: a first export at `folder` (llama_gqa with a
    tokenizer) and other parameters to export over it."""
    _, src = hf_folder("llama_gqa")
    cfg, params = models.load_pretrained(src)
    folder = tmp_path / "export"
    models.save_pretrained(folder, cfg, params, tokenizer=tiny_tokenizer)
    new = jax.tree.map(lambda p: np.asarray(p) + 0.5, params)
    return cfg, params, new, folder


def assert_is_export_of(folder: Path, cfg, params) -> None:
    cfg2, params2 = models.load_pretrained(folder)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    assert transformers.AutoTokenizer.from_pretrained(folder)("the movie")["input_ids"]
    transformers.AutoModelForCausalLM.from_pretrained(folder)


def test_an_export_writes_the_whole_folder(exported):
    cfg, params, _, folder = exported
    names = set(digests(folder))
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names, names
    assert json.loads((folder / "generation_config.json").read_text())["pad_token_id"] == 0
    assert leftovers(folder) == []
    assert_is_export_of(folder, cfg, params)


@pytest.mark.parametrize("failing", ["weights", "config", "tokenizer"])
def test_a_failed_export_leaves_the_previous_one_intact(failing, exported, tiny_tokenizer,
                                                        monkeypatch):
    cfg, params, new, folder = exported
    before = digests(folder)

    def fail(*args, **kwargs):
        if failing == "weights":  # half a file, then the disk is full
            Path(args[1]).write_bytes(b"\0" * 1000)
        raise OSError(28, "No space left on device")

    target = {"weights": "safetensors.numpy.save_file",
              "config": "transformers.PretrainedConfig.save_pretrained"}.get(failing)
    if target:
        monkeypatch.setattr(target, fail)
    else:
        monkeypatch.setattr(tiny_tokenizer, "save_pretrained", fail)
    with pytest.raises(OSError, match="No space left"):
        models.save_pretrained(folder, cfg, new, tokenizer=tiny_tokenizer)
    monkeypatch.undo()
    assert digests(folder) == before
    assert leftovers(folder) == []
    assert_is_export_of(folder, cfg, params)


KILLED_EXPORT = """
import os, shutil, sys, time
import numpy as np, transformers
from jrlhf import models
from jrlhf.models import hf

src, folder, point = sys.argv[1:]
cfg, params = models.load_pretrained(src)
tokenizer = transformers.AutoTokenizer.from_pretrained(src)
params = {"embed": {"embedding": params["embed"]["embedding"] + 0.5},
          **{k: v for k, v in params.items() if k != "embed"}}

def hang(original):
    def run(*args, **kwargs):
        if point != "swap":
            original(*args, **kwargs)
        print("KILL ME", flush=True)
        time.sleep(600)
    return run

if point == "weights":
    import safetensors.numpy
    safetensors.numpy.save_file = hang(safetensors.numpy.save_file)
elif point == "config":
    transformers.PretrainedConfig.save_pretrained = hang(
        transformers.PretrainedConfig.save_pretrained)
elif point == "tokenizer":
    type(tokenizer).save_pretrained = hang(type(tokenizer).save_pretrained)
else:  # after the exchange, while the previous export is being removed
    hf.shutil.rmtree = hang(shutil.rmtree)
models.save_pretrained(folder, cfg, params, tokenizer=tokenizer)
"""


@pytest.mark.slow
@pytest.mark.parametrize("point", ["weights", "config", "tokenizer", "swap"])
def test_a_killed_export_leaves_the_previous_or_the_new_export(point, exported, tiny_tokenizer,
                                                               tmp_path):
    """SIGKILL at four moments of an export over a previous one: the folder is the previous
    export byte for byte (or, once swapped, the new one); what the kill left beside it (a
    full-size weights file among it) is removed by the next export."""
    cfg, params, _, folder = exported
    source = tmp_path / "source"  # the previous export is the child's model and tokenizer
    shutil.copytree(folder, source)
    before = digests(folder)
    child = subprocess.Popen([sys.executable, "-c", KILLED_EXPORT, str(source), str(folder),
                              point], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        lines = iter(child.stdout.readline, "")
        assert any(line.strip() == "KILL ME" for line in lines), "the export ended unkilled"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    (stale,) = leftovers(folder)
    assert (folder.parent / stale / "model.safetensors").stat().st_size > 10_000
    new = {**params, "embed": {"embedding": params["embed"]["embedding"] + 0.5}}
    if point == "swap":
        assert_is_export_of(folder, cfg, new)
    else:
        assert digests(folder) == before
        assert_is_export_of(folder, cfg, params)
    models.save_pretrained(folder, cfg, new, tokenizer=tiny_tokenizer)
    assert leftovers(folder) == []
    assert_is_export_of(folder, cfg, new)


def test_without_an_atomic_exchange_a_set_aside_export_is_restored(exported, tiny_tokenizer,
                                                                   monkeypatch):
    """Where renameat2 is missing the swap is two renames; a kill between them leaves the
    previous export beside the folder, and the next export puts it back before writing."""
    from jrlhf.models import hf

    cfg, _, new, folder = exported
    before = digests(folder)
    monkeypatch.setattr(hf, "_exchange", lambda a, b: False)
    folder.rename(folder.with_name(f".export.jrlhf-old-{os.getpid()}-0123abcd"))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tiny_tokenizer, "save_pretrained", disk_full)
    with pytest.raises(OSError):
        models.save_pretrained(folder, cfg, new, tokenizer=tiny_tokenizer)
    assert digests(folder) == before and leftovers(folder) == []
    monkeypatch.undo()
    monkeypatch.setattr(hf, "_exchange", lambda a, b: False)
    models.save_pretrained(folder, cfg, new, tokenizer=tiny_tokenizer)
    assert leftovers(folder) == []
    assert_is_export_of(folder, cfg, new)


@pytest.mark.parametrize("content", ["notes.md", "subfolder/"])
def test_a_folder_that_is_not_an_export_is_never_replaced(content, exported, tmp_path):
    cfg, params, _, _ = exported
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x")
    if content.endswith("/"):
        (folder / content).mkdir()
    else:
        (folder / content).write_text("keep me")
    with pytest.raises(FileExistsError, match=rf"{folder}: holds '{content.rstrip('/')}', "
                                              "which no export writes"):
        models.save_pretrained(folder, cfg, params)
    assert sorted(p.name for p in folder.iterdir()) == sorted(["model.safetensors",
                                                               content.rstrip("/")])
    assert leftovers(folder) == []
