"""Ground queries in many images and write the results: the one writer and reader of a predictions folder.

``python -m villa.predict`` (:func:`predict_images`) writes into ``out``::

    predictions.json    {"format": "villa-predictions", "format_version", "written_by": "villa.predict",
                         "model", "regions", "top_k", "score_threshold", "nms_iou", "score",
                         "images":      [{"id", "file_name", "width", "height", "drawn", "heatmaps"}],
                         "categories":  [{"id", "name"}]            one per query; name = the query text,
                         "annotations": [{"id", "image_id", "category_id", "query",
                                          "bbox": [x, y, w, h], "score", "cosine"}],
                         "files": [every other file written, relative to out]}
    predictions.csv     one row per annotation: image_id, file_name, query, category_id, score, cosine,
                        x0, y0, x1, y1 (pixels of the image as stored)
    drawn/<image>.png   the image with its boxes and "<query> <score>" labels (villa.inference.drawing)
    heatmaps/<image>/<k>_<query>.png   with heatmap=true: query k's dense region scores over the image

``predictions.json`` is a COCO object: ``annotations`` is a COCO detection-results list (``image_id``,
``category_id``, ``bbox`` as ``[x, y, width, height]``, ``score``), so ``COCO.loadRes(gt, data["annotations"])``
reads it, and ``categories`` maps each ``category_id`` to the query behind it. Category ids follow the
query order (1, 2, ...); image ids the sorted image order (1, 2, ...).

A rerun into the same ``out`` replaces what villa wrote there; a folder holding anything else is refused.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from villa.storage.errors import VillaError

FORMAT = "villa-predictions"
FORMAT_VERSION = 1
WRITTEN_BY = "villa.predict"
JSON_FILE = "predictions.json"
CSV_FILE = "predictions.csv"
DRAWN_DIR = "drawn"
HEATMAP_DIR = "heatmaps"
CSV_COLUMNS = ("image_id", "file_name", "query", "category_id", "score", "cosine", "x0", "y0", "x1", "y1")
#: what a folder given as ``images=`` contributes
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: ``queries=vocabulary``: the model's training vocabulary
VOCABULARY = "vocabulary"


# --------------------------------------------------------------------------- inputs
def find_images(images: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Image files from a file, a folder (its image files), a glob pattern, or a list of them; sorted, each once."""
    items = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    if not items:
        raise VillaError("no images given: images= takes a file, a folder or a glob pattern")
    found: list[Path] = []
    for item in items:
        text = os.path.expanduser(str(item))
        path = Path(text)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise VillaError(f"folder {path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            found += files
        elif glob.has_magic(text):
            files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not files:
                raise VillaError(f"no image file matches '{text}'")
            found += files
        elif path.exists():
            found.append(path)
        else:
            raise VillaError(f"image {path} is missing")
    return list(dict.fromkeys(p.resolve() for p in found))


def parse_queries(queries) -> list[str] | str:
    """A query list from the command line: a list of strings, one string, or ``"vocabulary"``."""
    if isinstance(queries, str):
        if queries.strip() == VOCABULARY:
            return VOCABULARY
        queries = [queries]
    if queries is None:
        raise VillaError(
            'the query list is empty: give queries=\'["a red star","two half moons"]\' or queries=vocabulary'
        )
    queries = list(queries)
    if not queries:
        raise VillaError(
            'the query list is empty: give queries=\'["a red star","two half moons"]\' or queries=vocabulary'
        )
    bad = [q for q in queries if not isinstance(q, str) or not q.strip()]
    if bad:
        raise VillaError(f"every query must be non-empty text, got {bad[0]!r}")
    return list(dict.fromkeys(queries))


def read_boxes_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A boxes file: JSON ``{"<image file name or path>": [[x0, y0, x1, y1], ...], ...}`` -> name -> ``[M, 4]``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VillaError(f"boxes file {path} is missing") from None
    except (OSError, UnicodeDecodeError) as err:
        raise VillaError(f"cannot read boxes file {path} ({err})") from None
    except json.JSONDecodeError as err:
        raise VillaError(f"boxes file {path} is not valid JSON (line {err.lineno}: {err.msg})") from None
    form = 'expected {"image.jpg": [[x0, y0, x1, y1], ...], ...}'
    if not isinstance(data, dict) or not data:
        raise VillaError(f"boxes file {path} must be a non-empty JSON object: {form}")
    out = {}
    for name, boxes in data.items():
        ok = isinstance(boxes, list) and boxes and all(
            isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b)
            for b in boxes
        )  # fmt: skip
        if not ok:
            raise VillaError(
                f"boxes file {path}: the boxes of '{name}' are not a list of [x0, y0, x1, y1]: {form}"
            )
        array = np.asarray(boxes, dtype=np.float64)
        bad = ~np.isfinite(array).all(1) | (array[:, 2] <= array[:, 0]) | (array[:, 3] <= array[:, 1])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise VillaError(
                f"boxes file {path}: box {i} of '{name}' {boxes[i]} is not [x0, y0, x1, y1] with x1 > x0 and y1 > y0"
            )
        out[str(name)] = array
    return out


def _boxes_of(boxes: dict[str, np.ndarray], image: Path, source: str) -> np.ndarray:
    for key in (str(image), image.name, os.path.relpath(image)):
        if key in boxes:
            return boxes[key]
    raise VillaError(f"boxes file {source} has no boxes for image {image.name}")


def _check_out(out: Path) -> None:
    """``out`` may be new, empty, or a predictions folder holding only what villa wrote there."""
    if not out.exists():
        return
    if not out.is_dir():
        raise VillaError(f"out={out} is a file: give a folder")
    present = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    if not present:
        return
    record = out / JSON_FILE
    try:
        data = json.loads(record.read_text())
        ours = data.get("written_by") == WRITTEN_BY and isinstance(data.get("files"), list)
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise VillaError(
            f"out={out} exists and was not written by villa.predict: choose a new or empty folder"
        )
    foreign = sorted(present - set(data["files"]) - {JSON_FILE})
    if foreign:
        raise VillaError(
            f"out={out} holds files villa.predict did not write (e.g. {foreign[0]}): choose a new folder, or move them"
        )


def _slug(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return slug[:limit] or "query"


# --------------------------------------------------------------------------- the run
def predict_images(
    model,
    images,
    queries,
    out: str | os.PathLike,
    *,
    regions: str = "proposals",
    boxes_file: str | os.PathLike | None = None,
    top_k: int | None = 5,
    score_threshold: float = 0.0,
    nms_iou: float | None = 0.5,
    heatmap: bool = False,
    heatmap_cells: int = 24,
    heatmap_window: int = 4,
    draw: bool = True,
    progress: bool = True,
) -> dict:
    """Ground ``queries`` in every image and write ``out`` (see the module docstring); returns the
    ``predictions.json`` content.

    ``model``: a :class:`villa.inference.model.Model` or anything :func:`villa.load` opens. ``images``: a file, a
    folder, a glob pattern or a list of them. ``queries``: a list of strings, one string, or ``"vocabulary"``
    (the model's training vocabulary). ``regions``: ``proposals[:K]`` or ``grid:RxC``; ``boxes_file`` (JSON,
    :func:`read_boxes_file`) gives each image's boxes instead. Other arguments as :meth:`villa.Model.ground`
    and :meth:`villa.Model.heatmaps`.
    """
    from tqdm.auto import tqdm

    from villa.inference.drawing import Visualizer, draw_predictions
    from villa.regions import parse_region_spec
    from villa.storage.io import atomic_dir

    if not hasattr(model, "ground"):
        from villa.inference.model import load

        model = load(model)
    out = Path(out)
    query_list = parse_queries(queries)
    if query_list == VOCABULARY:
        if model.vocabulary is None:
            raise VillaError(
                f"queries=vocabulary: model {model.source} has no training vocabulary; give the queries"
            )
        query_arg, labels = model.vocabulary, model.vocabulary.names
    else:
        query_arg, labels = query_list, query_list
    boxes = read_boxes_file(boxes_file) if boxes_file is not None else None
    if boxes is None:
        spec = str(parse_region_spec(regions, ("grid", "proposals", "boxes"), what="regions"))
        if spec == "boxes":
            raise VillaError("regions=boxes needs a boxes file: add boxes=FILE.json")
    else:
        spec = "boxes"
    paths = find_images(images)
    _check_out(out)
    stems = [p.stem for p in paths]
    unique = len(set(stems)) == len(stems)
    names = [s if unique else f"{i:06d}_{s}" for i, s in enumerate(stems, start=1)]
    category = {label: k for k, label in enumerate(labels, start=1)}
    image_rows, annotations, files = [], [], []
    with atomic_dir(out, overwrite=True) as tmp:
        for image_id, (path, name) in enumerate(
            tqdm(list(zip(paths, names)), desc="predict", unit="img", disable=not progress), start=1
        ):
            prepared = model.prepare(path)
            regions_of = _boxes_of(boxes, path, str(boxes_file)) if boxes is not None else spec
            rows = model.ground(prepared, query_arg, regions_of, top_k=top_k, score_threshold=score_threshold,
                                nms_iou=nms_iou)  # fmt: skip
            entry = {
                "id": image_id,
                "file_name": str(path),
                "width": prepared.width,
                "height": prepared.height,
            }
            if draw:
                drawn = f"{DRAWN_DIR}/{name}.png"
                draw_predictions(prepared.pixels, rows, labels).save(tmp / drawn)
                files.append(drawn)
                entry["drawn"] = drawn
            if heatmap:
                maps_labels, maps = model.heatmaps(prepared, query_arg, heatmap_cells, heatmap_window)
                entry["heatmaps"] = []
                for k, (label, scores) in enumerate(zip(maps_labels, maps), start=1):
                    rel = f"{HEATMAP_DIR}/{name}/{k}_{_slug(label)}.png"
                    title = f"{label} (scores {scores.min():.2f}-{scores.max():.2f})"
                    vis = Visualizer(prepared.pixels).draw_heatmap(scores, title=title)
                    vis.save(tmp / rel)
                    files.append(rel)
                    entry["heatmaps"].append(rel)
            image_rows.append(entry)
            for row in rows:
                x0, y0, x1, y1 = row["box"]
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": category[row["query"]],
                    "query": row["query"], "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": row["score"], "cosine": row["cosine"],
                })  # fmt: skip
        with open(tmp / CSV_FILE, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS)
            by_id = {r["id"]: r["file_name"] for r in image_rows}
            for a in annotations:
                x, y, w, h = a["bbox"]
                writer.writerow([a["image_id"], by_id[a["image_id"]], a["query"], a["category_id"],
                                 f"{a['score']:.6f}", f"{a['cosine']:.6f}", x, y, x + w, y + h])  # fmt: skip
        files.append(CSV_FILE)
        result = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "written_by": WRITTEN_BY,
            "model": model.source,
            "regions": spec,
            "top_k": top_k,
            "score_threshold": score_threshold,
            "nms_iou": nms_iou,
            "score": "sigmoid((cos(region, query) - mean cos(region, vocabulary prompts)) / temperature); "
            "with proposals, its geometric mean with the proposal's objectness",
            "images": image_rows,
            "categories": [{"id": k, "name": label} for label, k in category.items()],
            "annotations": annotations,
            "files": files,
        }
        (tmp / JSON_FILE).write_text(json.dumps(result, indent=1) + "\n")
    return result


def read_predictions(out: str | os.PathLike) -> dict:
    """``predictions.json`` of a predictions folder, checked to be one (one-line :class:`VillaError` otherwise)."""
    from villa.storage.artifacts import read_json

    out = Path(out)
    data = read_json(
        out / JSON_FILE, root=out, fix="re-run python -m villa.predict",
        required=("format", "format_version", "images", "categories", "annotations"),
    )  # fmt: skip
    if data.get("format") != FORMAT:
        raise VillaError(f"{out / JSON_FILE} is not a villa predictions file")
    if data.get("format_version") != FORMAT_VERSION:
        raise VillaError(
            f"{out / JSON_FILE} has format version {data.get('format_version')!r}; this villa reads {FORMAT_VERSION}"
        )
    return data
