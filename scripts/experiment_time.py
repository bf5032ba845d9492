"""Where an experiment's time went, summed over its finished cells, from each cell's
``metrics.jsonl`` (the server's laps and per-round seconds, the clients' training seconds) and
``cell.json`` (the cell's wall time):

    python scripts/experiment_time.py results/compare_strategies

Client training counts the slower client of each round (the round waits for it). An evaluation
that ran beside the next round's training (``eval_beside_training``: round 0's; in files older
than that key, round 0's is taken to) is listed apart: its seconds overlap client training. What
no lap covers (starting and stopping ``flwr run``, the ServerApp process, Ray and the client
actors' start-up before the connect lap, saving the final model, teardown) is the remainder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BESIDE = "server evaluation beside the next round's training (overlaps it)"


def breakdown(folder: Path) -> dict[str, float]:
    totals = dict.fromkeys(["client training (slower client per round)", "server evaluation, in sequence",
                            BESIDE, "emulator delivery",
                            "waiting for the client actors and their partitions (connect)", "model load, emulator plan and write",
                            "aggregation"], 0.0)
    wall, cells = 0.0, 0
    for cell in sorted(p.parent for p in folder.glob("*/cell.json")):
        lines = [json.loads(line) for line in (cell / "metrics.jsonl").read_text().splitlines() if line.strip()]
        wall += json.loads((cell / "cell.json").read_text())["wall_seconds"]
        cells += 1
        setup = lines[0]["setup_seconds"]
        totals["model load, emulator plan and write"] += setup["data"] + setup["model_load"] + setup["emulator_plan"] + setup["emulator_write"]
        totals["waiting for the client actors and their partitions (connect)"] += setup["connect"]
        for line in lines:
            key = BESIDE if line.get("eval_beside_training", line["round"] == 0) else "server evaluation, in sequence"
            totals[key] += line["eval_seconds"]
            totals["emulator delivery"] += line["emulator_seconds"]
            totals["aggregation"] += line["aggregate_seconds"]
            if line["clients"]:
                totals["client training (slower client per round)"] += max(c["seconds"] for c in line["clients"])
    counted = sum(v for k, v in totals.items() if k != BESIDE)
    return {"cells": cells, "wall": wall, **totals, "remainder (flwr run start and stop, actor start-up, final save, teardown)": wall - counted}


def main() -> None:
    result = breakdown(Path(sys.argv[1]))
    print(f"{result.pop('cells')} cells, {result.pop('wall') / 60:.1f} min of cell wall time\n")
    print("| where | minutes |\n|---|---|")
    for name, seconds in result.items():
        print(f"| {name} | {seconds / 60:.1f} |")


if __name__ == "__main__":
    main()
