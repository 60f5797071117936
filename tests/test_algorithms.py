"""An algorithm is one record (`jrlhf.algorithms`): the outer modules read it and never compare
an algorithm's name, and an algorithm defined here, outside jrlhf, runs through `make_setup`,
`jrlhf bench`, `jrlhf plan`, the training loop (checkpoints, exact resume) and a stage of the
stage runner, as the built-in ones do. (Plan == training state and bench for every record:
tests/test_setups.py, tests/test_bench.py, parametrized over `algorithms.names()`.)"""

import dataclasses
import functools
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrlhf import algorithms, bench, loops, plan
from jrlhf.algorithms import Algorithm, Schedule, pair_batch, pair_cost, pair_example
from jrlhf.config import Config, apply_overrides, derive, load_config
from jrlhf.models import ModelConfig, init_params
from jrlhf.setups import batch_shapes, make_setup
from jrlhf.steps import apply_gradients, forward_params, jit_step, pair_logps

ROOT = Path(__file__).parent.parent
CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, intermediate_size=64, eos_token_id=2,
                  pad_token_id=2)


# ---------------------------------------------------------------------------------------------
# SLiC-HF (Zhao et al. 2023), defined here as a researcher would: a config section, a loss, a
# step and one record.

@dataclasses.dataclass(frozen=True)
class SlicConfig:
    delta: float = 1.0  # the hinge's margin on the summed log-prob difference
    nll_weight: float = 0.1  # the chosen response's NLL, as a regulariser
    learning_rate: float = 1e-3
    steps: int = 3
    batch_size: int = 2


def slic_loss(chosen, rejected, n_chosen, delta: float, nll_weight: float):
    """Per-pair loss `[P]` from summed response log-probs `[P]` and chosen token counts `[P]`."""
    hinge = jnp.maximum(0.0, delta - chosen + rejected)
    return hinge - nll_weight * chosen / jnp.maximum(n_chosen, 1)


def slic_step(state, batch, *, model_cfg, cfg: SlicConfig, labels=None, lora_scale=0.0):
    def loss_fn(params):
        fp = forward_params(params, labels, lora_scale)
        (chosen, rejected), (n_chosen, _) = pair_logps(model_cfg, fp, batch)
        loss = jnp.mean(slic_loss(chosen, rejected, n_chosen, cfg.delta, cfg.nll_weight))
        return loss, jnp.mean(chosen > rejected)

    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return apply_gradients(state, grads), {"slic/loss": loss, "slic/accuracy": accuracy}


def slic(cfg: SlicConfig = SlicConfig()) -> Algorithm:
    return Algorithm(
        name="slic", help="SLiC-HF on data.rankings_path",
        schedule=lambda config: Schedule(cfg.learning_rate, cfg.steps, cfg.steps),
        make_step=lambda setup, config: jit_step(functools.partial(
            slic_step, model_cfg=setup.model_cfg, cfg=cfg, labels=setup.labels,
            lora_scale=setup.lora_scale), setup.state, setup.mesh),
        batch=lambda setup, config: pair_batch(cfg.batch_size, config),
        cost=lambda setup, config: pair_cost(setup, config, cfg.batch_size),
        data="rankings", example=pair_example, batch_size=lambda config: cfg.batch_size,
        summary_keys=("slic/loss", "slic/accuracy"))


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(algorithms, "_REGISTRY", dict(algorithms._REGISTRY))
    return algorithms.register(slic())


def small_config(**changes) -> Config:
    return derive(Config(), {"model.source": "random", "model.arch": CFG,
                             "data.max_prompt_length": 8, "data.max_response_length": 8,
                             **changes})


@pytest.mark.slow
def test_an_algorithm_of_ones_own_runs_through_setup_bench_plan_and_the_loop(registered,
                                                                            tmp_path):
    config = small_config(**{"optim.freeze": ("embed/.*",), "run.save_every": 1})
    params = init_params(CFG, 0)
    setup = make_setup("slic", config, CFG, params)
    assert setup.algorithm is registered and setup.num_steps == 3
    # The config's freezing reached it through the optimizer's labels.
    assert set(jax.tree.leaves(setup.labels["embed"])) == {"frozen"}
    batch = bench.random_batch(batch_shapes(setup, config), CFG, np.random.RandomState(0))
    assert batch["chosen_ids"].shape == (2, 16)

    # The loop: 3 steps with checkpoints; a run killed after step 2 resumes to the same state.
    result = loops.train(setup, config, iter(lambda: batch, None), out_dir=tmp_path / "a")
    assert len(result.history) == 3
    assert all({"slic/loss", "slic/accuracy"} <= set(m) for m in result.history)
    first = make_setup("slic", config, CFG, params)
    loops.run_stage(first.name, config, first.state, first.step, iter(lambda: batch, None), 2,
                    out_dir=tmp_path / "b")
    again = make_setup("slic", config, CFG, params)
    resumed = loops.train(again, config, iter(lambda: batch, None), out_dir=tmp_path / "b",
                          resume=True)
    for a, b in zip(jax.tree.leaves(result.state.params), jax.tree.leaves(resumed.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    r = bench.bench_step(bench.Workload(config, CFG, params), "slic", steps=2, warmup=1)
    assert r["samples_per_s"] > 0 and r["model_flops_per_step"] > 0
    p = plan.plan(config, "slic")
    assert p["params_bytes_per_device"] == sum(x.nbytes for x in jax.tree.leaves(params))
    assert p["optimizer_bytes_per_device"] > 0 and p["peak_bytes_per_device"] > 0


@pytest.mark.slow
def test_an_algorithm_of_ones_own_runs_as_a_stage(registered, tmp_path):
    """The stage runner reads its data file, example function and batch size from the record,
    and the loop prints its summary keys."""
    from jrlhf.stages import Stage, open_run, run_stages

    rankings = tmp_path / "rankings.jsonl"
    rankings.write_text("".join(json.dumps(
        {"prompt": f"Review {i}:", "responses": ["a great film", "an awful film"],
         "ranks": [1, 2] if i % 2 else [2, 1]}) + "\n" for i in range(6)))
    config = apply_overrides(load_config(ROOT / "configs" / "tiny.py"),
                             [f"run.out_dir={tmp_path / 'run'}", "run.log_every=1",
                              f"data.rankings_path={rankings}"])
    lines = []
    with open_run(config, resume=False, train=True, log=lines.append) as run:
        run_stages(run, [Stage("slic", "train", "slic", data="rankings", start="base",
                               produces="slic")])
        assert "slic" in run.models
    progress = [line for line in lines if line.startswith("[slic ")]
    assert len(progress) == 3, lines
    assert re.fullmatch(r"\[slic 3\] loss=\S+ accuracy=\S+", progress[-1]), progress


def test_every_command_and_no_name_comparison_outside_the_records():
    """Each record is a `jrlhf` command with its help, an unknown name is one error listing the
    known ones, and the outer modules never compare an algorithm's name."""
    from jrlhf.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for record in algorithms.records():
        assert record.name in sub.choices and record.help
    with pytest.raises(ValueError, match=r"unknown algorithm 'ppo2'; choose from sft, reward, "):
        algorithms.get("ppo2")
    names = "|".join(algorithms.names())
    compared = re.compile(rf"""(==|!=|\bin)\s*[\(\[{{]?\s*["']({names})["']""")
    for module in ("setups", "bench", "plan", "stages", "loops", "cli", "report", "rollouts"):
        source = (ROOT / "jrlhf" / f"{module}.py").read_text()
        hits = [line for line in source.splitlines() if compared.search(line)]
        assert not hits, (module, hits)
