"""Full-state checkpoints: atomic, keep last K + best, safe to load, resumable with fallback.

Layout: ``run_dir/checkpoints/step-XXXXXXXX.pt`` (XXXXXXXX = samples seen) and ``best.pt``.
A checkpoint is a dict of tensors and plain containers only, so ``torch.load(weights_only=True)``
reads it (nothing is unpickled). The keys are defined once, in hpc.train.state (KEYS, TrainState).

    ckpt = Checkpointer(run_dir, keep=3)
    ckpt.save(state, step, is_best)           # rank 0 only
    state, path = ckpt.resume()               # newest readable one; corrupt ones are reported
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

import hpc
from hpc.errors import HpcError, InputError
from hpc.io.atomic import atomic_open, sweep_stale
from hpc.io.regular import open_regular

PATTERN = re.compile(r"^step-(\d{8,})\.pt$")


class NonFiniteError(HpcError):
    """Training produced NaN/inf (loss or weights): the run stops with exit 2, nothing written."""


REQUIRED = ("model", "optim", "step", "epoch", "config")


def code_version() -> dict:
    """The package version and the git commit of its source tree ("" outside a git checkout, e.g.
    installed into a venv that happens to sit inside some other repository)."""
    root = Path(hpc.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        return {"version": hpc.__version__, "git": ""}
    try:
        r = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                           text=True, timeout=10)
        sha = r.stdout.strip() if r.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        sha = ""
    return {"version": hpc.__version__, "git": sha}


# ---------------------------------------------------------------- RNG states as tensors/lists
def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch CPU, CUDA) as weights_only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------- integrity
def payload_digest(obj) -> str:
    """SHA-256 of a checkpoint's content: every tensor's dtype, shape and bytes and every plain
    value, walked in a fixed order (dict keys sorted). Stored under ``checksum`` by `save` and
    recomputed by `load`: a bit flipped on disk that still unzips and unpickles is caught."""
    h = hashlib.sha256()

    def walk(x) -> None:
        if torch.is_tensor(x):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(f"D{len(x)}".encode())
            for k in sorted(x, key=lambda k: (type(k).__name__, str(k))):
                h.update(f"K{type(k).__name__}:{k}".encode())
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                walk(v)
        else:
            h.update(f"V{type(x).__name__}:{x!r}".encode())

    walk(obj)
    return h.hexdigest()


def nonfinite(state: dict, keys: tuple[str, ...] = ("model",)) -> str | None:
    """Name of the first tensor under ``keys`` holding NaN or inf (``model.net.0.weight``), or None."""
    def walk(x, name: str) -> str | None:
        if torch.is_tensor(x):
            return name if x.is_floating_point() and not bool(torch.isfinite(x).all()) else None
        items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, (list, tuple)) else ()
        return next((bad for k, v in items if (bad := walk(v, f"{name}.{k}"))), None)

    return next((bad for key in keys if key in state and (bad := walk(state[key], key))), None)


# ---------------------------------------------------------------- files
def load(path: str | Path) -> dict:
    """A checkpoint's state dict (weights_only, on the CPU); InputError naming the file if unreadable,
    not an hpc checkpoint, or its content differs from the checksum it was written with."""
    path = Path(path)
    fd = open_regular(path, "checkpoint")  # a FIFO or device: one line, never a hang
    try:
        # torch warns about what it meets in a damaged file ("Detected pickle protocol 4") before
        # failing on it: the failure is our one line, its warnings are not
        with os.fdopen(fd, "rb") as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(fh, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's own text advises weights_only=False: never do that
        raise InputError(f"{path}: refused: it holds Python objects, not only tensors and plain values "
                         "(unpickling them could run code); hpc loads weights only") from None
    except Exception as exc:  # truncated zip, bad pickle opcode, foreign object...
        raise InputError(f"{path}: not a readable checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else 'no detail'})") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED):
        missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
        raise InputError(f"{path}: not an hpc checkpoint (missing {', '.join(missing)})")
    want = state.pop("checksum", None)  # absent in checkpoints written before it existed
    if want is not None and payload_digest(state) != want:
        raise InputError(f"{path}: payload checksum mismatch (the file changed after it was written)")
    return state


def require_finite(state: dict, path: str | Path) -> dict:
    """``state``, or an InputError when its model weights hold NaN/inf (a diverged run)."""
    bad = nonfinite(state, ("model", "ema"))
    if bad is not None:
        raise InputError(f"{path}: weights are not finite ({bad} holds NaN or inf: the run diverged); "
                         "use an earlier checkpoint")
    return state


def usable(path: Path) -> dict | None:
    """The state of a checkpoint that loads, passes its checksum and has finite weights, else None."""
    try:
        return require_finite(load(path), path)
    except InputError:
        return None


def set_aside(path: Path) -> Path | None:
    """Rename an unreadable checkpoint to ``<name>.bad`` (``.bad-2``, ... if taken): evidence for a
    post-mortem, out of the rotation, never overwritten. None when it is gone already."""
    for k in range(1, 1000):
        dest = path.with_name(path.name + (".bad" if k == 1 else f".bad-{k}"))
        try:
            os.link(path, dest)  # never replaces an earlier .bad
        except FileExistsError:
            continue
        except FileNotFoundError:
            return None
        except OSError:  # no hard links on this filesystem
            if os.path.lexists(dest):
                continue
            with contextlib.suppress(OSError):
                os.rename(path, dest)
            return dest
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return dest
    return None


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep: int = 3):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.known: set[Path] = set()  # written by this process or loaded by resume: readable

    def _retire(self, path: Path, delete: bool) -> None:
        """Before ``path`` is replaced (or, with ``delete``, removed by the rotation): a file this
        process has not read or written is checked, and moved aside when it does not load."""
        if not os.path.lexists(path):
            return
        if path not in self.known and usable(path) is None:
            set_aside(path)
        elif delete:
            path.unlink(missing_ok=True)

    @property
    def best_path(self) -> Path:
        return self.dir / "best.pt"

    def path(self, step: int) -> Path:
        return self.dir / f"step-{step:08d}.pt"

    def list(self) -> list[Path]:
        """step-*.pt files, newest (most samples) first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := PATTERN.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def save(self, state: dict, step: int, is_best: bool = False) -> Path:
        """Write step-<step>.pt atomically (tmp -> fsync -> rename) with the checksum of its
        payload, copy it to best.pt when ``is_best``, then delete all but the newest ``keep`` step
        files. Weights or optimizer moments with NaN/inf are never written (NonFiniteError), so the
        file just written, always kept, is the newest finite checkpoint."""
        bad = nonfinite(state, ("model", "optim", "ema"))
        if bad is not None:
            raise NonFiniteError(f"{self.dir}: step {step}: {bad} holds NaN or inf; checkpoint not written "
                                 f"(newest finite: {self.list()[0].name if self.list() else 'none'})")
        target = self.path(step)
        self._retire(target, delete=False)  # an unreadable file of that name is evidence: never overwritten
        with atomic_open(target) as fh:
            torch.save({**state, "checksum": payload_digest(state)}, fh)
        self.known.add(target)
        if is_best:
            self._retire(self.best_path, delete=False)
            with atomic_open(self.best_path) as fh, open(target, "rb") as src:
                shutil.copyfileobj(src, fh, 8 << 20)
            self.known.add(self.best_path)
        for old in self.list()[self.keep:]:
            if old != target:  # after a fallback a higher-numbered file may sort before it
                self._retire(old, delete=True)
        return target

    def resume(self, report=None, main: bool = True) -> tuple[dict | None, Path | None]:
        """The newest checkpoint that loads, passes its checksum and has finite weights; each newer
        one that does not is reported (one line on stderr by default) and, by the ``main`` rank,
        renamed to ``<name>.bad`` (kept for a post-mortem, out of the rotation: never overwritten
        or deleted), also when none is usable and the run starts fresh. (None, None) then. The
        temporary files of a killed save are removed first (the run directory is locked)."""
        report = report or (lambda msg: print(f"hpc train: {msg}", file=sys.stderr, flush=True))
        if main:
            sweep_stale(self.dir)
        found = self.list()
        skipped, state, path = [], None, None
        for p in found:
            try:
                state, path = require_finite(load(p), p), p
                break
            except InputError as exc:
                report(f"skipping {exc}; trying the previous checkpoint")
                skipped.append(p)
        if main:
            for bad in skipped:
                set_aside(bad)
        if path is not None:
            self.known.add(path)
            return state, path
        if found:
            report(f"no usable checkpoint in {self.dir} ({len(found)} unreadable, moved aside as .bad): "
                   "starting fresh")
        return None, None


def describe(path: str | Path) -> str:
    """Summary of a checkpoint file, or of a run dir's checkpoints (for `hpc inspect`)."""
    path = Path(path)
    if path.is_dir():
        ck = Checkpointer(path)
        files = ck.list() + ([ck.best_path] if ck.best_path.exists() else [])
        lines, newest = [f"run dir {path}: {len(files)} checkpoint(s)"], None
        for p in files:
            try:
                s = load(p)
            except InputError as exc:
                lines.append(f"  {p.name}: UNREADABLE ({exc})")
                continue
            newest = newest or s
            metric = _metrics(s.get("metrics") or {})
            lines.append(f"  {p.name}: step {s['step']} epoch {s['epoch']}"
                         + (f"; {_validated(s)}: {metric}" if metric else ""))
        splits = ((newest or {}).get("data") or {}).get("splits")
        if splits:
            lines.append("  studies: " + " | ".join(f"{k} {', '.join(v) or '-'}" for k, v in splits.items()))
        return "\n".join(lines)
    state = load(path)
    cfg = state["config"]
    n_params = sum(t.numel() for t in state["model"].values() if torch.is_tensor(t))
    ema = state.get("ema")
    lines = [
        f"checkpoint {path} ({path.stat().st_size / 1e6:.1f} MB)",
        f"  step (samples seen): {state['step']}   epoch: {state['epoch']}",
        f"  model: {cfg['model']['name']} ({n_params:,} values in {len(state['model'])} tensors)"
        + (f"; runs its moving average (decay {ema['decay']}, {ema['updates']} steps)" if ema else ""),
        f"  optimizer: {cfg['optim']['name']} lr={cfg['optim']['lr']}   "
        f"scheduler: {cfg['optim']['scheduler']}",
        f"  ranks with RNG state: {len(state.get('rng', []))}",
        f"  code: hpc {state.get('version', '?')} git {state.get('git', '') or '?'}",
    ]
    if state.get("metrics"):
        lines.append(f"  {_validated(state)}: " + _metrics(state["metrics"]))
    splits = (state.get("data") or {}).get("splits")
    if splits:
        lines.append("  studies: " + " | ".join(f"{k} {', '.join(v) or '-'}" for k, v in splits.items()))
    return "\n".join(lines)


def _metrics(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, (int, float)) and v is not None else f"{k}={v}"
                     for k, v in metrics.items())


def _validated(state: dict) -> str:
    """Whose metrics a checkpoint holds: those of the last validation, which may be older than the
    checkpoint (checkpoint.every and train.val_every differ)."""
    at = (state.get("validation") or {}).get("step", -1)
    if at is None or at < 0:
        return "metrics (last validation)"
    return "metrics (this step's validation)" if at == state["step"] else f"metrics (last validation, at step {at})"
