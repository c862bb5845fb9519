"""Model presets: shapes, size errors, parameter counts, torch.export / compile, inpainting."""
from __future__ import annotations

import pytest
import torch

from hpc.config import ModelConfig
from hpc.train.models import MODELS, build_model, count_parameters, inpaint, required_multiple

PRESETS = [
    ModelConfig(name="badblock", base=4),
    ModelConfig(name="unet", base=4, depth=2, up_mode="transposed", norm="batch"),
    ModelConfig(name="unet", base=4, depth=3, up_mode="nearest", norm="group", residual=True),
    ModelConfig(name="unet", base=4, depth=1, up_mode="bilinear", norm="instance"),
    ModelConfig(name="unet", base=4, depth=2, norm="none"),
    ModelConfig(name="light", base=4),
]
IDS = [f"{c.name}-d{c.depth}-{c.up_mode}-{c.norm}" for c in PRESETS]


def test_registry_lists_every_preset():
    assert set(MODELS) == {"badblock", "unet", "light"}
    assert [required_multiple(ModelConfig(name=n, depth=3)) for n in ("badblock", "unet", "light")] == [4, 8, 2]


@pytest.mark.parametrize("cfg", PRESETS, ids=IDS)
def test_shapes_and_odd_sizes(cfg):
    torch.manual_seed(0)
    model = build_model(cfg, in_channels=5)
    m = required_multiple(cfg)
    x = torch.rand(2, 5, 3 * m, 5 * m)
    mask = torch.ones(2, 1, 3 * m, 5 * m)
    assert model(x, mask).shape == (2, 1, 3 * m, 5 * m)
    with pytest.raises(ValueError, match=f"multiples of {m}"):
        model(torch.rand(1, 5, 3 * m + 1, 5 * m), mask)
    with pytest.raises(ValueError, match=f"multiples of {m}"):
        model(torch.rand(1, 5, 3 * m, 5 * m + m // 2), mask)  # e.g. divisible by 2, not 4
    with pytest.raises(ValueError, match=r"expected \(B, 5, V, X\)"):
        model(torch.rand(1, 3, 3 * m, 5 * m), mask)


def test_badblock_output_is_non_negative():
    model = build_model(ModelConfig(name="badblock", base=4, inpaint=False), in_channels=5)
    x = torch.randn(3, 5, 8, 12) * 10
    assert (model(x, torch.ones(3, 1, 8, 12)) >= 0).all()


def _conv(c_in: int, c_out: int, k: int = 3, bias: bool = True) -> int:
    return k * k * c_in * c_out + (c_out if bias else 0)


def test_badblock_parameter_count_by_hand():
    # The architecture from the issue, counted here independently of hpc.train.models:
    # convs followed by BatchNorm have no bias; BatchNorm has 2 parameters per channel.
    b, c = 4, 5
    w1, w2, w3 = b, 2 * b, 4 * b
    cbn = lambda i, o: _conv(i, o, bias=False) + 2 * o  # noqa: E731
    down1 = cbn(c, w1) + 2 * cbn(w1, w1)
    down2 = cbn(w1, w2) + 2 * cbn(w2, w2)  # the first one strided
    down3 = cbn(w2, w3) + 2 * cbn(w3, w3)
    bottom = 5 * cbn(w3, w3)
    up2 = _conv(w3, w2, k=4) + _conv(2 * w2, w2) + 2 * _conv(w2, w2)
    up1 = _conv(w2, w1, k=4) + _conv(2 * w1, w1) + 2 * _conv(w1, w1)
    head = _conv(w1, w1) + _conv(w1, 1)
    expected = down1 + down2 + down3 + bottom + up2 + up1 + head
    assert count_parameters(build_model(ModelConfig(name="badblock", base=b), c)) == expected


def test_badblock_default_width_parameter_count():
    # the tutorial's width 64: counted by the same rule, as a number a reader can check
    cbn = lambda i, o: _conv(i, o, bias=False) + 2 * o  # noqa: E731
    expected = (cbn(5, 64) + 2 * cbn(64, 64) + cbn(64, 128) + 2 * cbn(128, 128) + cbn(128, 256)
                + 7 * cbn(256, 256) + _conv(256, 128, k=4) + _conv(256, 128) + 2 * _conv(128, 128)
                + _conv(128, 64, k=4) + _conv(128, 64) + 2 * _conv(64, 64) + _conv(64, 64) + _conv(64, 1))
    assert count_parameters(build_model(ModelConfig(name="badblock"), 5)) == expected


def test_unet_parameter_count_by_hand():
    b, c = 4, 3
    dc = lambda i, o: _conv(i, o, bias=False) + 2 * o + _conv(o, o, bias=False) + 2 * o  # noqa: E731
    enc = dc(c, b) + dc(b, 2 * b) + dc(2 * b, 4 * b)
    dec = (_conv(4 * b, 2 * b, k=2) + dc(4 * b, 2 * b)) + (_conv(2 * b, b, k=2) + dc(2 * b, b))
    expected = enc + dec + _conv(b, 1, k=1)
    assert count_parameters(build_model(ModelConfig(name="unet", base=b, depth=2), c)) == expected


def test_inpainting_leaves_measured_pixels_bitwise_unchanged():
    torch.manual_seed(1)
    model = build_model(ModelConfig(name="unet", base=4, depth=2, inpaint=True), in_channels=5).eval()
    x = torch.randn(2, 5, 8, 12)
    mask = (torch.rand(2, 1, 8, 12) > 0.4).float()
    out = model(x, mask)
    measured = mask.bool()
    centre = x[:, 2:3]
    assert torch.equal(out[measured], centre[measured])
    pred = model.net(x)
    assert torch.equal(out[~measured], pred[~measured])
    # a non-finite prediction must not leak into measured pixels (x*m + inf*0 would give NaN)
    bad = torch.full_like(pred, float("inf"))
    assert torch.equal(inpaint(bad, centre, mask)[measured], centre[measured])


def test_inpainting_gives_no_gradient_through_measured_pixels():
    model = build_model(ModelConfig(name="light", base=4, inpaint=True), in_channels=1)
    x = torch.rand(1, 1, 4, 4)
    mask = torch.ones(1, 1, 4, 4)
    model(x, mask).sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("cfg", [PRESETS[0], PRESETS[2], PRESETS[5]], ids=[IDS[0], IDS[2], IDS[5]])
def test_torch_export_matches_eager(cfg):
    # torch.export is the graph capture that ONNX export and AOT tools use (torch.jit is deprecated)
    model = build_model(cfg, in_channels=5).eval()
    m = required_multiple(cfg)
    x = torch.rand(2, 5, 2 * m, 3 * m)
    mask = (torch.rand(2, 1, 2 * m, 3 * m) > 0.5).float()
    exported = torch.export.export(model, (x, mask)).module()
    assert torch.equal(exported(x, mask), model(x, mask))


@pytest.mark.slow  # inductor compiles C++ kernels: ~25 s on 2 cores
def test_torch_compile_matches_eager():
    torch.manual_seed(2)
    model = build_model(ModelConfig(name="light", base=2), in_channels=3).eval()
    x = torch.rand(1, 3, 8, 8)
    mask = (torch.rand(1, 1, 8, 8) > 0.5).float()
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, mask), model(x, mask), rtol=1e-5, atol=1e-6)


def test_inpainting_under_bf16_autocast_keeps_measured_pixels_in_float32():
    model = build_model(ModelConfig(name="badblock", base=4), in_channels=3).eval()
    x = torch.rand(1, 3, 8, 8) * 1000 + 0.123456789  # values that bf16 cannot represent
    mask = (torch.rand(1, 1, 8, 8) > 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, mask)
    assert out.dtype == torch.float32
    assert torch.equal(out[mask.bool()], x[:, 1:2][mask.bool()])


def test_unet_residual_adds_the_centre_slice():
    model = build_model(ModelConfig(name="unet", base=4, depth=1, residual=True, inpaint=False), in_channels=3)
    head = model.net.head
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    x = torch.rand(2, 3, 4, 6)
    assert torch.equal(model(x, torch.ones(2, 1, 4, 6)), x[:, 1:2])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_mask_input_is_one_more_channel_the_output_depends_on(name):
    cfg = ModelConfig(name=name, base=4, depth=1, norm="none", inpaint=False, mask_input=True)
    torch.manual_seed(0)
    model = build_model(cfg, in_channels=3).eval()
    first = next(m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 4  # 3 slices + the gap mask
    x = torch.rand(2, 3, 8, 8)
    m = torch.ones(2, 1, 8, 8)
    m2 = m.clone()
    m2[:, :, :, 3:5] = 0
    with torch.no_grad():
        assert not torch.equal(model(x, m), model(x, m2))


def test_unet_residual_with_mask_input_still_adds_the_centre_slice():
    cfg = ModelConfig(name="unet", base=4, depth=1, residual=True, inpaint=False, mask_input=True)
    model = build_model(cfg, in_channels=3)
    torch.nn.init.zeros_(model.net.head.weight)
    torch.nn.init.zeros_(model.net.head.bias)
    x = torch.rand(2, 3, 4, 6)
    assert torch.equal(model(x, torch.zeros(2, 1, 4, 6)), x[:, 1:2])  # not the mask channel
