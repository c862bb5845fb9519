"""The `hpc` command: one entry point, one verb per pipeline stage.

Each verb lives in its own module, which defines ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only for the verb that runs, so `hpc convert --help` never imports torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
import warnings

from hpc import __version__
from hpc.errors import HpcError, HpcWarning

# verb -> (module, one-line help). The module's docstring is the verb's description/example.
VERBS: dict[str, tuple[str, str]] = {
    "convert": ("hpc.convert.convert", "raw / Interfile sinograms -> chunked HDF5 shards (MPI-parallel)"),
    "inspect": ("hpc.inspect", "summary of a dataset, shard, checkpoint or run dir (--png to look)"),
    "simulate": ("hpc.simulate.simulate", "synthetic PET studies (attenuation, randoms, lesions, dead blocks)"),
    "train": ("hpc.train.train", "train a sinogram-repair UNet (1 process, 1 GPU or many nodes)"),
    "predict": ("hpc.repair.predict", "repair sinograms with a checkpoint, written in the source format"),
    "export": ("hpc.repair.export", "export a checkpoint to TorchScript / ONNX"),
    "evaluate": ("hpc.evaluate.evaluate", "a checkpoint vs reproject/interpolation, measured + noise-free + images"),
    "submit": ("hpc.launch.submit", "submit one training job to Slurm (submitit)"),
    "sweep": ("hpc.launch.sweep", "hyperparameter sweep as a Slurm job array; `sweep status DIR`"),
    "sbatch": ("hpc.launch.sbatch", "render an sbatch template (dgx, pyxis, singularity, plain)"),
    "env": ("hpc.launch.rankenv", "the rank/world/rendezvous this process resolves (run it like the job)"),
    "demo": ("hpc.demo", "the whole pipeline on synthetic PET data, in minutes on a CPU"),
}


def _top_parser() -> argparse.ArgumentParser:
    epilog = "verbs:\n" + "\n".join(f"  {v:<9} {h}" for v, (_, h) in VERBS.items())
    epilog += "\n\n`hpc VERB --help` shows each verb's options and an example."
    p = argparse.ArgumentParser(
        prog="hpc", description=__doc__.splitlines()[0], epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"hpc {__version__}")
    p.add_argument("verb", choices=list(VERBS), metavar="VERB", help="one of: " + ", ".join(VERBS))
    return p


def build_parser(verb: str):
    """Import the verb's module and build its parser. Returns (parser, module)."""
    module_name, help_line = VERBS[verb]
    module = importlib.import_module(module_name)
    doc = textwrap.dedent(module.__doc__ or help_line).strip()
    parser = argparse.ArgumentParser(
        prog=f"hpc {verb}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    module.add_arguments(parser)
    return parser, module


def _one_line_warnings(verb: str) -> None:
    """HpcWarnings print as one line, `hpc VERB: warning: ...`; other warnings as Python shows them."""
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, HpcWarning):
            print(f"hpc {verb}: warning: {message}", file=file or sys.stderr, flush=True)
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        _top_parser().parse_args(argv or ["--help"])
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        _top_parser().parse_args([verb])  # prints the valid verbs, exits 2
    parser, module = build_parser(verb)
    args = parser.parse_args(rest)
    _one_line_warnings(verb)
    try:
        return int(module.run(args) or 0)
    except HpcError as exc:
        print(f"hpc {verb}: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"hpc {verb}: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
