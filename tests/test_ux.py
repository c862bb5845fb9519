"""What `hpc train` shows the person running it (issue 26): a line per validation next to the
baselines, progress with an ETA and a current loss, baselines kept across resumes, a finished run
that says so, validation slices that have gaps (and no parameter chosen from none), a W&B panel that
shows a repair and the best values in the run's summary, one line instead of a traceback for another
model in a run dir, nothing created by a start that fails; `hpc simulate --planes` files of that
many planes, `hpc inspect`, `hpc sbatch` and the package's dependencies. Everything runs the real
CLI or the real components and reads back what they wrote."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import tomllib

from hpc.train import checkpoint as ck

from helpers import ROOT, TINY, hpc_cmd, make_dataset, records

ENV = {"OMP_NUM_THREADS": "1"}


def run_hpc(*args, check: bool = False) -> subprocess.CompletedProcess:
    """The real CLI without any WANDB_* variable of this process (log.wandb decides; an in-process
    wandb.init elsewhere leaves WANDB_SERVICE set, which would attach a trainer to its wandb-core)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | ENV
    r = subprocess.run(hpc_cmd(*args), capture_output=True, text=True, env=env, timeout=600)
    if check and r.returncode:
        raise AssertionError(f"hpc {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def train(dataset: Path, run_dir: Path, *overrides: str, check: bool = True):
    return run_hpc("train", "--config", TINY, f"data.path={dataset}", f"train.run_dir={run_dir}",
                   "data.train_studies=[s0,s2]", "data.val_studies=[s1]", *overrides, check=check)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """3 studies of 8 slices of 16x16 Poisson counts with stored masks (gaps everywhere)."""
    return make_dataset(tmp_path_factory.mktemp("ds") / "ds", studies=3, views=16, bins=16, mask=True, counts=True)


@pytest.fixture(scope="module")
def finished(dataset, tmp_path_factory) -> tuple[Path, object]:
    """A tiny run to 64 samples, W&B offline, validations at 32 and 64, checkpoints every 16."""
    run = tmp_path_factory.mktemp("run") / "run"
    r = train(dataset, run, "log.wandb=offline", "log.group=g1", "checkpoint.every=16", "checkpoint.keep=5")
    return run, r


# ---------------------------------------------------------------- 26.1: training tells the truth as it goes
def test_every_validation_is_one_line_next_to_the_baselines(finished):
    run, r = finished
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("hpc train: val ")]  # what happened: stdout
    assert len(lines) == 2, r.stdout + r.stderr
    val = records(run, "val")
    for line, rec in zip(lines, val, strict=True):
        m = re.fullmatch(r"hpc train: val (\d+)/64 samples \| nmse_gap (\S+) \| baselines: (.+?) \| "
                         r"(\S+)x the best baseline \((better|worse)\) \| (.+)", line)
        assert m, line
        assert int(m.group(1)) == rec["step"] and float(m.group(2)) == pytest.approx(rec["nmse_gap"], rel=1e-3)
        shown = dict(re.findall(r"(\w+) ([\d.e+-]+)", m.group(3)))
        assert float(shown["linear"]) == pytest.approx(rec["linear_nmse_gap"], rel=1e-3)
        best = min(rec["linear_nmse_gap"], rec["biharmonic_nmse_gap"])
        assert float(m.group(4)) == pytest.approx(rec["nmse_gap"] / best, rel=1e-2)
    assert lines[0].endswith("new best nmse_gap")
    # the first validation says that it also scores the baselines (minutes on a real study)
    assert "the first validation also scores the baselines" in r.stdout


def test_progress_has_an_eta_and_reads_the_loss_when_it_draws():
    from hpc.progress import Progress

    class Log(io.StringIO):
        def isatty(self) -> bool:
            return False

    reads, stream = [], Log()
    bar = Progress(100, "samples", "train", stream=stream, log_every_s=0.0, initial=40)
    bar.set_postfix(lambda: reads.append(1) or f"loss {len(reads)}")
    for _ in range(6):
        bar.update(10)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 7 and len(reads) == 7  # read once per line drawn, never in between
    assert all("ETA " in ln for ln in lines[:5]) and not any("ETA" in ln for ln in lines[5:])  # done: no ETA
    assert lines[0].startswith("train | 50/100 samples (50%)") and lines[-1].endswith("loss 7")


def test_the_bar_shows_a_current_loss_even_between_logged_ones(dataset, tmp_path):
    """log.every beyond the run: no train record is logged, yet the bar's last line has a loss
    (before, the bar showed the last *logged* loss: here none, elsewhere a stale one)."""
    run = tmp_path / "run"
    r = train(dataset, run, "log.every=100000", "log.progress=true", "train.val_every=0")
    assert records(run, "train") == []
    final = [ln for ln in r.stderr.splitlines() if ln.startswith("train | 64/64 samples")]
    assert final and re.search(r"\| loss \d", final[-1]), r.stderr


def test_the_studies_of_each_split_are_printed_and_kept(finished):
    run, r = finished
    assert "hpc train: studies: train 2 (s0, s2) | val 1 (s1) | test 0 (none)" in r.stdout
    assert ck.load(run / "checkpoints" / "best.pt")["data"]["splits"] == {"train": ["s0", "s2"], "val": ["s1"],
                                                                          "test": []}


# ---------------------------------------------------------------- 26.2: resume and finished runs
def test_a_finished_run_says_so_and_writes_nothing(finished, dataset):
    run, _ = finished
    before = (run / "metrics.jsonl").read_text()
    attempts = sorted(run.glob("wandb/offline-run-*"))
    r = train(dataset, run, "log.wandb=offline", "log.group=g1", "checkpoint.every=16", "checkpoint.keep=5")
    assert r.returncode == 0
    assert "already finished (64 of train.samples=64 samples; best nmse_gap" in r.stdout
    assert "hpc train: val " not in r.stdout  # no third validation at the same step
    assert (run / "metrics.jsonl").read_text() == before
    assert sorted(run.glob("wandb/offline-run-*")) == attempts  # no new W&B attempt


def test_a_resumed_run_keeps_the_baselines_it_scored(dataset, tmp_path):
    run = tmp_path / "run"
    train(dataset, run, "train.samples=32")
    saved = ck.load(ck.Checkpointer(run).list()[0])["validation"]
    assert set(saved["baselines"]) == {"linear", "biharmonic"} and saved["step"] == 32 and saved["fingerprint"]
    r = train(dataset, run, "train.samples=64")
    assert "resumed from" in r.stderr and "also scores the baselines" not in r.stdout
    first, second = records(run, "val")
    assert second["step"] == 64 and second["linear_nmse_gap"] == first["linear_nmse_gap"]
    # another validation set (other slices): scored again
    r = train(dataset, run, "train.samples=96", "train.val_batches=1")
    assert "also scores the baselines" in r.stdout


# ---------------------------------------------------------------- 26.3: slices that represent the study
@pytest.fixture(scope="module")
def scanner_data(tmp_path_factory) -> Path:
    """`hpc simulate --scanner test` (4 rings in 2 axial blocks: 4 direct planes of 12 x 12), each
    study converted with a mask of its own dead blocks: s000 and s002 block 7 (planes 2, 3), s001
    (the validation study) block 7 too, and a second dataset whose s001 has no gaps at all."""
    from hpc.io.headers import read_header
    from hpc.io.sinogram import write_sinogram
    from hpc.physics import projdata as P

    root = tmp_path_factory.mktemp("scanner")
    sim = root / "sim"
    run_hpc("simulate", "-o", sim, "--studies", "3", "--scanner", "test", "--counts", "2e5", "--seed", "2",
            "--no-truth", check=True)
    for name, blocks in (("gaps", {"s001": [7]}), ("none", {"s001": []})):
        masks = []
        for sid in ("s000", "s001", "s002"):
            spec = read_header(sim / f"{sid}.s.hdr")
            frac = P.dead_fractions(spec.layout(), blocks.get(sid, [7]))
            masks.append(write_sinogram(sim / f"{sid}_{name}_mask.s", (frac > 0.5).astype(np.uint8),
                                        layout=spec.layout()))
        run_hpc("convert", *(sim / f"s00{i}.s.hdr" for i in range(3)), "--mask", *masks, "-o", root / name,
                "--quiet", check=True)
    return root


def scanner_train(data: Path, run: Path, *overrides: str):
    return run_hpc("train", "--config", TINY, f"data.path={data}", f"train.run_dir={run}",
                   "data.train_studies=[s000,s002]", "data.val_studies=[s001]", "data.batch_size=2",
                   "train.val_batches=1", "train.samples=8", "train.val_every=8", *overrides, check=True)


def test_a_bounded_validation_scores_slices_with_gaps(scanner_data, tmp_path):
    """val_batches=1 x batch 2: two of the validation study's four planes. The first two in storage
    order (rings 0-1) have no gap; the stratified sample takes the two a dead block reaches."""
    run = tmp_path / "run"
    scanner_train(scanner_data / "gaps", run)
    (val,) = records(run, "val")
    assert val["nmse_gap"] is not None and val["nmse_gap"] > 0
    assert val["reproject_iters"] in (1, 2, 3, 4, 6, 8, 12, 16, 24) and val["reproject_nmse_gap"] is not None
    assert (run / "checkpoints" / "best.pt").is_file()


def test_no_parameter_is_chosen_from_zero_gap_pixels(scanner_data, tmp_path):
    run = tmp_path / "run"
    r = scanner_train(scanner_data / "none", run)
    (val,) = records(run, "val")
    assert val["nmse_gap"] is None and "reproject_iters" not in val  # nothing to choose it from
    assert "no gap pixels in the validation slices" in r.stdout
    assert "reproject_iters" not in ck.load(ck.Checkpointer(run).list()[0])["metrics"]  # hpc evaluate's default


# ---------------------------------------------------------------- 26.4: W&B shows a repair
def _wandb_records(run: Path) -> list:
    from test_logger import written_records

    (path,) = run.glob("wandb/offline-run-*/run-*.wandb")
    return written_records(path)


def test_wandb_panel_is_the_slice_with_the_most_gaps_and_the_summary_has_the_best(finished, dataset):
    run, _ = finished
    recs = _wandb_records(run)
    history = [{tuple(i.nested_key) or (i.key,): json.loads(i.value_json) for i in r.history.item}
               for r in recs if r.WhichOneof("record_type") == "history"]
    panels = [h for h in history if ("images/panel", "_type") in h]
    assert len(panels) == 2  # one per validation
    parts = []
    for p in sorted((dataset / "shards").glob("s1-*.h5")):  # the validation study's masks, from its shards
        with h5py.File(p) as f:
            parts.append(f["mask"][()])
    mask = np.concatenate(parts)
    most = int(np.argmax((mask < 1).sum(axis=(1, 2))))
    first_s1 = 8  # s0 has 8 slices before it
    caption = panels[0][("images/panel", "caption")]
    assert f"validation slice {first_s1 + most}, the one with the most gap pixels ({(mask[most] < 1).sum()})" in caption
    summary = {}
    for r in recs:
        if r.WhichOneof("record_type") == "summary":
            for item in r.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    best = min(records(run, "val"), key=lambda v: v["nmse_gap"])
    assert summary["best/nmse_gap"] == pytest.approx(best["nmse_gap"]) and summary["best/step"] == best["step"]
    assert summary["best/linear_nmse_gap"] == pytest.approx(best["linear_nmse_gap"])


def test_the_panel_has_fixed_labelled_scales():
    """A mask of ones is white on 0..1 (it rendered black before: its own range, min = max); the
    error shares the sinograms' 0..target-max scale."""
    import torch

    from hpc.train.panel import render_panel

    t = torch.rand(16, 16) * 10
    panels = {"input": t * 0, "prediction": t * 0.9, "target": t, "error": (t * 0.1).abs(),
              "mask": torch.ones(16, 16), "slice": 5, "gap_pixels": 0}
    rgb, caption = render_panel(panels, 64)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and "slice 5" in caption
    gaps, _ = render_panel({**panels, "mask": torch.zeros(16, 16)}, 64)
    changed = (rgb != gaps).any(-1)  # the mask image, nothing else (its colour bar is fixed at 0..1)
    assert changed.sum() > 0.01 * changed.size
    assert np.median(rgb[changed]) >= 250 and np.median(gaps[changed]) <= 5  # ones white, zeros black


# ---------------------------------------------------------------- 26.10, 26.11: one line, nothing left behind
def test_another_model_in_a_run_dir_is_one_line(finished, dataset):
    run, _ = finished
    r = train(dataset, run, "model.base=8", "train.samples=96", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert "this run directory holds another model: model.base=4 in the run, 8 now" in line
    assert "train.run_dir=NEW_DIR" in line


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_a_start_that_cannot_log_fails_before_creating_anything(dataset, tmp_path):
    run = tmp_path / "new" / "run"
    r = run_hpc("train", "--config", TINY, f"data.path={dataset}", f"train.run_dir={run}", "log.tensorboard=true",
                "--print-config")
    assert r.returncode == 2 and r.stderr.strip().endswith("or set log.tensorboard=false")
    r = train(dataset, run, "log.tensorboard=true", "log.wandb=offline", check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists()


def test_a_failed_start_leaves_no_empty_run_directory(tmp_path):
    run = tmp_path / "runs" / "a"
    r = train(tmp_path / "no-such-dataset", run, check=False)
    assert r.returncode == 2 and "not a converted dataset" in r.stderr
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- 26.8: simulate --planes, empty data
@pytest.mark.slow
def test_simulate_planes_writes_that_many_planes(tmp_path):
    sim = tmp_path / "sim"
    r = run_hpc("simulate", "--scanner", "mmr", "--planes", "13", "--studies", "1", "--dead-blocks", "1",
                "--no-truth", "--counts", "1e6", "-o", sim, "--png", tmp_path / "sim.png")
    assert r.returncode == 0, r.stderr
    from hpc.io.headers import read_header

    files = {p.name: p.stat().st_size for p in sim.iterdir() if p.suffix == ".s"}
    per_file = {"s000.s": 2, "s000_gaps.s": 2, "s000_mask.s": 4}  # uint16 counts, float32 measured fractions
    assert files == {name: 13 * 252 * 344 * b for name, b in per_file.items()}  # 13 planes, not 837
    spec = read_header(sim / "s000.hs")
    assert spec.planes == 13 and spec.segments == (0,)
    bad = run_hpc("simulate", "--scanner", "mmr", "--planes", "12", "-o", tmp_path / "b")
    assert bad.returncode == 2 and "an odd count (11 or 13)" in bad.stderr


def test_simulate_png_draws_planes_with_counts_and_a_dead_block():
    from hpc.physics import geometry as G
    from hpc.physics import projdata as P
    from hpc.simulate import layout as SL
    from hpc.simulate.simulate import png_planes, simulate_study

    sc = G.get_scanner("demo")
    with pytest.raises(ValueError, match=r"an even count \(2 or 4\)"):  # 8 rings: no 3 central planes
        SL.central_planes(P.cti_layout(sc), 3)
    lay = SL.central_planes(P.cti_layout(sc), 4)
    st = simulate_study(sc, "s", 5, 1e5, (0,), dead_blocks=1, layout=lay)
    assert lay.planes == 4 and st.full.shape[1] == 4
    planes = png_planes(st, lay)
    assert planes and all(st.full[:, p].sum() > 0 for p in planes)
    assert all((st.mask[p] < 1).any() for p in planes)  # the dead block is in the picture


def test_mostly_empty_training_data_is_warned_about(tmp_path):
    ds = make_dataset(tmp_path / "ds", studies=3, views=16, bins=16, mask=True, counts=True)
    for p in (ds / "shards").glob("*.h5"):
        with h5py.File(p, "r+") as f:
            f["target"][1:] = 0  # one slice with counts per shard, the rest empty
    r = train(ds, tmp_path / "run", "train.samples=8", "train.val_every=0")
    assert re.search(r"hpc train: warning: \d+% of \d+ training slices sampled .* hold no counts", r.stderr)


# ---------------------------------------------------------------- small ones
def test_inspect_says_which_validation_a_checkpoints_metrics_are_from(finished):
    run, _ = finished
    out = run_hpc("inspect", run, check=True).stdout
    line = next(ln for ln in out.splitlines() if "step-00000048.pt" in ln)
    assert "metrics (last validation, at step 32)" in line
    assert "step-00000064.pt: step 64 epoch" in out and "metrics (this step's validation)" in out
    assert "studies: train s0, s2 | val s1 | test -" in out


def test_sbatch_has_no_cluster_flag_and_passes_the_run_dir_once(dataset, tmp_path):
    assert "--cluster" not in run_hpc("sbatch", "--help", check=True).stdout
    r = run_hpc("sbatch", "-t", "plain", "--print", "--config", TINY, f"data.path={dataset}",
                "train.run_dir=runs/big", "optim.lr=0.001", check=True)
    assert r.stdout.count("train.run_dir=") == 1 and "RUN_DIR=runs/big" in r.stdout
    assert "optim.lr=0.001" in r.stdout


def test_pytorch_msssim_is_a_test_dependency_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("pytorch-msssim") for d in project["dependencies"])
    assert any(d.startswith("pytorch-msssim") for d in project["optional-dependencies"]["dev"])
    assert not any("pytorch_msssim" in p.read_text() for p in (ROOT / "hpc").rglob("*.py"))
    assert "pytorch-msssim" not in (ROOT / "containers" / "requirements.txt").read_text()


def test_wandb_sync_hint_names_every_attempt(tmp_path, monkeypatch, capsys):
    from hpc.config import Config
    from hpc.train.logger import RunLogger

    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = Config()
    cfg.train.run_dir, cfg.log.wandb, cfg.log.progress = str(tmp_path / "run"), "offline", False
    for _ in range(2):  # two attempts (a resume) of one run
        log = RunLogger(cfg, main=True, total=8)
        log.scalars(4, {"loss": 1.0})
        log.close()
    hint = capsys.readouterr().err.strip().splitlines()[-1]
    dirs = sorted(str(p) for p in (tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(dirs) == 2 and hint.endswith("wandb sync " + " ".join(dirs))
