"""Which processes use the CPU while a Flower client trains: run a command (typically one
overhead repeat) and sample every process's CPU time twice a second from /proc (Linux); over
the intervals in which a Ray client actor is busy (more than --busy cores), print each
process's share of one core, and the actor's threads.

    python benchmarks/cpu_shares.py -- python benchmarks/overhead.py --repeats 1 --steps 12 --cpus 2

The sampler costs about 2% of a core itself, so the command's own figures are slightly
perturbed; use it to see where time goes, not to measure the overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

HZ = os.sysconf("SC_CLK_TCK")
ACTOR = "ClientAppActor"


def _cpu_seconds(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ  # utime + stime


def snapshot() -> dict:
    """CPU seconds and command line of every process; per thread for client actors."""
    procs, threads = {}, {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            if ACTOR in cmd:  # a name that marks it, kept in what is stored
                cmd = f"{ACTOR}: {cmd}"
            procs[proc.name] = (_cpu_seconds(proc / "stat"), cmd[:100])
            if ACTOR in cmd:
                for task in (proc / "task").iterdir():
                    threads[f"{proc.name}/{task.name} {(task / 'comm').read_text().strip()}"] = _cpu_seconds(task / "stat")
        except OSError:  # the process ended while being read
            continue
    return {"t": time.monotonic(), "procs": procs, "threads": threads}


def shares(samples: list[dict], busy: float) -> tuple[float, dict[str, float], dict[str, float]]:
    """Seconds in busy intervals, each process's share of a core in them, actor threads' CPU seconds."""
    span, use, threads = 0.0, defaultdict(float), defaultdict(float)
    for a, b in zip(samples, samples[1:]):
        dt = b["t"] - a["t"]
        rate = {pid: (b["procs"][pid][0] - a["procs"][pid][0]) / dt for pid in b["procs"] if pid in a["procs"]}
        if not any(ACTOR in b["procs"][pid][1] and r > busy for pid, r in rate.items()):
            continue
        span += dt
        for pid, r in rate.items():
            use[b["procs"][pid][1] or "(kernel threads)"] += r * dt
        for name, sec in b["threads"].items():
            threads[name] += sec - a["threads"].get(name, sec)
    return span, {k: v / span for k, v in use.items()} if span else {}, dict(threads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--busy", type=float, default=0.8, help="cores an actor must use for an interval to count (default: 0.8)")
    p.add_argument("--out", default="results/benchmarks/cpu_shares.json", help="JSON record (default: %(default)s)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command to run after --")
    samples, done = [], threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(snapshot())
            done.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    returncode = subprocess.call(command)
    done.set()
    sampler.join()
    span, use, threads = shares(samples, args.busy)
    print(f"\n{span:.1f} s with a client actor busy (> {args.busy} cores); share of one core per process:\n")
    print("| process | share of one core |\n|---|---|")
    for name, share in sorted(use.items(), key=lambda x: -x[1]):
        if share >= 0.001:
            print(f"| `{name[:90]}` | {share:.1%} |")
    print("\nactor threads, CPU seconds in those intervals:")
    for name, sec in sorted(threads.items(), key=lambda x: -x[1])[:8]:
        print(f"  {sec:7.2f}  {name}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "busy_seconds": span, "shares": use, "actor_threads": threads}, indent=1) + "\n")
    sys.exit(returncode)


if __name__ == "__main__":
    main()
