"""What every benchmark script shares, so that all of them read and report the same way.

Each script answers one question with a ratio measured within one run (the machine is shared
and noisy: a ratio of two figures taken side by side is stable where absolute seconds are not),
the median of ``--repeats`` repeats. It prints a markdown table and writes ``--out`` (JSON:
the figures, every repeat, the machine and the command). Heavy imports (torch, Flower) happen
inside functions, so ``--help`` answers at once.

Pieces reused by several questions: the app's run config, ``flwr run`` of the app with a
scratch folder, a fresh child process per configuration (its own peak memory, no state shared
with the parent), a tiny random model folder, and an emulator folder of the default model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
ALPACA = REPO.parent / "shared" / "data" / "instruct" / "alpaca_data.json"
APP_PYPROJECT = REPO / "simulations" / "alpaca" / "pyproject.toml"


def parser(doc: str, name: str, *, repeats: int = 3) -> argparse.ArgumentParser:
    """The common command line: ``--repeats``, ``--out`` (JSON), ``--work`` (scratch folder)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=repeats, help=f"repeats; every figure is the median (default: {repeats})")
    p.add_argument("--out", default=f"results/benchmarks/{name}.json", help="JSON file for the figures, every repeat, the machine and the command (default: %(default)s)")
    p.add_argument("--work", default=f"runs/benchmarks/{name}", help="scratch folder for runs, caches and emulator folders (default: %(default)s)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one configuration in a fresh process
    return p


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table; floats get 3 significant decimals unless already formatted."""
    def cell(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """The machine and software a figure was measured on."""
    import flwr
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")), 0)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**20, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "flwr": flwr.__version__ if hasattr(flwr, "__version__") else "",
        "load_average": os.getloadavg(),
    }


def finish(args: argparse.Namespace, name: str, figures: dict[str, Any], text: str) -> None:
    """Print the table and write the JSON record of a benchmark run."""
    print(text)
    record = {"benchmark": name, "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
              "args": {k: v for k, v in vars(args).items() if k != "child"}, **figures, "table": text}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"\nwritten to {out}")


# --------------------------------------------------------------------------- fresh processes


def run_child(script: str, payload: dict[str, Any], *, timeout: float = 1800, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``script --child <payload>`` in a fresh interpreter; its last stdout line is JSON."""
    proc = subprocess.run([sys.executable, script, "--child", json.dumps(payload)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"child {payload} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def emit(result: dict[str, Any]) -> None:
    """A child's answer: one JSON line on stdout."""
    print(json.dumps(result), flush=True)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """Resident memory of this process now."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# --------------------------------------------------------------------------- the Flower app


def app_defaults() -> dict[str, Any]:
    """The app's run config (``simulations/alpaca/pyproject.toml``) as flat ``key=value``, as
    ``flwr run`` resolves it (sections become ``emulator.keep``)."""
    config = tomllib.loads(APP_PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def run_config(overrides: dict[str, Any]):
    """The RunConfig a ``flwr run`` with these overrides would parse (clients and server use it)."""
    from fed_crash.config import parse_run_config

    return parse_run_config({**app_defaults(), **overrides})


def run_app(overrides: dict[str, Any], *, work: Path, name: str, supernodes: int, cpus_per_client: int = 1,
            timeout: float = 1800, attempts: int = 2) -> tuple[Path, list[dict]]:
    """One real ``flwr run`` of the app (SuperLink, ServerApp, Ray actors) with ``overrides``;
    returns the run folder and its ``metrics.jsonl`` lines. A failed run is retried once (other
    jobs on a shared machine may stop Ray under it); a second failure raises with the output.

    Ray starts its workers at niceness 15 (``RAY_worker_niceness``): on a machine shared with
    other jobs the client actors then get a small share of the CPU whenever anything at the
    default priority is busy, and a client's step time measures the other jobs, not Flower.
    Benchmarks run the workers at niceness 0, the priority every other process here has."""
    from fed_crash.tools.launch import flwr_run, free_port

    for attempt in range(attempts):
        run_name = f"{name}-{int(time.time())}-{attempt}"
        config = {"data": str(ALPACA), **overrides, "results-dir": str(work.resolve() / "results"), "run-name": run_name}
        result = flwr_run(config, num_supernodes=supernodes, cpus_per_client=cpus_per_client, flwr_home=work.resolve() / "flwr",
                          port_base=free_port(), timeout=timeout,
                          env={"FED_CRASH_NODE_CACHE": str(work.resolve() / "nodes" / run_name), "FED_CRASH_ROOT": str(REPO),
                               "RAY_worker_niceness": "0"})
        run_dir = work.resolve() / "results" / run_name
        if result.ok:
            lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            return run_dir, lines
        print(f"[benchmark] flwr run {run_name} ended {result.status}; {'retrying' if attempt + 1 < attempts else 'giving up'}", file=sys.stderr)
    raise RuntimeError(f"flwr run failed twice: {result.status} {result.details}\n{result.output[-4000:]}")


def clients_of(lines: list[dict], rounds: Iterable[int]) -> list[dict]:
    """Every client's metrics in the given rounds of a run's metrics.jsonl."""
    wanted = set(rounds)
    return [c for line in lines if line["round"] in wanted for c in line["clients"]]


# --------------------------------------------------------------------------- models and emulators


def tiny_model_folder(work: Path, layers: int = 8) -> Path:
    """A tiny random Llama with a real BPE tokenizer as a Hugging Face folder, built the way the
    tests build theirs (:mod:`fed_crash.tools.tiny`): compute per step is negligible, so what remains
    of a round is the framework's own cost."""
    folder = work / f"tiny-llama-{layers}"
    if not (folder / "config.json").is_file():
        sys.path.insert(0, str(REPO))
        from fed_crash.tools.tiny import build_tokenizer, tiny_llama

        tiny_llama(layers=layers).save_pretrained(folder, safe_serialization=True)
        build_tokenizer().save_pretrained(folder)
    return folder


def emulator_folder(work: Path, name: str, overrides: dict[str, Any]) -> Path:
    """An emulator folder of the app's model cut by the app's emulator config plus ``overrides``
    (CRaSh calibrates on the app's server-held slice of Alpaca), built once under ``work``."""
    folder = work / "emulators" / name
    if (folder / "emulator.json").is_file():
        return folder
    from fed_crash.core.artifacts import save_emulator
    from fed_crash.federation.partition import calibration_slice, public_rows_needed
    from fed_crash.core.data import load_instructions
    from fed_crash.core.models import load_model
    from fed_crash.federation.partition import server_and_client_rows
    from fed_crash.selection.plan import plan_emulator

    cfg = run_config({"data": str(ALPACA), **overrides})
    loaded = load_model(cfg.fed.model)
    calibration = []
    if public_rows_needed(cfg):
        calibration = server_and_client_rows(load_instructions(cfg.data.data), cfg.fed, cfg.data, calibration_slice(cfg))["calibration"]
    spec, similarity = plan_emulator(loaded.model, loaded.tokenizer, calibration, cfg.data, cfg.emulator, progress=False)
    save_emulator(folder, loaded.model, loaded.tokenizer, spec, source_id=loaded.model_id, similarity=similarity)
    return folder


def alpaca_rows(n: int, *, seed: int = 0) -> list[dict[str, str]]:
    """``n`` Alpaca rows, a seeded sample: the same rows for every configuration of a run."""
    from fed_crash.core.data import load_instructions, split_rows

    return split_rows(load_instructions(ALPACA), {"sample": n}, seed=seed)["sample"]
