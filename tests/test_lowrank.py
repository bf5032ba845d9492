"""LoRA on the adapters uploads the update as low-rank factors; the server rebuilds exactly the
adapters the client ended with, for Llama's Linear and GPT-2's transposed Conv1D layers."""

import pytest
import torch
from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict

from fed_crash.config import FederationConfig, TrainConfig
from fed_crash.core.data import pad_id, tokenize
from fed_crash.core.emulator import AdapterError, EmulatorSpec, build_emulator
from fed_crash.core.train import LORA_U, train_adapters
from strategies import OffsiteStrategy, make_strategy
from strategies.lowrank import expand_low_rank
from strategies.offsite import record_bytes
from tests.conftest import ROWS, train_metrics


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    """Messages take run, node and task ids from the process's identity (a ServerApp has one)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def lora_client(model, tokenizer, seed: int):
    """Adapters before and after LoRA training on a tiny emulator, and the factors it uploads."""
    emulator = build_emulator(model, EmulatorSpec(8, 2, 2, kept=(3, 5)))
    start = emulator.adapter_state()
    stats = train_adapters(emulator, tokenize(ROWS, tokenizer, max_length=256), pad_id(tokenizer),
                           TrainConfig(steps=5, lr=1e-2, batch_size=8, lora_rank=2, seed=seed), progress=False)
    return start, emulator.adapter_state(), stats.lora_factors, stats


def test_low_rank_factors_rebuild_the_trained_adapters(tiny_model, tokenizer):
    start, trained, factors, stats = lora_client(tiny_model, tokenizer, seed=0)
    assert factors and all(v.shape[1] == 2 for k, v in factors.items() if k.startswith(LORA_U))  # rank 2
    assert stats.trainable == sum(v.numel() for v in factors.values())  # what trains is what goes up
    dense = expand_low_rank(ArrayRecord(start), ArrayRecord(factors)).to_torch_state_dict()
    assert set(dense) == set(trained)
    for key in trained:
        torch.testing.assert_close(dense[key], trained[key], rtol=0, atol=1e-6)
    assert any(not torch.equal(trained[k], start[k]) for k in trained)
    assert sum(v.numel() for v in factors.values()) < 0.2 * sum(v.numel() for v in trained.values())


def test_offsite_strategy_aggregates_low_rank_replies_as_dense_and_counts_the_factor_bytes(tokenizer, monkeypatch):
    from tests.conftest import tiny_llama

    model = tiny_llama()
    clients = [lora_client(model, tokenizer, seed=i) for i in range(2)]
    start = clients[0][0]
    strategy = OffsiteStrategy(make_strategy(FederationConfig(strategy="fedavg", min_train_nodes=1, min_available_nodes=1)))
    strategy.sent_arrays, strategy.sent_to = ArrayRecord(start), {1: 1, 2: 2}  # what configure_train keeps of the round
    replies = []
    for node, (_, _, factors, _) in enumerate(clients, start=1):
        content = RecordDict({"arrays": ArrayRecord(factors), "metrics": MetricRecord(train_metrics(1))})
        meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="x",
                        group_id="1", created_at=0.0, ttl=600.0, message_type="train")
        replies.append(Message(content=content, metadata=meta))
    upload = [record_bytes(r.content) for r in replies]
    clock = iter([10.0, 12.5])  # the aggregation's start and end
    monkeypatch.setattr("strategies.offsite.time.perf_counter", lambda: next(clock))
    arrays, _ = strategy.aggregate_train(1, replies)
    monkeypatch.undo()
    mean = arrays.to_torch_state_dict()
    for key in start:
        torch.testing.assert_close(mean[key], (clients[0][1][key] + clients[1][1][key]) / 2, rtol=0, atol=1e-6)
    traffic = strategy.rounds[1]
    assert not traffic.failures and len(traffic.clients) == 2
    assert [traffic.up[1], traffic.up[2]] == upload  # the factors' bytes, by partition
    assert max(upload) < 0.2 * ArrayRecord(start).count_bytes()
    assert traffic.aggregate_seconds == 2.5


def test_factors_that_do_not_fit_are_rejected_by_name():
    sent = ArrayRecord({"w": torch.zeros(3, 4)})
    with pytest.raises(AdapterError, match="do not fit adapter weight 'w'"):
        expand_low_rank(sent, ArrayRecord({"lora_u/w": torch.zeros(3, 1), "lora_v/w": torch.zeros(1, 5)}))
    with pytest.raises(AdapterError, match="'lora_u/x'"):
        expand_low_rank(sent, ArrayRecord({"lora_u/x": torch.zeros(3, 1), "lora_v/x": torch.zeros(1, 4)}))
    with pytest.raises(AdapterError, match="'lora_v/w' is unpaired"):
        expand_low_rank(sent, ArrayRecord({"lora_u/w": torch.zeros(3, 1)}))
