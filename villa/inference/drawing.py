"""Draw predictions on images: labelled boxes and score heatmaps, legible at any image size.

:class:`Visualizer` draws on a copy of one image (in the manner of detectron2's ``Visualizer``)::

    vis = Visualizer(image)                              # uint8 [H, W, 3], a PIL image or a path
    vis.draw_boxes(boxes, labels, colours=...)           # boxes [M, 4] in the image's pixels
    vis.draw_heatmap(scores)                             # float [H, W], e.g. villa.Model.heatmaps
    vis.save("out.png")                                  # or vis.get_image() -> uint8 [H', W', 3]

**Legibility.** An image whose longer side is under :data:`MIN_CANVAS` pixels (DocMNIST's 84 x 84) is drawn
on a canvas enlarged by a whole factor (nearest neighbour: pixels stay sharp), so its labels can be read.
Font size and line width grow with the canvas (:func:`font_size`): a label is about 1/40 of the canvas'
geometric mean side, at least 12 px. Labels never overlap each other: each goes to the first free place among
above the box, inside its top, below it and inside its bottom, then to the nearest free row next to the box
(with a leader line back to it); a label with no free place left is not drawn (:attr:`Visualizer.dropped`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

#: an image whose longer side is below this is drawn on a canvas enlarged by a whole factor
MIN_CANVAS = 512
#: distinct colours for boxes, by query (RGB)
PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
)  # fmt: skip


def font_size(height: int, width: int) -> int:
    """Label font size in pixels for a canvas of ``height x width``."""
    return max(12, round(math.sqrt(height * width) / 40))


def colour_for(index: int) -> tuple[int, int, int]:
    """The palette colour of query ``index``."""
    return PALETTE[index % len(PALETTE)]


def _overlaps(
    rect: tuple[float, float, float, float], placed: list[tuple[float, float, float, float]]
) -> bool:
    x0, y0, x1, y1 = rect
    return any(x0 < b[2] and b[0] < x1 and y0 < b[3] and b[1] < y1 for b in placed)


class Visualizer:
    """Draws on a copy of one image; see the module docstring.

    Attributes:
        scale: canvas pixels per image pixel (a whole number, 1 for images of at least :data:`MIN_CANVAS` px).
        font_px, line_width: the sizes used.
        label_boxes: ``[x0, y0, x1, y1]`` canvas rectangles of the labels drawn so far (they never overlap).
        dropped: labels that found no free place.
    """

    def __init__(self, image):
        from PIL import Image, ImageDraw, ImageFont

        if isinstance(image, (str, os.PathLike)):
            from villa.datasets.images import decode_image

            image = decode_image(image)
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
        pixels = np.asarray(image, dtype=np.uint8)
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[:, :, None], 3, axis=2)
        self.image_size = pixels.shape[:2]
        height, width = self.image_size
        self.scale = max(1, math.ceil(MIN_CANVAS / max(height, width)))
        canvas = Image.fromarray(np.ascontiguousarray(pixels[:, :, :3]))
        if self.scale > 1:
            canvas = canvas.resize((width * self.scale, height * self.scale), Image.NEAREST)
        self.canvas = canvas
        self.font_px = font_size(canvas.height, canvas.width)
        self.line_width = max(1, round(self.font_px / 7))
        self.font = ImageFont.load_default(size=self.font_px)
        self._draw = ImageDraw.Draw(self.canvas)
        self.label_boxes: list[list[float]] = []
        self.dropped = 0

    # ---------------------------------------------------------------- boxes
    def draw_boxes(
        self,
        boxes,
        labels: Sequence[str] | None = None,
        colours: Sequence[tuple[int, int, int]] | None = None,
    ) -> Visualizer:
        """Outline ``boxes`` ``[M, 4]`` (x0, y0, x1, y1 in the image's pixels) and label them; boxes are drawn in
        the order given, and the first ones get the best label places (give them best first)."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * self.scale
        colours = list(colours) if colours is not None else [colour_for(i) for i in range(len(boxes))]
        for box, colour in zip(boxes, colours):
            self._draw.rectangle([float(v) for v in box], outline=tuple(colour), width=self.line_width)
        if labels is not None:
            placed = [
                self._place(box, str(label), tuple(colour))
                for box, label, colour in zip(boxes, labels, colours)
            ]
            placed = [p for p in placed if p is not None]
            for _, _, colour, leader in placed:  # leader lines first: labels are drawn over them
                if leader is not None:
                    self._draw.line(leader, fill=colour, width=max(1, self.line_width // 2))
            for spot, text, colour, _ in placed:
                self._paint(spot, text, colour)
        return self

    def _label(self, box: np.ndarray, text: str, colour: tuple[int, int, int]) -> None:
        placed = self._place(box, text, colour)
        if placed is not None:
            self._paint(placed[0], text, colour)

    def _paint(
        self, spot: tuple[float, float, float, float], text: str, colour: tuple[int, int, int]
    ) -> None:
        pad = max(1, self.font_px // 6)
        left = self._draw.textbbox((0, 0), text, font=self.font)[0]
        self._draw.rectangle(spot, fill=colour)
        ink = (
            (0, 0, 0) if 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 140 else (255, 255, 255)
        )
        self._draw.text((spot[0] + pad - left, spot[1] + pad), text, fill=ink, font=self.font)

    def _place(self, box: np.ndarray, text: str, colour: tuple[int, int, int]):
        """Reserve a free place for a label of ``box``: (rectangle, text, colour, leader line or None), or None
        (counted in :attr:`dropped`) when there is no room left."""
        pad = max(1, self.font_px // 6)
        left, top, right, bottom = self._draw.textbbox((0, 0), text, font=self.font)
        w, h = right + 2 * pad, bottom + 2 * pad
        canvas_w, canvas_h = self.canvas.size
        w = min(w, canvas_w)
        x0, y0, x1, y1 = (float(v) for v in box)

        def fit(x: float, y: float) -> tuple[float, float, float, float]:
            x = min(max(x, 0.0), max(canvas_w - w, 0.0))
            y = min(max(y, 0.0), max(canvas_h - h, 0.0))
            return (x, y, x + w, y + h)

        candidates = [fit(x0, y0 - h), fit(x0, y0), fit(x0, y1), fit(x0, y1 - h)]
        spot = next((r for r in candidates if not _overlaps(r, self.label_boxes)), None)
        leader = None
        if spot is None:  # the nearest free place: rows, then columns, by distance from the box's top left
            rows = np.arange(0.0, max(canvas_h - h, 0.0) + 1, max(1.0, h / 2))
            rows = rows[np.argsort(np.abs(rows - (y0 - h)), kind="stable")]
            columns = np.arange(0.0, max(canvas_w - w, 0.0) + 1, max(1.0, w / 4))
            columns = columns[np.argsort(np.abs(columns - x0), kind="stable")]
            for y in rows:
                spot = next((fit(x, y) for x in columns if not _overlaps(fit(x, y), self.label_boxes)), None)
                if spot is not None:
                    target = (min(max(spot[0], x0), x1), y0 if spot[1] < y0 else y1)
                    leader = [(spot[0] + w / 2, spot[1] + h / 2), target]
                    break
        if spot is None:
            self.dropped += 1
            return None
        self.label_boxes.append(list(spot))
        return spot, text, colour, leader

    # ---------------------------------------------------------------- heatmaps
    def draw_heatmap(
        self,
        scores,
        alpha: float = 0.5,
        vmin: float | None = None,
        vmax: float | None = None,
        cmap: str = "jet",
        title: str | None = None,
    ) -> Visualizer:
        """Blend ``scores`` float ``[H, W]`` (image pixels) over the image through colour map ``cmap`` (``vmin``/
        ``vmax`` default to the map's own range), with an optional ``title`` label in the top left corner."""
        from matplotlib import colormaps
        from PIL import Image

        scores = np.asarray(scores, dtype=np.float32)
        if scores.shape != tuple(self.image_size):
            raise ValueError(f"scores must be {tuple(self.image_size)}, got {scores.shape}")
        low = float(scores.min()) if vmin is None else float(vmin)
        high = float(scores.max()) if vmax is None else float(vmax)
        norm = np.clip((scores - low) / (high - low), 0, 1) if high > low else np.zeros_like(scores)
        field = Image.fromarray(norm, mode="F").resize(self.canvas.size, Image.BILINEAR)
        rgb = colormaps[cmap](np.clip(np.asarray(field), 0, 1))[:, :, :3] * 255
        blended = (1 - alpha) * np.asarray(self.canvas, dtype=np.float32) + alpha * rgb
        self.canvas.paste(Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8)))
        if title:
            self._label(np.array([0.0, 0.0, 0.0, 0.0]), title, (255, 255, 255))
        return self

    # ---------------------------------------------------------------- output
    def get_image(self) -> np.ndarray:
        """The drawing, uint8 ``[H * scale, W * scale, 3]``."""
        return np.asarray(self.canvas).copy()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the drawing as a PNG, atomically."""
        from villa.storage.io import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp:
            self.canvas.save(tmp, format="PNG")
        return path


def draw_predictions(image, rows: Sequence[dict], queries: Sequence[str] | None = None) -> Visualizer:
    """A :class:`Visualizer` with :meth:`villa.Model.ground` rows drawn: one colour per query (in ``queries``
    order, default: order of appearance), labels ``"<query> <score>"``, best rows' labels placed first."""
    order = list(dict.fromkeys(list(queries or []) + [r["query"] for r in rows]))
    ranked = sorted(rows, key=lambda r: -r["score"])
    vis = Visualizer(image)
    vis.draw_boxes(
        [r["box"] for r in ranked],
        [f"{r['query']} {r['score']:.2f}" for r in ranked],
        [colour_for(order.index(r["query"])) for r in ranked],
    )
    return vis
