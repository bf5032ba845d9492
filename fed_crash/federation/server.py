"""Federated offsite-tuning on Flower's Message API: what the ServerApp and ClientApp run.

Server (:func:`serve`): load the central model, build the emulator once on server-held public
data, send it to each node once and the adapters every round, aggregate with the configured
strategy, and after every round plug the aggregate into the central model and evaluate it (and
the emulator with the same adapters). Writes ``results/<run-name>/``.

Client (:func:`client_train`): keep the emulator on the node (a folder in the node's cache,
written from the first message, and an in-memory copy per worker process), load the round's
adapters, train them on the node's private shard, reply with adapters and metrics.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, compute_clip_model_update, get_norm
from safetensors.torch import load_file

from fed_crash.core.artifacts import (
    FORMAT,
    MANIFEST,
    WEIGHTS,
    ArtifactError,
    check_cut,
    check_payload_files,
    check_private,
    load_emulator,
    save_adapters,
    save_emulator,
    save_tensors,
)
from fed_crash.federation.checkpoint import (
    Checkpoint,
    check_resumable,
    read_checkpoint,
    resumed_history,
    seed_everything,
    set_rng_state,
    write_checkpoint,
)
from fed_crash.config import ConfigError, RunConfig, parse_run_config
from fed_crash.core.data import DEFAULT_HUB_DATASET, Tokenized, load_instructions, pad_id, tokenize
from fed_crash.core.emulator import AdapterError, Emulator, EmulatorSpec, adapter_state, build_emulator, check_adapters, emulator_weights, plug_in
from fed_crash.errors import FedCrashError
from fed_crash.federation.faults import FaultPlan, corrupt_update, crash_midway, stall
from fed_crash.federation.fedbiot import align_emulator
from fed_crash.core.models import default_cache_dir, load_model, resolve_device, state_hash
from fed_crash.federation.partition import make_partitioner, partition_rows, server_and_client_rows
from fed_crash.selection.plan import calibration_rows, needs_calibration, plan_emulator
from fed_crash.core.train import evaluate, proximal_term, train_adapters

log = logging.getLogger(__name__)

EMULATOR_WEIGHTS_KEY = "emulator"  # ArrayRecord: the emulator's tensors, until a node has answered once
EMULATOR_FILES_KEY = "emulator-files"  # ConfigRecord: manifest, model config, tokenizer files (bytes)


# Metrics that measure the machine rather than the computation (wall-clock times, memory), and
# Flower's node ids, which it draws at random: what may differ between two runs of the same
# config and seed. Name new measured metrics with one of these suffixes.
MEASURED_SUFFIXES = ("seconds", "-mib")


def reproducible(value):
    """A metrics line (or part of one) without what :data:`MEASURED_SUFFIXES` and node ids name:
    two runs with the same config and seed give equal ones (tests and scripts compare them)."""
    if isinstance(value, dict):
        return {k: reproducible(v) for k, v in value.items() if k != "node" and not k.endswith(MEASURED_SUFFIXES)}
    if isinstance(value, list):
        return [reproducible(v) for v in value]
    return value


def resolve_path(path: str) -> Path:
    """Run-config paths: absolute, or relative to ``$FED_CRASH_ROOT`` (else the working
    directory of the process, which for ``flwr run`` is where the SuperLink started)."""
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else Path(os.environ.get("FED_CRASH_ROOT", os.getcwd())) / candidate


def _data_source(cfg: RunConfig, name: str | None = None) -> str:
    """A local data path resolved to absolute; a name that is not a local path stays a hub name;
    no path at all means Alpaca from the hub (for users with a network)."""
    name = cfg.data.data if name is None else name
    if not name:
        return DEFAULT_HUB_DATASET
    local = resolve_path(name)
    return str(local) if local.suffix in (".json", ".jsonl") or local.exists() else name


def public_rows_needed(cfg: RunConfig) -> bool:
    """Whether the server needs public rows: CRaSh's or search's calibration, FedBiOT's alignment."""
    return needs_calibration(cfg.emulator) or cfg.fed.fedbiot_align_steps > 0


def calibration_slice(cfg: RunConfig) -> int:
    """Rows of the instruction data the server keeps as public rows (CRaSh calibration, FedBiOT
    alignment): none when neither needs them or when ``calib-data`` names a separate public
    dataset. Server and clients both call this, so they carve the same client pool."""
    return cfg.emulator.calib_samples if public_rows_needed(cfg) and not cfg.fed.calib_data else 0


def run_config(context: Context) -> RunConfig:
    """The run's configuration, checked (unknown keys and wrong types fail here, by name)."""
    _console_logging()
    return parse_run_config(dict(context.run_config))


def _console_logging() -> None:
    """Show the library's INFO lines (one per round on the server, and the strategies' lines
    on failed clients) in the app's output."""
    for name in ("fed_crash", "strategies"):
        lib = logging.getLogger(name)
        if not lib.handlers:
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter("%(levelname)s fed_crash: %(message)s"))
            lib.addHandler(handler)
            lib.setLevel(logging.INFO)
            lib.propagate = False


# --------------------------------------------------------------------------- client


# Per worker process (a Ray actor serves many nodes, round after round): what costs seconds to
# build and never changes within a run is built once.
_EMULATORS: dict[str, tuple[Emulator, object]] = {}  # assembled emulators, by folder (named by content hash)
_PARTITIONERS: dict[tuple, object] = {}  # the client pool's partitioner, by run config and node count
_SHARDS: dict[tuple, list[Tokenized]] = {}  # tokenized private shards, by run config and partition


def node_cache_dir(context: Context) -> Path:
    """Where this node keeps what it received: ``$FED_CRASH_NODE_CACHE`` or ~/.cache/fed-crash/nodes."""
    root = Path(os.environ.get("FED_CRASH_NODE_CACHE", Path.home() / ".cache" / "fed-crash" / "nodes"))
    return root / f"node-{context.node_id}"


def _receive_emulator(msg: Message, context: Context) -> Path:
    """The node's emulator folder: written from the message the first time, then reused. On
    arrival, before anything is written, the tensors' content hash must match the manifest's
    ``weights_sha256`` and every file must be a plain data file (no path, no checkpoint)."""
    if EMULATOR_WEIGHTS_KEY in msg.content.array_records:
        files = msg.content[EMULATOR_FILES_KEY]
        check_payload_files(files)
        manifest = json.loads(files[MANIFEST])
        if manifest.get("format") != FORMAT:
            raise ArtifactError(f"received emulator manifest has format {manifest.get('format')!r}, expected {FORMAT!r}")
        weights = msg.content[EMULATOR_WEIGHTS_KEY].to_torch_state_dict()
        if state_hash(weights) != manifest["weights_sha256"]:
            raise ArtifactError(f"node {context.node_id}: the emulator received does not match its manifest's weights_sha256 "
                                f"{manifest['weights_sha256'][:16]} (corrupted or replaced in transit); nothing was stored")
        folder = node_cache_dir(context) / manifest["weights_sha256"][:16]
        if not (folder / WEIGHTS).is_file():
            tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
            tmp.mkdir(parents=True, exist_ok=True)
            for name, blob in files.items():
                (tmp / name).write_bytes(blob)
            save_tensors(tmp / WEIGHTS, weights)
            tmp.replace(folder)  # atomic: a concurrent worker of the same node sees all or nothing
        context.state["emulator"] = ConfigRecord({"folder": str(folder)})
    if "emulator" not in context.state.config_records:
        raise FedCrashError(f"node {context.node_id} has no emulator: it was never sent one")
    return Path(context.state["emulator"]["folder"])


def client_query(msg: Message, context: Context) -> Message:
    """Answer the server's question which partition this node holds (its node config), so the
    server can sample and order clients reproducibly (:class:`strategies.OffsiteStrategy`)."""
    from strategies.offsite import CLIENT_RECORD, NUM_PARTITIONS_KEY, PARTITION_KEY

    record = ConfigRecord({PARTITION_KEY: int(context.node_config[PARTITION_KEY]), NUM_PARTITIONS_KEY: int(context.node_config[NUM_PARTITIONS_KEY])})
    return Message(RecordDict({CLIENT_RECORD: record}), reply_to=msg)


def _client_examples(cfg: RunConfig, context: Context, tokenizer) -> list[Tokenized]:
    pid, num = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    run = json.dumps(cfg.to_dict(), sort_keys=True)
    key = (run, pid, num)
    if key not in _SHARDS:
        if (run, num) not in _PARTITIONERS:
            rows = load_instructions(_data_source(cfg), skip_malformed=cfg.data.skip_malformed)
            pool = server_and_client_rows(rows, cfg.fed, cfg.data, calibration_slice(cfg))["clients"]
            _PARTITIONERS[(run, num)] = make_partitioner(pool, cfg.fed, num, seed=cfg.data.seed)
        shard = partition_rows(_PARTITIONERS[(run, num)], cfg.fed, pid)
        _SHARDS[key] = tokenize(shard, tokenizer, max_length=cfg.data.max_length, template=cfg.data.template)
    return _SHARDS[key]


def client_train(msg: Message, context: Context) -> Message:
    """One round of local offsite-tuning on this node's private shard. Besides loss and counts,
    the reply's metrics say where the client's time went (seconds): ``delivery-seconds`` (from
    the server creating the message to this call: serialisation, transfer, waiting for a
    worker), ``receive-seconds`` (writing a first-time emulator to the node cache),
    ``load-seconds`` (assembling the emulator, once per worker), ``data-seconds`` (partitioning
    and tokenizing the shard, once per worker and node), ``seconds`` (training) and
    ``step-seconds`` (one optimizer step, median after the first); ``peak-rss-mib`` is the worker
    process's peak resident memory so far."""
    delivery = time.time() - msg.metadata.created_at
    cfg = run_config(context)
    if not cfg.fed.progress:  # keep the run's console to one line per round
        logging.getLogger("fed_crash.core.train").setLevel(logging.WARNING)
    clock = time.perf_counter()
    folder = _receive_emulator(msg, context)
    adapters = msg.content["arrays"].to_torch_state_dict()
    received, clock = time.perf_counter() - clock, time.perf_counter()
    if str(folder) not in _EMULATORS:
        _EMULATORS[str(folder)] = load_emulator(folder, adapters)[:2]  # checks the content hash
    emulator, tokenizer = _EMULATORS[str(folder)]
    emulator.load_adapters(adapters)
    emulator.model.to(resolve_device("auto"))  # CUDA when Ray gave this actor a GPU
    loaded, clock = time.perf_counter() - clock, time.perf_counter()
    examples = _client_examples(cfg, context, tokenizer)
    prepared = time.perf_counter() - clock
    config = msg.content["config"]
    server_round = int(config["server-round"])
    pid = int(context.node_config["partition-id"])
    train_cfg = replace(cfg.train, seed=cfg.train.seed + 1000 * server_round + pid)
    plan = FaultPlan(cfg.faults)
    fault = plan.fault(pid, server_round)  # injected faults (faults.*), the same draw the server makes
    if fault == "timeout":
        stall(cfg.fed.round_timeout, pid, server_round)
    # FedProx sends proximal-mu (term (mu/2)||w - w0||^2); FedBiOT's lambda||w - w0||^2 has the same form
    coefficient = float(config.get("proximal-mu", 0.0)) / 2 + cfg.fed.fedbiot_lambda
    extra = proximal_term(emulator.trainable_parameters(), coefficient) if coefficient > 0 else None
    low_rank: dict[str, torch.Tensor] = {}  # with LoRA: the update as factors, what goes up instead of the adapters
    on_step = crash_midway(max(1, train_cfg.steps // 2), pid, server_round) if fault == "crash" else None
    stats = train_adapters(emulator, examples, pad_id(tokenizer), train_cfg, extra_loss=extra, progress=cfg.fed.progress,
                           lora_update=low_rank, on_step=on_step)
    values = {
        "num-examples": len(examples),
        "train-loss": float(stats["train_loss"]),
        "first-loss": float(stats["first_loss"]),
        "tokens": int(stats["tokens"]),
        "steps": int(stats["steps"]),
        "seconds": float(stats["seconds"]),
        "step-seconds": float(stats["step_seconds"]),
        "delivery-seconds": delivery,
        "receive-seconds": received,
        "load-seconds": loaded,
        "data-seconds": prepared,
        "threads": torch.get_num_threads(),  # Ray sets OMP_NUM_THREADS to the actor's CPUs: step times depend on it
        "peak-rss-mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # of this worker process so far (Linux: KiB)
    }
    trained = emulator.adapter_state()
    if KEY_CLIPPING_NORM in config:  # differential privacy: the server adds noise to the mean
        from strategies import UNIT_WEIGHT_KEY

        trained, values["update-norm"] = clip_update(trained, adapters, float(config[KEY_CLIPPING_NORM]))
        values[UNIT_WEIGHT_KEY] = 1
    elif low_rank:  # the server rebuilds the dense adapters from the ones it sent (strategies.lowrank)
        trained = low_rank
    if fault == "bad-update":
        trained = corrupt_update(cfg.faults.bad_update, trained, adapters, scale=cfg.faults.bad_update_scale, seed=plan.seed_for(pid, server_round))
    reply = RecordDict({"arrays": ArrayRecord(trained), "metrics": MetricRecord(values), "client": ConfigRecord({"partition-id": pid})})
    return Message(reply, reply_to=msg)


def clip_update(trained: dict[str, torch.Tensor], start: dict[str, torch.Tensor], clipping_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """Scale the update ``trained - start`` (all tensors as one vector) down to L2 norm at most
    ``clipping_norm`` with Flower's own ``compute_clip_model_update``; returns the clipped
    adapters and the update's norm before clipping.

    This is what Flower's ``fixedclipping_mod`` does, done here because that mod answers with an
    error unless the message holds exactly one ArrayRecord and one ConfigRecord, and the first
    message to each node also carries the emulator.
    """
    keys = list(trained)
    new = [trained[k].detach().cpu().numpy().copy() for k in keys]
    old = [start[k].detach().cpu().numpy() for k in keys]
    norm = get_norm([a - b for a, b in zip(new, old)])
    compute_clip_model_update(new, old, clipping_norm)
    return {k: torch.from_numpy(np.asarray(v)).to(trained[k].dtype) for k, v in zip(keys, new)}, float(norm)


# --------------------------------------------------------------------------- server


def emulator_payload(folder: Path, model, spec: EmulatorSpec) -> RecordDict:
    """The records a node needs once: the emulator's tensors and its small files, checked by
    :func:`fed_crash.core.artifacts.check_private` before they may leave the server (no removed
    layer, no adapter, no checkpoint file)."""
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.suffix != ".safetensors"}
    weights = load_file(str(folder / WEIGHTS))
    check_private(weights, files, model, spec)
    return RecordDict({
        EMULATOR_WEIGHTS_KEY: ArrayRecord(weights),
        EMULATOR_FILES_KEY: ConfigRecord(files),
    })


def run_folder(cfg: RunConfig) -> Path:
    """``results-dir/run-name/``, checked but not created, so that a start that fails writes
    nothing: a new run needs a free folder (an existing non-empty one is never overwritten);
    ``resume=true`` needs the folder of the run to continue."""
    if cfg.fed.resume and not cfg.fed.run_name:
        raise ConfigError("run config: resume=true needs the run-name of the run to continue")
    name = cfg.fed.run_name or f"{cfg.emulator.method}-{cfg.fed.strategy}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = resolve_path(cfg.fed.results_dir) / name
    if not cfg.fed.resume and run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run folder {run_dir} already exists and is not empty; choose another run-name, or resume=true to continue that run")
    return run_dir


def check_clients(pool: list[dict[str, str]], num_partitions: int, nodes: int, cfg: RunConfig) -> None:
    """Before training: every client's shard can be cut (no more clients than examples, no
    empty non-IID shard), and Flower can sample ``min-train-nodes`` of the connected nodes."""
    if not nodes:
        raise FedCrashError("no connected node said which partition it holds (does the ClientApp register client_query as its query handler?)")
    partitioner = make_partitioner(pool, cfg.fed, num_partitions, seed=cfg.data.seed)
    for pid in range(num_partitions):
        partition_rows(partitioner, cfg.fed, pid)
    if cfg.fed.min_train_nodes > nodes:
        raise ConfigError(f"run config: min-train-nodes is {cfg.fed.min_train_nodes} but only {nodes} nodes are connected (Flower would wait for more forever)")


def resume_from(checkpoint: Checkpoint, model, model_name: str) -> EmulatorSpec:
    """The spec of the checkpoint's emulator, after checking that the checkpoint belongs to
    this model: the emulator was cut from these weights, and its adapters fit them."""
    source, now = checkpoint.manifest["source"]["sha256"], state_hash(model.state_dict())
    if source != now:
        raise ArtifactError(f"{checkpoint.emulator / MANIFEST} was cut from a model with weights sha256 {source[:16]}, "
                            f"but model {model_name!r} has {now[:16]}: the run to resume belongs to another model")
    spec = EmulatorSpec.from_dict(checkpoint.manifest["spec"])
    try:
        check_adapters(checkpoint.adapters, adapter_state(model, spec), f"model {model_name!r}")
    except AdapterError as err:
        raise ArtifactError(f"checkpoint round {checkpoint.round} adapters: {err}") from None
    return spec


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


class Laps:
    """Seconds between successive marks: where a run's time goes, written to ``metrics.jsonl``
    (benchmarks/scaling.py reads it)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def mark(self, name: str | None = None) -> float:
        """Seconds since the previous mark, kept under ``name`` when one is given."""
        now = time.perf_counter()
        lap, self.last = now - self.last, now
        if name:
            self.seconds[name] = lap
        return lap


def serve(grid: Grid, context: Context) -> Path:
    """The ServerApp's main: see module docstring. Returns the run folder.

    Everything that can be wrong with the input (run config, data, model, emulator spec,
    clients against examples, a checkpoint to resume) is checked before the run folder is
    touched. Each round ends with a checkpoint (:mod:`fed_crash.federation.checkpoint`); ``resume=true``
    continues from the last one."""
    from strategies import ClientClippingDP, OffsiteStrategy, RoundTraffic, make_strategy, restore_server_state, server_state

    from fed_crash.evaluation.mc import HUB_TASKS, load_task, score_mc

    start = time.perf_counter()
    laps = Laps()
    cfg = run_config(context)
    run_dir = run_folder(cfg)
    checkpoint = read_checkpoint(run_dir) if cfg.fed.resume else None
    if checkpoint:
        check_resumable(json.loads((run_dir / "config.json").read_text()), cfg, run_dir / "config.json")
    source = _data_source(cfg)
    mc_source = cfg.fed.mc_task if cfg.fed.mc_task in HUB_TASKS else resolve_path(cfg.fed.mc_task)
    mc_rows = load_task(mc_source, limit=cfg.fed.mc_samples, seed=cfg.data.seed).rows if cfg.fed.mc_task else []
    rows = load_instructions(source, skip_malformed=cfg.data.skip_malformed)
    parts = server_and_client_rows(rows, cfg.fed, cfg.data, calibration_slice(cfg))
    if public_rows_needed(cfg) and cfg.fed.calib_data:
        parts["calibration"] = calibration_rows(_data_source(cfg, cfg.fed.calib_data), cfg.data, cfg.emulator.calib_samples)
    strategy_inner = make_strategy(cfg.fed)
    laps.mark("data")
    loaded = load_model(cfg.fed.model, cache_dir=cfg.fed.cache_dir or None, device="auto")
    laps.mark("model_load")
    model, tokenizer = loaded.model, loaded.tokenizer
    if checkpoint:
        spec = resume_from(checkpoint, model, cfg.fed.model)
        similarity = torch.tensor(checkpoint.manifest["similarity"]) if checkpoint.manifest.get("similarity") else None
    else:
        spec, similarity = plan_emulator(model, tokenizer, parts["calibration"], cfg.data, cfg.emulator, progress=cfg.fed.progress,
                                         cache=Path(cfg.fed.cache_dir) if cfg.fed.cache_dir else default_cache_dir())
    check_cut(spec)
    laps.mark("emulator_plan")
    log.info("%s", spec.describe())
    strategy = OffsiteStrategy(strategy_inner, RecordDict(), seed=cfg.data.seed, min_available_nodes=cfg.fed.min_available_nodes,
                               min_replies=cfg.fed.min_replies, max_update_norm=cfg.fed.max_update_norm, round_timeout=cfg.fed.round_timeout,
                               faults=FaultPlan(cfg.faults), round_offset=checkpoint.round if checkpoint else 0)
    nodes = strategy.connect(grid)
    check_clients(parts["clients"], strategy.num_partitions, len(nodes), cfg)
    laps.mark("connect")

    # ---- checks done: from here on the run writes to its folder
    metrics_file = run_dir / "metrics.jsonl"
    if checkpoint:
        history = resumed_history(metrics_file, checkpoint.round)
        emulator_folder = checkpoint.emulator
        server_emulator = load_emulator(emulator_folder, checkpoint.adapters, device=str(next(model.parameters()).device))[0]
        restore_server_state(strategy_inner, checkpoint.optimizer, list(adapter_state(model, spec)))
        if isinstance(strategy_inner, ClientClippingDP):
            strategy_inner.restore(checkpoint.dp_releases)
        log.info("resuming %s after round %d of %d", run_dir, checkpoint.round, cfg.fed.num_server_rounds)
    else:
        history = []
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps({**cfg.to_dict(), "data_source": source, "model_id": loaded.model_id}, indent=1))
        emulator_folder = save_emulator(run_dir / "emulator", model, tokenizer, spec, source_id=loaded.model_id, similarity=similarity)
        server_emulator = build_emulator(model, spec)
        (run_dir / "adapters").mkdir()
    full_bytes = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in model.state_dict().values()}.values())  # tied tensors once
    held_out = tokenize(parts["eval"], tokenizer, max_length=cfg.data.max_length, template=cfg.data.template)
    public = tokenize(parts["calibration"], tokenizer, max_length=cfg.data.max_length, template=cfg.data.template) if cfg.fed.fedbiot_align_steps > 0 else []
    pad = pad_id(tokenizer)
    dtypes = {k: v.dtype for k, v in adapter_state(model, spec).items()}
    strategy.emulator = emulator_payload(emulator_folder, model, spec)
    laps.mark("emulator_write")  # the folder, the server's copy, the payload

    def realign(server_round: int) -> dict:
        """FedBiOT: distil the emulator toward the full model (both hold this round's adapters),
        write it as a new emulator folder and have every node receive it with its next message."""
        nonlocal emulator_folder
        stats = align_emulator(server_emulator, model, public, pad, steps=cfg.fed.fedbiot_align_steps, lr=cfg.fed.fedbiot_align_lr,
                               batch_size=cfg.train.batch_size, seed=cfg.data.seed + server_round)
        emulator_folder = save_emulator(run_dir / f"emulator-round-{server_round}", model, tokenizer, spec, source_id=loaded.model_id,
                                        similarity=similarity, weights=emulator_weights(server_emulator))
        strategy.resend_emulator(emulator_payload(emulator_folder, model, spec))
        return stats

    def evaluate_round(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if checkpoint and flower_round == 0:
            return None  # the checkpoint's round: evaluated and recorded before the run stopped
        server_round = flower_round + strategy.round_offset
        round_seconds = laps.mark()  # since the last evaluation: sampling, sending, client work, receiving, aggregation
        round_start = time.perf_counter()
        adapters = {k: v.to(dtypes[k]) for k, v in arrays.to_torch_state_dict().items()}
        plug_in(model, adapters)
        server_emulator.load_adapters(adapters)
        plugin = evaluate(model, held_out, pad, batch_size=cfg.fed.eval_batch_size, progress=cfg.fed.progress, desc="plug-in")
        emu = evaluate(server_emulator.model, held_out, pad, batch_size=cfg.fed.eval_batch_size, progress=cfg.fed.progress, desc="emulator")
        server = {"plugin_loss": plugin["loss"], "plugin_ppl": plugin["ppl"], "emulator_loss": emu["loss"], "emulator_ppl": emu["ppl"]}
        if mc_rows:
            scores = score_mc(model, tokenizer, mc_rows, batch_size=cfg.fed.eval_batch_size * 4)
            server.update({f"plugin_{k}": scores[k] for k in ("acc", "acc_norm", "acc_bytes")})
        adapters_file = save_adapters(run_dir / "adapters" / f"round-{server_round}.safetensors", adapters, {"round": server_round, "spec": spec.to_dict()})
        optimizer = server_state(strategy_inner)  # FedAdam's moments etc.: resuming needs them with the adapters
        optimizer_file = run_dir / "adapters" / f"round-{server_round}.optimizer.safetensors" if optimizer else None
        if optimizer_file:
            save_tensors(optimizer_file, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in optimizer.items()}, {"round": server_round, "strategy": cfg.fed.strategy})
        spent = strategy_inner.spent.get(server_round) if isinstance(strategy_inner, ClientClippingDP) else None
        aligned = realign(server_round) if cfg.fed.fedbiot_align_steps > 0 and server_round < cfg.fed.num_server_rounds else None
        traffic = strategy.rounds.get(server_round, RoundTraffic())  # round 0: nothing sent yet
        clients = traffic.clients
        elapsed = time.perf_counter() - start + (checkpoint.elapsed_seconds if checkpoint else 0.0)
        line = {
            "round": server_round,
            "server": server,
            "clients": clients,
            "failures": traffic.failures,
            **({"aggregated": traffic.aggregated} if server_round > 0 else {}),
            **({"note": traffic.note} if traffic.note else {}),
            "bytes_down": sum(traffic.down.values()),
            "bytes_up": sum(traffic.up.values()),
            "emulator_bytes_down": sum(traffic.emulator_down.values()),
            "bytes_down_per_client": traffic.down,
            "bytes_up_per_client": traffic.up,
            "full_model_bytes": full_bytes,
            **({"privacy": {"epsilon": spent.epsilon, "delta": spent.delta, "releases": spent.num_releases}} if spent else {}),
            **({"alignment": aligned} if aligned else {}),
            "eval_seconds": time.perf_counter() - round_start,
            "round_seconds": round_seconds,
            "aggregate_seconds": traffic.aggregate_seconds,
            **({"setup_seconds": laps.seconds} if server_round == (checkpoint.round + 1 if checkpoint else 0) else {}),
            "elapsed_seconds": elapsed,
        }
        history.append(line)
        with metrics_file.open("a") as handle:
            handle.write(json.dumps(line) + "\n")
        write_checkpoint(run_dir, server_round, adapters_file, optimizer_file, strategy_inner.releases if isinstance(strategy_inner, ClientClippingDP) else [],
                         emulator_folder, elapsed)
        examples = sum(c["num-examples"] for c in clients)
        train_loss = f"{sum(c['train-loss'] * c['num-examples'] for c in clients) / examples:.3f}" if examples else "-"
        acc = f" | acc {server['plugin_acc']:.3f}" if "plugin_acc" in server else ""
        extras = f" | epsilon {spent.epsilon:.2f} at delta {spent.delta:g}" if spent else ""
        extras += f" | emulator aligned {aligned['first_loss']:.4f} -> {aligned['last_loss']:.4f}" if aligned else ""
        extras += " | previous adapters kept" if server_round > 0 and not traffic.aggregated else ""
        log.info(
            "round %d/%d | clients %d ok %d failed | train loss %s | plug-in loss %.4f | emulator loss %.4f%s | down %s up %s%s | %.0fs",
            server_round, cfg.fed.num_server_rounds, len(clients), len(line["failures"]), train_loss,
            plugin["loss"], emu["loss"], acc, _mb(line["bytes_down"]), _mb(line["bytes_up"]), extras, elapsed,
        )
        laps.mark()  # the next round's clock starts when this evaluation is done
        return MetricRecord({k: float(v) for k, v in server.items()})

    # the rounds draw from the global generators only through DP noise; start them where the
    # uninterrupted run stood (a resumed run) or from the seed (a new one)
    if checkpoint:
        set_rng_state(checkpoint.rng)
    else:
        seed_everything(cfg.data.seed)
    start_adapters = checkpoint.adapters if checkpoint else adapter_state(model, spec)
    initial = {k: start_adapters[k].detach().clone() for k in dtypes}  # in the model's key order, resumed or not
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial),
        num_rounds=cfg.fed.num_server_rounds - strategy.round_offset,
        timeout=cfg.fed.round_timeout,
        train_config=ConfigRecord(),
        evaluate_fn=evaluate_round,
    )
    # the last aggregate; none at all (every round failed, or nothing left to resume): the start
    final = {k: v.to(dtypes[k]) for k, v in result.arrays.to_torch_state_dict().items()} if len(result.arrays) else initial
    save_adapters(run_dir / "adapters" / "final.safetensors", final)
    if cfg.fed.save_model:
        plug_in(model, final)
        model.save_pretrained(run_dir / "plugin-model", safe_serialization=True)
        tokenizer.save_pretrained(run_dir / "plugin-model")
    plot_history(history, run_dir / "rounds.png")
    (run_dir / "rounds.md").write_text(rounds_table(history) + "\n")
    log.info("run finished in %.0fs: %s", time.perf_counter() - start, run_dir)
    return run_dir


def rounds_table(history: list[dict]) -> str:
    """Markdown table of a run's rounds: losses, accuracy, and traffic per client against the
    full model's size (round 1's download includes the one-time emulator)."""
    head = ("| round | clients | client train loss (weighted) | plug-in loss | plug-in ppl | emulator loss | plug-in acc "
            "| down MB/client | up MB/client | down / full model | up / full model |")
    rows = [head, "|" + "---|" * 11]
    for h in history:
        clients, server, full = h["clients"], h["server"], h["full_model_bytes"]
        n = max(1, len(h["bytes_down_per_client"]))
        down, up = h["bytes_down"] / n, h["bytes_up"] / max(1, len(h["bytes_up_per_client"]))
        examples = sum(c["num-examples"] for c in clients)
        train = f"{sum(c['train-loss'] * c['num-examples'] for c in clients) / examples:.3f}" if examples else "-"
        acc = f"{server['plugin_acc']:.3f}" if "plugin_acc" in server else "-"
        traffic = f"{down / 1e6:.1f} | {up / 1e6:.1f} | {down / full:.3f} | {up / full:.3f}" if clients else "- | - | - | -"
        rows.append(f"| {h['round']} | {len(clients)} | {train} | {server['plugin_loss']:.4f} | {server['plugin_ppl']:.2f} "
                    f"| {server['emulator_loss']:.4f} | {acc} | {traffic} |")
    return "\n".join(rows)


def plot_history(history: list[dict], path: Path) -> None:
    """Loss (plug-in, emulator, client training) and accuracy per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [h["round"] for h in history]
    has_acc = any("plugin_acc" in h["server"] for h in history)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot(rounds, [h["server"]["plugin_loss"] for h in history], "o-", label="plug-in (held-out)")
    ax.plot(rounds, [h["server"]["emulator_loss"] for h in history], "s--", label="emulator (held-out)")
    train = [(h["round"], sum(c["train-loss"] for c in h["clients"]) / len(h["clients"])) for h in history if h["clients"]]
    if train:
        ax.plot(*zip(*train), "^:", label="clients (training)")
    ax.set_xlabel("round")
    ax.set_ylabel("loss (response tokens)")
    ax.legend()
    if has_acc:
        axes[0][1].plot(rounds, [h["server"].get("plugin_acc", float("nan")) for h in history], "o-", label="acc")
        axes[0][1].plot(rounds, [h["server"].get("plugin_acc_norm", float("nan")) for h in history], "s--", label="acc_norm")
        axes[0][1].set_xlabel("round")
        axes[0][1].set_ylabel("plug-in accuracy")
        axes[0][1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
