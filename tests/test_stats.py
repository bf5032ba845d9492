"""lm-eval's stderr, the paired bootstrap and the interval over seeds, against hand-computed values and an independent loop."""

from __future__ import annotations

import math
import random

import pytest

from fed_crash.evaluation.stats import gain_retention, mean_stderr, paired_bootstrap, seeds_interval


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


def test_gain_retention_hand_computed_and_against_an_independent_loop():
    # zero-shot right on 2 of 8, ceiling on 6 (gain 4/8), tuned on 4 (gain 2/8): half the gain kept
    zs, ceiling, tuned = [1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]
    got = gain_retention(tuned, zs, ceiling, resamples=2000)
    assert (got["retention"], got["gain"], got["ceiling_gain"], got["n"]) == (0.5, 0.25, 0.5, 8)
    assert got["low"] <= 0.5 <= got["high"]
    assert gain_retention(ceiling, zs, ceiling)["retention"] == 1.0 and gain_retention(zs, zs, ceiling)["retention"] == 0.0
    assert gain_retention(tuned, zs, zs)["retention"] is None  # no ceiling gain: nothing to retain
    rng = random.Random(7)
    z = [int(rng.random() < 0.3) for _ in range(400)]
    c = [1 if rng.random() < 0.5 else x for x in z]
    t = [cx if rng.random() < 0.6 else zx for zx, cx in zip(z, c)]
    got = gain_retention(t, z, c, resamples=4000, seed=5)
    ratios = []
    for _ in range(4000):  # the same percentile bootstrap with Python's random
        idx = [rng.randrange(400) for _ in range(400)]
        ratios.append(sum(t[i] - z[i] for i in idx) / sum(c[i] - z[i] for i in idx))
    ratios.sort()
    assert got["retention"] == pytest.approx(sum(a - b for a, b in zip(t, z)) / sum(a - b for a, b in zip(c, z)))
    assert got["low"] == pytest.approx(ratios[100], abs=0.03) and got["high"] == pytest.approx(ratios[3899], abs=0.03)
    assert got["undefined"] == 0.0
    with pytest.raises(ValueError, match="the same documents"):
        gain_retention([1], [1, 0], [1, 1])


def test_seeds_interval_is_the_student_t_interval_of_the_mean():
    # [1, 2, 3]: mean 2, sd 1, stderr 1/sqrt(3); t(0.975, 2 df) = 4.302653 (a t table): half-width 2.484138
    got = seeds_interval([1, 2, 3])
    assert (got["mean"], got["n"], got["level"]) == (2.0, 3, 0.95)
    assert got["low"] == pytest.approx(2 - 2.484138, abs=1e-6) and got["high"] == pytest.approx(2 + 2.484138, abs=1e-6)
    # [0.02, 0.04]: mean 0.03, sd 0.014142, stderr 0.01; t(0.95, 1 df) = 6.313752 for a 90% interval
    got = seeds_interval([0.02, 0.04], level=0.90)
    assert (got["low"], got["high"]) == (pytest.approx(0.03 - 0.06313752), pytest.approx(0.03 + 0.06313752))
    one = seeds_interval([0.5])
    assert one["mean"] == 0.5 and math.isnan(one["low"]) and math.isnan(one["high"])
    with pytest.raises(ValueError, match="at least one value"):
        seeds_interval([])
