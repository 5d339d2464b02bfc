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


def test_whole_image_rows_marks_the_first_pair_of_each_image():
    from villa.vlm.loss import whole_image_rows

    boxes = torch.tensor([[0, 0, 0, 9, 9], [0, 1, 1, 3, 3], [0, 2, 2, 4, 4], [1, 0, 0, 9, 9], [2, 0, 0, 9, 9],
                          [2, 5, 5, 6, 6]], dtype=torch.float32)  # fmt: skip
    assert whole_image_rows(boxes).tolist() == [True, False, False, True, True, False]


def test_separate_info_nce_is_the_sum_of_two_group_losses():
    from villa.vlm.loss import separate_info_nce

    gen = torch.Generator().manual_seed(1)
    img = torch.randn(7, 4, generator=gen)
    txt = torch.randn(7, 4, generator=gen)
    whole = torch.tensor([True, False, False, True, False, True, False])
    expected = symmetric_info_nce(img[whole], txt[whole]) + symmetric_info_nce(img[~whole], txt[~whole])
    assert separate_info_nce(img, txt, whole).item() == pytest.approx(expected.item(), rel=1e-6)
    assert separate_info_nce(img, txt, whole).item() != pytest.approx(
        symmetric_info_nce(img, txt).item(), rel=1e-3
    )
    # whole-image pairs only (the CLIP baseline): the same loss as pooling them
    everything = torch.ones(7, dtype=torch.bool)
    assert separate_info_nce(img, txt, everything).item() == pytest.approx(
        symmetric_info_nce(img, txt).item()
    )


def test_whole_image_rows_on_a_dataset_batch():
    """Shuffled indices and an image without region pairs: the marked rows are exactly each image's whole pair."""
    from villa.vlm.data import RegionTextDataset
    from villa.vlm.loss import whole_image_rows

    offsets = [0, 2, 3, 6]  # image 1 has its whole pair only
    boxes = torch.tensor(
        [[0, 0, 8, 8], [1, 1, 3, 3], [0, 0, 8, 8], [0, 0, 8, 8], [2, 2, 4, 4], [4, 4, 6, 6]]
    ).float()
    text = torch.arange(6, dtype=torch.float32)[:, None]  # row id as the "embedding"
    dataset = RegionTextDataset(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), offsets, boxes, text)
    batch = dataset.__getitems__([2, 0, 1])
    whole = whole_image_rows(batch["boxes"])
    assert whole.tolist() == [True, False, False, True, False, True]
    assert batch["text"][whole, 0].tolist() == [3.0, 0.0, 2.0]  # the first pair of images 2, 0 and 1


def test_region_text_loss_separate_keeps_a_whole_image_out_of_its_own_sentences_negatives():
    """Image 0's caption is also one of its region sentences: pooled, that sentence is a hard negative of the
    whole image; separate, the two are in different groups. The groups are uneven, so marking the wrong pair of
    an image as its whole pair would put the two copies in one group again."""
    from villa.vlm.run import RegionTextLoss

    class OneHot(torch.nn.Module):
        def forward(self, images, boxes):  # one embedding per pair, chosen by the box's x1
            return torch.nn.functional.one_hot(boxes[:, 1].long(), 4).float()

    batch = {
        "images": torch.zeros(2, 3, 4, 4, dtype=torch.uint8),
        # image 0: whole pair, a region with the same embedding and text, another region; image 1: whole, region
        "boxes": torch.tensor(
            [[0, 0, 0, 4, 4], [0, 0, 0, 2, 2], [0, 1, 0, 2, 2], [1, 2, 0, 4, 4], [1, 3, 0, 2, 2]]
        ).float(),
        "text": torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 2, 3]), 4).float(),
    }
    pooled, n = RegionTextLoss(whole_image_pairs="pooled")(OneHot(), batch)
    separate, m = RegionTextLoss(whole_image_pairs="separate")(OneHot(), batch)
    assert n == m == 5
    assert separate.item() < 1e-4 and pooled.item() > 0.1
    with pytest.raises(Exception, match="whole_image_pairs"):
        RegionTextLoss(whole_image_pairs="both")
