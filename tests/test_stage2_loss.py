import math

import pytest
import torch

from villa.vlm.loss import symmetric_info_nce


def test_symmetric_info_nce_hand_computed():
    img = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # normalised inside -> [[1,0],[0,1]]
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    tau = 0.5
    # logits = img @ txt.T / tau = [[1, .6], [0, .8]] / .5 = [[2, 1.2], [0, 1.6]]
    i2t = (
        -math.log(math.exp(2) / (math.exp(2) + math.exp(1.2))) - math.log(math.exp(1.6) / (1 + math.exp(1.6)))
    ) / 2
    t2i = (
        -math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)))
    ) / 2
    expected = 0.5 * i2t + 0.5 * t2i
    assert symmetric_info_nce(img, txt, tau=tau).item() == pytest.approx(expected, rel=1e-6)


def test_symmetric_info_nce_default_tau_and_gradient():
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(5, 4, generator=gen, requires_grad=True)
    txt = torch.randn(5, 4, generator=gen)
    loss = symmetric_info_nce(img, txt)
    loss.backward()
    assert img.grad is not None and torch.isfinite(img.grad).all()
    # perfectly aligned, well-separated pairs give a near-zero loss at tau = 0.07
    assert symmetric_info_nce(torch.eye(4), torch.eye(4)).item() < 1e-4
