import math

import numpy as np
import pytest
import torch

from villa.evaluation.detection import (
    format_detection,
    objects_from_multi_hot,
    region_scores,
    zero_shot_detection,
)
from villa.storage.errors import VillaError

NAMES = ["zero", "one", "two", "three"]


def _scene(n_images=6, per_image=3, seed=0):
    """Non-overlapping 20x20 boxes on a grid, labels cycling over NAMES; one-hot attribute embeddings."""
    g = np.random.default_rng(seed)
    image_ids = np.repeat(np.arange(10, 10 + n_images), per_image)  # ids need not start at 0
    slot = np.tile(np.arange(per_image), n_images)
    boxes = np.stack([slot * 30, slot * 5, slot * 30 + 20, slot * 5 + 20], 1).astype(float)
    labels = g.integers(0, len(NAMES), len(image_ids))
    sizes = {int(i): (100, 120) for i in np.unique(image_ids)}
    return image_ids, boxes, labels, sizes


def _attrs():
    return torch.eye(len(NAMES)) * 3.0  # any scale: normalised inside


def _run(region_embs, image_ids, boxes, labels, sizes, **kw):
    return zero_shot_detection(
        region_embs, _attrs(), NAMES, image_ids, boxes, image_ids, boxes, labels, sizes, **kw
    )


@pytest.mark.parametrize("score", ["softmax", "cosine"])
def test_perfect_embeddings_on_gt_boxes_give_100(score):
    image_ids, boxes, labels, sizes = _scene()
    out = _run(_attrs()[labels] * 0.5, image_ids, boxes, labels, sizes, score=score)
    assert out["ap50"] == pytest.approx(100.0)
    assert out["ap"] == pytest.approx(100.0)  # the boxes are the ground truth: IoU 1 at every threshold
    assert out["num_gt"] == len(labels)
    assert out["num_detections"] == len(labels) * len(NAMES)  # one per (region, attribute), under the cap
    assert out["score"] == score
    present = set(np.asarray(NAMES)[labels])
    for name, m in out["per_attribute"].items():
        assert (m["ap50"] == pytest.approx(100.0)) if name in present else m["ap50"] is None


def test_shuffled_labels_give_low_ap():
    image_ids, boxes, labels, sizes = _scene(n_images=20, per_image=4)
    wrong = (labels + 1) % len(NAMES)  # every region looks like another attribute
    out = _run(_attrs()[wrong], image_ids, boxes, labels, sizes)
    assert out["ap50"] < 40.0  # about chance (1 / K = 25 %): true detections rank below the wrong ones
    perfect = _run(_attrs()[labels], image_ids, boxes, labels, sizes)
    assert perfect["ap50"] - out["ap50"] > 50.0


def test_hand_computed_ap_and_image_without_ground_truth():
    # One attribute, cosine scores set by the angle of 2-D embeddings: score = cos.
    def emb(c):
        return [c, math.sqrt(1 - c * c)]

    gt = [[0, 0, 10, 10], [0, 0, 10, 10]]
    far = [50, 50, 60, 60]
    sizes = {1: (100, 100), 2: (100, 100), 3: (100, 100)}
    # Ranking: TP (img 1), FP (img 1), FP (img 2), TP (img 2): precision 1, 1/2, 1/3, 1/2 at recall
    # 1/2, 1/2, 1/2, 1. COCO's 101-point interpolation: recall 0..0.50 (51 points) at precision 1,
    # 0.51..1.00 (50 points) at 1/2 -> AP = (51 + 25) / 101.
    out = zero_shot_detection(
        [emb(0.9), emb(0.8), emb(0.7), emb(0.6)],
        [[1.0, 0.0]],
        ["a"],
        [1, 1, 2, 2],
        [gt[0], far, far, gt[1]],
        [1, 2],
        gt,
        [0, 0],
        {1: (100, 100), 2: (100, 100)},
        score="cosine",
    )
    assert out["ap50"] == pytest.approx(7600 / 101)
    assert out["ap"] == pytest.approx(7600 / 101)
    # A top-scoring region in image 3, which has no ground truth, is a false positive ranked first:
    # precision 0, 1/2, 1/3, 1/4, 2/5 -> envelope 1/2 up to recall 0.50, 2/5 after -> (25.5 + 20) / 101.
    out = zero_shot_detection(
        [emb(0.95), emb(0.9), emb(0.8), emb(0.7), emb(0.6)],
        [[1.0, 0.0]],
        ["a"],
        [3, 1, 1, 2, 2],
        [gt[0], gt[0], far, far, gt[1]],
        [1, 2],
        gt,
        [0, 0],
        sizes,
        score="cosine",
    )
    assert out["ap50"] == pytest.approx(4550 / 101)
    assert out["num_images"] == 3


def test_matches_the_standard_pycocotools_path():
    """Same AP/AP50 as COCO.loadRes on an [N, 7] array and COCOeval.summarize with default parameters."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    g = np.random.default_rng(3)
    image_ids, gt_boxes, labels, sizes = _scene(n_images=8, per_image=4)
    # proposals: jittered ground truth plus random boxes, noisy embeddings
    jitter = gt_boxes + g.uniform(-6, 6, gt_boxes.shape)
    extra = g.uniform(0, 60, (len(gt_boxes), 2))
    boxes = np.concatenate(
        [np.sort(jitter.reshape(-1, 2, 2), axis=1).reshape(-1, 4), np.c_[extra, extra + 25]]
    )
    regions_img = np.r_[image_ids, image_ids]
    embs = torch.from_numpy(g.normal(size=(len(boxes), len(NAMES)))) + 2 * _attrs()[np.r_[labels, labels]]
    out = zero_shot_detection(
        embs,
        _attrs(),
        NAMES,
        regions_img,
        boxes,
        image_ids,
        gt_boxes,
        labels,
        sizes,
        score="cosine",
        nms_iou=None,
    )

    scores = region_scores(embs, _attrs(), "cosine")
    rows = np.array(
        [
            [regions_img[m], *boxes[m, :2], *(boxes[m, 2:] - boxes[m, :2]), scores[m, k], k + 1]
            for m in range(len(boxes))
            for k in range(len(NAMES))
        ]
    )
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {
            "images": [{"id": i} for i in sizes],
            "categories": [{"id": k + 1} for k in range(len(NAMES))],
            "annotations": [
                {
                    "id": j + 1,
                    "image_id": int(i),
                    "category_id": int(c) + 1,
                    "iscrowd": 0,
                    "area": (b[2] - b[0]) * (b[3] - b[1]),
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                }
                for j, (i, c, b) in enumerate(zip(image_ids, labels, gt_boxes, strict=True))
            ],
        }
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(rows), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert 0 < out["ap"] < 100
    assert out["ap"] == pytest.approx(ev.stats[0] * 100)
    assert out["ap50"] == pytest.approx(ev.stats[1] * 100)


def test_shifted_proposal_counts_for_ap50_but_lowers_ap():
    # A 100x100 object and a proposal shifted by 23 px: IoU = 77 / 123 = 0.626, a match at IoU .50, .55
    # and .60 only -> AP50 100, AP 3/10. A second proposal overlapping nothing ranks below it.
    gt = [[0, 0, 100, 100]]
    regions = [[23, 0, 123, 100], [300, 300, 350, 350]]
    out = zero_shot_detection(
        torch.tensor([[1.0, 0.0], [0.8, 0.6]]),
        torch.eye(2),
        ["a", "b"],
        [0, 0],
        regions,
        [0],
        gt,
        [0],
        {0: (400, 400)},
    )
    assert out["per_attribute"]["a"]["ap50"] == pytest.approx(100.0)
    assert out["per_attribute"]["a"]["ap"] == pytest.approx(30.0)
    assert out["ap"] == pytest.approx(30.0)


def test_attribute_without_ground_truth_is_none_and_excluded_from_mean():
    image_ids, boxes, labels, sizes = _scene()
    labels = labels % 2  # only 'zero' and 'one' have objects
    embs = _attrs()[labels]
    embs[0] = _attrs()[3]  # a region that looks like 'three': a detection for an attribute without objects
    out = _run(embs, image_ids, boxes, labels, sizes)
    assert out["per_attribute"]["two"]["ap"] is None
    assert out["per_attribute"]["three"]["ap50"] is None
    assert out["per_attribute"]["three"]["num_gt"] == 0
    per = [out["per_attribute"][n]["ap"] for n in ("zero", "one")]
    assert out["ap"] == pytest.approx(sum(per) / 2)  # mean over the two attributes with ground truth
    only = _run(embs, image_ids, boxes, labels, sizes, attributes=["one"])
    assert list(only["per_attribute"]) == ["one"]
    assert only["ap"] == pytest.approx(out["per_attribute"]["one"]["ap"])
    assert only["num_gt"] == int((labels == 1).sum())


def test_no_ground_truth_at_all_gives_nan_and_no_regions_gives_zero():
    image_ids, boxes, labels, sizes = _scene(n_images=2)
    empty = np.zeros(0, dtype=np.int64)
    out = zero_shot_detection(_attrs()[labels], _attrs(), NAMES, image_ids, boxes, empty, [], empty, sizes)
    assert math.isnan(out["ap"]) and math.isnan(out["ap50"])
    assert all(m["ap"] is None for m in out["per_attribute"].values())
    out = zero_shot_detection(
        torch.zeros(0, len(NAMES)), _attrs(), NAMES, empty, [], image_ids, boxes, labels, sizes
    )
    assert out["ap50"] == 0.0 and out["num_detections"] == 0


def test_multi_label_boxes_docmnist_style():
    # Two attribute groups (digit, colour); each cell carries one of each, so each box is two objects.
    names = ["three", "seven", "red", "blue"]
    image_ids = np.array([0, 0, 1, 1, 1])
    boxes = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [0, 0, 10, 10], [0, 20, 10, 30], [20, 20, 30, 30]])
    digit = np.array([0, 1, 1, 0, 0])
    colour = np.array([2, 2, 3, 3, 2])
    multi_hot = np.zeros((5, 4), dtype=bool)
    multi_hot[np.arange(5), digit] = True
    multi_hot[np.arange(5), colour] = True
    gt_img, gt_box, gt_lab = objects_from_multi_hot(image_ids, boxes, multi_hot)
    assert len(gt_lab) == 10
    assert gt_lab[:2].tolist() == [0, 2] and (gt_box[0] == gt_box[1]).all()
    attrs = torch.eye(4)
    embs = attrs[digit] + attrs[colour]  # the region embedding points between its two attributes
    sizes = {0: (40, 40), 1: (40, 40)}
    for score in ("softmax", "cosine"):
        out = zero_shot_detection(
            embs, attrs, names, image_ids, boxes, gt_img, gt_box, gt_lab, sizes, score=score
        )
        assert out["ap50"] == pytest.approx(100.0)
        assert out["num_gt"] == 10
        assert out["per_attribute"]["blue"]["num_gt"] == 2


def test_max_detections_per_image_keeps_each_images_best():
    image_ids, boxes, labels, sizes = _scene(n_images=3, per_image=5)
    embs = _attrs()[labels]
    capped = _run(embs, image_ids, boxes, labels, sizes, max_detections_per_image=5)
    assert capped["num_detections"] == 3 * 5
    # Each region's best detection is its true attribute, so the top 5 of an image are exactly the
    # true detections: nothing lost.
    assert capped["ap50"] == pytest.approx(100.0)
    full = _run(embs, image_ids, boxes, labels, sizes, max_detections_per_image=None)
    assert full["num_detections"] == 15 * len(NAMES)
    assert full["ap50"] == pytest.approx(100.0)
    tight = _run(embs, image_ids, boxes, labels, sizes, max_detections_per_image=2)
    assert tight["num_detections"] == 3 * 2
    assert tight["ap50"] < 50.0  # 3 of the 5 objects per image can no longer be found


def test_softmax_and_cosine_scores():
    regions = torch.tensor([[2.0, 0.0], [0.6, 0.8]])
    attrs = torch.tensor([[1.0, 0.0], [0.0, 5.0]])
    cos = region_scores(regions, attrs, "cosine")
    assert cos == pytest.approx(np.array([[1.0, 0.0], [0.6, 0.8]]))
    soft = region_scores(regions, attrs, "softmax", tau=0.1)
    assert soft == pytest.approx(torch.softmax(torch.from_numpy(cos) / 0.1, dim=1).numpy())
    assert soft.sum(axis=1) == pytest.approx([1.0, 1.0])


def test_quiet_by_default(capsys):
    image_ids, boxes, labels, sizes = _scene(n_images=2)
    _run(_attrs()[labels], image_ids, boxes, labels, sizes)
    assert capsys.readouterr().out == ""


def test_format_detection_table():
    image_ids, boxes, labels, sizes = _scene()
    labels = labels % 2
    text = format_detection(_run(_attrs()[labels], image_ids, boxes, labels, sizes))
    lines = text.splitlines()
    assert "sigmoid" in lines[0]
    assert lines[2].split()[:3] == ["zero", "100.00", "100.00"]
    assert lines[4].split()[:3] == ["two", "-", "-"]
    assert lines[-1].split() == ["mean", "100.00", "100.00"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"region_image_ids": [10, 10]}, "region_image_ids has 2 entries"),
        ({"region_boxes": np.zeros((18, 3))}, "region_boxes must have shape"),
        ({"gt_labels": np.arange(18)}, "gt_labels must index"),
        ({"gt_labels": np.zeros(17, dtype=int)}, "gt_labels has 17 entries"),
        ({"gt_image_ids": np.zeros(18)}, "must hold integers"),
        ({"attribute_names": ["a", "b"]}, "attribute_names has 2 names"),
        ({"attr_embs": torch.eye(4, 3)}, "same encoder"),
        ({"image_sizes": {10: (100, 120)}}, "missing from image_sizes"),
        ({"score": "logit"}, "unknown detection score"),
        ({"tau": 0}, "tau must be"),
        ({"max_detections_per_image": 0}, "max_detections_per_image"),
        ({"attributes": ["four"]}, "not among attribute_names"),
        ({"gt_boxes": np.tile([[5.0, 0, 0, 5]], (18, 1))}, "x1 >= x0"),
    ],
)
def test_inconsistent_inputs_raise_villa_error(change, message):
    image_ids, boxes, labels, sizes = _scene()
    kwargs = {
        "region_embs": _attrs()[labels],
        "attr_embs": _attrs(),
        "attribute_names": NAMES,
        "region_image_ids": image_ids,
        "region_boxes": boxes,
        "gt_image_ids": image_ids,
        "gt_boxes": boxes,
        "gt_labels": labels,
        "image_sizes": sizes,
        **change,
    }
    with pytest.raises(VillaError, match=message):
        zero_shot_detection(**kwargs)


def test_per_class_nms_drops_a_duplicate_of_the_same_attribute_only():
    """Two near-identical boxes of one object: the weaker detection of the same attribute is suppressed
    (a duplicate is a false positive at every IoU), a detection of another attribute on it is not."""
    sizes = {1: (100, 100)}
    gt_box = np.array([[10.0, 10.0, 50.0, 50.0]])
    boxes = np.array([[10.0, 10.0, 50.0, 50.0], [11.0, 10.0, 50.0, 51.0]])  # IoU ~0.95
    embs = torch.stack([_attrs()[0], _attrs()[0] * 0.9 + _attrs()[1] * 0.3])
    kw = dict(region_embs=embs, attr_embs=_attrs(), attribute_names=NAMES, region_image_ids=[1, 1],
              region_boxes=boxes, gt_image_ids=[1], gt_boxes=gt_box, gt_labels=[0], image_sizes=sizes)  # fmt: skip
    with_nms = zero_shot_detection(**kw)
    without = zero_shot_detection(**kw, nms_iou=None)
    assert with_nms["num_detections"] == len(NAMES)  # one box survives per attribute
    assert without["num_detections"] == 2 * len(NAMES)
    assert with_nms["nms_iou"] == 0.5 and without["nms_iou"] is None
    assert with_nms["ap50"] == pytest.approx(100.0)


def test_the_cap_is_per_image_across_attributes():
    image_ids, boxes, labels, sizes = _scene(n_images=3, per_image=3)
    out = _run(_attrs()[labels], image_ids, boxes, labels, sizes, max_detections_per_image=5)
    assert out["num_detections"] == 3 * 5  # 12 candidates per image (3 regions x 4 attributes), none overlap


def test_sigmoid_scores_do_not_need_competitors():
    """An attribute scored alone (a kind of one attribute, a single query) is not 1.0 everywhere."""
    g = torch.Generator().manual_seed(0)
    regions = torch.randn(50, 8, generator=g)
    single = torch.randn(1, 8, generator=g)
    background = torch.randn(6, 8, generator=g)
    soft = region_scores(regions, single, "softmax")
    assert np.allclose(soft, 1.0)  # the failure mode of a softmax over one text
    sig = region_scores(regions, single, "sigmoid", background_embs=background)
    assert sig.std() > 0.05 and (0 < sig).all() and (sig < 1).all()
    cos = region_scores(regions, single, "cosine")
    bg = torch.nn.functional.normalize(regions, dim=1) @ torch.nn.functional.normalize(background, dim=1).T
    expected = 1 / (1 + np.exp(-(cos[:, 0] - bg.mean(1).double().numpy()) / 0.07))
    assert np.allclose(sig[:, 0], expected)
