"""Uncertainty of multiple-choice scores: lm-eval's standard error of a mean, the paired
bootstrap interval of the difference between two models scored on the same documents, and the
Student-t interval of a mean over a few repeats (seeds)."""

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


def seeds_interval(values: Sequence[float], *, level: float = 0.95) -> dict:
    """Mean over repeats (seeds) and its Student-t interval, ``mean ± t(n - 1) * sd / sqrt(n)``.
    The documents' bootstrap cannot see the spread between seeds; this can, and with three
    seeds it is wide by design (t = 4.30 for 95%): it says how far one seed's gain generalises
    to the next seed. NaN bounds below two values."""
    from scipy import stats  # here, not at the top: scipy.stats costs the clients' import a second

    n = len(values)
    if not n:
        raise ValueError("an interval over repeats needs at least one value")
    mean = sum(values) / n
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * mean_stderr(values) if n > 1 else float("nan")
    return {"mean": mean, "low": mean - half, "high": mean + half, "level": level, "n": n}


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


def gain_retention(tuned: Sequence[float], zero_shot: Sequence[float], ceiling: Sequence[float], *, resamples: int = 10_000,
                   level: float = 0.95, seed: int = 0) -> dict:
    """How much of the ceiling's gain a tuned model keeps, ``(tuned - zero_shot) / (ceiling -
    zero_shot)`` of the means over the same documents (OFT's anchor: 6.5 of 7.4 points, 0.88),
    with a percentile bootstrap interval: each resample draws documents with replacement and keeps
    all three models' scores on them. The ratio is undefined where the ceiling gains nothing; those
    resamples count as undefined (``undefined``, a share); a point estimate without a ceiling
    gain is None, and so is the interval when no resample has one."""
    if not len(tuned) == len(zero_shot) == len(ceiling) or not len(tuned):
        raise ValueError(f"gain retention needs the same documents, got {len(tuned)}, {len(zero_shot)} and {len(ceiling)}")
    t, z, c = (np.asarray(x, dtype=np.float64) for x in (tuned, zero_shot, ceiling))
    gain, room = t - z, c - z
    rng = np.random.default_rng(seed)
    ratios = []
    for done in range(0, resamples, 1000):
        idx = rng.integers(0, len(t), size=(min(1000, resamples - done), len(t)))
        num, den = gain[idx].mean(axis=1), room[idx].mean(axis=1)
        ratios.append(np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan))
    ratios = np.concatenate(ratios)
    defined = ratios[~np.isnan(ratios)]
    tail = (1 - level) / 2
    low, high = (float(q) for q in np.quantile(defined, [tail, 1 - tail])) if len(defined) else (None, None)
    return {"retention": float(gain.mean() / room.mean()) if room.mean() > 0 else None, "low": low, "high": high,
            "gain": float(gain.mean()), "ceiling_gain": float(room.mean()), "undefined": float(np.isnan(ratios).mean()),
            "level": level, "resamples": resamples, "n": len(t)}
