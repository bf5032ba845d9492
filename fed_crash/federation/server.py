"""The model owner's side of a federated run: what the ServerApp's main
(``simulations/alpaca/alpaca/server_app.py``) calls, step by step.

:func:`open_run` checks the run folder (and the checkpoint to resume) and loads the data
slices; :func:`plan_or_resume` gives the emulator spec; :func:`write_run` writes the run folder
and returns the emulator folder; :class:`RoundEvaluator` is the per-round work (plug-in,
evaluation, checkpoint, metrics line) Flower calls after every round; :func:`check_clients`
checks the connected nodes against the client pool; :func:`finish` writes what a finished run
leaves. Everything the run config and data can get wrong is checked before the run folder is
touched; the folder is written while the client actors start, and a start that fails after
that (a node check, a node that never comes) removes it again (:func:`removed_if_it_fails_to_start`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from safetensors.torch import load_file

from fed_crash.config import ConfigError, FederationConfig, RunConfig, resolve_path
from fed_crash.core.artifacts import MANIFEST, WEIGHTS, ArtifactError, check_cut, check_private, load_emulator, save_adapters, save_emulator
from fed_crash.core.data import Tokenized, load_instructions, pad_id, tokenize
from fed_crash.core.emulator import AdapterError, EmulatorSpec, adapter_state, build_emulator, check_adapters, emulator_weights, plug_in
from fed_crash.core.lora import merge_lora
from fed_crash.core.models import LoadedModel, default_cache_dir, resolve_device, state_hash
from fed_crash.core.precision import compute_dtype, dtype_name
from fed_crash.core.plots import figure
from fed_crash.core.train import evaluate
from fed_crash.errors import FedCrashError
from fed_crash.evaluation.mc import HUB_TASKS, load_task, score_mc
from fed_crash.federation import protocol as P
from fed_crash.federation.checkpoint import (CHECKPOINT, Checkpoint, check_resumable, read_checkpoint, resumed_history, rng_state,
                                             seed_everything, set_rng_state, write_checkpoint)
from fed_crash.federation.fedbiot import align_emulator
from fed_crash.federation.partition import calibration_slice, client_table, data_source, make_partitioner, partition_size, public_rows_needed, server_and_client_rows
from fed_crash.federation.shards import Split, read_split
from fed_crash.selection.plan import calibration_rows, plan_emulator

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger(__name__)

STARTED = "started.json"  # created exclusively by the start that owns a new run folder (its pid, host, time)

# Metrics that measure the machine rather than the computation (durations, memory, worker
# process ids, wall-clock times), and Flower's node ids, which it draws at random: what may
# differ between two runs of the same config and seed. Name new measured metrics with one of
# these suffixes.
MEASURED_SUFFIXES = ("seconds", "-mib", "-pid", "-time")


def reproducible(value):
    """A metrics line (or part of one) without what :data:`MEASURED_SUFFIXES` and node ids name:
    two runs with the same config and seed give equal ones (tests and scripts compare them)."""
    if isinstance(value, dict):
        return {k: reproducible(v) for k, v in value.items() if k != "node" and not k.endswith(MEASURED_SUFFIXES)}
    if isinstance(value, list):
        return [reproducible(v) for v in value]
    return value


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


@dataclass
class Run:
    """A run about to start: its folder (checked, not yet written), the checkpoint it resumes
    from, and the server-held data slices (clients never get ``eval`` or ``calibration``)."""

    cfg: RunConfig
    folder: Path
    checkpoint: Checkpoint | None
    source: str  # the instruction data, resolved
    eval_rows: list[dict[str, str]]
    calibration: list[dict[str, str]]
    client_table: Dataset | None  # the client pool as flwr-datasets partitions it (None with a split folder: the nodes read their shard files)
    mc_rows: list[dict]
    laps: Laps  # started before the data was read
    dtype: torch.dtype  # the server's compute dtype (compute-dtype resolved for its device)
    split: Split | None = None  # the split folder (shards), when the run reads one
    created: bool = False  # this start created the folder (write_run): it removes it if it fails before round 1 is saved

    @property
    def cache(self) -> Path:
        """The server's cache folder (``cache-dir``, else the default): CKA matrices, round-0 scores."""
        return Path(self.cfg.fed.cache_dir) if self.cfg.fed.cache_dir else default_cache_dir()

    @property
    def round_offset(self) -> int:
        return self.checkpoint.round if self.checkpoint else 0


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


def open_run(cfg: RunConfig) -> Run:
    """The run folder and checkpoint, checked, and the data slices (see :class:`Run`)."""
    laps = Laps()  # the run's clock starts here: setup_seconds["data"] is this step
    log.info("ServerApp main started: checking the run folder, reading the data")
    folder = run_folder(cfg)
    checkpoint = read_checkpoint(folder) if cfg.fed.resume else None
    if checkpoint:
        check_resumable(json.loads((folder / "config.json").read_text()), cfg, folder / "config.json")
    mc_source = cfg.fed.mc_task if cfg.fed.mc_task in HUB_TASKS else resolve_path(cfg.fed.mc_task)
    mc_rows = load_task(mc_source, limit=cfg.fed.mc_samples, seed=cfg.data.seed).rows if cfg.fed.mc_task else []
    split = read_split(cfg.fed.shards) if cfg.fed.shards else None  # the server reads only its own slices
    source = str(split.folder) if split else data_source(cfg)
    parts = ({"eval": split.eval_rows, "calibration": split.calibration, "clients": []} if split else
             server_and_client_rows(load_instructions(source, skip_malformed=cfg.data.skip_malformed), cfg.fed, cfg.data, calibration_slice(cfg)))
    if public_rows_needed(cfg) and cfg.fed.calib_data:
        parts["calibration"] = calibration_rows(data_source(cfg, cfg.fed.calib_data), cfg.data, cfg.emulator.calib_samples)
    dtype = compute_dtype(cfg.compute.compute_dtype, resolve_device(cfg.compute.server_device))
    run = Run(cfg, folder, checkpoint, source, parts["eval"], parts["calibration"], None if split else client_table(parts["clients"], cfg.fed), mc_rows, laps, dtype, split=split)
    run.laps.mark("data")
    return run


def plan_or_resume(run: Run, loaded: LoadedModel) -> tuple[EmulatorSpec, torch.Tensor | None]:
    """The emulator spec and CKA matrix: planned on the server's calibration rows, or the
    checkpoint's, after checking that it was cut from these weights and its adapters fit them."""
    cfg, checkpoint, model = run.cfg, run.checkpoint, loaded.model
    if checkpoint is None:
        spec, similarity = plan_emulator(model, loaded.tokenizer, run.calibration, cfg.data, cfg.emulator, progress=cfg.fed.progress, cache=run.cache,
                                         dtype=run.dtype)
    else:
        source, now = checkpoint.manifest["source"]["sha256"], state_hash(model.state_dict())
        if source != now:
            raise ArtifactError(f"{checkpoint.emulator / MANIFEST} was cut from a model with weights sha256 {source[:16]}, "
                                f"but model {cfg.fed.model!r} has {now[:16]}: the run to resume belongs to another model")
        spec = EmulatorSpec.from_dict(checkpoint.manifest["spec"])
        try:
            check_adapters(checkpoint.adapters, adapter_state(model, spec), f"model {cfg.fed.model!r}")
        except AdapterError as err:
            raise ArtifactError(f"checkpoint round {checkpoint.round} adapters: {err}") from None
        checkpoint.strategy.check_fits(list(adapter_state(model, spec)), cfg.fed.strategy)
        similarity = torch.tensor(checkpoint.manifest["similarity"]) if checkpoint.manifest.get("similarity") else None
    check_cut(spec)
    log.info("%s", spec.describe())
    run.laps.mark("emulator_plan")
    return spec, similarity


def check_clients(run: Run, num_partitions: int, nodes: int) -> tuple[dict[int, int], dict[int, str]]:
    """Before training: every client's shard can be cut (no more clients than examples, no
    empty non-IID shard) or, with a split folder, the nodes hold as many partitions as it has;
    Flower can sample ``min-train-nodes`` of the connected nodes; a robust strategy has a sample
    it can protect. Returns each partition's shard size (the most examples its replies may
    claim) and, with a split folder, its shard file's sha256 (each node checks its file)."""
    cfg = run.cfg
    if not nodes:
        raise FedCrashError("no connected node said which partition it holds (does the ClientApp register the partition query handler?)")
    if run.split:
        if num_partitions != run.split.num_partitions:
            raise ConfigError(f"shards: {run.split.folder} splits the data into {run.split.num_partitions} partitions, the nodes say {num_partitions}")
        sizes, hashes = run.split.shard_rows, run.split.shard_sha256
    else:
        partitioner = make_partitioner(run.client_table, cfg.fed, num_partitions, seed=cfg.data.seed)
        sizes, hashes = {pid: partition_size(partitioner, cfg.fed, pid) for pid in range(num_partitions)}, {}
    if cfg.fed.min_train_nodes > nodes:
        raise ConfigError(f"run config: min-train-nodes is {cfg.fed.min_train_nodes} but only {nodes} nodes are connected (Flower would wait for more forever)")
    unprotected = robust_sample_problem(cfg.fed, nodes)
    if unprotected:
        raise ConfigError(f"run config: {unprotected}")
    run.laps.mark("connect")
    return sizes, hashes


def robust_sample_problem(fed: FederationConfig, nodes: int) -> str | None:
    """Why the robust strategy would protect against nothing at this sample size, else ``None``.
    The sample is Flower's, ``max(int(nodes * fraction-train), min-train-nodes)``. A median of
    two updates is their mean; a trimmed mean cuts ``int(beta * m)`` updates from each end;
    Krum tolerates ``f`` bad updates only among ``m >= 2f + 3`` (Blanchard et al. 2017)."""
    m = max(int(nodes * fed.fraction_train), fed.min_train_nodes)
    sample = f"a sample of {m} ({nodes} nodes x fraction-train {fed.fraction_train:g}, min-train-nodes {fed.min_train_nodes})"
    if fed.strategy == "fedmedian" and m < 3:
        return f"fedmedian over {sample} is the mean: sample at least 3 clients per round"
    if fed.strategy == "fedtrimmedavg" and int(fed.trimmed_beta * m) < 1:
        return (f"fedtrimmedavg with trimmed-beta {fed.trimmed_beta:g} over {sample} trims int({fed.trimmed_beta:g} x {m}) = 0 updates: "
                f"sample at least {math.ceil(1 / fed.trimmed_beta - 1e-9) if fed.trimmed_beta > 0 else 'more'} clients per round or raise trimmed-beta")
    if fed.strategy == "krum" and m < 2 * fed.krum_malicious + 3:
        return f"krum with krum-malicious {fed.krum_malicious} needs a sample of at least {2 * fed.krum_malicious + 3} (2f + 3), got {sample}"
    return None


def emulator_payload(folder: Path, model, spec: EmulatorSpec) -> P.EmulatorPayload:
    """The emulator message's content, checked by :func:`fed_crash.core.artifacts.check_private`
    before it may leave the server (no removed layer, no adapter, no checkpoint file). The
    manifest that travels names the source model without the server's filesystem path."""
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.suffix != ".safetensors"}
    manifest = json.loads(files[MANIFEST])
    source = manifest["source"]["model_id"]
    if Path(source).expanduser().is_absolute() or source.startswith("."):  # a path on the server, not a hub name
        manifest["source"]["model_id"] = Path(source).name
    files[MANIFEST] = json.dumps(manifest, indent=1).encode()
    weights = load_file(str(folder / WEIGHTS))  # as stored for the run's wire dtype (write_run): they travel so
    check_private(weights, files, model, spec)
    # the tensors' hash is the manifest's (save_emulator computed it; every node checks it on arrival)
    return P.EmulatorPayload(P.to_wire(weights, "fp32"), ConfigRecord(files),
                             P.payload_sha256(manifest["weights_sha256"], files))


def write_run(run: Run, loaded: LoadedModel, spec: EmulatorSpec, similarity: torch.Tensor | None) -> Path:
    """From here on the run writes to its folder: ``config.json``, the emulator folder and
    ``adapters/`` of a new run (a resumed one has them). Returns the emulator folder."""
    if run.checkpoint:
        log.info("resuming %s after round %d of %d", run.folder, run.checkpoint.round, run.cfg.fed.num_server_rounds)
        return run.checkpoint.emulator
    run.folder.mkdir(parents=True, exist_ok=True)
    try:  # claimed atomically: of two starts with one run-name, the second fails here, naming the folder
        with os.fdopen(os.open(run.folder / STARTED, os.O_CREAT | os.O_EXCL | os.O_WRONLY), "w") as claim:
            json.dump({"pid": os.getpid(), "host": os.uname().nodename, "started": datetime.now().isoformat(timespec="seconds")}, claim)
    except FileExistsError:
        raise ConfigError(f"run folder {run.folder} was claimed by another start of run-name {run.cfg.fed.run_name!r} meanwhile") from None
    run.created = True
    (run.folder / "config.json").write_text(json.dumps({**run.cfg.to_dict(), "data_source": run.source, "model_id": loaded.model_id,
                                                       "server_compute_dtype": dtype_name(run.dtype)}, indent=1))
    folder = save_emulator(run.folder / "emulator", loaded.model, loaded.tokenizer, spec, source_id=loaded.model_id, similarity=similarity,
                           weights_dtype=run.cfg.fed.wire_dtype, compute_dtype=dtype_name(run.dtype))
    (run.folder / "adapters").mkdir()
    return folder


@contextmanager
def removed_if_it_fails_to_start(run: Run) -> Iterator[None]:
    """A new run that fails before its first round is saved (a value found bad late, out of
    memory, a killed client pool) removes the folder it created, so the same run-name can be
    started again; once a checkpoint exists the folder stays, for ``resume=true``."""
    try:
        yield
    except BaseException:
        if run.created and not (run.folder / CHECKPOINT).exists():
            shutil.rmtree(run.folder, ignore_errors=True)
            log.error("the run failed before its first round was saved: removed %s, so it can be started again", run.folder)
        raise


def initial_adapters(run: Run, model, spec: EmulatorSpec) -> ArrayRecord:
    """Round 0's adapters (the checkpoint's when resuming), in the model's key order; the server's
    global generators start where the uninterrupted run stood, or from the seed."""
    if run.checkpoint:
        set_rng_state(run.checkpoint.rng)
    else:
        seed_everything(run.cfg.data.seed)
    start = run.checkpoint.adapters if run.checkpoint else adapter_state(model, spec)
    return ArrayRecord({k: start[k].detach().clone() for k in adapter_state(model, spec)})


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


class RoundEvaluator:
    """Flower's ``evaluate_fn``: after every round, plug the aggregate into the central model and
    evaluate it (and, in the rounds :func:`emulator_evaluated` names, the emulator with the same
    adapters), save the adapters and the strategy's state, append the metrics line, write the
    checkpoint, log one line; with FedBiOT, re-align the emulator and have every node receive it."""

    def __init__(self, run: Run, loaded: LoadedModel, spec: EmulatorSpec, similarity: torch.Tensor | None, emulator_folder: Path, strategy) -> None:
        cfg = run.cfg
        self.run, self.cfg, self.loaded, self.spec, self.similarity, self.strategy = run, cfg, loaded, spec, similarity, strategy
        model, tokenizer = loaded.model, loaded.tokenizer
        self.emulator_folder = emulator_folder
        self.source_sha256 = json.loads((emulator_folder / MANIFEST).read_text())["source"]["sha256"]  # the owner's model, before any plug-in
        # a resumed run reads its emulator back (FedBiOT may have re-aligned it); a new one is cut from the model in memory
        self.emulator = (load_emulator(emulator_folder, run.checkpoint.adapters, device=str(next(model.parameters()).device))[0]
                         if run.checkpoint else build_emulator(model, spec))
        self.pad = pad_id(tokenizer)
        self.held_out = tokenize(run.eval_rows, tokenizer, max_length=cfg.data.max_length, template=cfg.data.template)
        self.public: list[Tokenized] = tokenize(run.calibration, tokenizer, max_length=cfg.data.max_length, template=cfg.data.template) if cfg.fed.fedbiot_align_steps > 0 else []
        self.dtypes = {k: v.dtype for k, v in adapter_state(model, spec).items()}
        self.full_bytes = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in model.state_dict().values()}.values())  # tied tensors once
        self.metrics_file = run.folder / "metrics.jsonl"
        self.history = resumed_history(self.metrics_file, run.checkpoint.round) if run.checkpoint else []
        self.start = time.perf_counter()
        strategy.set_emulator(emulator_payload(emulator_folder, model, spec))
        run.laps.mark("emulator_write")  # the folder, the server's copy, the payload

    def adapters(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        return {k: v.to(self.dtypes[k]) for k, v in arrays.to_torch_state_dict().items()}

    def scores(self, adapters: dict[str, torch.Tensor], *, with_emulator: bool = True) -> dict[str, float]:
        """Held-out loss and perplexity of the plug-in and (``with_emulator``) of the emulator,
        plug-in accuracy on ``mc-task``."""
        cfg, model = self.cfg, self.loaded.model
        plug_in(model, adapters)
        self.emulator.load_adapters(adapters)  # evaluated or not: FedBiOT's alignment starts from the emulator with this round's adapters
        dtype = self.run.dtype
        plugin = evaluate(model, self.held_out, self.pad, batch_size=cfg.fed.eval_batch_size, progress=cfg.fed.progress, desc="plug-in", dtype=dtype)
        server = {"plugin_loss": plugin["loss"], "plugin_ppl": plugin["ppl"]}
        if with_emulator:
            emu = evaluate(self.emulator.model, self.held_out, self.pad, batch_size=cfg.fed.eval_batch_size, progress=cfg.fed.progress, desc="emulator", dtype=dtype)
            server.update({"emulator_loss": emu["loss"], "emulator_ppl": emu["ppl"]})
        if self.run.mc_rows:
            mc = score_mc(model, self.loaded.tokenizer, self.run.mc_rows, batch_size=cfg.fed.eval_batch_size * 4, dtype=dtype)
            server.update({f"plugin_{k}": mc[k] for k in ("acc", "acc_norm", "acc_bytes")})
        return server

    def zero_shot_scores(self, adapters: dict[str, torch.Tensor]) -> dict[str, float]:
        """Round 0's :meth:`scores` (the model's own adapters: the full model zero-shot, and the
        emulator zero-shot), kept in ``<cache>/scores/<key>.json`` keyed by all they depend on
        (the weights' and the evaluation code's hashes, the spec, the held-out tokens, the
        questions, dtype, batch sizes, device type): cells of an experiment that share model,
        emulator spec and rows compute them once."""
        cfg = self.cfg
        modules = (evaluate.__module__, score_mc.__module__, build_emulator.__module__, compute_dtype.__module__)  # precision: how passes run in bf16
        code = "".join(Path(sys.modules[m].__file__).read_text() for m in modules)
        parts = [json.loads((self.emulator_folder / MANIFEST).read_text())["source"]["sha256"], hashlib.sha256(code.encode()).hexdigest(),
                 self.spec.to_dict(), [[e.input_ids, e.labels] for e in self.held_out], self.run.mc_rows, dtype_name(self.run.dtype),
                 cfg.fed.eval_batch_size, str(next(self.loaded.model.parameters()).device.type)]
        key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
        path = self.run.cache / "scores" / f"{key}.json"
        if path.is_file():
            log.info("round 0 scores (full model and emulator zero-shot) from the cache %s", path)
            return json.loads(path.read_text())
        server = self.scores(adapters)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")  # a concurrent run never reads a half-written file
        partial.write_text(json.dumps(server))
        partial.replace(path)
        return server

    def realign(self, server_round: int) -> dict:
        """FedBiOT: distil the emulator toward the full model (both hold this round's adapters),
        write it as a new emulator folder and have every node receive it before its next round."""
        cfg, model = self.cfg, self.loaded.model
        stats = align_emulator(self.emulator, model, self.public, self.pad, steps=cfg.fed.fedbiot_align_steps, lr=cfg.fed.fedbiot_align_lr,
                               batch_size=cfg.train.batch_size, seed=cfg.data.seed + server_round)
        self.emulator_folder = save_emulator(self.run.folder / f"emulator-round-{server_round}", model, self.loaded.tokenizer, self.spec,
                                             source_id=self.loaded.model_id, similarity=self.similarity, weights=emulator_weights(self.emulator),
                                             weights_dtype=cfg.fed.wire_dtype, compute_dtype=dtype_name(self.run.dtype), source_sha256=self.source_sha256)
        self.strategy.set_emulator(emulator_payload(self.emulator_folder, model, self.spec))
        return stats

    def __call__(self, flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's ``evaluate_fn``: evaluate and record round ``flower_round``'s aggregate now."""
        return self.snapshot(flower_round, arrays)(False)

    def snapshot(self, flower_round: int, arrays: ArrayRecord) -> Callable[[bool], MetricRecord | None]:
        """Take what the server holds at the end of round ``flower_round`` (the round's clock,
        the strategy's state, the global generators) and return the work that evaluates the
        aggregate and records the round from there: run at once by :meth:`__call__`, or (round 0)
        beside round 1's training (:meth:`strategies.OffsiteStrategy.start`), its argument saying
        which. Taken at the round's end, the checkpoint holds that round's state even though round
        1's sampling has drawn from the strategy's generator (DP) by the time it is written; the
        next aggregation comes only after this work has run."""
        if self.run.checkpoint and flower_round == 0:
            return lambda beside: None  # the checkpoint's round: evaluated and recorded before the run stopped
        round_seconds = self.run.laps.mark()  # since the last evaluation: sampling, sending, client work, receiving, aggregation
        strategy_state, generators = self.strategy.state_dict(), rng_state()

        def evaluate_and_record(beside: bool) -> MetricRecord:
            server_round = flower_round + self.run.round_offset
            round_start = time.perf_counter()
            adapters = self.adapters(arrays)
            server = (self.zero_shot_scores(adapters) if server_round == 0 else
                      self.scores(adapters, with_emulator=emulator_evaluated(server_round, self.cfg.fed.num_server_rounds, self.cfg.fed.emulator_eval_every)))
            adapters_file = save_adapters(self.run.folder / "adapters" / f"round-{server_round}.safetensors", adapters,
                                          {"round": server_round, "spec": self.spec.to_dict()})
            aligned = self.realign(server_round) if self.cfg.fed.fedbiot_align_steps > 0 and server_round < self.cfg.fed.num_server_rounds else None
            traffic = self.strategy.rounds.get(server_round, P.RoundTraffic())  # round 0: nothing sent yet
            elapsed = time.perf_counter() - self.start + (self.run.checkpoint.elapsed_seconds if self.run.checkpoint else 0.0)
            line = metrics_line(server_round, server, traffic, self.full_bytes, aligned, eval_seconds=time.perf_counter() - round_start,
                                eval_beside_training=beside, round_seconds=round_seconds, elapsed=elapsed,
                                setup=self.run.laps.seconds if flower_round == (1 if self.run.checkpoint else 0) else None)
            self.history.append(line)
            with self.metrics_file.open("a") as handle:
                handle.write(json.dumps(line) + "\n")
            write_checkpoint(self.run.folder, server_round, adapters_file, strategy_state, self.emulator_folder, elapsed, generators)
            log.info("%s", round_summary(line, self.cfg.fed.num_server_rounds))
            self.run.laps.mark()  # the next round's clock starts when this evaluation is done
            return MetricRecord({k: float(v) for k, v in server.items()})

        return evaluate_and_record


def emulator_evaluated(server_round: int, rounds: int, every: int) -> bool:
    """Whether round ``server_round`` of ``rounds`` evaluates the emulator besides the plug-in:
    round 0 (zero-shot: where the emulator-to-model gap starts) and the last round (where it
    ends) always, in between every ``every``-th round (0: none). An emulator pass is about 40%
    of a round's evaluation, and the clients' training loss already follows the emulator's fit
    round by round."""
    return server_round in (0, rounds) or (every > 0 and server_round % every == 0)


def metrics_line(server_round: int, server: dict, traffic: P.RoundTraffic, full_bytes: int, aligned: dict | None, *,
                 eval_seconds: float, eval_beside_training: bool, round_seconds: float, elapsed: float, setup: dict | None) -> dict:
    """One line of ``metrics.jsonl``: the server's scores, each client's metrics, the failures,
    the traffic, privacy spent, FedBiOT's alignment and where the time went. ``round_seconds``
    runs from the end of the previous evaluation to the end of this round; when that evaluation
    ran beside this round's training (``eval_beside_training``: round 0's, normally),
    ``round_seconds + eval_seconds`` is still the time from one evaluation's end to the next's."""
    privacy = traffic.privacy
    return {
        "round": server_round,
        "server": server,
        "clients": traffic.clients,
        "failures": traffic.failures,
        **({"aggregated": traffic.aggregated} if server_round > 0 else {}),
        **({"note": traffic.note} if traffic.note else {}),
        "bytes_down": sum(traffic.down.values()),
        "bytes_up": sum(traffic.up.values()),
        "emulator_bytes_down": sum(traffic.emulator_down.values()),
        "bytes_down_per_client": traffic.down,
        "bytes_up_per_client": traffic.up,
        "full_model_bytes": full_bytes,
        **({"privacy": {"epsilon": privacy[P.DP_EPSILON], "delta": privacy[P.DP_DELTA], "releases": int(privacy[P.DP_RELEASES])}} if privacy else {}),
        **({"alignment": aligned} if aligned else {}),
        "eval_seconds": eval_seconds,
        "eval_beside_training": eval_beside_training,
        "round_seconds": round_seconds,
        "emulator_seconds": traffic.emulator_seconds,
        "aggregate_seconds": traffic.aggregate_seconds,
        **({"setup_seconds": setup} if setup is not None else {}),
        "elapsed_seconds": elapsed,
    }


def _emulator_loss(server: dict) -> str:
    """The emulator's held-out loss, or "-" in a round that did not evaluate it (:func:`emulator_evaluated`)."""
    return f"{server['emulator_loss']:.4f}" if "emulator_loss" in server else "-"


def round_summary(line: dict, rounds: int) -> str:
    """The console's line for one round."""
    clients, server, privacy, aligned = line["clients"], line["server"], line.get("privacy"), line.get("alignment")
    examples = sum(c[P.NUM_EXAMPLES] for c in clients)
    train_loss = f"{sum(c['train-loss'] * c[P.NUM_EXAMPLES] for c in clients) / examples:.3f}" if examples else "-"
    acc = f" | acc {server['plugin_acc']:.3f}" if "plugin_acc" in server else ""
    extras = f" | epsilon {privacy['epsilon']:.2f} at delta {privacy['delta']:g}" if privacy else ""
    extras += f" | emulator aligned {aligned['first_loss']:.4f} -> {aligned['last_loss']:.4f}" if aligned else ""
    extras += " | previous adapters kept" if line["round"] > 0 and not line["aggregated"] else ""
    return (f"round {line['round']}/{rounds} | clients {len(clients)} ok {len(line['failures'])} failed | train loss {train_loss} "
            f"| plug-in loss {server['plugin_loss']:.4f} | emulator loss {_emulator_loss(server)}{acc} "
            f"| down {_mb(line['bytes_down'])} up {_mb(line['bytes_up'])}{extras} | {line['elapsed_seconds']:.0f}s")


def finish(run: Run, loaded: LoadedModel, evaluator: RoundEvaluator, final_arrays: ArrayRecord, initial: ArrayRecord) -> Path:
    """The final adapters (the last aggregate; none at all, when every round failed or nothing
    was left to resume: the start), the plugged-in model, ``rounds.png`` and ``rounds.md``."""
    final = evaluator.adapters(final_arrays if len(final_arrays) else initial)
    save_adapters(run.folder / "adapters" / "final.safetensors", final)
    if run.cfg.fed.save_model:
        plug_in(loaded.model, final)
        merge_lora(loaded.model)  # full-lora: a plain model to save (nothing to merge otherwise)
        loaded.model.save_pretrained(run.folder / "plugin-model", safe_serialization=True)
        loaded.tokenizer.save_pretrained(run.folder / "plugin-model")
    plot_history(evaluator.history, run.folder / "rounds.png")
    (run.folder / "rounds.md").write_text(rounds_table(evaluator.history) + "\n")
    log.info("run finished in %.0fs: %s", time.perf_counter() - evaluator.start, run.folder)
    return run.folder


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
        examples = sum(c[P.NUM_EXAMPLES] for c in clients)
        train = f"{sum(c['train-loss'] * c[P.NUM_EXAMPLES] for c in clients) / examples:.3f}" if examples else "-"
        acc = f"{server['plugin_acc']:.3f}" if "plugin_acc" in server else "-"
        traffic = f"{down / 1e6:.1f} | {up / 1e6:.1f} | {down / full:.3f} | {up / full:.3f}" if clients else "- | - | - | -"
        rows.append(f"| {h['round']} | {len(clients)} | {train} | {server['plugin_loss']:.4f} | {server['plugin_ppl']:.2f} "
                    f"| {_emulator_loss(server)} | {acc} | {traffic} |")
    return "\n".join(rows)


def plot_history(history: list[dict], path: Path) -> None:
    """Loss (plug-in, emulator, client training) and accuracy per round."""
    rounds = [h["round"] for h in history]
    has_acc = any("plugin_acc" in h["server"] for h in history)
    with figure(path, figsize=(10 if has_acc else 6, 4), ncols=2 if has_acc else 1, squeeze=False, dpi=110) as (_, axes):
        ax = axes[0][0]
        ax.plot(rounds, [h["server"]["plugin_loss"] for h in history], "o-", label="plug-in (held-out)")
        emulator = [(h["round"], h["server"]["emulator_loss"]) for h in history if "emulator_loss" in h["server"]]
        if emulator:
            ax.plot(*zip(*emulator), "s--", label="emulator (held-out)")
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
