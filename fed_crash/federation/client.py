"""The ClientApp's handlers: a data owner's side of :mod:`fed_crash.federation.protocol`.

A node keeps the emulator it received in its cache folder (``$FED_CRASH_NODE_CACHE/node-<id>/
<hash>/``, written once, atomically) and, per worker process, an assembled copy; each round it
loads the round's adapters, trains them on its private shard and replies with the trained
adapters and metrics. Under differential privacy Flower's own ``fixedclipping_mod`` clips the
reply (:func:`dp_clipping_mod`).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from fed_crash.config import RunConfig
from fed_crash.core.artifacts import WEIGHTS, load_emulator, save_tensors
from fed_crash.core.data import Tokenized, load_instructions, pad_id, tokenize
from fed_crash.core.emulator import Emulator
from fed_crash.core.precision import compute_dtype
from fed_crash.core.train import proximal_term, train_adapters
from fed_crash.federation import protocol as P
from fed_crash.federation.context import run_config
from fed_crash.federation.faults import FaultPlan, attack_metrics, attack_partition, attacking, corrupt_update, crash_midway, stall
from fed_crash.federation.partition import calibration_slice, client_table, data_source, make_partitioner, partition_rows, server_and_client_rows
from fed_crash.federation.shards import read_shard, shard_name

log = logging.getLogger(__name__)

# Per worker process (a Ray actor serves many nodes, round after round): what costs seconds to
# build and never changes within a run is built once.
_EMULATORS: dict[str, tuple[Emulator, object]] = {}  # the last assembled emulator, by content hash (see assembled_emulator)
_PARTITIONERS: dict[tuple, object] = {}  # the client pool's partitioner, by run config and node count
_SHARDS: dict[tuple, list[Tokenized]] = {}  # tokenized private shards, by run config and partition

OPEN_LOG = "FED_CRASH_OPEN_LOG"  # a file: every data file (.json, .jsonl) this process opens is appended to it, with the pid


def _log_data_file_opens(log_file: str) -> None:
    """Record which data files a client process opens (an audit hook, for checking that a node
    reads its own shard and nothing else)."""
    def hook(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, os.PathLike)) and str(args[0]).endswith((".json", ".jsonl")):
            with open(log_file, "a") as out:  # the log's own name ends otherwise: no recursion
                out.write(f"{os.getpid()} {os.path.abspath(args[0])}\n")
    sys.addaudithook(hook)


if os.environ.get(OPEN_LOG):
    _log_data_file_opens(os.environ[OPEN_LOG])


def node_cache_dir(context: Context) -> Path:
    """Where this node keeps what it received: ``$FED_CRASH_NODE_CACHE`` or ~/.cache/fed-crash/nodes."""
    root = Path(os.environ.get("FED_CRASH_NODE_CACHE", Path.home() / ".cache" / "fed-crash" / "nodes"))
    return root / f"node-{context.node_id}"


def emulator_folder(context: Context, emulator_sha256: str) -> Path:
    """The cached emulator whose content hash (:func:`protocol.payload_sha256`) this is."""
    return node_cache_dir(context) / emulator_sha256[:32]


def assigned_gpus() -> list[int]:
    """The GPUs Ray assigned this worker: ``CUDA_VISIBLE_DEVICES``, which Ray sets for an actor
    with a GPU share (logical GPUs included: Ray schedules by them whether or not they exist)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return [int(d) for d in visible.split(",") if d.strip().isdigit()]


def client_device() -> torch.device:
    """CUDA when Ray gave this worker a GPU and torch can use it; otherwise the CPU, with a
    warning (once per worker) when a GPU was assigned that torch cannot use (no CUDA build, no
    driver, a logical GPU), so a misconfigured cluster trains slowly rather than not at all."""
    gpus = assigned_gpus()
    if torch.cuda.is_available():
        return torch.device("cuda")
    if gpus and not _WARNED:
        _WARNED.append(True)
        log.warning("Ray assigned GPU %s to this client (CUDA_VISIBLE_DEVICES=%s) but torch cannot use CUDA (built for CUDA: %s): training on the CPU",
                    gpus[0], os.environ.get("CUDA_VISIBLE_DEVICES"), torch.version.cuda or "no")
    return torch.device("cpu")


_WARNED: list[bool] = []  # once per worker process


def answer_partition(msg: Message, context: Context) -> Message:
    """The partition this node holds, from its node config (or what an injected attacker claims)."""
    pid, num = int(context.node_config[P.PARTITION_ID]), int(context.node_config[P.NUM_PARTITIONS])
    return P.partition_reply(msg, *attack_partition(run_config(context).faults, pid, num))


def receive_emulator(msg: Message, context: Context) -> Message:
    """Check the emulator request (:func:`protocol.read_emulator_request`: nothing is written
    unless it passes), store it in the node's cache, keyed by the hash of all it holds, unless it
    is there; acknowledge that hash (the server compares it with its own)."""
    weights, files, _, sha256 = P.read_emulator_request(msg.content)
    folder = emulator_folder(context, sha256)
    if not (folder / WEIGHTS).is_file():
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for name, blob in files.items():
            (tmp / name).write_bytes(blob)
        save_tensors(tmp / WEIGHTS, weights)
        tmp.replace(folder)  # atomic: a concurrent worker of the same node sees all or nothing
    return P.emulator_ack(msg, sha256)


def assembled_emulator(folder: Path, emulator_sha256: str, adapters: dict) -> tuple[Emulator, object]:
    """The emulator and tokenizer of ``folder``, assembled once per worker and content hash.

    A worker serves several nodes (one after another), and each node keeps its own copy of the
    same emulator in its own cache folder; keyed by folder, a worker that had served three nodes
    held three identical emulators (430 MB each for the demo's). Keyed by the content hash, the
    nodes share one: every train call loads its round's adapters into it first. Only the last
    hash is kept, so a later run's (or a re-aligned) emulator replaces it instead of adding to it."""
    if emulator_sha256 not in _EMULATORS:
        _EMULATORS.clear()
        _EMULATORS[emulator_sha256] = load_emulator(folder, adapters)[:2]  # checks the content hash
    return _EMULATORS[emulator_sha256]


def _shard(cfg: RunConfig, context: Context, tokenizer, shard_sha256: str) -> list[Tokenized]:
    """This node's private shard, tokenized: with a split folder, its own shard file alone (the
    node config's ``shard-file``, else ``shard-<partition>.jsonl`` of ``shards``), checked against
    the hash the server sent; otherwise cut from the data (the partitioner built once per worker)."""
    pid, num = int(context.node_config[P.PARTITION_ID]), int(context.node_config[P.NUM_PARTITIONS])
    own_file = context.node_config.get(P.SHARD_FILE) or (str(Path(cfg.fed.shards) / shard_name(pid)) if cfg.fed.shards else "")
    run = json.dumps(cfg.to_dict(), sort_keys=True)
    key = (run, pid, num, own_file, shard_sha256)
    if key not in _SHARDS:
        if own_file:
            if not shard_sha256:
                raise P.ProtocolError(f"the node reads shard file {own_file} but the server sent no {P.SHARD_SHA256} (does it read a split folder?)")
            shard = read_shard(own_file, shard_sha256)
        else:
            if (run, num) not in _PARTITIONERS:
                rows = load_instructions(data_source(cfg), skip_malformed=cfg.data.skip_malformed)
                pool = server_and_client_rows(rows, cfg.fed, cfg.data, calibration_slice(cfg))["clients"]
                _PARTITIONERS[(run, num)] = make_partitioner(client_table(pool, cfg.fed), cfg.fed, num, seed=cfg.data.seed)
            shard = partition_rows(_PARTITIONERS[(run, num)], cfg.fed, pid)
        _SHARDS[key] = tokenize(shard, tokenizer, max_length=cfg.data.max_length, template=cfg.data.template)
    return _SHARDS[key]


def train(msg: Message, context: Context) -> Message:
    """One round of local offsite-tuning on this node's private shard. Besides loss and counts,
    the metrics say where the client's time went (:data:`protocol.CLIENT_METRICS`)."""
    started = time.time()
    delivery = started - msg.metadata.created_at
    cfg = run_config(context)
    if not cfg.fed.progress:  # keep the run's console to one line per round
        logging.getLogger("fed_crash.core.train").setLevel(logging.WARNING)
    request = P.read_train_request(msg.content)
    folder = emulator_folder(context, request.emulator_sha256)
    if not (folder / WEIGHTS).is_file():
        log.warning("node %d lacks emulator %s (its cache was cleared?): asking for it again", context.node_id, request.emulator_sha256[:16])
        return P.emulator_missing_reply(msg, request.adapters, request.wire_dtype)
    clock = time.perf_counter()
    emulator, tokenizer = assembled_emulator(folder, request.emulator_sha256, request.adapters)
    emulator.load_adapters(request.adapters)
    device = client_device()  # CUDA when Ray gave this actor a GPU that torch can use
    emulator.model.to(device)
    loaded, clock = time.perf_counter() - clock, time.perf_counter()
    examples = _shard(cfg, context, tokenizer, request.shard_sha256)
    prepared = time.perf_counter() - clock
    pid = int(context.node_config[P.PARTITION_ID])
    train_cfg = replace(cfg.train, seed=cfg.train.seed + 1000 * request.server_round + pid)
    plan = FaultPlan(cfg.faults)
    fault = plan.fault(pid, request.server_round)  # injected faults (faults.*), the same draw the server makes
    if fault == "timeout":
        stall(cfg.fed.round_timeout, pid, request.server_round)
    # FedProx's (mu/2)||w - w0||^2 and FedBiOT's lambda||w - w0||^2 are one proximal term
    coefficient = request.proximal_mu / 2 + cfg.fed.fedbiot_lambda
    extra = proximal_term(emulator.trainable_parameters(), coefficient) if coefficient > 0 else None
    on_step = crash_midway(max(1, train_cfg.steps // 2), pid, request.server_round) if fault == "crash" else None
    stats = train_adapters(emulator, examples, pad_id(tokenizer), train_cfg, extra_loss=extra, progress=cfg.fed.progress, on_step=on_step,
                           dtype=compute_dtype(cfg.compute.compute_dtype, device))
    metrics = {
        P.NUM_EXAMPLES: len(examples), "train-loss": stats.train_loss, "first-loss": stats.first_loss, "tokens": stats.tokens,
        "steps": stats.steps, "seconds": stats.seconds, "step-seconds": stats.step_seconds, "delivery-seconds": delivery,
        "load-seconds": loaded, "data-seconds": prepared, "threads": torch.get_num_threads(),
        "peak-rss-mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux reports KiB
        "worker-pid": os.getpid(), "gpu-id": (assigned_gpus() or [-1])[0], "on-cuda": int(device.type == "cuda"),
        "start-time": started, "end-time": time.time(), P.UNIT_WEIGHT: 1,
    }
    trained = emulator.adapter_state()
    if request.clipping_norm is not None:  # DP: dense adapters, clipped by Flower's fixedclipping_mod on the way out
        metrics[P.UPDATE_NORM] = P.update_norm(ArrayRecord(trained), ArrayRecord(request.adapters))
    elif stats.lora_factors:  # the server rebuilds the dense adapters from the ones it sent (strategies.lowrank)
        trained = stats.lora_factors
    if fault == "bad-update":
        trained = corrupt_update(cfg.faults.bad_update, trained, request.adapters, scale=cfg.faults.bad_update_scale,
                                 seed=plan.seed_for(pid, request.server_round))
    return P.train_reply(msg, trained, attack_metrics(cfg.faults, pid, metrics), request.wire_dtype)


def dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``fixedclipping_mod``, unchanged, on the train messages that ask for clipping
    (the DP wrapper puts ``clipping_norm`` in the train config); the mod itself refuses a message
    without it, and a run without DP sends none."""
    skip = attacking(run_config(context).faults, int(context.node_config.get(P.PARTITION_ID, -1)), "skip-clipping")
    if P.CLIPPING_NORM in msg.content.config_records.get(P.CONFIG, {}) and not skip:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)
