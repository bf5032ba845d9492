"""Gain and gain retention of an experiment's plug-ins in another metric of the per-question records.

The experiment's ``tasks.md`` gives the gain over zero-shot and the share of the ceiling's gain
in ``acc``; the records under ``<cell>/report/`` also hold ``acc_norm`` (lm-eval's
length-normalised accuracy) and ``acc_bytes``. This prints, per cell and task, the gain in
``--metric`` with its paired bootstrap 95% interval and the retention against ``--ceiling``
(:func:`fed_crash.evaluation.stats.gain_retention`), as a markdown table; the ceiling's own gain first.

    python scripts/task_metric.py results/tasks --ceiling full_fedavg_s2 \\
        --cells uniform_fedavg_s2 crash_fedavg_s2 search_fedavg_s2 search-aligned_fedavg_s2 full-lora_fedavg_s2
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

from fed_crash.evaluation.stats import gain_retention, paired_bootstrap
from fed_crash.tools.experiment_report import REPORT, correct_answers, interval_text, kept_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the experiment's results folder (results/<experiment>)")
    parser.add_argument("--ceiling", required=True, help="the ceiling's cell")
    parser.add_argument("--cells", nargs="+", required=True)
    parser.add_argument("--metric", default="acc_norm", choices=("acc", "acc_norm", "acc_bytes"))
    args = parser.parse_args()

    @functools.cache  # read each report.json once
    def report(cell: str) -> dict:
        path = args.folder / cell / REPORT / "report.json"
        if not path.is_file():
            raise SystemExit(f"{path} does not exist: the cell {cell!r} is not scored")
        return json.loads(path.read_text())

    @functools.cache  # the ceiling's records serve every cell
    def answers(cell: str, model: str, task: str) -> list[int]:
        return correct_answers(args.folder / cell / REPORT, report(cell), model, task, args.metric)

    tasks = list(report(args.ceiling)["tasks"])
    print(f"| cell | task | plug-in - zero-shot, {args.metric} points [95%] | gain retained [95%] |\n|---|---|---|---|")
    for cell in [args.ceiling, *args.cells]:
        for task in tasks:
            plug_in, zero_shot = answers(cell, "plug_in", task), answers(cell, "full_zero_shot", task)
            kept = "-" if cell == args.ceiling else kept_text(gain_retention(plug_in, zero_shot, answers(args.ceiling, "plug_in", task)))
            print(f"| {cell} | {task} | {interval_text(paired_bootstrap(plug_in, zero_shot))} | {kept} |")


if __name__ == "__main__":
    main()
