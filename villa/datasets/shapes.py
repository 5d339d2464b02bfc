"""A synthetic COCO-format dataset: coloured shapes amid clutter, with free-English captions.

    python -m villa.datasets.shapes --out=shapes_coco [--images=1500 --seed=0 --objects=2-6]

writes ``shapes_coco/images/*.jpg``, ``instances.json`` and ``captions.json`` exactly as COCO publishes them
(plus ``shapes.json``, the generator's settings: the mark of a folder it wrote, the only kind ``--overwrite``
replaces; an existing folder is refused without it), so it exercises the same importer (``python -m villa.ingest coco ...``) as real COCO data. It is the worked example
of docs/datasets.md ("A worked example: shapes amid clutter"), the fixture of the importer tests and the data of the scale benchmark.

Each JPEG (height and width drawn per image) has a textured background with random line and dot clutter and
2-6 non-overlapping filled shapes of random colour and size. The categories include a two-word one
(``half moon``) and words hidden inside others (``cross`` in "across"). Each image has three captions that name
its shapes with counts and plurals ("two half moons", "a red star") in varied templates; with probability
``omit`` a shape's category is left out of all of them, so the text does not mention every labelled object.
With probability ``negations`` (``--negations=P``) an image gets one more caption denying a shape it does not
show ("No triangle can be seen.", "There are no stars here."), as reports and captions do; these draws use
their own random stream, so the images and the other captions are those of ``--negations=0``, byte for byte.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from villa.storage.errors import VillaError, exit_on_error

CATEGORIES = ("circle", "square", "triangle", "star", "half moon", "cross", "ring", "diamond")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 30),
    "purple": (150, 50, 200),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "cyan": (30, 210, 220),
}
NUMBERS = ("", "a", "two", "three", "four", "five", "six")
TEMPLATES = (
    "A picture of {}.",
    "There are {} on a cluttered background.",
    "{} scattered across a noisy scene.",
    "This image shows {}.",
    "Some random clutter around {}.",
    "{}, drawn over a messy background of lines and dots.",
    "In this photo we can see {}.",
)

#: captions denying an absent shape: {a} "a"/"an", {s} the shape, {p} its plural, {P} the plural capitalised
NEGATION_TEMPLATES = (
    "No {s} can be seen.",
    "There is no {s} in this picture.",
    "There are no {p} here.",
    "The image does not contain any {p}.",
    "Not a single {s} is visible.",
    "{P} are absent from this scene.",
    "You will not find {a} {s} here.",
    "No {p} are visible.",
    "Nothing resembling {a} {s} appears.",
    "We see no {p} at all.",
)
#: the stream of the negation draws (independent of the image stream, so --negations=0 changes nothing)
NEGATION_STREAM = 1


#: the generator's record in every folder it writes: ``--overwrite`` replaces only a folder holding it
MARKER_FILE = "shapes.json"
GENERATOR = "villa.datasets.shapes"


def is_shapes_folder(path: str | Path) -> bool:
    """Whether ``path`` holds this generator's :data:`MARKER_FILE`."""
    import json

    try:
        record = json.loads((Path(path) / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("generator") == GENERATOR


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(category: str, count: int, colour: str | None) -> str:
    from villa.datasets.vocabulary import plural

    if count == 1:
        noun = f"{colour} {category}" if colour else category
        return f"{_article(noun)} {noun}"
    return f"{NUMBERS[min(count, len(NUMBERS) - 1)]} {plural(category)}"


def _denial(absent: Sequence[str], rng: np.random.Generator) -> str:
    """A caption denying one of the ``absent`` shapes, in one of :data:`NEGATION_TEMPLATES`."""
    from villa.datasets.vocabulary import plural

    shape = absent[int(rng.integers(len(absent)))]
    template = NEGATION_TEMPLATES[int(rng.integers(len(NEGATION_TEMPLATES)))]
    text = template.format(a=_article(shape), s=shape, p=plural(shape), P=plural(shape).capitalize())
    return text[0].upper() + text[1:]


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _shape_mask(category: str, size: int, rng: np.random.Generator):
    """A ``size x size`` 'L' mask of one filled shape."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    s = size - 1
    if category == "circle":
        draw.ellipse([0, 0, s, s], fill=255)
    elif category == "square":
        draw.rectangle([0, 0, s, s], fill=255)
    elif category == "triangle":
        draw.polygon([(s / 2, 0), (s, s), (0, s)], fill=255)
    elif category == "star":
        points = []
        for k in range(10):
            radius = s / 2 if k % 2 == 0 else s / 5
            angle = math.pi * k / 5 - math.pi / 2
            points.append((s / 2 + radius * math.cos(angle), s / 2 + radius * math.sin(angle)))
        draw.polygon(points, fill=255)
    elif category == "half moon":
        draw.ellipse([0, 0, s, s], fill=255)
        shift = int(s * 0.45)
        draw.ellipse([shift, -s // 8, s + shift, s - s // 8], fill=0)
    elif category == "cross":
        w = max(2, size // 3)
        draw.rectangle([(size - w) // 2, 0, (size + w) // 2, s], fill=255)
        draw.rectangle([0, (size - w) // 2, s, (size + w) // 2], fill=255)
    elif category == "ring":
        draw.ellipse([0, 0, s, s], outline=255, width=max(2, size // 6))
    elif category == "diamond":
        draw.polygon([(s / 2, 0), (s, s / 2), (s / 2, s), (0, s / 2)], fill=255)
    else:
        raise ValueError(category)
    if rng.random() < 0.5 and category not in ("circle", "ring"):
        mask = mask.transpose(Image.FLIP_LEFT_RIGHT)
    return mask


def _background(height: int, width: int, rng: np.random.Generator):
    from PIL import Image, ImageDraw

    low = rng.integers(40, 200, size=(4, 5, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(low).resize((width, height), Image.BILINEAR), dtype=np.float32)
    base += rng.normal(0, 12, size=base.shape)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    palette = list(COLOURS.values())
    for _ in range(int(rng.integers(8, 25))):  # clutter: thin lines and dots in the shapes' own colours
        colour = palette[int(rng.integers(len(palette)))]
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        if rng.random() < 0.6:
            x1, y1 = x0 + rng.integers(-40, 41), y0 + rng.integers(-40, 41)
            draw.line([(int(x0), int(y0)), (int(x1), int(y1))], fill=colour, width=int(rng.integers(1, 3)))
        else:
            r = int(rng.integers(1, 4))
            draw.ellipse([int(x0) - r, int(y0) - r, int(x0) + r, int(y0) + r], fill=colour)
    return image


def _place(height: int, width: int, sizes: Sequence[int], rng: np.random.Generator) -> list[tuple[int, int]]:
    """Top-left corners of non-overlapping squares of ``sizes`` (fewer when the image is full)."""
    placed: list[tuple[int, int, int]] = []
    for size in sizes:
        for _ in range(50):
            x, y = int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
            if all(x + size + 2 <= px or px + ps + 2 <= x or y + size + 2 <= py or py + ps + 2 <= y
                   for px, py, ps in placed):  # fmt: skip
                placed.append((x, y, size))
                break
    return [(x, y) for x, y, _ in placed]


def make_shapes_coco(
    out_dir: str | Path,
    num_images: int = 1500,
    seed: int = 0,
    objects: tuple[int, int] = (2, 6),
    height: tuple[int, int] = (120, 240),
    width: tuple[int, int] = (160, 320),
    object_size: tuple[int, int] = (22, 52),
    omit: float = 0.1,
    captions_per_image: int = 3,
    quality: int = 90,
    progress: bool = True,
    overwrite: bool = False,
    negations: float = 0.0,
) -> Path:
    """Write the dataset into ``out_dir`` (images/, instances.json, captions.json, shapes.json); returns
    ``out_dir``. An existing ``out_dir`` is refused, and with ``overwrite`` replaced only when this generator
    wrote it (its ``shapes.json``). ``negations``: the chance that an image gets one more caption denying a
    shape it does not show (see the module docstring). Same arguments, same bytes.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from villa.storage.io import atomic_dir, write_json

    if num_images < 1:
        raise VillaError(f"--images must be >= 1, got {num_images}")
    if not 1 <= objects[0] <= objects[1]:
        raise VillaError(f"--objects must be like 2-6, got {objects}")
    if not 0.0 <= negations <= 1.0:
        raise VillaError(f"--negations must be a probability in [0, 1], got {negations}")
    from villa.storage.io import check_output_dir

    out_dir = check_output_dir(out_dir, overwrite=overwrite, is_own=is_shapes_folder, own_marker=MARKER_FILE)
    rng = np.random.default_rng(seed)
    negation_rng = np.random.default_rng([seed, NEGATION_STREAM])
    images, annotations, captions = [], [], []
    colour_names = list(COLOURS)
    with atomic_dir(out_dir, overwrite=overwrite, own_marker=MARKER_FILE) as tmp:
        (tmp / "images").mkdir()
        for image_id in tqdm(range(1, num_images + 1), desc="shapes", unit="img", disable=not progress):
            h = int(rng.integers(height[0], height[1] + 1))
            w = int(rng.integers(width[0], width[1] + 1))
            canvas = _background(h, w, rng)
            k = int(rng.integers(objects[0], objects[1] + 1))
            sizes = rng.integers(object_size[0], min(object_size[1], h, w) + 1, size=k).tolist()
            corners = _place(h, w, sizes, rng)
            placed = []
            for (x, y), size in zip(corners, sizes):
                category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
                colour = colour_names[int(rng.integers(len(colour_names)))]
                mask = _shape_mask(category, size, rng)
                canvas.paste(Image.new("RGB", (size, size), COLOURS[colour]), (x, y), mask)
                bbox = mask.getbbox() or (0, 0, size, size)
                box = [x + bbox[0], y + bbox[1], bbox[2] - bbox[0], bbox[3] - bbox[1]]
                placed.append((category, colour))
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": CATEGORIES.index(category) + 1,
                    "bbox": [float(v) for v in box], "area": float(box[2] * box[3]), "iscrowd": 0,
                })  # fmt: skip
            name = f"{image_id:06d}.jpg"
            canvas.save(tmp / "images" / name, quality=quality)
            images.append({"id": image_id, "file_name": name, "width": w, "height": h})
            counts: dict[str, list[str]] = {}
            for category, colour in placed:
                counts.setdefault(category, []).append(colour)
            mentioned = [c for c in counts if rng.random() >= omit] or [next(iter(counts))]
            texts = []
            for _ in range(captions_per_image):
                order = rng.permutation(len(mentioned))
                parts = []
                for j in order.tolist():
                    category = mentioned[j]
                    colours = counts[category]
                    colour = colours[0] if len(colours) == 1 and rng.random() < 0.5 else None
                    parts.append(_phrase(category, len(colours), colour))
                text = TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(_join(parts))
                texts.append(text[0].upper() + text[1:])
            absent = [c for c in CATEGORIES if c not in counts]
            if (
                negations > 0 and negation_rng.random() < negations and absent
            ):  # (all shapes shown: none to deny)
                texts.insert(int(negation_rng.integers(len(texts) + 1)), _denial(absent, negation_rng))
            for text in texts:
                captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": text})
        categories = [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(CATEGORIES)]
        info = {"description": f"villa synthetic shapes, seed {seed}"}
        write_json(tmp / "instances.json", {"info": info, "images": images, "annotations": annotations,
                                             "categories": categories})  # fmt: skip
        write_json(tmp / "captions.json", {"info": info, "images": images, "annotations": captions})
        settings = {"num_images": num_images, "seed": seed, "objects": list(objects), "height": list(height),
                    "width": list(width), "object_size": list(object_size), "omit": omit,
                    "captions_per_image": captions_per_image, "quality": quality, "negations": negations}  # fmt: skip
        write_json(tmp / MARKER_FILE, {"generator": GENERATOR, **settings})
    return out_dir


def _range(text: str) -> tuple[int, int]:
    try:
        low, _, high = text.partition("-")
        return int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or N-M, got {text!r}") from None


@exit_on_error
def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m villa.datasets.shapes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--out", required=True, help="folder to write (an existing one is refused)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out folder that this generator wrote (its shapes.json)")  # fmt: skip
    parser.add_argument("--images", type=int, default=1500, help="number of images (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--objects", type=_range, default=(2, 6), help="shapes per image, N-M (default: 2-6)")
    parser.add_argument(
        "--height", type=_range, default=(120, 240), help="image height range (default: 120-240)"
    )
    parser.add_argument(
        "--width", type=_range, default=(160, 320), help="image width range (default: 160-320)"
    )
    parser.add_argument(
        "--omit", type=float, default=0.1, help="chance a shape goes unmentioned (default: 0.1)"
    )
    parser.add_argument(
        "--negations", type=float, default=0.0,
        help="chance an image gets one more caption denying an absent shape (default: 0)",
    )  # fmt: skip
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    out = make_shapes_coco(args.out, args.images, args.seed, args.objects, args.height, args.width,
                           omit=args.omit, progress=not args.no_progress, overwrite=args.overwrite,
                           negations=args.negations)  # fmt: skip
    print(out)
    return out


if __name__ == "__main__":
    main()
