"""Scores of repaired sinograms and of the images reconstructed from them; definitions in
docs/EVALUATION.md. Everything is kept as float64 SUMS over pixels, so a study's score and the
pooled score of many studies (``add``) are the same formulas over more pixels: no averages of
averages, and slices without gaps weigh nothing in the gap metrics.

Sinogram scores (``SinoScore``), against a reference ``ref`` (the measured target, or the noise-free
expected counts), over the valid pixels (virtual-crystal LORs excluded) of the gaps (measured
fraction w < 1) or of all:
    NMSE = sum (pred - ref)^2 / sum ref^2
    PSNR = 10 log10(peak^2 / (sum (pred - ref)^2 / n)), peak = the largest reference value scored
    SSIM = mean of the SSIM map (hpc.train.metrics.ssim_maps, per-slice data range = the slice's ref max)
           over the window positions (gaps: the windows centred on a gap pixel)
Image scores (``ImageScore``), against a reference reconstruction, inside the field of view:
    NMSE and SSIM as above (SSIM data range = the reference image's max), and for each lesion the
    relative bias of its ROI mean, mean(method) / mean(reference) - 1.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from hpc.train.metrics import PSNR_CAP, SSIM_WIN, ssim_maps

SINO_FIELDS = ("sse_gap", "energy_gap", "n_gap", "sse_all", "energy_all", "n_all",
               "ssim_gap", "ssim_gap_n", "ssim_all", "ssim_all_n")
SINO_METRICS = ("nmse_gap", "psnr_gap", "ssim_gap", "nmse_all", "psnr_all", "ssim_all")
IMAGE_ITERS, IMAGE_SUBSETS = 4, 8  # OSEM of the image-domain evaluation (every version alike)
IMAGE_METRICS = ("img_nmse", "img_ssim", "lesion_bias", "lesion_absbias")


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def psnr(peak: float, sse: float, n: float) -> float:
    """10 log10(peak^2 / MSE), capped at PSNR_CAP dB; NaN when nothing was scored."""
    if n <= 0 or peak <= 0:
        return math.nan
    mse = sse / n
    return PSNR_CAP if mse <= peak ** 2 * 10 ** (-PSNR_CAP / 10) else 10 * math.log10(peak ** 2 / mse)


def _ssim_sums(pred: torch.Tensor, ref: torch.Tensor, where: torch.Tensor | None) -> tuple[float, float]:
    """(sum of the SSIM map, count) over window positions (all, or those centred where ``where``);
    pred, ref (B, H, W) float64, per-image data range = ref max."""
    if min(ref.shape[-2:]) < SSIM_WIN:
        return 0.0, 0.0
    peak = ref.flatten(1).amax(1)
    s, _ = ssim_maps(pred[:, None], ref[:, None], peak)  # (B, 1, h, w)
    if where is None:
        return float(s.sum()), float(s.numel())
    r = (SSIM_WIN - 1) // 2
    c = where[:, None, r:where.shape[-2] - r, r:where.shape[-1] - r].double()
    return float((s * c).sum()), float(c.sum())


class SinoScore:
    """Sums for one (method, reference) pair; ``update`` per batch of slices, ``add`` to pool."""

    def __init__(self) -> None:
        self.sums = dict.fromkeys(SINO_FIELDS, 0.0)
        self.peak = 0.0

    def update(self, pred: np.ndarray, ref: np.ndarray, w: np.ndarray, valid: np.ndarray) -> None:
        """pred, ref (B, V, X) counts; w (B, V, X) measured fraction; valid (B, V, X) or (V, X) bool."""
        p, r = torch.as_tensor(pred, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64)
        ok = torch.as_tensor(np.broadcast_to(valid, p.shape).copy())
        gap = ok & torch.as_tensor(np.asarray(w) < 1)
        err, energy = (p - r) ** 2, r ** 2
        s = self.sums
        for region, sel in (("gap", gap), ("all", ok)):
            s[f"sse_{region}"] += float(err[sel].sum())
            s[f"energy_{region}"] += float(energy[sel].sum())
            s[f"n_{region}"] += float(sel.sum())
        p0, r0 = torch.where(ok, p, 0.0), torch.where(ok, r, 0.0)  # invalid pixels are 0 in both
        for region, sel in (("gap", gap), ("all", None)):
            a, n = _ssim_sums(p0, r0, sel)
            s[f"ssim_{region}"] += a
            s[f"ssim_{region}_n"] += n
        if ok.any():
            self.peak = max(self.peak, float(r[ok].max()))

    def add(self, other: SinoScore) -> SinoScore:
        for k, v in other.sums.items():
            self.sums[k] += v
        self.peak = max(self.peak, other.peak)
        return self

    def compute(self) -> dict[str, float]:
        s = self.sums
        out = {}
        for region in ("gap", "all"):
            out[f"nmse_{region}"] = _ratio(s[f"sse_{region}"], s[f"energy_{region}"])
            out[f"psnr_{region}"] = psnr(self.peak, s[f"sse_{region}"], s[f"n_{region}"])
            out[f"ssim_{region}"] = _ratio(s[f"ssim_{region}"], s[f"ssim_{region}_n"])
        return out


class ImageScore:
    """Sums for one (method, reference reconstruction) pair of image stacks."""

    def __init__(self) -> None:
        self.sse = self.energy = self.ssim = self.ssim_n = 0.0
        self.bias: list[float] = []

    def update(self, img: np.ndarray, ref: np.ndarray, support: np.ndarray, rois: list[tuple[int, np.ndarray]]
               ) -> None:
        """img, ref (N, ny, nx); support (ny, nx) bool (field of view); rois [(image index, (ny, nx) bool)]."""
        a, b = torch.as_tensor(img, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64)
        sup = torch.as_tensor(support)
        a, b = a * sup, b * sup
        self.sse += float(((a - b) ** 2).sum())
        self.energy += float((b ** 2).sum())
        s, n = _ssim_sums(a, b, None)
        self.ssim, self.ssim_n = self.ssim + s, self.ssim_n + n
        for k, roi in rois:
            ref_mean = float(b[k][torch.as_tensor(roi)].mean())
            if ref_mean > 0:
                self.bias.append(float(a[k][torch.as_tensor(roi)].mean()) / ref_mean - 1)

    def add(self, other: ImageScore) -> ImageScore:
        self.sse, self.energy = self.sse + other.sse, self.energy + other.energy
        self.ssim, self.ssim_n = self.ssim + other.ssim, self.ssim_n + other.ssim_n
        self.bias = self.bias + other.bias
        return self

    def compute(self) -> dict[str, float]:
        b = np.asarray(self.bias)
        return {"img_nmse": _ratio(self.sse, self.energy), "img_ssim": _ratio(self.ssim, self.ssim_n),
                "lesion_bias": float(b.mean()) if b.size else math.nan,
                "lesion_absbias": float(np.abs(b).mean()) if b.size else math.nan}


def lesion_rois(lesions: list[dict], plane_z: np.ndarray, grid, min_pixels: int = 1) -> list[tuple[int, np.ndarray]]:
    """ROIs of the lesions in the images at axial positions ``plane_z`` (mm from the first ring's
    centre, the simulator's lesion ``z``): the pixels whose centres lie in the lesion's cross-section
    there (an ellipsoid: semi-axes scaled by sqrt(1 - u^2), u = (z - z_lesion) / z_half), for the
    planes within the central 70 % of its axial extent (partial-volume edges left out)."""
    x, y = grid.centres()
    px, py = np.meshgrid(x, y)  # (ny, nx)
    out = []
    for les in lesions:
        for k, z in enumerate(np.asarray(plane_z, np.float64)):
            u = (z - les["z"]) / les["z_half"]
            if abs(u) >= 0.7:
                continue
            scale = math.sqrt(1 - u * u)
            c, s = math.cos(les["rotation"]), math.sin(les["rotation"])
            dx, dy = px - les["x"], py - les["y"]
            inside = ((dx * c + dy * s) / (les["a"] * scale)) ** 2 + ((dy * c - dx * s) / (les["b"] * scale)) ** 2 <= 1
            if inside.sum() >= min_pixels:
                out.append((k, inside))
    return out
