"""The model owner's and data owner's steps, end to end: plan an emulator from calibration data,
and run local offsite-tuning with the four-model report.

These are what the CLI and the Flower server call; they hold no logic of their own beyond
wiring the library's pieces together in the order offsite-tuning needs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from fed_crash.core.artifacts import save_adapters, save_emulator
from fed_crash.selection.cka import cka_matrix, layer_features
from fed_crash.config import DataConfig, EmulatorConfig, TrainConfig, TuneSizes, to_dict
from fed_crash.core.data import Tokenized, batches, load_instructions, pad_id, split_rows, tokenize
from fed_crash.core.emulator import EmulatorSpec, build_emulator, make_spec, plug_in
from fed_crash.core.models import get_layers, load_model, state_hash
from fed_crash.selection.search import Probe, search_kept
from fed_crash.core.train import evaluate, train_adapters

log = logging.getLogger(__name__)


def layer_similarity(
    model, tokenizer, rows: Sequence[dict[str, str]], data: DataConfig, emu: EmulatorConfig, *, progress: bool = True,
    cache: Path | None = None,
) -> torch.Tensor:
    """L x L linear CKA of the decoder layers' pooled outputs on ``rows`` (prompt + response,
    formatted like training data).

    With ``cache`` (a folder) the matrix is kept in ``<cache>/similarity/<key>.safetensors``,
    keyed by everything it depends on (the model's weights, the token ids, the pooling settings,
    the batch size, the device type), so an experiment whose cells share model and calibration
    rows runs CKA once instead of once per cell."""
    examples = tokenize(rows, tokenizer, max_length=data.max_length, template=data.template)
    path = cache / "similarity" / f"{_similarity_key(model, examples, emu)}.safetensors" if cache is not None else None
    if path is not None and path.is_file():
        log.info("CKA similarity of %d calibration rows from the cache %s", len(examples), path)
        return load_file(str(path))["similarity"]
    feats = layer_features(
        model, batches(examples, emu.calib_batch_size, pad_id(tokenizer)), pooling=emu.pooling, skip_first=emu.skip_first,
        outlier=emu.outlier_norm, progress=progress,
    )
    similarity = cka_matrix(feats).float()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")  # concurrent runs never read a half-written file
        save_file({"similarity": similarity.contiguous()}, str(partial))
        partial.replace(path)
    return similarity


def _similarity_key(model, examples: Sequence[Tokenized], emu: EmulatorConfig) -> str:
    digest = hashlib.sha256(state_hash(model.state_dict()).encode())
    settings = [emu.pooling, emu.skip_first, emu.outlier_norm, emu.calib_batch_size, next(model.parameters()).device.type]
    digest.update(json.dumps(settings).encode())
    for example in examples:
        digest.update(json.dumps([example.input_ids, example.labels]).encode())
    return digest.hexdigest()[:32]


def needs_calibration(emu: EmulatorConfig) -> bool:
    """CRaSh (CKA) and search (divergence, starting from CRaSh) run the model on calibration rows."""
    return emu.method in ("crash", "search")


def calibration_rows(source: str, data: DataConfig, n: int) -> list[dict[str, str]]:
    """A seeded sample of ``n`` rows of ``source`` for CRaSh's CKA calibration."""
    rows = load_instructions(source, skip_malformed=data.skip_malformed)
    return split_rows(rows, {"calibration": n}, seed=data.seed)["calibration"]


def search_probe(model, tokenizer, calibration: Sequence[dict[str, str]], data: DataConfig, emu: EmulatorConfig) -> Probe:
    """The divergence probe of search, on the first ``search_samples`` calibration rows."""
    examples = tokenize(calibration[: emu.search_samples], tokenizer, max_length=data.max_length, template=data.template)
    # rows of similar length share a batch, so little of every evaluation is spent on padding;
    # batches of at most 4 rows let a candidate that cannot win stop early (Probe.__call__)
    examples = sorted(examples, key=lambda e: len(e.input_ids), reverse=True)
    return Probe(model, batches(examples, min(emu.calib_batch_size, 4), pad_id(tokenizer)), emu.divergence)  # type: ignore[arg-type]


def plan_emulator(
    model, tokenizer, calibration: Sequence[dict[str, str]], data: DataConfig, emu: EmulatorConfig, *, progress: bool = True,
    similarity: torch.Tensor | None = None, probe: Probe | None = None, cache: Path | None = None,
) -> tuple[EmulatorSpec, torch.Tensor | None]:
    """The emulator spec for ``model``. CRaSh clusters the layers by CKA on ``calibration``;
    search starts from the uniform and CRaSh sets and lowers the divergence from the full model
    on the first ``search_samples`` calibration rows (:mod:`fed_crash.selection.search`). A caller that
    plans several emulators on the same rows passes the ``similarity`` and ``probe`` it has;
    ``cache`` keeps the CKA matrix between runs (:func:`layer_similarity`)."""
    selection: dict = {}
    if needs_calibration(emu):
        if not calibration:
            raise ValueError(f"method {emu.method!r} needs calibration samples (calib_samples > 0)")
        if similarity is None:
            similarity = layer_similarity(model, tokenizer, calibration, data, emu, progress=progress, cache=cache)
        selection = {"calibration_samples": len(calibration), "pooling": emu.pooling, "skip_first": emu.skip_first, "outlier_norm": emu.outlier_norm}

    def spec_of(method: str) -> EmulatorSpec:
        return make_spec(
            method,
            len(get_layers(model)),
            bottom=emu.bottom,
            top=emu.top,
            keep=emu.keep or None,
            keep_ratio=None if emu.keep else emu.keep_ratio,
            share=emu.share,
            edge_fill=emu.edge_fill,  # type: ignore[arg-type]
            similarity=similarity,
        )

    if emu.method != "search":
        return replace(spec_of(emu.method), selection=selection), similarity
    start = time.perf_counter()
    probe = probe or search_probe(model, tokenizer, calibration, data, emu)
    before = probe.evaluations
    spec, steps = search_kept(probe, [spec_of("uniform"), spec_of("crash")], max_evaluations=emu.search_evaluations)
    selection.update(divergence=probe.divergence, search_samples=sum(len(b["input_ids"]) for b in probe.batches),
                     evaluations=probe.evaluations - before, search_seconds=round(time.perf_counter() - start, 1), steps=steps)
    log.info("search: kept %s after %d evaluations, %s %.4f -> %.4f", list(spec.kept), probe.evaluations - before, probe.divergence,
             steps[0]["divergence"], steps[-1]["divergence"])
    return replace(spec, selection=selection), similarity


def tune(
    model_source: str,
    data: DataConfig,
    emu: EmulatorConfig,
    train: TrainConfig,
    sizes: TuneSizes,
    out_dir: str | Path,
    *,
    cache_dir: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Local offsite-tuning: build the emulator, train its adapters, plug them in, and report
    held-out loss and perplexity of full zero-shot, emulator zero-shot, emulator fine-tuned and
    plug-in. Writes the emulator folder, tuned adapters and ``report.json`` to ``out_dir``."""
    out = Path(out_dir)
    start = time.perf_counter()
    loaded = load_model(model_source, cache_dir=cache_dir, device=device)
    model, tokenizer = loaded.model, loaded.tokenizer
    rows = load_instructions(data.data, skip_malformed=data.skip_malformed)
    calib_n = emu.calib_samples if needs_calibration(emu) else 0
    parts = split_rows(rows, {"eval": sizes.eval_examples, "calibration": calib_n, "train": sizes.train_examples}, seed=data.seed)
    spec, similarity = plan_emulator(model, tokenizer, parts["calibration"], data, emu, progress=progress)
    log.info("%s", spec.describe())
    save_emulator(out / "emulator", model, tokenizer, spec, source_id=loaded.model_id, similarity=similarity)
    emulator = build_emulator(model, spec)

    pad = pad_id(tokenizer)
    held_out = tokenize(parts["eval"], tokenizer, max_length=data.max_length, template=data.template)
    train_set = tokenize(parts["train"], tokenizer, max_length=data.max_length, template=data.template)

    def score(m, name: str) -> dict:
        return evaluate(m, held_out, pad, batch_size=sizes.eval_batch_size, progress=progress, desc=name)

    report = {"full_zero_shot": score(model, "full zero-shot"), "emulator_zero_shot": score(emulator.model, "emulator zero-shot")}
    report["training"] = train_adapters(emulator, train_set, pad, train, progress=progress)
    report["emulator_fine_tuned"] = score(emulator.model, "emulator fine-tuned")
    adapters = emulator.adapter_state()
    save_adapters(out / "adapters.safetensors", adapters, {"spec": spec.to_dict(), "source_id": loaded.model_id})
    plug_in(model, adapters)
    report["plug_in"] = score(model, "plug-in")
    report.update(
        spec=spec.to_dict(),
        layer_map=spec.layer_map(),
        model=loaded.model_id,
        config={"data": to_dict(data), "emulator": to_dict(emu), "train": to_dict(train), "sizes": to_dict(sizes)},
        seconds=time.perf_counter() - start,
    )
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report
