"""The federation layer's structure and protocol: the one-way dependency between ``strategies``
and ``fed_crash``, light imports, the emulator exchange (resent to a node that lost it), reply
validation, error reasons, and name lists that must agree."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, MetricRecord, RecordDict

from fed_crash.config import COMPARE_METHODS, HUB_TASK_NAMES
from fed_crash.federation import protocol as P
from fed_crash.federation.faults import InjectedFault
from tests.conftest import LocalGrid, simulated_error_reason, train_metrics, write_run_files

REPO = Path(__file__).resolve().parents[1]


IMPORT_PROBE = """
import json, pathlib, sys
def loaded(prefix): return sorted(m for m in sys.modules if m == prefix or m.startswith(prefix + "."))
import fed_crash.tools.cli as cli
cli.build_parser()
light = {"torch": "torch" in sys.modules}
for name in loaded("fed_crash"):  # forget what the command line loaded: strategies must load its own
    del sys.modules[name]
import strategies
below = loaded("fed_crash")
for name in loaded("strategies"):  # forget it: a fed_crash module that imports it brings it back
    del sys.modules[name]
import importlib
for path in sorted(pathlib.Path("fed_crash").rglob("*.py")):
    if path.name != "__init__.py":
        importlib.import_module(".".join(path.with_suffix("").parts))
print(json.dumps({**light, "strategies_loads": below, "fed_crash_loads_strategies": loaded("strategies")}))
"""


@pytest.fixture(scope="module")
def imports() -> dict:
    """What a fresh interpreter loads: the command line first (no torch), then ``strategies``
    (which fed_crash modules), then every fed_crash module (is ``strategies`` loaded again?)."""
    out = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, cwd=REPO, check=True).stdout
    return json.loads(out.splitlines()[-1])


def test_fed_crash_never_imports_strategies_and_strategies_only_the_layers_below(imports):
    assert not imports["fed_crash_loads_strategies"], "a fed_crash module imports strategies"
    allowed = ("fed_crash.config", "fed_crash.errors", "fed_crash.core", "fed_crash.federation.protocol", "fed_crash.federation.checkpoint",
               "fed_crash.federation.faults", "fed_crash.federation", "fed_crash")
    below = imports["strategies_loads"]
    strays = sorted(m for m in below if not m.startswith(allowed))
    assert not strays, f"strategies loads {strays}"
    assert "fed_crash.federation.server" not in below and "fed_crash.tools.cli" not in below


def test_the_command_line_loads_no_torch_until_a_command_needs_it(imports):
    assert imports["torch"] is False


def test_name_lists_agree_with_their_registries():
    from fed_crash.evaluation.compare import VARIANTS
    from fed_crash.evaluation.mc import HUB_TASKS
    from fed_crash.selection import METHODS
    from fed_crash.config import EmulatorConfig
    import dataclasses

    assert tuple(HUB_TASKS) == HUB_TASK_NAMES and tuple(VARIANTS) == COMPARE_METHODS
    method_field = next(f for f in dataclasses.fields(EmulatorConfig) if f.name == "method")
    assert tuple(METHODS) == method_field.metadata["choices"] == ("uniform", "crash", "search", "full", "full-lora")


def test_a_train_reply_with_unknown_missing_or_odd_metrics_is_rejected_by_name():
    sent = ArrayRecord({"w": Array(np.zeros(2, np.float32))})

    def check(metrics: dict, clipping: bool = False, max_examples: int | None = None) -> str | None:
        content = RecordDict({P.ARRAYS: ArrayRecord({"w": Array(np.ones(2, np.float32))}), P.METRICS: MetricRecord(metrics)})
        return P.check_train_reply(content, sent, clipping=clipping, max_examples=max_examples)[0]

    good = train_metrics(3)
    assert check(good) is None and check(good, max_examples=3) is None
    assert "unknown: ['partition']" in check({**good, "partition": 7})  # would overwrite the server's attribution
    without_loss = {k: v for k, v in good.items() if k != "train-loss"}
    assert "missing: ['train-loss']" in check(without_loss)  # Flower raises on replies whose keys differ
    assert "'train-loss' must be a finite number, got [1.0, 2.0]" in check({**good, "train-loss": [1.0, 2.0]})
    assert "'train-loss' must be a finite number, got nan" in check({**good, "train-loss": float("nan")})
    assert "'train-loss' must be >= 0, got -1.0" in check({**good, "train-loss": -1.0})
    assert "'delivery-seconds'" not in (check({**good, "delivery-seconds": -0.5}) or "")  # two machines' clocks: any sign
    # the weight: a whole number of examples, at least one, at most the shard's size
    assert "'num-examples' must be >= 1, got 0" in check({**good, P.NUM_EXAMPLES: 0})
    assert "'num-examples' must be a whole number, got 2.5" in check({**good, P.NUM_EXAMPLES: 2.5})
    assert "'num-examples' must be in [1, 3], got 1e+300 (the shard's size)" in check({**good, P.NUM_EXAMPLES: 1e300}, max_examples=3)
    # the unit weight is exactly 1 (what equal weights and DP average by); under DP the update norm is required
    assert "missing: ['update-norm']" in check(good, clipping=True)
    dp = {**good, P.UPDATE_NORM: 0.5}
    assert check(dp, clipping=True) is None
    assert "'unit-weight' must be a whole number, got 1e-09" in check({**dp, P.UNIT_WEIGHT: 1e-9}, clipping=True)
    assert "'unit-weight' must be in [1, 1], got 2" in check({**dp, P.UNIT_WEIGHT: 2}, clipping=True)
    assert "unknown: ['update-norm']" in check(dp)


def test_error_reasons_are_the_clients_own_exception_whatever_ray_wraps_around_it():
    reason = simulated_error_reason(InjectedFault("injected crash (faults.crash-rate): client 0 crashed after training step 2 in round 1"))
    assert "RayTaskError(ClientAppException)" in reason and "pid=" in reason  # what Flower's Ray backend sends
    assert P.error_reason(reason) == "InjectedFault: injected crash (faults.crash-rate): client 0 crashed after training step 2 in round 1"
    other_process = reason.replace("pid=", "pid=9")
    assert P.error_reason(other_process) == P.error_reason(reason)  # nothing run-specific survives
    # the deployment runtime sends the exception's type and message alone (flwr/supernode/runtime/run_clientapp.py)
    crash = InjectedFault("injected crash (faults.crash-rate): client 0 crashed after training step 2 in round 1")
    assert P.error_reason(str(type(crash)) + ":<'" + str(crash) + "'>") == f"InjectedFault: {crash}"
    # a Ray actor that died has no client traceback; this is the reason a real run logged for one
    dead = ("<class 'ray.exceptions.ActorUnavailableError'>:<'The actor 068bbf9a9111394f1800324b01000000 is unavailable: The actor is "
            "temporarily unavailable: RpcError: RPC error: Socket closed rpc_code: 14. The task may or may not have been executed on the actor.'>")
    assert P.error_reason(dead).startswith("ActorUnavailableError: The actor 068bbf9a9111394f1800324b01000000 is unavailable")


@pytest.fixture
def run_files(tmp_path, tokenizer):
    return write_run_files(tmp_path / "files", tokenizer, copies=2)


class ForgetfulGrid(LocalGrid):
    """Node 1 loses its emulator cache after its first round of training."""

    def __init__(self, *args, cache: Path, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cache, self.trained = cache, 0

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)  # answered at once
        if any(m.metadata.message_type == P.TRAIN for m in messages):
            self.trained += 1
            if self.trained == 1:
                shutil.rmtree(self.cache / "node-1")
        return ids


def test_a_node_whose_emulator_cache_was_deleted_gets_it_again_and_trains(run_files, tmp_path, monkeypatch, server_identity):
    from alpaca.server_app import main

    monkeypatch.setenv("FED_CRASH_NODE_CACHE", str(tmp_path / "nodes"))
    config = {"model": str(run_files / "model"), "data": str(run_files / "rows.jsonl"), "results-dir": str(tmp_path / "results"),
              "run-name": "r", "eval-examples": 8, "max-length": 256, "num-server-rounds": 3, "min-available-nodes": 2,
              "max-client-examples": 8, "emulator.keep": 2, "emulator.share": False, "train.steps": 1, "save-model": False}
    grid = ForgetfulGrid(2, run_config=config, cache=tmp_path / "nodes")
    main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    lines = [json.loads(line) for line in (tmp_path / "results/r/metrics.jsonl").read_text().splitlines()]
    assert [c["partition"] for c in lines[1]["clients"]] == [0, 1]
    assert [c["partition"] for c in lines[2]["clients"]] == [1]
    assert [(f["partition"], f["kind"]) for f in lines[2]["failures"]] == [(0, "no-emulator")]
    assert [c["partition"] for c in lines[3]["clients"]] == [0, 1] and not lines[3]["failures"]  # received again, trained
    deliveries = [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == P.EMULATOR]
    assert deliveries == [1, 2, 1]  # once each before round 1, and node 1 again before round 3
    assert lines[3]["emulator_bytes_down"] == lines[1]["emulator_bytes_down"] / 2 > 0
    assert (tmp_path / "nodes/node-1").is_dir()
