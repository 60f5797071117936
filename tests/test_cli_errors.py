"""Every class of bad input, fed through the command line: each ends in one line naming the
file / row / key / value, exit code 2, and no Python traceback.

The commands run in-process (`jrlhf.cli.main`, with file descriptor 2 captured, so also what
threads or libraries print there is seen); `python -m jrlhf.cli` maps `main`'s return value to
the exit code (tests/test_stages.py runs the locked-folder and remote-code cases as real
processes)."""

import gzip
import json
from pathlib import Path

import pytest

from jrlhf.cli import main

ROOT = Path(__file__).parent.parent
TINY = str(ROOT / "configs" / "tiny.py")


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def jsonl(*rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


GOOD_GZ = gzip.compress(jsonl(*({"prompt": f"p{i}"} for i in range(2000))).encode())


def config_file(body: str):
    def make(tmp):
        return ["sft", "--config", str(write(tmp / "bad.py", body))], "bad.py"
    return make


def override(setting: str, expected: str, command: str = "sft"):
    def make(tmp):
        return [command, "--config", TINY, "--set", f"run.out_dir={tmp / 'run'}",
                "--set", setting], expected
    return make


def data_file(command: str, key: str, name: str, content, expected: str, *extra: str):
    """`jrlhf <command>` on the tiny config with data.<key> pointing at a bad file."""
    def make(tmp):
        path = write(tmp / name, content)
        argv = [command, "--config", TINY, "--set", f"run.out_dir={tmp / 'run'}",
                "--set", f"data.{key}={path}"]
        for setting in extra:
            argv += ["--set", setting]
        return argv, expected.format(path=path)
    return make


def truncated_gguf(tmp):
    from jrlhf import models

    with open(models.smollm2_gguf_path(), "rb") as f:
        path = write(tmp / "cut.gguf", f.read(4_000_000))
    return ["generate", "--gguf", str(path)], f"{path}: not a complete, readable GGUF file"


def remote_code_folder(tmp):
    folder = write(tmp / "m" / "config.json", json.dumps(
        {"model_type": "llama", "auto_map": {"AutoConfig": "evil.EvilConfig"}})).parent
    write(folder / "evil.py", "raise SystemExit('ran remote code')\n")
    return ["generate", "--model", str(folder)], f"{folder}: config.json asks for remote code"


def missing_model_folder(tmp):
    return (["sft", "--config", TINY, "--set", f"run.out_dir={tmp / 'run'}",
             "--set", f"model.source={tmp / 'nowhere'}"], str(tmp / "nowhere"))


def unusable_out_dir(tmp):
    blocker = write(tmp / "file", "not a folder")
    return ["sft", "--config", TINY, "--set", f"run.out_dir={blocker / 'run'}"], str(blocker)


def locked_out_dir(tmp):
    import subprocess
    import sys

    # A live process holding the folder's lock (the lock is per process: flock).
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from jrlhf.runlock import RunLock\n"
        f"with RunLock({str(tmp / 'run')!r}):\n    print('held', flush=True); time.sleep(60)")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return (["sft", "--config", TINY, "--set", f"run.out_dir={tmp / 'run'}"],
            f"in use by another jrlhf run (pid {holder.pid}"), holder


def damaged_metrics(tmp):
    """A run folder whose metrics.jsonl ends in bytes that are not UTF-8 (line 3: blank lines
    count), met when the stage starts and trims its old rows."""
    path = write(tmp / "run" / "metrics.jsonl", jsonl({"stage": "sft", "step": 1}).encode()
                 + b"\n" + bytes(range(128, 256)))
    return (["sft", "--config", TINY, "--set", f"run.out_dir={tmp / 'run'}"],
            f"{path}:3: not UTF-8 text (invalid start byte at byte 0)")


SFT_ROWS = jsonl(*({"prompt": f"Say {i}:", "response": f" {i}"} for i in range(16)))

CASES = {
    # config: keys, values, files
    "unknown key": override("sft.stepz=3", "unknown config key 'sft.stepz'"),
    "nan learning rate": override("sft.learning_rate=nan", "sft.learning_rate=nan is out of"),
    "nan reward learning rate": override("reward.learning_rate=nan",
                                         "reward.learning_rate=nan is out of", "reward"),
    "negative learning rate": override("sft.learning_rate=-1e-4", "sft.learning_rate=-0.0001"),
    "zero steps": override("sft.steps=0", "sft.steps=0 is out of range"),
    "distill beta out of range": override("distill.beta=1.5", "distill.beta=1.5 is out of range",
                                          "distill"),
    "zero response length": override("data.max_response_length=0",
                                     "data.max_response_length=0"),
    "negative save_every": override("run.save_every=-1", "run.save_every=-1"),
    "negative lora rank": override("lora.rank=-2", "lora.rank=-2"),
    "keep no checkpoints": override("run.keep_checkpoints=0", "run.keep_checkpoints=0"),
    "not a number": override("sft.learning_rate=fast", "sft.learning_rate"),
    "unknown choice": override("grpo.loss_aggregation=sum", "grpo.loss_aggregation"),
    "unknown barrier choice": override("model.residual_barrier=yes",
                                       "model.residual_barrier must be auto, on or off"),
    "unknown host memory choice": override("run.host_memory=yes",
                                           "run.host_memory must be auto, keep or system"),
    "unknown task": override("data.task=nope", "data.task='nope': unknown task"),
    "config syntax error": config_file("def get_config(:\n"),
    "config import error": config_file("import no_such_module_xyz\n"),
    "config wrong type": config_file("def get_config():\n    return 3\n"),
    "config without get_config": config_file("x = 1\n"),
    "config derives a wrong type": lambda tmp: (
        config_file("from jrlhf.config import Config, derive\n\n\ndef get_config():\n"
                    "    return derive(Config(), {'sft.steps': 'abc'})\n")(tmp)[0],
        (f"{tmp / 'bad.py'}: the config file fails: TypeError: config key sft.steps='abc': "
         "expected int, got str")),
    "empty out_dir": override("run.out_dir=", "run.out_dir is empty: name the run's folder"),
    "unusable out_dir": unusable_out_dir,
    # data files
    "bad sft row": data_file("sft", "sft_path", "sft.jsonl", '{"prompt": "p", "response": " "}\n',
                             "{path}:1: field 'response': empty"),
    "not JSON": data_file("sft", "sft_path", "sft.jsonl", SFT_ROWS + '{"prompt": "p"\n',
                          "{path}:17: field '<row>': not valid JSON"),
    "not UTF-8": data_file("sft", "sft_path", "sft.jsonl", b'{"prompt": "\xff", "response": "a"}\n',
                           "{path}:1: field '<row>': not valid UTF-8"),
    "chosen == rejected": data_file(
        "reward", "rankings_path", "pairs.jsonl",
        jsonl({"prompt": "Q", "chosen": " same ", "rejected": "same"}),
        "{path}:1: field 'rejected': identical to 'chosen'"),
    "rank beyond int32": data_file(
        "reward", "rankings_path", "ranks.jsonl",
        jsonl({"prompt": "p", "responses": ["a", "b"], "ranks": [1, 2**40]}),
        "{path}:1: field 'ranks': expected integers from 1"),
    "all ranks tie": data_file(
        "dpo", "rankings_path", "ties.jsonl",
        jsonl({"prompt": "p", "responses": ["a", "b"], "ranks": [1, 1]}),
        "{path}:1: field 'ranks': all responses tie"),
    "empty chat prompt": data_file(
        "grpo", "prompts_path", "prompts.jsonl",
        jsonl({"messages": [{"role": "user", "content": "  "}]}),
        "{path}:1: field 'messages[0].content': empty"),
    "corrupt gz": data_file("grpo", "prompts_path", "prompts.jsonl.gz",
                            GOOD_GZ[:200] + bytes(b ^ 0x5A for b in GOOD_GZ[200:400]) +
                            GOOD_GZ[400:], "{path}: cannot be read as gzip-compressed JSONL"),
    "truncated gz, rows skipped": data_file(
        "grpo", "prompts_path", "prompts.jsonl.gz", GOOD_GZ[: len(GOOD_GZ) // 2],
        "{path}: cannot be read as gzip-compressed JSONL", "data.on_bad_row=skip"),
    "not gz": data_file("grpo", "prompts_path", "prompts.jsonl.gz", b"plain text\n",
                        "{path}: cannot be read as gzip-compressed JSONL"),
    "missing data file": override("data.sft_path=/no/such/file.jsonl", "/no/such/file.jsonl"),
    "blank user turn in a chat SFT row": data_file(
        "sft", "sft_path", "chat.jsonl",
        jsonl({"messages": [{"role": "user", "content": " \t"},
                            {"role": "assistant", "content": "Hi."}]}),
        "{path}:1: field 'messages[0].content': empty (a user turn must say something)"),
    "identical responses ranked apart": data_file(
        "reward", "rankings_path", "ranks.jsonl",
        jsonl({"prompt": "Q", "responses": ["a", "b", "a "], "ranks": [1, 2, 3]}),
        "{path}:1: field 'responses[2]': identical to responses[0] but ranked 3, not 1"),
    "identical responses ranked apart, rows skipped": data_file(
        "reward", "rankings_path", "ranks.jsonl",
        jsonl({"prompt": "Q", "responses": ["a", "a"], "ranks": [1, 2]}),
        "{path}: no usable rankings rows (1 bad, first: {path}:1: field 'responses[1]': "
        "identical to responses[0]", "data.on_bad_row=skip"),
    "sampled positions beyond GPT-2's table": lambda tmp: (
        ["ppo", "--config", str(ROOT / "configs" / "bench_gpt2.py"),
         "--set", f"run.out_dir={tmp / 'run'}", "--set", "model.arch.num_layers=1",
         "--set", "model.arch.max_position_embeddings=130", "--set", "rollout.max_new_tokens=80"],
        ("data.max_prompt_length + rollout.max_new_tokens = 64 + 80 = 144 tokens exceed the "
         "model's learned position table (max_position_embeddings=130); jrlhf refuses")),
    # models
    "truncated GGUF": truncated_gguf,
    "remote-code folder": remote_code_folder,
    "missing model folder": missing_model_folder,
    # run files
    "random bytes ending metrics.jsonl": damaged_metrics,
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_input_is_one_line_and_exit_2(case, tmp_path, capfd):
    argv, expected = CASES[case](tmp_path)
    code = main(argv)
    out, err = capfd.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in err + out, err
    # Progress lines may come before it; the error is the one last line.
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert errors == [err.strip().splitlines()[-1]], err
    assert errors[0].startswith(f"jrlhf {argv[0]}: error: ") and expected in errors[0], err


def test_a_locked_out_dir_is_one_line_and_exit_2(tmp_path, capfd):
    """(A changed-config resume: tests/test_run.py::test_resume_with_another_config_or_data_is_
    refused_with_the_diff, which also checks the CLI's exit 2.)"""
    (argv, expected), holder = locked_out_dir(tmp_path)
    try:
        assert main(argv) == 2
        err = capfd.readouterr().err
        assert err.strip().count("\n") == 0 and expected in err and "Traceback" not in err
    finally:
        holder.kill()
        holder.wait()
