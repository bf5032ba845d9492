"""Reliability and security: injected faults, bad updates, resume, bad input, privacy
invariants, determinism. The mechanisms are tested one by one on tiny models in one process
(the server's real ``serve`` and the client's real handlers, Flower's transport replaced by
``LocalGrid``); ``test_faults_rejections_kill_and_resume_in_real_flwr_runs`` runs them together
in real ``flwr run`` processes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from safetensors.torch import load_file, save_file

from fed_crash.core.artifacts import ArtifactError, PrivacyError, check_private, save_emulator
from fed_crash.federation.checkpoint import CHECKPOINT, read_checkpoint, rng_state, set_rng_state
from fed_crash.config import ConfigError, FaultConfig, FederationConfig, parse_run_config
from fed_crash.core.data import DataError
from fed_crash.core.emulator import EmulatorSpec, SpecError, adapter_state
from fed_crash.federation.faults import KINDS, FaultPlan, corrupt_update, find_seed, telling
from alpaca.server_app import main as serve
from fed_crash.federation import protocol as P
from fed_crash.federation.server import reproducible
from fed_crash.tools.launch import check_run_config, flwr_run, free_port
from fed_crash.core.models import ModelError, state_hash
from fed_crash.errors import FedCrashError
from strategies import ClientClippingDP, OffsiteStrategy, StrategyState, make_strategy
from tests.conftest import ROWS, LocalGrid, simulated_error_reason, tiny_llama, train_metrics, write_run_files

pytestmark = pytest.mark.usefixtures("server_identity")

BAD_UPDATES = ("garbage", "nan", "inf", "shape", "dtype", "missing-key", "extra-key")
RECORDED_AS = {"dropout": "offline", "crash": "error", "timeout": "timeout", "bad-update": "rejected"}  # what the server sees of each fault


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def files_under(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the sha256 of its bytes: to show nothing changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    return write_run_files(tmp_path_factory.mktemp("reliability"), tokenizer, copies=2)


def local_config(files: Path, results: Path, **overrides) -> dict:
    return {"model": str(files / "model"), "data": str(files / "rows.jsonl"), "results-dir": str(results), "run-name": "r",
            "eval-examples": 8, "max-length": 256, "num-server-rounds": 2, "min-available-nodes": 2, "max-client-examples": 8,
            "emulator.keep": 2, "emulator.share": False, "train.steps": 2, "train.lr": 0.003, "save-model": False, **overrides}


def serve_local(config: dict, nodes: int = 2, ids: list[int] | None = None) -> Path:
    """The real server and clients in this process (see module docstring)."""
    grid = LocalGrid(nodes, ids=ids, run_config=config)
    serve(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    return Path(config["results-dir"]) / config["run-name"]


@pytest.fixture(autouse=True)
def node_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FED_CRASH_NODE_CACHE", str(tmp_path / "nodes"))


# --------------------------------------------------------------------------- 1. faults


def test_fault_plan_draws_each_fault_at_its_rate_from_seed_partition_and_round_alone():
    cfg = FaultConfig(seed=3, crash_rate=0.2, timeout_rate=0.1, dropout_rate=0.1, dropout_rounds=3, bad_update_rate=0.3)
    plan = FaultPlan(cfg)
    cells = [(p, r) for p in range(100) for r in range(1, 41)]
    faults = {cell: plan.fault(*cell) for cell in cells}
    assert {cell: plan.fault(*cell) for cell in reversed(cells)} == faults  # no hidden state
    for kind, rate in (("crash", 0.2), ("timeout", 0.1), ("dropout", 0.1), ("bad-update", 0.3)):
        assert np.mean([plan.draw(kind, p, r) < rate for p, r in cells]) == pytest.approx(rate, abs=0.02)
    for p in range(100):  # a dropout keeps the client offline for dropout-rounds consecutive rounds
        for r in range(1, 41):
            window = plan.offline(p, r)
            assert (faults[p, r] == "dropout") == (window is not None)
            if window:
                assert window[1] - window[0] == 2 and window[0] <= r <= window[1]
                assert all(plan.offline(p, s) for s in range(window[0], min(window[1], 40) + 1))
    assert set(faults.values()) == {None, *KINDS}
    other = FaultPlan(dataclasses.replace(cfg, seed=4))
    assert sum(other.fault(*cell) != faults[cell] for cell in cells) > len(cells) // 4
    assert not FaultPlan(FaultConfig()).active and all(FaultPlan(FaultConfig()).fault(*cell) is None for cell in cells[:50])


def test_a_client_crashes_mid_training_and_the_server_records_it(files, tmp_path):
    """Every client crashes in every round (crash-rate 1): each round is recorded with the
    clients' own messages and keeps the previous adapters; the run finishes."""
    run_dir = serve_local(local_config(files, tmp_path / "results", **{"faults.crash-rate": 1.0, "train.steps": 4}))
    lines = metrics(run_dir)
    for line in lines[1:]:
        assert [f["kind"] for f in line["failures"]] == ["error", "error"] and not line["clients"]
        assert all(re.search(r"injected crash .* after training step 2 in round \d", f["reason"]) for f in line["failures"])
        assert line["aggregated"] is False and "previous adapters are kept" in line["note"]
    first, final = load_file(run_dir / "adapters/round-0.safetensors"), load_file(run_dir / "adapters/final.safetensors")
    assert all(torch.equal(first[k], final[k]) for k in first)


# --------------------------------------------------------------------------- 2. bad updates


def test_every_bad_update_is_rejected_by_name_and_the_round_aggregates_the_rest():
    torch.manual_seed(0)
    start = {k: v.clone() for k, v in adapter_state(tiny_llama(), EmulatorSpec(8, 2, 2, kept=(3, 5))).items()}
    honest = [{k: v + 0.01 * torch.randn_like(v) for k, v in start.items()} for _ in range(2)]
    strategy = OffsiteStrategy(make_strategy(FederationConfig(min_train_nodes=1, min_available_nodes=1)), max_update_norm=5.0, settle_s=0)
    grid = LocalGrid(len(BAD_UPDATES) + 4)  # 2 honest, the bad ones, one that raises, one that never answers
    sent = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, ArrayRecord(start), ConfigRecord(), grid)}
    partition = {node: pid for node, pid in strategy.partitions.items()}
    updates = honest + [corrupt_update(kind, honest[0], start, scale=100.0, seed=1) for kind in BAD_UPDATES]
    replies = [Message(RecordDict({"arrays": ArrayRecord(update), "metrics": MetricRecord(train_metrics(3 + i))}), reply_to=sent[node])
               for i, (node, update) in enumerate(zip(grid.nodes, updates))]
    replies.append(Message(Error(code=2, reason=simulated_error_reason(MemoryError("out of memory"))), reply_to=sent[grid.nodes[-2]]))
    arrays, _ = strategy.aggregate_train(1, replies)

    traffic = strategy.rounds[1]
    failures = {f["partition"]: (f["kind"], f["reason"]) for f in traffic.failures}
    expected = {"garbage": "update norm .* exceeds max-update-norm 5", "nan": "holds NaN or infinite", "inf": "holds NaN or infinite",
                "shape": r"has shape \([\d, ]+\), expected \([\d, ]+\)", "dtype": "has dtype float16, expected float32",
                "missing-key": "1 adapter tensor\\(s\\) missing", "extra-key": "1 tensor\\(s\\) that were not sent"}
    for i, kind in enumerate(BAD_UPDATES, start=2):
        assert failures[partition[grid.nodes[i]]][0] == "rejected" and re.search(expected[kind], failures[partition[grid.nodes[i]]][1]), kind
    assert failures[partition[grid.nodes[-2]]] == ("error", "MemoryError: out of memory")
    assert failures[partition[grid.nodes[-1]]] == ("timeout", "no reply within round-timeout 3600s")
    assert [c["partition"] for c in traffic.clients] == [0, 1] and traffic.aggregated
    mean = arrays.to_torch_state_dict()
    for k in start:  # FedAvg of the two honest updates, weighted 3 and 4
        torch.testing.assert_close(mean[k], (3 * honest[0][k] + 4 * honest[1][k]) / 7)
    assert all(c["received-norm"] < 5 for c in traffic.clients)


def test_too_few_valid_updates_keep_the_previous_adapters():
    strategy = OffsiteStrategy(make_strategy(FederationConfig(min_train_nodes=1, min_available_nodes=1)), min_replies=2, settle_s=0)
    grid = LocalGrid(2)
    sent = list(strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(3, np.float32))}), ConfigRecord(), grid))
    good = Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(3, np.float32))}), "metrics": MetricRecord(train_metrics(1))}), reply_to=sent[0])
    assert strategy.aggregate_train(1, [good]) == (None, None)
    assert strategy.rounds[1].note.startswith("1 valid update(s), fewer than min-replies 2") and not strategy.rounds[1].aggregated


def test_a_client_cannot_choose_its_weight_beyond_its_shard():
    """The server knows each shard's size: a claim of 1e300 examples (all the weight; two of 1e308
    overflow the mean to zeros) is rejected by name and the honest clients' mean is released."""
    strategy = OffsiteStrategy(make_strategy(FederationConfig(min_train_nodes=1, min_available_nodes=1)), settle_s=0)
    grid = LocalGrid(3)
    sent = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(2, np.float32))}), ConfigRecord(), grid)}
    strategy.shard_sizes = {0: 4, 1: 4, 2: 4}
    claims = {grid.nodes[0]: (1.0, 4), grid.nodes[1]: (3.0, 2), grid.nodes[2]: (1000.0, 1e300)}
    replies = [Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.full(2, w, np.float32))}), "metrics": MetricRecord(train_metrics(n))}),
                       reply_to=sent[node]) for node, (w, n) in claims.items()]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), [(4 * 1.0 + 2 * 3.0) / 6] * 2, rtol=1e-6)
    [failure] = strategy.rounds[1].failures
    assert failure["kind"] == "rejected" and "'num-examples' must be in [1, 4], got 1e+300 (the shard's size)" in failure["reason"]


def test_nodes_that_claim_one_partition_or_another_count_are_excluded_and_recorded():
    """vet_partitions by hand, then in a federation: two nodes claiming partition 0 train
    neither shard twice nor at all (which one holds it cannot be told); one that counts 9
    partitions among nodes that count 4 is excluded; a node that answers badly is excluded once,
    not asked again every round. Each is in round 1's failures as ``excluded``; the rest train."""
    from strategies.offsite import vet_partitions

    admitted, n, excluded = vet_partitions({}, 0, {1: (0, 4), 2: (1, 4), 3: (1, 4), 4: (2, 9), 5: (3, 4)})
    assert admitted == {1: 0, 5: 3} and n == 4 and set(excluded) == {2, 3, 4}
    assert excluded[4] == "says num-partitions 9, the federation has 4" and "partition 1, which 2 nodes claim at once" in excluded[2]
    admitted, n, excluded = vet_partitions({1: 0}, 4, {6: (0, 4), 7: (2, 4)})  # a late node claiming a held partition
    assert admitted == {7: 2} and excluded == {6: "claims partition 0, which another node already holds"}

    grid = LocalGrid(5, run_config={"train.steps": 1})
    grid.contexts[grid.nodes[1]].node_config["partition-id"] = 0  # two claim partition 0
    grid.contexts[grid.nodes[2]].node_config["num-partitions"] = 9
    del grid.contexts[grid.nodes[3]].node_config["partition-id"]  # its answer raises on the node
    strategy = OffsiteStrategy(make_strategy(FederationConfig(min_train_nodes=1, min_available_nodes=1)), settle_s=0)
    zeros = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    sampled = {m.metadata.dst_node_id for m in strategy.configure_train(1, zeros, ConfigRecord(), grid)}
    assert sampled == {grid.nodes[4]} and strategy.partitions == {grid.nodes[4]: 4} and strategy.num_partitions == 5
    failures = {f["node"]: f for f in strategy.rounds[1].failures}
    assert set(failures) == set(grid.nodes[:4]) and {f["kind"] for f in failures.values()} == {"excluded"}
    assert "claims partition 0, which 2 nodes claim at once" in failures[grid.nodes[0]]["reason"]
    assert "says num-partitions 9" in failures[grid.nodes[2]]["reason"] and "did not say its partition" in failures[grid.nodes[3]]["reason"]
    asked = len(grid.sent)
    assert [m.metadata.dst_node_id for m in strategy.configure_train(2, zeros, ConfigRecord(), grid)] == [grid.nodes[4]]
    assert len(grid.sent) == asked and not strategy.rounds[2].failures  # the excluded are not asked again, nor recorded twice


def test_every_wait_for_nodes_is_bounded_and_ends_in_a_message_with_the_numbers():
    """Flower's sampler waits without end for nodes that are not there: too few connect at the
    start, or too few are left to admit (here two of three claim one partition). Both end after
    node-timeout with the numbers, instead of a server that hangs."""
    zeros = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    strategy = OffsiteStrategy(make_strategy(FederationConfig(min_train_nodes=1, min_available_nodes=2)), min_available_nodes=2,
                               node_timeout=0.5, settle_s=0)
    with pytest.raises(FedCrashError, match="1 node\\(s\\) connected within node-timeout 0.5s, the run needs min-available-nodes 2"):
        strategy.configure_train(1, zeros, ConfigRecord(), LocalGrid(1))
    grid = LocalGrid(3)
    grid.contexts[grid.nodes[1]].node_config["partition-id"] = 0
    strategy = OffsiteStrategy(make_strategy(FederationConfig(min_train_nodes=1, min_available_nodes=3)), min_available_nodes=3,
                               node_timeout=0.5, settle_s=0)
    start = time.monotonic()
    with pytest.raises(FedCrashError, match=r"round 1: 1 admitted node\(s\) connected, the run needs 3 .*2 node\(s\) excluded \(claims partition 0"):
        strategy.configure_train(1, zeros, ConfigRecord(), grid)
    assert time.monotonic() - start < 5


def test_replies_that_came_while_the_server_was_busy_past_the_timeout_still_count():
    """Round 0's evaluation beside round 1's training can outlast the round's timeout: the replies
    that came meanwhile are pulled once all the same, not counted as timed out."""
    from strategies.offsite import pull_replies

    grid = LocalGrid(2)
    asked = [i for node in grid.nodes for i in grid.push_messages([P.partition_request(node)])]
    assert sorted(m.metadata.reply_to_message_id for m in pull_replies(grid, asked, timeout=-5.0)) == sorted(asked)


@pytest.mark.parametrize("overrides, nodes, message", [
    ({"strategy": "fedmedian"}, 2, r"fedmedian over a sample of 2 \(2 nodes x fraction-train 1, min-train-nodes 2\) is the mean"),
    ({"strategy": "fedtrimmedavg", "trimmed-beta": 0.2}, 4, r"trims int\(0.2 x 4\) = 0 updates: sample at least 5 clients"),
    ({"strategy": "krum", "krum-malicious": 1}, 4, r"krum with krum-malicious 1 needs a sample of at least 5 \(2f \+ 3\)"),
])
def test_a_robust_strategy_over_too_small_a_sample_is_refused_at_start(overrides, nodes, message):
    from fed_crash.federation.server import robust_sample_problem

    fed = parse_run_config({"fraction-train": 1.0, **overrides}).fed
    assert re.search(message, robust_sample_problem(fed, nodes))
    assert robust_sample_problem(fed, 5) is None and robust_sample_problem(parse_run_config({}).fed, 2) is None  # fedavg: no claim


def test_one_client_sending_scaled_garbage_moves_fedavg_far_and_the_robust_strategies_little():
    """Five clients; four honest ones move the adapters by about the same small step, one sends
    round-start + 100 * noise (finite, right shapes: only a norm bound would catch it, and
    there is none here). The robust strategies stay near the honest mean, FedAvg does not."""
    rng = np.random.default_rng(0)
    start = {"w": torch.zeros(2000)}
    honest = [{"w": torch.from_numpy((0.05 + 0.01 * rng.standard_normal(2000)).astype(np.float32))} for _ in range(4)]
    garbage = corrupt_update("garbage", honest[0], start, scale=100.0, seed=0)
    honest_mean = torch.stack([h["w"] for h in honest]).mean(0)
    step = float(torch.linalg.norm(honest_mean))
    shift = {}
    for name, extra in (("fedavg", {}), ("fedmedian", {}), ("fedtrimmedavg", {"trimmed_beta": 0.2}), ("krum", {"krum_malicious": 1})):
        strategy = OffsiteStrategy(make_strategy(FederationConfig(strategy=name, min_train_nodes=1, min_available_nodes=1, **extra)), settle_s=0)
        grid = LocalGrid(5)
        sent = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, ArrayRecord(start), ConfigRecord(), grid)}
        replies = [Message(RecordDict({"arrays": ArrayRecord(u), "metrics": MetricRecord(train_metrics(10))}), reply_to=sent[node])
                   for node, u in zip(grid.nodes, [*honest, garbage])]
        arrays, _ = strategy.aggregate_train(1, replies)
        shift[name] = float(torch.linalg.norm(arrays.to_torch_state_dict()["w"] - honest_mean)) / step
    assert shift["fedavg"] > 50, shift  # 1/5 of the garbage: hundreds of honest steps away
    assert all(shift[name] < 0.5 for name in ("fedmedian", "fedtrimmedavg", "krum")), shift


# --------------------------------------------------------------------------- 3. resume


def test_a_resumed_run_ends_with_the_adapters_of_an_uninterrupted_one(files, tmp_path):
    """FedAdam (server moments in the checkpoint), partial sampling and injected bad updates:
    two rounds, then two more with resume=true, equal bitwise to four rounds straight. The stop
    cut the metrics file's last line mid-write: the resume drops it. Then ``fed-crash prune``
    removes the middle rounds' adapters and the run still resumes for a fifth round."""
    common = {"strategy": "fedadam", "fedopt-eta": 0.003, "fraction-train": 0.5, "min-train-nodes": 2, "min-available-nodes": 4,
              "max-update-norm": 50.0, "faults.bad-update-rate": 0.25, "faults.seed": 1}
    straight = serve_local(local_config(files, tmp_path / "a", **common, **{"num-server-rounds": 4}), nodes=4)
    stopped = serve_local(local_config(files, tmp_path / "b", **common), nodes=4)
    assert json.loads((stopped / CHECKPOINT).read_text())["round"] == 2
    with (stopped / "metrics.jsonl").open("a") as f:
        f.write('{"round": 3, "server": {"plugin_lo')  # killed mid-write
    resumed = serve_local(local_config(files, tmp_path / "b", **common, **{"num-server-rounds": 4, "resume": True}), nodes=4,
                          ids=random.Random(5).sample(range(1, 2**40), 4))  # a new run: other node ids
    assert resumed == stopped
    a, b = load_file(straight / "adapters/final.safetensors"), load_file(resumed / "adapters/final.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], load_file(straight / "adapters/round-2.safetensors")[k]) for k in a)
    assert (resumed / "adapters/round-4.optimizer.safetensors").is_file()
    lines = {"resumed": metrics(resumed), "straight": metrics(straight)}
    servers = {name: [reproducible(line)["server"] for line in run] for name, run in lines.items()}
    plug_in = {name: [{k: v for k, v in server.items() if not k.startswith("emulator_")} for server in run] for name, run in servers.items()}
    assert plug_in["resumed"] == plug_in["straight"]
    # the emulator is evaluated at round 0 and at each leg's last round: round 2 too when the run was to end there
    assert [["emulator_loss" in server for server in servers[name]] for name in ("resumed", "straight")] == [[True, False, True, False, True], [True, False, False, False, True]]
    assert [servers["resumed"][r]["emulator_loss"] for r in (0, 4)] == [servers["straight"][r]["emulator_loss"] for r in (0, 4)]
    assert any(line["failures"] for line in lines["straight"])  # the bad updates happened, and were rejected alike

    from fed_crash.tools.cli import main

    assert main(["prune", str(resumed), "--keep-rounds", "1", "--nodes", str(files / "no-such-cache")]) == 0
    assert sorted(p.name for p in (resumed / "adapters").iterdir()) == [
        "final.safetensors", "round-0.safetensors", "round-4.optimizer.safetensors", "round-4.safetensors"]
    serve_local(local_config(files, tmp_path / "b", **common, **{"num-server-rounds": 5, "resume": True}), nodes=4)
    assert [line["round"] for line in metrics(resumed)] == [0, 1, 2, 3, 4, 5]


def test_evaluating_the_emulator_every_round_or_not_changes_nothing_else(files, tmp_path):
    """``emulator-eval-every`` only adds the emulator's scores: the adapters, the plug-in's
    scores and FedBiOT's alignment (which starts from the server's emulator holding the round's
    adapters, whether it was evaluated or not) are the same bitwise either way."""
    common = {"num-server-rounds": 3, "fedbiot-align-steps": 2, "fedbiot-lambda": 0.01, "emulator.calib-samples": 8}
    every = serve_local(local_config(files, tmp_path / "every", **common, **{"emulator-eval-every": 1}))
    ends = serve_local(local_config(files, tmp_path / "ends", **common))  # the default: round 0 and the last round
    lines_every, lines_ends = metrics(every), metrics(ends)
    assert [("emulator_loss" in line["server"]) for line in lines_every] == [True] * 4
    assert [("emulator_loss" in line["server"]) for line in lines_ends] == [True, False, False, True]
    for line_every, line_ends in zip(lines_every, lines_ends):
        assert {k: v for k, v in line_every["server"].items() if k in line_ends["server"]} == line_ends["server"]
        assert line_every.get("alignment") == line_ends.get("alignment")
    assert all(line["alignment"] for line in lines_ends[:3])  # aligned after rounds 0-2
    a, b = load_file(every / "adapters/final.safetensors"), load_file(ends / "adapters/final.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


class EvaluationsAtTrainPush(LocalGrid):
    """A LocalGrid that notes, whenever train messages are pushed, how many rounds the server
    has evaluated by then (lines in the run's metrics.jsonl)."""

    def __init__(self, nodes: int, metrics_file: Path, run_config: dict) -> None:
        super().__init__(nodes, run_config=run_config)
        self.metrics_file, self.evaluated = metrics_file, []

    def push_messages(self, messages) -> list[str]:
        messages = list(messages)
        if messages and messages[0].metadata.message_type == P.TRAIN:
            self.evaluated.append(len(self.metrics_file.read_text().splitlines()) if self.metrics_file.exists() else 0)
        return super().push_messages(messages)


def test_round_0_is_evaluated_while_round_1_trains_and_later_rounds_before_the_next(files, tmp_path):
    """Round 0's metrics line is written only after round 1's train messages have gone out;
    every later round's before the next round's messages (Flower's order), and it says so."""
    config = local_config(files, tmp_path / "results", **{"num-server-rounds": 3})
    run_dir = Path(config["results-dir"]) / config["run-name"]
    grid = EvaluationsAtTrainPush(2, run_dir / "metrics.jsonl", config)
    serve(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    assert grid.evaluated == [0, 2, 3]
    assert [(line["round"], line["eval_beside_training"]) for line in metrics(run_dir)] == [(0, True), (1, False), (2, False), (3, False)]


class Killed(BaseException):
    """A stop no handler catches, as a kill would be."""


class KilledWhileRoundOneTrains(LocalGrid):
    """A LocalGrid whose server is stopped while it waits for round 1's replies, by then having
    evaluated and checkpointed round 0 beside round 1's training."""

    train_pushes = 0

    def push_messages(self, messages) -> list[str]:
        messages = list(messages)
        self.train_pushes += any(m.metadata.message_type == P.TRAIN for m in messages)
        return super().push_messages(messages)

    def pull_messages(self, message_ids) -> list[Message]:
        if self.train_pushes == 1:
            raise Killed
        return super().pull_messages(message_ids)


def test_a_dp_run_stopped_while_round_1_trains_resumes_to_the_uninterrupted_result(files, tmp_path, monkeypatch):
    """DP draws each round's sample from its secret generator when it configures the round, so
    round 0's checkpoint, written beside round 1's training, must hold the generator as round 0
    left it, not as round 1's sampling left it: resumed, the run ends with the adapters and
    privacy accounting of one that ran straight through (the noise seeded, for the comparison)."""
    monkeypatch.setenv("FED_CRASH_UNSAFE_DP_NOISE_SEED", "7")
    common = {"strategy": "fedavg", "dp-clipping-norm": 1.0, "dp-noise-multiplier": 0.5, "fraction-train": 0.5, "min-train-nodes": 2,
              "min-available-nodes": 4, "num-server-rounds": 2}
    straight = serve_local(local_config(files, tmp_path / "a", **common), nodes=4)
    config = local_config(files, tmp_path / "b", **common)
    with pytest.raises(Killed):
        serve(KilledWhileRoundOneTrains(4, run_config=config), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    stopped = Path(config["results-dir"]) / config["run-name"]
    assert json.loads((stopped / CHECKPOINT).read_text())["round"] == 0
    resumed = serve_local({**config, "resume": True}, nodes=4)
    a, b = load_file(straight / "adapters/final.safetensors"), load_file(resumed / "adapters/final.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [line.get("privacy") for line in metrics(resumed)] == [line.get("privacy") for line in metrics(straight)]


def test_prune_empties_node_caches_and_a_broken_middle_metrics_line_is_an_error(tmp_path):
    from fed_crash.federation.checkpoint import resumed_history
    from fed_crash.federation.prune import prune_node_caches

    for name in ("node-1/abc", "node-22/def", "keep-me"):
        (tmp_path / "nodes" / name).mkdir(parents=True)
    assert [p.name for p in prune_node_caches(tmp_path / "nodes")] == ["node-1", "node-22"]
    assert [p.name for p in (tmp_path / "nodes").iterdir()] == ["keep-me"] and prune_node_caches(tmp_path / "absent") == []
    broken = tmp_path / "metrics.jsonl"
    broken.write_text('{"round": 0}\n{"round": 1, "serv\n{"round": 2}\n')
    with pytest.raises(ArtifactError, match="metrics.jsonl: line 2 is not JSON"):
        resumed_history(broken, 1)


def test_checkpoint_rng_and_privacy_accounting_survive_a_resume():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = json.loads(json.dumps(rng_state()))  # it is JSON
    expected = (random.random(), float(np.random.normal()), float(torch.rand(1)))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(state)
    assert (random.random(), float(np.random.normal()), float(torch.rand(1))) == expected

    # DP: the released rounds keep counting and the secret generator continues where it stood,
    # so a resumed run's next sample and noise are those of the uninterrupted run
    config = FederationConfig(strategy="fedavg", fraction_train=0.5, min_train_nodes=1, min_available_nodes=1, dp_clipping_norm=1.0)
    grid, dp = LocalGrid(4), make_strategy(config)

    def dp_round(strategy, server_round: int) -> tuple[list[int], np.ndarray]:
        sent = list(strategy.configure_train(server_round, ArrayRecord({"w": Array(np.zeros(2, np.float32))}), ConfigRecord(), grid))
        arrays, _ = strategy.aggregate_train(server_round, [Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(2, np.float32))}),
                                                                                "metrics": MetricRecord({"unit-weight": 1})}), reply_to=m) for m in sent])
        return [m.metadata.dst_node_id for m in sent], arrays["w"].numpy()

    for server_round in (1, 2):
        dp_round(dp, server_round)
    again = make_strategy(config)
    assert isinstance(again, ClientClippingDP)
    state = dp.state_dict()
    again.load_state_dict(StrategyState(state.tensors, json.loads(json.dumps(state.meta))))  # the meta travels as JSON
    assert again.spent == pytest.approx(dp.spent) and len(again.releases) == 2 and again.spent[2] > again.spent[1] > 0
    (nodes, noise), (nodes_again, noise_again) = dp_round(dp, 3), dp_round(again, 3)
    assert nodes == nodes_again and np.array_equal(noise, noise_again)


# --------------------------------------------------------------------------- 4. bad input


@pytest.fixture(scope="module")
def finished_run(files, tmp_path_factory):
    """A finished two-round run to resume (or fail to)."""
    results = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as mp:
        from flwr.supercore.task_identity import TaskIdentity

        mp.setenv("FED_CRASH_NODE_CACHE", str(results / "nodes"))
        for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
            mp.setattr(TaskIdentity, name, value)
        return serve_local(local_config(files, results / "results"))


def bad_rows(files: Path, tmp_path: Path) -> dict:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([json.dumps(ROWS[0]), json.dumps(ROWS[1]), json.dumps(ROWS[2]), json.dumps({"instruction": "no output"})]))
    return {"data": str(path)}


def other_model(files: Path, tmp_path: Path) -> dict:
    """The model folder now holds other weights: the run to resume was cut from another model."""
    folder = tmp_path / "model"
    folder.mkdir()
    for p in (files / "model").iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    tiny_llama(seed=1).save_pretrained(folder, safe_serialization=True)
    return {"model": str(folder)}


BAD_INPUTS = [  # (case, overrides or a function of (files, tmp_path) giving them, error, message)
    ("unknown key", {"emulator.keep-ration": 0.5}, ConfigError, r"unknown key 'emulator.keep-ration'; did you mean 'emulator.keep-ratio'"),
    ("key outside its section", {"keep-ratio": 0.5}, ConfigError, r"unknown key 'keep-ratio'; did you mean 'emulator.keep-ratio'"),
    ("wrong type", {"train.lr": "fast"}, ConfigError, r"\[train\]: 'lr' must be float, got str 'fast'"),
    ("out of range", {"faults.crash-rate": 1.5}, ConfigError, r"\[faults\]: 'crash-rate' must be in \[0.0, 1.0\], got 1.5"),
    ("missing data file", {"data": "/no/rows.jsonl"}, DataError, "data file /no/rows.jsonl does not exist"),
    ("missing model", {"model": "/no/model"}, ModelError, "model path '/no/model' does not exist"),
    ("malformed row", bad_rows, DataError, "bad.jsonl: row 3: "),
    ("more clients than examples", {"num-supernodes": 60}, DataError, "60 clients but only 56 client examples"),
    ("emulator spec does not fit", {"emulator.keep": 99}, SpecError, "cannot keep 99 layers: the middle span has 4 layers"),
    ("emulator keeps the full model", {"emulator.keep": 4}, PrivacyError, "keeps all 4 middle layers: clients would receive the full model"),
    ("NaN value", {"train.lr": float("nan")}, ConfigError, r"\[train\]: 'lr' must be a finite number, got nan"),
    ("infinite value", {"round-timeout": float("inf")}, ConfigError, r"'round-timeout' must be a finite number, got inf"),
    ("batch size 0", {"eval-batch-size": 0}, ConfigError, r"'eval-batch-size' must be >= 1, got 0"),
    ("max-length below every prompt", {"max-length": 8}, DataError, "max-length 8: the prompt of every one of the 8 examples fills it"),
    ("existing run folder", {"run-name": "r"}, ConfigError, "already exists and is not empty; choose another run-name, or resume=true"),
    ("resume without checkpoint", {"run-name": "nothing", "resume": True}, ConfigError, "checkpoint.json does not exist"),
    ("resume with another config", {"run-name": "r", "resume": True, "train.lr": 0.01}, ConfigError,
     r"differs from .*config.json in train.lr \(train.lr was 0.003, now 0.01\)"),
    ("resume with another model", lambda f, t: {"run-name": "r", "resume": True, **other_model(f, t)}, ConfigError, r"differs from .*config.json in model \(model was '.*', now '.*'\)"),
]


@pytest.mark.parametrize("case, overrides, error, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_fails_before_training_naming_what_is_wrong_and_writes_nothing(files, finished_run, tmp_path, case, overrides, error, message):
    """Each bad input fails where a user starts a run (the flwr-run launcher for keys and
    values, the server for files, data, spec, clients and checkpoints) before any training, and
    the results folder, which holds a finished run, is byte for byte what it was."""
    overrides = overrides(files, tmp_path) if callable(overrides) else dict(overrides)
    nodes = overrides.pop("num-supernodes", 2)
    config = {**local_config(files, finished_run.parent, **{"run-name": "new"}), **overrides}
    before = files_under(finished_run.parent)
    with pytest.raises(error, match=message):
        check_run_config(config)  # what flwr_run (fed-crash simulate, experiments) checks first
        serve_local(config, nodes=nodes)
    assert files_under(finished_run.parent) == before


def test_a_start_that_fails_late_leaves_no_folder_and_two_starts_cannot_share_one(files, tmp_path):
    """max-length below every prompt is found when the server tokenizes its evaluation rows,
    after the run folder was written: the folder goes again, so a retry fails the same way (not
    with "already exists"). Two starts with one run-name: the second to write is refused."""
    config = local_config(files, tmp_path / "results", **{"run-name": "late", "max-length": 8})
    for _ in range(2):
        with pytest.raises(DataError, match="max-length 8: the prompt of every one"):
            serve_local(config)
        assert not (tmp_path / "results" / "late").exists()

    from fed_crash.federation.server import STARTED, open_run, write_run

    run = open_run(parse_run_config(local_config(files, tmp_path / "results", **{"run-name": "twice"})))
    run.folder.mkdir(parents=True)
    (run.folder / STARTED).touch()  # another start claimed it after this one checked the folder
    with pytest.raises(ConfigError, match="was claimed by another start of run-name 'twice' meanwhile"):
        write_run(run, None, None, None)
    assert not run.created and list(run.folder.iterdir()) == [run.folder / STARTED]


def test_a_checkpoint_of_another_model_or_with_changed_files_is_refused(files, finished_run, tmp_path):
    """Resuming needs the same model, byte for byte, and checkpoint files as written."""
    run = tmp_path / "results" / "r"
    run.parent.mkdir()
    run.mkdir()
    for p in finished_run.rglob("*"):
        if p.is_file():
            (run / p.relative_to(finished_run)).parent.mkdir(parents=True, exist_ok=True)
            (run / p.relative_to(finished_run)).write_bytes(p.read_bytes())
    config = local_config(files, run.parent, **{"resume": True, "num-server-rounds": 3})
    model = other_model(files, tmp_path)["model"]  # same path in the config, other weights in it
    config_file = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config_file, "fed": {**config_file["fed"], "model": model}}))
    with pytest.raises(ArtifactError, match=r"emulator.json was cut from a model with weights sha256 \w+, but model '.*' has \w+: the run to resume belongs to another model"):
        serve_local({**config, "model": model})
    adapters = run / json.loads((run / CHECKPOINT).read_text())["adapters"]
    state = load_file(adapters)
    save_file({k: v + 1 for k, v in state.items()}, str(adapters))
    with pytest.raises(ArtifactError, match=r"round-2.safetensors changed after checkpoint round 2 was written"):
        read_checkpoint(run)
    assert not (run / "adapters/round-3.safetensors").exists()


def test_unknown_keys_are_named_before_flwr_run_starts(tmp_path):
    """Flower refuses a key the app's pyproject lacks with only "Invalid run configuration";
    the launcher names it first, and the pyproject lists every key of the schema."""
    from fed_crash.config import run_config_keys
    from fed_crash.tools.launch import app_run_config

    assert sorted(app_run_config()) == run_config_keys()
    with pytest.raises(ConfigError, match=r"unknown key 'faults.crash_rat'; did you mean 'faults.crash-rate'"):
        flwr_run("faults.crash_rat=0.5", flwr_home=tmp_path / "flwr")
    assert not (tmp_path / "flwr").exists()  # nothing was started


# --------------------------------------------------------------------------- 5. privacy


def test_a_payload_with_a_removed_layer_or_a_checkpoint_file_is_refused(tmp_path, tokenizer):
    model = tiny_llama()
    spec = EmulatorSpec(8, 2, 2, kept=(3, 5), share=False)
    folder = save_emulator(tmp_path / "emulator", model, tokenizer, spec, source_id="tiny")
    weights = load_file(folder / "emulator.safetensors")
    names = [p.name for p in folder.iterdir() if p.suffix != ".safetensors"]
    check_private(weights, names, model, spec)  # what save_emulator writes passes

    removed = "model.layers.4.mlp.up_proj.weight"
    with pytest.raises(PrivacyError, match=f"'{re.escape(removed)}' is not part of the emulator"):
        check_private({**weights, removed: model.state_dict()[removed]}, names, model, spec)
    renamed = {**weights, "model.layers.3.mlp.up_proj.weight": model.state_dict()[removed].clone()}
    with pytest.raises(PrivacyError, match=f"holds the weights of removed layer tensor '{re.escape(removed)}'"):
        check_private(renamed, names, model, spec)
    for name in ("pytorch_model.bin", "model.pt", "../config.json"):
        with pytest.raises(PrivacyError, match="only plain .json/.txt/.jinja/.model files"):
            check_private(weights, [*names, name], model, spec)


def test_a_tampered_emulator_is_refused_on_arrival_and_nothing_is_stored(tmp_path, tokenizer):
    model = tiny_llama()
    spec = EmulatorSpec(8, 2, 2, kept=(3, 5))
    folder = save_emulator(tmp_path / "emulator", model, tokenizer, spec, source_id="tiny")
    weights = load_file(folder / "emulator.safetensors")
    weights["model.layers.3.mlp.up_proj.weight"] = weights["model.layers.3.mlp.up_proj.weight"] + 1e-3
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix != ".safetensors"}
    payload = P.EmulatorPayload(ArrayRecord(weights), ConfigRecord(files), P.payload_sha256(state_hash(weights), files))
    grid = LocalGrid(1)
    [reply] = grid.send_and_receive([payload.request(1)])
    assert reply.has_error() and re.search("ProtocolError: the emulator received does not match its manifest's weights_sha256 .*nothing was stored",
                                           P.error_reason(reply.error.reason))
    assert not (tmp_path / "nodes").exists()


def test_a_node_keys_its_cache_by_everything_it_received_within_bounds(tmp_path, tokenizer, monkeypatch):
    """The same weights with another tokenizer file is another emulator: the node stores it apart
    and acknowledges the hash of all it received, which the server compares with its own. Too
    many or too large files are refused. The manifest that travels holds no server path."""
    from fed_crash.federation.server import emulator_payload

    monkeypatch.setenv("FED_CRASH_NODE_CACHE", str(tmp_path / "nodes"))
    model, spec = tiny_llama(), EmulatorSpec(8, 2, 2, kept=(3, 5))
    folder = save_emulator(tmp_path / "emulator", model, tokenizer, spec, source_id=str(tmp_path / "secret-models" / "owner-llm"))
    first = emulator_payload(folder, model, spec)
    assert json.loads(first.files["emulator.json"])["source"]["model_id"] == "owner-llm"
    assert str(tmp_path) not in "".join(bytes(v).decode(errors="ignore") for v in first.files.values())
    (folder / "tokenizer_config.json").write_text(json.dumps({**json.loads((folder / "tokenizer_config.json").read_text()), "model_max_length": 7}))
    second = emulator_payload(folder, model, spec)
    assert first.sha256 != second.sha256
    grid = LocalGrid(1)
    acks = [grid.send_and_receive([payload.request(1)])[0] for payload in (first, second)]
    assert [P.check_emulator_ack(a.content, p.sha256) for a, p in zip(acks, (first, second))] == [None, None]
    assert sorted(p.name for p in (tmp_path / "nodes" / "node-1").iterdir()) == sorted([first.sha256[:32], second.sha256[:32]])

    for files, message in [({**dict(first.files), **{f"extra-{i}.json": b"{}" for i in range(P.MAX_PAYLOAD_FILES)}}, "files, at most 32"),
                           ({**dict(first.files), "vocab.txt": b"x" * (P.MAX_PAYLOAD_FILE_BYTES + 1)}, "'vocab.txt' must be bytes of at most 64 MiB")]:
        with pytest.raises(P.ProtocolError, match=message):
            P.read_emulator_request(P.EmulatorPayload(first.weights, ConfigRecord(files), "").request(1).content)


def test_a_run_on_a_split_folder_reads_only_its_files_and_a_changed_shard_is_refused(files, tmp_path):
    """``fed-crash shards`` cuts the data as a run would: a run with ``shards`` trains on those
    files alone (its ``data`` does not exist) on the same shards a run cutting from ``data`` gets;
    a node whose shard file was changed refuses to train (recorded by name); the server checks
    its own slices and that the split has as many partitions as there are nodes."""
    from fed_crash.federation.partition import client_shard, server_and_client_rows
    from fed_crash.federation.shards import read_split
    from fed_crash.tools.cli import main
    from fed_crash.tools.launch import toml_value

    cut = local_config(files, tmp_path / "results")
    split = tmp_path / "split"
    assert main(["shards", str(split), "--num-partitions", "2", "--run-config", " ".join(f"{k}={toml_value(v)}" for k, v in cut.items())]) == 0
    cfg = parse_run_config(cut)
    pool = server_and_client_rows(json.loads("[" + ",".join((files / "rows.jsonl").read_text().splitlines()) + "]"), cfg.fed, cfg.data, 0)["clients"]
    assert [json.loads(line) for line in (split / "shard-1.jsonl").read_text().splitlines()] == client_shard(pool, cfg.fed, 1, 2)
    assert read_split(split).shard_rows == {0: 8, 1: 8}

    config = {**cut, "data": str(tmp_path / "nobody-has-this.jsonl"), "shards": str(split), "num-server-rounds": 1}
    run = serve_local(config)
    assert [len(line["clients"]) for line in metrics(run)] == [0, 2]
    text = (split / "shard-1.jsonl").read_text()
    (split / "shard-1.jsonl").write_text(text + text.splitlines()[0] + "\n")  # a row more than the split says
    run = serve_local({**config, "run-name": "changed"})
    [failure] = metrics(run)[1]["failures"]
    assert failure["partition"] == 1 and "differs from the split the server holds" in failure["reason"]
    with pytest.raises(ConfigError, match="splits the data into 2 partitions, the nodes say 3"):
        serve_local({**config, "run-name": "three", "min-available-nodes": 3}, nodes=3)
    (split / "server-eval.jsonl").write_text("")
    with pytest.raises(DataError, match="server-eval.jsonl is missing or differs from"):
        serve_local({**config, "run-name": "eval-changed"})


def test_no_pickle_anywhere_and_torch_loads_only_weights():
    """Every artifact is safetensors or JSON: no module uses pickle (or numpy's pickled
    arrays), and any torch.load must say weights_only=True."""
    root = Path(__file__).resolve().parents[1]
    for path in [p for d in ("fed_crash", "strategies", "simulations", "scripts", "benchmarks") for p in (root / d).rglob("*.py")]:
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M), path
        assert not re.search(r"allow_pickle\s*=\s*True", text), path
        for call in re.findall(r"torch\.load\((.*)\)", text):
            assert "weights_only=True" in call, (path, call)


def assert_only_data_files(*folders: Path) -> None:
    """Only safetensors, JSON (and JSONL), tokenizer text, markdown and PNG; none pickled."""
    for folder in folders:
        for path in (p for p in folder.rglob("*") if p.is_file()):
            assert path.suffix in (".safetensors", ".json", ".jsonl", ".txt", ".jinja", ".md", ".png"), path
            assert not path.read_bytes()[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK"), path


# --------------------------------------------------------------------------- 6. determinism


def test_same_config_and_seed_give_the_same_metrics_whatever_the_node_ids(files, tmp_path):
    config = {"fraction-train": 0.5, "min-train-nodes": 2, "min-available-nodes": 4, "faults.crash-rate": 0.3, "faults.seed": 2}
    runs = [serve_local(local_config(files, tmp_path / name, **config), nodes=4, ids=random.Random(seed).sample(range(1, 2**40), 4))
            for name, seed in (("a", 1), ("b", 2))]
    a, b = (metrics(run) for run in runs)
    assert [reproducible(line) for line in a] == [reproducible(line) for line in b]
    assert all(len(line["clients"]) + len(line["failures"]) == 2 for line in a[1:])  # 2 of the 4 sampled per round
    assert any(line["failures"] for line in a[1:])
    first, second = (load_file(run / "adapters/final.safetensors") for run in runs)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert_only_data_files(*runs, tmp_path / "nodes")


# --------------------------------------------------------------------------- the running system


@pytest.mark.slow
def test_faults_rejections_kill_and_resume_in_real_flwr_runs(files, tmp_path):
    """Three real ``flwr run``s of four FedAdam rounds on 3 simulated clients with every kind
    of injected fault: A uninterrupted; B the same, killed (SuperLink, ServerApp and Ray
    processes, SIGKILL) once round 2 is logged; C resumes B. A records each fault as the plan says and keeps the previous adapters
    when every client failed; B's first rounds equal A's (determinism); C ends where A ended."""
    faults = FaultConfig(crash_rate=0.2, timeout_rate=0.1, dropout_rate=0.15, dropout_rounds=2, bad_update_rate=0.2)
    faults = dataclasses.replace(faults, seed=find_seed(faults, 3, 4, telling))
    plan = FaultPlan(faults)
    config = {"model": str(files / "model"), "data": str(files / "rows.jsonl"), "results-dir": str(tmp_path / "results"), "run-name": "a",
              "eval-examples": 8, "max-length": 256, "num-server-rounds": 4, "fraction-train": 1.0, "min-train-nodes": 3,
              "min-available-nodes": 3, "max-client-examples": 16, "emulator.keep": 2, "emulator.share": False, "train.steps": 4,
              "train.lr": 0.003, "strategy": "fedadam", "fedopt-eta": 0.003, "save-model": False, "round-timeout": 12.0,
              "max-update-norm": 50.0, **{f"faults.{f.name.replace('_', '-')}": getattr(faults, f.name) for f in dataclasses.fields(faults)}}

    def launch(name: str, **kw):
        home = tmp_path / f"flwr-{len(list(tmp_path.glob('flwr-*')))}"  # a fresh SuperLink state for every run
        result = flwr_run({**config, "run-name": name, **kw.pop("overrides", {})}, num_supernodes=3, flwr_home=home,
                          port_base=free_port(), env={"FED_CRASH_NODE_CACHE": str(tmp_path / f"nodes-{name}")}, timeout=300, **kw)
        return result, tmp_path / "results" / name

    result, a = launch("a")
    assert result.ok, result.output[-3000:]
    lines = metrics(a)
    assert [line["round"] for line in lines] == [0, 1, 2, 3, 4]
    for line in lines[1:]:
        r = line["round"]
        expected = {p: RECORDED_AS[kind] for p in range(3) if (kind := plan.fault(p, r))}
        assert {f["partition"]: f["kind"] for f in line["failures"]} == expected, (r, line["failures"])
        assert sorted(c["partition"] for c in line["clients"]) == sorted(set(range(3)) - set(expected))
        for f in line["failures"]:
            assert re.search({"offline": r"offline in rounds \d-\d", "error": r"^InjectedFault: injected crash \(faults.crash-rate\): client \d crashed after training step 2 in round \d$", "timeout": "no reply within round-timeout 12s",
                              "rejected": "update norm .* exceeds max-update-norm 50"}[f["kind"]], f["reason"]), f
        previous, now = (load_file(a / f"adapters/round-{i}.safetensors") for i in (r - 1, r))
        assert line["aggregated"] == bool(line["clients"]) == any(not torch.equal(previous[k], now[k]) for k in now), r
    assert f"round 3/4 | clients {len(lines[3]['clients'])} ok {len(lines[3]['failures'])} failed" in result.output
    assert_only_data_files(a, tmp_path / "nodes-a")

    result, b = launch("b", kill_when=lambda line: "round 2/4 |" in line)
    assert result.status == "killed" and not (b / "adapters/final.safetensors").exists(), result.output[-3000:]
    stopped_at = json.loads((b / CHECKPOINT).read_text())["round"]
    assert stopped_at in (2, 3)
    assert [reproducible(line) for line in metrics(b)][: stopped_at + 1] == [reproducible(line) for line in lines][: stopped_at + 1]

    result, c = launch("b", overrides={"resume": True})
    assert result.ok and c == b, result.output[-3000:]
    assert f"resuming {b} after round {stopped_at} of 4" in result.output
    resumed = metrics(c)
    assert [line["round"] for line in resumed] == [0, 1, 2, 3, 4]
    for mine, theirs in zip(resumed, lines):  # the same rounds; a resumed run sends the emulator again (new nodes)
        assert reproducible(mine)["server"] == reproducible(theirs)["server"]
        assert reproducible(mine["clients"]) == reproducible(theirs["clients"]) and reproducible(mine["failures"]) == reproducible(theirs["failures"])
    final_a, final_c = load_file(a / "adapters/final.safetensors"), load_file(c / "adapters/final.safetensors")
    assert all(torch.equal(final_a[k], final_c[k]) for k in final_a)


class SilentGrid(LocalGrid):
    """The nodes in ``silent`` never answer (their messages are dropped); the rest answer at once."""

    def __init__(self, *args, silent: set[int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.silent = silent

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        for message in messages:
            if message.metadata.dst_node_id in self.silent:
                self._replies.pop(message.metadata.message_id)
        return ids


def test_partition_queries_sent_early_are_collected_once_and_a_silent_node_is_excluded_at_the_timeout(monkeypatch):
    """``ask_partitions`` (the ServerApp's first step) sends the query without waiting; the
    first round pulls those answers instead of asking again, and a node that never answers is
    excluded after the query timeout, named with it."""
    grid = SilentGrid(3, run_config={"train.steps": 1}, silent=set())
    strategy = OffsiteStrategy(make_strategy(FederationConfig(min_train_nodes=1, min_available_nodes=1)), settle_s=0)
    strategy.ask_partitions(grid)
    assert [m.metadata.message_type for m in grid.sent] == [P.PARTITION] * 3 and not strategy.partitions  # sent, not yet pulled
    zeros = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    assert len(list(strategy.configure_train(1, zeros, ConfigRecord(), grid))) >= 1
    assert strategy.partitions == {node: i for i, node in enumerate(grid.nodes)}
    assert sum(m.metadata.message_type == P.PARTITION for m in grid.sent) == 3  # each node asked once

    grid = SilentGrid(3, run_config={"train.steps": 1}, silent={2})
    strategy = OffsiteStrategy(make_strategy(FederationConfig(min_train_nodes=1, min_available_nodes=1)), settle_s=0, round_timeout=0.3)
    strategy.ask_partitions(grid)
    monkeypatch.setattr("strategies.offsite.QUERY_TIMEOUT_S", 0.3)
    sampled = {m.metadata.dst_node_id for m in strategy.configure_train(1, zeros, ConfigRecord(), grid)}
    assert 2 not in sampled and strategy.partitions == {1: 0, 3: 2}
    assert strategy.excluded == {2: "did not say its partition within 0.3s"}
