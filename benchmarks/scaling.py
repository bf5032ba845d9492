"""Scaling: wall time per round with 10, 50 and 100 simulated clients and a fixed number sampled
per round, and with a growing number sampled; where the time goes.

Real `flwr run`s of the app (SuperLink, ServerApp, one Ray actor per --cpus-per-client cores)
on a tiny random Llama (8 layers, hidden 32: the tests' model) with a real BPE tokenizer and the
real Alpaca file, so that training costs almost nothing and what remains is the framework's
own cost. Each client holds at most --client-examples rows and trains --steps steps.

Phases come from the run's metrics.jsonl: the server's set-up (data, model load, emulator plan
and write) and, per round, its wall time (sending, client work, receiving, aggregation), its
aggregation and its evaluation; each client's delivery (message created to ClientApp called),
emulator receive and load, shard preparation and training. Clients run on the actors in
parallel, so their summed seconds are divided by the number of actors; what the round's wall
time leaves over is scheduling and transport. Round 1 (first contact: every sampled node gets
the emulator, every actor builds its caches) is shown apart from later rounds (median).
Figures are medians over repeats; ratios are against the first configuration of each series.

    python benchmarks/scaling.py --repeats 3
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

FIXED = [(10, 10), (50, 10), (100, 10)]  # (supernodes, sampled per round)
GROWING = [(100, 10), (100, 50), (100, 100)]


def phases(lines: list[dict], rounds: list[int], actors: int) -> dict[str, float]:
    """Seconds per round in the given rounds (median over them), split into phases."""
    out: dict[str, list[float]] = {}
    for line in lines:
        if line["round"] not in rounds:
            continue
        clients = line["clients"]
        busy = {key: sum(c[key] for c in clients) / actors for key in ("load-seconds", "data-seconds", "seconds")}
        values = {
            "round": line["round_seconds"] + line["eval_seconds"],
            "clients_train": busy["seconds"],
            "clients_emulator": line.get("emulator_seconds", 0.0) + busy["load-seconds"],  # the emulator exchange, then assembling it
            "clients_data": busy["data-seconds"],
            "delivery_mean": sum(c["delivery-seconds"] for c in clients) / max(1, len(clients)),
            "aggregate": line["aggregate_seconds"],
            "evaluate": line["eval_seconds"],
        }
        values["other"] = line["round_seconds"] - values["aggregate"] - sum(busy.values())
        for key, value in values.items():
            out.setdefault(key, []).append(value)
    return {key: common.median(v) for key, v in out.items()}


def main() -> None:
    p = common.parser(__doc__, "scaling")
    p.add_argument("--rounds", type=int, default=3, help="rounds per run (default: 3)")
    p.add_argument("--steps", type=int, default=2, help="local steps per client and round (default: 2)")
    p.add_argument("--client-examples", type=int, default=16, help="rows per client (default: 16)")
    p.add_argument("--cpus-per-client", type=int, default=1, help="cores per Ray actor (default: 1)")
    args = p.parse_args()
    work = Path(args.work)
    actors = max(1, (os.cpu_count() or 1) // args.cpus_per_client)
    model = common.tiny_model_folder(work)
    base = {"model": str(model.resolve()), "num-server-rounds": args.rounds, "max-client-examples": args.client_examples, "eval-examples": 16, "max-length": 512,
            "save-model": False, "train.steps": args.steps, "emulator.method": "uniform", "emulator.keep": 2}
    results: dict[str, list[dict]] = {}
    for r in range(args.repeats):
        for n, k in dict.fromkeys(FIXED + GROWING):
            overrides = {**base, "fraction-train": k / n, "min-train-nodes": k, "min-available-nodes": n}
            start = time.perf_counter()
            _, lines = common.run_app(overrides, work=work, name=f"scaling-{n}-{k}", supernodes=n, cpus_per_client=args.cpus_per_client)
            wall = time.perf_counter() - start
            assert all(len(line["clients"]) == k for line in lines[1:]), f"{n}/{k}: not every round trained {k} clients"
            results.setdefault(f"{n}/{k}", []).append({
                "wall_s": wall, "server_elapsed_s": lines[-1]["elapsed_seconds"], "setup": lines[0]["setup_seconds"],
                "first": phases(lines, [1], actors), "later": phases(lines, list(range(2, args.rounds + 1)), actors)})
            print(f"repeat {r + 1} {n} clients, {k} sampled: {wall:.0f} s, later rounds {results[f'{n}/{k}'][-1]['later']['round']:.2f} s", flush=True)

    def med(key: str, part: str, field: str) -> float:
        return common.median(x[part][field] for x in results[key])

    def series(title: str, configs: list[tuple[int, int]]) -> str:
        first = f"{configs[0][0]}/{configs[0][1]}"
        rows = []
        for n, k in configs:
            key = f"{n}/{k}"
            later = {f: med(key, "later", f) for f in results[key][0]["later"]}
            rows.append((n, k, f"{med(key, 'first', 'round'):.2f}", f"{later['round']:.2f}", f"{later['round'] / med(first, 'later', 'round'):.2f}x",
                         f"{later['round'] / k * 1000:.0f}", f"{later['clients_train']:.2f}", f"{later['clients_emulator']:.2f}", f"{later['clients_data']:.2f}",
                         f"{later['delivery_mean']:.2f}", f"{later['aggregate']:.3f}", f"{later['evaluate']:.2f}", f"{later['other']:.2f}"))
        return f"**{title}**\n\n" + common.table(
            ["clients", "sampled", "round 1 (s)", "later rounds (s)", f"vs {first}", "ms per sampled client", "training", "emulator receive+load",
             "shard", "delivery (mean per client)", "aggregation", "evaluation", "other (scheduling, transport)"], rows)

    setup_rows = []
    for key, xs in results.items():
        setup = {f: common.median(x["setup"][f] for x in xs) for f in xs[0]["setup"]}
        startup = common.median(x["wall_s"] - x["server_elapsed_s"] for x in xs)
        setup_rows.append((key, *(f"{setup[f]:.2f}" for f in setup), f"{startup:.1f}", f"{common.median(x['wall_s'] for x in xs):.1f}"))
    setup_text = common.table(["clients/sampled", *[f"server {f} (s)" for f in results[next(iter(results))][0]["setup"]],
                               "flwr start-up + shutdown (s)", "run wall (s)"], setup_rows)
    text = "\n\n".join([series(f"Fixed sample ({FIXED[0][1]} per round), growing federation", FIXED),
                        series("Growing sample, 100 clients", GROWING), "**Once per run**\n\n" + setup_text])
    text += (f"\n\nSeconds per round; client phases are summed over the round's clients and divided by the {actors} Ray actors "
             f"({args.cpus_per_client} core(s) each). {args.steps} steps of batch 4 per client, {args.client_examples} rows each, {args.rounds} rounds.")
    common.finish(args, "scaling", {"actors": actors, "results": results, "base_config": base}, text)


if __name__ == "__main__":
    main()
