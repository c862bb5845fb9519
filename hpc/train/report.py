"""What `hpc train` tells the person watching it, one line each: the studies of each split, every
validation next to the baselines and a finished run (stdout: what happened), a warning about empty
training data and why a run directory cannot continue with another model (stderr, with the progress
bar and errors).

    val_line(step, total, metrics, baselines, cfg.train, is_best, best, best_step)
    -> "val 160/320 samples | nmse_gap 0.993 | baselines: linear 0.194 (best), ... | 5.1x the best baseline | new best"
"""
from __future__ import annotations

import math

EMPTY_WARN = 0.5  # warn when more than this fraction of the sampled training slices holds no counts


def _num(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.4g}"


def _ids(ids: list[str], most: int = 6) -> str:
    return ", ".join(ids[:most]) + (f", ... ({len(ids)} in all)" if len(ids) > most else "")


def splits_line(splits: dict[str, list[str]]) -> str:
    """``studies: train 3 (s000, s001, s002) | val 1 (s003) | test 1 (s004)``."""
    return "studies: " + " | ".join(f"{name} {len(ids)} ({_ids(ids) or 'none'})" for name, ids in splits.items())


def empty_line(fraction: float, n: int, root: str) -> str | None:
    """The warning when most sampled training slices are all zeros, else None."""
    if fraction <= EMPTY_WARN:
        return None
    return (f"{100 * fraction:.0f}% of {n} training slices sampled across {root} hold no counts (all zeros): "
            "the network would mostly learn to output zeros; check the data (`hpc inspect DATASET --png`)")


def val_line(step: int, total: int, metrics: dict, baselines: dict, train_cfg, is_best: bool, best: float,
             best_step: int) -> str:
    """One line per validation: the model's in-gap NMSE, the baselines' beside it (the best marked)
    and the ratio to the best, then the best metric's standing."""
    parts = [f"val {step}/{total} samples", f"nmse_gap {_num(metrics.get('nmse_gap'))}"]
    scored = {n: m.get("nmse_gap") for n, m in (baselines or {}).items()}
    finite = {n: v for n, v in scored.items() if v is not None and math.isfinite(v)}
    model = metrics.get("nmse_gap")
    if finite:
        top = min(finite, key=finite.get)
        parts.append("baselines: " + ", ".join(f"{n} {_num(v)}" + (" (best)" if n == top else "")
                                               for n, v in scored.items()))
        if model is not None and math.isfinite(model) and finite[top] > 0:
            ratio = model / finite[top]
            parts.append(f"{ratio:.2f}x the best baseline" + (" (better)" if ratio < 1 else " (worse)"))
    elif model is None or not math.isfinite(model):
        parts.append("no gap pixels in the validation slices: gap metrics undefined, nothing chosen from them")
    key = train_cfg.best_metric
    if key != "nmse_gap":
        parts.append(f"{key} {_num(metrics.get(key))}")
    parts.append(f"new best {key}" if is_best else
                 f"best {key} {_num(best)} at {best_step}" if best_step >= 0 else f"no best yet ({key} undefined)")
    return " | ".join(parts)


def finished_line(run_dir: str, step: int, train_cfg, best: float, best_step: int, checkpoint: str) -> str:
    best_text = f"best {train_cfg.best_metric} {_num(best)} at {best_step}" if best_step >= 0 else "no best yet"
    return (f"{run_dir}: already finished ({step} of train.samples={train_cfg.samples} samples; {best_text}; "
            f"newest checkpoint {checkpoint}); nothing to do. Raise train.samples to train on, or choose "
            "another train.run_dir for a new run")


def model_differences(saved: dict, current: dict) -> list[str]:
    """``model.base=4 -> 16``-style differences of the config sections that shape the network."""
    out = []
    for section, keys in (("model", None), ("data", ("context",)), ("train", ("ema",))):
        old, new = saved.get(section, {}), current.get(section, {})
        for k in keys or sorted(set(old) | set(new)):
            if old.get(k) != new.get(k):
                out.append(f"{section}.{k}={old.get(k)} in the run, {new.get(k)} now")
    return out
