"""Compute dtype: fp32 against bf16 autocast on the default model, side by side in one process.

On one loaded SmolLM2-135M-Instruct, alternating fp32 and bf16 (``--repeats`` times each):

* training: median seconds per optimizer step of the demo's client work (the 2+18+2 uniform
  emulator, 4 adapter layers trainable, batch 4 x max length 128, AdamW) on one thread, as a
  client actor with one CPU runs it;
* scoring: multiple-choice tokens per second (every context token once and every choice token,
  as the prefix-cached scorer computes them) and acc / acc_norm on the full OpenBookQA test set
  and the first 1,000 ARC-Easy questions;
* held-out loss of the full model on 200 Alpaca rows (the demo's held-out split).

    python benchmarks/precision.py --repeats 2

Goals (issue 17): training >= 1.5x, scoring >= 1.7x, accuracy within 0.5 points, loss within 1%.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DATA = common.REPO.parent / "shared" / "data" / "eval"
TASKS = {"openbookqa": (DATA / "openbook_qa.jsonl", 0), "arc_easy": (DATA / "arc_easy.jsonl", 1000)}  # name -> (file, first n; 0 = all)
GOALS = {"train": 1.5, "score": 1.7, "acc_points": 0.5, "loss_rel": 0.01}


def scored_tokens(tokenizer, rows) -> int:
    """Positions the prefix-cached scorer computes: each context once, each choice's tokens."""
    from fed_crash.evaluation.mc import encode_pair

    total = 0
    for row in rows:
        pairs = [encode_pair(tokenizer, row["query"], " " + c) for c in row["choices"]]
        total += len(pairs[0][0]) + sum(len(p[1]) for p in pairs)
    return total


def main() -> None:
    p = common.parser(__doc__, "precision", repeats=2)
    p.add_argument("--steps", type=int, default=8, help="training steps per measurement (default: 8)")
    p.add_argument("--questions", type=int, default=0, help="cap on questions per task, for a quick check (default: 0, the sets above)")
    args = p.parse_args()

    import torch

    from fed_crash.config import TrainConfig
    from fed_crash.core.data import pad_id, split_rows, tokenize
    from fed_crash.core.emulator import adapter_state, build_emulator, plug_in
    from fed_crash.core.models import load_model
    from fed_crash.core.train import evaluate, train_adapters
    from fed_crash.evaluation.mc import load_task, score_mc
    from fed_crash.selection import make_spec

    loaded = load_model("smollm2")
    model, tokenizer = loaded.model, loaded.tokenizer
    pad = pad_id(tokenizer)
    cfg = common.run_config({})
    rows = common.alpaca_rows(2200, seed=cfg.data.seed)
    parts = split_rows(rows, {"eval": 200, "train": 2000}, seed=0)
    held_out = tokenize(parts["eval"], tokenizer, max_length=cfg.data.max_length, template=cfg.data.template)
    train_set = tokenize(parts["train"], tokenizer, max_length=cfg.data.max_length, template=cfg.data.template)
    spec = make_spec("uniform", 30, bottom=2, top=2, keep=18, share=False)
    start_adapters = {k: v.clone() for k, v in adapter_state(model, spec).items()}
    tasks = {name: load_task(path).rows[: args.questions or n or None] for name, (path, n) in TASKS.items()}  # the first n, as lm-eval's --limit
    tokens = {name: scored_tokens(tokenizer, task_rows) for name, task_rows in tasks.items()}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    results: dict[str, dict] = {name: {"train_step_s": [], "score": {t: [] for t in tasks}, "acc": {}, "loss": None} for name in dtypes}
    for repeat in range(args.repeats):
        for name, dtype in dtypes.items():
            plug_in(model, start_adapters)
            emulator = build_emulator(model, spec)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as a client runs: Ray gives each client actor one CPU
            stats = train_adapters(emulator, train_set, pad, TrainConfig(steps=args.steps, batch_size=4, lr=1e-4, warmup_ratio=0.0),
                                   progress=False, dtype=dtype)
            torch.set_num_threads(threads)  # scoring and loss as the server runs them, on every core
            results[name]["train_step_s"].append(stats.step_seconds)
            plug_in(model, start_adapters)  # the full model again: scoring and loss are of the untuned model
            for task, task_rows in tasks.items():
                scores = score_mc(model, tokenizer, task_rows, batch_size=32, dtype=dtype)
                results[name]["score"][task].append(tokens[task] / scores["seconds"])
                results[name]["acc"][task] = {"acc": 100 * scores["acc"], "acc_norm": 100 * scores["acc_norm"], "n": scores["n"]}
            if repeat == 0:
                results[name]["loss"] = evaluate(model, held_out, pad, batch_size=8, progress=False, dtype=dtype)["loss"]
            print(f"repeat {repeat + 1} {name}: step {stats.step_seconds:.2f} s, "
                  + ", ".join(f"{t} {results[name]['score'][t][-1]:.0f} tok/s" for t in tasks), flush=True)
    fp32, bf16 = results["fp32"], results["bf16"]
    train_ratio = common.median(fp32["train_step_s"]) / common.median(bf16["train_step_s"])
    score_ratio = {t: common.median(bf16["score"][t]) / common.median(fp32["score"][t]) for t in tasks}
    rows_out = [("training s/step (2+18+2 emulator, batch 4 x 128, 1 thread)", f"{common.median(fp32['train_step_s']):.2f}",
                 f"{common.median(bf16['train_step_s']):.2f}", f"**{train_ratio:.2f}x**", f">= {GOALS['train']}x")]
    for t in tasks:
        rows_out.append((f"scoring tokens/s, {t} ({len(tasks[t])} questions, {tokens[t]} tokens)", f"{common.median(fp32['score'][t]):.0f}",
                         f"{common.median(bf16['score'][t]):.0f}", f"**{score_ratio[t]:.2f}x**", f">= {GOALS['score']}x"))
    for t in tasks:
        for metric in ("acc", "acc_norm"):
            a, b = fp32["acc"][t][metric], bf16["acc"][t][metric]
            rows_out.append((f"{t} {metric} (%)", f"{a:.1f}", f"{b:.1f}", f"{b - a:+.1f} points", f"within {GOALS['acc_points']}"))
    rel = (bf16["loss"] - fp32["loss"]) / fp32["loss"]
    rows_out.append(("held-out loss, 200 Alpaca rows", f"{fp32['loss']:.4f}", f"{bf16['loss']:.4f}", f"{100 * rel:+.2f}%", "within 1%"))
    text = common.table(("measure", "fp32", "bf16", "bf16 vs fp32", "goal"), rows_out)
    common.finish(args, "precision", {"results": results, "tokens": tokens, "train_ratio": train_ratio, "score_ratio": score_ratio,
                                      "loss_rel": rel, "goals": GOALS, "seconds": time.perf_counter()}, text)


if __name__ == "__main__":
    main()
