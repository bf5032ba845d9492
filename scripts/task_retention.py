"""Gain retention of plug-ins kept in ``tasks.json`` files against a ceiling scored in another run.

The experiment's own summary pairs a cell with its ceiling when both ran in one results folder
(and with the same run config apart from the emulator). When the ceiling ran later, on another
machine, or with an emulator-only option the ceiling does not have (FedBiOT's alignment), this
pairs them from what is kept: each plug-in's per-question correctness in a ``tasks.json`` and the
ceiling either as a cell kept in one of those files or as its report folder (whose
``report.json`` says which cell holds the full model's zero-shot records). It checks that both
runs scored the full model alike, question for question, and prints per cell and task the
ceiling's accuracy and gain, the plug-in's gain, the share kept
(:func:`fed_crash.evaluation.stats.gain_retention`), plug-in minus ceiling and, with
``--against``, plug-in minus another kept plug-in (paired bootstrap), and writes them as JSON.

    python scripts/task_retention.py docs/tasks-fp32-seeds.json results/tasks/full_fedavg_s0/report \\
        --cells search_fedavg_s0 search_fedprox_s0 --out docs/tasks-fp32-retention-s0.json
    python scripts/task_retention.py results/tasks/tasks.json docs/tasks-fp32-seeds.json docs/tasks-fp32-ceiling.json \\
        --ceiling full_fedavg_s0 --cells search-aligned_fedavg_s0 --against search_fedavg_s0 --out docs/tasks-fp32-aligned-s0.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fed_crash.evaluation.stats import gain_retention, paired_bootstrap
from fed_crash.tools.experiment_report import correct_answers, interval_text, kept_text


def kept_rows(files: list[Path]) -> dict[tuple[str, str], dict]:
    """Every (cell, task) row of the files; a cell kept in two files must agree."""
    rows: dict[tuple[str, str], dict] = {}
    for file in files:
        for row in json.loads(file.read_text())["rows"]:
            key = (row["cell"], row["task"])
            if key in rows and rows[key]["correct"] != row["correct"]:
                raise SystemExit(f"{key[0]}/{key[1]}: two files keep different answers")
            rows[key] = row
    return rows


def ceiling_answers(rows: dict[tuple[str, str], dict], ceiling: str, task: str) -> tuple[list[int], list[int]]:
    """The ceiling's and the full model's zero-shot correctness on ``task``: from the report folder
    ``ceiling``, or from the kept cell of that name."""
    folder = Path(ceiling)
    if folder.is_dir():
        report = json.loads((folder / "report.json").read_text())
        return tuple(correct_answers(folder, report, m, task) for m in ("plug_in", "full_zero_shot"))
    if (ceiling, task) not in rows:
        raise SystemExit(f"--ceiling {ceiling}: neither a report folder nor a cell kept for {task} in the given files")
    return rows[ceiling, task]["correct"]["plug_in"], rows[ceiling, task]["correct"]["zero_shot"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", type=Path, nargs="+", help="tasks.json files holding the plug-ins' rows (and the ceiling's, when --ceiling names a cell)")
    parser.add_argument("--ceiling", help="the ceiling: its cell's report folder, or a cell kept in the files (default: the last positional argument, a report folder)")
    parser.add_argument("--cells", nargs="+", required=True)
    parser.add_argument("--against", help="also the paired difference of each plug-in to this kept cell's plug-in on the same task")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    files, ceiling = (args.rows, args.ceiling) if args.ceiling else (args.rows[:-1], str(args.rows[-1]))
    rows = kept_rows(files)
    out = {}
    head = ["cell", "task", "ceiling acc", "ceiling - zero-shot", "plug-in - zero-shot", "gain retained [95% bootstrap]", "plug-in - ceiling [95%]"]
    head += [f"plug-in - {args.against} [95%]"] if args.against else []
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for (cell, task), row in rows.items():
        if cell not in args.cells:
            continue
        top, zero_shot = ceiling_answers(rows, ceiling, task)
        if zero_shot != row["correct"]["zero_shot"]:
            raise SystemExit(f"{task}: the two runs scored the full model differently; their plug-ins cannot be paired")
        plug_in = row["correct"]["plug_in"]
        result = {"retention": gain_retention(plug_in, zero_shot, top), "plug_in_minus_ceiling": paired_bootstrap(plug_in, top)}
        line = [cell, task, f"{100 * sum(top) / len(top):.1f}", f"{100 * result['retention']['ceiling_gain']:+.1f}", f"{100 * result['retention']['gain']:+.1f}",
                kept_text(result["retention"]), interval_text(result["plug_in_minus_ceiling"])]
        if args.against:
            if (args.against, task) not in rows:
                raise SystemExit(f"--against {args.against}: no kept row for {task}")
            result["plug_in_minus_against"] = paired_bootstrap(plug_in, rows[args.against, task]["correct"]["plug_in"])
            line.append(interval_text(result["plug_in_minus_against"]))
        out[f"{cell}/{task}"] = result
        print("| " + " | ".join(line) + " |")
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
