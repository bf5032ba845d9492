"""Multiple-choice scoring against log-probabilities computed by hand with a full forward pass."""

import json

import pytest
import torch

from fed_crash.data import DataError
from fed_crash.mc import load_mc, score_mc


def by_hand(model, tokenizer, query, choice):
    ctx = tokenizer(query, add_special_tokens=False).input_ids
    cont = tokenizer(" " + choice, add_special_tokens=False).input_ids
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = model(ids).logits.log_softmax(-1)[0]
    return sum(float(logprobs[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


def test_acc_and_acc_norm_follow_the_summed_log_probabilities(tiny_model, tokenizer):
    rows = [{"query": "Question: name a primary color.", "choices": ["Red.", "The sky is blue and wide", "Rome"], "gold": 1},
            {"query": "Translate to French: Good morning", "choices": ["Bonjour", "Cats sleep and play."], "gold": 0}]
    result = score_mc(tiny_model, tokenizer, rows, pad_id=0, batch_size=2)
    acc = acc_norm = 0
    for row in rows:
        sums = [by_hand(tiny_model, tokenizer, row["query"], c) for c in row["choices"]]
        lengths = [len((" " + c).encode()) for c in row["choices"]]
        acc += max(range(len(sums)), key=sums.__getitem__) == row["gold"]
        acc_norm += max(range(len(sums)), key=lambda i: sums[i] / lengths[i]) == row["gold"]
    assert result == {"acc": acc / 2, "acc_norm": acc_norm / 2, "n": 2}


def test_acc_and_acc_norm_disagree_when_length_matters(tiny_model, tokenizer, monkeypatch):
    """A long choice with a lower total but a higher per-byte log-probability: acc picks the
    short one, acc_norm the long one."""
    import fed_crash.mc as mc

    scores = iter([[-4.0, -6.0]])  # short " ab" (3 bytes): -4; long (12 bytes): -6
    monkeypatch.setattr(mc, "sequence_logprobs", lambda model, batch: torch.tensor(next(scores)))
    rows = [{"query": "q", "choices": ["ab", "abcdefghijk"], "gold": 1}]
    result = score_mc(tiny_model, tokenizer, rows, pad_id=0, batch_size=8)
    assert result["acc"] == 0.0 and result["acc_norm"] == 1.0


def test_load_mc_validates_rows(tmp_path):
    good = {"query": "q", "choices": ["a", "b"], "gold": 1}
    (tmp_path / "ok.jsonl").write_text("\n".join(json.dumps(dict(good, query=str(i))) for i in range(10)))
    assert len(load_mc(tmp_path / "ok.jsonl", limit=4, seed=1)) == 4
    (tmp_path / "bad.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(dict(good, gold=5)))
    with pytest.raises(DataError, match="line 2: expected"):
        load_mc(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        load_mc(tmp_path / "none.jsonl")
