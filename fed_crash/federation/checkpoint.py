"""Checkpoints: what a federated run needs to continue after it was killed.

At the end of every round the server writes ``<run>/checkpoint.json``, replacing the previous
one atomically after the round's own files, so a kill at any moment leaves a complete
checkpoint of the last finished round. It names or holds:

* ``round``: the last finished round;
* ``adapters``: ``adapters/round-N.safetensors`` (and the content hash it had);
* ``optimizer``: ``adapters/round-N.optimizer.safetensors``, the strategy's state tensors
  (FedAdam/FedYogi/FedAdagrad moments, FedAvgM's momentum), or null for stateless strategies;
* ``strategy``: the rest of the strategy's state, as JSON (the rounds the DP accountant
  composed, replayed on resume; FedAvgM's key order);
* ``emulator``: the folder clients are sent now (``emulator/``, or FedBiOT's latest
  ``emulator-round-K/``) and the sha256 of its manifest file;
* ``rng``: the server's Python, NumPy (DP noise) and torch random states;
* ``elapsed_seconds``.

Everything else a round depends on is a pure function of the run config and the round number
(client seeds, node sampling, injected faults, data shards), so a run resumed with
``resume=true`` from round N computes exactly what the uninterrupted run computed after round
N. :func:`read_checkpoint` checks the checkpoint (files, hashes) and :func:`check_resumable`
the run config before anything is written.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fed_crash.config import ConfigError, RunConfig
from fed_crash.core.artifacts import MANIFEST, ArtifactError, load_adapters, read_manifest
from fed_crash.core.models import file_sha256, state_hash

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.json"
FORMAT = "fed-crash-checkpoint/2"
# run-config fields a resumed run may change: they do not alter what the rounds compute (the
# run folder may have been moved or renamed, too)
RESUMABLE_CHANGES = {"fed.num_server_rounds", "fed.round_timeout", "fed.resume", "fed.progress", "fed.save_model", "fed.cache_dir",
                     "fed.results_dir", "fed.run_name"}


@dataclass
class StrategyState:
    """A strategy's server-side state as plain data (``state_dict()`` of the strategies package):
    tensors go to ``adapters/round-N.optimizer.safetensors``, ``meta`` into the checkpoint."""

    tensors: dict[str, np.ndarray] = field(default_factory=dict)  # "<group>/<adapter key>" -> array
    meta: dict = field(default_factory=dict)  # JSON

    def check_fits(self, adapter_keys: list[str], strategy: str) -> None:
        """Every tensor group covers exactly the adapter keys (a checkpoint of another model or run fails here)."""
        groups: dict[str, set[str]] = {}
        for name in self.tensors:
            group, _, key = name.partition("/")
            groups.setdefault(group, set()).add(key)
        for group, keys in groups.items():
            odd = sorted(keys ^ set(adapter_keys))
            if odd:
                raise ArtifactError(f"server optimizer state does not fit strategy {strategy} and these adapters: "
                                    f"{len(odd)} tensor(s) of {group!r} missing or unexpected, e.g. {odd[0]!r}")


@dataclass
class Checkpoint:
    round: int
    adapters: dict[str, torch.Tensor]
    strategy: StrategyState
    emulator: Path
    manifest: dict
    rng: dict
    elapsed_seconds: float


def seed_everything(seed: int) -> None:
    """Seed the server's global generators (Python, NumPy, torch). DP noise and the DP sample do
    not come from them (the run's seed is no secret): :mod:`strategies.dp` keeps its own."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The global generators' states, as JSON."""
    py = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]], "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state((npy[0], np.asarray(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to the disk: a power cut after this keeps it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(run_dir: Path, server_round: int, adapters: Path, strategy: StrategyState, emulator: Path, elapsed_seconds: float,
                     rng: dict | None = None) -> Path:
    """Write the strategy's tensors (when it has any) and then ``checkpoint.json`` for a finished
    round (see module docstring), atomically and durably: every file it names is on the disk
    before it is, and it is renamed into place only once written. ``rng``: the global generators'
    state at the round's end (:func:`rng_state`), when the checkpoint is written later (default:
    their state now)."""
    optimizer = None
    if strategy.tensors:
        optimizer = adapters.with_name(adapters.name.replace(".safetensors", ".optimizer.safetensors"))
        save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in strategy.tensors.items()}, str(optimizer),
                  metadata={"fed_crash": json.dumps({"round": server_round})})
    data = {
        "format": FORMAT,
        "round": server_round,
        "adapters": str(adapters.relative_to(run_dir)),
        "adapters_sha256": state_hash(load_file(str(adapters))),
        "optimizer": str(optimizer.relative_to(run_dir)) if optimizer else None,
        "strategy": strategy.meta,
        "emulator": {"folder": str(emulator.relative_to(run_dir)), "manifest_sha256": file_sha256(emulator / MANIFEST)},
        "rng": rng if rng is not None else rng_state(),
        "elapsed_seconds": elapsed_seconds,
    }
    for path in (adapters, optimizer):
        if path:
            fsync(path)
    tmp = run_dir / (CHECKPOINT + ".tmp")
    tmp.write_text(json.dumps(data))
    fsync(tmp)
    os.replace(tmp, run_dir / CHECKPOINT)
    fsync(run_dir)  # the rename itself
    return run_dir / CHECKPOINT


def read_checkpoint(run_dir: Path) -> Checkpoint:
    """The run folder's last checkpoint, every file it names present and unchanged."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"resume=true: {path} does not exist (no round of that run finished, or run-name/results-dir name another folder)")
    try:
        data = json.loads(path.read_text())
    except ValueError:
        data = None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a fed-crash checkpoint ({FORMAT})")
    adapters_path = run_dir / data["adapters"]
    adapters = load_adapters(adapters_path)
    if state_hash(adapters) != data["adapters_sha256"]:
        raise ArtifactError(f"{adapters_path} changed after checkpoint round {data['round']} was written")
    optimizer = {}
    if data["optimizer"]:
        optimizer_path = run_dir / data["optimizer"]
        if not optimizer_path.is_file():
            raise ArtifactError(f"{optimizer_path} (server optimizer state named by {path}) is missing")
        optimizer = {k: v.numpy() for k, v in load_file(str(optimizer_path)).items()}
    emulator = run_dir / data["emulator"]["folder"]
    manifest = read_manifest(emulator)
    if file_sha256(emulator / MANIFEST) != data["emulator"]["manifest_sha256"]:
        raise ArtifactError(f"{emulator / MANIFEST} changed after checkpoint round {data['round']} was written")
    return Checkpoint(data["round"], adapters, StrategyState(optimizer, data["strategy"]), emulator, manifest, data["rng"], data["elapsed_seconds"])


def _run_config_key(section: str, key: str) -> str:
    """A schema field as a run config spells it: ``model``, ``train.lr``."""
    key = key.replace("_", "-")
    return key if section in ("fed", "data") else f"{section}.{key}"


def check_resumable(saved: dict, cfg: RunConfig, config_file: Path) -> None:
    """A resumed run must compute what the stopped one would have: its run config may differ
    from the saved ``config.json`` only in :data:`RESUMABLE_CHANGES`."""
    now = cfg.to_dict()
    changed = [(section, key) for section, values in now.items() for key, value in values.items()
               if f"{section}.{key}" not in RESUMABLE_CHANGES and saved.get(section, {}).get(key, "<absent>") != value]
    if changed:
        section, key = changed[0]
        raise ConfigError(f"resume=true: the run config differs from {config_file} in {', '.join(_run_config_key(*c) for c in changed)} "
                          f"({_run_config_key(section, key)} was {saved.get(section, {}).get(key, '<absent>')!r}, now {now[section][key]!r}); "
                          "a resumed run must use the same settings (only num-server-rounds, round-timeout, progress, save-model, cache-dir, results-dir and run-name may change)")


def resumed_history(metrics_file: Path, server_round: int) -> list[dict]:
    """The metrics lines of rounds up to the checkpoint's; lines of a round that was cut off
    by the kill (written before its checkpoint was) are dropped from the file, and so is a last
    line the kill truncated mid-write. Any other unreadable line is an :class:`ArtifactError`."""
    raw = [line for line in metrics_file.read_text().splitlines() if line.strip()] if metrics_file.is_file() else []
    lines = []
    for i, text in enumerate(raw):
        try:
            lines.append(json.loads(text))
        except ValueError:
            if i < len(raw) - 1:
                raise ArtifactError(f"{metrics_file}: line {i + 1} is not JSON (only a last line cut off by a crash is dropped)") from None
            log.warning("%s: dropped its last line, cut off mid-write: %r", metrics_file, text[:80])
    kept = [line for line in lines if line["round"] <= server_round]
    if len(kept) != len(raw):
        tmp = metrics_file.with_name(metrics_file.name + ".tmp")
        tmp.write_text("".join(json.dumps(line) + "\n" for line in kept))
        os.replace(tmp, metrics_file)
    return kept
