"""villa.inference.drawing: labels legible from 84 px to 4000 px images, never overlapping each other."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from villa.inference.drawing import MIN_CANVAS, Visualizer, colour_for, draw_predictions


def _assert_apart_and_inside(vis: Visualizer) -> None:
    width, height = vis.canvas.size
    for a, b in itertools.combinations(vis.label_boxes, 2):
        apart = a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
        assert apart, (a, b)
    for x0, y0, x1, y1 in vis.label_boxes:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height


def _crowded_boxes(rng, width: int, height: int, n: int, size: float) -> np.ndarray:
    """``n`` boxes packed in the image's top-left quarter: their labels must compete for room."""
    xy = rng.uniform(0, [width / 4, height / 4], size=(n, 2))
    return np.concatenate([xy, xy + size], 1)


def test_labels_on_a_4000_px_image_are_large_and_never_overlap():
    rng = np.random.default_rng(0)
    image = np.full((3000, 4000, 3), 90, np.uint8)
    boxes = _crowded_boxes(rng, 4000, 3000, 40, 300)
    labels = [f"two half moons {i} {s:.2f}" for i, s in enumerate(rng.uniform(size=40))]
    vis = Visualizer(image).draw_boxes(boxes, labels)
    assert vis.scale == 1 and vis.canvas.size == (4000, 3000)
    assert vis.font_px >= 80 and vis.line_width >= 10  # ~1/40 of the image's mean side
    assert len(vis.label_boxes) == 40 and vis.dropped == 0
    _assert_apart_and_inside(vis)
    heights = [b[3] - b[1] for b in vis.label_boxes]
    assert min(heights) >= vis.font_px  # the text is as tall as the font, not shrunk


def test_an_84_px_image_is_drawn_enlarged_with_readable_labels():
    image = np.zeros((84, 84, 3), np.uint8)
    vis = Visualizer(image).draw_boxes(
        [[0, 0, 28, 28], [28, 0, 56, 28], [56, 56, 84, 84]], ["red", "a seven", "circle"]
    )
    assert vis.scale * 84 >= MIN_CANVAS and vis.font_px >= 12
    _assert_apart_and_inside(vis)
    drawn = vis.get_image()
    assert drawn.shape == (84 * vis.scale, 84 * vis.scale, 3)
    x0, y0, x1, y1 = (int(v) for v in vis.label_boxes[0])
    patch = drawn[y0:y1, x0:x1].reshape(-1, 3)
    colours = {tuple(c) for c in patch.tolist()}
    assert tuple(colour_for(0)) in colours and len(colours) > 2  # the label's fill and its ink


@pytest.mark.parametrize("side", [84, 300, 1000])
def test_crowded_labels_never_overlap(side):
    rng = np.random.default_rng(side)
    boxes = _crowded_boxes(rng, side, side, 30, side / 6)
    vis = Visualizer(np.zeros((side, side, 3), np.uint8)).draw_boxes(boxes, [f"query {i}" for i in range(30)])
    _assert_apart_and_inside(vis)
    assert len(vis.label_boxes) + vis.dropped == 30 and len(vis.label_boxes) >= 10


def test_heatmap_is_drawn_over_the_image():
    image = np.full((60, 80, 3), 128, np.uint8)
    scores = np.zeros((60, 80), np.float32)
    scores[:, 40:] = 1.0
    vis = Visualizer(image).draw_heatmap(scores, alpha=0.6, title="a red star")
    drawn = vis.get_image().astype(int)
    left, right = (
        drawn[200:, : drawn.shape[1] // 4].mean((0, 1)),
        drawn[200:, -drawn.shape[1] // 4 :].mean((0, 1)),
    )
    assert right[0] > left[0] + 40 and left[2] > right[2] + 40  # hot (red) where the scores are high
    with pytest.raises(ValueError):
        vis.draw_heatmap(np.zeros((10, 10)))


def test_draw_predictions_colours_by_query():
    rows = [
        {"box": [0, 0, 40, 40], "query": "b", "score": 0.6, "cosine": 0.1},
        {"box": [50, 50, 90, 90], "query": "a", "score": 0.9, "cosine": 0.2},
    ]
    vis = draw_predictions(np.zeros((100, 100, 3), np.uint8), rows, ["a", "b"])
    assert len(vis.label_boxes) == 2
    drawn = vis.get_image()
    x0, y0 = (int(v) for v in vis.label_boxes[0][:2])  # best row first: query "a", colour 0
    assert tuple(drawn[y0 + 1, x0 + 1]) == colour_for(0)
