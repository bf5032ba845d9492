"""Emulator comparison: zero-shot fidelity of every layer-selection method at several budgets,
and optionally the plug-in each one yields after offsite-tuning.

``fed-crash emulator compare`` calls :func:`compare_emulators`. The methods are

* ``uniform``: OFT's evenly spaced layers;
* ``crash``: CRaSh's CKA clusters with the attention-sink token left out of pooling (the
  ``skip_first``/``outlier_norm`` of the emulator config, sink-aware by default);
* ``crash-sink``: CRaSh as published, pooling over every token, sink included;
* ``search``: the kept set with the lowest divergence from the full model (:mod:`fed_crash.selection.search`).

Every method sees the same held-out, calibration and training rows. The CKA matrices and the
search probe are computed once and reused across budgets; each method's build time is what a
model owner would pay for that emulator alone (CKA forward, plus the search for ``search``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from fed_crash.config import DataConfig, EmulatorConfig, TrainConfig
from fed_crash.core.data import load_instructions, pad_id, split_rows, tokenize
from fed_crash.core.emulator import adapter_state, build_emulator, make_spec, plug_in
from fed_crash.core.models import get_layers, load_model
from fed_crash.selection.plan import layer_similarity, plan_emulator, search_probe
from fed_crash.selection.search import layer_sequence
from fed_crash.core.train import evaluate, train_adapters

log = logging.getLogger(__name__)

METHODS = ("uniform", "crash", "crash-sink", "search")


def _config(emu: EmulatorConfig, method: str, keep: int, share: bool) -> EmulatorConfig:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if method == "crash-sink":
        return replace(emu, method="crash", keep=keep, share=share, skip_first=0, outlier_norm=0.0)
    return replace(emu, method=method, keep=keep, share=share)


def compare_emulators(
    model_source: str,
    data: DataConfig,
    emu: EmulatorConfig,
    train: TrainConfig,
    *,
    budgets: Sequence[int],
    methods: Sequence[str] = METHODS,
    shares: Sequence[bool] = (False, True),
    eval_examples: int = 200,
    tune_budget: int = 0,
    tune_shares: Sequence[bool] = (False, True),
    train_examples: int = 2000,
    out_dir: str | Path,
    cache_dir: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """One row per (budget, sharing, method): kept layers, depth, build seconds, zero-shot
    held-out loss and, at ``tune_budget`` (0 = none) and the sharing settings in ``tune_shares``,
    with ``train.steps`` steps, the emulator's fine-tuned and plug-in losses. Writes ``compare.json``, ``compare.md`` and ``compare.png``."""
    for method in methods:
        _config(emu, method, 1, False)  # unknown names fail before the model loads
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(model_source, cache_dir=cache_dir, device=device)
    model, tokenizer = loaded.model, loaded.tokenizer
    for keep in budgets:  # a budget that does not fit fails before the data loads or any forward pass
        make_spec("uniform", len(get_layers(model)), bottom=emu.bottom, top=emu.top, keep=keep)
    rows = load_instructions(data.data, skip_malformed=data.skip_malformed)
    parts = split_rows(rows, {"eval": eval_examples, "calibration": emu.calib_samples, "train": train_examples if tune_budget else 0}, seed=data.seed)
    pad = pad_id(tokenizer)
    held_out = tokenize(parts["eval"], tokenizer, max_length=data.max_length, template=data.template)
    train_set = tokenize(parts["train"], tokenizer, max_length=data.max_length, template=data.template)

    def score(m, name: str) -> float:
        return evaluate(m, held_out, pad, batch_size=8, progress=progress, desc=name)["loss"]

    untuned = {k: v.clone() for k, v in adapter_state(model, make_spec("uniform", len(get_layers(model)), bottom=emu.bottom, top=emu.top, keep=1)).items()}
    full_loss = score(model, "full model")
    # the expensive parts, once: CKA per pooling variant, the search probe
    similarity, seconds = {}, {}
    for method in {m if m != "search" else "crash" for m in methods} - {"uniform"}:
        start = time.perf_counter()
        similarity[method] = layer_similarity(model, tokenizer, parts["calibration"], data, _config(emu, method, 1, False), progress=progress)
        seconds[method] = time.perf_counter() - start
    probe = None
    if "search" in methods:
        start = time.perf_counter()
        probe = search_probe(model, tokenizer, parts["calibration"], data, emu)
        seconds["probe"] = time.perf_counter() - start

    def _measure(spec, tune: bool) -> dict:
        emulator = build_emulator(model, spec)
        name = f"{spec.method} k={len(spec.kept)} share={spec.share}"
        scores = {"emulator_loss": score(emulator.model, name)}
        if tune:
            report = train_adapters(emulator, train_set, pad, train, progress=progress)
            scores["emulator_tuned_loss"] = score(emulator.model, name + " tuned")
            plug_in(model, emulator.adapter_state())
            scores["plugin_loss"] = score(model, name + " plug-in")
            plug_in(model, untuned)  # the next emulator starts from the original model
            scores["tune_seconds"] = round(report["seconds"], 1)
        return scores

    results, measured, specs = [], {}, []

    def save() -> None:  # after every row: a long comparison that stops early keeps what it measured
        (out / "compare.json").write_text(json.dumps({"model": loaded.model_id, "full_loss": full_loss, "eval_examples": len(held_out),
                                                      "train_steps": train.steps if tune_budget else 0, "rows": results}, indent=1))

    # every emulator zero-shot first (cheap), then the tuning runs (expensive)
    for keep in budgets:
        for share in shares:
            for method in methods:
                cfg = _config(emu, method, keep, share)
                start = time.perf_counter()
                spec, _ = plan_emulator(model, tokenizer, parts["calibration"], data, cfg, progress=False,
                                        similarity=similarity.get("crash" if method == "search" else method), probe=probe)
                build = time.perf_counter() - start + seconds.get("crash" if method == "search" else method, 0.0) + (seconds["probe"] if method == "search" else 0.0)
                row = {"budget": keep, "share": share, "method": method, "kept": list(spec.kept), "depth": len(spec.layer_map()),
                       "build_seconds": round(build, 2)}
                if method == "search":
                    row["divergence"] = spec.selection["steps"][-1]["divergence"]
                    row["search_steps"] = len(spec.selection["steps"]) - 1
                sequence = layer_sequence(spec)  # methods often agree: an emulator already measured is not measured again
                if sequence not in measured:
                    measured[sequence] = _measure(spec, tune=False)
                row.update(measured[sequence])
                log.info("%s", row)
                results.append(row)
                specs.append(spec)
                save()
    for row, spec in zip(results, specs):
        if row["budget"] == tune_budget and row["share"] in tune_shares:
            sequence = layer_sequence(spec)
            if "plugin_loss" not in measured[sequence]:
                measured[sequence] = _measure(spec, tune=True)
            row.update(measured[sequence])
            log.info("%s", row)
            save()
    (out / "compare.md").write_text(markdown(results, full_loss))
    plot(results, full_loss, out / "compare.png", title=f"{Path(loaded.model_id).name}: emulator zero-shot loss on {len(held_out)} held-out rows")
    return results


def markdown(rows: Sequence[dict], full_loss: float) -> str:
    tuned = any("plugin_loss" in r for r in rows)
    head = "| budget | share | method | depth | kept | build s | emulator loss |" + (" tuned emulator loss | plug-in loss |" if tuned else "")
    lines = [f"Full model zero-shot loss: {full_loss:.4f}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (f"| {r['budget']} | {'on' if r['share'] else 'off'} | {r['method']} | {r['depth']} | {' '.join(map(str, r['kept']))} "
                f"| {r['build_seconds']:.1f} | {r['emulator_loss']:.4f} |")
        if tuned:
            line += f" {r['emulator_tuned_loss']:.4f} | {r['plugin_loss']:.4f} |" if "plugin_loss" in r else " | |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict], full_loss: float, path: Path, *, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        for share in dict.fromkeys(r["share"] for r in rows):
            points = sorted((r["budget"], r["emulator_loss"]) for r in rows if r["method"] == method and r["share"] == share)
            if points:
                ax.plot(*zip(*points), marker="o", linestyle="-" if not share else "--", label=f"{method}{', shared' if share else ''}")
    ax.axhline(full_loss, color="black", linewidth=0.8, label="full model")
    ax.set_xlabel("kept middle layers (k)")
    ax.set_ylabel("held-out loss (response tokens)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
