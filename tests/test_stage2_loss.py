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


def test_same_text_pairs_can_be_left_out_of_each_others_negatives():
    # pairs 0 and 1 share a text: without same_text_negatives each is scored against pair 2 only
    img = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    tau = 0.5
    logits = (img @ txt.T / tau).tolist()

    def ce(row, keep, target):
        return -math.log(math.exp(row[target]) / sum(math.exp(row[j]) for j in keep))

    columns = [[logits[i][j] for i in range(3)] for j in range(3)]
    i2t = (ce(logits[0], [0, 2], 0) + ce(logits[1], [1, 2], 1) + ce(logits[2], [0, 1, 2], 2)) / 3
    t2i = (ce(columns[0], [0, 2], 0) + ce(columns[1], [1, 2], 1) + ce(columns[2], [0, 1, 2], 2)) / 3
    got = symmetric_info_nce(img, txt, tau=tau, same_text_negatives=False)
    assert got.item() == pytest.approx(0.5 * i2t + 0.5 * t2i, rel=1e-6)
    assert symmetric_info_nce(img, txt, tau=tau).item() > got.item()  # the reference counts them as negatives
