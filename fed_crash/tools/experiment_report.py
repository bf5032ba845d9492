"""What an experiment's cells are judged by on multiple-choice tasks (``[experiment] eval-tasks``).

After the cells ran, the four models of every finished cell (full zero-shot, emulator
zero-shot, emulator fine-tuned, plug-in: :func:`fed_crash.evaluation.report.four_model_report`)
are scored on the same first ``eval-limit`` questions of each task, with a record per question,
into ``<cell>/report/``. The full model's zero-shot scores are computed once per model. From
those records, per task and cell:

* the plug-in's gain over the full model zero-shot, with its paired bootstrap 95% interval;
* the **ceiling**: the plug-in of the cell that trains the same adapters on the full model
  (emulator method ``full``) and otherwise has the same run config; and the share of the
  ceiling's gain the plug-in keeps (:func:`fed_crash.evaluation.stats.gain_retention`);
* bytes per client (everything sent and received over the run, the emulator included) and the
  clients' peak resident memory;
* over cells that differ only in their seeds: the mean and spread of the plug-in's accuracy and
  gain, the gain's Student-t 95% interval over the seeds, and the seed-averaged plug-in's gain
  with a paired bootstrap interval over the questions (:func:`seed_summaries`);
* between cells that differ only in the emulator (uniform against CRaSh against search, the
  ceiling against FlowerTune's LoRA): plug-in minus plug-in in acc and acc_norm, with paired
  bootstrap intervals (:func:`plug_in_pairs`).

``tasks.md`` holds the tables and ``frontier.png`` plots plug-in accuracy against bytes sent.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import shutil
import statistics
from pathlib import Path

from fed_crash.config import ConfigError, EvalConfig, parse_run_config, resolve_path
from fed_crash.core.emulator import CEILING
from fed_crash.core.models import resolve_device
from fed_crash.core.plots import figure
from fed_crash.core.precision import compute_dtype
from fed_crash.evaluation.report import four_model_report, load_tasks
from fed_crash.evaluation.stats import gain_retention, paired_bootstrap, seeds_interval
from fed_crash.federation.checkpoint import read_checkpoint

log = logging.getLogger(__name__)

REPORT = "report"  # <cell>/report/: report.json, report.md, samples-<model>-<task>.jsonl
SEED_KEYS = ("seed", "train.seed")  # cells that differ only here are repeats of one configuration
METRIC = "acc"  # the summary's accuracy, the one its intervals and retention are of
ALSO = "acc_norm"  # shown beside it with its stderr (lm-eval's length-normalised accuracy); report.json holds acc_bytes as well


def task_sources(eval_tasks: str) -> list[str]:
    """``eval-tasks``' files, each resolved like every path of an experiment file; a missing one fails by name."""
    sources = [str(resolve_path(source.strip())) for source in eval_tasks.split(",") if source.strip()]
    for source in sources:
        if not Path(source).is_file():
            raise ConfigError(f"experiment [experiment] eval-tasks: {source} does not exist")
    return sources


def report_cells(experiment, finished: list) -> dict[str, dict]:
    """The four-model report of every finished cell on ``eval-tasks`` (the first ``eval-limit``
    questions of each), written to ``<cell>/report/``; a cell whose report covers the same
    questions is read back, one interrupted half-way is scored again. Returns cell -> report."""
    cfg = experiment.config
    eval_cfg = EvalConfig(limit=cfg.eval_limit, first=cfg.eval_limit > 0, batch_size=cfg.eval_batch_size)
    tasks = load_tasks(task_sources(cfg.eval_tasks), eval_cfg)
    task_info = {t.name: {"source": t.source, "n": len(t.rows)} for t in tasks}
    reports, full_from = {}, {}  # model -> the first report.json, whose full zero-shot scores the other cells reuse
    for i, (cell, _, _) in enumerate(finished, 1):
        run_dir = experiment.folder / cell.name
        out = run_dir / REPORT
        run = parse_run_config(cell.run_config)
        if (out / "report.json").is_file() and _same_questions(json.loads((out / "report.json").read_text())["tasks"], task_info):
            reports[cell.name] = json.loads((out / "report.json").read_text())
        else:
            shutil.rmtree(out, ignore_errors=True)  # an attempt stopped half-way, or another task sample
            checkpoint = read_checkpoint(run_dir)
            log.info("cell %d/%d %s: scoring its four models on %s", i, len(finished), cell.name, ", ".join(task_info))
            reports[cell.name] = four_model_report(
                run.fed.model, checkpoint.emulator, run_dir / "adapters" / f"round-{checkpoint.round}.safetensors", tasks, run.data,
                eval_cfg, out, cache_dir=run.fed.cache_dir or None, progress=False, full_from=full_from.get(run.fed.model),
                dtype=compute_dtype(run.compute.compute_dtype, resolve_device(None)))
        full_from.setdefault(run.fed.model, out / "report.json")
    return reports


def _same_questions(scored: dict, wanted: dict) -> bool:
    """The same task files (by name: a moved checkout resolves them elsewhere) and question counts."""
    def key(info: dict) -> dict:
        return {name: (Path(t["source"]).name, t["n"]) for name, t in info.items()}

    return key(scored) == key(wanted)


def correct_answers(report_folder: Path, report: dict, model: str, task: str, metric: str = METRIC) -> list[int]:
    """One model's per-question correctness in ``metric`` on ``task`` (``<cell>/report/`` and its report.json),
    read from the cell that scored it: the full model's zero-shot records live in the cell named
    by ``full_from`` (found by its name, so an experiment folder that was moved still reads)."""
    scored_by = Path(report["full_from"]).parent.parent.name if model == "full_zero_shot" and report.get("full_from") else report_folder.parent.name
    path = report_folder.parent.parent / scored_by / REPORT / report["models"][model]["tasks"][task]["samples_file"]
    return [json.loads(line)["correct"][metric] for line in path.read_text().splitlines() if line]


EMULATOR_ONLY = ("fedbiot-align-steps", "fedbiot-align-lr")  # run-config keys that act on the emulator alone


def beside_the_emulator(cell) -> dict:
    """A cell's run config without what only acts on the emulator (its method and options,
    FedBiOT's alignment): cells equal here differ only in the emulator the clients train on."""
    return {k: v for k, v in cell.run_config.items() if not k.startswith("emulator.") and k not in EMULATOR_ONLY}


def ceiling_of(cell, cells: list) -> str | None:
    """The cell that trains the same adapters on the full model: method ``full``, the rest of the
    run config equal (emulator options other than the method, and FedBiOT's alignment of the
    emulator, do not apply to it)."""
    if cell.run_config.get("emulator.method") == CEILING:
        return None
    for other in cells:
        if other.run_config.get("emulator.method") == CEILING and beside_the_emulator(other) == beside_the_emulator(cell):
            return other.name
    return None


def traffic(history: list[dict]) -> tuple[float, float]:
    """Mean MB per client over the run (down and up, the emulator included) and the clients' peak resident MiB."""
    per_client: dict[str, float] = {}
    for line in history:
        for key in ("bytes_down_per_client", "bytes_up_per_client"):
            for client, n in line.get(key, {}).items():
                per_client[client] = per_client.get(client, 0) + n
    peak = max((c.get("peak-rss-mib", 0.0) for line in history for c in line.get("clients", [])), default=0.0)
    return (sum(per_client.values()) / len(per_client) / 1e6 if per_client else 0.0), peak


def task_rows(experiment, finished: list, reports: dict[str, dict]) -> list[dict]:
    """One row per cell and task: the five accuracies (with lm-eval's stderr; ``acc_norm``: the
    same models' :data:`ALSO`), the plug-in's gain
    over zero-shot and its share of the ceiling's gain (paired, with 95% intervals), MB per
    client and peak memory, and the per-question correctness behind them (``correct``), so that
    ``tasks.json`` alone allows other paired analyses."""
    cells = [cell for cell, _, _ in finished]
    rows = []
    for cell, _, history in finished:
        report = reports[cell.name]
        ceiling = ceiling_of(cell, cells)
        mb, peak = traffic(history)
        for task in report["tasks"]:
            scores = {m: report["models"][m]["tasks"][task] for m in ("full_zero_shot", "emulator_zero_shot", "emulator_fine_tuned", "plug_in")}
            zero_shot, plug_in = (correct_answers(experiment.folder / cell.name / REPORT, report, m, task) for m in ("full_zero_shot", "plug_in"))
            row = {"cell": cell.name, "task": task, "n": len(plug_in), "mb_per_client": mb, "peak_rss_mib": peak,
                   **{m: (s[METRIC], s[f"{METRIC}_stderr"]) for m, s in scores.items()},
                   "gain": paired_bootstrap(plug_in, zero_shot), "correct": {"plug_in": plug_in, "zero_shot": zero_shot},
                   ALSO: {m: (s[ALSO], s[f"{ALSO}_stderr"]) for m, s in scores.items()}}
            if ceiling and ceiling in reports:
                top = correct_answers(experiment.folder / ceiling / REPORT, reports[ceiling], "plug_in", task)
                top_scores = reports[ceiling]["models"]["plug_in"]["tasks"][task]
                row["ceiling"] = (sum(top) / len(top), top_scores[f"{METRIC}_stderr"])
                row[ALSO]["ceiling"] = (top_scores[ALSO], top_scores[f"{ALSO}_stderr"])
                row["retention"] = gain_retention(plug_in, zero_shot, top)
                row["correct"]["ceiling"] = top
            rows.append(row)
    return rows


def _pct(value_stderr: tuple[float, float]) -> str:
    return f"{100 * value_stderr[0]:.1f} ± {100 * value_stderr[1]:.1f}"


def interval_text(d: dict, key: str = "difference", scale: float = 100.0, fmt: str = "+.1f") -> str:
    return f"{scale * d[key]:{fmt}} [{scale * d['low']:{fmt}}, {scale * d['high']:{fmt}}]"


def kept_text(retention: dict | None) -> str:
    """A gain retention (:func:`fed_crash.evaluation.stats.gain_retention`) as the tables print it."""
    if not retention:
        return "-"
    return "no ceiling gain" if retention["retention"] is None else interval_text(retention, "retention", 100, ".0f") + " %"


def tasks_table(rows: list[dict]) -> str:
    """The summary table: each accuracy as acc / acc_norm with lm-eval's stderr (rows kept before
    acc_norm was, in older ``tasks.json`` files, show acc alone)."""
    head = ["cell", "task", "n", "full zero-shot", "emulator zero-shot", "emulator fine-tuned", "plug-in", "ceiling",
            "plug-in - zero-shot (points)", "gain retained", "MB per client", "client peak MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def both(r: dict, model: str) -> str:
        if model not in r:
            return "-"
        also = r.get(ALSO, {}).get(model)
        return _pct(r[model]) + (f" / {_pct(also)}" if also else "")

    for r in rows:
        models = " | ".join(both(r, m) for m in ("full_zero_shot", "emulator_zero_shot", "emulator_fine_tuned", "plug_in", "ceiling"))
        lines.append(f"| {r['cell']} | {r['task']} | {r['n']} | {models} | "
                     f"{interval_text(r['gain'])} | {kept_text(r.get('retention'))} | {r['mb_per_client']:.0f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def seed_groups(cells: list) -> dict[str, list[str]]:
    """Cells that differ only in :data:`SEED_KEYS`, by a name made of their shared axes' variants."""
    groups: dict[str, list] = {}
    for cell in cells:
        key = json.dumps({k: v for k, v in cell.run_config.items() if k not in SEED_KEYS}, sort_keys=True)
        groups.setdefault(key, []).append(cell)
    out = {}
    for members in groups.values():
        if len(members) > 1:
            varying = {axis for axis in members[0].axes if len({m.axes[axis] for m in members}) > 1}
            name = "_".join(v for axis, v in members[0].axes.items() if axis not in varying) or "base"
            out[name] = [m.name for m in members]
    return out


def seed_summaries(rows: list[dict], groups: dict[str, list[str]]) -> list[dict]:
    """Per group of seed repeats and task, two views of one question, "does the plug-in beat zero-shot?":

    * ``gain``: the mean over seeds of each seed's gain, with a Student-t 95% interval over the
      seeds (their spread: the training's randomness, the questions held fixed);
    * ``averaged_gain``: the gain of the seed-averaged plug-in (each question's correctness
      averaged over the seeds) with a paired bootstrap interval over the questions (their
      sampling, the seeds held fixed).

    Also the plug-in accuracy's mean and sample sd, and how many seeds alone beat zero-shot
    beyond their own paired interval; when every seed has its ceiling, ``averaged_retention``:
    the share of the seed-averaged ceiling's gain the seed-averaged plug-in keeps, with its
    bootstrap interval over the questions. Groups with fewer than two rows on a task are left out."""
    out = []
    for name, members in groups.items():
        for task in dict.fromkeys(r["task"] for r in rows):
            picked = [r for r in rows if r["cell"] in members and r["task"] == task]
            if len(picked) < 2:
                continue
            shared = [m for m in picked[0]["correct"] if all(m in r["correct"] for r in picked)]  # the ceiling only if every seed has one
            averaged = {m: [sum(col) / len(col) for col in zip(*(r["correct"][m] for r in picked))] for m in shared}
            acc = [r["plug_in"][0] for r in picked]
            summary = {"configuration": name, "task": task, "cells": [r["cell"] for r in picked], "n": picked[0]["n"],
                       "plug_in": (statistics.mean(acc), statistics.stdev(acc)),
                       "gain": seeds_interval([r["gain"]["difference"] for r in picked]),
                       "averaged_gain": paired_bootstrap(averaged["plug_in"], averaged["zero_shot"]),
                       "beyond": sum(r["gain"]["low"] > 0 for r in picked)}
            if "ceiling" in averaged:
                summary["averaged_retention"] = gain_retention(averaged["plug_in"], averaged["zero_shot"], averaged["ceiling"])
            out.append(summary)
    return out


def seeds_table(summaries: list[dict]) -> str:
    lines = ["| configuration | task | seeds | plug-in acc (mean ± sd) | plug-in - zero-shot, points: mean [95% t interval over seeds] | "
             "seed-averaged plug-in - zero-shot [95% bootstrap over questions] | seeds beating zero-shot beyond their interval | "
             "gain retained by the seed-averaged plug-in [95% bootstrap] |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['configuration']} | {s['task']} | {len(s['cells'])} | {100 * s['plug_in'][0]:.1f} ± {100 * s['plug_in'][1]:.1f} | "
                     f"{interval_text(s['gain'], 'mean')} | {interval_text(s['averaged_gain'])} | {s['beyond']} of {len(s['cells'])} | "
                     f"{kept_text(s.get('averaged_retention'))} |")
    return "\n".join(lines)


def plug_in_pairs(experiment, finished: list, reports: dict[str, dict]) -> list[dict]:
    """Plug-in against plug-in on the same questions, for every two cells that differ only in the
    emulator (:func:`beside_the_emulator`; the experiment file's order says which is A): which
    emulator method is better, in :data:`METRIC` and :data:`ALSO`, each a paired bootstrap
    95% interval of A - B (:func:`fed_crash.evaluation.stats.paired_bootstrap`)."""
    groups: dict[str, list[str]] = {}
    for cell, _, _ in finished:
        groups.setdefault(json.dumps(beside_the_emulator(cell), sort_keys=True), []).append(cell.name)

    @functools.cache
    def answers(name: str, task: str) -> dict[str, list[int]]:  # each cell's records read once, however many pairs it is in
        return {m: correct_answers(experiment.folder / name / REPORT, reports[name], "plug_in", task, m) for m in (METRIC, ALSO)}

    pairs = []
    for a, b in (pair for members in groups.values() for pair in itertools.combinations(members, 2)):
        for task in [t for t in reports[a]["tasks"] if t in reports[b]["tasks"]]:
            pairs.append({"a": a, "b": b, "task": task, **{m: paired_bootstrap(answers(a, task)[m], answers(b, task)[m]) for m in (METRIC, ALSO)}})
    return pairs


def pairs_table(pairs: list[dict]) -> str:
    """One row per pair of cells and metric, one column per task; an interval that excludes 0 in bold."""
    tasks = list(dict.fromkeys(p["task"] for p in pairs))
    lines = ["| A - B | metric | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for a, b in dict.fromkeys((p["a"], p["b"]) for p in pairs):
        by_task = {p["task"]: p for p in pairs if (p["a"], p["b"]) == (a, b)}
        for metric in (METRIC, ALSO):
            cells = []
            for task in tasks:
                d = by_task[task][metric] if task in by_task else None
                text = interval_text(d) if d else "-"
                cells.append(f"**{text}**" if d and (d["low"] > 0 or d["high"] < 0) else text)
            lines.append(f"| {a} - {b} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_frontier(rows: list[dict], path: Path) -> None:
    """Plug-in accuracy (mean over tasks) against MB per client: the privacy-utility-cost frontier,
    with the full model's zero-shot accuracy as the line to beat."""
    by_cell: dict[str, list[dict]] = {}
    for r in rows:
        by_cell.setdefault(r["cell"], []).append(r)
    with figure(path, figsize=(8, 5), dpi=110) as (_, ax):
        for name, picked in by_cell.items():
            x, y = picked[0]["mb_per_client"], 100 * statistics.mean(r["plug_in"][0] for r in picked)
            ax.plot([x], [y], "o")
            ax.annotate(name, (x, y), fontsize="x-small", xytext=(4, 2), textcoords="offset points")
        zero_shot = 100 * statistics.mean(r["full_zero_shot"][0] for r in next(iter(by_cell.values())))
        ax.axhline(zero_shot, color="grey", linestyle="--", label=f"full model zero-shot ({zero_shot:.1f})")
        ax.set_xlabel("MB sent and received per client over the run")
        ax.set_ylabel(f"plug-in {METRIC} (%), mean over {len(next(iter(by_cell.values())))} tasks")
        ax.legend(fontsize="small")


def write_tasks_summary(experiment, finished: list, reports: dict[str, dict]) -> Path:
    """``tasks.md`` (the per-task table, the seeds table) and ``frontier.png``; ``tasks.json`` holds every figure."""
    rows = task_rows(experiment, finished, reports)
    groups = seed_groups([cell for cell, _, _ in finished])
    summaries = seed_summaries(rows, groups)
    pairs = plug_in_pairs(experiment, finished, reports)
    folder = experiment.folder
    plot_frontier(rows, folder / "frontier.png")
    n = sorted({r["n"] for r in rows})
    text = [f"# {experiment.config.name}: multiple-choice tasks", "",
            f"{METRIC} / {ALSO} in percent ± lm-eval's stderr, on the first {', '.join(map(str, n))} questions of each task; differences and "
            f"gain retention (of {METRIC}) with paired bootstrap 95% intervals over the same questions (10,000 resamples). Ceiling: the plug-in "
            f"of the cell with emulator method '{CEILING}' and otherwise the same run config. One run per cell unless the seeds table says otherwise.",
            "", tasks_table(rows)]
    if summaries:
        text += ["", "## Over seeds", "", seeds_table(summaries)]
    if pairs:
        text += ["", "## Plug-ins compared", "", "Cells that differ only in the emulator, on the same questions: plug-in A minus plug-in B in "
                 "points, with a paired bootstrap 95% interval; in bold where the interval excludes 0.", "", pairs_table(pairs)]
    text += ["", "![plug-in accuracy against bytes per client](frontier.png)"]
    (folder / "tasks.md").write_text("\n".join(text) + "\n")
    (folder / "tasks.json").write_text(json.dumps({"rows": rows, "seed_groups": groups, "seeds": summaries, "pairs": pairs}, indent=1))
    return folder / "tasks.md"
