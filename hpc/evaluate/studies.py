"""Where `hpc evaluate`'s studies come from: files (--study), an `hpc simulate` directory
(--simulation: its held-out test studies, noise-free truth and known lesions) or a converted
dataset (--dataset: the checkpoint's split). Each is a :class:`Study`: its slice layout and a way to
open its readers by role (input, target, mask, and the truth files when known).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hpc.data.index import config_split
from hpc.errors import InputError
from hpc.io.headers import read_header
from hpc.io.interfile import read_bounded
from hpc.io.shards import STUDY_ID, TRUTH, Dataset, ShardArray
from hpc.io.sinogram import SinogramReader
from hpc.io.spec import SinogramSpec
from hpc.repair.files import study_layout
from hpc.repair.inference import Repairer


@dataclass
class Study:
    id: str
    layout: SinogramSpec  # slice layout of the gapped input: windows and compatibility checks
    open: Callable[[], dict]  # -> {role: reader}: input, target, mask (+ expected, randoms, mult)
    lesions: list[dict] = field(default_factory=list)  # known lesions (simulations)


def _readers(specs: dict[str, SinogramSpec]) -> dict:
    return {role: SinogramReader(sp) for role, sp in specs.items()}


def open_study(paths: list[str], truth: dict[str, str] | None = None, sid: str = "",
               lesions: list[dict] | None = None) -> Study:
    """A gapped acquisition, its target, its gap mask (+ truth files by role), as files."""
    specs = dict(zip(("input", "target", "mask"), (read_header(p) for p in paths), strict=True))
    specs.update({role: read_header(p) for role, p in (truth or {}).items()})
    inp = specs["input"]
    for other in specs.values():
        if (other.num_slices, other.slice_shape) != (inp.num_slices, inp.slice_shape):
            raise InputError(f"{other.source}: {other.num_slices}x{other.views}x{other.bins} does not match "
                             f"{inp.source} ({inp.num_slices}x{inp.views}x{inp.bins})")
    return Study(sid or Path(paths[1]).name.split(".")[0], inp, lambda: _readers(specs), lesions or [])


def parse_study_args(items: list[str]) -> tuple[list[str], dict[str, str]]:
    """--study INPUT TARGET MASK [role=FILE ...] -> (three paths, {role: path})."""
    if len(items) < 3 or any("=" in p for p in items[:3]):
        raise InputError(f"--study {' '.join(items)}: expected INPUT TARGET MASK [expected=F randoms=F mult=F]")
    truth = {}
    for item in items[3:]:
        role, _, path = item.partition("=")
        if role not in TRUTH or not path:
            raise InputError(f"--study: {item!r}: extra files are ROLE=FILE with ROLE in {', '.join(TRUTH)}")
        truth[role] = path
    return items[:3], truth


def simulation_studies(root: str | Path, ids: list[str] | None = None) -> list[Study]:
    """Studies of an `hpc simulate` directory: ``ids``, else its held-out test-variant studies, else all."""
    root = Path(root)
    chosen, _ = _chosen(root, ids)
    out = []
    for r in chosen:
        files = r["files"]
        if not {"gaps", "mask"} <= set(files):
            raise InputError(f"{root}: study {r['id']} has no gaps (simulate with --dead-blocks)")
        truth = {role: str(root / files[role]) for role in TRUTH if role in files}
        out.append(open_study([str(root / files[k]) for k in ("gaps", "target", "mask")], truth, r["id"],
                              r.get("lesions", [])))
    return out


def _chosen(root: Path, ids: list[str] | None) -> tuple[list[dict], dict]:
    """The records of ``ids``, else the held-out test-variant studies, else all (one line if any is missing)."""
    records, doc = _simulation_records(root / "studies.json")
    test = [r for r in records if r.get("variant") == "test"]
    chosen = [r for r in records if r["id"] in ids] if ids else (test or records)
    missing = sorted(set(ids or []) - {r["id"] for r in chosen})
    if missing or not chosen:
        raise InputError(f"{root}: no studies {missing or ''} (have {', '.join(r['id'] for r in records)})")
    return chosen, doc


def _simulation_records(path: Path) -> tuple[list[dict], dict]:
    """studies.json's records, checked (ids are plain names (they name the panels written under -o:
    ``../x`` must not write outside it), files a role -> relative file name map), and the whole document."""

    if not path.exists():
        raise InputError(f"{path.parent}: not an hpc simulate directory (no studies.json)")
    text = read_bounded(path, "studies.json", 64 << 20)  # a FIFO or /dev/zero must not hang it
    try:
        doc = json.loads(text)
        records = doc["studies"]
        if not isinstance(records, list):
            raise ValueError("'studies' is not a list")
        for r in records:
            if not (isinstance(r["id"], str) and STUDY_ID.fullmatch(r["id"]) and r["id"] not in (".", "..")):
                raise ValueError(f"study id {r['id']!r} is not a plain name (letters, digits, . _ -)")
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in r["files"].items()):
                raise ValueError(f"study {r['id']}: files must map roles to file names")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{path}: malformed studies.json ({exc})") from None
    return records, doc


def dataset_studies(rep: Repairer, root: str, split: str) -> list[Study]:
    """The checkpoint's own ``split`` of a converted dataset (studies with a stored gap mask); the
    input is the stored paired acquisition when there is one, else the target with its gaps zeroed."""

    ds = Dataset.open(root)
    ids = [s.id for s in ds.studies]
    chosen = ids if split == "all" else config_split(ids, rep.cfg.data, split)
    if not chosen:
        raise InputError(f"{root}: the checkpoint's {split!r} split has no studies")
    out = []
    for info in (ds.study(i) for i in chosen):
        if not info.has_mask:
            raise InputError(f"{root}: study {info.id} has no stored gap mask (hpc convert --mask)")
        names = {"input": "input" if info.has_input else "target", "target": "target", "mask": "mask",
                 **{r: r for r in info.truth}}
        out.append(Study(info.id, study_layout(ds, info),
                         lambda info=info, names=names: {k: ShardArray(info, n) for k, n in names.items()}))
    return out


def tune_studies(rep: Repairer, tune_on: str, tune_study: list[list[str]] | None, files: object, simulation: str | None,
                 dataset: str | None) -> list[Study]:
    """`hpc evaluate`'s validation studies (hpc.evaluate.tuning): --tune-on ids of the --simulation
    directory, a split (val, train) or ids of the --dataset; --tune-study files with --study."""
    ids = [s.strip() for s in tune_on.split(",") if s.strip()]
    if tune_study and not files:
        raise InputError("--tune-study goes with --study; with --simulation or --dataset use --tune-on")
    if ids and files:
        raise InputError("--tune-on goes with --simulation or --dataset; with --study use --tune-study")
    if tune_study:
        return [open_study(*parse_study_args(items)) for items in tune_study]
    if not ids:
        return []
    if simulation:
        return simulation_studies(simulation, ids)
    if len(ids) == 1 and ids[0] in ("val", "train"):
        return dataset_studies(rep, str(dataset), ids[0])
    chosen = [s for s in dataset_studies(rep, str(dataset), "all") if s.id in ids]
    missing = sorted(set(ids) - {s.id for s in chosen})
    if missing:
        raise InputError(f"--tune-on: {dataset} has no studies {', '.join(missing)}")
    return chosen


def low_dose_studies(root: str | Path, ids: list[str] | None = None) -> list[tuple[Study, float]]:
    """(study, dose) of an `hpc simulate --low-dose F` directory for `hpc evaluate --task denoise`:
    ``ids``, else its held-out test-variant studies; roles input (the low-dose twin), target (the full
    scan), expected, and mult / randoms when written."""
    root = Path(root)
    chosen, doc = _chosen(root, ids)
    dose = doc.get("low_dose") or 0.0
    out = []
    for r in chosen:
        files = r["files"]
        if not (isinstance(dose, float) and 0 < dose < 1 and "input" in files and "expected" in files):
            raise InputError(f"{root}: study {r['id']} has no low-dose twin with its noise-free counts (simulate "
                             "with --low-dose F and without --no-truth)")
        specs = {role: read_header(root / files[key]) for role, key in
                 (("input", "input"), ("target", "target"), ("expected", "expected"), ("mult", "mult"),
                  ("randoms", "randoms")) if key in files}
        out.append((Study(r["id"], specs["input"], lambda specs=specs: _readers(specs), r.get("lesions", [])), dose))
    return out
