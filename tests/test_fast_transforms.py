"""The loader's faster transforms give exactly what the transforms they replace gave.

Each rewrite (issue 15: one pass per transform, rotation + mirror as one gather, context stacks
built on the device from each slice sent once, persistent workers) is compared bit for bit with
the plain composition of the original operations, which stay in hpc.data.augment as the reference.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hpc.data import augment as A
from hpc.data import build_loader
from hpc.data import preprocess as PP
from hpc.data.transform import stack_rows

from helpers import loader_cfg, make_dataset


def _mirror_reference(x: torch.Tensor) -> torch.Tensor:
    return x.index_select(-1, PP.mirror_index(x.shape[-1]))


def _pad_reference(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    return PP._wrapped_views(x, torch.arange(-before, x.shape[-2] + after))


@pytest.mark.parametrize("bins", [7, 8])
def test_mirror_bins_as_a_flip_equals_the_index_gather(bins):
    x = torch.randn(3, 2, 5, bins)
    assert torch.equal(PP.mirror_bins(x), _mirror_reference(x))
    assert torch.equal(PP.mirror_bins(PP.mirror_bins(x)), x)


@pytest.mark.parametrize("before, after", [(0, 0), (1, 0), (0, 3), (2, 5), (13, 9)])
@pytest.mark.parametrize("bins", [7, 8])
def test_view_padding_gathers_only_the_padded_rows(before, after, bins):
    x = torch.randn(2, 3, 6, bins)
    out = PP.pad_views_periodic(x, before, after)
    assert torch.equal(out, _pad_reference(x, before, after))
    if before == after == 0:
        assert out is x  # no work at all when the slice already fits


@pytest.mark.parametrize("bins", [7, 8])
def test_rotation_and_mirror_as_one_gather_equal_the_two_transforms(bins):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 10, bins, generator=g)
    shift = torch.tensor([0, 3, -4, 10, 17, -23])  # none, inside, negative, one and two wraps
    flip = torch.tensor([True, False, True, True, False, True])
    for s, f in ((shift, flip), (shift, None), (None, flip)):
        want = x
        if s is not None:
            want = A.rotate_views(want, s)
        if f is not None:
            want = A.flip_bins(want, f)
        got = A.rotate_flip(x, A.rotate_flip_index(s, f, 10, bins))
        assert torch.equal(got, want)
        assert torch.equal(A.apply_augment(x, A.AugmentParams(s, f, None, None)), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint16])
def test_stacks_with_folded_rotation_equal_stacking_then_augmenting(dtype):
    g = torch.Generator().manual_seed(1)
    slices = (torch.rand(9, 12, 8, generator=g) * 60000).to(dtype)  # (U, V, X), uint16 above 32767 too
    window = torch.randint(0, 9, (5, 3), generator=g)  # (B, C)
    prm = A.AugmentParams(torch.tensor([0, 5, -7, 12, 30]), torch.tensor([False, True, True, False, True]),
                          None, None)
    want = A.apply_augment(slices.float()[window], prm)
    assert torch.equal(stack_rows(slices, window, prm).float(), want)
    assert torch.equal(stack_rows(slices, window).float(), slices.float()[window])


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint16, torch.uint8])
@pytest.mark.parametrize("bins", [7, 8])
def test_cpu_stack_copies_equal_the_gather_then_cast(dtype, bins):
    """stack_rows_float (strided numpy copies, mirror by negative strides, cast fused, threads) ==
    stack_rows(...).float() == apply_augment of the plain stacks, for shifts that wrap 0, 1 and 2
    times either way and every flip, and with nothing to fold."""
    from hpc.data.transform import stack_rows_float

    g = torch.Generator().manual_seed(2)
    top = 250 if dtype == torch.uint8 else 60000
    slices = (torch.rand(11, 10, bins, generator=g) * top).to(dtype)  # (U, V, X)
    window = torch.randint(0, 11, (7, 3), generator=g)  # (B, C)
    prm = A.AugmentParams(torch.tensor([0, 4, -3, 10, 17, -23, 9]),
                          torch.tensor([False, True, True, False, True, False, True]), None, None)
    want = A.apply_augment(slices.float()[window], prm)
    for p in (prm, A.AugmentParams(prm.shift, None, None, None), A.AugmentParams(None, prm.flip, None, None)):
        got = stack_rows_float(slices, window, p)
        assert got.dtype == torch.float32 and torch.equal(got, stack_rows(slices, window, p).float())
    assert torch.equal(stack_rows_float(slices, window, prm), want)
    got, peak = stack_rows_float(slices, window, prm, with_max=True)
    assert torch.equal(got, want) and torch.equal(peak, want.reshape(7, -1).amax(1))
    assert torch.equal(stack_rows_float(slices, window), slices.float()[window])


CASES = {
    "clean": dict(),
    "clean, no scanner (bench/loader.py's case: the maxima come with the copies)": dict(scanner="none"),
    "dead blocks": dict(dead_blocks=2),
    "dead blocks, linear fill (not folded)": dict(dead_blocks=2, fill="linear"),
    "thinning (not folded)": dict(dead_blocks=2, dose=0.5),
    "stored mask, paired": dict(stored=True),
    "dead blocks, reproject fill with mult/randoms (not folded)": dict(dead_blocks=2, fill="reproject", aux=True),
    "no gaps, reproject fill (not folded)": dict(fill="reproject", aux=True),
    "validation with mult/randoms": dict(dead_blocks=2, aux=True, split="val"),
    "virtual crystals and rings, dead blocks": dict(dead_blocks=2, scanner="virtual"),
    "virtual crystals, no dead blocks, linear fill": dict(fill="linear", scanner="virtual"),
    "span 3, view mashing: partial bins thinned (not folded)": dict(dead_blocks=3, scanner="span3"),
}
# small scanners with virtual crystals (the first of each transaxial block) and a virtual ring per
# axial block: `valid` has zeros, which the folded gather must move like the data
_VIRTUAL = dict(rings=8, detectors_per_ring=48, block_trans=4, block_axial=4, bins=24, inner_radius_mm=150.0,
                doi_mm=5.0, bin_size_mm=9.7, ring_spacing_mm=6.0, virtual_trans=1)


def _scanner_layout(name: str, monkeypatch):
    """(scanner name, segments, axial counts, views, bins) of a test dataset for the case's scanner."""
    from hpc.physics import geometry as G
    from hpc.physics import projdata as P

    if name in ("virtual", "span3"):
        sc = G.Scanner(f"fast-{name}", f"hpc fast {name}", virtual_axial=1 if name == "virtual" else 0, **_VIRTUAL)
        monkeypatch.setitem(G.SCANNERS, sc.name, sc)
        lay = (P.cti_layout(sc, span=1, max_ring_diff=1, view_mashing=1) if name == "virtual"
               else P.cti_layout(sc, span=3, max_ring_diff=4, view_mashing=2))
        return sc.stir_name, lay.segments, lay.axial_counts, lay.views, lay.bins
    sc = G.get_scanner("test")
    segs = P.segment_sequence(sc.rings - 1)
    return "" if name == "none" else "test", segs, P.axial_counts(sc, segs), sc.views, sc.bins


@pytest.mark.parametrize("case", sorted(CASES))
def test_batches_built_on_the_device_equal_stacked_batches(tmp_path, case, monkeypatch):
    """The same planned batches read stacked on the host (the DALI path, and the old torch path)
    and read once per slice with the stacks built by the device transform: identical Batches."""
    opts = CASES[case]
    scanner, segs, axial, views, bins = _scanner_layout(opts.get("scanner", "test"), monkeypatch)
    stored = opts.get("stored", False)
    root = make_dataset(tmp_path / "d", studies=2, segments=segs, axial=axial, views=views,
                        bins=bins, counts=True, scanner=scanner, shard_slices=7, paired=stored, mask=stored,
                        aux=opts.get("aux", False))
    cfg = loader_cfg(root, context=2, batch_size=5, fill=opts.get("fill", "zero"), normalize="max",
                     pad_multiple=8)
    cfg.augment.enabled, cfg.augment.p = True, 0.7
    cfg.corrupt.dead_blocks = opts.get("dead_blocks", 0)
    cfg.corrupt.dose = opts.get("dose", 1.0)
    cfg.corrupt.paired = cfg.corrupt.use_stored_mask = stored
    cfg.data.fill_iters = 1
    split = opts.get("split", "train")
    if split == "val":
        cfg.data.split = [0.5, 0.5, 0.0]
    loader = build_loader(cfg, split, 0, 1, torch.device("cpu"))
    if opts.get("scanner") == "none":  # nothing missing or invalid: the input is the stack itself
        assert loader.transform.geometry is None and loader.transform._foldable()
    elif opts.get("scanner"):  # the layout is known: virtual LORs exist, and the fold decision is the case's
        assert loader.transform.geometry is not None and (loader.transform.geometry.valid_bins == 0).any()
        assert loader.transform._foldable() == ("not folded" not in case)
    assert loader.reader.spec.aux == (("mult", "randoms") if opts.get("aux") else ())
    plan = loader.plan(1)
    loader.reader.set_plan(plan, 1)
    for j in range(len(plan)):
        batches = []
        for stacked in (True, False):
            raw = {k: torch.from_numpy(np.asarray(v)) for k, v in loader.reader.read(j, stacked=stacked).items()}
            raw.pop("bytes")
            batches.append(loader.transform(raw, 1, j))
        a, b = batches
        for name in ("input", "target", "mask", "valid", "index", "norm"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (case, j, name)
        assert a.pad == b.pad
        assert a.aux.keys() == b.aux.keys() == ({"mult", "randoms"} if split == "val" else set())
        for name in a.aux:
            assert torch.equal(a.aux[name], b.aux[name]), (case, j, name)


def test_persistent_workers_serve_every_epoch_like_the_main_process(tmp_path):
    """Workers start once and live across epochs (they plan each epoch themselves) and deliver
    what a loader without workers delivers, epoch after epoch."""
    root = make_dataset(tmp_path / "d", studies=3, axial=(12,))
    seen = {}
    for workers in (0, 2):
        cfg = loader_cfg(root, workers=workers, context=1, batch_size=3)
        cfg.augment.enabled = True
        loader = build_loader(cfg, "train", 0, 1, torch.device("cpu"))
        loader.lanes = 2  # the plan of a 2-worker loader, read in the main process for workers=0
        seen[workers], pids = [], []
        for epoch in range(3):
            loader.set_epoch(epoch)
            seen[workers] += [(b.index.tolist(), b.input.sum().item()) for b in loader]
            if workers:
                pids.append(sorted(w.pid for w in loader._torch.loader._iterator._workers))
        if workers:
            assert pids[0] == pids[1] == pids[2] and len(pids[0]) == 2
    assert seen[0] == seen[2]


def _stack_in_child(queue) -> None:
    from hpc.data.transform import stack_rows_float

    slices = torch.arange(4 * 6 * 8, dtype=torch.float32).view(4, 6, 8)
    window = torch.tensor([[0, 1, 2], [1, 2, 3]])
    queue.put(torch.equal(stack_rows_float(slices, window), slices[window]))


def test_cpu_stack_threads_work_in_a_forked_child():
    """A fork-started rank (tests/test_loader_dist.py) once inherited the parent's copy-thread pool
    object without its threads and waited forever: whatever the copies use must survive a fork."""
    import multiprocessing

    from hpc.data.transform import stack_rows_float

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for _ in range(3):  # the parent's pool exists, its threads started and idle
            stack_rows_float(torch.zeros(3, 4, 5), torch.zeros(8, 3, dtype=torch.long))
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_stack_in_child, args=(queue,))
        child.start()
        child.join(timeout=120)
        alive = child.is_alive()
        if alive:
            child.kill()
        assert not alive and child.exitcode == 0 and queue.get(timeout=5) is True
    finally:
        torch.set_num_threads(threads)
