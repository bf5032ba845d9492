"""Attention under bf16 on a CPU: torch's fused SDPA kernel against transformers' eager attention.

On one loaded SmolLM2-135M-Instruct, side by side in one process, fp32 (the reference) and bf16
with each attention implementation, in every pass below (training through
``fed_crash.core.precision.CPU_BF16_TRAINING_ATTENTION``, the others by setting the model's own):

* training: median seconds per optimizer step of the demo's client work (the 2+18+2 uniform
  emulator, 4 adapter layers trainable, batch 4 x max length 128, AdamW) on one thread, and the
  mean loss of those steps (the same batches in every variant);
* held-out loss of the full model on 200 Alpaca rows and its wall time, on every core, as the
  server evaluates;
* multiple-choice scoring (first repeat only): tokens per second and acc / acc_norm on the full
  OpenBookQA test set and the first 1,000 ARC-Easy questions.

    python benchmarks/attention.py --repeats 2
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from precision import TASKS, scored_tokens  # noqa: E402

VARIANTS = {"fp32": ("fp32", None), "bf16, sdpa": ("bf16", "sdpa"), "bf16, eager": ("bf16", "eager")}  # name -> (dtype, CPU bf16 attention)


def main() -> None:
    p = common.parser(__doc__, "attention", repeats=2)
    p.add_argument("--steps", type=int, default=8, help="training steps per measurement (default: 8)")
    p.add_argument("--questions", type=int, default=0, help="cap on questions per task, for a quick check (default: 0, the sets above)")
    args = p.parse_args()

    import torch

    from fed_crash.config import TrainConfig
    from fed_crash.core import precision
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
    parts = split_rows(common.alpaca_rows(2200, seed=cfg.data.seed), {"eval": 200, "train": 2000}, seed=0)
    held_out, train_set = (tokenize(parts[k], tokenizer, max_length=cfg.data.max_length, template=cfg.data.template) for k in ("eval", "train"))
    spec = make_spec("uniform", 30, bottom=2, top=2, keep=18, share=False)
    start_adapters = {k: v.clone() for k, v in adapter_state(model, spec).items()}
    tasks = {name: load_task(path).rows[: args.questions or n or None] for name, (path, n) in TASKS.items()}
    tokens = {name: scored_tokens(tokenizer, rows) for name, rows in tasks.items()}
    threads, own = torch.get_num_threads(), model.config._attn_implementation
    results = {v: {"step_s": [], "train_loss": None, "eval_s": [], "loss": None, "score": {}, "acc": {}} for v in VARIANTS}
    for repeat in range(args.repeats):
        for name, (dtype_name, attention) in VARIANTS.items():
            dtype = precision.compute_dtype(dtype_name, "cpu")
            precision.CPU_BF16_TRAINING_ATTENTION = attention or "eager"  # fp32 never switches
            model.set_attn_implementation(attention or own)
            r = results[name]
            torch.set_num_threads(1)  # as a client actor with one CPU trains
            plug_in(model, start_adapters)
            stats = train_adapters(build_emulator(model, spec), train_set, pad,
                                   TrainConfig(steps=args.steps, batch_size=4, lr=1e-4, warmup_ratio=0.0), progress=False, dtype=dtype)
            r["step_s"].append(stats.step_seconds)
            r["train_loss"] = stats.train_loss  # the same seed and batches every repeat
            torch.set_num_threads(threads)  # as the server evaluates and scores, on every core
            plug_in(model, start_adapters)
            start = time.perf_counter()
            r["loss"] = evaluate(model, held_out, pad, batch_size=8, progress=False, dtype=dtype)["loss"]
            r["eval_s"].append(time.perf_counter() - start)
            if repeat == 0:
                for task, rows in tasks.items():
                    scores = score_mc(model, tokenizer, rows, batch_size=32, dtype=dtype)
                    r["score"][task] = tokens[task] / scores["seconds"]
                    r["acc"][task] = {"acc": 100 * scores["acc"], "acc_norm": 100 * scores["acc_norm"]}
            model.set_attn_implementation(own)
            print(f"repeat {repeat + 1} {name}: step {r['step_s'][-1]:.3f} s, eval {r['eval_s'][-1]:.2f} s, loss {r['loss']:.5f}", flush=True)
    precision.CPU_BF16_TRAINING_ATTENTION = "eager"
    ref, sdpa, eager = (results[v] for v in VARIANTS)
    med = common.median
    rows_out = [
        ("training s/step (2+18+2 emulator, batch 4 x 128, 1 thread)", f"{med(ref['step_s']):.2f}", f"{med(sdpa['step_s']):.2f}",
         f"{med(eager['step_s']):.2f}", f"**{med(sdpa['step_s']) / med(eager['step_s']):.2f}x**"),
        (f"training loss, mean of the last steps (fp32 {ref['train_loss']:.4f})", f"{ref['train_loss']:.4f}",
         f"{sdpa['train_loss'] - ref['train_loss']:+.4f}", f"{eager['train_loss'] - ref['train_loss']:+.4f}", "difference from fp32"),
        ("held-out eval s (200 Alpaca rows, full model)", f"{med(ref['eval_s']):.1f}", f"{med(sdpa['eval_s']):.1f}", f"{med(eager['eval_s']):.1f}",
         f"**{med(sdpa['eval_s']) / med(eager['eval_s']):.2f}x**"),
        ("held-out loss", f"{ref['loss']:.5f}", f"{sdpa['loss'] - ref['loss']:+.5f}", f"{eager['loss'] - ref['loss']:+.5f}", "difference from fp32"),
    ]
    for task in tasks:
        rows_out.append((f"scoring tokens/s, {task} ({len(tasks[task])} questions)", f"{ref['score'][task]:.0f}", f"{sdpa['score'][task]:.0f}",
                         f"{eager['score'][task]:.0f}", f"**{eager['score'][task] / sdpa['score'][task]:.2f}x**"))
        rows_out.append((f"{task} acc / acc_norm (%)", *(f"{r['acc'][task]['acc']:.1f} / {r['acc'][task]['acc_norm']:.1f}" for r in (ref, sdpa, eager)), ""))
    text = common.table(("measure", "fp32", "bf16, sdpa", "bf16, eager", "eager vs sdpa"), rows_out)
    common.finish(args, "attention", {"results": results, "tokens": tokens}, text)


if __name__ == "__main__":
    main()
