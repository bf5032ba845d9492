"""Model loading from local folders and checkpoints, layer discovery, clear errors."""

import pytest
import torch
from torch import nn
from transformers import OPTConfig, OPTForCausalLM

from fed_crash.core.models import ModelError, get_layers, layer_path, load_model, state_hash
from tests.conftest import tiny_gpt2, tiny_llama


def test_layer_paths_of_supported_families():
    assert layer_path(tiny_llama()) == "model.layers"
    assert layer_path(tiny_gpt2()) == "transformer.h"
    opt = OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, ffn_dim=32, num_attention_heads=2, word_embed_proj_dim=16))
    assert layer_path(opt) == "model.decoder.layers"
    assert len(get_layers(opt)) == 3


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ModelError, match="unsupported architecture Sequential"):
        layer_path(nn.Sequential(nn.Linear(2, 2)))


def test_load_local_folder_and_safetensors_file(tiny_model_dir):
    folder = load_model(str(tiny_model_dir))
    single = load_model(str(tiny_model_dir / "model.safetensors"))
    ids = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        assert torch.equal(folder.model(ids).logits, single.model(ids).logits)
    assert state_hash(folder.model.state_dict()) == state_hash(single.model.state_dict())
    assert folder.tokenizer.eos_token == "<eos>"


def test_missing_and_unusable_paths(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="needs config.json beside it"):
        load_model(str(tmp_path / "w.safetensors"))


def test_hub_names_fail_clearly_and_at_once_offline(monkeypatch):
    """No hub: the model comes only from the local hub cache, without the hub client's retries;
    a dataset or task name fails before ``datasets`` is asked."""
    import time

    from fed_crash.core.data import DataError, load_instructions
    from fed_crash.evaluation.mc import load_task

    monkeypatch.setattr("fed_crash.core.hub.hub_reachable", lambda: False)
    start = time.monotonic()
    with pytest.raises(ModelError, match="hub did not answer"):
        load_model("no-such-org/no-such-model-xyz")
    with pytest.raises(DataError, match="'someone/dataset'.*hub is unreachable"):
        load_instructions("someone/dataset")
    with pytest.raises(DataError, match="task 'arc_easy': the hub is unreachable"):
        load_task("arc_easy")
    assert time.monotonic() - start < 20  # the retries took about 45 s


def test_state_hash_sees_every_tensor():
    a, b = tiny_llama(seed=0), tiny_llama(seed=0)
    assert state_hash(a.state_dict()) == state_hash(b.state_dict())
    with torch.no_grad():
        b.model.norm.weight[0] += 1e-3
    assert state_hash(a.state_dict()) != state_hash(b.state_dict())


def test_the_gguf_cache_is_keyed_by_content_not_by_path(tmp_path, tiny_model_dir):
    """A reinstalled wheel (same GGUF bytes, new path and time) reuses the de-quantized cache;
    other bytes at the same path do not. The cache folder is filled by hand here (the bytes
    are no real GGUF, so a miss fails trying to de-quantize them)."""
    import hashlib
    import json
    import os
    import shutil

    content = b"GGUF stand-in bytes"
    cache = tmp_path / "cache" / f"weights-{hashlib.sha256(content).hexdigest()[:16]}"
    shutil.copytree(tiny_model_dir, cache)
    (cache / "fed_crash_cache.json").write_text(json.dumps({"gguf": "elsewhere/weights.gguf", "size": len(content)}))
    for venv in ("venv-a", "venv-b"):
        path = tmp_path / venv / "weights.gguf"
        path.parent.mkdir()
        path.write_bytes(content)
        os.utime(path, ns=(len(venv) * 10**9, len(venv) * 10**9))
        loaded = load_model(str(path), cache_dir=tmp_path / "cache")
        assert loaded.folder == str(cache) and loaded.model.config.num_hidden_layers == 8
    path.write_bytes(content + b"!")
    with pytest.raises(ModelError, match="weights.gguf: not a GGUF file transformers can de-quantize"):
        load_model(str(path), cache_dir=tmp_path / "cache")


def test_state_hash_is_sha256_of_names_dtypes_shapes_and_bytes_in_key_order():
    """Against hashlib on copies of each tensor's bytes (a transposed, non-contiguous one included)."""
    import hashlib

    state = {"b": torch.tensor([1, 2], dtype=torch.int64), "a": torch.arange(6.0).reshape(2, 3).t(), "e": torch.zeros(0)}
    digest = hashlib.sha256()
    for key in ("a", "b", "e"):
        tensor = state[key].contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode() + tensor.numpy().tobytes())
    assert state_hash(state) == digest.hexdigest()
