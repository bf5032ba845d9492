"""The federation's wire protocol: every message type, record key and metric name the server
and the clients exchange, and the check of each message, in both directions.

Three exchanges, each a request from the server and one reply per node:

* **partition** (``query``): the node says which partition of the client pool it holds
  (``partition-id``, ``num-partitions`` of its node config), so the server samples and orders
  clients by partition, not by the node ids Flower draws at random.
* **emulator** (``train.emulator``): the emulator's tensors and small files (manifest, model
  config, tokenizer), sent before a node's first training round and again whenever it reports
  that it lacks them; the node checks and stores them, and acknowledges with their content hash
  (:func:`payload_sha256`, of the tensors and every file).
* **train** (``train``): exactly Flower's shape, one ArrayRecord (the adapters) and one
  ConfigRecord (the round, the emulator's content hash, and whatever the strategy adds: FedProx's
  ``proximal-mu``, the DP wrapper's ``clipping_norm``), so Flower's client-side clipping mod and
  DP wrappers apply unchanged. The reply holds the trained adapters (or, under LoRA, the
  update's factors) and one MetricRecord; a node whose cache lost the emulator replies with the
  adapters it was sent and ``emulator-missing = 1`` instead of training.

**Wire dtype** (run config ``wire-dtype``): in ``bf16`` the emulator's weights and the adapters
in both directions travel rounded to bf16, as their uint16 bit patterns (Flower's arrays are
numpy, which has no bf16): :func:`to_wire` and :func:`from_wire` are the only two places that
know it. Both sides decode adapters to fp32 on arrival and compute on fp32 copies.

The server never trusts a reply: :func:`check_train_reply` decides what may reach the aggregate.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fed_crash.config import WIRE_DTYPES
from fed_crash.core.artifacts import MANIFEST, ArtifactError, check_payload_files, parse_manifest
from fed_crash.core.models import state_hash
from fed_crash.core.train import LORA_U, LORA_V

# ---- message types
PARTITION = MessageType.QUERY
EMULATOR = f"{MessageType.TRAIN}.emulator"
TRAIN = MessageType.TRAIN

# ---- record keys (ARRAYS and CONFIG are Flower's defaults, so its strategies read and write them)
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
CLIENT = "client"  # partition reply: ConfigRecord {PARTITION_ID, NUM_PARTITIONS}
EMULATOR_WEIGHTS = "emulator"  # emulator request: ArrayRecord of the emulator's tensors
EMULATOR_FILES = "emulator-files"  # emulator request: ConfigRecord file name -> bytes
EMULATOR_ACK = "emulator-ack"  # emulator reply: ConfigRecord {EMULATOR_SHA256}

# ---- node config and ConfigRecord keys
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
EMULATOR_SHA256 = "emulator-sha256"  # content hash of everything an emulator request holds (:func:`payload_sha256`)
SHARD_SHA256 = "shard-sha256"  # train config, split folders only: the sha256 the server holds for this node's shard file
SHARD_FILE = "shard-file"  # node config, split folders only: the SuperNode's own shard file
WIRE_DTYPE = "wire-dtype"  # train config: "fp32" or "bf16", how the adapters travel (both ways)
SERVER_ROUND = "server-round"  # set by Flower's strategies
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx
CLIPPING_NORM = KEY_CLIPPING_NORM  # set by Flower's DP wrapper, read by its fixedclipping_mod

# ---- metric names of a train reply
NUM_EXAMPLES = "num-examples"  # the weight of FedAvg-style means
UNIT_WEIGHT = "unit-weight"  # always 1: the weight of an unweighted mean (client-weight = "equal", and DP)
EMULATOR_MISSING = "emulator-missing"  # 1: the node lacks the emulator and did not train
UPDATE_NORM = "update-norm"


@dataclass(frozen=True)
class Metric:
    """One metric of a train reply: what it is and the values the server accepts."""

    help: str
    low: float | None = 0.0  # inclusive bounds (None: any finite value)
    high: float | None = None
    integer: bool = False
    dp_only: bool = False  # sent (and required) exactly when the train config asks for clipping


CLIENT_METRICS = {  # every metric a train reply carries, always the same set for a given config
    NUM_EXAMPLES: Metric("examples in the node's shard (at most the shard's size, which the server knows)", low=1, integer=True),
    "train-loss": Metric("mean loss of the last tenth of the local steps"),
    "first-loss": Metric("loss of the first local step"),
    "tokens": Metric("response tokens trained on", integer=True),
    "steps": Metric("optimizer steps", integer=True),
    "seconds": Metric("local training"),
    "step-seconds": Metric("one optimizer step, median after the first"),
    "delivery-seconds": Metric("from the server creating the train message to the handler starting (two clocks: any sign)", low=None),
    "load-seconds": Metric("assembling the emulator (once per worker process)"),
    "data-seconds": Metric("partitioning and tokenizing the shard (once per worker process and node)"),
    "threads": Metric("torch threads (Ray sets them to the actor's CPUs)", low=1, integer=True),
    "peak-rss-mib": Metric("peak resident memory of the worker process so far"),
    "worker-pid": Metric("the worker process (a Ray actor serves many nodes): how many actors ran", low=1, integer=True),
    "gpu-id": Metric("the first GPU Ray assigned the worker (CUDA_VISIBLE_DEVICES), -1 for none", low=-1, integer=True),
    "on-cuda": Metric("1 when the client trained on CUDA, 0 on the CPU", low=0, high=1, integer=True),
    "start-time": Metric("wall-clock time (s since the epoch) the train handler started: actors' concurrency"),
    "end-time": Metric("wall-clock time it replied"),
    UPDATE_NORM: Metric("L2 norm of the update before clipping", dp_only=True),
    UNIT_WEIGHT: Metric("the weight of an unweighted mean: exactly 1 (client-weight = 'equal'; under DP equal weights are what the noise is calibrated to)", low=1, high=1, integer=True),
}


def train_metric_names(clipping: bool) -> set[str]:
    """The metric names of a train reply: the DP ones too when the config asks for clipping."""
    return {name for name, metric in CLIENT_METRICS.items() if clipping or not metric.dp_only}


def check_metrics(values: MetricRecord, *, clipping: bool, max_examples: int | None = None) -> str | None:
    """``None`` when the MetricRecord holds exactly :func:`train_metric_names`, each a finite
    number within its :class:`Metric` bounds and ``num-examples`` at most ``max_examples`` (the
    shard's size), else the reason. An exact set: Flower's aggregation raises on replies whose
    keys differ, and the server's records read every name."""
    names = train_metric_names(clipping)
    unknown, missing = sorted(set(values) - names), sorted(names - set(values))
    if unknown or missing:
        found = "; ".join(f"{what}: {keys}" for what, keys in (("unknown", unknown), ("missing", missing)) if keys)
        return f"metrics {found}; a train reply reports exactly {sorted(names)}"
    for name, value in values.items():
        metric = CLIENT_METRICS[name]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return f"metric {name!r} must be a finite number, got {value!r}"
        if metric.integer and value != int(value):
            return f"metric {name!r} must be a whole number, got {value!r}"
        high = max_examples if name == NUM_EXAMPLES and max_examples is not None else metric.high
        if (metric.low is not None and value < metric.low) or (high is not None and value > high):
            bounds = f"in [{metric.low:g}, {high:g}]" if high is not None else f">= {metric.low:g}"
            return f"metric {name!r} must be {bounds}, got {value!r}" + (" (the shard's size)" if name == NUM_EXAMPLES and high == max_examples else "")
    return None


SERVER_FIELDS = ("partition", "node", "received-norm")  # what the server adds to a client's metrics line

# ---- what a DP strategy reports with a released aggregate (server side)
DP_EPSILON, DP_DELTA, DP_RELEASES = "dp-epsilon", "dp-delta", "dp-releases"
PRIVACY_METRICS = (DP_EPSILON, DP_DELTA, DP_RELEASES)


class ProtocolError(ArtifactError):
    """A message that does not follow this protocol; the message names the record or key."""


@dataclass
class RoundTraffic:
    """What one round sent and received, per client (partition id: node ids change from run to
    run, partition ids do not), which clients failed and why, and whether it aggregated."""

    down: dict[int, int] = field(default_factory=dict)
    up: dict[int, int] = field(default_factory=dict)
    emulator_down: dict[int, int] = field(default_factory=dict)
    clients: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)  # {"partition", "node", "kind", "reason"}; kind: offline, error, timeout, rejected, no-emulator, excluded
    aggregated: bool = False  # False: the round kept the previous adapters (see note)
    note: str = ""
    emulator_seconds: float = 0.0  # the emulator exchange before training (send, store, acknowledge)
    aggregate_seconds: float = 0.0  # the server's aggregation, low-rank expansion and validation included
    privacy: dict[str, float] = field(default_factory=dict)  # PRIVACY_METRICS of a DP round that was released

    def fail(self, pid: int, node: int, kind: str, reason: str) -> None:
        self.failures.append({"partition": pid, "node": node, "kind": kind, "reason": reason})



# --------------------------------------------------------------------------- partition


def partition_request(node: int) -> Message:
    return Message(RecordDict(), dst_node_id=node, message_type=PARTITION)


def partition_reply(msg: Message, partition_id: int, num_partitions: int) -> Message:
    record = ConfigRecord({PARTITION_ID: partition_id, NUM_PARTITIONS: num_partitions})
    return Message(RecordDict({CLIENT: record}), reply_to=msg)


def read_partition_reply(content: RecordDict) -> tuple[int, int]:
    """``(partition id, partitions)``; :class:`ProtocolError` for anything else."""
    record = content.config_records.get(CLIENT)
    values = tuple(record.get(k) if record else None for k in (PARTITION_ID, NUM_PARTITIONS))
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values) or not 0 <= values[0] < values[1]:
        raise ProtocolError(f"partition reply: expected ConfigRecord {CLIENT!r} with integers 0 <= {PARTITION_ID} < {NUM_PARTITIONS}, got {values}")
    return values  # type: ignore[return-value]


# --------------------------------------------------------------------------- emulator


# --------------------------------------------------------------------------- wire dtype


def to_wire(tensors: dict[str, torch.Tensor], wire_dtype: str) -> ArrayRecord:
    """An ArrayRecord of ``tensors``: in ``bf16`` every floating tensor rounded to bf16; in
    ``fp32`` and ``auto`` (which rounds only the emulator's matrices, when it is written) as
    they are. bf16 tensors travel as their uint16 bit patterns, which :func:`from_wire` turns
    back into the same bf16 values."""
    def encode(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach().to("cpu")
        if wire_dtype == "bf16" and tensor.is_floating_point():
            tensor = tensor.to(torch.bfloat16)
        return tensor.contiguous().view(torch.uint16) if tensor.dtype == torch.bfloat16 else tensor

    return ArrayRecord({key: encode(tensor) for key, tensor in tensors.items()})


def from_wire(record: ArrayRecord, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a record :func:`to_wire` made: uint16 arrays are bf16 bit patterns (no
    model tensor is uint16), whatever the wire dtype; ``dtype``: floating tensors cast to it
    (adapters: fp32), else kept as they travelled (the emulator: its content hash is of the
    values stored)."""
    tensors = record.to_torch_state_dict()
    tensors = {k: v.view(torch.bfloat16) if v.dtype == torch.uint16 else v for k, v in tensors.items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return tensors


MAX_PAYLOAD_FILES = 32  # an emulator request's small files (manifest, config, tokenizer) ...
MAX_PAYLOAD_FILE_BYTES = 64 * 2**20  # ... each at most this large (Gemma-3's tokenizer.json is 33 MB)


def payload_sha256(weights_sha256: str, files: dict[str, bytes]) -> str:
    """Content hash of an emulator request: the tensors' :func:`state_hash` (given: each side
    has it already, the tensors are hashed once) and every file's name and bytes. Nodes key their
    cache by it, so a changed manifest or tokenizer is a new emulator even when the weights are
    the same."""
    digest = hashlib.sha256(weights_sha256.encode())
    for name in sorted(files):
        digest.update(b"\0" + name.encode() + b"\0" + hashlib.sha256(files[name]).hexdigest().encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class EmulatorPayload:
    """What a node needs once: the emulator's tensors and small files (already checked by
    :func:`fed_crash.core.artifacts.check_private` on the server), and their :func:`payload_sha256`."""

    weights: ArrayRecord
    files: ConfigRecord
    sha256: str

    def request(self, node: int) -> Message:
        return Message(RecordDict({EMULATOR_WEIGHTS: self.weights, EMULATOR_FILES: self.files}), dst_node_id=node, message_type=EMULATOR)


def read_emulator_request(content: RecordDict) -> tuple[dict, dict[str, bytes], dict, str]:
    """``(tensors, files, manifest, payload sha256)`` of an emulator request, after checking that
    there are at most :data:`MAX_PAYLOAD_FILES` files of at most :data:`MAX_PAYLOAD_FILE_BYTES`,
    each a plain data file (no path, no checkpoint), the manifest's format, and that the tensors'
    content hash is the manifest's ``weights_sha256`` (nothing corrupted or replaced in transit)."""
    if set(content) != {EMULATOR_WEIGHTS, EMULATOR_FILES}:
        raise ProtocolError(f"emulator request: expected records {[EMULATOR_WEIGHTS, EMULATOR_FILES]}, got {sorted(content)}")
    blobs = content[EMULATOR_FILES]
    if len(blobs) > MAX_PAYLOAD_FILES:
        raise ProtocolError(f"emulator request: {len(blobs)} files, at most {MAX_PAYLOAD_FILES} travel with an emulator")
    files = {}
    for name, blob in blobs.items():
        if not isinstance(blob, bytes) or len(blob) > MAX_PAYLOAD_FILE_BYTES:
            raise ProtocolError(f"emulator request: file {name!r} must be bytes of at most {MAX_PAYLOAD_FILE_BYTES // 2**20} MiB")
        files[name] = blob
    check_payload_files(files)
    if MANIFEST not in files:
        raise ProtocolError(f"emulator request: no {MANIFEST} among the files {sorted(files)}")
    manifest = parse_manifest(files[MANIFEST], "received emulator manifest")
    weights = from_wire(content[EMULATOR_WEIGHTS])
    weights_sha256 = state_hash(weights)
    if weights_sha256 != manifest["weights_sha256"]:
        raise ProtocolError(f"the emulator received does not match its manifest's weights_sha256 {manifest['weights_sha256'][:16]} "
                            "(corrupted or replaced in transit); nothing was stored")
    return weights, files, manifest, payload_sha256(weights_sha256, files)


def emulator_ack(msg: Message, sha256: str) -> Message:
    return Message(RecordDict({EMULATOR_ACK: ConfigRecord({EMULATOR_SHA256: sha256})}), reply_to=msg)


def check_emulator_ack(content: RecordDict, expected_sha256: str) -> str | None:
    """``None`` when the node stored exactly what was sent (its hash of what it received), else the reason."""
    got = content.config_records.get(EMULATOR_ACK, {}).get(EMULATOR_SHA256)
    return None if got == expected_sha256 else f"emulator acknowledgement names {str(got)[:16]!r}, expected {expected_sha256[:16]!r}"


# --------------------------------------------------------------------------- train


@dataclass(frozen=True)
class TrainRequest:
    """A train message as the client reads it."""

    adapters: dict
    server_round: int
    emulator_sha256: str
    shard_sha256: str  # "" unless the run reads a split folder
    proximal_mu: float
    clipping_norm: float | None  # DP on: Flower's fixedclipping_mod clips the reply to it
    wire_dtype: str = "fp32"  # how the adapters travelled, and how the reply must travel


def train_config(emulator_sha256: str, wire_dtype: str = "fp32") -> dict:
    """What the server adds to every round's train config: which emulator to train on, and the wire dtype."""
    return {EMULATOR_SHA256: emulator_sha256, WIRE_DTYPE: wire_dtype}


def read_train_request(content: RecordDict) -> TrainRequest:
    if list(content.array_records) != [ARRAYS] or list(content.config_records) != [CONFIG]:
        raise ProtocolError(f"train message: expected ArrayRecord {ARRAYS!r} and ConfigRecord {CONFIG!r}, got records {sorted(content)}")
    config = content[CONFIG]
    if not isinstance(config.get(SERVER_ROUND), int) or not isinstance(config.get(EMULATOR_SHA256), str):
        raise ProtocolError(f"train message: config needs integer {SERVER_ROUND!r} and string {EMULATOR_SHA256!r}, got {dict(config)}")
    norm, wire = config.get(CLIPPING_NORM), config.get(WIRE_DTYPE, "fp32")
    if wire not in WIRE_DTYPES:
        raise ProtocolError(f"train message: {WIRE_DTYPE!r} must be one of {list(WIRE_DTYPES)}, got {wire!r}")
    return TrainRequest(from_wire(content[ARRAYS], torch.float32), int(config[SERVER_ROUND]), str(config[EMULATOR_SHA256]),
                        str(config.get(SHARD_SHA256, "")), float(config.get(PROXIMAL_MU, 0.0)), float(norm) if norm is not None else None, wire)


def train_reply(msg: Message, arrays: dict, metrics: dict, wire_dtype: str = "fp32") -> Message:
    return Message(RecordDict({ARRAYS: to_wire(arrays, wire_dtype), METRICS: MetricRecord(metrics)}), reply_to=msg)


def emulator_missing_reply(msg: Message, sent: dict, wire_dtype: str = "fp32") -> Message:
    """A node without the emulator answers with the adapters it was sent (so Flower's clipping
    mod, which checks the reply's keys, passes it through) and no training."""
    return train_reply(msg, sent, {EMULATOR_MISSING: 1}, wire_dtype)


def lacks_emulator(content: RecordDict) -> bool:
    return isinstance(content.get(METRICS), MetricRecord) and content[METRICS].get(EMULATOR_MISSING) == 1


def update_norm(arrays: ArrayRecord, sent: ArrayRecord) -> float:
    """L2 norm of ``arrays - sent`` over all tensors as one vector, in float64, summed in key
    order (not record order, which a resumed run may have another of)."""
    total = 0.0
    for key in sorted(sent):
        diff = arrays[key].numpy().astype(np.float64) - sent[key].numpy().astype(np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def is_low_rank(arrays: ArrayRecord) -> bool:
    """A LoRA client's reply: the update as factors ``LORA_U + key``, ``LORA_V + key``."""
    return any(key.startswith((LORA_U, LORA_V)) for key in arrays)


def check_train_reply(content: RecordDict, sent: ArrayRecord, *, clipping: bool = False, max_examples: int | None = None,
                      max_update_norm: float = 0.0) -> tuple[str | None, float | None]:
    """``(reason, None)`` for a reply to reject, ``(None, update norm)`` for one to aggregate.

    A reply must hold exactly the adapter tensors the server sent (same keys, shapes, dtypes),
    finite values, an update (reply minus what was sent) no larger than ``max_update_norm``
    (when > 0), and one MetricRecord that passes :func:`check_metrics`. Anything else is
    rejected with a reason naming the tensor or metric: one broken or malicious client must
    neither crash the server nor poison the mean, nor choose its own weight."""
    arrays = [name for name, r in content.items() if isinstance(r, ArrayRecord)]
    metrics = [name for name, r in content.items() if isinstance(r, MetricRecord)]
    if arrays != [ARRAYS] or metrics != [METRICS] or len(content) != 2:
        return f"expected one ArrayRecord {ARRAYS!r} and one MetricRecord {METRICS!r}, got records {sorted(content)}", None
    reply = content[ARRAYS]
    missing, extra = sorted(set(sent) - set(reply)), sorted(set(reply) - set(sent))
    if missing:
        return f"{len(missing)} adapter tensor(s) missing, e.g. {missing[0]!r}", None
    if extra:
        return f"{len(extra)} tensor(s) that were not sent, e.g. {extra[0]!r}", None
    for key, want in sent.items():
        got = reply[key]
        if tuple(got.shape) != tuple(want.shape):
            return f"tensor {key!r} has shape {tuple(got.shape)}, expected {tuple(want.shape)}", None
        if got.dtype != want.dtype:
            return f"tensor {key!r} has dtype {got.dtype}, expected {want.dtype}", None
        if not np.isfinite(got.numpy()).all():
            return f"tensor {key!r} holds NaN or infinite values", None
    reason = check_metrics(content[METRICS], clipping=clipping, max_examples=max_examples)
    if reason:
        return reason, None
    norm = update_norm(reply, sent)
    if max_update_norm > 0 and norm > max_update_norm:
        return f"update norm {norm:.4g} exceeds max-update-norm {max_update_norm:g}", None
    return None, norm


# --------------------------------------------------------------------------- errors

_EXCEPTION_LINE = re.compile(r"^(?:\w+\.)*(\w+(?:Error|Exception|Fault)): (.+)$", re.M)
_FLOWER_REASON = re.compile(r"^<class '(?:\w+\.)*(\w+)[^']*'>:<'(.*)'>$", re.S)  # str(type(ex)) + ":<'" + str(ex) + "'>"


def error_reason(reason: str) -> str:
    """The client's own exception, ``Type: message``, from the reason of a Flower error reply.

    In simulation the reason is Ray's ``RayTaskError`` around Flower's ``ClientAppException``,
    with the client's traceback (process ids and paths that differ from run to run) whose first
    exception line is the client's own (Ray prints the cause first): that line. In the
    deployment runtime it is ``str(type(ex)) + ":<'" + str(ex) + "'>"`` of the exception itself,
    as it is for a Ray actor that died: the type and message in it."""
    line = _EXCEPTION_LINE.search(reason)
    if line:
        return f"{line.group(1)}: {line.group(2).strip()}"
    wrapped = _FLOWER_REASON.match(reason.strip())
    if wrapped:
        return f"{wrapped.group(1)}: " + " ".join(wrapped.group(2).split())[:300]
    return " ".join(reason.split())[:300]
