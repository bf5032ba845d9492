"""Emulator files: round trip, no removed layer on disk, hash check, adapters and plug-in."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fed_crash.core.artifacts import ADAPTERS, MANIFEST, WEIGHTS, ArtifactError, load_adapters, load_emulator, save_adapters, save_emulator
from fed_crash.core.emulator import AdapterError, EmulatorSpec, build_emulator, plug_in
from fed_crash.core.models import get_layers, layer_path


def tensor_hashes(state):
    return {hash(t.detach().contiguous().numpy().tobytes()) for t in state.values()}


@pytest.mark.parametrize("share,edge_fill", [(True, "nearest"), (False, "nearest"), (True, "adapter")])
def test_round_trip_gives_the_same_model(tiny_model, tokenizer, tmp_path, share, edge_fill):
    spec = EmulatorSpec(8, 2, 2, kept=(3, 5), share=share, edge_fill=edge_fill)
    save_emulator(tmp_path, tiny_model, tokenizer, spec, source_id="tiny")
    loaded, tok, manifest = load_emulator(tmp_path)
    in_memory = build_emulator(tiny_model, spec)
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, in_memory.model(ids).logits)
    assert len(get_layers(loaded.model)) == len(spec.layer_map())
    assert manifest["spec"] == spec.to_dict()
    assert tok.eos_token == "<eos>"


def test_emulator_file_holds_kept_layers_only(tiny_model, tokenizer, tmp_path):
    spec = EmulatorSpec(8, 2, 2, kept=(3, 5))
    save_emulator(tmp_path, tiny_model, tokenizer, spec, source_id="tiny")
    weights, adapters = load_file(tmp_path / WEIGHTS), load_file(tmp_path / ADAPTERS)
    prefix = layer_path(tiny_model)
    layers_in_file = {int(k[len(prefix) + 1:].split(".")[0]) for k in weights if k.startswith(prefix + ".")}
    assert layers_in_file == {3, 5}
    assert {int(k[len(prefix) + 1:].split(".")[0]) for k in adapters} == {0, 1, 6, 7}
    # No weight matrix of a removed layer (2, 4) appears anywhere, under any name (norms are
    # left out: freshly initialised, they are all ones in every layer).
    full = tiny_model.state_dict()
    removed = {k: v for k, v in full.items() if k.startswith((f"{prefix}.2.", f"{prefix}.4.")) and v.dim() == 2}
    shipped = tensor_hashes(weights) | tensor_hashes(adapters)
    assert not tensor_hashes(removed) & shipped
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert [e["source"] for e in manifest["layer_map"]] == [0, 1, 3, 3, 5, 5, 6, 7]
    assert manifest["sharing_map"] == {"2": 3, "4": 5}


def test_a_tampered_emulator_file_is_refused(tiny_model, tokenizer, tmp_path):
    save_emulator(tmp_path, tiny_model, tokenizer, EmulatorSpec(8, 2, 2, kept=(3,)), source_id="tiny")
    state = load_file(tmp_path / WEIGHTS)
    state = {k: v + 1 for k, v in state.items()}
    save_adapters(tmp_path / WEIGHTS, state)
    with pytest.raises(ArtifactError, match="does not match the hash"):
        load_emulator(tmp_path)
    with pytest.raises(ArtifactError, match="not an emulator folder"):
        load_emulator(tmp_path / "nowhere")


def test_plug_in_writes_tuned_adapters_at_their_original_indices(tiny_model):
    spec = EmulatorSpec(8, 2, 2, kept=(4,), share=False)  # depth 5: positions differ from indices
    emulator = build_emulator(tiny_model, spec)
    with torch.no_grad():
        for p in emulator.trainable_parameters():
            p.add_(1.0)
    adapters = emulator.adapter_state()
    assert sorted({k.split(".")[2] for k in adapters}, key=int) == ["0", "1", "6", "7"]
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    plug_in(tiny_model, adapters)
    after = tiny_model.state_dict()
    prefix = layer_path(tiny_model)
    for key in before:
        changed = not torch.equal(before[key], after[key])
        is_adapter = key.startswith(tuple(f"{prefix}.{i}." for i in (0, 1, 6, 7)))
        assert changed == is_adapter, key


@pytest.mark.parametrize("mutate,match", [
    (lambda a, k: a.pop(k), "adapters lack 1 tensors"),
    (lambda a, k: a.__setitem__(k, a[k][..., :-1].clone()), "has shape"),
    (lambda a, k: a.__setitem__(k, a[k].double()), "has dtype torch.float64"),
    (lambda a, k: a.__setitem__(k, a[k] * float("nan")), "NaN"),
])
def test_plug_in_mismatches_name_the_tensor(tiny_model, mutate, match):
    emulator = build_emulator(tiny_model, EmulatorSpec(8, 2, 2, kept=(4,)))
    adapters = emulator.adapter_state()
    key = sorted(k for k in adapters if k.endswith("weight") and adapters[k].dim() == 2)[0]
    mutate(adapters, key)
    with pytest.raises(AdapterError, match=match):
        emulator.load_adapters(adapters)
    if "lack" not in match:  # plug-in reads the expected set from the adapters themselves
        with pytest.raises(AdapterError, match=key.replace(".", r"\.")):
            plug_in(tiny_model, adapters)


def test_adapters_from_another_model_are_refused(tmp_path):
    from tests.conftest import tiny_gpt2, tiny_llama

    llama, gpt2 = tiny_llama(), tiny_gpt2()
    adapters = build_emulator(gpt2, EmulatorSpec(8, 2, 2, kept=(4,))).adapter_state()
    with pytest.raises(AdapterError, match="names no decoder layer"):
        plug_in(llama, adapters)
    deeper = build_emulator(tiny_llama(layers=12), EmulatorSpec(12, 2, 2, kept=(4,))).adapter_state()
    with pytest.raises(AdapterError, match="names no decoder layer"):
        plug_in(llama, deeper)
    path = save_adapters(tmp_path / "a.safetensors", adapters)
    assert set(load_adapters(path)) == set(adapters)
    with pytest.raises(ArtifactError, match="does not exist"):
        load_adapters(tmp_path / "missing.safetensors")
