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
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from typing import Callable, Sequence

from fed_crash.config import DataConfig, EmulatorConfig, TrainConfig
from fed_crash.core.data import load_instructions, pad_id, split_rows, tokenize
from fed_crash.core.emulator import adapter_state, build_emulator, plug_in
from fed_crash.core.plots import figure
from fed_crash.core.models import get_layers, load_model
from fed_crash.selection import make_spec, method
from fed_crash.selection.plan import layer_similarity, plan_emulator, search_probe
from fed_crash.selection.search import layer_sequence
from fed_crash.core.train import evaluate, train_adapters

log = logging.getLogger(__name__)

# What the comparison calls a method: a registered method (fed_crash.selection) and the emulator
# options it overrides; "crash-sink" is CRaSh as published, pooling over every token.
VARIANTS: dict[str, tuple[str, dict]] = {
    "uniform": ("uniform", {}),
    "crash": ("crash", {}),
    "crash-sink": ("crash", {"skip_first": 0, "outlier_norm": 0.0}),
    "search": ("search", {}),
}
METHODS = tuple(VARIANTS)


def _config(emu: EmulatorConfig, variant: str, keep: int, share: bool) -> EmulatorConfig:
    if variant not in VARIANTS:
        raise ValueError(f"unknown method {variant!r}; expected one of {', '.join(METHODS)}")
    name, overrides = VARIANTS[variant]
    return replace(emu, method=name, keep=keep, share=share, **overrides)


@dataclass
class Inputs:
    """The expensive inputs, computed once per pooling setting and shared by every row (CKA
    matrices, the search probe), with the seconds each took: a row's build time is what a model
    owner would pay for that emulator alone."""

    model: object
    tokenizer: object
    calibration: list
    data: DataConfig
    progress: bool
    dtype: torch.dtype
    similarity: dict = field(default_factory=dict)  # pooling settings -> (matrix, seconds)
    probe: tuple | None = None  # (probe, seconds)

    def plan(self, cfg: EmulatorConfig):
        """The spec of ``cfg`` and its build seconds (its own time plus the shared inputs it used)."""
        chosen, charged = method(cfg.method), 0.0
        similarity = probe = None
        if chosen.needs_calibration:
            key = (cfg.pooling, cfg.skip_first, cfg.outlier_norm)
            if key not in self.similarity:
                start = time.perf_counter()
                matrix = layer_similarity(self.model, self.tokenizer, self.calibration, self.data, cfg, progress=self.progress, dtype=self.dtype)
                self.similarity[key] = (matrix, time.perf_counter() - start)
            similarity, seconds = self.similarity[key]
            charged += seconds
        if chosen.needs_probe:
            if self.probe is None:
                start = time.perf_counter()
                self.probe = (search_probe(self.model, self.tokenizer, self.calibration, self.data, cfg, self.dtype), time.perf_counter() - start)
            probe, seconds = self.probe
            charged += seconds
        start = time.perf_counter()
        spec, _ = plan_emulator(self.model, self.tokenizer, self.calibration, self.data, cfg, progress=False, similarity=similarity, probe=probe,
                                 dtype=self.dtype)
        return spec, time.perf_counter() - start + charged


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
    dtype: torch.dtype = torch.float32,
) -> list[dict]:
    """One row per (budget, sharing, method): kept layers, depth, build seconds, zero-shot
    held-out loss and, at ``tune_budget`` (0 = none) and the sharing settings in ``tune_shares``,
    with ``train.steps`` steps, the emulator's fine-tuned and plug-in losses. Writes
    ``compare.json`` (after every row: a long comparison that stops early keeps what it
    measured), ``compare.md`` and ``compare.png``."""
    for variant in methods:
        _config(emu, variant, 1, False)  # unknown names fail before the model loads
    loaded = load_model(model_source, cache_dir=cache_dir, device=device)
    model, tokenizer = loaded.model, loaded.tokenizer
    for keep in budgets:  # a budget that does not fit fails before anything is written or any forward pass
        make_spec("uniform", len(get_layers(model)), bottom=emu.bottom, top=emu.top, keep=keep)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = load_instructions(data.data, skip_malformed=data.skip_malformed)
    parts = split_rows(rows, {"eval": eval_examples, "calibration": emu.calib_samples, "train": train_examples if tune_budget else 0}, seed=data.seed)
    held_out = tokenize(parts["eval"], tokenizer, max_length=data.max_length, template=data.template)
    untuned = adapter_state(model, make_spec("uniform", len(get_layers(model)), bottom=emu.bottom, top=emu.top, keep=1))
    measure = Measure(model, untuned, held_out, tokenize(parts["train"], tokenizer, max_length=data.max_length, template=data.template),
                      pad_id(tokenizer), train, progress, dtype)
    inputs = Inputs(model, tokenizer, parts["calibration"], data, progress, dtype)
    results: list[dict] = []

    def save() -> None:
        (out / "compare.json").write_text(json.dumps({"model": loaded.model_id, "full_loss": measure.full_loss, "eval_examples": len(held_out),
                                                      "train_steps": train.steps if tune_budget else 0, "rows": results}, indent=1))

    _measure_rows(results, inputs, measure, emu, [(k, s, v) for k in budgets for s in shares for v in methods],
                  lambda row: row["budget"] == tune_budget and row["share"] in tune_shares, save)
    (out / "compare.md").write_text(markdown(results, measure.full_loss))
    plot(results, measure.full_loss, out / "compare.png", title=f"{Path(loaded.model_id).name}: emulator zero-shot loss on {len(held_out)} held-out rows")
    return results


def _measure_rows(results: list[dict], inputs: Inputs, measure: Measure, emu: EmulatorConfig, grid: list[tuple[int, bool, str]],
                  tuned: Callable[[dict], bool], save: Callable[[], None]) -> None:
    """Fill ``results``: every (budget, sharing, method) of ``grid`` zero-shot first (cheap),
    then the tuning runs of the rows ``tuned`` picks (expensive); ``save`` after every row."""
    specs = []
    for keep, share, variant in grid:
        spec, build = inputs.plan(_config(emu, variant, keep, share))
        results.append({**_describe(spec, variant, build), **measure(spec, tune=False)})
        specs.append(spec)
        log.info("%s", results[-1])
        save()
    for row, spec in zip(results, specs):
        if tuned(row):
            row.update(measure(spec, tune=True))
            log.info("%s", row)
            save()


def _describe(spec, variant: str, build_seconds: float) -> dict:
    """A comparison row's description of an emulator: budget, sharing, kept layers, depth, build
    time, and for search its final divergence and accepted steps."""
    row = {"budget": len(spec.kept), "share": spec.share, "method": variant, "kept": list(spec.kept), "depth": len(spec.layer_map()),
           "build_seconds": round(build_seconds, 2)}
    if "steps" in spec.selection:
        row.update(divergence=spec.selection["steps"][-1]["divergence"], search_steps=len(spec.selection["steps"]) - 1)
    return row


class Measure:
    """Held-out losses of an emulator (zero-shot, and tuned with its plug-in); methods often
    agree, so an emulator already measured (same layer sequence) is not measured again."""

    def __init__(self, model, untuned: dict, held_out, train_set, pad: int, train: TrainConfig, progress: bool, dtype: torch.dtype) -> None:
        self.model, self.held_out, self.train_set, self.pad, self.train, self.progress = model, held_out, train_set, pad, train, progress
        self.dtype = dtype
        self.untuned = {k: v.clone() for k, v in untuned.items()}
        self.full_loss = self.score(model, "full model")
        self.measured: dict[tuple, dict] = {}

    def score(self, m, name: str) -> float:
        return evaluate(m, self.held_out, self.pad, batch_size=8, progress=self.progress, desc=name, dtype=self.dtype)["loss"]

    def __call__(self, spec, *, tune: bool) -> dict:
        sequence = layer_sequence(spec)
        if sequence in self.measured and (not tune or "plugin_loss" in self.measured[sequence]):
            return self.measured[sequence]
        emulator = build_emulator(self.model, spec)
        name = f"{spec.method} k={len(spec.kept)} share={spec.share}"
        scores = {"emulator_loss": self.score(emulator.model, name)}
        if tune:
            report = train_adapters(emulator, self.train_set, self.pad, self.train, progress=self.progress, dtype=self.dtype)
            scores["emulator_tuned_loss"] = self.score(emulator.model, name + " tuned")
            plug_in(self.model, emulator.adapter_state())
            scores["plugin_loss"] = self.score(self.model, name + " plug-in")
            plug_in(self.model, self.untuned)  # the next emulator starts from the original model
            scores["tune_seconds"] = round(report.seconds, 1)
        self.measured[sequence] = scores
        return scores


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
    with figure(path, figsize=(7, 4.5)) as (_, ax):
        for variant in dict.fromkeys(r["method"] for r in rows):
            for share in dict.fromkeys(r["share"] for r in rows):
                points = sorted((r["budget"], r["emulator_loss"]) for r in rows if r["method"] == variant and r["share"] == share)
                if points:
                    ax.plot(*zip(*points), marker="o", linestyle="-" if not share else "--", label=f"{variant}{', shared' if share else ''}")
        ax.axhline(full_loss, color="black", linewidth=0.8, label="full model")
        ax.set_xlabel("kept middle layers (k)")
        ax.set_ylabel("held-out loss (response tokens)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
