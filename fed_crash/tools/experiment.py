"""Experiments: one base run config, a grid of variants, every cell a real ``flwr run``.

An experiment file (TOML)::

    [experiment]                # ExperimentConfig: name, results-dir, num-supernodes, timeout ...
    name = "compare_strategies"

    [base]                      # run config for every cell, keys as in simulations/alpaca/pyproject.toml
    num-server-rounds = 3
    [base.train]                # sections become dotted keys: train.steps
    steps = 10

    [grid]
    strategy = ["fedavg", "fedadam"]          # an axis over one run-config key, named by value
    [grid.emulator]                           # an axis of named variants, each a set of overrides
    uniform = { emulator = { method = "uniform" } }
    crash = { emulator = { method = "crash", share = true } }

The cells are the product of the axes (a variant's overrides win over the base), named by
their variant names joined with ``_``. Each runs through :func:`fed_crash.tools.launch.flwr_run`, the
code path of ``fed-crash simulate``, into ``<results-dir>/<name>/<cell>/``; a cell whose
``cell.json`` exists has finished and is skipped, and one that stopped after a round resumes
from its checkpoint (``resume=true``), so a stopped experiment continues where it was. Every cell's config is checked before the first one runs. At the end ``summary.md``,
``loss.png`` and ``accuracy.png`` compare the finished cells.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import logging
import re
import shutil
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from flwr.common.config import flatten_dict

from fed_crash.config import ConfigError, ExperimentConfig, from_mapping, parse_run_config, resolve_path
from fed_crash.core.plots import figure
from fed_crash.tools.launch import check_run_config

log = logging.getLogger(__name__)

CELL_FILE = "cell.json"  # written when a cell finished; its presence means "skip"
RUNNER_KEYS = ("run-name", "results-dir")  # the runner sets these per cell
_NAME = re.compile(r"^(?!\.\.?$)[A-Za-z0-9_.+-]+$")  # folder names: no separators, not . or ..


@dataclass
class Cell:
    name: str
    axes: dict[str, str]  # axis -> variant name
    run_config: dict[str, Any]  # flat: base overridden by the variants


@dataclass
class Experiment:
    config: ExperimentConfig
    axes: list[str]
    cells: list[Cell] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return resolve_path(self.config.results_dir) / self.config.name


def flatten(table: dict[str, Any], where: str) -> dict[str, Any]:
    """Nested TOML tables to flat run-config keys, as Flower flattens an app's config:
    {"train": {"steps": 2}} -> {"train.steps": 2}; a value Flower cannot carry fails by name."""
    try:
        return dict(flatten_dict(table))
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def _axis(name: str, spec: Any) -> dict[str, dict[str, Any]]:
    """An axis's variants: a list of values of run-config key ``name``, or a table of named
    override tables."""
    if isinstance(spec, list) and spec:
        return {str(value): {name: value} for value in spec}
    if isinstance(spec, Mapping) and spec and all(isinstance(v, Mapping) for v in spec.values()):
        return {variant: flatten(dict(overrides), f"experiment [grid] {name}.{variant}") for variant, overrides in spec.items()}
    raise ConfigError(f"experiment [grid]: axis {name!r} must be a non-empty list of values or a table of named override tables")


def load_experiment(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Experiment:
    """Read and check an experiment file; ``overrides`` (flat run-config keys) apply to the base.
    Every cell's run config is parsed, so a bad key or value fails here, by name, before
    anything runs."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"experiment file {path}: {err}") from None
    unknown = set(data) - {"experiment", "base", "grid"}
    if unknown:
        raise ConfigError(f"experiment file {path}: unknown table(s) {sorted(unknown)}; expected [experiment], [base], [grid]")
    config = from_mapping(ExperimentConfig, data.get("experiment", {}), where=f"{path} [experiment]")
    config.name = config.name or path.stem
    if not _NAME.match(config.name):
        raise ConfigError(f"{path} [experiment]: name {config.name!r} may hold letters, digits, '_', '.', '+' and '-' only (it names a folder)")
    base = {**flatten(data.get("base", {}), f"{path} [base]"), **(overrides or {})}
    grid = {axis: _axis(axis, spec) for axis, spec in data.get("grid", {}).items()}
    experiment = Experiment(config, list(grid))
    for combo in itertools.product(*[list(variants.items()) for variants in grid.values()]):
        names = [variant for variant, _ in combo]
        if not all(_NAME.match(n) for n in names):
            raise ConfigError(f"experiment [grid]: variant names may hold letters, digits, '_', '.', '+' and '-': {names}")
        run_config = dict(base)
        for _, variant_overrides in combo:
            run_config.update(variant_overrides)
        experiment.cells.append(Cell("_".join(names) or "base", dict(zip(grid, names)), run_config))
    for cell in experiment.cells:
        taken = [k for k in RUNNER_KEYS if k in cell.run_config]
        if taken:
            raise ConfigError(f"experiment cell {cell.name!r}: {taken} are set by the runner (use [experiment] results-dir)")
        try:
            check_run_config(cell.run_config)
            parse_run_config(cell.run_config)
        except ConfigError as err:
            raise ConfigError(f"experiment cell {cell.name!r}: {err}") from None
    if config.eval_tasks:
        from fed_crash.tools.experiment_report import task_sources

        task_sources(config.eval_tasks)
    names = [cell.name for cell in experiment.cells]
    if len(set(names)) != len(names):
        raise ConfigError(f"experiment [grid]: two cells share a name: {sorted({n for n in names if names.count(n) > 1})}")
    return experiment


def run_experiment(experiment: Experiment, *, flwr_home: Path, echo: bool = False, only: Sequence[str] = ()) -> dict[str, str]:
    """Run every unfinished cell (of those whose names match a pattern of ``only``, when given),
    then write the summary of all finished ones. Returns each cell's status ("not selected" for
    the rest). A cell that finished with another run config than the file gives it now is an
    error: skipping it would mix two experiments in one summary."""
    from fed_crash.tools.launch import free_port, ray_head, stop_local_superlink

    folder = experiment.folder
    for cell in experiment.cells:
        done = folder / cell.name / CELL_FILE
        if done.is_file() and json.loads(done.read_text())["run_config"] != json.loads(json.dumps(cell.run_config)):
            raise ConfigError(f"cell {cell.name!r} finished with another run config ({done}); "
                              "name the changed experiment differently or remove that cell's folder")
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    node_cache = flwr_home / "nodes" / experiment.config.name  # emptied after every cell: emulators are large, node ids new per run
    port = free_port()  # the experiment's SuperLink: never one left answering on the default port by another run
    statuses: dict[str, str] = {}
    # one federation for the whole experiment: a Ray head (with the dashboard) whose workers are
    # the client actors of every cell, and one local SuperLink that runs the cells one by one
    selected = [cell for cell in experiment.cells if not only or any(fnmatch.fnmatchcase(cell.name, pattern) for pattern in only)]
    if only and not selected:
        raise ConfigError(f"no cell of experiment {experiment.config.name} matches {list(only)}; its cells: {', '.join(c.name for c in experiment.cells)}")
    todo = [cell for cell in selected if not (folder / cell.name / CELL_FILE).is_file()]
    for cell in experiment.cells:
        if cell not in selected:
            statuses[cell.name] = "not selected"
        elif cell not in todo:
            log.info("cell %s: finished before, skipped", cell.name)
            statuses[cell.name] = "skipped"
    if todo:
        dashboard = free_port()
        with ray_head(dashboard_port=dashboard, env={"FED_CRASH_NODE_CACHE": str(node_cache)}) as address:
            log.info("experiment %s: one Ray head for its %d cells to run, dashboard http://127.0.0.1:%d", experiment.config.name, len(todo), dashboard)
            try:
                for i, cell in enumerate(todo, 1):
                    statuses[cell.name] = _run_cell(experiment, cell, f"{i}/{len(todo)}", flwr_home=flwr_home, port=port, ray_address=address, echo=echo)
                    shutil.rmtree(node_cache, ignore_errors=True)
            finally:
                stop_local_superlink(flwr_home)
    statuses = {cell.name: statuses[cell.name] for cell in experiment.cells}  # in the file's order
    if experiment.config.eval_tasks and _finished(experiment):
        from fed_crash.tools.experiment_report import report_cells, write_tasks_summary

        finished = _finished(experiment)
        write_tasks_summary(experiment, finished, report_cells(experiment, finished))
    write_summary(experiment)
    return statuses


def _run_cell(experiment: Experiment, cell: Cell, counter: str, *, flwr_home: Path, port: int, ray_address: str, echo: bool) -> str:
    """One unfinished cell as one ``flwr run`` on the experiment's SuperLink and Ray head,
    resumed from its checkpoint when it stopped after a round. Returns its status."""
    from fed_crash.federation.checkpoint import CHECKPOINT
    from fed_crash.tools.launch import flwr_run

    folder = experiment.folder
    run_dir = folder / cell.name
    resume = (run_dir / CHECKPOINT).is_file()  # an attempt stopped after a round: continue it
    if run_dir.exists() and not resume:  # an attempt that stopped before its first round; its output is in logs/
        shutil.rmtree(run_dir)
    log.info("cell %s %s: %s", counter, cell.name, "resuming from its checkpoint" if resume else "running")
    start = time.perf_counter()
    result = flwr_run(
        {**cell.run_config, "run-name": cell.name, "results-dir": str(folder), **({"resume": True} if resume else {})},
        num_supernodes=experiment.config.num_supernodes, cpus_per_client=experiment.config.cpus_per_client,
        gpus_per_client=experiment.config.gpus_per_client, flwr_home=flwr_home, env={"RAY_ADDRESS": ray_address},
        port_base=port, timeout=experiment.config.timeout, echo=echo, keep_superlink=True,
    )
    wall = time.perf_counter() - start
    with (folder / "logs" / f"{cell.name}.log").open("a" if resume else "w") as log_file:
        log_file.write(result.output)
    if result.ok:
        (run_dir / CELL_FILE).write_text(json.dumps({"status": result.status, "run_id": result.run_id, "wall_seconds": wall,
                                                     "axes": cell.axes, "run_config": cell.run_config}, indent=1))
        log.info("cell %s: %s in %.0fs", cell.name, result.status, wall)
    else:
        log.error("cell %s: %s %s (log: %s)", cell.name, result.status, result.details, folder / "logs" / f"{cell.name}.log")
    return result.status


def _finished(experiment: Experiment) -> list[tuple[Cell, dict, list[dict]]]:
    out = []
    for cell in experiment.cells:
        run_dir = experiment.folder / cell.name
        if (run_dir / CELL_FILE).is_file():
            history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
            out.append((cell, json.loads((run_dir / CELL_FILE).read_text()), history))
    return out


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s"


def summary_table(experiment: Experiment) -> str:
    """Markdown: one row per finished cell, with final plug-in loss and accuracy, the round of
    the lowest plug-in loss, traffic (all rounds, the one-time emulator included) and wall time."""
    finished = _finished(experiment)
    private = any("privacy" in h for _, _, history in finished for h in history)
    head = [*experiment.axes, "final plug-in loss", "final plug-in acc", "best round (loss)", "MB down", "MB up", "wall time"]
    head += ["epsilon (delta)"] if private else []
    rows = ["| cell | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 1)]
    for cell, status, history in finished:
        final = history[-1]["server"]
        best = min(history, key=lambda h: h["server"]["plugin_loss"])
        values = [cell.axes[a] for a in experiment.axes] + [
            f"{final['plugin_loss']:.4f}",
            f"{final['plugin_acc']:.3f}" if "plugin_acc" in final else "-",
            f"{best['round']} ({best['server']['plugin_loss']:.4f})",
            f"{sum(h['bytes_down'] for h in history) / 1e6:.1f}",
            f"{sum(h['bytes_up'] for h in history) / 1e6:.1f}",
            _duration(status["wall_seconds"]),
        ]
        if private:
            spent = history[-1].get("privacy")
            values.append(f"{spent['epsilon']:.2f} ({spent['delta']:g})" if spent else "-")
        rows.append(f"| {cell.name} | " + " | ".join(values) + " |")
    return "\n".join(rows)


def seeds_summary(finished: list[tuple[Cell, dict, list[dict]]]) -> str:
    """Markdown: per group of seed repeats, the final plug-in loss's mean and spread ('' when no cell is repeated)."""
    import statistics

    from fed_crash.tools.experiment_report import seed_groups

    final = {cell.name: history[-1]["server"]["plugin_loss"] for cell, _, history in finished}
    rows = [f"| {name} | {len(members)} | {statistics.mean(final[m] for m in members):.4f} ± {statistics.stdev(final[m] for m in members):.4f} | "
            f"{min(final[m] for m in members):.4f}-{max(final[m] for m in members):.4f} |"
            for name, members in seed_groups([cell for cell, _, _ in finished]).items()]
    return "\n".join(["| configuration | seeds | final plug-in loss | range |", "|---|---|---|---|", *rows]) if rows else ""


def write_summary(experiment: Experiment) -> Path:
    """``summary.md`` (table, and the cells not finished), ``loss.png`` (plug-in loss per round,
    one line per cell) and ``accuracy.png`` (final plug-in accuracy, when an mc-task was set)."""
    folder = experiment.folder
    folder.mkdir(parents=True, exist_ok=True)
    finished = _finished(experiment)
    missing = [cell.name for cell in experiment.cells if cell.name not in {c.name for c, _, _ in finished}]
    text = [f"# {experiment.config.name}", "", f"{len(finished)} of {len(experiment.cells)} cells finished; "
            f"{experiment.config.num_supernodes} simulated clients per cell.", "", summary_table(experiment)]
    if missing:
        text += ["", "Not finished: " + ", ".join(missing)]
    repeats = seeds_summary(finished)
    if repeats:
        text += ["", "Over seeds (cells that differ only in seed or train.seed): final plug-in loss, mean ± sample standard deviation.",
                 "", repeats]
    if (folder / "tasks.md").is_file():
        text += ["", "Multiple-choice tasks, the ceiling and gain retention: [tasks.md](tasks.md)."]
    if finished:
        _plot_losses(finished, folder / "loss.png")
        text += ["", "![plug-in loss per round](loss.png)"]
        accuracy = [(cell.name, history[-1]["server"]["plugin_acc"]) for cell, _, history in finished if "plugin_acc" in history[-1]["server"]]
        if accuracy:
            with figure(folder / "accuracy.png", figsize=(max(6, 0.6 * len(accuracy)), 4.5), dpi=110) as (_, ax):
                ax.bar(range(len(accuracy)), [a for _, a in accuracy])
                ax.set_xticks(range(len(accuracy)), [n for n, _ in accuracy], rotation=45, ha="right", fontsize="small")
                ax.set_ylabel("final plug-in accuracy")
            text += ["", "![final plug-in accuracy](accuracy.png)"]
    (folder / "summary.md").write_text("\n".join(text) + "\n")
    return folder / "summary.md"


def _plot_losses(finished: list[tuple[Cell, dict, list[dict]]], path: Path) -> None:
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    with figure(path, figsize=(8, 5), dpi=110) as (_, ax):
        for i, (cell, _, history) in enumerate(finished):
            ax.plot([h["round"] for h in history], [h["server"]["plugin_loss"] for h in history], "o-", label=cell.name,
                    color=colormaps["tab20"](i % 20))  # distinct colours for up to 20 cells (the default cycle has 10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel("plug-in loss (held-out)")
        ax.legend(fontsize="small")
