"""lm-eval's stderr and the paired bootstrap, against hand-computed values and an independent loop."""

from __future__ import annotations

import math
import random

import pytest

from fed_crash.evaluation.stats import mean_stderr, paired_bootstrap


def test_mean_stderr_is_lm_evals_sample_std_over_sqrt_n():
    # [1, 0, 1, 1]: mean 0.75, sample variance (3 * 0.0625 + 0.5625) / 3 = 0.25, std 0.5, stderr 0.5 / 2
    assert mean_stderr([1, 0, 1, 1]) == pytest.approx(0.25)
    assert mean_stderr([0.2, 0.2, 0.2]) == pytest.approx(0.0, abs=1e-12) and math.isnan(mean_stderr([1]))


def test_paired_bootstrap_degenerate_cases_and_an_independent_loop():
    assert paired_bootstrap([1] * 50, [1] * 50) | {} == {"difference": 0.0, "low": 0.0, "high": 0.0, "level": 0.95, "resamples": 10_000, "n": 50}
    always = paired_bootstrap([1] * 20, [0] * 20)
    assert (always["difference"], always["low"], always["high"]) == (1.0, 1.0, 1.0)
    rng = random.Random(1)
    a = [int(rng.random() < 0.6) for _ in range(300)]
    b = [x if rng.random() < 0.8 else 1 - x for x in a]  # mostly the same answers: pairing narrows the interval
    got = paired_bootstrap(a, b, resamples=4000, seed=3)
    # an independent percentile bootstrap with Python's random, and the unpaired spread for contrast
    diffs = [x - y for x, y in zip(a, b)]
    means = sorted(sum(diffs[rng.randrange(300)] for _ in range(300)) / 300 for _ in range(4000))
    assert got["difference"] == pytest.approx(sum(diffs) / 300)
    assert got["low"] == pytest.approx(means[100], abs=0.01) and got["high"] == pytest.approx(means[3899], abs=0.01)
    unpaired = 1.96 * math.sqrt(mean_stderr(a) ** 2 + mean_stderr(b) ** 2)
    assert got["high"] - got["low"] < 2 * unpaired
    with pytest.raises(ValueError, match="the same documents"):
        paired_bootstrap([1, 0], [1])
