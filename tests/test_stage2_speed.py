"""The fast stage-2 region head is the reference recipe: outputs, gradients and BatchNorm statistics agree.

The reference below is spelled out with open_clip's own modules and torchvision's RoIAlign, so a change to
``RegionImageEncoder.forward`` that changes results (not only rounding) fails here.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.ops import roi_align

import villa.encoders.ops as encoder_ops
from villa.encoders import boxes_with_batch_index, get_encoder
from villa.encoders.clip_resnet import apply_roi_matrices, roi_align_matrices

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def default_encoder():
    return get_encoder("default", device="cpu")


def reference_embed(model, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The reference recipe (docs/method.md section 3.2) with no villa shortcut: stem + layer1-3, torchvision RoIAlign, layer4, stock pool."""
    v = model.visual
    feats = v.layer3(v.layer2(v.layer1(v.stem(images))))
    rois = roi_align(
        feats,
        boxes,
        (14, 14),
        spatial_scale=feats.shape[-1] / images.shape[-1],
        sampling_ratio=0,
        aligned=True,
    )
    return v.attnpool(v.layer4(rois))


def no_torchvision_roi_align(*args, **kwargs):
    raise AssertionError("the fast head must not call torchvision's roi_align")


def tiny_batch(size: int = 84) -> tuple[torch.Tensor, torch.Tensor]:
    """3 images, 7 boxes: whole images, DocMNIST cells, a box past the border and an empty one."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, size, size, generator=gen)
    s = size / 84
    per_image = [
        torch.tensor([[0, 0, 83, 83], [0, 0, 28, 28], [28, 56, 56, 84]]) * s,
        torch.tensor([[0, 0, 83, 83], [60, 10, 95, 40]]) * s,  # partly outside the image
        torch.tensor([[0, 0, 83, 83], [30, 30, 30, 30]]) * s,  # empty box
    ]
    return images, boxes_with_batch_index(per_image)


@pytest.mark.parametrize(
    ("height", "width", "image"), [(5, 5, 84), (7, 9, 100), (20, 30, 30)]
)  # (20, 30, 30): boxes wider than 14 feature pixels, i.e. several samples per bin
def test_roi_align_matrices_match_torchvision(height, width, image):
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(3, 6, height, width, generator=gen)
    n = 40
    xy = torch.rand(n, 2, generator=gen) * image * 1.2 - 0.1 * image
    wh = torch.rand(n, 2, generator=gen) * image * 0.8
    boxes = torch.cat([torch.randint(0, 3, (n, 1), generator=gen).float(), xy, xy + wh], 1)
    boxes[0, 1:] = torch.tensor([0.0, 0.0, image - 1.0, image - 1.0])
    boxes[1, 1:] = torch.tensor([30.0, 30.0, 20.0, 20.0])  # x2 < x1: RoIAlign gives zeros
    scale = width / image
    reference = roi_align(features, boxes, (14, 14), spatial_scale=scale, sampling_ratio=0, aligned=True)
    ours = apply_roi_matrices(features, boxes[:, 0].long(), roi_align_matrices(boxes, scale, height, width))
    assert reference.abs().max() > 1
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_fast_head_matches_reference_outputs_gradients_and_batchnorm(default_encoder, monkeypatch):
    """In float64 the reordered head is the reference to rounding (1e-14 measured): outputs, every parameter's
    gradient and the BatchNorm running statistics of a train-mode step. (In float32 a tiny batch puts a few
    pre-ReLU values within rounding of 0, and a flipped ReLU mask moves single gradient entries by percent in
    either path, so exactness is checked in float64 and float32 only for the forward below.)"""
    fast = default_encoder.build_image_model().double().train()
    ref = copy.deepcopy(fast)
    images, boxes = tiny_batch()
    images = images.double()
    with torch.no_grad():
        probe = copy.deepcopy(fast).eval()  # a train-mode forward here would move the BatchNorm statistics
        assert probe._fast_head_applies(probe.feature_map(images), len(boxes))
    weights = torch.randn(len(boxes), fast.output_dim, generator=torch.Generator().manual_seed(2)).double()

    with monkeypatch.context() as patch:
        patch.setattr(encoder_ops, "roi_align", no_torchvision_roi_align)  # where the recipe calls it
        out = fast(images, boxes)
    expected = reference_embed(ref, images, boxes.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    ref_params = dict(ref.named_parameters())
    checked = 0
    for name, param in fast.named_parameters():
        if param.grad is None:
            assert ref_params[name].grad is None or not ref_params[name].grad.any(), name
            continue
        scale = ref_params[name].grad.abs().max()
        assert scale > 0, name
        torch.testing.assert_close(
            param.grad / scale, ref_params[name].grad / scale, atol=1e-10, rtol=0, msg=name
        )
        checked += 1
    assert checked == sum(p.requires_grad for p in fast.parameters())
    assert fast.visual.layer4[0].conv1.weight.grad.abs().sum() > 0  # the moved convolutions still learn
    assert fast.visual.layer4[0].downsample[1].weight.grad.abs().sum() > 0
    # train-mode BatchNorm saw the same crops: same running statistics
    ref_buffers = dict(ref.named_buffers())
    for name, buf in fast.named_buffers():
        torch.testing.assert_close(buf, ref_buffers[name], atol=1e-12, rtol=1e-10, msg=name)

    fast.eval(), ref.eval()
    with torch.no_grad(), monkeypatch.context() as patch:
        patch.setattr(encoder_ops, "roi_align", no_torchvision_roi_align)  # where the recipe calls it
        torch.testing.assert_close(
            fast(images, boxes), reference_embed(ref, images, boxes.double()), atol=1e-10, rtol=1e-10
        )


def test_fast_head_float32_forward_matches_reference(default_encoder, monkeypatch):
    model = default_encoder.build_image_model()
    images, boxes = tiny_batch()
    for train in (True, False):
        fast, ref = copy.deepcopy(model).train(train), copy.deepcopy(model).train(train)
        with torch.no_grad(), monkeypatch.context() as patch:
            patch.setattr(encoder_ops, "roi_align", no_torchvision_roi_align)  # where the recipe calls it
            out = fast(images, boxes)
        with torch.no_grad():
            expected = reference_embed(ref, images, boxes)
        scale = expected.abs().max()
        assert out.dtype == torch.float32 and scale > 0
        torch.testing.assert_close(out / scale, expected / scale, atol=1e-4, rtol=0)


def test_large_feature_maps_fall_back_to_the_reference_path(default_encoder):
    model = default_encoder.build_image_model()
    images, boxes = tiny_batch(size=256)  # 16x16 map: 256 positions > 196 per crop
    assert not model._fast_head_applies(model.feature_map(images), len(boxes))
    with torch.no_grad():
        torch.testing.assert_close(
            model(images, boxes), reference_embed(model, images, boxes), atol=1e-5, rtol=1e-4
        )


def test_layer4_that_does_not_start_with_pointwise_convs_falls_back(default_encoder, monkeypatch):
    """The reordering is only taken when layer4's first block is open_clip's Bottleneck read through
    bias-free 1x1 convolutions; any other layer4 (here conv1 with a bias) runs the reference recipe."""
    model = default_encoder.build_image_model().eval()
    block = model.visual.layer4[0]
    conv = block.conv1
    block.conv1 = torch.nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=True)
    images, boxes = tiny_batch()
    assert not model._fast_head_applies(model.feature_map(images), len(boxes) * 64)
    called = []
    monkeypatch.setattr(model, "_fast_head", lambda *a: called.append(a))
    with torch.no_grad():
        torch.testing.assert_close(
            model(images, boxes), reference_embed(model, images, boxes), atol=1e-5, rtol=1e-4
        )
    assert not called


LARGE_TENSOR_IN_HEAP = """
import sys, torch
from villa.engine.device import keep_cpu_memory
if sys.argv[1] == "keep":
    assert keep_cpu_memory() and keep_cpu_memory()  # idempotent
x = torch.ones(16_000_000)  # 64 MB: above glibc's largest mmap threshold (32 MiB)
ptr = x.data_ptr()
for line in open("/proc/self/maps"):
    if line.rstrip().endswith("[heap]"):
        lo, hi = (int(a, 16) for a in line.split()[0].split("-"))
        if lo <= ptr < hi:
            print("heap")
            break
else:
    print("mmap")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator setting")
def test_keep_cpu_memory_serves_large_tensors_from_the_heap():
    """glibc mmaps (and on free unmaps) every block above 32 MiB, so each large activation of a training
    step faulted its pages in again; after ``keep_cpu_memory`` such blocks come from the heap, which is
    never trimmed, and a training loop reuses them. Fresh processes: the allocator state of this one
    depends on the tests before it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    where = {
        mode: subprocess.run(
            [sys.executable, "-c", LARGE_TENSOR_IN_HEAP, mode],
            env=env, capture_output=True, text=True, check=True, timeout=120,
        ).stdout.split()[-1]
        for mode in ("default", "keep")
    }  # fmt: skip
    assert where == {"default": "mmap", "keep": "heap"}
