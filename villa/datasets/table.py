"""Import a table of image-text pairs (CSV or JSONL).

    python -m villa.ingest table --table=pairs.csv --images=IMG_DIR --attributes=attributes.yaml \\
        [--regions=proposals[:K]|grid:RxC] --out=DATA_DIR [--splits=FILE] [--seed=0] [--copy_images] [--overwrite]

Columns: ``image`` (a path relative to ``--images``, or absolute) and ``text`` are required; optional ``id``
(integer, unique), ``split`` (train/val/test), ``boxes`` (a JSON list of ``[x0, y0, x1, y1]`` pixel boxes; in a
CSV cell as JSON text) and ``region_labels`` (a JSON list with one list of attribute names per box: ground truth
for metrics only). ``--regions=proposals[:K]`` gives every image without boxes the top K boxes of villa's region
proposer (:mod:`villa.regions.proposals`), ``--regions=grid:RxC`` R x C grid cells; without ``--regions``, every
row needs boxes. One row per image (join several captions of an image into one text).

A row with an empty text, a missing or unreadable image or no usable box is skipped and counted; malformed
files, duplicate ids or images, unknown splits, a text with no sentence longer than 3 characters and a vocabulary
that no text mentions are refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from villa.datasets.importing import (
    ImportResult,
    SkipLog,
    assign_splits,
    check_output,
    check_sentences,
    check_vocabulary_matches,
    computed_regions,
    probe_images,
    publish,
    summary_lines,
)
from villa.datasets.vocabulary import load_vocabulary_file
from villa.regions import clip_boxes, parse_region_spec
from villa.storage.errors import VillaError

REQUIRED = ("image", "text")
OPTIONAL = ("id", "split", "boxes", "region_labels")


def read_table(path: str | os.PathLike) -> list[dict]:
    """Rows of a CSV (header row) or JSONL (one object per line) file as dicts; one-line errors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise VillaError(f"table {path} not found")
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        rows = []
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise VillaError(f"{path} line {number} is not valid JSON: {err.msg}") from None
                if not isinstance(row, dict):
                    raise VillaError(f"{path} line {number} is not a JSON object")
                rows.append(row)
    else:
        import pandas as pd

        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
        except Exception as err:
            raise VillaError(f"{path} is not a readable CSV: {str(err).strip().splitlines()[0]}") from None
        rows = frame.to_dict("records")
    if not rows:
        raise VillaError(f"table {path} has no rows")
    missing = [c for c in REQUIRED if c not in rows[0]]
    if missing:
        raise VillaError(f"table {path} lacks the columns {missing} (needs image and text)")
    return rows


def _json_cell(value, what: str, where: str):
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise VillaError(f"{where}: '{what}' is not valid JSON ({err.msg})") from None
    return value


def import_table(
    table: str | os.PathLike,
    out: str | os.PathLike,
    *,
    attributes: str | os.PathLike,
    images: str | os.PathLike | None = None,
    regions: str | None = None,
    splits: str | os.PathLike | None = None,
    seed: int = 0,
    copy_images: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    negated: str | None = None,
    uncertain: str | None = None,
    created_by: str = "villa.datasets.table.import_table",
) -> ImportResult:
    """Build a villa dataset folder at ``out`` from a CSV/JSONL table (see the module docstring).

    ``negated`` / ``uncertain``: the vocabulary's policy for negated and uncertain mentions (None: the
    vocabulary file's), recorded in the dataset's ``attributes.yaml``.
    """
    table = Path(table).expanduser()
    image_dir = Path(images).expanduser() if images is not None else table.parent
    if not image_dir.is_dir():
        raise VillaError(f"--images folder {image_dir} not found")
    spec = parse_region_spec(regions if regions is not None else "boxes")
    computes = spec.kind != "boxes"  # rows without boxes get the spec's regions
    out = check_output(out, overwrite, {
        "--images folder": image_dir, "--table file": table, "--attributes file": attributes,
        "--splits file": splits,
    })  # fmt: skip
    vocabulary = load_vocabulary_file(attributes).with_policy(negated, uncertain)
    rows = read_table(table)
    log = SkipLog()

    # ---- ids and duplicates
    if "id" in rows[0]:
        try:
            ids = [int(str(r["id"]).strip()) for r in rows]
        except ValueError:
            raise VillaError(f"table {table}: the 'id' column must hold integers") from None
    else:
        ids = list(range(len(rows)))
    seen: set = set()
    for image_id in ids:
        if image_id in seen:
            raise VillaError(f"table {table}: id {image_id} appears twice")
        seen.add(image_id)
    files = [str(r["image"]).strip() for r in rows]
    seen = set()
    for name in files:
        if name in seen:
            raise VillaError(
                f"table {table}: image {name} appears twice (one row per image: join its texts into one)"
            )
        seen.add(name)
    texts = [" ".join(str(r.get("text") or "").split()) for r in rows]
    check_sentences(texts, lambda i: f"table {table} row {i + 1} (image {files[i]})")

    # ---- boxes (parsed before the slow image check, so a malformed cell fails fast)
    given_boxes, given_labels = [], []
    for number, row in enumerate(rows, 1):
        where = f"table {table} row {number}"
        boxes = _json_cell(row.get("boxes"), "boxes", where)
        labels = _json_cell(row.get("region_labels"), "region_labels", where)
        if boxes is not None and (
            not isinstance(boxes, list) or not all(isinstance(b, list) and len(b) == 4 for b in boxes)
        ):
            raise VillaError(f"{where}: 'boxes' must be a list of [x0, y0, x1, y1]")
        if labels is not None and (
            boxes is None or not isinstance(labels, list) or len(labels) != len(boxes)
        ):
            raise VillaError(f"{where}: 'region_labels' needs one list of attribute names per box")
        if boxes is None and not computes:
            raise VillaError(
                f"{where} has no boxes: give them or pass --regions=proposals or --regions=grid:RxC"
            )
        given_boxes.append(boxes)
        given_labels.append(labels)
    has_labels = any(lab is not None for lab in given_labels)
    if has_labels and any(lab is None for lab in given_labels):
        raise VillaError(f"table {table}: 'region_labels' must be given on every row or on none")
    if has_labels:
        unknown = {a for labs in given_labels for region in labs for a in region} - set(vocabulary.names)
        if unknown:
            raise VillaError(
                f"table {table}: region_labels name attributes not in the vocabulary: {sorted(unknown)[:5]}"
            )

    # ---- which rows stay
    keep = np.ones(len(rows), dtype=bool)
    empty = np.asarray([not t for t in texts])
    log.add("rows with an empty text", int(empty.sum()), files[int(np.argmax(empty))] if empty.any() else "")
    keep &= ~empty
    candidates = np.flatnonzero(keep)
    probed = probe_images([image_dir / files[i] for i in candidates], progress=progress)
    sizes: dict[int, tuple[int, int]] = {}
    for i, result in zip(candidates.tolist(), probed):
        if isinstance(result, str):
            keep[i] = False
            log.add("rows whose image is missing or unreadable", 1, f"{image_dir / files[i]}: {result}")
        else:
            sizes[i] = result
    regions_of: dict[int, list] = {}
    labels_of: dict[int, list] = {}
    outside = 0
    for i in np.flatnonzero(keep).tolist():
        height, width = sizes[i]
        if given_boxes[i] is None:
            continue  # computed below, once the rows are final
        boxes = np.asarray(given_boxes[i], dtype=np.float64).reshape(-1, 4)
        clipped, valid = clip_boxes(boxes, np.full(len(boxes), height), np.full(len(boxes), width))
        outside += int((~valid).sum())
        regions_of[i] = clipped[valid].tolist()
        if has_labels:
            labels_of[i] = [given_labels[i][j] for j in np.flatnonzero(valid).tolist()]
        if not regions_of[i]:
            keep[i] = False
            log.add("rows without a usable box", 1, files[i])
    log.add("boxes of zero area or outside their image", outside)
    kept = np.flatnonzero(keep).tolist()
    if not kept:
        raise VillaError(f"no row of {table} has a text, a readable image and a region")
    to_compute = [i for i in kept if given_boxes[i] is None]
    if to_compute:
        computed = computed_regions(
            spec,
            [image_dir / files[i] for i in to_compute],
            [sizes[i][0] for i in to_compute],
            [sizes[i][1] for i in to_compute],
            progress=progress,
        )
        regions_of.update(zip(to_compute, computed))
    # what the regions are, for dataset.json: the rows' own boxes, the spec's, or both
    regions_record = (
        "boxes" if not to_compute else str(spec) if len(to_compute) == len(kept) else f"boxes+{spec}"
    )

    given_splits = (
        [str(rows[i].get("split") or "").strip() or None for i in kept] if "split" in rows[0] else None
    )
    split_of = assign_splits(
        [(str(ids[i]), files[i], Path(files[i]).name) for i in kept], given_splits, splits, seed, log
    )
    kept = [i for i, s in zip(kept, split_of) if s is not None]
    split_of = [s for s in split_of if s is not None]
    if not kept:
        raise VillaError("no row is left after applying the splits file")
    warnings = check_vocabulary_matches(vocabulary, [texts[i] for i in kept])
    columns = {
        "image_id": [ids[i] for i in kept],
        "image_filepath": [files[i] for i in kept],
        "image_size": [list(sizes[i]) for i in kept],
        "split": split_of,
        "text": [texts[i] for i in kept],
        "region_coord": [regions_of[i] for i in kept],
        "num_regions": [len(regions_of[i]) for i in kept],
        "reg_to_attr": [labels_of[i] for i in kept] if has_labels else [None] * len(kept),
    }
    dataset_dir = publish(
        out,
        columns,
        vocabulary,
        source="table",
        image_dir=image_dir,
        copy_images=copy_images,
        overwrite=overwrite,
        info={"created_by": created_by, "skipped": log.counts, "regions": regions_record},
        progress=progress,
    )
    lines = summary_lines(columns, vocabulary, has_labels) + log.lines() + warnings
    num_images = {s: split_of.count(s) for s in dict.fromkeys(split_of)}
    return ImportResult(dataset_dir, num_images, int(sum(columns["num_regions"])), lines)
