"""Compute dtype: fp32 against bf16 autocast on the default model, side by side in one process.

On one loaded SmolLM2-135M-Instruct, alternating fp32 and bf16 (``--repeats`` times each):

* training: median seconds per optimizer step of the demo's client work (the 2+18+2 uniform
  emulator, 4 adapter layers trainable, batch 4 x max length 128, AdamW) on one thread, as a
  client actor with one CPU runs it; and the same on the full model (the issue's parity setting,
  and what the ``full`` ceiling's clients run);
* scoring: multiple-choice tokens per second (every context token once and every choice token,
  as the prefix-cached scorer computes them) and acc / acc_norm on the full OpenBookQA test set
  and the first 1,000 ARC-Easy questions, at each ``--score-batch`` (continuations per forward
  pass; accuracy is reported at the first);
* held-out loss of the full model on 200 Alpaca rows (the demo's held-out split).

    python benchmarks/precision.py --repeats 2
    python benchmarks/precision.py --repeats 1 --score-batch 32 128   # does a larger batch help short questions?

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
    p.add_argument("--score-batch", type=int, nargs="+", default=[32], help="scoring batch sizes, continuations per forward pass (default: 32)")
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
    specs = {"2+18+2 emulator": make_spec("uniform", 30, bottom=2, top=2, keep=18, share=False), "full model": make_spec("full", 30, bottom=2, top=2)}
    start_adapters = {k: v.clone() for k, v in adapter_state(model, specs["full model"]).items()}  # the same 4 adapter layers in both
    tasks = {name: load_task(path).rows[: args.questions or n or None] for name, (path, n) in TASKS.items()}  # the first n, as lm-eval's --limit
    tokens = {name: scored_tokens(tokenizer, task_rows) for name, task_rows in tasks.items()}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    scored = [(t, b) for t in tasks for b in args.score_batch]
    results: dict[str, dict] = {name: {"train_step_s": {s: [] for s in specs}, "score": {f"{t}@{b}": [] for t, b in scored}, "acc": {}, "loss": None}
                                for name in dtypes}
    for repeat in range(args.repeats):
        for name, dtype in dtypes.items():
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as a client runs: Ray gives each client actor one CPU
            for label, spec in specs.items():
                plug_in(model, start_adapters)
                stats = train_adapters(build_emulator(model, spec), train_set, pad,
                                       TrainConfig(steps=args.steps, batch_size=4, lr=1e-4, warmup_ratio=0.0), progress=False, dtype=dtype)
                results[name]["train_step_s"][label].append(stats.step_seconds)
            torch.set_num_threads(threads)  # scoring and loss as the server runs them, on every core
            plug_in(model, start_adapters)  # the untuned full model again: scoring and loss are of it
            for task, batch in scored:
                scores = score_mc(model, tokenizer, tasks[task], batch_size=batch, dtype=dtype)
                results[name]["score"][f"{task}@{batch}"].append(tokens[task] / scores["seconds"])
                if batch == args.score_batch[0]:
                    results[name]["acc"][task] = {"acc": 100 * scores["acc"], "acc_norm": 100 * scores["acc_norm"], "n": scores["n"]}
            if repeat == 0:
                results[name]["loss"] = evaluate(model, held_out, pad, batch_size=8, progress=False, dtype=dtype)["loss"]
            print(f"repeat {repeat + 1} {name}: " + ", ".join(f"{s} step {v[-1]:.2f} s" for s, v in results[name]["train_step_s"].items()) + ", "
                  + ", ".join(f"{k} {v[-1]:.0f} tok/s" for k, v in results[name]["score"].items()), flush=True)
    fp32, bf16 = results["fp32"], results["bf16"]
    train_ratio = {s: common.median(fp32["train_step_s"][s]) / common.median(bf16["train_step_s"][s]) for s in specs}
    score_ratio = {k: common.median(bf16["score"][k]) / common.median(fp32["score"][k]) for k in fp32["score"]}
    rows_out = [(f"training s/step ({s}, 4 adapter layers, batch 4 x 128, 1 thread)", f"{common.median(fp32['train_step_s'][s]):.2f}",
                 f"{common.median(bf16['train_step_s'][s]):.2f}", f"**{train_ratio[s]:.2f}x**", f">= {GOALS['train']}x") for s in specs]
    for t, b in scored:
        k = f"{t}@{b}"
        rows_out.append((f"scoring tokens/s, {t} ({len(tasks[t])} questions, {tokens[t]} tokens, batch {b})", f"{common.median(fp32['score'][k]):.0f}",
                         f"{common.median(bf16['score'][k]):.0f}", f"**{score_ratio[k]:.2f}x**", f">= {GOALS['score']}x"))
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
