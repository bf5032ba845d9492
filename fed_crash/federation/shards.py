"""Physically separate data: one file per client shard and the server's public slices.

Without a split folder every node reads the whole data file and cuts its shard out of it, so in a
real deployment each data owner would need everyone's rows and the server's evaluation and
calibration rows. ``fed-crash shards`` writes, for a run config and a number of partitions,

* ``shard-<i>.jsonl``: partition i's rows (the rows :func:`partition.partition_rows` gives it),
  to hand to data owner i alone;
* ``server-eval.jsonl`` and ``server-calibration.jsonl``: the server's slices;
* ``split.json``: the settings the split was made with and every file's sha256 and row count.

A run with ``shards = "<folder>"`` reads only those files: the server its two slices (checked
against ``split.json``), each client only its own shard, a simulated one ``shard-<partition>.jsonl``
of the folder, a SuperNode the file its node config names (``shard-file``). Each train message
carries the sha256 the server holds for that node's shard (:data:`protocol.SHARD_SHA256`) and the
node refuses to train on a file that differs, so server and nodes agree on the split and no
evaluation row can reach training through another file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fed_crash.config import ConfigError, RunConfig, resolve_path
from fed_crash.core.data import DataError, load_instructions
from fed_crash.core.models import file_sha256

FORMAT = "fed-crash-split/1"
SPLIT = "split.json"
SERVER_FILES = {"eval": "server-eval.jsonl", "calibration": "server-calibration.jsonl"}
SPLIT_KEYS = ("eval_examples", "max_client_examples", "partitioner", "partition_by", "dirichlet_alpha", "classes_per_partition")


def shard_name(partition_id: int) -> str:
    return f"shard-{partition_id}.jsonl"


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_split(cfg: RunConfig, num_partitions: int, out: Path) -> Path:
    """Cut ``cfg``'s data as a run of ``num_partitions`` clients would and write the split folder
    (module docstring); refuses a folder that already holds a split. Returns ``split.json``."""
    from fed_crash.federation.partition import calibration_slice, client_table, data_source, make_partitioner, partition_rows, server_and_client_rows

    if (out / SPLIT).exists():
        raise ConfigError(f"{out / SPLIT} exists: write the split into an empty folder")
    parts = server_and_client_rows(load_instructions(data_source(cfg), skip_malformed=cfg.data.skip_malformed), cfg.fed, cfg.data,
                                   calibration_slice(cfg))
    partitioner = make_partitioner(client_table(parts["clients"], cfg.fed), cfg.fed, num_partitions, seed=cfg.data.seed)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict] = {}
    for name, rows in [*((SERVER_FILES[k], parts[k]) for k in SERVER_FILES),
                       *((shard_name(i), partition_rows(partitioner, cfg.fed, i)) for i in range(num_partitions))]:
        _write_rows(out / name, rows)
        files[name] = {"rows": len(rows), "sha256": file_sha256(out / name)}
    settings = {"data": Path(data_source(cfg)).name, "seed": cfg.data.seed, "calibration": calibration_slice(cfg),
                **{key.replace("_", "-"): getattr(cfg.fed, key) for key in SPLIT_KEYS}}
    (out / SPLIT).write_text(json.dumps({"format": FORMAT, "num_partitions": num_partitions, "settings": settings, "files": files}, indent=1))
    return out / SPLIT


@dataclass(frozen=True)
class Split:
    """A split folder as the server reads it: its slices (checked) and each shard's size and hash."""

    folder: Path
    num_partitions: int
    eval_rows: list[dict[str, str]]
    calibration: list[dict[str, str]]
    shard_rows: dict[int, int]
    shard_sha256: dict[int, str]


def read_split(folder: str | Path) -> Split:
    """The server's side of a split folder: ``split.json`` and the two server slices, whose hashes
    must be the ones it lists. The shards themselves are not read (they may not even be here)."""
    folder = resolve_path(str(folder))
    index = folder / SPLIT
    if not index.is_file():
        raise DataError(f"shards: {index} does not exist (write the split with 'fed-crash shards')")
    split = json.loads(index.read_text())
    if split.get("format") != FORMAT:
        raise DataError(f"shards: {index} is not a fed-crash split ({FORMAT})")
    slices = {}
    for key, name in SERVER_FILES.items():
        path = folder / name
        if not path.is_file() or file_sha256(path) != split["files"][name]["sha256"]:
            raise DataError(f"shards: {path} is missing or differs from {index}")
        slices[key] = load_instructions(path) if split["files"][name]["rows"] else []  # no calibration slice: an empty file
    shards = {i: split["files"][shard_name(i)] for i in range(split["num_partitions"])}
    return Split(folder, split["num_partitions"], slices["eval"], slices["calibration"],
                 {i: s["rows"] for i, s in shards.items()}, {i: s["sha256"] for i, s in shards.items()})


def read_shard(path: str | Path, expected_sha256: str) -> list[dict[str, str]]:
    """A node's shard file, refused unless its sha256 is the one the server holds for it."""
    path = resolve_path(str(path))
    if not path.is_file():
        raise DataError(f"shard file {path} does not exist")
    actual = file_sha256(path)
    if actual != expected_sha256:
        raise DataError(f"shard file {path} differs from the split the server holds (sha256 {actual[:16]}, "
                        f"the server's {expected_sha256[:16]}): server and node must use one split")
    return load_instructions(path)
