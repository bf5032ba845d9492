"""Wrap any Flower strategy for offsite-tuning: the emulator exchange, reproducible sampling,
validated replies, every failure recorded, and round numbers that survive a resume."""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fed_crash.core.emulator import AdapterError
from fed_crash.errors import FedCrashError
from fed_crash.federation import protocol as P
from fed_crash.federation.checkpoint import StrategyState
from fed_crash.federation.faults import FaultPlan
from fed_crash.federation.protocol import RoundTraffic

from .lowrank import expand_low_rank

log = logging.getLogger(__name__)

QUERY_TIMEOUT_S = 600.0  # a node's first message loads the ClientApp (torch, transformers): give it time


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


class WorkAfterTrainPush:
    """The Grid as Flower's round loop sees it in :meth:`OffsiteStrategy.start`: the work handed
    to :meth:`defer` (round 0's evaluation) runs after the next train messages have been pushed,
    while the clients train, told that it ran beside training; then the replies are pulled as
    Flower's own ``send_and_receive`` does (until all have come or ``timeout`` has passed since
    the push, at least once). Every other exchange (partition queries, emulator deliveries)
    passes straight through."""

    def __init__(self, grid: Grid, pull_interval_s: float = 0.2) -> None:
        self._grid, self._pull_interval_s = grid, pull_interval_s
        self._pending: Callable[[bool], object] | None = None

    def defer(self, work: Callable[[bool], object]) -> None:
        self._pending = work

    def flush(self, beside_training: bool = False) -> None:
        """Run the pending work now, if any."""
        work, self._pending = self._pending, None
        if work is not None:
            work(beside_training)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if self._pending is None or not messages or any(m.metadata.message_type != P.TRAIN for m in messages):
            return self._grid.send_and_receive(messages, timeout=timeout)
        pending = list(self._grid.push_messages(messages))
        end = time.time() + (timeout or 0.0)
        log.info("train messages sent to %d nodes; round 0 is evaluated while they train", len(pending))
        self.flush(beside_training=True)
        return pull_replies(self._grid, pending, None if timeout is None else end - time.time(), self._pull_interval_s)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def push_partition_queries(grid: Grid, nodes: Iterable[int]) -> dict[str, int]:
    """Send ``nodes`` the partition query (:func:`protocol.partition_request`) without waiting
    for the answers. Returns ``{message id: node}`` for :func:`pull_partition_answers`."""
    asked = {}
    for node in nodes:
        for message_id in grid.push_messages([P.partition_request(node)]):  # none when Flower refused to store it
            asked[message_id] = node
    return asked


def pull_replies(grid: Grid, message_ids: Iterable[str], timeout: float | None, pull_interval_s: float = 0.1) -> list[Message]:
    """The replies to pushed messages, pulled until all have come or ``timeout`` seconds have
    passed (``None``: until all have come), as Flower's ``send_and_receive`` does after its push."""
    pending, end = set(message_ids), None if timeout is None else time.time() + timeout
    replies: list[Message] = []
    while pending:  # pulls at least once: replies that came while the caller was busy past the timeout count
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or (end is not None and time.time() >= end):
            break
        time.sleep(pull_interval_s)
    return replies


def pull_partition_answers(grid: Grid, asked: dict[str, int], timeout: float) -> tuple[dict[int, tuple[int, int]], dict[int, str]]:
    """The answers to partition queries sent by :func:`push_partition_queries`, pulled for at most
    ``timeout`` seconds. Returns ``{node: (partition, partitions)}`` of those that answered in time
    and in form, and ``{node: reason}`` of the others."""
    found, failed = {}, {}
    for reply in pull_replies(grid, asked, timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            failed[node] = f"did not say its partition: {P.error_reason(reply.error.reason)}"
            continue
        try:
            found[node] = P.read_partition_reply(reply.content)
        except P.ProtocolError as err:
            failed[node] = f"did not say its partition: {err}"
    for node in set(asked.values()) - set(found) - set(failed):
        failed[node] = f"did not say its partition within {timeout:g}s"
    return found, failed


def vet_partitions(known: dict[int, int], num_partitions: int, found: dict[int, tuple[int, int]]) -> tuple[dict[int, int], int, dict[int, str]]:
    """Which of the newly answered nodes may train: ``(node -> partition, partitions, node -> reason
    excluded)``. ``known`` are the nodes already admitted (``num_partitions`` theirs, 0 before the
    first). The partition count is the known one, else the one most new nodes give (ties: the
    larger); a node giving another is excluded. A partition claimed by an admitted node, or by
    two new nodes at once, is trained by none of its new claimants: which of them holds the shard
    cannot be told, and no shard may be trained twice."""
    excluded: dict[int, str] = {}
    if not num_partitions and found:
        counts = Counter(n for _, n in found.values())
        num_partitions = max(counts, key=lambda n: (counts[n], n))
    for node, (pid, n) in found.items():
        if n != num_partitions:
            excluded[node] = f"says num-partitions {n}, the federation has {num_partitions}"
    claims = Counter(pid for node, (pid, _) in found.items() if node not in excluded)
    owners = set(known.values())
    for node, (pid, _) in found.items():
        if node not in excluded and (pid in owners or claims[pid] > 1):
            excluded[node] = f"claims partition {pid}, which " + ("another node already holds" if pid in owners else f"{claims[pid]} nodes claim at once")
    admitted = {node: pid for node, (pid, _) in found.items() if node not in excluded}
    return admitted, num_partitions, excluded


class OffsiteStrategy(Strategy):
    """Delegates sampling and aggregation to ``inner`` and adds what a trustworthy offsite
    federation needs around them:

    * the emulator exchange (:mod:`fed_crash.federation.protocol`): before a round's train
      messages go out, every sampled node that has not acknowledged the current emulator is sent
      it and must acknowledge its hash; a node that replies that it lacks the emulator (its cache
      was cleared) is sent it again before its next round; :meth:`set_emulator` (FedBiOT's
      re-alignment) makes every node receive the new one;
    * nodes are known by partition id (asked once per node, :meth:`connect`), and each round's
      sample is seeded by ``(seed, round)``, so runs with the same seed sample the same clients;
    * injected dropouts (``faults``): a sampled client that is offline is sent nothing;
    * every reply is validated (:func:`protocol.check_train_reply`) and only valid ones, in
      partition order (float sums depend on order), reach ``inner``; error replies, missing
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
        *,
        seed: int = 0,
        min_available_nodes: int = 1,
        min_train_nodes: int = 1,
        node_timeout: float = 600.0,
        min_replies: int = 1,
        max_update_norm: float = 0.0,
        round_timeout: float = 3600.0,
        faults: FaultPlan | None = None,
        round_offset: int = 0,
        settle_s: float = 1.0,
        wire_dtype: str = "fp32",
    ) -> None:
        self.inner = inner
        self.seed = seed
        self.min_available_nodes = min_available_nodes
        self.min_train_nodes = min_train_nodes
        self.node_timeout = node_timeout
        self.min_replies = min_replies
        self.max_update_norm = max_update_norm
        self.round_timeout = round_timeout
        self.faults = faults
        self.round_offset = round_offset
        self.settle_s = settle_s
        self.wire_dtype = wire_dtype  # how adapters travel (protocol.to_wire); the inner strategy sees fp32 only
        self.shard_sizes: dict[int, int] = {}  # partition id -> its shard's rows: the most num-examples a reply may claim
        self.shard_sha256: dict[int, str] = {}  # partition id -> its shard file's hash (split folders only): the node checks its file
        self.clipping = False  # this round's train config asks for clipping (DP): replies carry the DP metrics
        self.emulator: P.EmulatorPayload | None = None
        self.has_emulator: set[int] = set()  # nodes that acknowledged the current emulator
        self.rounds: dict[int, RoundTraffic] = {}
        self.partitions: dict[int, int] = {}  # node id -> partition id of every admitted node
        self.excluded: dict[int, str] = {}  # node id -> why it may not train (asked once, never sampled)
        self._unreported: dict[int, int] = {}  # excluded nodes not yet in a round's failures -> the partition they claimed (-1: none)
        self._asked: dict[str, int] = {}  # message id -> node of partition queries sent by ask_partitions, not yet pulled
        self.num_partitions = 0
        self.sent_to: dict[int, int] = {}  # this round: node id -> partition id of every train message sent
        self.sent_arrays = ArrayRecord()  # this round's adapters: replies are checked against them, low-rank ones expanded from them

    def start(self, *, grid: Grid, initial_arrays: ArrayRecord, evaluate_fn=None, evaluate_round_0_while_training: bool = False, **kwargs):
        """Flower's round loop. With ``evaluate_round_0_while_training``, round 0's evaluation (of
        the starting adapters, which nothing sent depends on) runs after round 1's train messages
        have left instead of before them (:class:`WorkAfterTrainPush`), so clients start training
        at once; its metrics line is still the first one. ``evaluate_fn`` needs a
        ``snapshot(round, arrays)`` method (``RoundEvaluator``): it is called before round 1 is
        configured, and the work it returns runs later, so what it records of the server's state
        is round 0's, not what round 1's sampling left (DP draws from its generator there). Off
        when round 0's evaluation changes what clients get (FedBiOT re-aligns the emulator there).
        Later rounds are evaluated in Flower's order: beside the next round's training they
        made no run faster on a 2-core host (docs/benchmarks.md, table 8, fifth pass)."""
        if evaluate_fn is None or not evaluate_round_0_while_training:
            return super().start(grid=grid, initial_arrays=initial_arrays, evaluate_fn=evaluate_fn, **kwargs)
        overlapped = WorkAfterTrainPush(grid)

        def evaluate_round_0_later(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if flower_round == 0:
                overlapped.defer(evaluate_fn.snapshot(0, arrays))
                return None  # the metrics line is written by the deferred work itself
            overlapped.flush()  # still pending only when round 1 sent no train message
            return evaluate_fn(flower_round, arrays)

        result = super().start(grid=overlapped, initial_arrays=initial_arrays, evaluate_fn=evaluate_round_0_later, **kwargs)  # type: ignore[arg-type]
        overlapped.flush()  # a run of no rounds
        return result

    def set_emulator(self, emulator: P.EmulatorPayload) -> None:
        """The emulator nodes train on; a new one (FedBiOT alignment) reaches every node before its next round."""
        self.emulator = emulator
        self.has_emulator.clear()

    def state_dict(self) -> StrategyState:
        return self.inner.state_dict()

    def load_state_dict(self, state: StrategyState) -> None:
        self.inner.load_state_dict(state)

    def connect(self, grid: Grid) -> dict[int, int]:
        """Wait until at least ``min_available_nodes`` are connected and their number has
        settled (Flower samples before nodes finish connecting), then learn each node's
        partition. Returns ``{node: partition}``; :class:`FedCrashError` after ``node_timeout``."""
        seen, stable_since, deadline = -1, time.monotonic(), time.monotonic() + self.node_timeout
        while True:
            count = len(list(grid.get_node_ids()))
            if count != seen:
                seen, stable_since = count, time.monotonic()
            elif count >= self.min_available_nodes and time.monotonic() - stable_since >= self.settle_s:
                break
            if time.monotonic() > deadline:
                raise FedCrashError(f"{count} node(s) connected within node-timeout {self.node_timeout:g}s, the run needs min-available-nodes "
                                    f"{self.min_available_nodes}: are the SuperNodes running and pointed at this SuperLink?")
            time.sleep(0.1)
        self._learn_partitions(grid)
        return dict(self.partitions)

    def _wait_for_nodes(self, grid: Grid, server_round: int) -> None:
        """Flower's sampler waits without end while fewer nodes are connected than it needs: wait
        here instead, at most ``node_timeout``, for enough admitted nodes (late joiners are asked
        their partition), then fail naming the numbers. The rounds before have their checkpoint."""
        need = max(self.min_available_nodes, self.min_train_nodes)
        deadline = time.monotonic() + self.node_timeout
        while (have := sum(node in self.partitions for node in grid.get_node_ids())) < need:
            if time.monotonic() > deadline:
                raise FedCrashError(
                    f"round {server_round}: {have} admitted node(s) connected, the run needs {need} (min-available-nodes "
                    f"{self.min_available_nodes}, min-train-nodes {self.min_train_nodes}); waited node-timeout {self.node_timeout:g}s"
                    + (f"; {len(self.excluded)} node(s) excluded ({next(iter(self.excluded.values()))}, ...)" if self.excluded else "")
                    + "; resume=true continues after the last finished round")
            time.sleep(min(1.0, self.node_timeout / 10))
            self._learn_partitions(grid)

    def ask_partitions(self, grid: Grid) -> None:
        """Send the partition query to the nodes connected now, without waiting for the answers
        (:meth:`connect` pulls them). A node's first message imports the ClientApp's library
        (torch, transformers: about 10 s on 2 cores); asked as the ServerApp starts, the nodes
        import while the server loads the model and writes the emulator."""
        self._asked.update(push_partition_queries(grid, self._unasked(grid)))

    def _unasked(self, grid: Grid) -> list[int]:
        asked = set(self._asked.values())
        return [node for node in grid.get_node_ids() if node not in self.partitions and node not in self.excluded and node not in asked]

    def _learn_partitions(self, grid: Grid) -> None:
        """Ask nodes seen for the first time for their partition (in deployments nodes join late),
        collect the answers of those asked before (:meth:`ask_partitions`), and admit them by
        :func:`vet_partitions`; a node that does not answer in form or in time, or is not
        admitted, is excluded for the run (asked once, recorded in the next round's failures as
        ``excluded``)."""
        asked, self._asked = {**self._asked, **push_partition_queries(grid, self._unasked(grid))}, {}
        if asked:
            found, failed = pull_partition_answers(grid, asked, max(self.round_timeout, QUERY_TIMEOUT_S))
            admitted, self.num_partitions, refused = vet_partitions(self.partitions, self.num_partitions, found)
            self.partitions.update(admitted)
            for node, reason in {**failed, **refused}.items():
                log.warning("node %d excluded: %s", node, reason)
                self.excluded[node] = reason
                self._unreported[node] = found.get(node, (-1, 0))[0]

    def _sample(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list[Message]:
        """The inner strategy's train messages, its sampler seeded for this round only."""
        connected = set(grid.get_node_ids())
        ordered = PartitionOrderedGrid(grid, sorted((n for n in self.partitions if n in connected), key=self.partitions.__getitem__))
        state = random.getstate()  # leave the global stream as it was
        random.seed(f"{self.seed}:{server_round}")
        try:
            return list(self.inner.configure_train(server_round, arrays, config, ordered))
        finally:
            random.setstate(state)

    def _deliver_emulator(self, grid: Grid, nodes: list[int], traffic: RoundTraffic) -> None:
        """Send the emulator to ``nodes``; the ones that acknowledge it join :attr:`has_emulator`,
        the rest are recorded as failed."""
        if self.emulator is None:  # no emulator set: tests of aggregation alone, nothing to deliver
            self.has_emulator |= set(nodes)
            return
        if not nodes:
            return
        start = time.perf_counter()
        requests = {node: self.emulator.request(node) for node in nodes}
        for node, request in requests.items():
            traffic.emulator_down[self.partitions[node]] = record_bytes(request.content)
        acked = set()
        for reply in grid.send_and_receive(list(requests.values()), timeout=max(self.round_timeout, QUERY_TIMEOUT_S)):
            node = reply.metadata.src_node_id
            reason = P.error_reason(reply.error.reason) if reply.has_error() else P.check_emulator_ack(reply.content, self.emulator.sha256)
            if reason:
                traffic.fail(self.partitions[node], node, "error", f"emulator not stored: {reason}")
            else:
                acked.add(node)
        for node in set(nodes) - acked - {f["node"] for f in traffic.failures}:
            traffic.fail(self.partitions[node], node, "timeout", f"no emulator acknowledgement within {max(self.round_timeout, QUERY_TIMEOUT_S):g}s")
        self.has_emulator |= acked
        traffic.emulator_seconds = time.perf_counter() - start

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        if not self.partitions:
            self.connect(grid)
        else:
            self._learn_partitions(grid)
        self._wait_for_nodes(grid, server_round)
        traffic = self.rounds.setdefault(server_round, RoundTraffic())
        for node, pid in self._unreported.items():
            traffic.fail(pid, node, "excluded", self.excluded[node])
        self._unreported.clear()
        config = ConfigRecord({**config, **P.train_config(self.emulator.sha256 if self.emulator else "", self.wire_dtype)})
        ready = []
        sampled = self._sample(server_round, arrays, config, grid)
        if self.wire_dtype == "bf16" and sampled:  # one encoded record for every message; replies are checked against what nodes received
            wire = P.to_wire(sampled[0].content[P.ARRAYS].to_torch_state_dict(), self.wire_dtype)
            arrays = ArrayRecord(P.from_wire(wire, torch.float32))
            for message in sampled:
                message.content = RecordDict({**message.content, P.ARRAYS: wire})
        self.sent_arrays = arrays
        self.clipping = any(P.CLIPPING_NORM in m.content[P.CONFIG] for m in sampled)
        for message in sampled:
            node = message.metadata.dst_node_id
            window = self.faults.offline(self.partitions[node], server_round) if self.faults else None
            if window:
                traffic.fail(self.partitions[node], node, "offline", f"offline in rounds {window[0]}-{window[1]} (faults.dropout-rate): sent nothing")
            else:
                ready.append(message)
        self._deliver_emulator(grid, [m.metadata.dst_node_id for m in ready if m.metadata.dst_node_id not in self.has_emulator], traffic)
        out = [m for m in ready if m.metadata.dst_node_id in self.has_emulator]
        self.sent_to = {m.metadata.dst_node_id: self.partitions[m.metadata.dst_node_id] for m in out}
        for message in out:
            pid = self.partitions[message.metadata.dst_node_id]
            if self.shard_sha256:  # each node its own hash: a RecordDict of its own (Flower's messages share one)
                message.content = RecordDict({**message.content, P.CONFIG: ConfigRecord({**message.content[P.CONFIG], P.SHARD_SHA256: self.shard_sha256[pid]})})
            traffic.down[pid] = record_bytes(message.content) + traffic.emulator_down.get(pid, 0)  # the round's whole download
        return out

    def _check(self, reply: Message) -> tuple[str | None, float | None]:
        """Decode the reply's wire dtype, expand a low-rank reply to dense adapters, then validate it."""
        content = reply.content
        if self.wire_dtype == "bf16" and isinstance(content.get(P.ARRAYS), ArrayRecord):
            content[P.ARRAYS] = ArrayRecord(P.from_wire(content[P.ARRAYS], torch.float32))
        if isinstance(content.get(P.ARRAYS), ArrayRecord) and P.is_low_rank(content[P.ARRAYS]):
            try:
                content[P.ARRAYS] = expand_low_rank(self.sent_arrays, content[P.ARRAYS])
            except AdapterError as err:
                return str(err), None
        pid = self.sent_to.get(reply.metadata.src_node_id)
        return P.check_train_reply(content, self.sent_arrays, clipping=self.clipping, max_examples=self.shard_sizes.get(pid),
                                   max_update_norm=self.max_update_norm)

    def _sort_replies(self, server_round: int, replies: Iterable[Message], traffic: RoundTraffic) -> list[tuple[int, Message]]:
        """The valid replies in partition order; every other outcome recorded in ``traffic``."""
        valid, answered = [], set()
        for reply in replies:
            node = reply.metadata.src_node_id
            pid = self.sent_to.get(node, self.partitions.get(node, -1))
            answered.add(node)
            if reply.has_error():
                traffic.fail(pid, node, "error", P.error_reason(reply.error.reason))
                continue
            traffic.up[pid] = record_bytes(reply.content)
            if P.lacks_emulator(reply.content):
                self.has_emulator.discard(node)
                traffic.fail(pid, node, "no-emulator", "the node lacks the emulator (its cache was cleared?): it is sent again before its next round")
                continue
            reason, norm = self._check(reply)
            if reason:
                traffic.fail(pid, node, "rejected", reason)
                continue
            traffic.clients.append({**dict(reply.content[P.METRICS]), "partition": pid, "node": node, "received-norm": norm})
            valid.append((pid, reply))
        for node, pid in self.sent_to.items():
            if node not in answered:
                traffic.fail(pid, node, "timeout", f"no reply within round-timeout {self.round_timeout:g}s")
        traffic.clients.sort(key=lambda c: c["partition"])
        traffic.failures.sort(key=lambda f: f["partition"])
        for failure in traffic.failures:
            log.warning("round %d: client %d %s: %s", server_round, failure["partition"], failure["kind"], failure["reason"].strip())
        return sorted(valid, key=lambda item: item[0])

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        start = time.perf_counter()
        server_round += self.round_offset
        traffic = self.rounds.setdefault(server_round, RoundTraffic())
        valid = self._sort_replies(server_round, replies, traffic)
        arrays, aggregated = None, None
        if len(valid) < self.min_replies:
            traffic.note = f"{len(valid)} valid update(s), fewer than min-replies {self.min_replies}: the previous adapters are kept"
        else:
            arrays, aggregated = self.inner.aggregate_train(server_round, [reply for _, reply in valid])
            if arrays is None:
                traffic.note = "the strategy released no aggregate: the previous adapters are kept"
            traffic.privacy = {k: v for k, v in (aggregated or {}).items() if k in P.PRIVACY_METRICS}
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
