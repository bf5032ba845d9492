"""The full-lora baseline's LoRA: a fresh wrap changes nothing, the exchange format folds the
scaling into B so the full model takes a client's update knowing only the rank, merging gives the
same model, and ``tune --method full-lora`` trains LoRA alone."""

from __future__ import annotations

import json

import pytest
import torch

from fed_crash.core.emulator import build_emulator, plug_in
from fed_crash.core.lora import add_lora, lora_parameters, lora_state, merge_lora
from fed_crash.selection import make_spec
from tests.conftest import tiny_llama


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_lora_starts_as_the_model_and_merges_into_the_same_model(tiny_model):
    ids = torch.randint(0, 300, (2, 10))
    before = _logits(tiny_model, ids)
    add_lora(tiny_model, rank=4, alpha=8)
    params = lora_parameters(tiny_model)
    assert params and all(p.shape[0] == 4 or p.shape[1] == 4 for p in params)
    assert torch.equal(_logits(tiny_model, ids), before)  # B = 0
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.2)
    hooked = _logits(tiny_model, ids)
    assert not torch.allclose(hooked, before, atol=1e-3)
    merge_lora(tiny_model)
    assert not lora_parameters(tiny_model) and not any("lora" in k for k in tiny_model.state_dict())
    assert torch.allclose(_logits(tiny_model, ids), hooked, atol=1e-4)


def test_the_full_model_takes_a_clients_lora_at_the_clients_scaling():
    """A client trains with alpha / rank = 4; what it sends, plugged into the server's full model
    (which knows only the rank), computes what the client's model computes."""
    model = tiny_llama()
    spec = make_spec("full-lora", 8)
    assert (spec.bottom, spec.top, spec.kept, spec.removed) == (0, 0, tuple(range(8)), ())
    spec = type(spec)(**{**spec.__dict__, "lora_rank": 2, "lora_alpha": 8})
    emulator = build_emulator(model, spec)
    assert {p.data_ptr() for p in emulator.trainable_parameters()} == {p.data_ptr() for p in emulator.model.parameters() if p.requires_grad}
    with torch.no_grad():
        for p in emulator.trainable_parameters():
            p.normal_(0, 0.3)
    ids = torch.randint(0, 300, (2, 10))
    sent = emulator.adapter_state()
    assert all(k.endswith((".lora_A", ".lora_B")) for k in sent)
    plug_in(model, sent)
    assert torch.allclose(_logits(model, ids), _logits(emulator.model, ids), atol=1e-5)
    plug_in(model, sent)  # a second round's plug-in copies again: the same model
    assert torch.allclose(_logits(model, ids), _logits(emulator.model, ids), atol=1e-5)
    emulator.load_adapters(sent)  # and the round trip through the exchange format is exact
    assert all(torch.equal(a, b) for a, b in zip(emulator.adapter_state().values(), sent.values()))
    with pytest.raises(Exception, match="shape"):
        plug_in(model, {k: v[:1] if k.endswith("lora_A") else v for k, v in sent.items()})


def test_tune_method_full_lora_trains_lora_alone(tiny_model_dir, data_file, tmp_path):
    from fed_crash.tools.cli import main

    out = tmp_path / "lora"
    assert main(["tune", "--model", str(tiny_model_dir), "--data", str(data_file), "--method", "full-lora", "--full-lora-rank", "4",
                 "--full-lora-alpha", "8", "--steps", "10", "--lr", "3e-3", "--train-examples", "24", "--eval-examples", "8",
                 "--out", str(out), "--no-progress", "--compute-dtype", "fp32"]) in (0, None)
    report = json.loads((out / "report.json").read_text())
    assert report["spec"]["lora_rank"] == 4 and report["spec"]["bottom"] == report["spec"]["top"] == 0
    model = tiny_llama()
    add_lora(model, 4, 8)
    assert report["training"]["trainable"] == sum(p.numel() for p in lora_parameters(model))
    assert report["emulator_zero_shot"]["loss"] == pytest.approx(report["full_zero_shot"]["loss"], abs=1e-6)
    assert report["emulator_fine_tuned"]["loss"] == pytest.approx(report["plug_in"]["loss"], abs=1e-5)
    assert report["plug_in"]["loss"] < report["full_zero_shot"]["loss"]


@pytest.mark.parametrize("method", ["full", "full-lora"])
def test_the_baselines_run_federated_and_count_their_bytes(method, tmp_path, tokenizer, monkeypatch, server_identity):
    """Both baselines through the app's server and clients (in process): the whole model goes
    down once; full-lora's rounds carry LoRA matrices only (and their names: a tiny model's are 28% of its message)."""
    from flwr.app import Context, RecordDict

    from alpaca.server_app import main
    from tests.conftest import LocalGrid, write_run_files

    run_files = write_run_files(tmp_path / "files", tokenizer, copies=2)
    monkeypatch.setenv("FED_CRASH_NODE_CACHE", str(tmp_path / "nodes"))
    config = {"model": str(run_files / "model"), "data": str(run_files / "rows.jsonl"), "results-dir": str(tmp_path / "results"),
              "run-name": method, "eval-examples": 8, "num-server-rounds": 2, "min-available-nodes": 2, "emulator.method": method,
              "emulator.full-lora-rank": 4, "emulator.full-lora-alpha": 8, "train.steps": 4, "train.lr": 0.01, "save-model": True,
              "compute-dtype": "fp32"}
    main(LocalGrid(2, run_config=config), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    folder = tmp_path / "results" / method
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [len(line["clients"]) for line in lines] == [0, 2, 2] and not any(line["failures"] for line in lines)
    assert lines[2]["server"]["plugin_loss"] < lines[0]["server"]["plugin_loss"]
    model = tiny_llama()
    layer_bytes = sum(t.numel() * 4 for k, t in model.state_dict().items() if k.startswith("model.layers."))
    assert lines[1]["emulator_bytes_down"] >= 2 * (layer_bytes if method == "full-lora" else layer_bytes * 4 // 8)
    if method == "full-lora":
        add_lora(model, 4, 8)
        lora_bytes = sum(p.numel() * 4 for p in lora_parameters(model))
        assert all(lora_bytes <= n < lora_bytes * 1.5 for n in lines[2]["bytes_up_per_client"].values())
        adapters = json.loads((folder / "emulator" / "emulator.json").read_text())["spec"]
        assert adapters["lora_rank"] == 4 and adapters["method"] == "full-lora"
    # the saved plug-in model is a plain model (full-lora's LoRA merged into its weights)
    from safetensors.torch import load_file

    saved = load_file(next((folder / "plugin-model").glob("*.safetensors")))
    assert not any("lora" in k for k in saved)
