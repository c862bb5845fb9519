"""DALI backend (real DALI, CPU mode ``device_id=None``) against the torch backend."""
from __future__ import annotations

import pytest
import torch

from hpc.data import build_loader

from helpers import decode, loader_cfg, make_dataset, require_dali

FIELDS = ("input", "target", "mask", "index", "norm")


def both(cfg, split: str = "train", epoch: int = 0):
    out = []
    for backend in ("torch", "dali"):
        cfg.data.backend = backend
        loader = build_loader(cfg, split, 0, 1, torch.device("cpu"))
        loader.set_epoch(epoch)
        out.append(list(loader))
    return out


@pytest.fixture(autouse=True)
def _dali():
    require_dali()


def test_dali_equals_torch_without_augmentation(tmp_path):
    root = make_dataset(tmp_path / "d", studies=3, axial=(10,), counts=True, mask=True)
    cfg = loader_cfg(root, workers=1, normalize="max", split=[0.67, 0.33, 0.0], batch_size=3)
    cfg.corrupt.use_stored_mask = True
    for split in ("train", "val"):
        a, b = both(cfg, split)
        assert len(a) == len(b) > 0
        if split == "val":
            assert [len(x.index) for x in a] == [3, 3, 2, 2]  # 10 slices, batch 3: nothing dropped
        for x, y in zip(a, b, strict=True):
            for name in FIELDS:
                assert torch.equal(getattr(x, name), getattr(y, name)), (split, name)


def test_dali_flip_matches_torch_and_moves_all_three(tmp_path):
    root = make_dataset(tmp_path / "d", studies=1, axial=(12,), mask=True)
    cfg = loader_cfg(root, workers=2)
    cfg.corrupt.use_stored_mask = True
    cfg.augment.enabled, cfg.augment.rotate_views, cfg.augment.flip_bins, cfg.augment.p = True, True, True, 0.5
    a, b = both(cfg, epoch=3)
    flipped = 0
    for x, y in zip(a, b, strict=True):  # DALI's mirror with the shared draws == torch's flip_bins
        for name in FIELDS:
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        tgt = y.target[:, 0]
        src_bin = (tgt - decode(tgt)[:, None, None] * 1000).long() % 8  # source bin of every pixel
        mirrored = (src_bin[:, :, 1] == 7).all(dim=1)  # t -> -t: bin 1 <- bin 7, bin 0 keeps its own
        assert (src_bin[mirrored][:, :, 0] == 0).all()
        flipped += int(mirrored.sum())
        assert torch.equal(y.input[:, 1], tgt * y.mask[:, 0])  # input and mask moved with the target
    assert flipped > 0


def test_dali_equals_torch_with_dead_blocks_and_augmentation(tmp_path):
    from hpc.physics import geometry as G

    sc = G.get_scanner("test")
    root = make_dataset(tmp_path / "d", studies=1, segments=(0, -1, 1), axial=(4, 3, 3), views=sc.views,
                        bins=sc.bins, counts=True, scanner="test")
    cfg = loader_cfg(root, workers=1, normalize="anscombe", pad_multiple=8)
    cfg.corrupt.dead_blocks = 3
    cfg.augment.enabled, cfg.augment.p = True, 0.5  # DALI flips the data, torch the geometry masks
    a, b = both(cfg, epoch=1)
    assert len(a) == len(b) == 2
    for x, y in zip(a, b, strict=True):
        assert (x.mask == 0).any()
        for name in FIELDS:
            assert torch.equal(getattr(x, name), getattr(y, name)), name


def test_dali_workers_read_each_run_once(tmp_path):
    """DALI gives a pipeline's tasks to whichever of its workers is free, so W workers in one
    pipeline each read the runs of every lane (I/O amplification ~W: 4.40 with 4 workers). With one
    single-worker pipeline per lane the batches are the torch backend's, in order, over two passes
    (the second reuses the pipelines), and each run is read once: the same bytes as torch reads."""
    root = make_dataset(tmp_path / "d", studies=2, axial=(24,), counts=True)
    cfg = loader_cfg(root, workers=3, run_length=8, context=2)
    stats = {}
    for backend in ("torch", "dali"):
        cfg.data.backend = backend
        loader = build_loader(cfg, "train", 0, 1, torch.device("cpu"))
        passes = []
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            passes.append([(b.index.tolist(), b.input) for b in loader])
            stats[backend, epoch] = loader.stats()
        stats[backend] = passes
    for a, b in zip(stats["torch"], stats["dali"], strict=True):
        assert [i for i, _ in a] == [i for i, _ in b] and len(a) == 12
        assert all(torch.equal(x, y) for (_, x), (_, y) in zip(a, b, strict=True))
    for epoch in (0, 1):
        assert stats["dali", epoch]["bytes_read"] == stats["torch", epoch]["bytes_read"]
        assert stats["dali", epoch]["amplification"] < 1.6  # (8 + 2 x 2) / 8 at most: each run once
