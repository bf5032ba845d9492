"""Uncertainty of multiple-choice scores: lm-eval's standard error of a mean, and the paired
bootstrap interval of the difference between two models scored on the same documents."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def mean_stderr(values: Sequence[float]) -> float:
    """lm-eval's ``mean_stderr``: the sample standard deviation (n - 1) over sqrt(n); NaN below two values."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, resamples: int = 10_000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean of ``a - b`` over documents and its percentile bootstrap interval: documents are
    resampled with replacement ``resamples`` times, both models keeping their scores on each
    drawn document (the pairing removes the documents' own difficulty from the spread)."""
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired scores need the same documents, got {len(a)} and {len(b)}")
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.concatenate([diff[rng.integers(0, len(diff), size=(min(1000, resamples - done), len(diff)))].mean(axis=1)
                            for done in range(0, resamples, 1000)])
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return {"difference": float(diff.mean()), "low": float(low), "high": float(high), "level": level, "resamples": resamples, "n": len(diff)}
