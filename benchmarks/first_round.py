"""The first round: where the time goes before the first train message leaves the server.

Runs the app as a user does (``fed-crash simulate``, 4 simulated clients, the default config
with one round; the model already cached), stamps every output line with the seconds since the
command started, and reads the milestones off the log: the SuperLink and the simulation
starting, the ServerApp's main starting, the model loaded, the emulator written, the first
train messages sent, rounds 0 and 1 done; and the server's own laps (``setup_seconds`` in
``metrics.jsonl``).

    python benchmarks/first_round.py                                   # the defaults
    python benchmarks/first_round.py --run-config "compute-dtype='fp32'"

Goal (issue 17): the first train message leaves within 15 s of the ServerApp's start. The
ServerApp's start is its first log line, which follows the library's import (inside main since
d66b889, at module level before); the time since the command is the measure that compares
across that change.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

GOAL_S = 15.0
MILESTONES = {  # name -> the first output line that marks it
    "superlink": r"Starting local SuperLink",
    "simulation": r"Starting Flower Simulation",
    "main": r"ServerApp main started",
    "model loaded": r"fed_crash: loaded ",
    "emulator written": r"fed_crash: wrote emulator",
    "first train messages sent": r"train messages sent to",
    "round 0 evaluated": r"fed_crash: round 0/",
    "round 1 done": r"fed_crash: round 1/",
    "run finished": r"fed_crash: run finished",
    "command done": r"^run \d+: ",
}


def main() -> None:
    p = common.parser(__doc__, "first_round", repeats=1)
    p.add_argument("--run-config", default="", help="extra run-config overrides (TOML values)")
    args = p.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    for repeat in range(args.repeats):
        name = f"first-round-{int(time.time())}"
        overrides = f"num-server-rounds=1 run-name='{name}' results-dir='{work}' save-model=false {args.run_config}".strip()
        cmd = [str(Path(sys.executable).parent / "fed-crash"), "simulate", "--num-supernodes", "4", "--flwr-home", str(work / "flwr"),
               "--run-config", overrides]
        start, stamped = time.perf_counter(), []
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=common.REPO,
                                env={**os.environ, "FED_CRASH_ROOT": str(common.REPO)})
        for line in proc.stdout:  # type: ignore[union-attr]
            stamped.append((time.perf_counter() - start, line.rstrip()))
        proc.wait()
        (work / f"{name}.log").write_text("\n".join(f"{t:8.2f} {line}" for t, line in stamped) + "\n")
        marks = {m: next((t for t, line in stamped if re.search(pattern, line)), None) for m, pattern in MILESTONES.items()}
        setup = json.loads((work / name / "metrics.jsonl").read_text().splitlines()[0])["setup_seconds"]
        runs.append({"marks": marks, "setup_seconds": setup, "log": str(work / f"{name}.log")})
        sent, started = marks["first train messages sent"], marks["main"]
        print(f"repeat {repeat + 1}: first train messages {sent - started:.1f} s after the ServerApp's start, {sent:.1f} s after the command's",
              flush=True)
    marks = {m: common.median(r["marks"][m] for r in runs) for m in MILESTONES if all(r["marks"][m] is not None for r in runs)}
    rows = [(m, f"{t:.1f}", f"{t - marks['main']:+.1f}" if "main" in marks else "-") for m, t in marks.items()]
    rows += [(f"server lap: {k}", f"{common.median(r['setup_seconds'][k] for r in runs):.1f}", "") for k in runs[0]["setup_seconds"]]
    text = common.table(("milestone", "s since the command", "s since the ServerApp's start"), rows)
    to_train = marks["first train messages sent"] - marks["main"]
    text += (f"\n\nFirst train messages {to_train:.1f} s after the ServerApp's start (goal: within {GOAL_S:.0f} s), "
             f"{marks['first train messages sent']:.1f} s after the command's.")
    common.finish(args, "first_round", {"runs": runs, "marks": marks, "to_first_train_s": to_train, "goal_s": GOAL_S}, text)


if __name__ == "__main__":
    main()
