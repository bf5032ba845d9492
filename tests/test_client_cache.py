"""A worker's assembled emulator: one per content hash, shared by the nodes the worker serves
(each node keeps its own copy on disk), and only the last hash kept."""

from __future__ import annotations

import shutil

import torch

from fed_crash.core.artifacts import save_emulator
from fed_crash.core.emulator import build_emulator
from fed_crash.core.models import load_model
from fed_crash.federation import client
from fed_crash.selection import make_spec


def test_nodes_of_one_worker_share_the_emulator_of_one_hash_and_a_new_hash_replaces_it(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(client, "_EMULATORS", {})
    loaded = load_model(str(tiny_model_dir))
    specs = [make_spec("uniform", 8, bottom=2, top=2, keep=k) for k in (2, 3)]
    first = save_emulator(tmp_path / "node-1" / "aaaa", loaded.model, loaded.tokenizer, specs[0], source_id=loaded.model_id)
    same = shutil.copytree(first, tmp_path / "node-2" / "aaaa")  # another node's copy of the same emulator
    other = save_emulator(tmp_path / "node-1" / "bbbb", loaded.model, loaded.tokenizer, specs[1], source_id=loaded.model_id)
    adapters = build_emulator(loaded.model, specs[0]).adapter_state()

    node_1, _ = client.assembled_emulator(first, "aaaa", adapters)
    node_2, _ = client.assembled_emulator(same, "aaaa", {k: v + 1 for k, v in adapters.items()})
    assert node_2 is node_1  # one assembled emulator for both nodes, not one per folder
    later, _ = client.assembled_emulator(other, "bbbb", build_emulator(loaded.model, specs[1]).adapter_state())
    assert later is not node_1 and list(client._EMULATORS) == ["bbbb"]  # the old one is dropped
    assert torch.equal(later.model.lm_head.weight, loaded.model.lm_head.weight)
