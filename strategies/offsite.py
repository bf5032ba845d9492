"""Wrap any Flower strategy for offsite-tuning: emulator once per node, reproducible sampling,
validated replies, every failure recorded, and round numbers that survive a resume."""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fed_crash.core.emulator import AdapterError
from fed_crash.federation.faults import FaultPlan

from .lowrank import expand_low_rank, is_low_rank
from .validate import ARRAYS_KEY, check_reply

log = logging.getLogger(__name__)

QUERY_TIMEOUT_S = 600.0  # a node's first message loads the ClientApp (torch, transformers): give it time
PARTITION_KEY = "partition-id"  # node config keys a node reports when asked (QUERY message)
NUM_PARTITIONS_KEY = "num-partitions"
CLIENT_RECORD = "client"  # the ConfigRecord that carries them


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
    """What one round sent and received, per client (partition id: node ids change from run to
    run, partition ids do not), which clients failed and why, and whether it aggregated."""

    down: dict[int, int] = field(default_factory=dict)
    up: dict[int, int] = field(default_factory=dict)
    emulator_down: dict[int, int] = field(default_factory=dict)
    clients: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)  # {"partition", "node", "kind", "reason"}; kind: offline, error, timeout, rejected
    aggregated: bool = False  # False: the round kept the previous adapters (see note)
    note: str = ""
    aggregate_seconds: float = 0.0  # the server's aggregation, low-rank expansion and validation included


class PartitionOrderedGrid:
    """The Grid as the inner strategy sees it: the connected nodes whose partition is known,
    listed in partition order. Flower samples with ``random.sample`` over this list; seeded per
    round (:meth:`OffsiteStrategy.configure_train`), it picks the same partitions in every run,
    whatever node ids the run drew."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid = grid
        self._nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def query_partitions(grid: Grid, nodes: Iterable[int], timeout: float) -> dict[int, tuple[int, int]]:
    """Ask nodes for their ``partition-id`` and ``num-partitions`` (the ClientApp's query
    handler answers from its node config); ``{node: (partition, partitions)}`` of those that
    answered in time."""
    messages = [Message(RecordDict({"config": ConfigRecord({"want": PARTITION_KEY})}), dst_node_id=node, message_type=MessageType.QUERY)
                for node in nodes]
    found = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            log.warning("node %d did not say its partition: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        record = reply.content[CLIENT_RECORD]
        found[reply.metadata.src_node_id] = (int(record[PARTITION_KEY]), int(record[NUM_PARTITIONS_KEY]))
    return found


_EXCEPTION_LINE = re.compile(r"^(?:\w+\.)*(\w+(?:Error|Exception|Fault)): (.+)$", re.M)
_WRAPPERS = ("ClientAppException", "RayTaskError")  # how Flower's simulation wraps a ClientApp's exception


def error_reason(reason: str) -> str:
    """The client's own exception from Flower's error reason (in simulation, a Ray traceback
    around it, with process ids and paths that differ from run to run): ``Type: message``."""
    for name, message in _EXCEPTION_LINE.findall(reason):
        if name not in _WRAPPERS:
            return f"{name}: {message.strip()}"
    return " ".join(reason.split())[:300]


def _weight_key(strategy: Strategy) -> str:
    """The metric the strategy weights replies by (DP wrappers keep the wrapped one in ``strategy``)."""
    return getattr(strategy, "strategy", strategy).weighted_by_key


class OffsiteStrategy(Strategy):
    """Delegates sampling and aggregation to ``inner`` and adds what a trustworthy offsite
    federation needs around them:

    * the emulator records go with every message to a node until the node has answered one
      without error (a node that crashed or timed out may not have kept it; Flower drops the
      state of a ClientApp that raised), and again after :meth:`resend_emulator`;
    * nodes are known by partition id (asked once per node, :meth:`connect`), and each round's
      sample is seeded by ``(seed, round)``, so runs with the same seed sample the same clients;
    * injected dropouts (``faults``): a sampled client that is offline is sent nothing;
    * every reply is validated (:func:`strategies.validate.check_reply`) and only valid ones,
      in partition order (float sums depend on order), reach ``inner``; error replies, missing
      replies (timeouts) and rejected ones are recorded with their reason in ``self.rounds``;
    * a round with fewer than ``min_replies`` valid updates keeps the previous adapters;
    * ``round_offset``: a resumed run starts Flower's loop (which counts from 1) for the
      remaining rounds, and the wrapper shifts the numbers so the inner strategy (FedAdam's bias
      correction), the clients (seeds) and the records see the run's true round.

    The aggregate keeps the dtypes of the adapters sent (server optimizers compute in float64;
    clients and the plug-in check dtypes). No federated evaluation: the server evaluates the
    plugged-in model itself."""

    def __init__(
        self,
        inner: Strategy,
        emulator: RecordDict,
        *,
        seed: int = 0,
        min_available_nodes: int = 1,
        min_replies: int = 1,
        max_update_norm: float = 0.0,
        round_timeout: float = 3600.0,
        faults: FaultPlan | None = None,
        round_offset: int = 0,
        settle_s: float = 1.0,
    ) -> None:
        self.inner = inner
        self.emulator = emulator
        self.seed = seed
        self.min_available_nodes = min_available_nodes
        self.min_replies = min_replies
        self.max_update_norm = max_update_norm
        self.round_timeout = round_timeout
        self.faults = faults
        self.round_offset = round_offset
        self.settle_s = settle_s
        self.weight_key = _weight_key(inner)
        self.has_emulator: set[int] = set()  # nodes that answered a message that carried the current emulator
        self.rounds: dict[int, RoundTraffic] = {}
        self.partitions: dict[int, int] = {}  # node id -> partition id
        self.num_partitions = 0
        self.sent_to: dict[int, int] = {}  # this round: node id -> partition id of every message sent
        self.sent_arrays = ArrayRecord()  # this round's adapters: replies are checked against them, low-rank ones expanded from them

    def resend_emulator(self, emulator: RecordDict) -> None:
        """A changed emulator (FedBiOT alignment): every node gets it with its next message."""
        self.emulator = emulator
        self.has_emulator.clear()

    def connect(self, grid: Grid) -> dict[int, int]:
        """Wait until at least ``min_available_nodes`` are connected and their number has
        settled (Flower samples before nodes finish connecting), then learn each node's
        partition. Returns ``{node: partition}``."""
        seen, stable_since = -1, time.monotonic()
        while True:
            count = len(list(grid.get_node_ids()))
            if count != seen:
                seen, stable_since = count, time.monotonic()
            elif count >= self.min_available_nodes and time.monotonic() - stable_since >= self.settle_s:
                break
            time.sleep(0.1)
        self._learn_partitions(grid)
        return dict(self.partitions)

    def _learn_partitions(self, grid: Grid) -> None:
        """Ask nodes seen for the first time for their partition (in deployments nodes join late)."""
        new = [node for node in grid.get_node_ids() if node not in self.partitions]
        if new:
            found = query_partitions(grid, new, max(self.round_timeout, QUERY_TIMEOUT_S))
            for node in set(new) - set(found):
                log.warning("node %d did not say its partition within %.0fs: it is not sampled", node, max(self.round_timeout, QUERY_TIMEOUT_S))
            self.partitions.update({node: pid for node, (pid, _) in found.items()})
            self.num_partitions = max([self.num_partitions, *(n for _, n in found.values())])

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        if not self.partitions:
            self.connect(grid)
        else:
            self._learn_partitions(grid)
        traffic = self.rounds.setdefault(server_round, RoundTraffic())
        self.sent_arrays = arrays
        connected = set(grid.get_node_ids())
        ordered = PartitionOrderedGrid(grid, sorted((n for n in self.partitions if n in connected), key=self.partitions.__getitem__))
        state = random.getstate()  # seed Flower's sampler for this round only; leave the global stream as it was
        random.seed(f"{self.seed}:{server_round}")
        try:
            messages = list(self.inner.configure_train(server_round, arrays, config, ordered))
        finally:
            random.setstate(state)
        out, self.sent_to = [], {}
        for message in messages:
            node = message.metadata.dst_node_id
            pid = self.partitions[node]
            window = self.faults.offline(pid, server_round) if self.faults else None
            if window:
                traffic.failures.append({"partition": pid, "node": node, "kind": "offline",
                                         "reason": f"offline in rounds {window[0]}-{window[1]} (faults.dropout-rate): sent nothing"})
                continue
            content = RecordDict(dict(message.content.items()))
            if node not in self.has_emulator:
                extra = RecordDict(dict(self.emulator.items()))
                traffic.emulator_down[pid] = record_bytes(extra)
                for key, record in self.emulator.items():
                    content[key] = record
            traffic.down[pid] = record_bytes(content)
            self.sent_to[node] = pid
            out.append(Message(content=content, dst_node_id=node, message_type=message.metadata.message_type, group_id=message.metadata.group_id))
        return out

    def _check(self, reply: Message) -> tuple[str | None, float | None]:
        """Expand a low-rank reply to dense adapters, then validate it."""
        content = reply.content
        if isinstance(content.get(ARRAYS_KEY), ArrayRecord) and is_low_rank(content[ARRAYS_KEY]):
            try:
                content[ARRAYS_KEY] = expand_low_rank(self.sent_arrays, content[ARRAYS_KEY])
            except AdapterError as err:
                return str(err), None
        return check_reply(content, self.sent_arrays, weight_key=self.weight_key, max_update_norm=self.max_update_norm)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        start = time.perf_counter()
        server_round += self.round_offset
        traffic = self.rounds.setdefault(server_round, RoundTraffic())
        valid, answered = [], set()
        for reply in replies:
            node = reply.metadata.src_node_id
            pid = self.sent_to.get(node, self.partitions.get(node, -1))
            answered.add(node)
            if reply.has_error():  # a node that failed may have lost what it was sent: it gets the emulator again
                traffic.failures.append({"partition": pid, "node": node, "kind": "error", "reason": error_reason(reply.error.reason)})
                continue
            self.has_emulator.add(node)
            traffic.up[pid] = record_bytes(reply.content)
            reason, norm = self._check(reply)
            if reason:
                traffic.failures.append({"partition": pid, "node": node, "kind": "rejected", "reason": reason})
                continue
            traffic.clients.append({"partition": pid, "node": node, **dict(reply.content["metrics"]), "received-norm": norm})
            valid.append((pid, reply))
        for node, pid in self.sent_to.items():
            if node not in answered:
                traffic.failures.append({"partition": pid, "node": node, "kind": "timeout", "reason": f"no reply within round-timeout {self.round_timeout:g}s"})
        traffic.clients.sort(key=lambda c: c["partition"])
        traffic.failures.sort(key=lambda f: f["partition"])
        for failure in traffic.failures:
            log.warning("round %d: client %d %s: %s", server_round, failure["partition"], failure["kind"], failure["reason"].strip())
        valid.sort(key=lambda item: item[0])
        arrays, aggregated = None, None
        if len(valid) < self.min_replies:
            traffic.note = f"{len(valid)} valid update(s), fewer than min-replies {self.min_replies}: the previous adapters are kept"
        else:
            arrays, aggregated = self.inner.aggregate_train(server_round, [reply for _, reply in valid])
            if arrays is None:
                traffic.note = "the strategy released no aggregate: the previous adapters are kept"
        if traffic.note:
            log.warning("round %d: %s", server_round, traffic.note)
        sent_dtypes = {key: array.dtype for key, array in self.sent_arrays.items()}
        if arrays is not None and any(array.dtype != sent_dtypes[key] for key, array in arrays.items()):
            arrays = ArrayRecord({key: Array(np.asarray(array.numpy(), dtype=sent_dtypes[key])) for key, array in arrays.items()})
        traffic.aggregated = arrays is not None
        traffic.aggregate_seconds = time.perf_counter() - start
        return arrays, aggregated

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []  # the server evaluates the plugged-in model itself (evaluate_fn)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        self.inner.summary()
