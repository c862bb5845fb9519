"""The fair protocol's arithmetic: scores of what users get, paired bootstrap intervals with known answers."""
from __future__ import annotations

import numpy as np
import pytest

from hpc.evaluate.protocol import as_written, compare, paired_bootstrap, verdict


def test_as_written_rounds_and_clips_like_the_file_type():
    out = np.array([-3.2, 0.5, 1.5, 2.49, 70000.0])
    np.testing.assert_array_equal(as_written(out, "<u2"), [0.0, 0.0, 2.0, 2.0, 65535.0])  # half to even
    np.testing.assert_array_equal(as_written(out, "i2"), [-3.0, 0.0, 2.0, 2.0, 32767.0])
    np.testing.assert_array_equal(as_written(np.array([1 / 3]), "f4"), [np.float32(1 / 3)])


def test_a_constant_ratio_has_a_zero_width_interval():
    b = np.array([3.0, 1.0, 7.0, 2.0])
    ratio, lo, hi = paired_bootstrap(2 * b, b)
    assert ratio == lo == hi == pytest.approx(2.0)


def test_ratio_is_of_pooled_sums_not_a_mean_of_ratios():
    a, b = np.array([1.0, 9.0]), np.array([2.0, 3.0])  # per-study ratios 0.5 and 3; pooled 10 / 5
    assert paired_bootstrap(a, b)[0] == pytest.approx(2.0)


def test_interval_covers_the_true_ratio_about_95_percent_of_the_time():
    """Studies whose method-A error is 0.9 x method B's times independent zero-mean noise: the
    true pooled ratio is 0.9; over 200 simulated evaluations of 30 studies the 95 % interval must
    contain it about 95 % of the time (percentile bootstrap: a little less at small n)."""
    rng = np.random.default_rng(7)
    hits = 0
    for k in range(200):
        b = rng.gamma(4.0, 1.0, size=30)
        a = 0.9 * b * (1 + rng.uniform(-0.3, 0.3, size=30))
        _, lo, hi = paired_bootstrap(a, b, samples=1000, seed=k)
        hits += lo <= 0.9 <= hi
    assert 0.88 <= hits / 200 <= 0.99


def test_verdicts_follow_the_interval():
    assert verdict(0.8, 0.95) == "wins" and verdict(1.02, 1.3) == "loses" and verdict(0.9, 1.1) == "ties"
    assert verdict(float("nan"), 1.0) == "n/a"


def test_compare_uses_the_best_baseline_as_reference():
    rng = np.random.default_rng(0)
    per_study = {}
    for s in range(12):
        e = rng.uniform(50, 100)
        base = rng.uniform(1, 2)
        per_study[f"s{s}"] = {"linear": (3 * base, e), "reproject": (base, e), "unet": (0.8 * base, e)}
    res = compare(per_study, learned={"unet"})
    assert res["reference"] == "reproject" and res["best"] == "unet" and res["studies"] == 12
    m = res["methods"]
    assert m["unet"]["ratio"] == pytest.approx(0.8) and m["unet"]["verdict"] == "wins"
    assert m["linear"]["verdict"] == "loses" and m["reproject"]["verdict"] == "reference"
    with pytest.raises(ValueError, match="one length"):
        paired_bootstrap(np.ones(3), np.ones(4))
