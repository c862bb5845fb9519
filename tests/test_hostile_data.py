"""Issue 27, part 1: the last ways to lose data or get it silently wrong. Planted links are never
written through, unreadable checkpoints are kept as evidence, concurrent writers of one dataset
exclude each other, data sets of one file never overlap, and what used to be read quietly wrong
(repeated YAML keys, an edited manifest scale, a port that is not one, a shards/ that is a link) is
one line, exit 2, with every source byte-identical.

Real parts only: real files, links and FIFOs, real processes racing (forked, so the race starts in
milliseconds rather than after an interpreter start), the real CLI.
"""
from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hpc.cli import main
from hpc.io.sinogram import write_sinogram

from helpers import TINY, make_dataset, refuse, refuse_subprocess, snapshot


@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("train") / "ds", studies=3, views=16, bins=16, mask=True, counts=True)


def train_args(data: Path, run: Path, *overrides: str) -> list:
    return ["train", "--config", TINY, f"data.path={data}", f"train.run_dir={run}", *overrides]


# ---------------------------------------------------------------- 27.1: planted links
@pytest.mark.parametrize("planted", ["metrics.jsonl", "wandb"])
def test_run_files_are_never_written_through_a_planted_link(train_data, tmp_path, planted):
    """metrics.jsonl linked to a user's file got 3 JSON lines appended; a `wandb` link to a user's
    directory got W&B's run written into it. Now: one line naming the link, the victim untouched."""
    victim = tmp_path / "victim"
    if planted == "wandb":
        victim.mkdir()
        (victim / "notes.txt").write_text("mine\n")
    else:
        victim.write_text("mine\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / planted).symlink_to(victim)
    before = snapshot(victim)
    refuse_subprocess(train_args(train_data, run, "train.samples=8"), sources=[train_data], names=[run / planted],
                      words=["symbolic link"], env={"WANDB_MODE": "offline"}, timeout=300)
    assert snapshot(victim) == before and sorted(p.name for p in victim.parent.iterdir()) == ["run", "victim"]
    assert (run / planted).is_symlink() and not (run / "train.lock").exists()


# ---------------------------------------------------------------- 27.2: unreadable checkpoints are evidence
def _state(step: int) -> dict:
    return {"model": {"w": torch.full((4,), float(step))}, "optim": {}, "step": step, "epoch": 0, "config": {}}


def test_starting_fresh_sets_every_unreadable_checkpoint_aside(tmp_path):
    """With every checkpoint corrupted, the fresh run overwrote step-48 and step-64 in place and
    rotation deleted step-16: none of the evidence was left. Now each is `<name>.bad`, byte for byte."""
    from hpc.train.checkpoint import Checkpointer

    c = Checkpointer(tmp_path, keep=2)
    c.dir.mkdir(parents=True)
    junk = {step: f"damaged step {step}".encode() for step in (16, 48, 64)}
    for step, raw in junk.items():
        c.path(step).write_bytes(raw)
    reports = []
    assert c.resume(report=reports.append) == (None, None) and "starting fresh" in reports[-1]
    for step in (16, 32, 48, 64):
        c.save(_state(step), step)
    for step, raw in junk.items():
        assert c.path(step).with_name(c.path(step).name + ".bad").read_bytes() == raw
    assert [p.name for p in c.list()] == ["step-00000064.pt", "step-00000048.pt"]


def test_rotation_sets_an_unreadable_older_checkpoint_aside(tmp_path):
    """Resume reads only until a checkpoint loads: an older damaged one was never examined, and the
    rotation deleted it. Now it is checked before deletion and kept as `.bad`."""
    from hpc.train.checkpoint import Checkpointer

    c = Checkpointer(tmp_path, keep=2)
    c.save(_state(32), 32)
    c.path(16).write_bytes(b"damaged, never examined")
    resumed = Checkpointer(tmp_path, keep=2)
    assert resumed.resume()[1] == c.path(32)
    for step in (48, 64):
        resumed.save(_state(step), step)
    assert c.path(16).with_name("step-00000016.pt.bad").read_bytes() == b"damaged, never examined"
    assert not c.path(32).exists()  # readable and past the rotation: deleted as before


# ---------------------------------------------------------------- 27.3: writers of one dataset exclude each other
def _convert(sources: list[Path], out: Path, go, results) -> None:
    """A forked `hpc convert --overwrite`, started on ``go``; puts (exit code or the exception, stderr)."""
    go.wait()
    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(["convert", "--quiet", *map(str, sources), "-o", str(out), "--overwrite", "--shard-slices", "2",
                       "--workers", "1"])
        except BaseException as exc:  # noqa: BLE001  (a crash is what the test reports)
            rc = repr(exc)
    results.put((rc, err.getvalue()))


def _problems(out: Path) -> list[str]:
    from hpc.io.shards import Dataset, verify_shard

    try:
        ds = Dataset.open(out)
    except Exception as exc:  # noqa: BLE001
        return [repr(exc)]
    return [f"{sh.path.name}: {'missing' if not sh.path.exists() else verify_shard(sh.path)[1]}"
            for s in ds.studies for sh in s.shards if not sh.path.exists() or not verify_shard(sh.path)[0]]


def test_concurrent_overwrites_of_one_dataset_never_leave_it_broken(tmp_path):
    """Two `hpc convert ... --overwrite` into one dataset at once left, 2 rounds in 15, a "complete"
    dataset whose manifest listed a shard the other had deleted (or crashed on it). Now the dataset
    is locked: each round, one converts, the other is refused naming it (or runs after it), and the
    dataset always verifies. 20 rounds (measured on the old code: 5-6 broken rounds in 20)."""
    import hpc.convert.convert  # noqa: F401  (imported before forking: the children start at once)

    rng = np.random.default_rng(0)
    src = [write_sinogram(tmp_path / f"s{k}", rng.integers(0, 60, (1, 6, 8, 12)).astype("<u2")) for k in range(4)]
    before, out = snapshot(tmp_path), tmp_path / "race"
    ctx = multiprocessing.get_context("fork")
    for round_ in range(20):
        results, go = ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=_convert, args=(part, out, go, results)) for part in (src[:3], src[3:])]
        for p in procs:
            p.start()
        time.sleep(0.05)
        go.set()
        done = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        codes = sorted(rc for rc, _ in done)
        assert codes in ([0, 0], [0, 2]), f"round {round_}: {done}"
        assert all("another hpc convert" in err for rc, err in done if rc == 2), done
        assert _problems(out) == [], f"round {round_}: {_problems(out)} ({done})"
        assert not (out / ".hpc-convert.lock").exists()
    assert {k: v for k, v in snapshot(tmp_path).items() if "/race/" not in k} == before


# ---------------------------------------------------------------- 27.4: data sets of one file never overlap
SIEMENS = ("!INTERFILE:=\n!name of data file:=d.s\nnumber format:=unsigned integer\n!number of bytes per pixel:=2\n"
           "number of dimensions:=3\nmatrix size[1]:=4\nmatrix size[2]:=3\nmatrix size[3]:=2\n"
           "%segment table:={{2}}\nnumber of scan data types:=2\nscan data type description[1]:=prompts\n"
           "scan data type description[2]:=randoms\ndata offset in bytes[1]:={a}\ndata offset in bytes[2]:={b}\n"
           "!END OF INTERFILE:=\n")  # each data set 2 x 3 x 4 uint16 = 48 bytes


@pytest.mark.parametrize("a,b,size", [(0, 0, 48), (0, 24, 72), (24, 0, 72)], ids=["same", "overlap", "reversed"])
def test_overlapping_data_sets_are_refused(tmp_path, capsys, a, b, size):
    """Offsets [1] = [2] = 0 stored the prompts again as `delayed`; [2] inside [1]'s bytes passed
    because only the file's total size was checked."""
    h = tmp_path / "h.s.hdr"
    h.write_text(SIEMENS.format(a=a, b=b))
    (tmp_path / "d.s").write_bytes(np.arange(size // 2, dtype="<u2").tobytes())
    refuse(capsys, ["convert", "--quiet", h, "-o", tmp_path / "ds"], sources=[h, tmp_path / "d.s"],
           outputs=[tmp_path / "ds"], names=[h], words=["overlaps", "data offsets"])


# ---------------------------------------------------------------- 27.5: quietly wrong
def test_a_repeated_yaml_section_is_an_error(tmp_path, capsys):
    """A second `optim:` block silently replaced the first (PyYAML keeps the last key)."""
    cfg = tmp_path / "dup.yaml"
    cfg.write_text("optim:\n  lr: 0.1\ntrain:\n  samples: 8\noptim:\n  name: sgd\n")
    refuse(capsys, ["train", "--config", cfg, "--print-config"], sources=[cfg], names=[cfg],
           words=["'optim' is given twice", "lines 1 and 5"])


def test_an_edited_manifest_scale_is_refused(train_data, tmp_path, capsys):
    """An edited `scale` (what normalization divides by) trained to in-gap NMSE 1.0 with exit 0."""
    ds = tmp_path / "ds"
    shutil.copytree(train_data, ds)
    m = json.loads((ds / "manifest.json").read_text())
    m["scale"] *= 1e6
    (ds / "manifest.json").write_text(json.dumps(m))
    refuse(capsys, ["inspect", ds], sources=[ds], names=[ds / "manifest.json"],
           words=["differs from the largest study max", "convert the dataset again"])


def test_a_master_port_that_is_no_port_is_refused():
    """MASTER_PORT=99999999 was accepted (and passed on to torch.distributed by multi-rank runs)."""
    refuse_subprocess(["env"], names=["MASTER_PORT=99999999"], words=["not a TCP port"],
                      env={"MASTER_PORT": "99999999"}, timeout=60)


def test_overwrite_never_deletes_through_a_shards_link(tmp_path, capsys):
    """A dataset whose `shards/` is a link to a user's directory: --overwrite deleted the user's
    hpc-format file there. Now refused before anything changes."""
    src = write_sinogram(tmp_path / "a", np.ones((1, 2, 3, 4), "<u2"))
    out = tmp_path / "ds"
    assert main(["convert", "--quiet", str(src), "-o", str(out)]) == 0
    mine = tmp_path / "mine"
    (out / "shards").rename(mine)
    (out / "shards").symlink_to(mine)
    refuse(capsys, ["convert", "--quiet", src, "-o", out, "--overwrite"], sources=[mine, src],
           names=[out / "shards"], words=["symbolic link", "nothing changed"])
    assert (out / "manifest.json").exists()
