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

from .artifacts import MANIFEST, WEIGHTS, load_emulator, save_adapters, save_emulator, save_tensors
from .config import ConfigError, RunConfig, parse_run_config
from .data import DEFAULT_HUB_DATASET, Tokenized, load_instructions, pad_id, tokenize
from .emulator import Emulator, adapter_state, build_emulator, emulator_weights, plug_in
from .errors import FedCrashError
from .fedbiot import align_emulator
from .models import load_model, resolve_device
from .partition import client_shard, server_and_client_rows
from .pipeline import calibration_rows, plan_emulator
from .train import evaluate, proximal_term, train_adapters

log = logging.getLogger(__name__)

EMULATOR_WEIGHTS_KEY = "emulator"  # ArrayRecord: the emulator's tensors, first message per node only
EMULATOR_FILES_KEY = "emulator-files"  # ConfigRecord: manifest, model config, tokenizer files (bytes)


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
    """Whether the server needs public rows: CRaSh's calibration, FedBiOT's alignment."""
    return cfg.emulator.method == "crash" or cfg.fed.fedbiot_align_steps > 0


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
    """Show the library's INFO lines (one per round on the server) in the app's output."""
    lib = logging.getLogger("fed_crash")
    if not lib.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(levelname)s fed_crash: %(message)s"))
        lib.addHandler(handler)
        lib.setLevel(logging.INFO)
        lib.propagate = False


# --------------------------------------------------------------------------- client


_EMULATORS: dict[str, tuple[Emulator, object]] = {}  # per worker process, by emulator folder (named by content hash)
_SHARDS: dict[tuple, list[Tokenized]] = {}  # per worker process: tokenized private shards
_ROWS: dict[str, list[dict[str, str]]] = {}


def node_cache_dir(context: Context) -> Path:
    """Where this node keeps what it received: ``$FED_CRASH_NODE_CACHE`` or ~/.cache/fed-crash/nodes."""
    root = Path(os.environ.get("FED_CRASH_NODE_CACHE", Path.home() / ".cache" / "fed-crash" / "nodes"))
    return root / f"node-{context.node_id}"


def _receive_emulator(msg: Message, context: Context) -> Path:
    """The node's emulator folder: written from the message the first time, then reused."""
    if EMULATOR_WEIGHTS_KEY in msg.content.array_records:
        files = msg.content[EMULATOR_FILES_KEY]
        manifest = json.loads(files[MANIFEST])
        folder = node_cache_dir(context) / manifest["weights_sha256"][:16]
        if not (folder / WEIGHTS).is_file():
            tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
            tmp.mkdir(parents=True, exist_ok=True)
            for name, blob in files.items():
                (tmp / name).write_bytes(blob)
            save_tensors(tmp / WEIGHTS, msg.content[EMULATOR_WEIGHTS_KEY].to_torch_state_dict())
            tmp.replace(folder)  # atomic: a concurrent worker of the same node sees all or nothing
        context.state["emulator"] = ConfigRecord({"folder": str(folder)})
    if "emulator" not in context.state.config_records:
        raise FedCrashError(f"node {context.node_id} has no emulator: it was never sent one")
    return Path(context.state["emulator"]["folder"])


def _client_examples(cfg: RunConfig, context: Context, tokenizer) -> list[Tokenized]:
    pid, num = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    key = (json.dumps(cfg.to_dict(), sort_keys=True), pid, num)
    if key not in _SHARDS:
        source = _data_source(cfg)
        if source not in _ROWS:
            _ROWS[source] = load_instructions(source, skip_malformed=cfg.data.skip_malformed)
        pool = server_and_client_rows(_ROWS[source], cfg.fed, cfg.data, calibration_slice(cfg))["clients"]
        shard = client_shard(pool, cfg.fed, pid, num, seed=cfg.data.seed)
        _SHARDS[key] = tokenize(shard, tokenizer, max_length=cfg.data.max_length, template=cfg.data.template)
    return _SHARDS[key]


def client_train(msg: Message, context: Context) -> Message:
    """One round of local offsite-tuning on this node's private shard."""
    cfg = run_config(context)
    if not cfg.fed.progress:  # keep the run's console to one line per round
        logging.getLogger("fed_crash.train").setLevel(logging.WARNING)
    folder = _receive_emulator(msg, context)
    adapters = msg.content["arrays"].to_torch_state_dict()
    if str(folder) not in _EMULATORS:
        _EMULATORS[str(folder)] = load_emulator(folder, adapters)[:2]  # checks the content hash
    emulator, tokenizer = _EMULATORS[str(folder)]
    emulator.load_adapters(adapters)
    emulator.model.to(resolve_device("auto"))  # CUDA when Ray gave this actor a GPU
    examples = _client_examples(cfg, context, tokenizer)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    pid = int(context.node_config["partition-id"])
    train_cfg = replace(cfg.train, seed=cfg.train.seed + 1000 * server_round + pid)
    # FedProx sends proximal-mu (term (mu/2)||w - w0||^2); FedBiOT's lambda||w - w0||^2 has the same form
    coefficient = float(config.get("proximal-mu", 0.0)) / 2 + cfg.fed.fedbiot_lambda
    extra = proximal_term(emulator.trainable_parameters(), coefficient) if coefficient > 0 else None
    stats = train_adapters(emulator, examples, pad_id(tokenizer), train_cfg, extra_loss=extra, progress=cfg.fed.progress)
    values = {
        "num-examples": len(examples),
        "train-loss": float(stats["train_loss"]),
        "first-loss": float(stats["first_loss"]),
        "tokens": int(stats["tokens"]),
        "steps": int(stats["steps"]),
        "seconds": float(stats["seconds"]),
    }
    trained = emulator.adapter_state()
    if KEY_CLIPPING_NORM in config:  # differential privacy: the server adds noise to the mean
        from strategies import UNIT_WEIGHT_KEY

        trained, values["update-norm"] = clip_update(trained, adapters, float(config[KEY_CLIPPING_NORM]))
        values[UNIT_WEIGHT_KEY] = 1
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


def emulator_payload(folder: Path) -> RecordDict:
    """The records a node needs once: the emulator's tensors and its small files."""
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.suffix != ".safetensors"}
    return RecordDict({
        EMULATOR_WEIGHTS_KEY: ArrayRecord(load_file(str(folder / WEIGHTS))),
        EMULATOR_FILES_KEY: ConfigRecord(files),
    })


def create_run_dir(cfg: RunConfig) -> Path:
    """A fresh ``results/<run-name>/``; an existing non-empty one is never overwritten."""
    name = cfg.fed.run_name or f"{cfg.emulator.method}-{cfg.fed.strategy}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = resolve_path(cfg.fed.results_dir) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run folder {run_dir} already exists and is not empty; choose another run-name")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def serve(grid: Grid, context: Context) -> Path:
    """The ServerApp's main: see module docstring. Returns the run folder."""
    from strategies import ClientClippingDP, OffsiteStrategy, RoundTraffic, make_strategy, server_state

    from .mc import HUB_TASKS, load_task, score_mc

    start = time.perf_counter()
    cfg = run_config(context)
    source = _data_source(cfg)
    mc_source = cfg.fed.mc_task if cfg.fed.mc_task in HUB_TASKS else resolve_path(cfg.fed.mc_task)
    mc_rows = load_task(mc_source, limit=cfg.fed.mc_samples, seed=cfg.data.seed).rows if cfg.fed.mc_task else []
    rows = load_instructions(source, skip_malformed=cfg.data.skip_malformed)
    parts = server_and_client_rows(rows, cfg.fed, cfg.data, calibration_slice(cfg))
    if public_rows_needed(cfg) and cfg.fed.calib_data:
        parts["calibration"] = calibration_rows(_data_source(cfg, cfg.fed.calib_data), cfg.data, cfg.emulator.calib_samples)
    strategy_inner = make_strategy(cfg.fed)
    loaded = load_model(cfg.fed.model, cache_dir=cfg.fed.cache_dir or None, device="auto")
    run_dir = create_run_dir(cfg)
    (run_dir / "config.json").write_text(json.dumps({**cfg.to_dict(), "data_source": source, "model_id": loaded.model_id}, indent=1))
    model, tokenizer = loaded.model, loaded.tokenizer

    spec, similarity = plan_emulator(model, tokenizer, parts["calibration"], cfg.data, cfg.emulator, progress=cfg.fed.progress)
    log.info("%s", spec.describe())
    save_emulator(run_dir / "emulator", model, tokenizer, spec, source_id=loaded.model_id, similarity=similarity)
    server_emulator = build_emulator(model, spec)
    full_bytes = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in model.state_dict().values()}.values())  # tied tensors once
    held_out = tokenize(parts["eval"], tokenizer, max_length=cfg.data.max_length, template=cfg.data.template)
    public = tokenize(parts["calibration"], tokenizer, max_length=cfg.data.max_length, template=cfg.data.template) if cfg.fed.fedbiot_align_steps > 0 else []
    pad = pad_id(tokenizer)
    dtypes = {k: v.dtype for k, v in adapter_state(model, spec).items()}
    strategy = OffsiteStrategy(strategy_inner, emulator_payload(run_dir / "emulator"), min_available_nodes=cfg.fed.min_available_nodes)
    (run_dir / "adapters").mkdir()
    metrics_file = run_dir / "metrics.jsonl"
    history: list[dict] = []

    def realign(server_round: int) -> dict:
        """FedBiOT: distil the emulator toward the full model (both hold this round's adapters),
        write it as a new emulator folder and have every node receive it with its next message."""
        stats = align_emulator(server_emulator, model, public, pad, steps=cfg.fed.fedbiot_align_steps, lr=cfg.fed.fedbiot_align_lr,
                               batch_size=cfg.train.batch_size, seed=cfg.data.seed + server_round)
        folder = save_emulator(run_dir / f"emulator-round-{server_round}", model, tokenizer, spec, source_id=loaded.model_id,
                               similarity=similarity, weights=emulator_weights(server_emulator))
        strategy.resend_emulator(emulator_payload(folder))
        return stats

    def evaluate_round(server_round: int, arrays: ArrayRecord) -> MetricRecord:
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
        save_adapters(run_dir / "adapters" / f"round-{server_round}.safetensors", adapters, {"round": server_round, "spec": spec.to_dict()})
        optimizer = server_state(strategy_inner)  # FedAdam's moments etc.: resuming needs them with the adapters
        if optimizer:
            save_tensors(run_dir / "adapters" / f"round-{server_round}.optimizer.safetensors",
                         {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in optimizer.items()}, {"round": server_round, "strategy": cfg.fed.strategy})
        spent = strategy_inner.spent.get(server_round) if isinstance(strategy_inner, ClientClippingDP) else None
        aligned = realign(server_round) if cfg.fed.fedbiot_align_steps > 0 and server_round < cfg.fed.num_server_rounds else None
        traffic = strategy.rounds.get(server_round, RoundTraffic())  # round 0: nothing sent yet
        clients = traffic.clients
        line = {
            "round": server_round,
            "server": server,
            "clients": clients,
            "failures": traffic.failures,
            "bytes_down": sum(traffic.down.values()),
            "bytes_up": sum(traffic.up.values()),
            "emulator_bytes_down": sum(traffic.emulator_down.values()),
            "bytes_down_per_client": traffic.down,
            "bytes_up_per_client": traffic.up,
            "full_model_bytes": full_bytes,
            **({"privacy": {"epsilon": spent.epsilon, "delta": spent.delta, "releases": spent.num_releases}} if spent else {}),
            **({"alignment": aligned} if aligned else {}),
            "eval_seconds": time.perf_counter() - round_start,
            "elapsed_seconds": time.perf_counter() - start,
        }
        history.append(line)
        with metrics_file.open("a") as handle:
            handle.write(json.dumps(line) + "\n")
        examples = sum(c["num-examples"] for c in clients)
        train_loss = f"{sum(c['train-loss'] * c['num-examples'] for c in clients) / examples:.3f}" if examples else "-"
        acc = f" | acc {server['plugin_acc']:.3f}" if "plugin_acc" in server else ""
        extras = f" | epsilon {spent.epsilon:.2f} at delta {spent.delta:g}" if spent else ""
        extras += f" | emulator aligned {aligned['first_loss']:.4f} -> {aligned['last_loss']:.4f}" if aligned else ""
        log.info(
            "round %d/%d | clients %d ok %d failed | train loss %s | plug-in loss %.4f | emulator loss %.4f%s | down %s up %s%s | %.0fs",
            server_round, cfg.fed.num_server_rounds, len(clients), len(line["failures"]), train_loss,
            plugin["loss"], emu["loss"], acc, _mb(line["bytes_down"]), _mb(line["bytes_up"]), extras, line["elapsed_seconds"],
        )
        return MetricRecord({k: float(v) for k, v in server.items()})

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord({k: v.detach().clone() for k, v in adapter_state(model, spec).items()}),
        num_rounds=cfg.fed.num_server_rounds,
        timeout=cfg.fed.round_timeout,
        train_config=ConfigRecord(),
        evaluate_fn=evaluate_round,
    )
    if len(result.arrays):
        save_adapters(run_dir / "adapters" / "final.safetensors", {k: v.to(dtypes[k]) for k, v in result.arrays.to_torch_state_dict().items()})
    if cfg.fed.save_model:
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
