"""Linear CKA and pooling against hand-computed values."""

import math

import pytest
import torch

from fed_crash.selection.cka import cka_matrix, layer_features, linear_cka, pool
from fed_crash.core.data import batches, pad_id, tokenize
from tests.conftest import ROWS


def test_cka_of_a_representation_with_itself_is_one():
    x = torch.randn(20, 7)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    x, y = torch.randn(30, 6, dtype=torch.float64), torch.randn(30, 5, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    base = linear_cka(x, y)
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(3.7 * x, 0.2 * y) == pytest.approx(base, abs=1e-10)


def test_cka_is_not_invariant_to_anisotropic_scaling():
    x, y = torch.randn(30, 4), torch.randn(30, 4)
    assert linear_cka(x * torch.tensor([10.0, 1, 1, 1]), y) != pytest.approx(linear_cka(x, y), abs=1e-3)


def test_cka_worked_examples():
    # 1-D: CKA is the squared Pearson correlation. x_c = [-1, 0, 1], y_c = [0, -1, 1]:
    # (y.x)^2 / (|x|^2 |y|^2) = 1 / (2 * 2) = 0.25
    assert linear_cka(torch.tensor([[1.0], [2], [3]]), torch.tensor([[1.0], [0], [2]])) == pytest.approx(0.25)
    # 2-D, already centred: Y^T X = [2, 0] -> 4; ||X^T X||_F = sqrt(8); ||Y^T Y||_F = 2
    x = torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1]])
    y = torch.tensor([[1.0], [-1], [0], [0]])
    assert linear_cka(x, y) == pytest.approx(4 / (math.sqrt(8) * 2))


def test_cka_matrix_matches_pairwise_cka():
    feats = [torch.randn(16, 8) for _ in range(4)]
    feats.append(feats[0] * 2)  # a scaled copy is perfectly similar
    matrix = cka_matrix(feats)
    for i in range(5):
        for j in range(5):
            assert float(matrix[i, j]) == pytest.approx(linear_cka(feats[i], feats[j]), abs=1e-9)
    assert float(matrix[0, 4]) == pytest.approx(1.0)
    assert torch.allclose(matrix, matrix.T)


def test_pooling_by_hand():
    hidden = torch.tensor([[[1.0], [2.0], [3.0], [100.0]]])  # last position is padding
    mask = torch.tensor([[1, 1, 1, 0]])
    assert pool(hidden, mask, "mean").item() == pytest.approx(2.0)
    assert pool(hidden, mask, "last").item() == pytest.approx(3.0)
    assert pool(hidden, mask, "weighted").item() == pytest.approx((1 * 1 + 2 * 2 + 3 * 3) / 6)
    assert pool(hidden, mask, "mean", skip_first=1).item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(hidden, mask, "max")


def test_layer_features_have_one_matrix_per_layer(tiny_model, tokenizer):
    examples = tokenize(ROWS[:6], tokenizer, max_length=256)
    feats = layer_features(tiny_model, batches(examples, 4, pad_id(tokenizer)), progress=False)
    assert len(feats) == 8
    assert all(f.shape == (6, 32) for f in feats)
    # The layers' raw outputs (hooks), not the embedding output: layer features differ.
    assert not torch.allclose(feats[0], feats[1])


def test_sink_exclusion_changes_pooled_vectors_only_through_the_excluded_positions():
    """Left out: the first real token (left or right padding) and, when asked, positions with an
    outlier norm. Changing those states leaves the pool as it was; the rest is a plain mean."""
    hidden = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]])  # right- and left-padded
    pooled = pool(hidden, mask, "mean", skip_first=1)
    assert torch.allclose(pooled[0], hidden[0, 1:4].mean(0)) and torch.allclose(pooled[1], hidden[1, 2:5].mean(0))
    changed = hidden.clone()
    changed[0, 0] += 1000.0
    changed[1, 1] += 1000.0  # each sample's first real token, made a sink
    assert torch.allclose(pool(changed, mask, "mean", skip_first=1), pooled)
    assert not torch.allclose(pool(changed, mask, "mean"), pool(hidden, mask, "mean"))
    # an outlier in the middle: left out by norm, the other positions untouched
    sink = hidden.clone()
    sink[0, 2] = 500.0
    expected = hidden[0, [1, 3]].mean(0)
    assert torch.allclose(pool(sink, mask, "mean", skip_first=1, outlier=10.0)[0], expected)
    assert torch.allclose(pool(hidden, mask, "mean", skip_first=1, outlier=10.0), pooled)  # no outliers: no change


def test_similarity_cache_returns_the_computed_matrix_and_is_keyed_by_what_it_depends_on(tiny_model, tokenizer, tmp_path):
    """A second call with the same model, rows and pooling reads the cache (no forward pass);
    other pooling settings or other weights compute afresh."""
    from fed_crash.config import DataConfig, EmulatorConfig
    from fed_crash.core.models import get_layers
    from fed_crash.selection.plan import layer_similarity

    data, emu = DataConfig(data="unused", max_length=256), EmulatorConfig(method="crash", calib_batch_size=4)
    forwards = []
    get_layers(tiny_model)[0].register_forward_pre_hook(lambda *_: forwards.append(1))
    first = layer_similarity(tiny_model, tokenizer, ROWS[:8], data, emu, progress=False, cache=tmp_path)
    calls = len(forwards)
    assert calls > 0 and len(list((tmp_path / "similarity").glob("*.safetensors"))) == 1
    again = layer_similarity(tiny_model, tokenizer, ROWS[:8], data, emu, progress=False, cache=tmp_path)
    assert len(forwards) == calls and torch.equal(again, first)
    assert torch.equal(layer_similarity(tiny_model, tokenizer, ROWS[:8], data, emu, progress=False), first)  # uncached: same values
    from dataclasses import replace

    layer_similarity(tiny_model, tokenizer, ROWS[:8], data, replace(emu, skip_first=0), progress=False, cache=tmp_path)
    layer_similarity(tiny_model, tokenizer, ROWS[:6], data, emu, progress=False, cache=tmp_path)
    with torch.no_grad():
        next(tiny_model.parameters()).add_(0.01)
    layer_similarity(tiny_model, tokenizer, ROWS[:8], data, emu, progress=False, cache=tmp_path)
    assert len(list((tmp_path / "similarity").glob("*.safetensors"))) == 4
