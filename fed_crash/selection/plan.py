"""Planning an emulator on a model: the CKA matrix (cached between runs), the search probe,
and :func:`plan_emulator`, which runs the registered method (:mod:`fed_crash.selection`) with
them. The CLI, the Flower server and the comparison call it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from fed_crash.config import DataConfig, EmulatorConfig
from fed_crash.core.data import Tokenized, batches, load_instructions, pad_id, split_rows, tokenize
from fed_crash.core.emulator import EmulatorSpec
from fed_crash.core.models import get_layers, state_hash
from fed_crash.core.precision import dtype_name
from fed_crash.selection import Selection, method
from fed_crash.selection.cka import cka_matrix, layer_features
from fed_crash.selection.search import Probe

log = logging.getLogger(__name__)


def layer_similarity(
    model, tokenizer, rows: Sequence[dict[str, str]], data: DataConfig, emu: EmulatorConfig, *, progress: bool = True,
    cache: Path | None = None, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """L x L linear CKA of the decoder layers' pooled outputs on ``rows`` (prompt + response,
    formatted like training data).

    With ``cache`` (a folder) the matrix is kept in ``<cache>/similarity/<key>.safetensors``,
    keyed by everything it depends on (the model's weights, the token ids, the pooling settings,
    the batch size, the device type), so an experiment whose cells share model and calibration
    rows runs CKA once instead of once per cell."""
    examples = tokenize(rows, tokenizer, max_length=data.max_length, template=data.template)
    path = cache / "similarity" / f"{_similarity_key(model, examples, emu, dtype)}.safetensors" if cache is not None else None
    if path is not None and path.is_file():
        log.info("CKA similarity of %d calibration rows from the cache %s", len(examples), path)
        return load_file(str(path))["similarity"]
    feats = layer_features(
        model, batches(examples, emu.calib_batch_size, pad_id(tokenizer)), pooling=emu.pooling, skip_first=emu.skip_first,
        outlier=emu.outlier_norm, progress=progress, dtype=dtype,
    )
    similarity = cka_matrix(feats).float()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")  # concurrent runs never read a half-written file
        save_file({"similarity": similarity.contiguous()}, str(partial))
        partial.replace(path)
    return similarity


def _similarity_key(model, examples: Sequence[Tokenized], emu: EmulatorConfig, dtype: torch.dtype) -> str:
    digest = hashlib.sha256(state_hash(model.state_dict()).encode())
    settings = [emu.pooling, emu.skip_first, emu.outlier_norm, emu.calib_batch_size, next(model.parameters()).device.type]
    settings += [dtype_name(dtype)] if dtype != torch.float32 else []  # fp32 keys as before: caches from earlier runs stay valid
    digest.update(json.dumps(settings).encode())
    for example in examples:
        digest.update(json.dumps([example.input_ids, example.labels]).encode())
    return digest.hexdigest()[:32]


def calibration_rows(source: str, data: DataConfig, n: int) -> list[dict[str, str]]:
    """A seeded sample of ``n`` rows of ``source`` for CRaSh's CKA calibration."""
    rows = load_instructions(source, skip_malformed=data.skip_malformed)
    return split_rows(rows, {"calibration": n}, seed=data.seed)["calibration"]


def search_probe(model, tokenizer, calibration: Sequence[dict[str, str]], data: DataConfig, emu: EmulatorConfig,
                 dtype: torch.dtype = torch.float32) -> Probe:
    """The divergence probe of search, on the first ``search_samples`` calibration rows."""
    examples = tokenize(calibration[: emu.search_samples], tokenizer, max_length=data.max_length, template=data.template)
    # rows of similar length share a batch, so little of every evaluation is spent on padding;
    # batches of at most 4 rows let a candidate that cannot win stop early (Probe.__call__)
    examples = sorted(examples, key=lambda e: len(e.input_ids), reverse=True)
    return Probe(model, batches(examples, min(emu.calib_batch_size, 4), pad_id(tokenizer)), emu.divergence, dtype)  # type: ignore[arg-type]


def plan_emulator(
    model, tokenizer, calibration: Sequence[dict[str, str]], data: DataConfig, emu: EmulatorConfig, *, progress: bool = True,
    similarity: torch.Tensor | None = None, probe: Probe | None = None, cache: Path | None = None, dtype: torch.dtype = torch.float32,
) -> tuple[EmulatorSpec, torch.Tensor | None]:
    """The emulator spec of method ``emu.method`` for ``model`` (:mod:`fed_crash.selection`),
    and the CKA matrix when one was computed. CRaSh clusters the layers by CKA on
    ``calibration``; search lowers the divergence from the full model on its first
    ``search_samples`` rows. A caller that plans several emulators on the same rows passes the
    ``similarity`` and ``probe`` it has; ``cache`` keeps the CKA matrix between runs
    (:func:`layer_similarity`). ``dtype``: the compute dtype of CKA's and search's forward passes.
    The manifest's ``spec.selection`` records how the set was chosen."""
    chosen = method(emu.method)
    if chosen.needs_calibration and not calibration:
        raise ValueError(f"method {emu.method!r} needs calibration samples (calib_samples > 0)")
    def cka() -> torch.Tensor:
        return similarity if similarity is not None else layer_similarity(model, tokenizer, calibration, data, emu, progress=progress, cache=cache, dtype=dtype)

    def divergence_probe() -> Probe:
        return probe if probe is not None else search_probe(model, tokenizer, calibration, data, emu, dtype)

    selection = Selection(len(get_layers(model)), emu, similarity_fn=cka, probe_fn=divergence_probe)
    if not chosen.needs_calibration:
        return chosen.select(selection), None
    similarity = selection.similarity()  # before the method runs, so that search_seconds times the search alone
    spec = chosen.select(selection)
    calibrated = {"calibration_samples": len(calibration), "pooling": emu.pooling, "skip_first": emu.skip_first, "outlier_norm": emu.outlier_norm,
                  "compute_dtype": dtype_name(dtype)}
    return replace(spec, selection={**calibrated, **spec.selection}), similarity
