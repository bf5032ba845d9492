"""Instruction metrics, the four-model table and the adapter-interpolation landscape."""

import pytest
import torch

from fed_crash.config import DataConfig
from fed_crash.core.data import pad_id, tokenize
from fed_crash.core.emulator import adapter_state
from fed_crash.selection import make_spec
from fed_crash.evaluation.report import generate, interpolate_adapters, markdown_table, rouge_l
from fed_crash.core.train import evaluate
from tests.conftest import ROWS, tiny_llama


def test_interpolation_end_points_are_the_two_adapter_sets_own_losses(tokenizer):
    model = tiny_llama(layers=6)
    spec = make_spec("uniform", 6, bottom=1, top=1, keep=2)
    a = adapter_state(model, spec)
    torch.manual_seed(1)
    b = {k: v + 0.05 * torch.randn_like(v) for k, v in a.items()}
    examples = tokenize(ROWS[:8], tokenizer, max_length=256)
    pad = pad_id(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    curve = interpolate_adapters(model, a, b, examples, pad, points=5, progress=False)
    assert [p["t"] for p in curve] == [0, 0.25, 0.5, 0.75, 1]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # restored
    own_a = evaluate(model, examples, pad, progress=False)["loss"]
    model.load_state_dict({**before, **b})
    own_b = evaluate(model, examples, pad, progress=False)["loss"]
    assert curve[0]["loss"] == pytest.approx(own_a, abs=1e-6)
    assert curve[-1]["loss"] == pytest.approx(own_b, abs=1e-6)
    assert own_a != pytest.approx(own_b, abs=1e-4)  # the two sets really differ


def test_interpolation_rejects_mismatched_adapter_sets():
    model = tiny_llama(layers=6)
    a = adapter_state(model, make_spec("uniform", 6, bottom=1, top=1, keep=2))
    b = dict(a)
    b.pop(next(iter(b)))
    with pytest.raises(ValueError, match="adapters lack 1 tensors that adapter set A expects"):
        interpolate_adapters(model, a, b, [], 0, points=3, progress=False)


def test_rouge_l_against_a_hand_computed_value():
    # LCS "the cat sat" = 3 tokens; precision 3/3, recall 3/6 -> F = 2 * 1 * 0.5 / 1.5
    assert rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert rouge_l("", "anything") == 0.0


def test_greedy_generation_answers_every_prompt_and_keeps_padding_side(tokenizer):
    model = tiny_llama(layers=2)
    side = tokenizer.padding_side
    answers = generate(model, tokenizer, ROWS[:3], DataConfig(max_length=256), max_new_tokens=4, batch_size=2)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert tokenizer.padding_side == side
    # greedy is deterministic, and batching does not change an answer
    assert generate(model, tokenizer, ROWS[:1], DataConfig(max_length=256), max_new_tokens=4)[0] == answers[0]


def test_markdown_table_has_one_row_per_model():
    scores = {"tasks": {"arc": {"acc": 0.5, "acc_norm": 0.25}}, "instruct": {"loss": 2.0, "ppl": 7.389, "rougeL": 0.3}}
    table = markdown_table({"full_zero_shot": scores, "plug_in": scores}).splitlines()
    assert table[0] == "| model | arc acc | arc acc_norm | loss | ppl | ROUGE-L |"
    assert table[2] == "| full_zero_shot | 50.00 | 25.00 | 2.0000 | 7.39 | 0.3000 |"
    assert len(table) == 4
