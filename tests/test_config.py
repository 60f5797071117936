"""Configs are typed data: every file loads, --set parses by type, bad keys are clear errors."""

import dataclasses
import json
import re
from pathlib import Path

import pytest

from jrlhf.config import (Config, PPOConfig, apply_overrides, derive, from_dict, load_config,
                          config_json)

CONFIGS = sorted(Path(__file__).parent.parent.glob("configs/*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_loads_and_round_trips(path, tmp_path):
    config = load_config(path)
    assert isinstance(config, Config)
    assert from_dict(Config, json.loads(config_json(config))) == config


def test_configs_derive_from_base_changing_only_what_differs():
    base, tiny = load_config(CONFIGS[0].with_name("base.py")), load_config(
        CONFIGS[0].with_name("tiny.py"))
    assert base == Config()
    assert tiny.ppo.kl_coef == base.ppo.kl_coef and tiny.sft.steps != base.sft.steps
    default = load_config(CONFIGS[0].with_name("default.py"))
    real = load_config(CONFIGS[0].with_name("smollm2_135m.py"))
    assert default.model == real.model and default.lora == real.lora


def test_set_parses_by_field_type():
    c = apply_overrides(Config(), ["ppo.kl_coef=0.1", "mesh.fsdp=8", "ppo.adaptive_kl=true",
                                   "optim.freeze=embed/.*,layers/0/.*", "run.out_dir=/x",
                                   "model.arch.hidden_size=32"])
    assert c.ppo.kl_coef == 0.1 and c.mesh.fsdp == 8 and c.ppo.adaptive_kl is True
    assert c.optim.freeze == ("embed/.*", "layers/0/.*") and c.run.out_dir == "/x"
    assert c.model.arch.hidden_size == 32
    assert apply_overrides(Config(), ['optim.freeze=["a,b", "c"]']).optim.freeze == ("a,b", "c")


def test_bad_keys_and_values_are_clear_errors():
    with pytest.raises(KeyError, match=r"unknown config key 'ppo.klcoef'; valid keys: ppo.kl_coef"):
        apply_overrides(Config(), ["ppo.klcoef=1"])
    with pytest.raises(KeyError, match=r"unknown config key 'pop.x'; valid keys: model\.source"):
        apply_overrides(Config(), ["pop.x=1"])
    with pytest.raises(ValueError, match=r"--set ppo.kl_coef='abc': expected float"):
        apply_overrides(Config(), ["ppo.kl_coef=abc"])
    with pytest.raises(ValueError, match=r"--set ppo.adaptive_kl='maybe': expected bool"):
        apply_overrides(Config(), ["ppo.adaptive_kl=maybe"])
    with pytest.raises(KeyError, match="is a section; set one of: ppo.kl_coef"):
        apply_overrides(Config(), ["ppo=1"])
    with pytest.raises(ValueError, match="expected key=value"):
        apply_overrides(Config(), ["ppo.kl_coef"])
    with pytest.raises(ValueError, match="ppo.kl_estimator must be k1"):
        apply_overrides(Config(), ["ppo.kl_estimator=k7"])
    with pytest.raises(KeyError, match="'ppo.nope'"):
        derive(Config(), {"ppo.nope": 1})
    with pytest.raises(ValueError, match="not divisible by ppo.minibatch_size=3"):
        PPOConfig(prompts_per_iteration=8, minibatch_size=3)


def test_cli_reports_config_errors(capsys):
    from jrlhf.cli import main

    assert main(["sft", "--set", "sft.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'sft.stepz'" in err and "sft.steps" in err


@pytest.mark.parametrize("setting", [
    "sft.learning_rate=nan", "reward.learning_rate=nan", "sft.learning_rate=-1e-4",
    "sft.steps=0", "data.max_response_length=0", "run.save_every=-1", "lora.rank=-2",
    "run.keep_checkpoints=0", "ppo.learning_rate=inf", "rollout.top_p=1.5",
    "grpo.group_size=1"])
def test_out_of_range_values_are_refused_naming_key_and_value(setting):
    key, value = setting.split("=")
    with pytest.raises(ValueError, match=rf"{key}={value!r}|{key}=.* is out of range"):
        apply_overrides(Config(), [setting])


def test_cli_out_of_range_is_one_line_exit_2(capsys):
    from jrlhf.cli import main

    assert main(["sft", "--set", "sft.learning_rate=nan"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "jrlhf sft: error: sft.learning_rate=nan is out of range: expected > 0"


@pytest.mark.parametrize("body,expected", [
    ("def get_config(:\n", r"bad.py:1: the config file fails: SyntaxError"),
    ("import no_such_module_xyz\n", r"the config file fails: ModuleNotFoundError"),
    ("def get_config():\n    return 3\n", r"get_config\(\) returned int, not Config"),
    ("x = 1\n", r"defines no get_config\(\)"),
])
def test_broken_config_files_are_one_line_errors(tmp_path, capsys, body, expected):
    from jrlhf.cli import main

    bad = tmp_path / "bad.py"
    bad.write_text(body)
    assert main(["sft", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.search(expected, err), err


def test_unknown_task_names_the_choices(tmp_path, capsys):
    from jrlhf.cli import main

    assert main(["sft", "--set", "data.task=nope", "--set", f"run.out_dir={tmp_path}"]) == 2
    assert "data.task='nope': unknown task; choose from reviews" in capsys.readouterr().err


def test_an_unusable_out_dir_is_one_line(tmp_path, capsys):
    from jrlhf.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["sft", "--set", f"run.out_dir={blocker / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "cannot be used" in err and "Traceback" not in err and str(blocker) in err


def test_a_field_the_saved_config_predates_is_unchanged_at_its_default():
    """A run saved before `rollout.dtype` existed resumes; setting the new field is a change."""
    from jrlhf.config import changed_keys, to_dict

    saved = json.loads(json.dumps(to_dict(Config())))
    del saved["rollout"]["dtype"]
    assert changed_keys(saved, Config()) == {}
    assert changed_keys(saved, apply_overrides(Config(), ["rollout.dtype=bfloat16"])) == {
        "rollout.dtype": (None, "bfloat16")}


@pytest.mark.parametrize("changes,expected", [
    ({"sft.steps": "abc"}, "config key sft.steps='abc': expected int, got str"),
    ({"sft.steps": 3.0}, "config key sft.steps=3.0: expected int, got float"),
    ({"sft.steps": True}, "config key sft.steps=True: expected int, got bool"),
    ({"ppo.kl_coef": "0.1"}, "config key ppo.kl_coef='0.1': expected float, got str"),
    ({"ppo.adaptive_kl": 1}, "config key ppo.adaptive_kl=1: expected bool, got int"),
    ({"optim.freeze": "embed/.*"},
     "config key optim.freeze='embed/.*': expected tuple[str, ...], got str"),
    ({"optim.freeze": ("a", 3)}, "config key optim.freeze[1]=3: expected str, got int"),
    ({"model.arch": "gpt2"}, "config key model.arch='gpt2': expected ModelConfig or None, got str"),
    ({"model.arch.family": "gpt3"},
     "config key model.arch.family='gpt3': expected 'gpt2' or 'llama', got str"),
])
def test_derive_refuses_a_wrong_type_naming_key_value_and_type(changes, expected):
    with pytest.raises(TypeError) as err:
        derive(Config(), changes)
    assert str(err.value) == expected


def test_derive_accepts_what_the_field_means():
    """An int where a float goes, a list for a tuple, None for an optional section, a dict for
    RoPE scaling (the model config converts it)."""
    c = derive(Config(), {"ppo.kl_coef": 1, "optim.freeze": ["a", "b"], "model.arch": None})
    assert c.ppo.kl_coef == 1.0 and c.optim.freeze == ("a", "b") and c.model.arch is None
    scaled = derive(Config(), {"model.arch.rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    assert scaled.model.arch.rope_scaling == (("factor", 2.0), ("rope_type", "linear"))


def test_a_config_file_deriving_a_wrong_type_is_one_line_naming_file_and_key(tmp_path, capsys):
    from jrlhf.cli import main

    bad = tmp_path / "bad.py"
    bad.write_text("from jrlhf.config import Config, derive\n\n\ndef get_config():\n"
                   "    return derive(Config(), {'sft.steps': 'abc'})\n")
    assert main(["sft", "--config", str(bad)]) == 2
    assert capsys.readouterr().err == (
        f"jrlhf sft: error: {bad}: the config file fails: TypeError: config key "
        "sft.steps='abc': expected int, got str\n")


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_out_dir_is_refused(value, tmp_path, capsys, monkeypatch):
    """`--set run.out_dir=` would write the run into the current folder: refused, nothing
    written."""
    from jrlhf.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["sft", "--set", f"run.out_dir={value}"]) == 2
    assert capsys.readouterr().err == (
        "jrlhf sft: error: run.out_dir is empty: name the run's folder (e.g. runs/my_run)\n")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="run.out_dir is empty"):
        derive(Config(), {"run.out_dir": ""})


def test_the_config_schema_imports_no_algorithm_code():
    """`jrlhf.config` owns its fields' allowed values (e.g. `AGGREGATIONS`, which the losses
    import from it): it imports nothing of jrlhf but the model config."""
    import ast

    tree = ast.parse((Path(__file__).parent.parent / "jrlhf" / "config.py").read_text())
    imported = {node.module for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jrlhf")}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names if alias.name.startswith("jrlhf")}
    assert imported == {"jrlhf.models.config"}, imported


def test_every_bounded_field_refuses_a_value_past_each_bound():
    """Each field's range sits beside it (`config.bounded`); building a config with a value
    just past any bound is one error naming the key and the range."""
    from jrlhf.config import changed_keys, derive

    checked = 0
    for section in dataclasses.fields(Config):
        cls = type(getattr(Config(), section.name))
        for field in dataclasses.fields(cls):
            if "range" not in field.metadata:
                continue
            ge, gt, le, lt = field.metadata["range"]
            step = 1 if field.type in (int, "int") else 1e-3
            bad = [v for v in (ge - step if ge is not None else None, gt, le + step if
                               le is not None else None, lt) if v is not None]
            for value in bad + ([float("nan")] if field.type in (float, "float") else []):
                value = float(value) if field.type in (float, "float") else int(value)
                with pytest.raises(ValueError, match=rf"{section.name}\.{field.name}=\S+ is out "
                                                     "of range: expected"):
                    derive(Config(), {f"{section.name}.{field.name}": value})
                checked += 1
    assert checked > 80
    assert not changed_keys(json.loads(config_json(Config())), Config())


@pytest.mark.parametrize("old,new", [("ppo.ppo_epochs", "ppo.epochs"),
                                     ("ppo.rollout_batch_size", "ppo.prompts_per_iteration"),
                                     ("rollout.batch_size", "rollout.eval_batch_size")])
def test_renamed_keys_name_their_new_key_and_old_runs_read_back(old, new):
    """Setting a renamed key (--set, a config file's derive) is one line naming the new key; a
    config saved before the rename reads back and counts as unchanged (`--resume` works)."""
    from jrlhf.config import changed_keys

    for build in (lambda: apply_overrides(Config(), [f"{old}=2"]),
                  lambda: derive(Config(), {old: 2})):
        with pytest.raises(KeyError, match=rf"config key '{old}' was renamed '{new}'"):
            build()
    config = derive(Config(), {new: 2})
    saved = json.loads(config_json(config))  # as a checkpoint holds it
    section, _, field = new.partition(".")
    saved[section][old.partition(".")[2]] = saved[section].pop(field)
    assert not changed_keys(saved, config)
    assert from_dict(Config, saved) == config
