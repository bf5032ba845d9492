"""Gain retention of plug-ins kept in a ``tasks.json`` against a ceiling scored in another run.

The experiment's own summary pairs a cell with its ceiling when both ran in one results folder.
When the ceiling ran later (or on another machine), this pairs them from what is kept: the
plug-in's per-question correctness in ``tasks.json`` and the ceiling cell's report (its
``report.json`` says which cell holds the full model's zero-shot records). It checks that both runs scored the full model alike, question for
question, and prints per cell and task the ceiling's accuracy and gain, the plug-in's gain, the
share kept (:func:`fed_crash.evaluation.stats.gain_retention`) and plug-in minus ceiling
(paired bootstrap), and writes them as JSON.

    python scripts/task_retention.py docs/tasks-fp32-seeds.json results/tasks/full_fedavg_s0/report \\
        --cells search_fedavg_s0 search_fedprox_s0 --out docs/tasks-fp32-retention-s0.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fed_crash.evaluation.stats import gain_retention, paired_bootstrap
from fed_crash.tools.experiment_report import correct_answers, interval_text, kept_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", type=Path, help="tasks.json holding the plug-ins' rows")
    parser.add_argument("ceiling", type=Path, help="the ceiling cell's report folder")
    parser.add_argument("--cells", nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    report = json.loads((args.ceiling / "report.json").read_text())
    out = {}
    print("| cell | task | ceiling acc | ceiling - zero-shot | plug-in - zero-shot | gain retained [95% bootstrap] | plug-in - ceiling [95%] |")
    print("|---|---|---|---|---|---|---|")
    for row in json.loads(args.rows.read_text())["rows"]:
        if row["cell"] not in args.cells:
            continue
        task = row["task"]
        top, zero_shot = (correct_answers(args.ceiling, report, m, task) for m in ("plug_in", "full_zero_shot"))
        if zero_shot != row["correct"]["zero_shot"]:
            raise SystemExit(f"{task}: the two runs scored the full model differently; their plug-ins cannot be paired")
        kept, gap = gain_retention(row["correct"]["plug_in"], zero_shot, top), paired_bootstrap(row["correct"]["plug_in"], top)
        out[f"{row['cell']}/{task}"] = {"retention": kept, "plug_in_minus_ceiling": gap}
        print(f"| {row['cell']} | {task} | {100 * sum(top) / len(top):.1f} | {100 * kept['ceiling_gain']:+.1f} | {100 * kept['gain']:+.1f} | "
              f"{kept_text(kept)} | {interval_text(gap)} |")
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
