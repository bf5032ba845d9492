"""Side-by-side multiple-choice accuracy and wall time: fed-crash's harness vs lm-evaluation-harness.

Both harnesses read the same local ``{query, choices, gold}`` JSONL files (registered with
lm-eval as custom tasks whose YAML this script writes) and the same weights (the Hugging Face
folder behind ``--model``). Each task runs as its own process per harness, so the wall times
include start-up and are per task. Results are kept per harness and task under ``--out`` and a
rerun skips what is there, so the two harnesses can run at different times.

    python -m venv .venv-lmeval && .venv-lmeval/bin/pip install torch==2.13.0 'lm-eval[hf]==0.4.13'
    .venv/bin/python benchmarks/lm_eval_parity.py --out results/parity

prints a markdown table and writes ``parity.json`` and ``parity.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "eval"
TASKS = ["arc_easy", "arc_challenge", "openbook_qa", "piqa"]
METRICS = ("acc", "acc_norm", "acc_bytes")

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
  - metric: acc_bytes
    aggregation: mean
    higher_is_better: true
"""


def run_lm_eval(lm_eval: str, folder: str, task: str, path: Path, out: Path, args: argparse.Namespace) -> dict:
    tasks = out / "lm_eval_tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    name = f"fedcrash_{task}"
    (tasks / f"{name}.yaml").write_text(TASK_YAML.format(name=name, path=path.resolve()))
    cmd = [lm_eval, "--model", "hf", "--model_args", f"pretrained={folder},dtype=float32", "--tasks", name,
           "--include_path", str(tasks), "--batch_size", str(args.batch_size), "--device", args.device,
           "--output_path", str(out / "lm_eval_raw" / task)]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=open(out / f"lm_eval_{task}.log", "w"))
    seconds = time.perf_counter() - start
    raw = json.loads(sorted((out / "lm_eval_raw" / task).rglob("results_*.json"))[-1].read_text())["results"][name]
    return {**{m: raw[f"{m},none"] for m in METRICS}, "seconds": seconds}


def run_fed_crash(model: str, task: str, path: Path, out: Path, args: argparse.Namespace) -> dict:
    dest = out / "fed_crash_raw" / task
    cmd = [str(Path(sys.executable).with_name("fed-crash")), "eval", "--model", model, "--task", str(path.resolve()),
           "--batch-size", str(args.batch_size), "--device", args.device, "--out", str(dest), "--no-progress"]
    if args.limit:  # lm-eval's --limit takes the first rows; so does ours with --first
        cmd += ["--limit", str(args.limit), "--first"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=open(out / f"fed_crash_{task}.log", "w"))
    seconds = time.perf_counter() - start
    raw = json.loads((dest / "eval.json").read_text())["tasks"][path.stem]
    return {**{m: raw[m] for m in METRICS}, "seconds": seconds, "n": raw["n"]}


def table(results: dict) -> str:
    lines = ["| task | n | acc fed-crash | acc lm-eval | acc_norm fed-crash | acc_norm lm-eval | acc_bytes fed-crash | acc_bytes lm-eval | max abs diff (points) | wall s fed-crash | wall s lm-eval | lm-eval / fed-crash |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for task, r in results.items():
        ours, theirs = r.get("fed_crash"), r.get("lm_eval")
        if not (ours and theirs):
            continue
        diff = max(abs(ours[m] - theirs[m]) for m in METRICS) * 100
        cells = [f"{100 * ours[m]:.2f} | {100 * theirs[m]:.2f}" for m in METRICS]
        lines.append(f"| {task} | {ours['n']} | {' | '.join(cells)} | {diff:.2f} | {ours['seconds']:.0f} | {theirs['seconds']:.0f} | {theirs['seconds'] / ours['seconds']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/parity", help="folder for per-task results, logs and the table")
    parser.add_argument("--model", default="smollm2", help="fed-crash model source; lm-eval gets the Hugging Face folder behind it")
    parser.add_argument("--tasks", nargs="+", default=TASKS, help=f"task files in {DATA} (stems) or JSONL paths")
    parser.add_argument("--harness", choices=("both", "lm-eval", "fed-crash"), default="both")
    parser.add_argument("--lm-eval", default=str(REPO / ".venv-lmeval" / "bin" / "lm_eval"), help="lm_eval executable")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=0, help="first N questions per task (0: all)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "parity.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    folder = None
    for task in args.tasks:
        path = Path(task) if task.endswith(".jsonl") else DATA / f"{task}.jsonl"
        entry = results.setdefault(path.stem, {})
        for harness in ("lm_eval", "fed_crash"):
            if args.harness not in ("both", harness.replace("_", "-")) or harness in entry:
                continue
            if harness == "lm_eval":
                if folder is None:
                    sys.path.insert(0, str(REPO))
                    from fed_crash.core.models import load_model

                    folder = load_model(args.model).folder
                entry[harness] = run_lm_eval(args.lm_eval, folder, path.stem, path, out, args)
            else:
                entry[harness] = run_fed_crash(args.model, path.stem, path, out, args)
            store.write_text(json.dumps(results, indent=1))
            print(f"{path.stem} {harness}: " + ", ".join(f"{k}={v:.4f}" for k, v in entry[harness].items()), flush=True)
    text = table(results)
    (out / "parity.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
