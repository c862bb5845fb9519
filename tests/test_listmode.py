"""PETLINK 32-bit list mode: round trips through the writer (hpc.simulate.listmode) and back
(hpc.io.listmode, hpc.io.lmhistogram), every segment, rebinning to spans and view mashing,
prompts and delayeds, time frames, workers, TOF addresses, the compiled (numba, the default), numpy
and torch kernels against each other, one-line errors.
The real mMR file's checks are bench/listmode_real.py (the data is not in the repository)."""
from __future__ import annotations

import numpy as np
import pytest

from hpc.errors import InputError
from hpc.io import listmode as L
from hpc.io.lmhistogram import histogram
from hpc.physics import geometry as G
from hpc.physics import projdata as P
from hpc.physics import randoms as R
from hpc.simulate import listmode as S

from helpers import lm_scanner as small_scanner


def sinos(layout, rng, rate=0.3):
    shape = (layout.tof_bins, layout.planes, layout.views, layout.bins)
    return rng.poisson(rate, shape), rng.poisson(rate / 5, shape)


def write(tmp_path, layout, parts, rng, name="scan", **kw):
    return S.write_listmode(tmp_path / name, layout, parts, rng, **kw)


def only(it):
    (h,) = list(it)
    return h


def compress(sino, src, dst):
    """Reference span compression + view mashing from hpc.projdata's ring pairs of the target:
    each target plane sums the span-1 planes of its ring pairs (source plane (ring diff, min ring))."""
    out = np.zeros((dst.planes, dst.views, dst.bins), np.int64)
    plane, ra, rb = dst.ring_pairs
    srcp = src.plane_of(rb - ra, np.minimum(ra, rb))
    np.add.at(out, plane, sino[0][srcp].reshape(-1, dst.views, dst.view_mashing, dst.bins).sum(2))
    return out


def test_round_trip_span1_every_segment(tmp_path, sc, rng):
    src = P.cti_layout(sc, 1, 7)  # every ring difference: 15 segments
    pr, de = sinos(src, rng)
    hdr = L.read_header(write(tmp_path, src, [(0, 500, pr, de)], rng, lead_events=5), scanner=sc)
    h = only(histogram(hdr, layout=src))
    assert h.prompts.dtype == np.uint32 and h.prompts.shape == pr.shape
    np.testing.assert_array_equal(h.prompts, pr)
    np.testing.assert_array_equal(h.delayeds, de)
    seg, _ = src.plane_segment_axial()
    assert all(pr[0, seg == s].sum() > 0 and de[0, seg == s].sum() > 0 for s in src.segments)
    assert h.stats["prompts"] == pr.sum() and h.stats["delayeds"] == de.sum()
    assert h.stats["marks"] == 500 and h.stats["other_tags"] > 0 and h.stats["dropped_prompts"] == 0


@pytest.mark.parametrize("span,mash,mrd", [(3, 1, 7), (5, 2, 6), (7, 4, 7)])
def test_span_and_view_mashing_equal_projdata_compression(tmp_path, sc, rng, span, mash, mrd):
    src = P.cti_layout(sc, 1, 7)
    pr, de = sinos(src, rng)
    hdr = L.read_header(write(tmp_path, src, [(0, 50, pr, de)], rng), scanner=sc)
    dst = P.cti_layout(sc, span, mrd, view_mashing=mash)
    h = only(histogram(hdr, layout=dst))
    np.testing.assert_array_equal(h.prompts[0], compress(pr, src, dst))
    np.testing.assert_array_equal(h.delayeds[0], compress(de, src, dst))
    outside = np.abs(src.plane_segment_axial()[0]) > mrd
    assert h.stats["dropped_prompts"] == pr[0, outside].sum()


def test_mmr_span11_against_event_by_event_decoding(tmp_path, rng):
    """Sparse events on the real mMR layouts, each decoded on its own the way STIR does (offset ->
    tangential, view, z; z walks the segment sequence 0, -1, +1, ...) and binned by hand."""
    sc = G.get_scanner("mmr")
    src, dst = P.cti_layout(sc, 1, 60), P.cti_layout(sc, 11, 49)  # drops |ring difference| > 49
    n = 3000
    addr = rng.integers(0, src.planes * src.views * src.bins, n)
    pr = np.bincount(addr[: n - 500], minlength=src.planes * src.views * src.bins)
    de = np.bincount(addr[n - 500:], minlength=pr.size)
    hdr = L.read_header(write(tmp_path, src, [(0, 20, pr, de)], rng))
    h = only(histogram(hdr, layout=dst))
    where = {}
    for p, a, b in zip(*dst.ring_pairs, strict=True):
        where[(int(a), int(b))] = int(p)
    want = np.zeros((2, dst.planes * dst.views * dst.bins), np.int64)
    for k, x in enumerate(addr):
        t, rest = x % 344, x // 344
        v, z = rest % 252, rest // 252
        for seg in P.segment_storage_order(121):
            if z < 64 - abs(seg):
                break
            z -= 64 - abs(seg)
        ra, rb = z + max(-seg, 0), z + max(seg, 0)
        if (ra, rb) in where:
            want[int(k >= n - 500), (where[(ra, rb)] * 252 + v) * 344 + t] += 1
    np.testing.assert_array_equal(h.prompts.reshape(-1), want[0])
    np.testing.assert_array_equal(h.delayeds.reshape(-1), want[1])
    assert h.stats["dropped_prompts"] + h.stats["prompts"] == n - 500


def test_frames_are_exact_from_the_first_time_mark(tmp_path, sc, rng):
    src = P.cti_layout(sc, 1, 3)
    a, b, edge1, edge2 = (sinos(src, rng, r) for r in (0.2, 0.3, 0.01, 0.01))
    parts = [(0, 60000, *a), (60000, 300000, *b), (59999, 60000, *edge1), (60000, 60001, *edge2)]
    hdr = L.read_header(write(tmp_path, src, parts, rng, first_mark=123456, lead_events=4), scanner=sc)
    f1, f2 = histogram(hdr, layout=src, frames="0:60,60:300")
    np.testing.assert_array_equal(f1.prompts, a[0] + edge1[0])
    np.testing.assert_array_equal(f2.delayeds, b[1] + edge2[1])
    assert f1.frame_ms == (0, 60000) and f1.stats["first_mark_ms"] == 0 and f2.stats["last_mark_ms"] == 299999
    assert f1.stats["words"] + f2.stats["words"] == hdr.words
    (late,) = histogram(hdr, layout=src, frames="60:400")  # past the end: up to the last word
    np.testing.assert_array_equal(late.prompts, b[0] + edge2[0])


def test_frame_inside_the_scan(tmp_path, sc, rng):
    src = P.cti_layout(sc, 1, 2)
    parts = [(t, t + 10000, *sinos(src, rng, 0.1)) for t in (0, 10000, 20000)]
    hdr = L.read_header(write(tmp_path, src, parts, rng), scanner=sc)
    (mid,) = histogram(hdr, layout=src, frames=[(10000, 20000)])
    np.testing.assert_array_equal(mid.prompts, parts[1][2])
    np.testing.assert_array_equal(mid.delayeds, parts[1][3])


@pytest.mark.parametrize("device", ["numba", "numpy"])  # threads, processes
def test_workers_merge_exactly(tmp_path, sc, rng, device):
    src = P.cti_layout(sc, 1, 7)
    pr, de = sinos(src, rng, 1.0)
    hdr = L.read_header(write(tmp_path, src, [(0, 3000, pr, de)], rng), scanner=sc)
    dst = P.cti_layout(sc, 3, 7)
    one = list(histogram(hdr, layout=dst, frames="0:1,1:3", fansums=True, device=device))
    two = list(histogram(hdr, layout=dst, frames="0:1,1:3", fansums=True, workers=2, chunk_words=997, device=device))
    for x, y in zip(one, two, strict=True):
        np.testing.assert_array_equal(x.prompts, y.prompts)
        np.testing.assert_array_equal(x.delayeds, y.delayeds)
        np.testing.assert_array_equal(x.fansums, y.fansums)
        assert x.stats == y.stats


def test_delayed_fan_sums_match_the_span1_delayeds(tmp_path, sc, rng):
    src = P.cti_layout(sc, 1, 7)
    pr, de = sinos(src, rng)
    hdr = L.read_header(write(tmp_path, src, [(0, 10, pr, de)], rng), scanner=sc)
    h = only(histogram(hdr, fansums=True))
    np.testing.assert_array_equal(h.fansums, R.delayed_fan_sums(de[0], src))
    assert h.fansums[:, G.virtual_crystal(sc, np.arange(72))].sum() == 0 or de.sum() > 0


def test_tof_compressed_addresses_like_the_mct(tmp_path, rng):
    """mCT-style: span-3, view-mashed, TOF addresses (Siemens TOF order kept as stored)."""
    sc = small_scanner(tof_bins=3, tof_bin_ps=300.0, tof_fwhm_ps=500.0)
    src = P.cti_layout(sc, 3, 7, view_mashing=2, tof_mashing=1)
    pr, de = sinos(src, rng)
    hdr = L.read_header(write(tmp_path, src, [(0, 10, pr, de)], rng), scanner=sc)
    assert hdr.layout.tof_bins == 3 and hdr.layout.views == 18
    np.testing.assert_array_equal(only(histogram(hdr)).prompts, pr)
    summed = P.cti_layout(sc, 3, 7, view_mashing=4, tof_mashing=0)
    h = only(histogram(hdr, layout=summed))
    np.testing.assert_array_equal(h.prompts[0], pr.sum(0).reshape(-1, 9, 2, 48).sum(2))
    with pytest.raises(InputError, match="cannot rebin"):
        histogram(hdr, layout=P.cti_layout(sc, 5, 7, view_mashing=2, tof_mashing=0))


# ---------------------------------------------------------------- errors: one line, naming the file
def one_line(exc: pytest.ExceptionInfo, name: str) -> None:
    assert "\n" not in str(exc.value) and name in str(exc.value)


@pytest.fixture
def small_file(tmp_path, sc, rng):
    src = P.cti_layout(sc, 1, 5)
    return write(tmp_path, src, [(0, 20, *sinos(src, rng))], rng), src


def test_truncated_file(small_file, sc):
    header, _ = small_file
    with open(header.with_suffix(""), "ab") as fh:  # scan.l
        fh.write(b"\0\0")
    with pytest.raises(InputError, match="truncated") as exc:
        L.read_header(header, scanner=sc)
    one_line(exc, "scan.l")


def test_word_count_that_does_not_match(small_file, sc):
    header, _ = small_file
    text = header.read_text()
    words = int(text.split("%total listmode word counts := ")[1].split()[0])
    header.write_text(text.replace(f"word counts := {words}", f"word counts := {words + 7}"))
    with pytest.raises(InputError, match="says .* words, the file holds") as exc:
        L.read_header(header, scanner=sc)
    one_line(exc, "scan.l")
    assert L.read_header(header, scanner=sc, check_word_count=False).words == words


def test_address_outside_the_layout(tmp_path, sc, rng):
    src = P.cti_layout(sc, 1, 7)
    pr, de = sinos(src, rng)
    header = write(tmp_path, src, [(0, 5, pr, de)], rng)
    text = header.read_text()  # claim a smaller layout than the words use
    small = P.cti_layout(sc, 1, 5)
    text = text.replace("%maximum ring difference := 7", "%maximum ring difference := 5")
    text = text.replace(f"%number of segments := {len(src.segments)}", f"%number of segments := {len(small.segments)}")
    text = text.replace(f"{{{','.join(map(str, src.axial_counts))}}}", f"{{{','.join(map(str, small.axial_counts))}}}")
    header.write_text(text)
    hdr = L.read_header(header, scanner=sc)
    with pytest.raises(InputError, match="outside the header's") as exc:
        list(histogram(hdr, layout=small))
    one_line(exc, "scan.l")


def test_segment_table_that_does_not_match(small_file, sc):
    header, src = small_file
    table = ",".join(map(str, src.axial_counts))
    header.write_text(header.read_text().replace(table, "8,7,7"))
    with pytest.raises(InputError, match="segment table") as exc:
        L.read_header(header, scanner=sc)
    one_line(exc, "scan.l.hdr")


def test_time_marks_going_backwards(tmp_path, sc):
    src = P.cti_layout(sc, 1, 0)
    words = np.array([1 << 31 | 5, 1 << 30 | 3, 1 << 31 | 6, 1 << 30 | 4, 1 << 31 | 2, 1 << 30 | 1], "<u4")
    data = tmp_path / "back.l"
    data.write_bytes(words.tobytes())
    header = tmp_path / "back.l.hdr"
    header.write_text(S.format_header(S.header_items(src, data.name, words.size, 1)))
    hdr = L.read_header(header, scanner=sc)
    with pytest.raises(InputError, match="backwards") as exc:
        list(histogram(hdr, layout=src))
    one_line(exc, "back.l")


@pytest.mark.parametrize("key,value,match", [
    ("%SMS-MI header name space", "sinogram subheader", "not a PETLINK"),
    ("%LM event and tag words format (bits)", "64", "64-bit"),
    ("name of data file", "missing.l", "not found"),
    ("%number of projections", "40", "number of projections")])
def test_header_errors(small_file, sc, key, value, match):
    header, _ = small_file
    lines = [f"{key} := {value}" if line.split(":=")[0].strip() == key else line
             for line in header.read_text().splitlines()]
    header.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=match) as exc:
        L.read_header(header, scanner=sc)
    one_line(exc, "scan.l")


def test_unknown_scanner_and_bad_frames(small_file, sc):
    header, src = small_file
    with pytest.raises(InputError, match="unknown scanner"):
        L.read_header(header)  # 'hpc lm test' is no preset
    hdr = L.read_header(header, scanner=sc)
    for bad in ("60:0", "0:60,30:90", "a:b"):
        with pytest.raises(InputError, match="time frame"):
            histogram(hdr, frames=bad)


@pytest.mark.parametrize("device,workers,batch", [("cpu", 1, 0), ("numba", 1, 0), ("numba", 3, 0), ("numba", 2, 2500),
                                                  ("numba", 3, 4000)])
@pytest.mark.parametrize("mash", [1, 2])
def test_kernels_equal_numpy(tmp_path, sc, rng, monkeypatch, mash, device, workers, batch):
    """The torch path (device cpu here; cuda on a GPU) and the compiled one (1 and 3 threads; with
    view mashing the look-up-table branch; small batches and regions: many rounds per frame, each
    worker adding its own regions of everyone's events) give the numpy kernel's histograms, fan sums
    and statistics exactly, across chunk boundaries and frames."""
    if batch:
        monkeypatch.setattr("hpc.io.lmnumba.BATCH", batch)
        monkeypatch.setattr("hpc.io.lmnumba.REGION", 256)  # bytes: the small layout in ~40 regions
    src = P.cti_layout(sc, 1, 7)
    pr, de = sinos(src, rng, 0.5)
    hdr = L.read_header(write(tmp_path, src, [(0, 2000, pr, de)], rng), scanner=sc)
    dst = P.cti_layout(sc, 3, 6, view_mashing=mash)  # drops ring difference 7: the trash plane is used
    kw = dict(layout=dst, frames="0:0.7,0.7:2", fansums=True, chunk_words=1009)
    for a, b in zip(histogram(hdr, device="numpy", **kw), histogram(hdr, device=device, workers=workers, **kw),
                    strict=True):
        np.testing.assert_array_equal(a.prompts, b.prompts)
        np.testing.assert_array_equal(a.delayeds, b.delayeds)
        np.testing.assert_array_equal(a.fansums, b.fansums)
        assert a.stats == b.stats and a.stats["dropped_prompts"] > 0


def test_kernels_refuse_what_numpy_refuses(tmp_path, sc):
    src = P.cti_layout(sc, 1, 0)
    words = np.array([1 << 31 | 5, 1 << 30 | 3, 1 << 30 | (1 << 29), 1 << 31 | 6], "<u4")  # address 2**29
    data = tmp_path / "bad.l"
    data.write_bytes(words.tobytes())
    header = tmp_path / "bad.l.hdr"
    header.write_text(S.format_header(S.header_items(src, data.name, words.size, 1)))
    hdr = L.read_header(header, scanner=sc)
    for device in ("numpy", "cpu", "numba"):
        with pytest.raises(InputError, match="word 2 holds bin address 536870912, outside") as exc:
            list(histogram(hdr, layout=src, device=device))
        one_line(exc, "bad.l")
    with pytest.raises(InputError, match="device 'gpu'"):
        histogram(hdr, layout=src, device="gpu")


def test_sparse_events_address_the_scanners_full_layout(tmp_path, sc, rng):
    """A simulation of a few segments (span 1) written as list mode addressed like the scanner's
    full span-1 layout: histogramming the file back into the small layout gives the counts back."""
    small = P.cti_layout(sc, 1, 2)
    full = P.cti_layout(sc, 1, 7)
    pr, de = sinos(small, rng)
    header = write(tmp_path, full, [(0, 30, S.sparse_counts(pr, small, full), S.sparse_counts(de, small, full))], rng)
    hdr = L.read_header(header, scanner=sc)
    assert hdr.layout.planes == full.planes
    h = only(histogram(hdr, layout=small))
    np.testing.assert_array_equal(h.prompts, pr)
    np.testing.assert_array_equal(h.delayeds, de)
    assert h.stats["dropped_prompts"] == 0
    with pytest.raises(ValueError, match="span-1"):
        S.sparse_counts(pr, P.cti_layout(sc, 1, 2, view_mashing=2), full)


@pytest.mark.parametrize("device", ["numpy", "cpu", "numba"])
def test_check_is_called_between_chunks(tmp_path, sc, rng, device):
    """hpc convert's Ctrl-C: ``check`` runs before every chunk and what it raises stops the histogram."""
    src = P.cti_layout(sc, 1, 3)
    hdr = L.read_header(write(tmp_path, src, [(0, 100, *sinos(src, rng))], rng), scanner=sc)
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        list(histogram(hdr, layout=src, chunk_words=64, device=device, check=check))
    assert len(calls) == 3 and hdr.words > 3 * 64


@pytest.mark.parametrize("view_mashing", [1, 2])
@pytest.mark.parametrize("scanner", ["small", "mmr"])  # a plane shorter than 2**16 addresses, and longer
def test_compiled_kernel_at_every_plane_boundary(tmp_path, sc, rng, scanner, view_mashing):
    """The compiled kernel finds an address's plane with a table and one compare: the first and last
    address of every plane (and the layout's last address), prompts and delayeds, land where the
    numpy kernel puts them; the next address after the layout is refused in one line."""
    sc = sc if scanner == "small" else G.get_scanner("mmr")
    src = P.cti_layout(sc, 1, 7 if scanner == "small" else 60)
    stride = src.views * src.bins
    n = src.planes * stride
    firsts = np.arange(src.planes, dtype=np.int64) * stride
    addr = np.concatenate([firsts, firsts + stride - 1, firsts + stride // 2])
    prompt = rng.random(addr.size) < 0.7
    words = (addr | np.where(prompt, 1 << 30, 0)).astype("<u4")
    words = np.insert(words, [0, 5, words.size], [1 << 31 | 7, 1 << 31 | 8, 1 << 31 | 9])  # time marks
    data = tmp_path / "edges.l"
    data.write_bytes(words.tobytes())
    header = tmp_path / "edges.l.hdr"
    header.write_text(S.format_header(S.header_items(src, data.name, words.size, 1)))
    hdr = L.read_header(header, scanner=sc)
    dst = P.cti_layout(sc, 3 if scanner == "small" else 11, view_mashing=view_mashing)
    a = only(histogram(hdr, layout=dst, device="numpy"))
    b = only(histogram(hdr, layout=dst, device="numba", chunk_words=333))
    np.testing.assert_array_equal(a.prompts, b.prompts)
    np.testing.assert_array_equal(a.delayeds, b.delayeds)
    assert a.stats == b.stats and a.stats["marks"] == 3
    assert b.stats["prompts"] + b.stats["dropped_prompts"] == prompt.sum()
    bad = np.append(words, np.uint32(n | 1 << 30)).astype("<u4")
    data.write_bytes(bad.tobytes())
    header.write_text(S.format_header(S.header_items(src, data.name, bad.size, 1)))
    with pytest.raises(InputError, match=f"word {bad.size - 1} holds bin address {n}, outside") as exc:
        list(histogram(L.read_header(header, scanner=sc), layout=dst, device="numba", workers=2))
    one_line(exc, "edges.l")
