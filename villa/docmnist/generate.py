"""DocMNIST generation (docs/method.md section 2): plan every image's regions, render them in bulk, write the dataset.

The work is split in two so that bad input fails before anything slow happens:

1. :func:`plan_split` draws, for a whole split at once, each image's regions (colour, shape, size, shape
   position, caption templates, cell) with numpy; it needs no MNIST pixels.
2. The MNIST digits are drawn from the split's pool; the canvases of a chunk of images are rendered at
   once (a colour lookup table per pixel, shape outlines by fancy indexing, tiles pasted into a strided
   view of the canvases), written as PNGs, and the annotation table is built from the same arrays.

Randomness: one ``numpy.random.SeedSequence(seed)`` spawns a stream per split and purpose, so the same seed
gives the same bytes (table and PNGs). torch is never imported on this path: start-up time matters.
"""

from __future__ import annotations

import argparse
import math
import os
import struct
import sys
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from villa.docmnist.vocabulary import COLORS, DIGIT_WORDS, SHAPES, SIZES, TEMPLATES
from villa.storage.errors import VillaError, exit_on_error

CELL = 28
GRID = 3
CANVAS = CELL * GRID  # 84
MAX_REGIONS = GRID * GRID
MIN_TARGET = 2  # a region without shape carries 2 pairs: below that no region ever fits
MAX_TARGET = 4 * MAX_REGIONS  # 9 regions with a shape and a size each
COLOR_THRESHOLD = 120
POSITION_RANGE = (5, 20)  # shape centre / start, drawn uniformly in [5, 20) per axis
CIRCLE_RADIUS = (1, 3, 5)  # small, medium, large
RECTANGLE_EXTENT = (1, 4, 7)
WHITE = 255
PNG_LEVEL = 1  # zlib level: lossless either way; 1 is ~4x faster than 6 for ~20% more bytes
DEFAULT_SEED = 23
DEFAULT_VAL_BUDGET = 10000
DEFAULT_TEST_BUDGET = 10000
SPLITS = ("train", "val", "test")
SENTENCE_SEPARATOR = " . "
_RENDER_CHUNK = 512  # images rendered per numpy batch: bounds memory for any budget

#: shape codes in the plan: -1 none, else an index into SHAPES
_NO_SHAPE = -1
_COLOR_NAMES = tuple(COLORS)
_KIND_ORDER = ("digit", "color", "shape", "size")  # the order of a region's attributes
_N_TEMPLATES = np.array([len(TEMPLATES[k]) for k in _KIND_ORDER])


# --------------------------------------------------------------------------------------------------------
# shapes: the outline pixels of every (shape, size), relative to the centre (circle) or start (rectangle)


def circle_perimeter_offsets(radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Bresenham circle perimeter around (0, 0), the same pixels as ``skimage.draw.circle_perimeter``."""
    rows: list[int] = []
    cols: list[int] = []
    r, c, d = radius, 0, 3 - 2 * radius
    while r >= c:
        rows.extend([r, -r, r, -r, c, -c, c, -c])
        cols.extend([c, c, -c, -c, r, r, -r, -r])
        if d < 0:
            d += 4 * c + 6
        else:
            d += 4 * (c - r) + 10
            r -= 1
        c += 1
    return np.array(rows), np.array(cols)


def rectangle_perimeter_offsets(extent: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels just around the square from (0, 0) to (extent, extent), as ``skimage.draw.rectangle_perimeter``.

    skimage draws around the inner rectangle ``[start, end]``: rows and columns ``-1 .. extent + 1``.
    """
    lo, hi = -1, extent + 1
    span = np.arange(lo, hi + 1)
    rows = np.concatenate([np.full_like(span, lo), np.full_like(span, hi), span, span])
    cols = np.concatenate([span, span, np.full_like(span, lo), np.full_like(span, hi)])
    return rows, cols


def _shape_offset_table() -> tuple[np.ndarray, np.ndarray]:
    """``[len(SHAPES) * len(SIZES), L]`` row and column offsets, padded by repeating a pixel (harmless)."""
    offsets = []
    for shape in SHAPES:
        for size in range(len(SIZES)):
            if shape == "circle":
                offsets.append(circle_perimeter_offsets(CIRCLE_RADIUS[size]))
            else:
                offsets.append(rectangle_perimeter_offsets(RECTANGLE_EXTENT[size]))
    width = max(len(r) for r, _ in offsets)
    rows = np.array([np.pad(r, (0, width - len(r)), mode="edge") for r, _ in offsets])
    cols = np.array([np.pad(c, (0, width - len(c)), mode="edge") for _, c in offsets])
    return rows, cols


_SHAPE_ROWS, _SHAPE_COLS = _shape_offset_table()


# --------------------------------------------------------------------------------------------------------
# sentences: every (kind, value, template) sentence has an id; identical strings share one


def _sentence_table() -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    values = {"digit": DIGIT_WORDS, "color": _COLOR_NAMES, "shape": SHAPES, "size": SIZES}
    strings: list[str] = []
    index: dict[str, int] = {}
    tables = []
    for kind in _KIND_ORDER:
        templates = TEMPLATES[kind]
        table = np.empty((len(values[kind]), len(templates)), dtype=np.int16)
        for v, value in enumerate(values[kind]):
            for t, template in enumerate(templates):
                text = template.format(value)
                table[v, t] = index.setdefault(text, len(strings))
                if table[v, t] == len(strings):
                    strings.append(text)
        tables.append(table)
    return strings, *tables


_SENTENCES, _DIGIT_SENT, _COLOR_SENT, _SHAPE_SENT, _SIZE_SENT = _sentence_table()


# --------------------------------------------------------------------------------------------------------
# planning


@dataclass
class SplitPlan:
    """Everything random about one split except the MNIST digits.

    Per image (``n``): ``offsets`` ``[n + 1]`` into the region arrays, ``complexity`` ``[n]``,
    ``sentence_keys`` ``[n, 36]`` (random sort keys of the caption sentences).
    Per region (``R``, in image order, cells increasing within an image): ``image`` ``[R]`` (index within
    the split), ``cell`` ``[R]`` (0..8), ``color`` ``[R]`` (index into COLORS), ``shape`` ``[R]`` (-1 none,
    else index into SHAPES), ``size`` ``[R]`` (-1 none, else index into SIZES), ``position`` ``[R, 2]``
    (row, col of the circle centre / rectangle start within the cell), ``templates`` ``[R, 4]`` (template
    index per kind: digit, colour, shape, size).
    """

    split: str
    offsets: np.ndarray
    complexity: np.ndarray
    sentence_keys: np.ndarray
    image: np.ndarray
    cell: np.ndarray
    color: np.ndarray
    shape: np.ndarray
    size: np.ndarray
    position: np.ndarray
    templates: np.ndarray

    @property
    def n_images(self) -> int:
        return len(self.complexity)

    @property
    def n_regions(self) -> int:
        return len(self.image)


def _draw_images(rng: np.random.Generator, m: int, target: int) -> dict[str, np.ndarray]:
    """Draw ``m`` candidate images, 9 candidate regions each, and apply the stopping rule.

    A region without shape carries 2 pairs (digit, colour), with a shape 4; regions are kept while the
    running count stays <= target, and at most 9. Images that keep no region (possible for target < 4,
    when the first region has a shape) are dropped rather than written empty.
    """
    color = rng.integers(0, len(_COLOR_NAMES), size=(m, MAX_REGIONS), dtype=np.int8)
    shape = rng.integers(-1, len(SHAPES), size=(m, MAX_REGIONS), dtype=np.int8)  # 1/3 each incl. none
    size = rng.integers(0, len(SIZES), size=(m, MAX_REGIONS), dtype=np.int8)
    position = rng.integers(*POSITION_RANGE, size=(m, MAX_REGIONS, 2), dtype=np.int8)
    templates = rng.integers(0, _N_TEMPLATES, size=(m, MAX_REGIONS, len(_KIND_ORDER)), dtype=np.int8)
    cell_keys = rng.random((m, MAX_REGIONS))
    sentence_keys = rng.random((m, MAX_TARGET))

    pairs = np.where(shape == _NO_SHAPE, 2, 4)
    running = np.cumsum(pairs, axis=1)
    keep = running <= target  # a prefix: the running count only grows
    n_kept = keep.sum(axis=1)
    complexity = np.where(n_kept > 0, running[np.arange(m), np.maximum(n_kept - 1, 0)], 0)
    # distinct random cells: the n_kept cells with the smallest random keys, in increasing cell order
    cell_rank = np.argsort(np.argsort(cell_keys, axis=1), axis=1)
    chosen = cell_rank < n_kept[:, None]
    size = np.where(shape == _NO_SHAPE, -1, size).astype(np.int8)

    nonempty = n_kept > 0
    keep &= nonempty[:, None]
    chosen &= nonempty[:, None]
    return {
        "complexity": complexity[nonempty],
        "n_kept": n_kept[nonempty],
        "sentence_keys": sentence_keys[nonempty],
        "cell": np.nonzero(chosen)[1].astype(np.int8),
        "color": color[keep],
        "shape": shape[keep],
        "size": size[keep],
        "position": position[keep],
        "templates": templates[keep],
    }


def plan_split(split: str, budget: int, target: int, rng: np.random.Generator) -> SplitPlan:
    """Draw images until the next one would push the split's pair count above ``budget``."""
    chunks: list[dict[str, np.ndarray]] = []
    used = 0
    while True:
        # enough candidates to fill the remaining budget in one go, typically (images average <= target)
        m = min(1 << 16, math.ceil((budget - used) / max(2, target - 4)) + 32)
        drawn = _draw_images(rng, m, target)
        totals = used + np.cumsum(drawn["complexity"])
        fits = int(np.searchsorted(totals, budget, side="right"))  # images whose running total <= budget
        n_regions = int(drawn["n_kept"][:fits].sum())
        chunks.append(
            {
                **{k: drawn[k][:fits] for k in ("complexity", "n_kept", "sentence_keys")},
                **{
                    k: drawn[k][:n_regions]
                    for k in ("cell", "color", "shape", "size", "position", "templates")
                },
            }
        )
        if fits < len(totals):
            break
        used = int(totals[-1]) if len(totals) else used
    merged = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    offsets = np.concatenate([[0], np.cumsum(merged["n_kept"], dtype=np.int64)])
    image = np.repeat(np.arange(len(merged["n_kept"]), dtype=np.int64), merged["n_kept"])
    return SplitPlan(
        split=split,
        offsets=offsets,
        complexity=merged["complexity"].astype(np.int64),
        sentence_keys=merged["sentence_keys"],
        image=image,
        cell=merged["cell"],
        color=merged["color"],
        shape=merged["shape"],
        size=merged["size"],
        position=merged["position"],
        templates=merged["templates"],
    )


# --------------------------------------------------------------------------------------------------------
# rendering


def _packed(rgb) -> np.uint32:
    """An RGB colour as one native uint32 (bytes R, G, B, 0), the pixel format used while rendering."""
    return np.array([*rgb, 0], dtype=np.uint8).view(np.uint32)[0]


# colour index x grey value -> packed pixel: grey >= 120 takes the colour, else stays grey in all channels
_GREY = np.arange(256)
_PIXEL_LUT = np.array(
    [
        [_packed(rgb) if g >= COLOR_THRESHOLD else _packed((g, g, g)) for g in _GREY]
        for rgb in COLORS.values()
    ],
    dtype=np.uint32,
).ravel()
_WHITE = _packed((WHITE, WHITE, WHITE))


def unpack_rgb(packed: np.ndarray) -> np.ndarray:
    """View packed uint32 pixels ``[..., H, W]`` as uint8 RGB ``[..., H, W, 3]`` (no copy)."""
    return packed.view(np.uint8).reshape(*packed.shape, 4)[..., :3]


def render_regions_packed(
    digits: np.ndarray, color: np.ndarray, shape: np.ndarray, size: np.ndarray, position: np.ndarray
) -> np.ndarray:
    """Render region tiles as packed pixels ``[R, 28, 28]`` uint32 (see :func:`render_regions`)."""
    # one table lookup per pixel applies the colour rule (4-byte pixels make it a single gather)
    tiles = np.take(_PIXEL_LUT, color.astype(np.intp)[:, None, None] * 256 + digits)
    has_shape = np.nonzero(shape != _NO_SHAPE)[0]
    if len(has_shape):
        kind = shape[has_shape].astype(np.intp) * len(SIZES) + size[has_shape]
        rows = position[has_shape, 0, None].astype(np.intp) + _SHAPE_ROWS[kind]
        cols = position[has_shape, 1, None].astype(np.intp) + _SHAPE_COLS[kind]
        inside = (rows >= 0) & (rows < CELL) & (cols >= 0) & (cols < CELL)
        region = np.broadcast_to(has_shape[:, None], rows.shape)
        tiles[region[inside], rows[inside], cols[inside]] = _WHITE
    return tiles


def render_regions(
    digits: np.ndarray, color: np.ndarray, shape: np.ndarray, size: np.ndarray, position: np.ndarray
) -> np.ndarray:
    """Render region tiles ``[R, 28, 28, 3]`` uint8.

    ``digits`` ``[R, 28, 28]`` uint8 grey, ``color`` ``[R]`` (index into COLORS), ``shape`` ``[R]`` (-1 none,
    else index into SHAPES), ``size`` ``[R]`` (index into SIZES), ``position`` ``[R, 2]`` (row, col). Pixels
    >= 120 take the region's colour, the others keep their grey value in all channels; then the white shape
    outline (clipped to the cell) is drawn on top.
    """
    return unpack_rgb(render_regions_packed(digits, color, shape, size, position))


def compose_canvases(n_images: int, image: np.ndarray, cell: np.ndarray, tiles: np.ndarray) -> np.ndarray:
    """Paste packed tiles ``[R, 28, 28]`` (uint32) into black packed canvases ``[n_images, 84, 84]``."""
    # view a canvas as (cell row, pixel row, cell col, pixel col) to paste all tiles at once
    grid = np.zeros((n_images, GRID, CELL, GRID, CELL), dtype=np.uint32)
    grid[image, cell // GRID, :, cell % GRID] = tiles
    return grid.reshape(n_images, CANVAS, CANVAS)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = _png_chunk(b"IEND", b"")


def _scanlines(rgb: np.ndarray) -> np.ndarray:
    """``[..., H, W, 3]`` uint8 -> PNG scanlines ``[..., H, 1 + 3W]``: filter byte 0 (none) before every row."""
    *lead, height, width, _ = rgb.shape
    lines = np.zeros((*lead, height, 1 + 3 * width), dtype=np.uint8)
    pixels = lines[..., 1:].reshape(*lead, height, width, 3)  # a view: rows keep their stride
    if np.shares_memory(pixels, lines):
        pixels[...] = rgb  # one strided copy, straight from the (possibly strided) canvases
    else:
        lines[..., 1:] = rgb.reshape(*lead, height, 3 * width)
    return lines


def _png_from_scanlines(lines: np.ndarray, level: int) -> bytes:
    height, row_bytes = lines.shape
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", (row_bytes - 1) // 3, height, 8, 2, 0, 0, 0))
    return _PNG_SIGNATURE + header + _png_chunk(b"IDAT", zlib.compress(lines, level)) + _PNG_END


def encode_png(rgb: np.ndarray, level: int = PNG_LEVEL) -> bytes:
    """Encode one ``[H, W, 3]`` uint8 image as a lossless 8-bit RGB PNG (no row filter, zlib ``level``)."""
    return _png_from_scanlines(_scanlines(rgb), level)


def write_pngs(paths: Sequence[Path], canvases: np.ndarray) -> None:
    """Write ``canvases`` ``[n, H, W, 3]`` uint8 to ``paths`` as new PNG files."""
    lines = _scanlines(canvases)  # one copy for the whole batch, not one per image
    for path, image_lines in zip(paths, lines, strict=True):
        # os-level calls: ~2x cheaper than open() per small file, which adds up over thousands of images
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, _png_from_scanlines(image_lines, PNG_LEVEL))
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------------------------
# captions and the annotation table


def _region_sentence_ids(plan: SplitPlan, labels: np.ndarray) -> np.ndarray:
    """``[R, 4]`` sentence ids per region in attribute order (digit, colour, shape, size); -1 where absent."""
    t = plan.templates.astype(np.int64)
    has_shape = plan.shape != _NO_SHAPE
    shape = np.where(has_shape, plan.shape, 0)
    size = np.where(has_shape, plan.size, 0)
    return np.stack(
        [
            _DIGIT_SENT[labels, t[:, 0]],
            _COLOR_SENT[plan.color, t[:, 1]],
            np.where(has_shape, _SHAPE_SENT[shape, t[:, 2]], -1),
            np.where(has_shape, _SIZE_SENT[size, t[:, 3]], -1),
        ],
        axis=1,
    ).astype(np.int64)


def build_captions(plan: SplitPlan, labels: np.ndarray) -> list[str]:
    """One caption per image: its regions' sentences, deduplicated, shuffled, joined with " . "."""
    ids = _region_sentence_ids(plan, labels)  # [R, 4]
    region_rank = np.arange(plan.n_regions) - plan.offsets[plan.image]
    slot = region_rank[:, None] * len(_KIND_ORDER) + np.arange(len(_KIND_ORDER))  # position in the image
    image = np.broadcast_to(plan.image[:, None], ids.shape)
    valid = ids >= 0
    ids, slot, image = ids[valid], slot[valid], image[valid]
    # keep the first occurrence of each (image, sentence)
    order = np.lexsort((slot, ids, image))
    first = np.ones(len(order), dtype=bool)
    first[1:] = (image[order][1:] != image[order][:-1]) | (ids[order][1:] != ids[order][:-1])
    kept = order[first]
    ids, slot, image = ids[kept], slot[kept], image[kept]
    # shuffle within each image by the image's random keys
    order = np.lexsort((plan.sentence_keys[image, slot], image))
    ids, image = ids[order], image[order]
    bounds = np.searchsorted(image, np.arange(plan.n_images + 1))
    ordered = [_SENTENCES[i] for i in ids.tolist()]
    return [SENTENCE_SEPARATOR.join(ordered[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _split_by(values: list, offsets: np.ndarray) -> list[list]:
    return [values[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)]


def build_table(plan: SplitPlan, labels: np.ndarray, first_image_id: int) -> dict[str, list]:
    """The split's annotation columns (see villa.datasets.contract) as Python lists, one entry per image.

    DocMNIST's own per-region label columns (digit/color/shape/size_label) ride along as extra columns;
    ``attributes`` (what the caption mentions) is derived from the text by the contract's writer."""
    n, offsets = plan.n_images, plan.offsets
    image_ids = list(range(first_image_id, first_image_id + n))
    x = (plan.cell.astype(np.int64) % GRID) * CELL
    y = (plan.cell.astype(np.int64) // GRID) * CELL
    boxes = np.stack([x, y, x + CELL, y + CELL], axis=1).tolist()
    digit = [DIGIT_WORDS[i] for i in labels.tolist()]
    color = [_COLOR_NAMES[i] for i in plan.color.tolist()]
    shape = [SHAPES[i] if i >= 0 else None for i in plan.shape.tolist()]
    size = [SIZES[i] if i >= 0 else None for i in plan.size.tolist()]
    reg_to_attr = [
        [d, c, s, z] if s is not None else [d, c]
        for d, c, s, z in zip(digit, color, shape, size, strict=True)
    ]
    return {
        "image_id": image_ids,
        "image_size": [[CANVAS, CANVAS] for _ in range(n)],
        "image_filepath": [image_relpath(i) for i in image_ids],
        "region_coord": _split_by(boxes, offsets),
        "num_regions": np.diff(offsets).tolist(),
        "split": [plan.split] * n,
        "text": build_captions(plan, labels),
        "digit_label": _split_by(digit, offsets),
        "color_label": _split_by(color, offsets),
        "shape_label": _split_by(shape, offsets),
        "size_label": _split_by(size, offsets),
        "reg_to_attr": _split_by(reg_to_attr, offsets),
    }


def image_relpath(image_id: int) -> str:
    """An image's path relative to the dataset folder."""
    return f"images/{image_id:06d}.png"


def dataset_name(attribute_budget: int, average_train_complexity: float) -> str:
    """``docmnist_<budget>_<average train sample complexity, 1 decimal>``."""
    return f"docmnist_{attribute_budget}_{average_train_complexity:.1f}"


# --------------------------------------------------------------------------------------------------------
# the whole run


@dataclass
class GenerationResult:
    """What :func:`generate_docmnist` wrote."""

    dataset_dir: Path
    split_sizes: dict[str, int]
    average_complexity: dict[str, float]
    total_pairs: dict[str, int] = field(default_factory=dict)
    mnist_source: str = ""

    def summary_lines(self) -> list[str]:
        """Human summary; the dataset folder is the last line."""
        lines = [
            f"{split}: {n} images, {self.total_pairs[split]} region-attribute pairs, "
            f"average sample complexity {self.average_complexity[split]:.2f}"
            for split, n in self.split_sizes.items()
        ]
        return [*lines, str(self.dataset_dir)]


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise VillaError(f"--{name} must be an integer, got {value!r}")
    if value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise VillaError(f"--{name} must be {what}, got {value}")
    return int(value)


def _check_pools(digit_pools: Mapping, splits: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    pools = {}
    for split in splits:
        if split not in digit_pools:
            raise VillaError(f"no digit pool for the {split} split")
        images, labels = digit_pools[split]
        images, labels = np.asarray(images), np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (CELL, CELL):
            raise VillaError(
                f"{split} digit pool must be uint8 [n, 28, 28], got {images.dtype} {images.shape}"
            )
        if len(images) == 0 or len(labels) != len(images):
            raise VillaError(f"{split} digit pool is empty or its labels do not match its images")
        if labels.min() < 0 or labels.max() > 9:
            raise VillaError(f"{split} digit pool labels must be 0..9")
        pools[split] = (images, labels.astype(np.int64))
    return pools


def generate_docmnist(
    attribute_budget: int,
    target_sample_complexity: int,
    seed: int = DEFAULT_SEED,
    val_attribute_budget: int = DEFAULT_VAL_BUDGET,
    test_attribute_budget: int = DEFAULT_TEST_BUDGET,
    data_root: str | os.PathLike | None = None,
    digit_pools: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> GenerationResult:
    """Generate a DocMNIST dataset under ``<data_root>/docmnist_<budget>_<avg train complexity>/``.

    ``digit_pools`` maps split -> (uint8 ``[n, 28, 28]`` digits, int labels ``[n]``); by default the MNIST
    pools of :func:`villa.docmnist.mnist.load_mnist_pools` for ``seed``. A val or test budget of 0 skips that
    split. The folder is written under a temporary name and renamed at the end, so an interrupted run
    leaves nothing under the final name. Raises :class:`VillaError` on bad input, before any slow work.
    """
    target = _check_int("target_sample_complexity", target_sample_complexity, MIN_TARGET)
    if target > MAX_TARGET:
        raise VillaError(
            f"--target_sample_complexity must be at most {MAX_TARGET} "
            f"(9 regions x 4 attributes), got {target}"
        )
    budgets = {
        "train": _check_int("attribute_budget", attribute_budget, 1),
        "val": _check_int("val_attribute_budget", val_attribute_budget, 0),
        "test": _check_int("test_attribute_budget", test_attribute_budget, 0),
    }
    seed = _check_int("seed", seed, 0)
    if data_root is None:
        from villa.storage.paths import data_root as default_root

        data_root = default_root()
    data_root = Path(data_root)

    streams = dict(zip(SPLITS, np.random.SeedSequence(seed).spawn(len(SPLITS)), strict=True))
    plans: dict[str, SplitPlan] = {}
    digit_rngs: dict[str, np.random.Generator] = {}
    for split in SPLITS:
        if budgets[split] == 0:
            continue
        structure_seq, digit_seq = streams[split].spawn(2)
        plan = plan_split(split, budgets[split], target, np.random.default_rng(structure_seq))
        if plan.n_images == 0:
            raise VillaError(
                f"the {split} attribute budget {budgets[split]} is too small for one image "
                f"(target sample complexity {target}: the first image alone needs more pairs)"
            )
        plans[split] = plan
        digit_rngs[split] = np.random.default_rng(digit_seq)

    average = {s: float(p.complexity.mean()) for s, p in plans.items()}
    final_dir = data_root / dataset_name(budgets["train"], average["train"])
    from villa.datasets.contract import INFO_FILE, is_dataset_folder
    from villa.storage.io import check_output_dir

    # --overwrite replaces only a villa dataset folder (its dataset.json), never a folder of the user's
    check_output_dir(
        final_dir, overwrite=overwrite, is_own=is_dataset_folder, own_marker=f"{INFO_FILE} of a villa dataset"
    )

    if digit_pools is None:
        from villa.docmnist.mnist import load_mnist_pools

        digit_pools = load_mnist_pools(seed, data_root)
        source = "MNIST"
    else:
        source = "injected digit pools"
    pools = _check_pools(digit_pools, list(plans))

    from tqdm.auto import tqdm

    from villa.datasets.contract import write_dataset
    from villa.docmnist.vocabulary import docmnist_vocabulary
    from villa.storage.io import atomic_dir

    columns: dict[str, list] = {}
    first_id = 0
    total = sum(p.n_images for p in plans.values())
    with (
        atomic_dir(final_dir, overwrite=overwrite) as tmp,
        tqdm(total=total, desc="docmnist", unit="img", disable=not progress, file=sys.stderr) as bar,
    ):
        (tmp / "images").mkdir()
        for split, plan in plans.items():
            images, pool_labels = pools[split]
            digit_idx = digit_rngs[split].integers(0, len(images), size=plan.n_regions)
            labels = pool_labels[digit_idx]
            for a in range(0, plan.n_images, _RENDER_CHUNK):
                b = min(a + _RENDER_CHUNK, plan.n_images)
                r0, r1 = int(plan.offsets[a]), int(plan.offsets[b])
                tiles = render_regions_packed(
                    images[digit_idx[r0:r1]],
                    plan.color[r0:r1],
                    plan.shape[r0:r1],
                    plan.size[r0:r1],
                    plan.position[r0:r1],
                )
                canvases = compose_canvases(b - a, plan.image[r0:r1] - a, plan.cell[r0:r1], tiles)
                write_pngs([tmp / image_relpath(first_id + i) for i in range(a, b)], unpack_rgb(canvases))
                bar.update(b - a)
            for key, values in build_table(plan, labels, first_id).items():
                columns.setdefault(key, []).extend(values)
            first_id += plan.n_images

        write_dataset(
            tmp,
            columns,
            docmnist_vocabulary(),
            source="docmnist",
            info={
                "regions": "grid:3x3",  # the occupied cells of the 3x3 grid
                "created_by": "python3 docmnist/generate_docmnist.py "
                f"--attribute_budget={budgets['train']} --target_sample_complexity={target} --seed={seed} "
                f"--val_attribute_budget={budgets['val']} --test_attribute_budget={budgets['test']} "
                "--data_root=<the folder holding this dataset> --overwrite",
            },
        )

    return GenerationResult(
        dataset_dir=final_dir,
        split_sizes={s: p.n_images for s, p in plans.items()},
        average_complexity=average,
        total_pairs={s: int(p.complexity.sum()) for s, p in plans.items()},
        mnist_source=source,
    )


# --------------------------------------------------------------------------------------------------------
# command line (docmnist/generate_docmnist.py is the thin script around cli_main)


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors raise VillaError, so the user sees one ``error: ...`` line (not usage too)."""

    def error(self, message: str):
        raise VillaError(message)


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="generate_docmnist.py",
        description="Generate a DocMNIST dataset (docs/method.md section 2) under <data_root>/docmnist_<N>_<avg>/.",
    )
    parser.add_argument(
        "--attribute_budget", type=_integer, required=True, help="train region-attribute pairs"
    )
    parser.add_argument(
        "--target_sample_complexity",
        type=_integer,
        required=True,
        help=f"pairs per image, {MIN_TARGET}..{MAX_TARGET}",
    )
    parser.add_argument("--seed", type=_integer, default=DEFAULT_SEED)
    parser.add_argument(
        "--val_attribute_budget", type=_integer, default=DEFAULT_VAL_BUDGET, help="0 skips val"
    )
    parser.add_argument(
        "--test_attribute_budget", type=_integer, default=DEFAULT_TEST_BUDGET, help="0 skips test"
    )
    parser.add_argument("--data_root", default=None, help="default: ${PROJECT_DIR}/data")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing villa dataset folder")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


@exit_on_error
def cli_main(argv: Sequence[str] | None = None) -> GenerationResult:
    """Parse ``argv``, generate, print the summary (dataset folder on the last line)."""
    args = build_parser().parse_args(argv)
    result = generate_docmnist(
        attribute_budget=args.attribute_budget,
        target_sample_complexity=args.target_sample_complexity,
        seed=args.seed,
        val_attribute_budget=args.val_attribute_budget,
        test_attribute_budget=args.test_attribute_budget,
        data_root=args.data_root,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    print("\n".join(result.summary_lines()), flush=True)
    return result
