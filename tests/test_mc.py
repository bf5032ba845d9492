"""Multiple-choice scoring against log-probabilities computed by hand with a full forward pass."""

import json
import math

import pytest
import torch

from fed_crash.core.data import DataError
from fed_crash.core.emulator import build_emulator
from fed_crash.selection import make_spec
from fed_crash.evaluation.mc import HUB_TASKS, Fields, encode_pair, load_task, map_row, score_mc, supports_prefix_cache

ROWS = [
    {"query": "Question: name a primary color.", "choices": ["Red.", "The sky is blue and wide", "Rome"], "gold": 1},
    {"query": "Translate to French: Good morning", "choices": ["Bonjour", "Cats sleep and play."], "gold": 0},
    {"query": "Describe the sky.\n", "choices": ["Blue and wide.", "Rome is the capital of Italy", "2 + 3 = 5", "Eat well"], "gold": 0},
    {"query": "Add the numbers", "choices": ["5", "the sky"], "gold": 1},
]


def by_hand(model, tokenizer, query, choice):
    """Sum of log p(continuation token | everything before it) from one full forward pass,
    with the continuation split off the way lm-eval splits it."""
    ctx, cont = encode_pair(tokenizer, query, " " + choice)
    with torch.no_grad():
        logprobs = model(torch.tensor([ctx + cont])).logits.log_softmax(-1)[0]
    return sum(float(logprobs[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


def expected(model, tokenizer, rows):
    hits = {"acc": 0, "acc_norm": 0, "acc_bytes": 0}
    for row in rows:
        sums = [by_hand(model, tokenizer, row["query"], c) for c in row["choices"]]
        for key, norm in (("acc", lambda c: 1), ("acc_norm", len), ("acc_bytes", lambda c: len(c.encode()))):
            hits[key] += max(range(len(sums)), key=lambda i: sums[i] / norm(row["choices"][i])) == row["gold"]
    n = len(rows)  # lm-eval's stderr of a mean of 0/1 values, in closed form: sqrt(p (1 - p) / (n - 1))
    return {**{k: v / n for k, v in hits.items()}, **{f"{k}_stderr": math.sqrt(v / n * (1 - v / n) / (n - 1)) for k, v in hits.items()}}


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_scores_follow_the_summed_log_probabilities(tiny_model, tokenizer, prefix_cache):
    assert supports_prefix_cache(tiny_model)
    result = score_mc(tiny_model, tokenizer, ROWS, batch_size=5, prefix_cache=prefix_cache)
    assert {k: result[k] for k in ("acc", "acc_norm", "acc_bytes", "acc_stderr", "acc_norm_stderr", "acc_bytes_stderr")} == pytest.approx(
        expected(tiny_model, tokenizer, ROWS))
    assert result["n"] == 4


def test_cached_context_gives_the_same_sums_as_full_sequences(tiny_model, tokenizer, monkeypatch):
    """Left-padded contexts, a reused KV cache and right-padded continuations change nothing."""
    import fed_crash.evaluation.mc as mc

    seen = {}
    for cached in (True, False):
        real = mc._cached_scores if cached else mc.sequence_logprobs
        captured = []

        def spy(*args, _real=real, _captured=captured, **kw):
            out = _real(*args, **kw)
            _captured.extend(out if isinstance(out, list) else out.tolist())
            return out

        monkeypatch.setattr(mc, "_cached_scores" if cached else "sequence_logprobs", spy)
        score_mc(tiny_model, tokenizer, ROWS, batch_size=6, prefix_cache=cached)
        seen[cached] = captured
    # the two paths batch questions in different orders (by context vs by whole length)
    hand = [by_hand(tiny_model, tokenizer, r["query"], c) for r in ROWS for c in r["choices"]]
    assert sorted(seen[True]) == pytest.approx(sorted(seen[False]), abs=1e-4)
    assert sorted(seen[True]) == pytest.approx(sorted(hand), abs=1e-4)


def test_acc_and_acc_norm_disagree_when_length_matters(tiny_model, tokenizer, monkeypatch):
    """A long choice with a lower total but a higher per-character log-probability: acc picks
    the short one, acc_norm the long one."""
    import fed_crash.evaluation.mc as mc

    monkeypatch.setattr(mc, "sequence_logprobs", lambda model, batch: torch.tensor([-4.0, -6.0]))  # "ab": -2/char; 11 chars: -0.55/char
    rows = [{"query": "q", "choices": ["ab", "abcdefghijk"], "gold": 1}]
    result = score_mc(tiny_model, tokenizer, rows, batch_size=8, prefix_cache=False)
    assert result["acc"] == 0.0 and result["acc_norm"] == 1.0 and result["acc_bytes"] == 1.0


def test_acc_norm_counts_characters_and_acc_bytes_counts_bytes(tiny_model, tokenizer, monkeypatch):
    """"été" is 3 characters but 5 bytes: per character it loses, per byte it wins (as in lm-eval 0.4)."""
    import fed_crash.evaluation.mc as mc

    monkeypatch.setattr(mc, "sequence_logprobs", lambda model, batch: torch.tensor([-4.0, -4.4]))  # "été": -1.33/char, -0.8/byte; "abcd": -1.1 both
    rows = [{"query": "q", "choices": ["été", "abcd"], "gold": 0}]
    result = score_mc(tiny_model, tokenizer, rows, batch_size=8, prefix_cache=False)
    assert result["acc"] == 1.0 and result["acc_norm"] == 0.0 and result["acc_bytes"] == 1.0


def test_shared_layer_emulators_fall_back_to_full_sequences(tokenizer):
    from tests.conftest import tiny_llama

    model = tiny_llama(layers=8)
    shared = build_emulator(model, make_spec("uniform", 8, bottom=1, top=1, keep=2, share=True)).model
    assert not supports_prefix_cache(shared)
    result = score_mc(shared, tokenizer, ROWS, batch_size=4)
    assert result == pytest.approx({**expected(shared, tokenizer, ROWS), "n": 4, "seconds": result["seconds"]})


def test_encode_pair_moves_trailing_whitespace_like_lm_eval(tokenizer):
    ctx, cont = encode_pair(tokenizer, "Describe the sky.\n", " Blue")
    assert tokenizer.decode(ctx) == "Describe the sky." and tokenizer.decode(cont) == "\n Blue"
    assert ctx + cont == tokenizer("Describe the sky.\n Blue").input_ids


def test_field_mappings_turn_hub_rows_into_questions():
    arc = {"question": "Which is a gas?", "choices": {"text": ["ice", "steam", "rock"], "label": ["A", "B", "C"]}, "answerKey": "B"}
    assert map_row(arc, HUB_TASKS["arc_easy"].fields) == {"query": "Question: Which is a gas?\nAnswer:", "choices": ["ice", "steam", "rock"], "gold": 1}
    piqa = {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "shake it", "label": 0}
    assert map_row(piqa, HUB_TASKS["piqa"].fields)["choices"] == ["twist the lid", "shake it"]
    sciq = {"support": "Water boils at 100 C.", "question": "When does water boil?", "distractor1": "0 C", "distractor2": "50 C",
            "distractor3": "10 C", "correct_answer": "100 C"}
    row = map_row(sciq, HUB_TASKS["sciq"].fields)
    assert row["gold"] == 3 and row["choices"][3] == "100 C" and row["query"].startswith("Water boils")
    obqa = {"question_stem": "The sun is", "choices": {"text": ["a star", "a planet"], "label": ["A", "B"]}, "answerKey": "A"}
    assert map_row(obqa, HUB_TASKS["openbookqa"].fields)["gold"] == 0
    hella = {"activity_label": "Cooking", "ctx_a": "A man stirs a pot.", "ctx_b": "he", "endings": ["adds salt [title]", "runs"], "label": "0"}
    row = map_row(HUB_TASKS["hellaswag"].prepare(hella), HUB_TASKS["hellaswag"].fields)
    assert row == {"query": "Cooking: A man stirs a pot. He", "choices": ["adds salt. ", "runs"], "gold": 0}


def test_command_line_field_mapping_for_other_jsonl(tmp_path):
    fields = Fields.parse("query=Q: {q}\\nA:; choices=options; gold=answer; labels=letters")
    assert fields == Fields("Q: {q}\nA:", "options", "answer", "letters")
    rows = [{"q": f"item {i}", "options": ["x", "y", "z"], "letters": ["a", "b", "c"], "answer": "c"} for i in range(5)]
    (tmp_path / "other.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    task = load_task(tmp_path / "other.jsonl", fields=fields)
    assert task.name == "other" and task.rows[0] == {"query": "Q: item 0\nA:", "choices": ["x", "y", "z"], "gold": 2}
    with pytest.raises(DataError, match="line 1 does not fit the field mapping"):
        load_task(tmp_path / "other.jsonl")
    with pytest.raises(DataError, match="expected KEY=VALUE"):
        Fields.parse("question={q}")


def test_load_task_validates_rows_and_samples(tmp_path):
    good = {"query": "q", "choices": ["a", "b"], "gold": 1}
    (tmp_path / "ok.jsonl").write_text("\n".join(json.dumps(dict(good, query=str(i))) for i in range(10)))
    a, b = load_task(tmp_path / "ok.jsonl", limit=4, seed=1), load_task(tmp_path / "ok.jsonl", limit=4, seed=1)
    assert len(a.rows) == 4 and a.rows == b.rows
    (tmp_path / "bad.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(dict(good, gold=5)))
    with pytest.raises(DataError, match="line 2 does not fit.*gold 5"):
        load_task(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text("{nope")
    with pytest.raises(DataError, match="line 1 is not valid JSON"):
        load_task(tmp_path / "broken.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        load_task(tmp_path / "none.jsonl")
    with pytest.raises(DataError, match="neither a .jsonl file nor one of"):
        load_task("arc_eazy")


def test_real_eval_files_load(tmp_path):
    from tests.conftest import SHARED_DATA

    for name, n in (("arc_easy", 2376), ("arc_challenge", 1172), ("openbook_qa", 500), ("piqa", 1838)):
        assert len(load_task(SHARED_DATA / "eval" / f"{name}.jsonl").rows) == n


def test_batch_plan_keeps_questions_whole_and_pads_least():
    """PIQA-like questions (short contexts, long choices of varied length) are grouped by their
    choices, ARC-like ones (long contexts, short choices) by their contexts; every question lands
    in exactly one batch, whole."""
    from fed_crash.evaluation.mc import _padded_tokens, plan_batches

    piqa = [([1] * (3 + i % 2), [[2] * (5 + i % 7), [2] * (20 - i % 11)]) for i in range(30)]
    arc = [([1] * (40 + (i * 7) % 30), [[2] * (1 + i % 2)] * 4) for i in range(30)]
    for encoded in (piqa, arc):
        for cached in (True, False):
            groups = plan_batches(encoded, 8, cached=cached)
            assert sorted(i for g in groups for i in g) == list(range(30))
            assert all(sum(len(encoded[i][1]) for i in g) <= 8 for g in groups)
    by_context = [sorted(range(30), key=lambda i: -len(piqa[i][0]))[k:k + 4] for k in range(0, 30, 4)]
    assert _padded_tokens(piqa, plan_batches(piqa, 8, cached=True), True) < _padded_tokens(piqa, by_context, True)
    # hand count: one question, context 3 tokens, choices of 2 and 4 tokens
    one = [([1] * 3, [[2] * 2, [2] * 4])]
    assert _padded_tokens(one, [[0]], True) == 3 + 2 * 3  # context once, continuations minus their last token
    assert _padded_tokens(one, [[0]], False) == 2 * 7
