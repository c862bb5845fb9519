"""Sinogram-repair networks: a small registry of presets and the inpainting wrapper.

Every network maps ``(B, C, V, X)`` -> ``(B, 1, V, X)``: C = 2*context+1 neighbouring sinogram
slices whose centre channel (index C//2) is the corrupted slice to repair; V (views) and X (radial
bins) must divide by the preset's ``required_multiple`` (the loader pads to it).

    model = build_model(cfg.model, in_channels=5)      # a SinogramModel
    out = model(x, mask)                               # (B, 1, V, X); mask 1 = measured

Presets (``MODELS``):
- ``badblock``: the seed tutorial's network (three down blocks at base, 2*base, 4*base; five
  bottom layers; two transposed-conv up blocks with skips; Softplus(beta=5) so counts stay >= 0).
- ``unet``: a classic configurable UNet (depth, base width, norm, up-sampling mode, residual).
- ``light``: a small encoder-decoder (one pooling, one up-sampling) for speed.

With ``cfg.inpaint`` the output equals the input's centre slice on every measured pixel, bitwise:
only missing pixels (mask 0) come from the network.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from hpc.config import Config, ModelConfig
from hpc.registry import MODELS

GROUPS = 8  # GroupNorm groups (fewer when the width is not a multiple of 8)


# model.norm -> layer (the names are hpc.config.Norm's; tests/test_config.py checks they agree)
NORMS: dict[str, Callable[[int], nn.Module]] = {
    "batch": nn.BatchNorm2d,
    "instance": lambda c: nn.InstanceNorm2d(c, affine=True),
    "group": lambda c: nn.GroupNorm(math.gcd(GROUPS, c), c),
    "none": lambda c: nn.Identity(),
}


def norm_layer(kind: str, channels: int) -> nn.Module:
    """A 2-D normalization layer by name; ``none`` is the identity."""
    return NORMS[kind](channels)


def conv_norm_act(c_in: int, c_out: int, norm: str, act: nn.Module, stride: int = 1) -> nn.Sequential:
    """3x3 conv (no bias when a norm follows: the norm's shift replaces it) + norm + activation."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=norm == "none"),
        norm_layer(norm, c_out),
        act,
    )


def _lrelu() -> nn.Module:
    return nn.LeakyReLU(0.2, inplace=True)


def _relu() -> nn.Module:
    return nn.ReLU(inplace=True)


class BadBlockNet(nn.Module):
    """The seed tutorial's dead-block repair network, widths (base, 2*base, 4*base).

    Levels: full resolution (base), 1/2 (2*base), 1/4 (4*base); sizes must divide by 4.
    """

    def __init__(self, in_channels: int, out_channels: int = 1, base: int = 64, norm: str = "batch"):
        super().__init__()
        w1, w2, w3 = base, 2 * base, 4 * base

        def block(c_in: int, c_out: int, n: int, stride: int) -> nn.Sequential:
            # n conv+norm+LeakyReLU layers, the first one possibly strided (the down-sampling)
            layers = [conv_norm_act(c_in, c_out, norm, _lrelu(), stride)]
            layers += [conv_norm_act(c_out, c_out, norm, _lrelu()) for _ in range(n - 1)]
            return nn.Sequential(*layers)

        def up_convs(c_in: int, c_out: int) -> nn.Sequential:
            # after the skip concatenation: three 3x3 conv + LeakyReLU (no norm, as in the tutorial)
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1), _lrelu(),
                nn.Conv2d(c_out, c_out, 3, padding=1), _lrelu(),
                nn.Conv2d(c_out, c_out, 3, padding=1), _lrelu(),
            )

        self.down1 = block(in_channels, w1, 3, stride=1)
        self.down2 = block(w1, w2, 3, stride=2)
        self.down3 = block(w2, w3, 3, stride=2)
        self.bottom = block(w3, w3, 5, stride=1)
        self.up2 = nn.ConvTranspose2d(w3, w2, 4, stride=2, padding=1)  # exactly doubles H, W
        self.dec2 = up_convs(2 * w2, w2)
        self.up1 = nn.ConvTranspose2d(w2, w1, 4, stride=2, padding=1)
        self.dec1 = up_convs(2 * w1, w1)
        self.head = nn.Sequential(
            nn.Conv2d(w1, w1, 3, padding=1), _relu(),
            nn.Conv2d(w1, out_channels, 3, padding=1),
            nn.Softplus(beta=5),  # counts are non-negative
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.down1(x)  # (B, w1, V, X)
        s2 = self.down2(s1)  # (B, w2, V/2, X/2)
        y = self.bottom(self.down3(s2))  # (B, w3, V/4, X/4)
        y = self.dec2(torch.cat([self.up2(y), s2], dim=1))  # (B, w2, V/2, X/2)
        y = self.dec1(torch.cat([self.up1(y), s1], dim=1))  # (B, w1, V, X)
        return self.head(y)  # (B, out, V, X)


def double_conv(c_in: int, c_out: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        conv_norm_act(c_in, c_out, norm, _relu()),
        conv_norm_act(c_out, c_out, norm, _relu()),
    )


def up_layer(mode: str, c_in: int, c_out: int) -> nn.Module:
    """x2 up-sampling that also maps c_in -> c_out channels."""
    if mode == "transposed":
        return nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
    assert mode in ("nearest", "bilinear"), mode  # hpc.config.UpMode
    align = False if mode == "bilinear" else None
    return nn.Sequential(nn.Upsample(scale_factor=2, mode=mode, align_corners=align), nn.Conv2d(c_in, c_out, 1))


class UNet(nn.Module):
    """Classic UNet: ``depth`` max-poolings, widths base * 2**level, skip concatenations.

    With ``residual`` the network predicts a correction added to the centre input slice.
    """

    def __init__(self, in_channels: int, out_channels: int = 1, base: int = 32, depth: int = 4,
                 norm: str = "batch", up_mode: str = "transposed", residual: bool = False,
                 centre: int | None = None):
        super().__init__()
        widths = [base * 2**i for i in range(depth + 1)]
        self.residual = residual
        self.centre = in_channels // 2 if centre is None else centre  # the slice a residual adds to
        self.encoders = nn.ModuleList(
            [double_conv(in_channels, widths[0], norm)]
            + [double_conv(widths[i - 1], widths[i], norm) for i in range(1, depth + 1)]
        )
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList([up_layer(up_mode, widths[i + 1], widths[i]) for i in reversed(range(depth))])
        self.decoders = nn.ModuleList([double_conv(2 * widths[i], widths[i], norm) for i in reversed(range(depth))])
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        y = x  # (B, C, V, X)
        for i, enc in enumerate(self.encoders):
            y = enc(y if i == 0 else self.pool(y))  # (B, base*2**i, V/2**i, X/2**i)
            skips.append(y)
        skips.pop()  # the bottom level has no skip partner
        for up, dec in zip(self.ups, self.decoders, strict=True):
            y = dec(torch.cat([up(y), skips.pop()], dim=1))
        y = self.head(y)  # (B, out, V, X)
        if self.residual:
            y = y + x[:, self.centre : self.centre + 1]
        return y


class LightNet(nn.Module):
    """Small encoder-decoder: conv/norm/ReLU, one max-pooling, one nearest up-sampling."""

    def __init__(self, in_channels: int, out_channels: int = 1, base: int = 32, norm: str = "batch"):
        super().__init__()
        self.body = nn.Sequential(
            conv_norm_act(in_channels, base, norm, _relu()),  # (B, base, V, X)
            nn.MaxPool2d(2),
            conv_norm_act(base, 2 * base, norm, _relu()),  # (B, 2*base, V/2, X/2)
            conv_norm_act(2 * base, 2 * base, norm, _relu()),
            nn.Upsample(scale_factor=2, mode="nearest"),
            conv_norm_act(2 * base, base, norm, _relu()),  # (B, base, V, X)
            nn.Conv2d(base, out_channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def inpaint(pred: torch.Tensor, x_centre: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fully measured pixels (measured fraction 1) copied bitwise from ``x_centre`` (no rounding, no
    NaN from ``inf*0``, no gradient from ``pred``); gaps and partly measured bins are ``pred``, the
    full-count estimate (``hpc predict`` adds the lost fraction of it to the measured counts).

    pred, x_centre, mask: (B, 1, V, X); the result has the promoted dtype (fp32 under bf16 autocast).
    """
    return torch.where(mask >= 1, x_centre, pred)


class SinogramModel(nn.Module):
    """What ``build_model`` returns: checks sizes, runs ``net``, optionally inpaints.

    ``forward(x (B, C, V, X), mask (B, 1, V, X)) -> (B, 1, V, X)``; the mask (1 = measured) is used
    when ``inpainting`` is on and, with ``mask_input``, as a last input channel of ``net``; training,
    predict and export call every model the same way.
    """

    def __init__(self, net: nn.Module, in_channels: int, multiple: int, inpainting: bool,
                 mask_input: bool = False):
        super().__init__()
        self.net = net
        self.in_channels = in_channels
        self.centre = in_channels // 2
        self.multiple = multiple
        self.inpainting = inpainting
        self.mask_input = mask_input

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels, self.multiple)
        pred = self.net(torch.cat([x, mask.to(x.dtype)], 1) if self.mask_input else x)  # (B, C[+1], V, X)
        if self.inpainting:
            pred = inpaint(pred, x[:, self.centre : self.centre + 1], mask)
        return pred


def check_input(x: torch.Tensor, in_channels: int, multiple: int) -> None:
    """ValueError unless x is (B, in_channels, V, X) with V and X multiples of ``multiple``."""
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"model input: expected (B, {in_channels}, V, X), got {list(x.shape)}")
    v, b = x.shape[2], x.shape[3]
    if v % multiple != 0 or b % multiple != 0:
        raise ValueError(f"model input: views x bins {v}x{b} must both be multiples of {multiple} "
                         f"(pad the slices; data.pad_multiple)")


def _badblock(cfg: ModelConfig, in_channels: int) -> nn.Module:
    return BadBlockNet(in_channels, cfg.out_channels, cfg.base, cfg.norm)


def _unet(cfg: ModelConfig, in_channels: int) -> nn.Module:
    return UNet(in_channels, cfg.out_channels, cfg.base, cfg.depth, cfg.norm, cfg.up_mode, cfg.residual,
                centre=(in_channels - cfg.mask_input) // 2)  # a mask channel comes last


def _light(cfg: ModelConfig, in_channels: int) -> nn.Module:
    return LightNet(in_channels, cfg.out_channels, cfg.base, cfg.norm)


# model.name -> constructor (cfg, in_channels) -> nn.Module, with the size multiple its input needs
MODELS.register("badblock", multiple=lambda cfg: 4)(_badblock)
MODELS.register("unet", multiple=lambda cfg: 2**cfg.depth)(_unet)
MODELS.register("light", multiple=lambda cfg: 2)(_light)


def required_multiple(cfg: ModelConfig) -> int:
    """Views and bins must divide by this (the loader pads to it)."""
    return MODELS.meta(cfg.name)["multiple"](cfg)


def input_multiple(cfg: Config) -> int:
    """What the network's input is padded to: data.pad_multiple, or (0) what the model needs."""
    return cfg.data.pad_multiple or required_multiple(cfg.model)


def build_model(cfg: ModelConfig, in_channels: int) -> SinogramModel:
    """The configured preset wrapped in a SinogramModel (size checks + optional inpainting); ``cfg``
    as hpc.config.validate accepts it."""
    net = MODELS.get(cfg.name)(cfg, in_channels + cfg.mask_input)
    return SinogramModel(net, in_channels, required_multiple(cfg), cfg.inpaint, cfg.mask_input)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
