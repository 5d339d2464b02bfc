"""RoIAlign as the towers run it: the separable CPU training path, exact boxes under bf16, and the rich
descriptor's per-region convolution bank, each against torchvision's kernel on the whole map."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from villa.encoders.ops import roi_align_boxes, roi_align_separable


def _boxes(generator: torch.Generator, images: int, height: int, width: int, count: int) -> torch.Tensor:
    """``[count, 5]`` boxes in random image order, some past the edges, one degenerate; image 1 gets none."""
    index = torch.randint(0, images, (count,), generator=generator)
    index[index == 1] = 0
    corner = torch.rand(count, 2, generator=generator) * torch.tensor([width * 1.1, height * 1.1]) - 3
    size = torch.rand(count, 2, generator=generator) * torch.tensor([width * 0.6, height * 0.6])
    boxes = torch.cat([index[:, None].float(), corner, corner + size], 1)
    boxes[0, 1:] = torch.tensor([0.0, 0.0, width, height])
    boxes[1, 1:] = torch.tensor([width - 2.5, height - 1.5, width + 1.0, height + 4.0])
    boxes[2, 1:] = torch.tensor([5.0, 5.0, 5.0, 9.0])
    return boxes


def _reference(features: torch.Tensor, boxes: torch.Tensor, image_width: int, size: int) -> torch.Tensor:
    scale = features.shape[-1] / image_width
    return roi_align(features, boxes.to(features.dtype), (size, size), scale, sampling_ratio=0, aligned=True)


@pytest.mark.parametrize("channels_last", [False, True])
def test_separable_roi_align_equals_torchvision_with_its_gradient(channels_last):
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(4, 6, 9, 13, generator=gen, dtype=torch.float64)
    if channels_last:
        features = features.contiguous(memory_format=torch.channels_last)
    image_width = 52  # feature map at a quarter of the image's resolution
    boxes = _boxes(gen, 4, 36, image_width, 17).double()
    grad = torch.randn(len(boxes), 6, 7, 7, generator=gen, dtype=torch.float64)

    ours = features.clone().requires_grad_(True)
    theirs = features.clone().requires_grad_(True)
    out = roi_align_separable(ours, boxes, 13 / image_width, 7)
    want = _reference(theirs, boxes, image_width, 7)
    (out * grad).sum().backward()
    (want * grad).sum().backward()

    assert out.shape == want.shape == (17, 6, 7, 7)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-10, atol=1e-10)
    assert theirs.grad[1].abs().sum() == 0  # the image without boxes


def test_roi_align_boxes_takes_the_separable_path_when_a_cpu_gradient_flows(monkeypatch):
    import villa.encoders.ops as ops

    calls = []
    real = ops.roi_align_separable
    monkeypatch.setattr(ops, "roi_align_separable", lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(2, 3, 8, 8, generator=gen)
    boxes = _boxes(gen, 2, 8, 8, 5)
    with torch.no_grad():
        plain = roi_align_boxes(features, boxes, 8, 4)
    assert calls == []  # inference keeps torchvision's kernel
    trained = roi_align_boxes(features.requires_grad_(True), boxes, 8, 4)
    assert calls == [1]
    torch.testing.assert_close(trained.detach(), plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grad", [False, True])
def test_roi_align_boxes_keeps_box_coordinates_exact_on_bf16_features(grad):
    """bf16 holds 8 significant bits: a box edge at x = 300.7 would become 300 and sample 0.7 px off."""
    width = 640
    x = torch.arange(width, dtype=torch.float32)
    ramp = torch.sin(2 * x).expand(1, 1, 16, width).contiguous()  # changes fast along x
    boxes = torch.tensor([[0.0, 300.7, 2.3, 333.9, 13.6], [0.0, 511.3, 0.0, 601.1, 16.0]])
    want = _reference(ramp, boxes, width, 5)
    features = ramp.to(torch.bfloat16).requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        got = roi_align_boxes(features, boxes, width, 5)
    assert got.dtype == torch.bfloat16
    # bf16 rounding of values in [-1, 1]: under 1e-2; 0.7 px of sin(2x): up to about 1
    assert float((got.detach().float() - want).abs().max()) < 2e-2


def test_rich_bank_windows_equal_the_whole_map_convolution():
    from villa.encoders import get_encoder
    from villa.encoders.rich import RichRegionFeatures, _bank_windows_extent

    enc = get_encoder("default")
    rich = RichRegionFeatures(enc.build_image_model(), enc.dim).eval()
    gen = torch.Generator().manual_seed(2)
    images = torch.rand(3, 3, 41, 67, generator=gen)
    small = _boxes(gen, 3, 41, 67, 11)
    small[0, 1:] = torch.tensor([1.0, 2.0, 20.0, 18.0])  # no region covers a whole image here
    small[:, 3:] = torch.minimum(small[:, 3:], small[:, 1:3] + 25)
    responses = F.conv2d(images, rich.bank_weight, rich.bank_bias, padding=1).relu()
    with torch.inference_mode():
        lo_x, lo_y, wide, high = _bank_windows_extent(small, 1.0, 41, 67)
        assert float((wide * high).sum()) < 3 * 41 * 67  # so _bank_crops takes the windows
        windows = rich._bank_crops(images, small, 67)
        whole = rich._bank_full_maps(images, small, 67)
        every = _boxes(gen, 3, 41, 67, 9)  # large regions: the whole maps
        whole_large = rich._bank_crops(images, every, 67)
    torch.testing.assert_close(windows, _reference(responses, small, 67, 28), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(whole, _reference(responses, small, 67, 28), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole_large, _reference(responses, every, 67, 28), rtol=1e-5, atol=1e-5)
