"""The repair library's inputs and outputs: a sinogram file or a converted dataset's studies in,
repaired files out (hpc.repair.inference does the network's repair itself, on slices it is handed;
hpc.repair.methods a baseline's). Every function takes a ``Method``: a checkpoint's Repairer (``unet``,
``hybrid``) or a registered baseline (hpc.repair.methods.BaselineMethod, no checkpoint).

    path, counts = predict_file(rep, spec, Path("fixed.s.hdr"), "source", mask, batch=16)
    for job in file_jobs(rep, ["a.s.hdr", "b.s.hdr"], "out/", masks=["a_gaps.s.hdr", "b_gaps.s.hdr"]):
        read, mask, close = job.open()
        predict_study(rep, job.spec, read, job.output, job.fmt, mask, batch=16); close()

Every input is checked and every output refused that would land on an input, a mask or another
output (`check_outputs`) before anything is written; nothing appears at an output unless every
slice was written.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from hpc.data.index import config_split
from hpc.errors import InputError, OutputError
from hpc.io.atomic import FileOwners
from hpc.io.h5write import RepairedH5Writer
from hpc.io.headers import read_header
from hpc.io.shards import Dataset, ShardArray
from hpc.io.sinogram import SinogramReader, SinogramWriter, writer_paths
from hpc.io.spec import SinogramSpec, raw_spec
from hpc.progress import Progress
from hpc.repair.denoise import DenoiseMethod, denoise_study
from hpc.repair.inference import AUX, Counts, MaskFn, Repairer, needs_repair, repair, valid_fn
from hpc.repair.methods import (
    BaselineMethod,
    Method,
    check_method,
    describe,
    geometry_name,
    method_gaps,
    models_factors,
    needs_gaps,
    repair_baseline,
)


@dataclass(frozen=True)
class RawLayout:
    """How to read headerless raw files: (T, S, V, X) or (S, V, X), the data's and the masks' dtypes."""
    shape: tuple[int, ...]
    dtype: str
    mask_dtype: str = "uint8"
    endian: str = "little"
    offset: int = 0  # bytes before the data (masks: always 0)


def open_input(path: str | Path, raw: RawLayout | None = None, mask: bool = False) -> SinogramSpec:
    """An Interfile header, or a raw file of layout ``raw`` (``mask``: read with its mask dtype)."""
    if raw is None:
        return read_header(path)
    if mask:
        return raw_spec(path, raw.shape, raw.mask_dtype, raw.endian, 0, flag="--mask-dtype")
    return raw_spec(path, raw.shape, raw.dtype, raw.endian, raw.offset)


def predict_file(rep: Method, spec: SinogramSpec, output: Path, fmt: str, mask: MaskFn | None,
                 batch: int, quiet: bool = False, aux: dict[str, SinogramSpec] | None = None) -> tuple[Path, Counts]:
    """Repair one input file into ``output`` (same format as the source, or HDF5); ``aux``: the
    study's mult / randoms files (data.fill=reproject models them)."""
    readers = {k: SinogramReader(s) for k, s in (aux or {}).items()}
    try:
        with SinogramReader(spec) as reader:
            return predict_study(rep, spec, reader.read, output, fmt, mask, batch, quiet,
                                 {k: r.read for k, r in readers.items()})
    finally:
        for r in readers.values():
            r.close()


def predict_study(rep: Method, spec: SinogramSpec, read: Callable[[int, int], np.ndarray], output: Path,
                  fmt: str, mask: MaskFn | None, batch: int, quiet: bool = False,
                  aux: dict[str, Callable[[int, int], np.ndarray]] | None = None) -> tuple[Path, Counts]:
    """Repair the slices ``read`` gives (layout ``spec``) into ``output``; nothing appears there
    unless every slice was written."""
    check_outputs([Job(spec, lambda: None, output, fmt)], [spec.source, spec.data_path])
    comment = f"repaired by hpc predict with {describe(rep)}"
    valid = valid_fn(spec, geometry_name(rep, spec))
    todo = needs_repair(spec, mask, valid)  # progress counts the slices that need the model
    writer = RepairedH5Writer(spec, output, comment) if fmt == "h5" else SinogramWriter(spec, output, comment)
    run = denoise_study if isinstance(rep, DenoiseMethod) else repair_baseline if isinstance(rep, BaselineMethod) \
        else repair
    with writer, Progress(int(todo.sum()), "slices", f"predict {output.name}", enabled=not quiet) as bar:
        counts = run(rep, spec, read, mask, writer.write, batch, bar, aux, valid, todo)
        return writer.commit(), counts


@dataclass
class Job:
    """One study to repair: its slice layout, how to open its input and gaps, where it goes."""
    spec: SinogramSpec
    open: Callable[[], tuple[Callable[[int, int], np.ndarray], MaskFn | None, Callable[[], None]]]  # read, mask, close
    output: Path
    fmt: str
    aux: dict[str, Callable[[], object]] = field(default_factory=dict)  # role -> opener of a reader (.read, .close)


def output_files(job: Job) -> list[Path]:
    """Every file a job writes (a header and its data file, or one HDF5/raw file)."""
    return [job.output] if job.fmt == "h5" else writer_paths(job.spec, job.output)


def check_outputs(jobs: list[Job], protected: list[Path], inside: Path | None = None) -> None:
    """Refuse, before anything is written, an output file that is (resolves to, or is a hard link
    of) an input, a mask or another job's output, or lies inside the directory ``inside`` (a
    converted dataset). No option overrides this: repairing must never destroy its own input."""
    owners = FileOwners()
    for p in protected:
        owners.claim(p, f"the input {p}")
    banned = os.path.realpath(inside) if inside is not None else None
    for job in jobs:
        for out in output_files(job):
            if clash := owners.owner(out):
                raise OutputError(f"{out}: would overwrite {clash[0]} (both are {clash[1]}); choose another output")
            real = os.path.realpath(out)
            if banned is not None and (real == banned or real.startswith(banned + os.sep)):
                raise OutputError(f"{out}: inside the input dataset {inside}; write the repaired studies elsewhere")
            owners.claim(out, f"the output {out} of {job.spec.source}")


def study_layout(ds, info) -> SinogramSpec:
    """A layout-only spec of a converted study (windows and checks need the slice layout, never a
    data path): TOF bins, segments and axial counts from the manifest."""
    return SinogramSpec(ds.root, np.dtype(info.dtype), 0, info.tof_bins, info.segments, info.axial_counts,
                        *info.slice_shape, header_path=ds.root / "manifest.json", ring_diffs=info.ring_diffs,
                        scanner=info.scanner)


def _checkpoint(rep: Method) -> Repairer | None:
    return rep.checkpoint if isinstance(rep, BaselineMethod | DenoiseMethod) else rep


def dataset_jobs(rep: Method, root: str | Path, output: str | Path, studies: list[str] | None = None,
                 split: str | None = None, dead_blocks: list[int] | None = None, scanner: str = "") -> list[Job]:
    """Every study (or those in ``studies``, or the checkpoint's ``split``) of a converted dataset,
    repaired from its stored ``input`` (paired) or ``target``, gaps from its stored ``mask`` or the
    ``dead_blocks``; each written as ``output/<study>_repaired.h5``. Its stored mult / randoms go
    to the methods that model them. Denoising (``hpc predict --dose``): the same scan (a paired
    dataset's ``input`` is its low-dose twin), no gaps, ``output/<study>_denoised.h5``."""

    ds, ckpt = Dataset.open(root), _checkpoint(rep)
    denoise = isinstance(rep, DenoiseMethod)  # --dead-blocks: refused by method_gaps below
    ids = [s.id for s in ds.studies]
    if studies is not None:
        chosen = studies
        missing = sorted(set(chosen) - set(ids))
        if missing:
            raise InputError(f"{ds.root}: no study {', '.join(missing)} (have {', '.join(ids)})")
    elif split:
        if ckpt is None:
            raise InputError(f"--split {split}: the split is a checkpoint's; give --checkpoint or --studies")
        chosen = config_split(ids, ckpt.cfg.data, split)
    else:
        chosen = ids
    jobs, geometry = [], {}  # dead-block masks, one per slice layout
    for info in map(ds.study, chosen):
        layout = study_layout(ds, info)
        check_method(rep, layout)
        if not info.has_mask and dead_blocks is None and needs_gaps(rep):
            raise InputError(f"{ds.root}: study {info.id} has no stored gap mask; give --dead-blocks IDS")
        key = (layout.tof_bins, layout.segments, layout.axial_counts, layout.slice_shape)
        if dead_blocks is not None and key not in geometry:  # checked before anything is written
            geometry[key] = method_gaps(rep, layout, dead_blocks=dead_blocks, scanner=scanner)

        opener = partial(_open_study, info, geometry.get(key), not denoise)
        aux = {r: partial(ShardArray, info, r) for r in AUX if r in info.truth} if models_factors(rep) else {}
        name = f"{info.id}_{'denoised' if denoise else 'repaired'}.h5"
        jobs.append(Job(layout, opener, Path(output) / name, "h5", aux))
    check_outputs(jobs, [], inside=ds.root)
    return jobs


def _open_study(info, blocks: MaskFn | None, gaps: bool = True):
    """(read, mask, close) of a converted study: its stored ``input`` (paired) or ``target``; gaps
    from ``blocks`` (dead blocks), else its stored ``mask`` (unless not ``gaps``), else none."""

    src = ShardArray(info, "input" if info.has_input else "target")
    if blocks is not None:
        mask, stored = blocks, None
    elif info.has_mask and gaps:
        stored = ShardArray(info, "mask")
        mask = lambda a, b: stored.read(a, b).astype(np.float32)  # noqa: E731  (uint8 0/1 or float fractions)
    else:
        mask, stored = None, None

    def close():
        src.close()
        if stored is not None:
            stored.close()

    return src.read, mask, close


def file_jobs(rep: Method, inputs: list[str], output: str | Path, masks: list[str] | None = None,
              fmt: str = "source", raw: RawLayout | None = None, dead_blocks: list[int] | None = None,
              scanner: str = "", aux: dict[str, list[str]] | None = None) -> list[Job]:
    """One input -> the file ``output``; several -> ``output/<input's name>`` each. ``masks``: one
    gap-mask file per input (else ``dead_blocks``, else no gaps); ``aux``: {mult|randoms: one file per
    input} for the methods that model them (data.fill=reproject, the reproject baseline)."""
    masks, aux = masks or [], {k: v for k, v in (aux or {}).items() if v}
    for flag, files in (("mask", masks), *aux.items()):
        if files and len(files) != len(inputs):
            what = "mask(s)" if flag == "mask" else "file(s)"
            raise InputError(f"--{flag}: {len(files)} {what} for {len(inputs)} input(s); give one per input")
    jobs, protected = [], []
    for i, path in enumerate(inputs):
        spec = open_input(path, raw)
        check_method(rep, spec)
        mask_spec = open_input(masks[i], raw, mask=True) if masks else None
        mask = method_gaps(rep, spec, mask_spec, dead_blocks, scanner)  # every input checked before any write
        out = Path(output) if len(inputs) == 1 else Path(output) / Path(path).name
        extra = {}
        for role, files in aux.items():
            other = open_input(files[i], raw)
            if (other.num_slices, other.slice_shape) != (spec.num_slices, spec.slice_shape):
                raise InputError(f"{other.source}: {role} does not match {spec.source} in shape")
            extra[role] = partial(SinogramReader, other)
            protected += [other.source, other.data_path]  # never overwritten either

        def opener(spec=spec, mask=mask):
            reader = SinogramReader(spec)
            return reader.read, mask, reader.close

        jobs.append(Job(spec, opener, out, fmt, extra))
        protected += [spec.source, spec.data_path] + ([mask_spec.source, mask_spec.data_path] if mask_spec else [])
    seen: dict[Path, str] = {}
    for job in jobs:
        if job.output in seen:
            raise InputError(f"{seen[job.output]} and {job.spec.source} both write {job.output}; "
                             "give inputs distinct file names")
        seen[job.output] = str(job.spec.source)
    check_outputs(jobs, protected)
    return jobs
