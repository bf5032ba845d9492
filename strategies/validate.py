"""Validate a client's reply before it may touch the aggregate.

A reply must hold exactly the adapter tensors the server sent (same keys, shapes, dtypes),
finite values, an update (reply minus what was sent) no larger than the configured L2 bound,
and a positive finite aggregation weight. Anything else is rejected with a reason naming the
tensor or metric, and left out of the round: one broken or malicious client must neither crash
the server (Flower's own consistency check raises on mismatched replies) nor poison the mean.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict

ARRAYS_KEY = "arrays"  # Flower's default ArrayRecord / MetricRecord names in train replies
METRICS_KEY = "metrics"


def update_norm(arrays: ArrayRecord, sent: ArrayRecord) -> float:
    """L2 norm of ``arrays - sent`` over all tensors as one vector, in float64, summed in key
    order (not record order, which a resumed run may have another of)."""
    total = 0.0
    for key in sorted(sent):
        diff = arrays[key].numpy().astype(np.float64) - sent[key].numpy().astype(np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def check_reply(content: RecordDict, sent: ArrayRecord, *, weight_key: str, max_update_norm: float = 0.0) -> tuple[str | None, float | None]:
    """``(reason, None)`` for a reply to reject, ``(None, update norm)`` for one to aggregate."""
    arrays = [(name, r) for name, r in content.items() if isinstance(r, ArrayRecord)]
    metrics = [(name, r) for name, r in content.items() if isinstance(r, MetricRecord)]
    if [name for name, _ in arrays] != [ARRAYS_KEY] or [name for name, _ in metrics] != [METRICS_KEY]:
        return (f"expected one ArrayRecord {ARRAYS_KEY!r} and one MetricRecord {METRICS_KEY!r}, got arrays {[n for n, _ in arrays]} "
                f"and metrics {[n for n, _ in metrics]}"), None
    reply = arrays[0][1]
    missing, extra = sorted(set(sent) - set(reply)), sorted(set(reply) - set(sent))
    if missing:
        return f"{len(missing)} adapter tensor(s) missing, e.g. {missing[0]!r}", None
    if extra:
        return f"{len(extra)} tensor(s) that were not sent, e.g. {extra[0]!r}", None
    for key, want in sent.items():
        got = reply[key]
        if tuple(got.shape) != tuple(want.shape):
            return f"tensor {key!r} has shape {tuple(got.shape)}, expected {tuple(want.shape)}", None
        if got.dtype != want.dtype:
            return f"tensor {key!r} has dtype {got.dtype}, expected {want.dtype}", None
        if not np.isfinite(got.numpy()).all():
            return f"tensor {key!r} holds NaN or infinite values", None
    weight = metrics[0][1].get(weight_key)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) or weight <= 0:
        return f"metric {weight_key!r} (the aggregation weight) must be a positive number, got {weight!r}", None
    norm = update_norm(reply, sent)
    if max_update_norm > 0 and norm > max_update_norm:
        return f"update norm {norm:.4g} exceeds max-update-norm {max_update_norm:g}", None
    return None, norm
