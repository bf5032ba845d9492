"""Low-rank client updates: a client that trained LoRA on its adapters uploads the update as
factors (:func:`fed_crash.core.train.lora_factors`), r * (rows + cols) numbers per adapted weight
instead of the dense adapters. Before aggregation the server rebuilds the dense adapters from
the ones it sent that round, so every strategy (and DP, robust aggregation, the plug-in) sees
the same dense updates as without LoRA."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from fed_crash.core.emulator import AdapterError
from fed_crash.core.train import LORA_U, LORA_V


def expand_low_rank(sent: ArrayRecord, factors: ArrayRecord) -> ArrayRecord:
    """Dense adapters ``W_sent + U @ V`` for every factored weight, ``W_sent`` for the rest
    (weights LoRA does not adapt cannot change). Factors that name no sent weight, come
    unpaired or do not fit its shape raise :class:`AdapterError`."""
    keys = {key[len(LORA_U):] for key in factors if key.startswith(LORA_U)}
    paired = {prefix + k for k in keys for prefix in (LORA_U, LORA_V)}
    problems = sorted((set(factors) ^ paired) | {LORA_U + k for k in keys - set(sent)})
    if problems:
        raise AdapterError(f"low-rank update tensor {problems[0]!r} is unpaired or names no adapter weight that was sent")
    out = {}
    for key, array in sent.items():
        dense = array.numpy()
        if key in keys:
            u, v = factors[LORA_U + key].numpy(), factors[LORA_V + key].numpy()
            if u.ndim != 2 or v.ndim != 2 or (u.shape[0], v.shape[1]) != dense.shape or u.shape[1] != v.shape[0]:
                raise AdapterError(f"low-rank factors {u.shape} @ {v.shape} do not fit adapter weight {key!r} {dense.shape}")
            dense = dense + (u @ v).astype(dense.dtype, copy=False)
        out[key] = Array(np.ascontiguousarray(dense))
    return ArrayRecord(out)
