import math

import pytest
import torch

from villa.evaluation.metrics import auroc, metric_warnings, precision_at_k, r_precision, retrieval_metrics
from villa.evaluation.run import format_metrics, summary_keys


def test_r_precision_precision_at_k_hand_worked():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.5], [0.1, 0.2, 0.3, 0.4], [0.3, 0.2, 0.1, 0.0]])
    labels = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0]]).bool()
    rp = r_precision(scores, labels)
    # row 0: R = 2, top-2 = items 0, 1 -> one hit; row 1: R = 2, top-2 = items 3, 2 -> two hits
    assert rp[:2].tolist() == [0.5, 1.0]
    assert math.isnan(rp[2])
    p1 = precision_at_k(scores, labels, 1)
    assert p1[:2].tolist() == [1.0, 1.0]
    p3 = precision_at_k(scores, labels, 3)
    assert p3[:2].tolist() == pytest.approx([1 / 3, 2 / 3])
    # k larger than the number of items is capped at it
    assert precision_at_k(scores, labels, 10)[:2].tolist() == [0.5, 0.5]


def test_auroc_hand_worked_with_ties():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.5], [0.5, 0.5, 0.2, 0.7], [1.0, 2.0, 3.0, 4.0]])
    labels = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]).bool()
    auc = auroc(scores, labels)
    # row 0: positive-negative pairs won: (0.9>0.8), (0.9>0.5), (0.1<0.8), (0.1<0.5) -> 2/4
    assert auc[0].item() == pytest.approx(0.5)
    # row 1: 0.5 vs 0.5 tie -> 1/2, 0.5 > 0.2 -> 1, 0.5 < 0.7 -> 0 -> 1.5/3
    assert auc[1].item() == pytest.approx(0.5)
    assert math.isnan(auc[2])  # no negatives
    perfect = auroc(torch.tensor([[0.1, 0.9, 0.8]]), torch.tensor([[0, 1, 1]]).bool())
    assert perfect.item() == pytest.approx(1.0)


def test_retrieval_metrics_hand_worked():
    regions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
    attrs = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # not normalised: the function normalises
    labels = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0]]).bool()
    out = retrieval_metrics(regions, attrs, labels, ["a", "b", "c"])
    # a: cos = [1, 0, .6, .8], truth [1,0,1,0]: top-2 = r0, r3 -> 50 %; AUROC 3/4
    # b: cos = [0, 1, .8, .6], truth [0,1,0,1]: top-2 = r1, r2 -> 50 %; AUROC 3/4
    assert out["text_to_region_r_precision"] == pytest.approx(50.0)
    assert out["precision_at_1"] == pytest.approx(100.0)
    assert out["precision_at_5"] == pytest.approx(50.0)  # k capped at 4 regions
    assert out["zero_shot_auroc"] == pytest.approx(75.0)
    # region -> text: r0, r1 rank their attribute first; r2, r3 do not
    assert out["region_to_text_r_precision"] == pytest.approx(50.0)
    assert out["num_attributes_present"] == 2
    assert out["per_attribute"]["c"]["r_precision"] is None
    assert out["per_attribute"]["a"]["auroc"] == pytest.approx(75.0)
    assert out["per_attribute"]["b"]["num_regions"] == 2


def test_retrieval_metrics_perfect_and_shape_check():
    regions = torch.eye(3)
    out = retrieval_metrics(regions, torch.eye(3), torch.eye(3).bool(), ["a", "b", "c"])
    assert out["text_to_region_r_precision"] == pytest.approx(100.0)
    assert out["region_to_text_r_precision"] == pytest.approx(100.0)
    assert out["zero_shot_auroc"] == pytest.approx(100.0)
    with pytest.raises(ValueError):
        retrieval_metrics(regions, torch.eye(3), torch.eye(2).bool(), ["a", "b"])


def test_an_image_is_scored_by_its_best_unit_whatever_the_chunking():
    import numpy as np

    from villa.evaluation.metrics import retrieval_metrics_from_scores
    from villa.evaluation.run import best_unit_scores

    # image 0: whole image and two regions; image 1: whole image and one region; image 2: whole image only
    embs = torch.tensor([[1.0, 0.0], [0.0, 3.0], [0.6, 0.8], [0.8, 0.6], [-1.0, 0.0], [0.0, -1.0]])
    offsets = np.array([0, 3, 5, 6])
    attrs = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    expected = torch.tensor([[1.0, 1.0], [0.8, 0.6], [0.0, -1.0]], dtype=torch.float64)
    for chunk in (1, 2, 65536):  # chunk boundaries inside an image's units change nothing
        assert torch.allclose(best_unit_scores(embs, attrs, offsets, chunk=chunk), expected)
    labels = torch.tensor([[1, 1], [1, 0], [0, 0]]).bool()
    out = retrieval_metrics_from_scores(expected, labels, ["a", "b"])
    # a: scores [1, .8, 0], truth [1, 1, 0] -> R-Precision 1, AUROC 1; b: [1, .6, -1], truth [1, 0, 0] -> 1, 1
    assert out["text_to_region_r_precision"] == pytest.approx(100.0)
    assert out["zero_shot_auroc"] == pytest.approx(100.0)
    with pytest.raises(ValueError):
        retrieval_metrics_from_scores(expected, labels[:2], ["a", "b"])


def test_image_units_put_the_whole_image_first():
    import pandas as pd

    from villa.evaluation.run import image_units

    frame = pd.DataFrame(
        {
            "image_size": [[10, 20], [30, 40]],  # [H, W]
            "num_regions": [2, 1],
            "region_coord": [[[0, 0, 5, 5], [5, 5, 9, 9]], [[1, 2, 3, 4]]],
        }
    )
    offsets, boxes = image_units(frame)
    assert offsets.tolist() == [0, 3, 5]
    assert boxes.tolist() == [[0, 0, 19, 9], [0, 0, 5, 5], [5, 5, 9, 9], [0, 0, 39, 29], [1, 2, 3, 4]]


def test_hand_worked_metrics_are_not_flagged():
    regions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
    labels = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 1]]).bool()
    out = retrieval_metrics(regions, torch.eye(2), labels, ["a", "b"])
    assert out["trivial"] == []
    assert metric_warnings(out, summary_keys("regions"), num_images=20) == []


def test_one_attribute_makes_region_to_text_trivial_and_one_image_is_a_small_split():
    import json

    # one attribute: every labelled region ranks a single attribute, R-Precision 100 whatever the model
    regions = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[1], [0], [1], [1], [0]]).bool()
    out = retrieval_metrics(regions, torch.randn(1, 4), labels, ["a"])
    assert out["region_to_text_r_precision"] == 100.0
    assert out["trivial"] == ["region_to_text_r_precision"]
    # a single image with a single region: text->region is trivial, AUROC undefined (null, not NaN)
    one = retrieval_metrics(
        torch.randn(1, 4), torch.randn(3, 4), torch.tensor([[1, 0, 1]]).bool(), list("abc")
    )
    assert one["zero_shot_auroc"] is None
    assert "text_to_region_r_precision" in one["trivial"] and "precision_at_1" in one["trivial"]
    assert json.loads(json.dumps(one, allow_nan=False))["zero_shot_auroc"] is None  # strict JSON: null
    metrics = {
        "model": "m",
        "dataset": "d",
        "split": "test",
        "evaluation": "regions",
        "num_regions": 1,
        **one,
    }
    metrics["warnings"] = metric_warnings(one, summary_keys("regions"), num_images=1)
    small, trivial, undefined = metrics["warnings"]
    assert "only 1 image in this split" in small and "zero_shot_auroc" in undefined
    assert "text_to_region_r_precision, precision_at_1, precision_at_5, precision_at_10" in trivial
    text = format_metrics(metrics)
    rows = {
        line.split()[0]: line.split()[1:]
        for line in text.splitlines()[1:]
        if not line.startswith("  warning")
    }
    assert rows["zero_shot_auroc"] == ["n/a"] and rows["text_to_region_r_precision"] == [
        "100.00",
        "(trivial)",
    ]
    assert text.count("\n  warning: ") == 3 and "nan" not in text.lower().replace("n/a", "")


def test_no_query_at_all_gives_null_summaries():
    out = retrieval_metrics(
        torch.randn(3, 4), torch.randn(2, 4), torch.zeros(3, 2, dtype=torch.bool), ["a", "b"]
    )
    for key in summary_keys("regions"):
        assert out[key] is None, key
    assert out["trivial"] == []
