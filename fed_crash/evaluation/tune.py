"""Local offsite-tuning (``fed-crash tune``): build the emulator, train its adapters, plug them
in, and report held-out loss of the four models OFT compares (full zero-shot, emulator
zero-shot, emulator fine-tuned, plug-in)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from fed_crash.config import DataConfig, EmulatorConfig, TrainConfig, TuneSizes, to_dict
from fed_crash.core.artifacts import save_adapters, save_emulator
from fed_crash.core.data import load_instructions, pad_id, split_rows, tokenize
from fed_crash.core.emulator import build_emulator, plug_in
from fed_crash.core.models import load_model
from fed_crash.core.train import evaluate, train_adapters
from fed_crash.selection import needs_calibration
from fed_crash.core.precision import dtype_name
from fed_crash.selection.plan import plan_emulator

log = logging.getLogger(__name__)


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
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Local offsite-tuning: build the emulator, train its adapters, plug them in, and report
    held-out loss and perplexity of full zero-shot, emulator zero-shot, emulator fine-tuned and
    plug-in. Writes the emulator folder, tuned adapters and ``report.json`` to ``out_dir``.
    ``dtype``: the compute dtype of every forward pass (:mod:`fed_crash.core.precision`)."""
    out = Path(out_dir)
    start = time.perf_counter()
    loaded = load_model(model_source, cache_dir=cache_dir, device=device)
    model, tokenizer = loaded.model, loaded.tokenizer
    rows = load_instructions(data.data, skip_malformed=data.skip_malformed)
    calib_n = emu.calib_samples if needs_calibration(emu.method) else 0
    parts = split_rows(rows, {"eval": sizes.eval_examples, "calibration": calib_n, "train": sizes.train_examples}, seed=data.seed)
    spec, similarity = plan_emulator(model, tokenizer, parts["calibration"], data, emu, progress=progress, dtype=dtype)
    log.info("%s", spec.describe())
    save_emulator(out / "emulator", model, tokenizer, spec, source_id=loaded.model_id, similarity=similarity, compute_dtype=dtype_name(dtype))
    emulator = build_emulator(model, spec)

    pad = pad_id(tokenizer)
    held_out = tokenize(parts["eval"], tokenizer, max_length=data.max_length, template=data.template)
    train_set = tokenize(parts["train"], tokenizer, max_length=data.max_length, template=data.template)

    def score(m, name: str) -> dict:
        return evaluate(m, held_out, pad, batch_size=sizes.eval_batch_size, progress=progress, desc=name, dtype=dtype)

    report = {"full_zero_shot": score(model, "full zero-shot"), "emulator_zero_shot": score(emulator.model, "emulator zero-shot")}
    report["training"] = train_adapters(emulator, train_set, pad, train, progress=progress, dtype=dtype).summary()
    report["emulator_fine_tuned"] = score(emulator.model, "emulator fine-tuned")
    adapters = emulator.adapter_state()
    save_adapters(out / "adapters.safetensors", adapters, {"spec": spec.to_dict(), "source_id": loaded.model_id})
    plug_in(model, adapters)
    report["plug_in"] = score(model, "plug-in")
    report.update(
        spec=spec.to_dict(),
        layer_map=spec.layer_map(),
        model=loaded.model_id,
        compute_dtype=dtype_name(dtype),
        config={"data": to_dict(data), "emulator": to_dict(emu), "train": to_dict(train), "sizes": to_dict(sizes)},
        seconds=time.perf_counter() - start,
    )
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report
