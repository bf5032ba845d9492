"""Who holds which data in a federated run.

The server keeps a public slice (held-out evaluation and CRaSh calibration) that clients never
contribute; the remaining rows are the clients' pool, split into private shards by a
``flwr-datasets`` partitioner: IID, Dirichlet over a derived label, or pathological (each client
sees only a few labels). Alpaca has no label column, so non-IID splits use one of

* ``first-word``: the instruction's first word, lower-cased (mostly its verb: "give", "write",
  "generate"...), the 16 most frequent kept and the rest pooled as ``other``;
* ``length``: the response length in words, bucketed into quartiles of the pool.

Task rows (multiple-choice files pooled as instruction data, :func:`fed_crash.core.data.load_instructions`)
carry their task's name: ``partition-by = "task"`` for Dirichlet over tasks, and the ``by-task``
partitioner gives each client one task.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING, Sequence

from fed_crash.config import DEFAULT_HUB_DATASET, DataConfig, FederationConfig, RunConfig, resolve_path
from fed_crash.core.data import DataError, is_local_file, split_rows
from fed_crash.selection import needs_calibration

if TYPE_CHECKING:  # flwr-datasets imports the datasets library: only where partitioning runs
    from datasets import Dataset
    from flwr_datasets.partitioner import Partitioner

TOP_WORDS = 16


def data_source(cfg: RunConfig, name: str | None = None) -> str:
    """A run config's data (``data``, or ``name`` such as ``calib-data``): a local path resolved
    to absolute; a name that is not a local path stays a hub name; none means Alpaca from the
    hub (for users with a network). Several comma-separated files: each resolved."""
    name = cfg.data.data if name is None else name
    if not name:
        return DEFAULT_HUB_DATASET
    if "," in name:
        return ",".join(str(resolve_path(part.strip())) for part in name.split(",") if part.strip())
    local = resolve_path(name)
    return str(local) if is_local_file(local) else name


def public_rows_needed(cfg: RunConfig) -> bool:
    """Whether the server needs public rows: CRaSh's or search's calibration, FedBiOT's alignment."""
    return needs_calibration(cfg.emulator.method) or cfg.fed.fedbiot_align_steps > 0


def calibration_slice(cfg: RunConfig) -> int:
    """Rows of the instruction data the server keeps as public rows (CRaSh calibration, FedBiOT
    alignment): none when neither needs them or when ``calib-data`` names a separate public
    dataset. Server and clients both call this, so they carve the same client pool."""
    return cfg.emulator.calib_samples if public_rows_needed(cfg) and not cfg.fed.calib_data else 0


def server_and_client_rows(rows: Sequence[dict[str, str]], fed: FederationConfig, data: DataConfig, calib: int) -> dict[str, list]:
    """``eval`` and ``calibration`` (server-held, public) and ``clients`` (the pool to shard).
    The same seeded permutation on server and clients, so both agree without exchanging data."""
    pool = len(rows) - fed.eval_examples - calib
    if pool <= 0:
        raise DataError(f"{data.data}: {len(rows)} rows leave nothing for clients after {fed.eval_examples} eval + {calib} calibration rows")
    return split_rows(rows, {"eval": fed.eval_examples, "calibration": calib, "clients": pool}, seed=data.seed)


def derived_labels(rows: Sequence[dict[str, str]], by: str) -> list[str]:
    """One label per row for non-IID partitioning (see module docstring)."""
    if by == "first-word":
        words = [(re.findall(r"[a-z']+", r["instruction"].lower()) or ["other"])[0] for r in rows]
        top = {w for w, _ in Counter(words).most_common(TOP_WORDS)}
        return [w if w in top else "other" for w in words]
    if by == "length":
        lengths = [len(r["output"].split()) for r in rows]
        cuts = sorted(lengths)
        q1, q2, q3 = (cuts[len(cuts) * i // 4] for i in (1, 2, 3))
        return ["q1" if n <= q1 else "q2" if n <= q2 else "q3" if n <= q3 else "q4" for n in lengths]
    if by == "task":
        if not all("task" in r for r in rows):
            raise DataError("partition label 'task' needs task rows: data files of {query, choices, gold} rows (each labelled by its file's stem)")
        return [r["task"] for r in rows]
    raise DataError(f"unknown partition label {by!r}; expected 'first-word', 'length' or 'task'")


def client_table(pool: Sequence[dict[str, str]], fed: FederationConfig) -> Dataset:
    """The client pool as the Arrow dataset that ``flwr-datasets`` partitions, with the labels
    ``fed``'s partitioner needs. Building it (importing ``datasets``, converting every row) costs
    seconds; cutting it into shards (:func:`make_partitioner`) costs milliseconds. So the server
    builds it before the nodes answer (it does not depend on their number), and a worker that
    serves many nodes builds it once (see :func:`fed_crash.federation.client.train`)."""
    from datasets import Dataset

    table = {key: [r[key] for r in pool] for key in ("instruction", "input", "output", "task") if all(key in r for r in pool)}
    if fed.partitioner == "by-task":
        table["label"] = derived_labels(pool, "task")
    elif fed.partitioner != "iid":
        table["label"] = derived_labels(pool, fed.partition_by)
    return Dataset.from_dict(table)


def make_partitioner(table: Dataset, fed: FederationConfig, num_partitions: int, seed: int = 0) -> Partitioner:
    """The ``flwr-datasets`` partitioner of a :func:`client_table` into ``num_partitions`` shards."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    if num_partitions > len(table):
        raise DataError(f"{num_partitions} clients but only {len(table)} client examples: every client needs at least one")
    if fed.partitioner == "iid":
        partitioner = IidPartitioner(num_partitions)
    elif fed.partitioner == "by-task":  # partition i holds task i mod the number of tasks, each task's rows split evenly among its holders
        partitioner = PathologicalPartitioner(num_partitions, "label", 1, class_assignment_mode="first-deterministic", seed=seed)
    elif fed.partitioner == "dirichlet":
        partitioner = DirichletPartitioner(num_partitions, "label", fed.dirichlet_alpha, min_partition_size=1, seed=seed)
    else:
        partitioner = PathologicalPartitioner(num_partitions, "label", fed.classes_per_partition, class_assignment_mode="first-deterministic", seed=seed)
    partitioner.dataset = table
    return partitioner


def _partition(partitioner: Partitioner, fed: FederationConfig, partition_id: int) -> Dataset:
    """Shard ``partition_id`` as the partitioner's Arrow dataset, checked to exist and be non-empty."""
    if not 0 <= partition_id < partitioner.num_partitions:
        raise DataError(f"partition-id {partition_id} is outside 0..{partitioner.num_partitions - 1}")
    shard = partitioner.load_partition(partition_id)
    if not len(shard):
        raise DataError(f"client {partition_id} of {partitioner.num_partitions} received an empty shard ({fed.partitioner})")
    return shard


def partition_rows(partitioner: Partitioner, fed: FederationConfig, partition_id: int) -> list[dict[str, str]]:
    """Shard ``partition_id`` of a partitioner from :func:`make_partitioner`, capped at
    ``max-client-examples``."""
    shard = _partition(partitioner, fed, partition_id)
    if fed.max_client_examples:
        shard = shard.select(range(min(len(shard), fed.max_client_examples)))
    return [{key: r[key] for key in ("instruction", "input", "output", "task") if key in r} for r in shard]


def partition_size(partitioner: Partitioner, fed: FederationConfig, partition_id: int) -> int:
    """``len(partition_rows(...))`` without turning the rows into Python objects (the server
    needs every shard's size before round 1; a row-by-row read of 52k rows takes seconds)."""
    n = len(_partition(partitioner, fed, partition_id))
    return min(n, fed.max_client_examples) if fed.max_client_examples else n


def client_shard(pool: Sequence[dict[str, str]], fed: FederationConfig, partition_id: int, num_partitions: int, seed: int = 0) -> list[dict[str, str]]:
    """Partition ``partition_id`` of ``num_partitions`` of the client pool."""
    return partition_rows(make_partitioner(client_table(pool, fed), fed, num_partitions, seed), fed, partition_id)
