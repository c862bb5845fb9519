"""Every extension point is one registry (hpc/registry.py): a toy entry added to each is accepted by
the config, trained or evaluated, and listed in `--help`, without touching any other file."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from hpc.baselines.stack import Stack
from hpc.cli import build_parser, main
from hpc.config import load_config
from hpc.errors import ConfigError
from hpc.io.sinogram import write_sinogram
from hpc.physics import geometry as G
from hpc.registry import BASELINES, DENOISERS, FILLS, LOSSES, MODELS, SCANNERS, Registry

from helpers import TINY, make_checkpoint, make_dataset, records


class Toy(nn.Module):
    """A 1x1 convolution: the smallest network the trainer can train."""

    def __init__(self, cfg, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, cfg.out_channels, 1)

    def forward(self, x):
        return self.conv(x)


def toy_loss(p, t, mask, weight, gaps_only):
    return (p - t).abs().mean() * 0.5


def toy_fill(cfg, scanner):
    def fill(x, mask, aux, valid):  # gaps get the slice's mean measured value
        mean = (x * (mask >= 1)).sum((-2, -1), keepdim=True) / (mask >= 1).sum((-2, -1), keepdim=True).clamp_min(1)
        return torch.where(mask > 0, x, mean)
    return fill


def toy_baseline(stack: Stack, planes: np.ndarray) -> np.ndarray:
    """Every gap gets the plane's mean measured value."""
    y, w = stack.y[planes], stack.w[planes]
    mean = (y * (w >= 1)).sum((1, 2), keepdims=True) / np.maximum((w >= 1).sum((1, 2), keepdims=True), 1)
    return np.where(w >= 1, y, w * y + (1 - w) * mean) * stack.valid[planes]


def toy_denoiser(d, planes: np.ndarray, k: float = 1.0) -> np.ndarray:
    """The low-dose counts scaled by k / dose: k = 1 is unbiased, k = 2 twice too high."""
    return np.where(d.valid[planes], k * d.y[planes] / d.dose, 0.0)


@pytest.fixture
def toys():
    """Register one toy entry in each registry, remove them afterwards."""
    MODELS.register("toy", multiple=lambda cfg: 1)(Toy)
    LOSSES.register("toy")(toy_loss)
    FILLS.register("toy")(toy_fill)
    BASELINES.register("toy", per_slice=True)(toy_baseline)
    SCANNERS.register("toy")(dataclasses.replace(G.get_scanner("test"), name="toy", aliases=()))
    DENOISERS.register("toy", tune={"k": (1.0, 2.0)})(toy_denoiser)
    yield
    for reg in (MODELS, LOSSES, FILLS, BASELINES, SCANNERS, DENOISERS):
        reg.unregister("toy")


def test_registry_lists_orders_and_refuses():
    reg: Registry = Registry("widget", "hpc.errors")
    reg.register("b")(1)
    reg.register("a", order=0)(2)
    assert reg.names() == ("a", "b") and reg.get("b") == 1 and reg.meta("a") == {"order": 0}
    with pytest.raises(ValueError, match=r"unknown widget 'c'; expected one of a \| b"):
        reg.get("c")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("b")(3)
    with pytest.raises(ValueError, match="letters, digits"):
        reg.register("a b")


def test_unregistered_names_are_refused_by_the_config():
    for override, registered in (("model.name=toy", "badblock | unet | light"), ("data.fill=toy", "zero | linear"),
                                 ("loss.toy=1", "l1 | mse | msssim | poisson")):
        with pytest.raises(ConfigError, match=registered):
            load_config(TINY, [override])


def test_toy_model_loss_and_fill_are_accepted_and_trained(toys, tmp_path):
    """model.name, loss.<term> and data.fill take the toy entries; the trainer trains with them and
    validation scores the toy baseline beside the model."""
    ds = make_dataset(tmp_path / "ds", studies=3, views=16, bins=16, mask=True, counts=True)
    run = tmp_path / "run"
    args = ["train", "--config", str(TINY), f"data.path={ds}", f"train.run_dir={run}", "model.name=toy",
            "loss.l1=0", "loss.toy=1", "data.fill=toy", "train.samples=16", "train.val_every=16"]
    assert main(args) == 0
    train, val = records(run, "train"), records(run, "val")
    assert train and all(np.isfinite(r["loss"]) for r in train)
    saved = load_config(run / "config.yaml")
    assert (saved.model.name, saved.loss.weights, saved.data.fill) == ("toy", {"l1": 0.0, "toy": 1.0}, "toy")
    assert "toy" in json.dumps(val[-1])  # the toy baseline's validation scores
    text = build_parser("train")[0].format_help()
    assert "toy" in text.split("model.name")[1].splitlines()[0]
    for key in ("loss.<term>", "data.fill", "corrupt.scanner"):
        assert "toy" in text.split(key)[1].splitlines()[0], key


def test_toy_scanner_is_accepted_and_simulated(toys, tmp_path):
    cfg = load_config(TINY, ["corrupt.scanner=toy", "corrupt.dead_blocks=2", "corrupt.use_stored_mask=false"])
    assert cfg.corrupt.scanner == "toy"
    assert "toy" in build_parser("simulate")[0].format_help()
    assert main(["simulate", "-o", str(tmp_path / "sim"), "--scanner", "toy", "--studies", "1"]) == 0
    assert "originating system := hpc test" in (tmp_path / "sim" / "s000.s.hdr").read_text()


def test_toy_baseline_is_evaluated_and_listed(toys, tmp_path):
    v = x = 16
    ckpt = tmp_path / "m.pt"
    make_checkpoint(ckpt, slice_shape=(v, x))
    target = (10 + np.arange(x, dtype=np.float32) + np.arange(v)[:, None])[None].repeat(2, 0)  # (2, V, X)
    mask = np.ones_like(target, np.uint8)
    mask[:, :, 5:9] = 0
    files = [write_sinogram(tmp_path / n, a, axial_counts=[2]) for n, a in
             (("g", target * mask), ("t", target), ("m", mask))]
    assert "toy" in build_parser("evaluate")[0].format_help()
    assert main(["evaluate", "--checkpoint", str(ckpt), "--study", *map(str, files), "-o", str(tmp_path / "ev"),
                 "--baselines", "toy,linear", "--quiet", "--no-images"]) == 0
    res = json.loads((tmp_path / "ev" / "metrics.json").read_text())["results"]["overall"]
    gap = mask == 0
    mean = (target * mask).sum((1, 2), keepdims=True) / mask.sum((1, 2), keepdims=True)
    want = (((mean - target)[np.broadcast_to(gap, target.shape)]) ** 2).sum() / (target[gap] ** 2).sum()
    assert res["toy"]["nmse_gap_meas"] == pytest.approx(want, rel=1e-6)
    assert res["linear"]["nmse_gap_meas"] < res["toy"]["nmse_gap_meas"]


def test_toy_denoiser_is_tuned_evaluated_and_listed(toys, tmp_path):
    """The toy's free parameter is tuned on validation studies (k = 1, the unbiased scale, must win
    over k = 2) and the toy is scored beside the registered denoisers."""
    sim = tmp_path / "sim"
    assert main(["simulate", "-o", str(sim), "--studies", "5", "--test-studies", "2", "--scanner", "test",
                 "--low-dose", "0.5", "--format", "stir"]) == 0
    assert "gauss" in build_parser("evaluate")[0].format_help()
    assert main(["evaluate", "--task", "denoise", "--simulation", str(sim), "--tune-on", "s000,s001,s002",
                 "--baselines", "toy,scaled", "-o", str(tmp_path / "ev"), "--quiet", "--no-images"]) == 0
    out = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    k = out["tuning"]["params"]["toy"]["k"]
    assert k["value"] == 1.0 and k["source"] == "tuned"
    res = out["results"]["overall"]
    assert res["toy"]["nmse_all_true"] == pytest.approx(res["scaled"]["nmse_all_true"], rel=1e-12)
