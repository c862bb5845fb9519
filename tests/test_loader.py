"""Loader: index, splits, windows, runs and I/O amplification, epoch plans, resume, staging.

Fixtures (tests/helpers.make_dataset) are written with plain h5py + json following docs/FORMAT.md
(not with hpc.io.shards), which keeps the reader honest against the spec. Every target pixel encodes where it came from:
``value = slice_id * 1000 + view * X + bin`` (float32), so a test can decode any batch.
"""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from hpc.data import build_loader
from hpc.data.index import SliceIndex, plan_epoch, split_studies, window_ids
from hpc.errors import ConfigError, InputError
from hpc.io.shards import Dataset

from helpers import decode, loader_cfg, make_dataset


def test_index_stacks_follow_manifest_layout(tmp_path):
    ds = Dataset.open(make_dataset(tmp_path / "d", studies=2, segments=(0, -1, 1), axial=(5, 3, 3), tof=2))
    idx = SliceIndex(ds)
    assert idx.num_slices == 2 * 22
    assert [hi - lo for _, lo, hi in idx.stacks[:6]] == [5, 3, 3, 5, 3, 3]
    with h5py.File(ds.studies[1].shards[2].path) as f:  # stored metadata == computed from manifest
        first = 22 + ds.studies[1].shards[2].first_slice
        n = len(f["axial"])
        assert np.array_equal(f["axial"][:], idx.axial[first:first + n])
        assert np.array_equal(f["segment"][:], idx.segment[first:first + n])
        assert np.array_equal(f["tof"][:], idx.tof[first:first + n])


def test_windows_stay_in_their_stack():
    centres = np.array([10, 11, 14])
    lo, hi = np.full(3, 10), np.full(3, 15)
    assert window_ids(centres, lo, hi, 2, "replicate").tolist() == [[10, 10, 10, 11, 12], [10, 10, 11, 12, 13],
                                                                    [12, 13, 14, 14, 14]]
    assert window_ids(centres, lo, hi, 2, "reflect").tolist() == [[12, 11, 10, 11, 12], [11, 10, 11, 12, 13],
                                                                  [12, 13, 14, 13, 12]]


def test_split_by_study_deterministic_and_explicit():
    ids = [f"p{i}" for i in range(10)]
    a = split_studies(ids, [0.8, 0.1, 0.1], {}, seed=3)
    assert a == split_studies(ids, [0.8, 0.1, 0.1], {}, seed=3)
    assert [len(a[s]) for s in ("train", "val", "test")] == [8, 1, 1]
    assert sorted(a["train"] + a["val"] + a["test"]) == sorted(ids)
    assert split_studies(ids[:3], [0.8, 0.1, 0.1], {}, 0)["val"]  # never empty when asked for
    e = split_studies(ids, [1, 0, 0], {"train": ["p1"], "val": ["p2"], "test": []}, 0)
    assert e["train"] == ["p1"] and e["val"] == ["p2"]
    with pytest.raises(ConfigError, match="unknown study"):
        split_studies(ids, [1, 0, 0], {"train": ["nope"]}, 0)


def test_batches_decode_to_windows_and_read_once(tmp_path):
    root = make_dataset(tmp_path / "d", studies=2, segments=(0, 1), axial=(9, 7), shard_slices=5)
    cfg = loader_cfg(root, run_length=8, context=2, batch_size=4, shuffle_buffer=8)
    loader = build_loader(cfg, "train", 0, 1, torch.device("cpu"))
    idx = loader.index
    seen = []
    for batch in loader:
        ids = decode(batch.input)  # (B, C)
        centre = batch.index.numpy()
        st = np.searchsorted([lo for _, lo, _ in idx.stacks], centre, side="right") - 1
        lo = np.array([idx.stacks[s][1] for s in st])
        hi = np.array([idx.stacks[s][2] for s in st])
        assert np.array_equal(ids.numpy(), window_ids(centre, lo, hi, 2, "replicate"))
        assert torch.equal(batch.target, batch.input[:, 2:3])  # no corruption: target = centre
        assert torch.all(batch.mask == 1)
        seen += centre.tolist()
    assert sorted(seen) == list(range(32))  # 32 slices, batch 4: every slice once
    st = loader.stats()
    # each run reads its 8 centres + up to 2 context slices each side within the stack
    assert 1.0 < st["amplification"] <= (8 + 4) / 8
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 0


def test_epochs_reshuffle_and_val_is_fixed(tmp_path):
    root = make_dataset(tmp_path / "d", studies=4, axial=(12,))
    cfg = loader_cfg(root, split=[0.5, 0.5, 0.0])
    train = build_loader(cfg, "train", 0, 1, torch.device("cpu"))
    order = [torch.cat([b.index for b in train]).tolist() for _ in range(2)]
    assert order[0] != order[1] and sorted(order[0]) == sorted(order[1])
    val = build_loader(cfg, "val", 0, 1, torch.device("cpu"))
    assert set(val.studies).isdisjoint(train.studies)
    v = [torch.cat([b.index for b in val]).tolist() for _ in range(2)]
    assert v[0] == v[1] == sorted(v[0]) and len(v[0]) == 24
    next(iter(val))  # a validation stopped early: the next one still starts at the beginning
    assert torch.cat([b.index for b in val]).tolist() == v[0]


def test_plan_equal_disjoint_per_rank_and_lanes():
    from hpc.data.index import Run

    runs = [Run(0, a, min(a + 5, 37), a, min(a + 5, 37), 0, 37) for a in range(0, 37, 5)]
    plans = [plan_epoch(runs, epoch=1, seed=0, rank=r, world=3, batch=4, lanes=2, shuffle=True,
                        buffer=6, drop_last=True) for r in range(3)]
    got = [np.concatenate(p)[:, 1] for p in plans]
    assert [len(g) for g in got] == [12, 12, 12]  # 37 // 3 = 12 windows, full batches of 4
    assert len(set(np.concatenate(got).tolist())) == 36
    lane_runs = [set(np.concatenate(plans[0][lane::2])[:, 0].tolist()) for lane in range(2)]
    assert len(lane_runs[0] & lane_runs[1]) <= 1  # lanes share at most the run cut between them
    val = [plan_epoch(runs, epoch=0, seed=0, rank=r, world=3, batch=4, lanes=2, shuffle=False,
                      buffer=6, drop_last=False) for r in range(3)]
    assert sorted(np.concatenate([np.concatenate(p) for p in val])[:, 1].tolist()) == list(range(37))
    assert [len(p) for p in val] == [4, 4, 4]  # 12-13 windows each, the same number of batches
    assert max(len(b) for p in val for b in p) == 4


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_exact(tmp_path, workers):
    root = make_dataset(tmp_path / "d", studies=2, axial=(12,), counts=True, scanner="")
    cfg = loader_cfg(root, workers=workers, normalize="max")
    cfg.augment.enabled = True
    cfg.corrupt.dose = 0.5
    full = build_loader(cfg, "train", 0, 1, torch.device("cpu"))
    full.set_epoch(1)
    ref = list(full)
    part = build_loader(cfg, "train", 0, 1, torch.device("cpu"))
    part.set_epoch(1)
    it = iter(part)
    for _ in range(2):
        next(it)
    state = part.state_dict()
    resumed = build_loader(cfg, "train", 0, 1, torch.device("cpu"))
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # the trainer's loop calls it again: the position is kept
    rest = list(resumed)
    assert len(rest) == len(ref) - 2 == len(full) - 2
    for a, b in zip(ref[2:], rest, strict=True):
        for name in ("input", "target", "mask", "index", "norm"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert resumed.state_dict()["epoch"] == 2


def test_paired_and_stored_mask(tmp_path):
    root = make_dataset(tmp_path / "d", studies=1, axial=(8,), paired=True, mask=True)
    cfg = loader_cfg(root)
    cfg.corrupt.paired = True
    cfg.corrupt.use_stored_mask = True
    batch = next(iter(build_loader(cfg, "train", 0, 1, torch.device("cpu"))))
    with h5py.File(root / "shards/s0-0000.h5") as f, h5py.File(root / "shards/s0-0001.h5") as g:
        inp = np.concatenate([f["input"][:], g["input"][:]])
        msk = np.concatenate([f["mask"][:], g["mask"][:]])
    i = batch.index.numpy()
    assert np.array_equal(batch.mask[:, 0].numpy(), msk[i])
    assert np.array_equal(batch.input[:, 1].numpy(), inp[i] * msk[i])
    assert torch.equal(decode(batch.target[:, 0]), batch.index)
    bad = loader_cfg(make_dataset(tmp_path / "e", studies=1))
    bad.corrupt.paired = True
    with pytest.raises(InputError, match="no stored `input`"):
        build_loader(bad, "train", 0, 1, torch.device("cpu"))


def test_fill_linear_prefills_the_gaps_of_every_channel(tmp_path):
    """data.fill=linear: the loader's input is the zero-filled input with every channel's gaps
    interpolated radially (hpc.data.fills.fill_radial); measured pixels and targets are unchanged."""
    from hpc.data.fills import fill_radial

    root = make_dataset(tmp_path / "d", studies=1, axial=(8,), paired=True, mask=True)
    batches = {}
    for fill in ("zero", "linear"):
        cfg = loader_cfg(root, fill=fill, normalize="max")
        cfg.corrupt.paired = cfg.corrupt.use_stored_mask = True
        batches[fill] = next(iter(build_loader(cfg, "train", 0, 1, torch.device("cpu"))))
    zero, lin = batches["zero"], batches["linear"]
    assert torch.equal(zero.index, lin.index) and torch.equal(zero.target, lin.target)
    with h5py.File(root / "shards/s0-0000.h5") as f, h5py.File(root / "shards/s0-0001.h5") as g:
        msk = torch.from_numpy(np.concatenate([f["mask"][:], g["mask"][:]])).float()
    ids = zero.index.unsqueeze(1) + torch.tensor([-1, 0, 1])  # (B, 3) context slice ids (one study)
    mask = msk[ids.clamp(0, len(msk) - 1)]  # (B, 3, V, X), edges replicated
    assert (mask == 0).any()
    torch.testing.assert_close(lin.input, fill_radial(zero.input, mask))
    assert not torch.equal(lin.input, zero.input)


def test_staging_copies_verifies_and_loads(tmp_path):
    from hpc.data.staging import stage_to

    root = make_dataset(tmp_path / "d", studies=2)
    local = stage_to(root, tmp_path / "local")
    assert (local / "manifest.json").is_file() and len(list((local / "shards").glob("*.h5"))) == 4
    again = stage_to(root, tmp_path / "local")  # verified copies are kept
    assert again == local
    cfg = loader_cfg(root, stage_to=str(tmp_path / "local"))
    loader = build_loader(cfg, "train", 0, 1, torch.device("cpu"))
    assert str(loader.index.ds.root) == str(local)
    with h5py.File(root / "shards/s1-0001.h5", "r+") as f:  # a corrupted source shard
        f["target"][0, 0, 0] += 1
    with pytest.raises(InputError, match="s1-0001.h5.*checksum"):
        stage_to(root, tmp_path / "other")
    assert not (tmp_path / "other" / "shards" / "s1-0001.h5").exists()


def test_validation_corruption_repeats_training_does_not(tmp_path):
    root = make_dataset(tmp_path / "d", studies=2, axial=(8,), counts=True)
    cfg = loader_cfg(root, split=[0.5, 0.5, 0.0])
    cfg.corrupt.dose = 0.3
    val = build_loader(cfg, "val", 0, 1, torch.device("cpu"))
    a, b = list(val), list(val)
    assert all(torch.equal(x.input, y.input) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0].input, a[0].target)  # thinned
    train = build_loader(cfg, "train", 0, 1, torch.device("cpu"))
    e0 = {int(i): x for b in train for i, x in zip(b.index, b.input, strict=True)}
    e1 = {int(i): x for b in train for i, x in zip(b.index, b.input, strict=True)}
    assert any(not torch.equal(e0[i], e1[i]) for i in e0)  # new noise each epoch


def test_dead_block_masks_equal_geometry(tmp_path):
    """Every channel's mask (seen as the zeros of Poisson-count input) equals hpc.physics.geometry's
    dead_block_mask of its plane for one pair of blocks per sample, found by brute force."""
    from itertools import combinations

    from hpc.physics import geometry as G
    from hpc.physics import projdata as P

    sc = G.get_scanner("test")
    segs = P.segment_sequence(sc.rings - 1)
    counts = P.axial_counts(sc, segs)  # 16 planes
    root = make_dataset(tmp_path / "d", studies=2, segments=segs, axial=counts, views=sc.views,
                        bins=sc.bins, counts=True, scanner="test", shard_slices=7)
    cfg = loader_cfg(root, split=[0.5, 0.5, 0.0], context=1)
    cfg.corrupt.dead_blocks = 2
    n_blocks = G.block_counts(sc)[1]
    table = {pair: torch.from_numpy(P.dead_block_mask(sc, pair, segs)).float()
             for pair in combinations(range(n_blocks), 2)}  # (16, V, X) per pair
    for split in ("train", "val"):
        loader = build_loader(cfg, split, 0, 1, torch.device("cpu"))
        for batch in loader:
            stack_mask = (batch.input != 0).float()  # (B, 3, V, X)
            for i, gid in enumerate(batch.index.tolist()):
                local = gid % 16
                # context stays in the centre's (segment) stack: edges replicate
                st = np.searchsorted(np.cumsum((0,) + counts), local, side="right") - 1
                lo, hi = sum(counts[:st]), sum(counts[:st + 1]) - 1
                planes = [min(max(p, lo), hi) for p in (local - 1, local, local + 1)]
                found = [p for p, m in table.items() if torch.equal(m[planes], stack_mask[i])]
                assert found, (split, gid)
                assert torch.equal(batch.mask[i, 0], table[found[0]][local])
    bad = loader_cfg(root)
    bad.corrupt.dead_blocks, bad.corrupt.scanner = 2, "mmr"
    with pytest.raises(ConfigError, match="fit no span on 'mmr' \\(64 rings\\)"):
        build_loader(bad, "train", 0, 1, torch.device("cpu"))
