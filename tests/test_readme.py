"""The README's research sections run as they are written: "Use the steps in your own code" and
"Add an algorithm" (their code blocks, in order, each section in a fresh namespace)."""

import re
from pathlib import Path

import pytest

from jrlhf import algorithms

README = Path(__file__).parent.parent / "README.md"


def section_blocks(heading: str) -> list[str]:
    """The ```python blocks of the README section whose heading line is `heading`, up to the
    next heading of the same or a higher level (outside code blocks)."""
    lines = README.read_text().splitlines()
    level = len(heading.split(" ")[0])
    start = lines.index(heading) + 1
    blocks, block, fence = [], None, False
    for line in lines[start:]:
        if line.startswith("```"):
            fence = not fence
            if fence and line == "```python":
                block = []
            elif not fence and block is not None:
                blocks.append("\n".join(block) + "\n")
                block = None
            continue
        if not fence and re.match(rf"#{{1,{level}}} ", line):
            break
        if block is not None:
            block.append(line)
    return blocks


@pytest.fixture
def own_registry(monkeypatch, tmp_path):
    """Records registered by the block stay in this test; files go to a temporary folder."""
    monkeypatch.setattr(algorithms, "_REGISTRY", dict(algorithms._REGISTRY))
    monkeypatch.chdir(tmp_path)


@pytest.mark.slow
def test_use_the_steps_in_your_own_code(own_registry, capsys):
    blocks = section_blocks("### Use the steps in your own code")
    assert len(blocks) == 1
    namespace = {}
    exec(compile(blocks[0], "README: Use the steps in your own code", "exec"), namespace)
    kl, kl_coef = map(float, capsys.readouterr().out.split())
    assert kl == kl and kl_coef > 0  # finite numbers from two PPO iterations
    # The caller's weights survived the donating steps (the state copied them).
    assert not any(x.is_deleted() for x in __import__("jax").tree.leaves(namespace["params"]))


@pytest.mark.slow
def test_add_an_algorithm(own_registry, capsys, tmp_path):
    blocks = section_blocks("## Add an algorithm (`jrlhf.algorithms`)")
    assert len(blocks) == 2
    namespace = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README: Add an algorithm, block {i + 1}", "exec"), namespace)
    *progress, history, tokens_per_s, peak_bytes = capsys.readouterr().out.strip().splitlines()
    assert progress and all(re.fullmatch(r"\[simpo \d\] loss=\S+ accuracy=\S+", line)
                            for line in progress), progress
    assert "simpo/loss" in history and float(tokens_per_s) > 0 and int(peak_bytes) > 0
    assert namespace["result"].history and len(namespace["result"].history) == 4
    assert (tmp_path / "runs" / "simpo" / "simpo" / "checkpoints").is_dir()
    assert "simpo" in algorithms.names()
