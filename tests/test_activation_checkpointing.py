"""Activation checkpointing of the stage-2 towers: same outputs, gradients and BatchNorm statistics as the plain
forward, and activations really not kept."""

from __future__ import annotations

import pytest
import torch

from villa.encoders import get_encoder


def _batch(seed: int = 0, size: int = 84):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(3, 3, size, size, generator=gen)
    boxes = torch.tensor(
        [[0, 0, 0, 40, 40], [0, 30, 20, 84, 80], [1, 5, 5, 60, 70], [2, 10, 40, 50, 84], [2, 0, 0, 84, 84]],
        dtype=torch.float32,
    )
    return images, boxes


def _train_step(model, images, boxes):
    model.train()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = model(images, boxes)
    (out.square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return out.detach(), grads, buffers, sum(saved)


@pytest.mark.parametrize("encoder", ["default", "mobilenet_v2"])
def test_checkpointed_tower_equals_the_plain_one(encoder):
    enc = get_encoder(encoder, device="cpu")
    images, boxes = _batch()
    results = []
    for on in (False, True):
        torch.manual_seed(0)
        model = enc.build_image_model().double()
        model.activation_checkpointing = on
        results.append(_train_step(model, images.double(), boxes))
    (o1, g1, b1, kept1), (o2, g2, b2, kept2) = results
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    assert g1.keys() == g2.keys() and len(g1) > 10
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-12, atol=1e-12, msg=name)
    # running statistics updated once per step, as without checkpointing (not twice by the recomputation)
    for name in b1:
        torch.testing.assert_close(b1[name], b2[name], rtol=0, atol=0, msg=name)
    assert kept2 < kept1 / 3  # the activations of the segments are not kept for the backward pass


def test_eval_and_no_grad_ignore_the_setting():
    enc = get_encoder("default", device="cpu")
    images, boxes = _batch(1)
    torch.manual_seed(0)
    model = enc.build_image_model().eval()
    model.activation_checkpointing = True
    with torch.no_grad():
        out = model(images, boxes)
    model.activation_checkpointing = False
    with torch.no_grad():
        torch.testing.assert_close(model(images, boxes), out, rtol=0, atol=0)
