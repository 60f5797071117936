"""TRL's dataset layouts (prompt/completion, messages, explicit and implicit-prompt preferences,
as strings or conversations) from rows built by `datasets` itself: written with `to_json`,
`to_parquet` and `save_to_disk`, read back through the same validation as every data file."""

import copy
import json
import sys
from pathlib import Path

import datasets  # the `test` extra installs it (users: the optional `datasets` extra)
import pytest

from jrlhf.data import BadRow, Encoder, build_dataset, load_rows
from jrlhf.data.rows import MissingExtra
from jrlhf.judging import rankings_jsonl
from jrlhf.report import file_digest
from jrlhf.stages import data_digest

ROOT = Path(__file__).parent.parent


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "Be brief."}
ASK = [SYSTEM, user("What color is the sky?")]


def write(rows, where, tmp_path, name="data"):
    """`rows` as a `datasets.Dataset` written the way `where` says; returns the path."""
    ds = datasets.Dataset.from_list(rows)
    if where == "disk":
        ds.save_to_disk(str(tmp_path / name))
        return tmp_path / name
    if where == "jsonl":
        ds.to_json(str(tmp_path / f"{name}.jsonl"))
        return tmp_path / f"{name}.jsonl"
    ds.to_parquet(str(tmp_path / f"{name}.parquet"))
    return tmp_path / f"{name}.parquet"


WHERE = ["disk", "jsonl", "parquet"]

# (kind, rows of one layout, the normalised rows they give)
LAYOUTS = {
    "sft_prompt_completion": ("sft", [
        {"prompt": "The sky is", "completion": " blue."},
        {"prompt": "Grass is", "completion": " green."}], [
        {"prompt": "The sky is", "messages": "", "response": " blue."},
        {"prompt": "Grass is", "messages": "", "response": " green."}]),
    "sft_conversational_prompt_completion": ("sft", [
        {"prompt": ASK, "completion": [assistant("Blue.")]},
        # a key only some messages have is None in the others' columns: dropped again
        {"prompt": [{"role": "user", "content": "Hi", "name": "ada"}],
         "completion": [assistant("Hello, Ada.")]}], [
        {"prompt": "What color is the sky?", "messages": json.dumps(ASK), "response": "Blue."},
        {"prompt": "Hi", "messages": json.dumps([{"role": "user", "content": "Hi",
                                                  "name": "ada"}]),
         "response": "Hello, Ada."}]),
    "sft_messages": ("sft", [
        {"messages": ASK + [assistant("Blue.")]}], [
        {"prompt": "What color is the sky?", "messages": json.dumps(ASK), "response": "Blue."}]),
    "preference_explicit": ("rankings", [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}], [
        {"prompt": "The sky is", "messages": "", "responses": [" blue.", " green."],
         "ranks": [1, 2]}]),
    "preference_explicit_conversational": ("rankings", [
        {"prompt": ASK, "chosen": [assistant("It is blue.")],
         "rejected": [assistant("It is green.")]}], [
        {"prompt": "What color is the sky?", "messages": json.dumps(ASK),
         "responses": ["It is blue.", "It is green."], "ranks": [1, 2]}]),
    "preference_implicit_conversational": ("rankings", [
        {"chosen": ASK + [assistant("Blue.")], "rejected": ASK + [assistant("Green.")]},
        {"chosen": [user("2+2?"), assistant("4"), user("and 3+3?"), assistant("6")],
         "rejected": [user("2+2?"), assistant("4"), user("and 3+3?"), assistant("7")]}], [
        {"prompt": "What color is the sky?", "messages": json.dumps(ASK),
         "responses": ["Blue.", "Green."], "ranks": [1, 2]},
        {"prompt": "and 3+3?",
         "messages": json.dumps([user("2+2?"), assistant("4"), user("and 3+3?")]),
         "responses": ["6", "7"], "ranks": [1, 2]}]),
    "preference_implicit_hh": ("rankings", [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello friend",
         "rejected": "\n\nHuman: hi\n\nAssistant: go away"}], [
        {"prompt": "\n\nHuman: hi\n\nAssistant:", "messages": "",
         "responses": [" hello friend", " go away"], "ranks": [1, 2]}]),
    "prompts_conversational": ("prompts", [{"prompt": ASK}], [
        {"prompt": "What color is the sky?", "messages": json.dumps(ASK),
         "max_new_tokens": 0}]),
}


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_trl_layout_normalises_to_its_rows(layout, where, tmp_path):
    kind, rows, want = LAYOUTS[layout]
    got, report = load_rows(write(rows, where, tmp_path), kind)
    assert got == want
    assert (report.rows, report.skipped) == (len(want), 0)


def chat_tokenizer(tokenizer):
    """`tokenizer` with a small chat template (a copy: the fixture is shared)."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    return tok


def test_a_saved_conversational_preference_dataset_reaches_token_ids(tmp_path, tiny_tokenizer):
    """A `save_to_disk` folder as `data.rankings_path`: built into TFDS, its chat prompt
    formatted with the tokenizer's template, chosen and rejected replies after it."""
    rows = [{"chosen": ASK + [assistant("the movie was great")],
             "rejected": ASK + [assistant("the film was boring")]}]
    folder = write(rows, "disk", tmp_path)
    source, summary = build_dataset("rankings", folder, tmp_path / "tfds", log=None)
    assert (len(source), summary["rows"], summary["source"]) == (1, 1, str(folder))
    tok = chat_tokenizer(tiny_tokenizer)
    enc = Encoder(tok, max_prompt_length=48, max_response_length=8)
    assert enc.prompt_text(source[0]["prompt"].decode(), source[0]["messages"].decode()) == (
        "<system>Be brief.\n<user>What color is the sky?\n<assistant>")
    prompt = tok("<system>Be brief.\n<user>What color is the sky?\n<assistant>",
                 add_special_tokens=False)["input_ids"]
    pair = enc.preference_pair(source[0])
    for side, reply in (("chosen", "the movie was great"), ("rejected", "the film was boring")):
        want = prompt + tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert pair[f"{side}_ids"][:len(want)].tolist() == want
        assert pair[f"{side}_mask"].sum() == len(want)
        assert pair[f"{side}_loss_mask"].tolist() == (
            [0] * len(prompt) + [1] * (len(want) - len(prompt))
            + [0] * (enc.total_length - len(want)))


def test_a_saved_folder_is_rebuilt_when_saved_again_and_changes_the_resume_digest(tmp_path):
    rows = [{"prompt": "The sky is", "completion": " blue."}]
    folder = write(rows, "disk", tmp_path)
    source, _ = build_dataset("sft", folder, tmp_path / "tfds", log=None)
    digest = data_digest(folder)
    assert [r["response"] for r in source] == [b" blue."]
    assert data_digest(folder) == digest  # the same bytes, the same digest
    datasets.Dataset.from_list([{"prompt": "The sky is", "completion": " grey."}]).save_to_disk(
        str(tmp_path / "again"))
    for f in (tmp_path / "again").iterdir():  # the same folder, rewritten in place
        (folder / f.name).write_bytes(f.read_bytes())
    source, _ = build_dataset("sft", folder, tmp_path / "tfds", log=None)
    assert [r["response"] for r in source] == [b" grey."]
    assert data_digest(folder) != digest
    file = tmp_path / "x.jsonl"
    file.write_text('{"prompt": "a", "response": "b"}\n')
    assert data_digest(file) == file_digest(file)  # a data file's digest as before


def test_a_dataset_dict_folder_reads_its_only_split_or_names_the_splits(tmp_path):
    one = datasets.Dataset.from_list([{"prompt": "p", "completion": " c"}])
    two = datasets.Dataset.from_list([{"prompt": "q", "completion": " d"}])
    datasets.DatasetDict(train=one).save_to_disk(str(tmp_path / "one"))
    assert load_rows(tmp_path / "one", "sft")[0] == [
        {"prompt": "p", "messages": "", "response": " c"}]
    datasets.DatasetDict(train=one, test=two).save_to_disk(str(tmp_path / "two"))
    assert load_rows(tmp_path / "two" / "test", "sft")[0] == [
        {"prompt": "q", "messages": "", "response": " d"}]
    with pytest.raises(ValueError) as err:
        load_rows(tmp_path / "two", "sft")
    assert str(err.value) == (f"{tmp_path / 'two'}: a DatasetDict of splits train, test; name "
                              f"one split's folder, e.g. {tmp_path / 'two' / 'train'}")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match=r"plain: a folder, but not one written by datasets' "
                                         r"save_to_disk \(no state.json"):
        load_rows(tmp_path / "plain", "sft")


GOOD_PREF = {"prompt": ASK, "chosen": [assistant("Blue.")], "rejected": [assistant("Green.")]}


@pytest.mark.parametrize("kind, good, bad, field, why", [
    ("sft", {"prompt": ASK, "completion": [assistant("Blue.")]},
     {"prompt": ASK, "completion": [user("Blue.")]},
     "completion", "expected one assistant message, got roles ['user']"),
    ("sft", {"prompt": ASK, "completion": [assistant("Blue.")]},
     {"prompt": ASK, "completion": [assistant("Blue."), assistant("Really.")]},
     "completion", "expected one assistant message, got roles ['assistant', 'assistant']"),
    ("sft", {"prompt": ASK, "completion": [assistant("Blue.")]},
     {"prompt": [user("Hi"), assistant("Hello")], "completion": [assistant("Again")]},
     "prompt[1].role", "the prompt ends with an assistant turn"),
    ("sft", {"prompt": ASK, "completion": [assistant("Blue.")]},
     {"prompt": [user(" "), user("Hi")], "completion": [assistant("Hello")]},
     "prompt[0].content", "empty (a user turn must say something)"),
    ("rankings", GOOD_PREF, dict(GOOD_PREF, chosen=[assistant(" ")]),
     "chosen[0].content", "empty"),
    ("rankings", GOOD_PREF, dict(GOOD_PREF, rejected=[assistant("Blue.")]),
     "rejected", "identical to 'chosen'"),
    ("rankings", {"chosen": ASK + [assistant("Blue.")], "rejected": ASK + [assistant("Green.")]},
     {"chosen": [user("Hi"), assistant("Hello")], "rejected": [user("Yo"), assistant("Hey")]},
     "chosen[0]", "no 'prompt' field and no leading messages shared with 'rejected'"),
    ("rankings", {"chosen": ASK + [assistant("Blue.")], "rejected": ASK + [assistant("Green.")]},
     {"chosen": [user("Hi"), assistant("Hello")],
      "rejected": [user("Hi"), assistant("Bye"), user("Why?")]},
     "rejected[1:]", "after the 1 messages shared by 'chosen' and 'rejected' (the prompt) "
                     "expected one assistant message, got roles ['assistant', 'user']"),
    ("rankings", {"chosen": ASK + [assistant("Blue.")], "rejected": ASK + [assistant("Green.")]},
     {"chosen": ASK + [assistant("Blue.")], "rejected": ASK + [assistant("Blue.")]},
     "rejected", "identical to 'chosen'"),
])
@pytest.mark.parametrize("where", ["disk", "jsonl"])
def test_a_bad_trl_row_names_the_file_row_and_field(kind, good, bad, field, why, where,
                                                   tmp_path):
    path = write([good, bad], where, tmp_path)
    with pytest.raises(BadRow) as err:
        load_rows(path, kind)
    assert (err.value.path, err.value.line, err.value.field) == (str(path), 2, field)
    assert str(err.value).startswith(f"{path}:2: field {field!r}: {why}")
    rows, report = load_rows(path, kind, on_bad_row="skip")  # or counted, never silently
    assert (len(rows), report.skipped) == (1, 1) and report.errors == [str(err.value)]


def test_without_datasets_a_saved_folder_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    folder = write([{"prompt": "p", "completion": " c"}], "disk", tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails
    with pytest.raises(MissingExtra) as err:
        load_rows(folder, "sft")
    assert str(err.value) == (f"{folder}: reading a folder written by datasets' save_to_disk "
                              "needs the datasets package: pip install 'jrlhf[datasets]'")
    # an ImportError to Python, a ValueError to the CLI (its one error line)
    assert isinstance(err.value, ImportError) and isinstance(err.value, ValueError)


def test_iterate_appends_new_rankings_to_a_saved_folder_as_rows_that_read_back_the_same(
        tmp_path):
    rows = LAYOUTS["preference_implicit_conversational"][1]
    folder = write(rows, "disk", tmp_path)
    jsonl = tmp_path / "before.jsonl"
    jsonl.write_text(rankings_jsonl(folder))
    assert load_rows(jsonl, "rankings")[0] == load_rows(folder, "rankings")[0] == (
        LAYOUTS["preference_implicit_conversational"][2])


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    from test_readme import section_blocks

    blocks = section_blocks("## Data files (`jrlhf.data`)")
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README: Data files", "exec"), {})
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "What color is the sky? ['Blue.', 'Green.'] [1, 2]"
    rows, _ = load_rows(tmp_path / "prefs", "rankings")
    assert json.loads(rows[0]["messages"]) == ASK


@pytest.mark.slow
def test_a_dpo_stage_trains_on_a_saved_conversational_folder(tmp_path):
    """`data.rankings_path` = a `save_to_disk` folder of TRL implicit-prompt conversations: the
    stage's batches are those rows' token ids, it trains, and its resume check records the
    folder's digest."""
    import numpy as np

    from jrlhf.config import apply_overrides, load_config
    from jrlhf.report import read_metrics
    from jrlhf.stages import command_stage, open_run, run_stages, stage_batches

    words = ["great", "awful", "fine", "boring", "superb", "dull", "moving", "flat"]
    rows = [{"chosen": [user(f"Review {i}:"), assistant(f"a {words[i]} film")],
             "rejected": [user(f"Review {i}:"), assistant(f"a {words[7 - i]} film")]}
            for i in range(8)]
    folder = write(rows, "disk", tmp_path, "prefs")
    config = apply_overrides(load_config(ROOT / "configs" / "tiny.py"), [
        f"run.out_dir={tmp_path / 'run'}", "dpo.steps=2", "dpo.batch_size=2",
        f"data.rankings_path={folder}"])
    stage = command_stage("dpo")
    with open_run(config, resume=False, train=True) as run:
        want = {tuple(run.encoder.preference_pair(r)["chosen_ids"])
                for r in load_rows(folder, "rankings")[0]}
        batch = next(stage_batches(run, stage, config))
        assert {tuple(ids) for ids in np.asarray(batch["chosen_ids"])} <= want
        run_stages(run, [stage])
    metrics = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
               if r.get("stage") == "dpo"]
    assert len(metrics) == 2 and all(np.isfinite(r["dpo/loss"]) for r in metrics)
    inputs = json.loads((tmp_path / "run" / "dpo" / "inputs.json").read_text())
    assert inputs == {"rankings": data_digest(folder)}
