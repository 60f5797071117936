"""Hub ids (`org/name[@revision]`) as model sources: resolved through a Hugging Face cache built
here in huggingface_hub's own layout, never over the network; a local path wins."""

import hashlib
import os
import shutil
import socket
from pathlib import Path

import jax
import numpy as np
import pytest

from jrlhf import models
from jrlhf.algorithms import REWARD_MODEL_PATH
from jrlhf.cli import main
from jrlhf.config import ModelSection, derive, load_config
from jrlhf.models.sources import load_policy, load_tokenizer, model_config, resolve_source
from jrlhf.stages import Run, Stage

ROOT = Path(__file__).parent.parent
REPO = "jrlhf-test/tiny"
COMMIT_A, COMMIT_B = "a" * 40, "0123456789abcdef" * 2 + "01234567"


def cache_snapshot(cache: Path, repo: str, commit: str, folder: Path, refs=()) -> Path:
    """`folder`'s files as the snapshot `commit` of model `repo` in the hub cache `cache`, laid
    out as huggingface_hub writes it: `models--org--name/blobs/<sha256>`, the snapshot's files
    relative symlinks to them, `refs/<branch>` holding the commit hash."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (root / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch, hf_folder, tiny_tokenizer):
    """A cache holding REPO: `main` = a tiny Llama with the tiny tokenizer (COMMIT_A), `v2` =
    a tiny GPT-2 (COMMIT_B); HF_HUB_CACHE points at it and no socket may connect."""
    llama = tmp_path / "llama"
    shutil.copytree(hf_folder("llama_gqa")[1], llama)
    tiny_tokenizer.save_pretrained(llama)
    cache = tmp_path / "hub"
    snapshots = {"main": cache_snapshot(cache, REPO, COMMIT_A, llama, refs=["main"]),
                 "v2": cache_snapshot(cache, REPO, COMMIT_B, hf_folder("gpt2")[1], refs=["v2"])}
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))

    def no_network(*args, **kwargs):
        raise AssertionError(f"network call to {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return cache, snapshots, llama


def same_tree(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_a_hub_id_loads_the_cached_snapshot_of_its_revision(hub, hf_folder, tiny_tokenizer):
    cache, snapshots, llama = hub
    assert resolve_source(REPO) == str(snapshots["main"])
    assert resolve_source(f"{REPO}@v2") == str(snapshots["v2"])
    assert resolve_source(f"{REPO}@{COMMIT_B}") == str(snapshots["v2"])

    cfg, params, tokenizer = load_policy(ModelSection(source=REPO))
    want_cfg, want_params = models.load_pretrained(llama)
    assert (cfg.family, cfg.num_layers, cfg.num_kv_heads) == ("llama", 2, 2)
    assert same_tree(params, want_params)
    text = "the movie was wonderful"
    assert tokenizer(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]

    for source in (f"{REPO}@v2", f"{REPO}@{COMMIT_B}"):
        cfg, params, _ = load_policy(ModelSection(source=source, tokenizer=REPO))
        assert (cfg.family, cfg.vocab_size, cfg.hidden_size) == ("gpt2", 97, 32)
        assert same_tree(params, models.load_pretrained(hf_folder("gpt2")[1])[1])
        assert model_config(ModelSection(source=source)).family == "gpt2"  # `jrlhf plan`
    # model.tokenizer alone as a hub id, beside a local policy folder
    tok = load_tokenizer(REPO, "model.tokenizer")
    assert tok(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]


def test_a_local_path_wins_over_a_hub_id_of_the_same_name(hub, hf_folder, tmp_path,
                                                          monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(hf_folder("gpt2")[1], work / REPO)  # ./jrlhf-test/tiny: a GPT-2 folder
    monkeypatch.chdir(work)
    assert resolve_source(REPO) == REPO
    cfg, _ = models.load_pretrained(resolve_source(REPO))
    assert cfg.family == "gpt2"  # the cache's main is a Llama
    # Not hub ids: returned as they are, for the loaders to accept or name.
    for source in ("smollm2", "random", "model.gguf", "org/model.gguf", "/abs/org/name",
                   "a/b/c", "./org/name", ""):
        assert resolve_source(source) == source


@pytest.mark.parametrize("source, fetch", [
    ("jrlhf-test/absent", "hf download jrlhf-test/absent`"),
    (f"{REPO}@v3", f"hf download {REPO} --revision v3`"),
    (f"{REPO}@{'f' * 40}", f"hf download {REPO} --revision {'f' * 40}`"),
])
def test_a_hub_id_not_in_the_cache_is_one_line_saying_how_to_fetch_it(source, fetch, hub,
                                                                      capfd):
    cache = hub[0]
    with pytest.raises(FileNotFoundError) as err:
        load_policy(ModelSection(source=source))
    message = str(err.value)
    assert message.startswith(f"model.source={source!r}: no such local path, and the hub id ")
    assert str(cache) in message and fetch in message and "\n" not in message
    with pytest.raises(FileNotFoundError, match=r"^model\.tokenizer='jrlhf-test/absent': "):
        load_policy(ModelSection(source=REPO, tokenizer="jrlhf-test/absent"))

    assert main(["generate", "--model", source]) == 2
    out, err_text = capfd.readouterr()
    assert "Traceback" not in err_text
    assert err_text.strip().splitlines() == [
        f"jrlhf generate: error: {message.replace('model.source=', '--model=')}"]


def test_reward_model_path_takes_a_hub_id(hub, hf_folder, tmp_path):
    cache = hub[0]
    _, folder = hf_folder("llama_gqa", head="cls")
    cache_snapshot(cache, "jrlhf-test/rm", COMMIT_A, folder, refs=["main"])
    config = derive(load_config(ROOT / "configs" / "tiny.py"),
                    {"reward.model_path": "jrlhf-test/rm", "run.out_dir": str(tmp_path / "run")})
    run = Run(config, tmp_path / "run", None, None, {}, {})
    cfg, params = run.weights(REWARD_MODEL_PATH, Stage("ppo", "train"))
    want_cfg, want_params = models.load_pretrained(folder, lm_head=False, scalar_head=True)
    assert cfg == want_cfg and cfg.scalar_head and not cfg.lm_head
    assert same_tree(params, want_params)


def test_generate_with_a_hub_id_samples_what_its_snapshot_folder_samples(hub, capfd):
    snapshot = hub[1]["main"]
    outputs = []
    for model in (REPO, str(snapshot)):
        assert main(["generate", "--model", model, "--prompt", "the movie was", "--raw",
                     "--max-new-tokens", "4"]) == 0
        out, err = capfd.readouterr()
        assert "4 tokens]" in err, err
        outputs.append(out)
    assert outputs[0] == outputs[1] and outputs[0].strip()
