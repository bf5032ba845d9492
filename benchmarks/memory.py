"""Client memory: peak resident memory of a data owner training the adapters on the emulator,
against full fine-tuning of the model and LoRA on the full model (FlowerTune's r=32, alpha=64
on q_proj and v_proj), on the default model (fp32) with the app's batch size and length.

Every configuration runs in a fresh process (so none inherits another's allocations) that
imports the same libraries, records its resident memory (the baseline: interpreter, torch,
transformers, peft), loads what a client of that kind holds (the emulator folder, as the
Flower client loads it, or the full model), runs --steps optimizer steps on the same Alpaca
rows (sampled by the parent and passed in, so no child holds the 52k-row file), and reports its peak resident memory (getrusage maxrss) and, on CUDA, the peak
allocated GPU memory. The figure is peak(adapters on emulator) / peak(full fine-tuning),
median over repeats; the same ratio above the baseline is shown too.

    python benchmarks/memory.py --repeats 3

Goal: at most 0.5x of full fine-tuning.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

GOAL = 0.5
FLOWERTUNE = {"r": 32, "lora_alpha": 64, "lora_dropout": 0.075}
EMULATORS = {  # name -> (emulator overrides of the app config, LoRA rank on the adapters)
    "adapters on OFT emulator (2+18+2)": ({}, 0),
    "adapters on CRaSh emulator (2+10+2, sharing)": ({"emulator.method": "crash", "emulator.keep": 10, "emulator.share": True}, 0),
    "LoRA r=8 on adapters, OFT emulator": ({}, 8),
}
FULL = "full fine-tuning"
FULL_LORA = "LoRA on the full model (FlowerTune)"


def child(payload: dict) -> None:
    """One configuration: load, train --steps steps, report memory (runs in a fresh process)."""
    import peft  # noqa: F401 - imported by every configuration, so baselines compare
    import torch

    from fed_crash.core.artifacts import load_emulator
    from fed_crash.config import TrainConfig
    from fed_crash.core.data import batches, pad_id, tokenize
    from fed_crash.core.models import load_model, resolve_device
    from fed_crash.core.train import response_loss, train_adapters

    baseline = common.rss_mib()
    device = resolve_device("auto")
    if payload["kind"] == "emulator":
        emulator, tokenizer, _ = load_emulator(payload["folder"], device=str(device))
        model = emulator.model
    else:
        loaded = load_model(payload["model"], device=str(device))
        model, tokenizer = loaded.model, loaded.tokenizer
    after_load = common.rss_mib()
    examples = tokenize(payload["rows"], tokenizer, max_length=payload["max_length"])
    if payload["kind"] == "emulator":
        trainable = train_adapters(emulator, examples, pad_id(tokenizer), TrainConfig(steps=payload["steps"], batch_size=payload["batch_size"],
                                                                                      lora_rank=payload["lora_rank"]), progress=False).trainable
    else:
        if payload["kind"] == "full-lora":
            from peft import LoraConfig, get_peft_model

            get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **FLOWERTUNE))  # wraps model's layers in place
        else:
            model.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        model.train()
        for batch in batches(examples, payload["batch_size"], pad_id(tokenizer)):
            loss_sum, n = response_loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            (loss_sum / max(n, 1)).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
    common.emit({"peak_mib": common.peak_rss_mib(), "baseline_mib": baseline, "after_load_mib": after_load, "trainable": trainable,
                 "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None})


def main() -> None:
    p = common.parser(__doc__, "memory")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration (the peak comes with the first; default: 3)")
    args = p.parse_args()
    if args.child:
        return child(json.loads(args.child))
    work = Path(args.work)
    cfg = common.run_config({})
    shared = {"steps": args.steps, "batch_size": cfg.train.batch_size, "max_length": cfg.data.max_length, "model": cfg.fed.model,
              "rows": common.alpaca_rows(args.steps * cfg.train.batch_size)}  # passed in: no child holds the whole file
    configs = {name: {**shared, "kind": "emulator", "lora_rank": rank, "folder": str(common.emulator_folder(work, f"emulator-{i}", overrides).resolve())}
               for i, (name, (overrides, rank)) in enumerate(EMULATORS.items())}
    configs[FULL] = {**shared, "kind": "full"}
    configs[FULL_LORA] = {**shared, "kind": "full-lora"}
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for r in range(args.repeats):
        for name, payload in configs.items():
            runs[name].append(common.run_child(__file__, payload))
            print(f"repeat {r + 1} {name}: peak {runs[name][-1]['peak_mib']:.0f} MiB", flush=True)
    peak = {name: common.median(x["peak_mib"] for x in xs) for name, xs in runs.items()}
    above = {name: common.median(x["peak_mib"] - x["baseline_mib"] for x in xs) for name, xs in runs.items()}
    ratios = {name: common.median(x["peak_mib"] / full["peak_mib"] for x, full in zip(xs, runs[FULL])) for name, xs in runs.items()}
    rows = []
    for name, xs in runs.items():
        goal = f"<= {GOAL}: {'met' if ratios[name] <= GOAL else 'NOT met'}" if name in EMULATORS and EMULATORS[name][1] == 0 else "-"
        rows.append((name, f"{xs[0]['trainable'] / 1e6:.2f} M", f"{common.median(x['after_load_mib'] - x['baseline_mib'] for x in xs):.0f}",
                     f"{peak[name]:.0f}", f"{above[name]:.0f}", f"**{ratios[name]:.2f}x**", f"{above[name] / above[FULL]:.2f}x", goal))
    text = common.table(["client trains", "trainable params", "loaded (MiB above baseline)", "peak RSS (MiB)", "peak above baseline (MiB)",
                         "peak / full fine-tuning", "above baseline / full FT", "goal"], rows)
    text += (f"\n\nBaseline (interpreter + torch + transformers + peft, before any model): {common.median(x['baseline_mib'] for xs in runs.values() for x in xs):.0f} MiB. "
             f"Batch {shared['batch_size']} x {shared['max_length']} tokens, {args.steps} AdamW steps, fp32.")
    met = all(ratios[name] <= GOAL for name, (_, rank) in EMULATORS.items() if rank == 0)
    common.finish(args, "memory", {"ratios": ratios, "peak_mib": peak, "above_baseline_mib": above, "goal": GOAL, "met": met, "runs": runs,
                                   "configs": configs}, text)


if __name__ == "__main__":
    main()
