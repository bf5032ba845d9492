"""Wrap any Flower strategy for offsite-tuning: emulator once per node, traffic and metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

log = logging.getLogger(__name__)


def record_bytes(content: RecordDict) -> int:
    """Payload size of a message: tensor bytes plus config values (strings and bytes by length)."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += record.count_bytes()
        elif isinstance(record, ConfigRecord):
            total += sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in record.values())
        elif isinstance(record, MetricRecord):
            total += 8 * len(record)
    return total


@dataclass
class RoundTraffic:
    """What one round sent and received, per node."""

    down: dict[int, int] = field(default_factory=dict)
    up: dict[int, int] = field(default_factory=dict)
    emulator_down: dict[int, int] = field(default_factory=dict)
    clients: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)


class OffsiteStrategy(Strategy):
    """Delegates sampling and aggregation to ``inner``; adds the emulator records to the first
    message each node receives (again after :meth:`resend_emulator`), records traffic and
    per-client metrics in ``self.rounds``, and skips federated evaluation. The aggregate keeps
    the dtypes of the adapters sent (server optimizers compute in float64; clients and the
    plug-in check dtypes)."""

    def __init__(self, inner: Strategy, emulator: RecordDict, *, min_available_nodes: int = 1, settle_s: float = 1.0) -> None:
        self.inner = inner
        self.emulator = emulator
        self.sent_emulator: set[int] = set()
        self.rounds: dict[int, RoundTraffic] = {}
        self.min_available_nodes = min_available_nodes
        self.settle_s = settle_s
        self.sent_dtypes: dict[str, str] = {}

    def resend_emulator(self, emulator: RecordDict) -> None:
        """A changed emulator (FedBiOT alignment): every node gets it with its next message."""
        self.emulator = emulator
        self.sent_emulator.clear()

    def _wait_for_nodes(self, grid: Grid) -> None:
        """Wait until enough nodes are connected and their number has settled, so the first
        round samples from all of them (Flower samples before nodes finish connecting)."""
        seen, stable_since = -1, time.monotonic()
        while True:
            count = len(list(grid.get_node_ids()))
            if count != seen:
                seen, stable_since = count, time.monotonic()
            elif count >= self.min_available_nodes and time.monotonic() - stable_since >= self.settle_s:
                return
            time.sleep(0.1)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if server_round == 1:
            self._wait_for_nodes(grid)
        traffic = self.rounds.setdefault(server_round, RoundTraffic())
        self.sent_dtypes = {key: array.dtype for key, array in arrays.items()}
        out = []
        for message in self.inner.configure_train(server_round, arrays, config, grid):
            node = message.metadata.dst_node_id
            content = RecordDict(dict(message.content.items()))
            if node not in self.sent_emulator:
                extra = RecordDict(dict(self.emulator.items()))
                traffic.emulator_down[node] = record_bytes(extra)
                for key, record in self.emulator.items():
                    content[key] = record
                self.sent_emulator.add(node)
            traffic.down[node] = record_bytes(content)
            out.append(Message(content=content, dst_node_id=node, message_type=message.metadata.message_type, group_id=message.metadata.group_id))
        return out

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        traffic = self.rounds.setdefault(server_round, RoundTraffic())
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                traffic.failures.append({"node": node, "reason": reply.error.reason})
                continue
            traffic.up[node] = record_bytes(reply.content)
            metrics = dict(reply.content["metrics"]) if "metrics" in reply.content else {}
            traffic.clients.append({"node": node, **metrics})
        arrays, aggregated = self.inner.aggregate_train(server_round, replies)
        if arrays is not None and any(array.dtype != self.sent_dtypes.get(key, array.dtype) for key, array in arrays.items()):
            arrays = ArrayRecord({key: Array(np.asarray(array.numpy(), dtype=self.sent_dtypes[key])) for key, array in arrays.items()})
        return arrays, aggregated

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []  # the server evaluates the plugged-in model itself (evaluate_fn)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        self.inner.summary()
