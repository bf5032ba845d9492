"""Instruction data: loading, validation with row numbers, templates, response-only labels."""

import json

import pytest

from fed_crash.core.data import IGNORE, DataError, collate, format_prompt, load_instructions, split_rows, tokenize
from tests.conftest import ALPACA, ROWS


def test_labels_cover_exactly_the_response_and_eos(tokenizer):
    row = ROWS[1]
    [ex] = tokenize([row], tokenizer, max_length=512)
    prompt = tokenizer(format_prompt(row), add_special_tokens=False).input_ids
    response = tokenizer(row["output"], add_special_tokens=False).input_ids
    assert ex.input_ids == prompt + response + [tokenizer.eos_token_id]
    assert ex.labels == [IGNORE] * len(prompt) + response + [tokenizer.eos_token_id]
    assert "### Input:\nGood morning" in format_prompt(row)
    assert "### Input" not in format_prompt(ROWS[0])


def test_truncation_and_dropping_examples_without_response(tokenizer):
    [ex] = tokenize([ROWS[6]], tokenizer, max_length=140)
    assert len(ex.input_ids) == len(ex.labels) == 140
    assert tokenize([ROWS[1], ROWS[6]], tokenizer, max_length=140) == [ex]  # ROWS[1]'s prompt alone fills 140: dropped
    with pytest.raises(DataError, match="max-length 100: the prompt of every one of the 1 examples fills it"):
        tokenize([ROWS[6]], tokenizer, max_length=100)  # nothing left: a loss over no token would read 0


def test_collate_pads_and_masks(tokenizer):
    examples = tokenize(ROWS[:2], tokenizer, max_length=512)
    batch = collate(examples, pad_id=0)
    short = min(range(2), key=lambda i: len(examples[i].input_ids))
    n = len(examples[short].input_ids)
    assert batch["attention_mask"][short, n:].sum() == 0
    assert (batch["labels"][short, n:] == IGNORE).all()


def test_load_json_and_jsonl(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS[:3]))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[:3]) + "\n\n")
    assert load_instructions(tmp_path / "a.json") == load_instructions(tmp_path / "a.jsonl") == ROWS[:3]


@pytest.mark.parametrize("bad,problem", [
    ({"instruction": "x"}, "row 2: missing field 'output'"),
    ({"instruction": 3, "output": "y"}, "row 2: field 'instruction' must be a string, got int"),
    ({"instruction": " ", "output": "y"}, "row 2: empty 'instruction'"),
    ({"instruction": "x", "input": ["a"], "output": "y"}, "row 2: field 'input' must be a string"),
    (["not", "an", "object"], "row 2: expected an object, got list"),
])
def test_malformed_rows_name_their_number(tmp_path, bad, problem):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(ROWS[:2] + [bad] + ROWS[:1]))
    with pytest.raises(DataError, match=problem):
        load_instructions(path)
    assert len(load_instructions(path, skip_malformed=True)) == 3


def test_unreadable_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_instructions(tmp_path / "missing.json")
    (tmp_path / "broken.jsonl").write_text(json.dumps(ROWS[0]) + "\n{oops\n")
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_instructions(tmp_path / "broken.jsonl")
    (tmp_path / "dict.json").write_text("{}")
    with pytest.raises(DataError, match="expected a JSON list"):
        load_instructions(tmp_path / "dict.json")


def test_chat_template_needs_one(tokenizer):
    with pytest.raises(DataError, match="needs a tokenizer with a chat template"):
        format_prompt(ROWS[0], "chat", tokenizer)


def test_split_rows_is_disjoint_and_stable():
    rows = [{"instruction": str(i), "input": "", "output": "o"} for i in range(50)]
    a = split_rows(rows, {"eval": 10, "train": 20}, seed=1)
    b = split_rows(rows, {"eval": 10, "train": 30}, seed=1)
    assert a["eval"] == b["eval"]
    assert not {r["instruction"] for r in a["eval"]} & {r["instruction"] for r in a["train"]}
    with pytest.raises(DataError, match="only 50"):
        split_rows(rows, {"eval": 40, "train": 20})


def test_the_real_alpaca_file_loads():
    rows = load_instructions(ALPACA)
    assert len(rows) == 52002
    assert set(rows[0]) == {"instruction", "input", "output"}
