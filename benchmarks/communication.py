"""Communication: bytes a client downloads and uploads per round, for offsite-tuning adapters
(OFT's uniform emulator, CRaSh's), for LoRA on the adapters, against full-model FedAvg and LoRA
on the full model (the FlowerTune LLM recipe: r=32, alpha=64, q_proj and v_proj), on the
default model (SmolLM2-135M-Instruct, fp32).

The offsite rows come from real `flwr run`s of the app (2 supernodes, both sampled, one round
of one local step): what OffsiteStrategy counted on the wire per client (Flower's ArrayRecord
bytes plus config values). A node's first download carries the one-time emulator, counted
apart, so later rounds download the first round's bytes minus the emulator's; uploads are the
same every round. The two
baselines are not federated by this framework; their per-round payload is the same count over
the ArrayRecord they would send each way: the full state dict (tied head once) for FedAvg,
peft's LoRA state dict for FlowerTune. Byte counts are deterministic, so one repeat suffices
(more repeats check that they do not change).

    python benchmarks/communication.py

Goals: upload at most 15% of the full model; with LoRA on the adapters, at most 1%.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

GOAL_UP = 0.15
GOAL_UP_LORA = 0.01
FLOWERTUNE = {"r": 32, "lora_alpha": 64, "lora_dropout": 0.075}  # examples/flowertune-llm: model.lora.*; peft's default targets (q_proj, v_proj)

VARIANTS = {
    "OFT adapters (uniform 2+18+2)": {},
    "CRaSh adapters (2+10+2, sharing)": {"emulator.method": "crash", "emulator.keep": 10, "emulator.share": True},
    "OFT adapters, LoRA r=8 on them": {"train.lora-rank": 8},
}


def baselines(model_name: str) -> dict[str, dict]:
    """Per-round bytes each way of full-model FedAvg and of FlowerTune's LoRA on the full model."""
    from flwr.app import ArrayRecord, RecordDict
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from fed_crash.core.models import load_model
    from strategies.offsite import record_bytes

    model = load_model(model_name).model
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    full = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    full_bytes = record_bytes(RecordDict({"arrays": ArrayRecord(full)}))
    lora = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **FLOWERTUNE))
    lora_state = get_peft_model_state_dict(lora)
    lora_bytes = record_bytes(RecordDict({"arrays": ArrayRecord({k: v.detach() for k, v in lora_state.items()})}))
    targets = sorted({k.split(".")[-3] for k in lora_state})
    return {
        "full-model FedAvg": {"down": full_bytes, "up": full_bytes, "first_down": full_bytes, "trained": "all 30 layers"},
        f"LoRA on the full model (FlowerTune: r=32 on {', '.join(targets)})": {"down": lora_bytes, "up": lora_bytes, "first_down": lora_bytes + full_bytes,
                                                                               "trained": f"LoRA factors, {sum(v.numel() for v in lora_state.values()):,} numbers"},
    }


def offsite(overrides: dict, work: Path) -> dict:
    """Per-client bytes of a real run's round 1: emulator + adapters down, adapters up."""
    run_dir, lines = common.run_app({"num-server-rounds": 1, "fraction-train": 1.0, "min-train-nodes": 2, "min-available-nodes": 2,
                                     "eval-examples": 8, "save-model": False, "train.steps": 1, **overrides},
                                    work=work, name="communication", supernodes=2)
    first = lines[1]
    assert len(first["bytes_down_per_client"]) == len(first["bytes_up_per_client"]) == 2, "both clients sampled and answered"
    emulator = first["emulator_bytes_down"] / 2
    first_down = common.median(first["bytes_down_per_client"].values())
    return {
        "first_down": first_down,
        "down": first_down - emulator,
        "up": common.median(first["bytes_up_per_client"].values()),
        "emulator": emulator,
        "full_model": first["full_model_bytes"],
        "aggregate_s": [line["aggregate_seconds"] for line in lines[1:]],
        "round_s": [line["round_seconds"] for line in lines[1:]],
        "eval_s": [line["eval_seconds"] for line in lines],
        "run_dir": str(run_dir),
    }


def main() -> None:
    p = common.parser(__doc__, "communication", repeats=1)
    args = p.parse_args()
    work = Path(args.work)
    measured: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, overrides in VARIANTS.items():
            measured[name].append(offsite(overrides, work))
            print(f"{name}: up {measured[name][-1]['up'] / 1e6:.2f} MB", flush=True)
    for name, runs in measured.items():
        if len({(r["down"], r["up"], r["first_down"]) for r in runs}) != 1:
            raise RuntimeError(f"{name}: byte counts changed between repeats: {runs}")
    figures = {name: runs[0] for name, runs in measured.items()}
    full = figures[next(iter(VARIANTS))]["full_model"]
    base = baselines(common.run_config({}).fed.model)
    rows, verdicts = [], {}
    for name, f in {**figures, **base}.items():
        up = f["up"] / full
        goal = GOAL_UP_LORA if "LoRA r=8 on them" in name else GOAL_UP if name in VARIANTS else None
        verdicts[name] = None if goal is None else up <= goal
        rows.append((name, f"{f['first_down'] / 1e6:.1f}", f"{f['down'] / 1e6:.2f}", f"{f['up'] / 1e6:.2f}", f"{f['down'] / full:.4f}", f"**{up:.4f}**",
                     "-" if goal is None else f"<= {goal:.2f}: {'met' if up <= goal else 'NOT met'}"))
    text = common.table(["method", "down, first round (MB)", "down per round after (MB)", "up per round (MB)", "down / full model", "up / full model", "goal (up)"], rows)
    text += (f"\n\nFull model: {full / 1e6:.1f} MB (fp32, tied head once). Per client per round; the first round's download of the offsite "
             f"rows includes the one-time emulator, the baselines' the full model (FlowerTune's clients need the base model once).")
    common.finish(args, "communication", {"full_model_bytes": full, "offsite": measured, "baselines": base, "goals_met": verdicts}, text)


if __name__ == "__main__":
    main()
