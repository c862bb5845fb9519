"""The fair protocol's arithmetic (docs/EVALUATION.md, "Judging fairly"): what users get, and how sure
a comparison is.

- ``as_written``: a repair as `hpc predict` writes it (rounded and clipped to the file's integer type);
  every method is scored that way, so no method is judged on a float its users never see.
- ``paired_bootstrap``: the 95 % interval of the ratio of two methods' pooled NMSE over the same
  studies, resampling studies with replacement (a study's pixels are not independent: the study is
  the unit). Pooled NMSE is sum(squared error) / sum(reference energy) over the resampled studies.
- ``verdict``: "wins" / "loses" only where the interval excludes 1, else "ties".
- ``compare``: every method's ratio to the best baseline (the strongest method without learning on
  these studies), with its interval and verdict.

    lo, hi = paired_bootstrap(sse_a, sse_b, energy)[1:]     # per-study arrays (S,)
"""
from __future__ import annotations

import numpy as np

BOOTSTRAP_SAMPLES = 4000
LEVEL = 0.95


def as_written(out: np.ndarray, dtype: np.dtype | str) -> np.ndarray:
    """``out`` as a file of ``dtype`` stores it: integers rounded half to even (numpy's rint, as
    `hpc predict` writes them) and clipped to the type's range; floats cast to it. float64 back."""
    dt = np.dtype(dtype)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return np.clip(np.rint(out), info.min, info.max).astype(np.float64)
    return np.asarray(out, dt).astype(np.float64)


def paired_bootstrap(sse_a: np.ndarray, sse_b: np.ndarray, energy: np.ndarray | None = None,
                     samples: int = BOOTSTRAP_SAMPLES, level: float = LEVEL, seed: int = 0
                     ) -> tuple[float, float, float]:
    """(ratio, low, high): pooled NMSE of A over pooled NMSE of B on the same studies, and the
    percentile interval of that ratio over ``samples`` resamplings of the studies. Per-study
    sums (S,): squared errors of A and B, the reference's energy (the same for both: it cancels
    in the ratio, and is accepted for clarity only)."""
    a, b = np.asarray(sse_a, np.float64), np.asarray(sse_b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_bootstrap: per-study arrays of one length, got {a.shape} and {b.shape}")
    if energy is not None and np.shape(energy) != a.shape:
        raise ValueError(f"paired_bootstrap: energy {np.shape(energy)} does not match {a.shape}")
    ratio = a.sum() / b.sum() if b.sum() > 0 else np.nan
    idx = np.random.default_rng(seed).integers(0, a.size, size=(samples, a.size))  # (samples, S)
    num, den = a[idx].sum(1), b[idx].sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = num / den
    r = r[np.isfinite(r)]
    if r.size == 0:
        return float(ratio), np.nan, np.nan
    tail = (1 - level) / 2
    return float(ratio), float(np.quantile(r, tail)), float(np.quantile(r, 1 - tail))


def verdict(low: float, high: float) -> str:
    """A ratio interval (method / reference, lower is better) read as a result."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return "n/a"
    if high < 1:
        return "wins"
    if low > 1:
        return "loses"
    return "ties"


def compare(per_study: dict[str, dict[str, tuple[float, float]]], learned: set[str], seed: int = 0) -> dict:
    """Every method against the best baseline. ``per_study``: {study: {method: (sse, energy)}} for one
    metric (e.g. in-gap vs noise-free); ``learned``: methods that were trained (the rest are
    baselines). Returns {"reference": best baseline, "methods": {method: {"nmse", "ratio", "low",
    "high", "verdict"}}, "best": the method with the lowest pooled NMSE}."""
    studies = sorted(per_study)
    methods = sorted(set.intersection(*(set(per_study[s]) for s in studies))) if studies else []
    sse = {m: np.array([per_study[s][m][0] for s in studies]) for m in methods}
    energy = np.array([per_study[s][methods[0]][1] for s in studies]) if methods else np.zeros(0)
    nmse = {m: float(sse[m].sum() / energy.sum()) if energy.sum() > 0 else np.nan for m in methods}
    baselines = [m for m in methods if m not in learned]
    ref = min(baselines, key=lambda m: nmse[m]) if baselines else None
    out = {}
    for m in methods:
        ratio, lo, hi = paired_bootstrap(sse[m], sse[ref], energy, seed=seed) if ref else (np.nan,) * 3
        out[m] = {"nmse": nmse[m], "ratio": ratio, "low": lo, "high": hi,
                  "verdict": "reference" if m == ref else verdict(lo, hi)}
    best = min(methods, key=lambda m: nmse[m]) if methods else None
    return {"reference": ref, "studies": len(studies), "methods": out, "best": best}
