"""Emulator search on tiny models: the divergence it minimises, its greedy steps, and what it keeps."""

import pytest
import torch

from fed_crash.core.data import batches, pad_id, tokenize
from fed_crash.core.emulator import build_emulator
from fed_crash.selection import make_spec
from fed_crash.selection.search import Probe, layer_sequence, search_kept
from tests.conftest import ROWS, tiny_llama


@pytest.fixture
def calibration(tokenizer):
    return list(batches(tokenize(ROWS[:8], tokenizer, max_length=256), 4, pad_id(tokenizer)))


@pytest.mark.parametrize("divergence", ["kl", "mse"])
def test_an_emulator_equal_to_the_full_model_has_zero_divergence(tiny_model, calibration, divergence):
    probe = Probe(tiny_model, calibration, divergence)
    full = make_spec("uniform", 8, bottom=1, top=1, keep=6, share=False)
    assert layer_sequence(full) == tuple(range(8))
    assert probe(layer_sequence(full)) == pytest.approx(0.0, abs=1e-6)
    assert probe(layer_sequence(make_spec("uniform", 8, bottom=1, top=1, keep=2, share=False))) > 1e-5


def test_the_probe_matches_a_real_emulator_and_reuses_the_shared_prefix(tokenizer, calibration):
    """KL measured from cached states equals KL computed from a built emulator's own forward,
    whether the candidate shares a prefix with the accepted sequence or not."""
    model = tiny_llama()
    probe = Probe(model, calibration)
    spec = make_spec("uniform", 8, bottom=1, top=1, keep=3, share=True)
    emulator = build_emulator(model, spec)
    total, tokens = 0.0, 0
    for batch in calibration:
        torch.set_grad_enabled(False)
        where = batch["labels"][:, 1:] != -100
        p = torch.log_softmax(model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits[:, :-1][where].float(), -1)
        q = torch.log_softmax(emulator.model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits[:, :-1][where].float(), -1)
        total += float((p.exp() * (p - q)).sum())
        tokens += int(where.sum())
    torch.set_grad_enabled(True)
    assert probe(layer_sequence(spec)) == pytest.approx(total / tokens, rel=1e-4)
    probe.accept(layer_sequence(make_spec("uniform", 8, bottom=1, top=1, keep=4, share=True)))
    assert probe(layer_sequence(spec)) == pytest.approx(total / tokens, rel=1e-4)


def identity_except(model, special: int, layers: range):
    """Zero the output projections of ``layers`` except ``special``: those layers pass their
    input through unchanged (residual only)."""
    with torch.no_grad():
        for i in layers:
            if i != special:
                model.model.layers[i].self_attn.o_proj.weight.zero_()
                model.model.layers[i].mlp.down_proj.weight.zero_()
    return model


def test_search_keeps_the_only_layer_that_does_something(calibration):
    model = identity_except(tiny_llama(seed=1), special=5, layers=range(1, 7))
    probe = Probe(model, calibration)
    starts = [make_spec("uniform", 8, bottom=1, top=1, keep=3, share=False)]  # keeps 1, 3, 6 (or thereabouts)
    assert 5 not in starts[0].kept
    spec, steps = search_kept(probe, starts, max_evaluations=50)
    assert 5 in spec.kept and spec.method == "search"
    assert steps[-1]["divergence"] == pytest.approx(0.0, abs=1e-6)
    divergences = [s["divergence"] for s in steps]
    assert divergences == sorted(divergences, reverse=True) and len(steps) >= 2  # greedy never goes up


def test_search_is_deterministic_and_respects_the_cap(tiny_model, calibration):
    starts = [make_spec("uniform", 8, bottom=1, top=1, keep=3, share=True)]
    first = search_kept(Probe(tiny_model, calibration), starts, max_evaluations=7)
    again = search_kept(Probe(tiny_model, calibration), starts, max_evaluations=7)
    assert first[0] == again[0] and first[1] == again[1]
    assert first[1][-1]["evaluations"] <= 7
    for step in first[1][1:]:  # each step moves one kept layer by one position, inside the middle, no collisions
        before, after = set(first[1][first[1].index(step) - 1]["kept"]), set(step["kept"])
        (old,), (new,) = before - after, after - before
        assert abs(old - new) == 1 and 1 <= new <= 6 and len(after) == 3


@pytest.mark.parametrize("divergence", ["kl", "mse"])
def test_a_bound_stops_an_evaluation_only_once_it_cannot_come_under_it(tiny_model, calibration, divergence, monkeypatch):
    """The search's early stop is exact: under the bound, the full value; once the batches done
    reach the bound, a value at least the bound, computed on fewer batches."""
    probe = Probe(tiny_model, calibration, divergence)
    sequence = layer_sequence(make_spec("uniform", 8, bottom=1, top=1, keep=2, share=False))
    value = probe(sequence)
    assert probe(sequence, bound=value * 1.001) == pytest.approx(value, rel=1e-6)  # needs every batch to know
    runs = []
    original = probe._run
    monkeypatch.setattr(probe, "_run", lambda *a, **k: runs.append(a[1]) or original(*a, **k))
    stopped = probe(sequence, bound=value / 100)
    assert stopped >= value / 100 and stopped <= value + 1e-9
    assert len(runs) < len(calibration)  # the later batches were not run


def test_accepting_the_sequence_just_evaluated_reuses_its_states(tiny_model, calibration, monkeypatch):
    """Accepting what was just measured in full runs nothing, and later values are what a
    fresh probe accepting the same sequence gives."""
    probe, fresh = Probe(tiny_model, calibration), Probe(tiny_model, calibration)
    spec = make_spec("uniform", 8, bottom=1, top=1, keep=3, share=True)
    other = make_spec("uniform", 8, bottom=1, top=1, keep=2, share=True)
    probe(layer_sequence(spec))
    runs = []
    original = probe._run
    monkeypatch.setattr(probe, "_run", lambda *a, **k: runs.append(a[1]) or original(*a, **k))
    probe.accept(layer_sequence(spec))
    assert runs == []
    fresh.accept(layer_sequence(spec))
    assert probe(layer_sequence(other)) == pytest.approx(fresh(layer_sequence(other)), rel=1e-6)
    probe(layer_sequence(other), bound=0.0)  # stopped early: its states are not kept, so accepting it runs again
    probe.accept(layer_sequence(other))
    assert len(runs) > len(calibration)
