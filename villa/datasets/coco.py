"""Import COCO-format data: ``instances`` and ``captions`` JSON as published, optionally detection proposals.

    python -m villa.ingest coco --images=IMG_DIR --instances=instances.json --captions=captions.json \\
        --out=DATA_DIR [--attributes=attributes.yaml] [--regions=boxes|proposals[:K]|grid:RxC] \\
        [--proposals=dets.json --max_regions=20 --min_score=0.05] [--splits=FILE] [--seed=0] [--copy_images] [--overwrite]

- **Text**: every caption of an image, trailing full stops stripped, joined with ``" . "``.
- **Vocabulary**: the categories (name; ``kind`` = supercategory; default prompts and match phrases, plurals
  included), unless ``--attributes`` gives one. A category labels a box with the attribute whose name or
  ``match`` phrase equals the category name (case-insensitive); a category with no such attribute leaves its
  boxes unlabelled.
- **Regions**: by default (``--regions=boxes``) the instance boxes (``bbox`` is ``[x, y, w, h]``; crowd
  annotations skipped; boxes clipped to the image, empty ones dropped), labelled with their category.
  ``--regions=proposals[:K]`` computes each image's top K boxes of villa's region proposer
  (:mod:`villa.regions.proposals`) and ``--regions=grid:RxC`` uses R x C cells; with ``--proposals`` (COCO
  detection-results JSON: ``image_id``, ``bbox``, ``score``) the regions are each image's top ``--max_regions``
  proposals of that file scoring at least ``--min_score``. In all three cases no instance box is a region: a
  region takes the labels of every instance box it overlaps with IoU >= 0.5 (ground truth for metrics only),
  and the instance boxes are kept as the dataset's labelled objects (for detection metrics).
- **Splits**: ``--splits=FILE`` (by image id or file name), else a seeded 70/15/15 split by image.
- Images with no caption, no region, or a missing/undecodable file are skipped and counted; malformed JSON,
  duplicate image ids, captions or instances of unknown image ids, and a caption text with no sentence longer
  than 3 characters (the stages could not pair it) are refused.
"""

from __future__ import annotations

import os
from collections import defaultdict
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
    read_json,
    require_keys,
    summary_lines,
)
from villa.datasets.vocabulary import Vocabulary, load_vocabulary_file, make_attribute
from villa.regions import box_iou, clip_boxes, parse_region_spec
from villa.storage.errors import VillaError

IOU_THRESHOLD = 0.5


def _records(data, key: str, path, what: str) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise VillaError(f"{path} is not a COCO {what} file: it has no '{key}' list")
    return data[key]


def _caption_text(captions: list[str]) -> str:
    parts = [c.strip().rstrip(".").strip() for c in captions if isinstance(c, str)]
    return " . ".join(p for p in parts if p)


def category_attributes(categories: list[dict], vocabulary: Vocabulary) -> dict[int, str | None]:
    """category id -> the attribute it labels (by name, then by ``match`` phrase), or None."""
    by_phrase: dict[str, str] = {}
    for attr in vocabulary.attributes:
        for phrase in attr.match:
            by_phrase.setdefault(" ".join(phrase.lower().split()), attr.name)
    for attr in vocabulary.attributes:
        by_phrase[" ".join(attr.name.lower().split())] = attr.name
    return {int(c["id"]): by_phrase.get(" ".join(str(c["name"]).lower().split())) for c in categories}


def import_coco(
    images: str | os.PathLike,
    instances: str | os.PathLike,
    captions: str | os.PathLike,
    out: str | os.PathLike,
    *,
    attributes: str | os.PathLike | None = None,
    regions: str | None = None,
    proposals: str | os.PathLike | None = None,
    max_regions: int = 100,
    min_score: float = 0.0,
    splits: str | os.PathLike | None = None,
    seed: int = 0,
    copy_images: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    negated: str | None = None,
    uncertain: str | None = None,
    created_by: str = "villa.datasets.coco.import_coco",
) -> ImportResult:
    """Build a villa dataset folder at ``out`` from COCO-format files (see the module docstring).

    ``negated`` / ``uncertain``: the vocabulary's policy for negated and uncertain mentions (None: the
    vocabulary file's, else ``drop`` / ``keep``), recorded in the dataset's ``attributes.yaml``.
    ``created_by`` is recorded in ``dataset.json`` (the command that rebuilds the folder).
    """
    image_dir = Path(images).expanduser()
    if not image_dir.is_dir():
        raise VillaError(f"--images folder {image_dir} not found")
    if max_regions < 1:
        raise VillaError(f"--max_regions must be >= 1, got {max_regions}")
    spec = parse_region_spec(regions if regions is not None else "boxes")
    if proposals is not None and spec.kind != "boxes":
        raise VillaError(
            f"--proposals=FILE and --regions={regions} both choose the regions: give one of them"
        )
    out = check_output(out, overwrite, {
        "--images folder": image_dir, "--instances file": instances, "--captions file": captions,
        "--attributes file": attributes, "--proposals file": proposals, "--splits file": splits,
    })  # fmt: skip
    log = SkipLog()

    data = read_json(instances, "instances")
    image_records = _records(data, "images", instances, "instances")
    annotations = _records(data, "annotations", instances, "instances")
    categories = _records(data, "categories", instances, "instances")
    require_keys(image_records, ("id", "file_name", "width", "height"), f"{instances}: image")
    require_keys(annotations, ("image_id", "bbox", "category_id"), f"{instances}: annotation")
    require_keys(categories, ("id", "name"), f"{instances}: category")
    ids = [int(r["id"]) for r in image_records]
    if len(set(ids)) != len(ids):
        seen: set = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise VillaError(f"{instances} lists image id {dup} twice")
    position = {image_id: i for i, image_id in enumerate(ids)}
    heights = np.asarray([float(r["height"]) for r in image_records])
    widths = np.asarray([float(r["width"]) for r in image_records])

    if attributes is not None:
        vocabulary = load_vocabulary_file(attributes)
    else:
        if not categories:
            raise VillaError(f"{instances} has no categories: give a vocabulary with --attributes")
        vocabulary = Vocabulary(
            tuple(make_attribute(str(c["name"]), kind=c.get("supercategory")) for c in categories)
        )
    vocabulary = vocabulary.with_policy(negated, uncertain)
    label_of = category_attributes(categories, vocabulary)
    unmapped = [str(c["name"]) for c in categories if label_of[int(c["id"])] is None]
    if unmapped:
        log.add(
            "categories missing from the vocabulary (their boxes stay unlabelled)", len(unmapped), unmapped[0]
        )

    # ---- instance boxes, grouped by image
    unknown = [a["image_id"] for a in annotations if int(a["image_id"]) not in position]
    if unknown:
        raise VillaError(
            f"{instances} has {len(unknown)} annotations of image ids it does not list (e.g. {unknown[0]})"
        )
    bad_category = [a["category_id"] for a in annotations if int(a["category_id"]) not in label_of]
    if bad_category:
        raise VillaError(f"{instances} has annotations of unknown category ids (e.g. {bad_category[0]})")
    crowd = np.asarray([bool(a.get("iscrowd", 0)) for a in annotations], dtype=bool)
    log.add("crowd annotations", int(crowd.sum()))
    kept_ann = [a for a, c in zip(annotations, crowd) if not c]
    if any(not (isinstance(a["bbox"], list) and len(a["bbox"]) == 4) for a in kept_ann):
        raise VillaError(f"{instances}: every annotation bbox must be [x, y, width, height]")
    owner = np.asarray([position[int(a["image_id"])] for a in kept_ann], dtype=np.int64)
    xywh = np.asarray([a["bbox"] for a in kept_ann], dtype=np.float64).reshape(-1, 4)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    boxes, valid = clip_boxes(xyxy, heights[owner], widths[owner])
    if (~valid).any():
        i = int(np.flatnonzero(~valid)[0])
        log.add("instance boxes of zero area or outside their image", int((~valid).sum()),
                f"bbox {xywh[i].tolist()} of image {ids[owner[i]]}")  # fmt: skip
    labels = [label_of[int(a["category_id"])] for a in kept_ann]
    objects: list[list[tuple[list[float], str | None]]] = [[] for _ in ids]
    for i in np.flatnonzero(valid).tolist():
        objects[owner[i]].append((boxes[i].tolist(), labels[i]))

    # ---- captions
    cap_data = read_json(captions, "captions")
    cap_records = _records(cap_data, "annotations", captions, "captions")
    require_keys(cap_records, ("image_id", "caption"), f"{captions}: caption")
    texts_of: dict[int, list[str]] = defaultdict(list)
    strangers = [c["image_id"] for c in cap_records if int(c["image_id"]) not in position]
    if strangers:
        raise VillaError(
            f"{captions} has {len(strangers)} captions of image ids that {instances} does not list "
            f"(e.g. {strangers[0]}): are both files from the same split?"
        )
    for c in cap_records:
        texts_of[int(c["image_id"])].append(c["caption"])
    texts = [_caption_text(texts_of.get(i, [])) for i in ids]
    check_sentences(texts, lambda i: f"{captions}: image {ids[i]}")

    # ---- regions: instance boxes, or proposals labelled by IoU with them (computed ones come after the
    # image check below, so that only readable images are proposed)
    if proposals is not None:
        region_boxes, region_labels = _proposal_regions(
            proposals, position, ids, heights, widths, objects, max_regions, min_score, log
        )
    elif spec.kind == "boxes":
        region_boxes = [[box for box, _ in objs] for objs in objects]
        region_labels = [[[lab] if lab else [] for _, lab in objs] for objs in objects]
    else:  # grid or computed proposals: every image has regions
        region_boxes = [[[0.0, 0.0, 1.0, 1.0]] for _ in ids]
        region_labels = [[] for _ in ids]

    # ---- which images stay
    keep = np.ones(len(ids), dtype=bool)
    no_text = np.asarray([not t for t in texts])
    log.add(
        "images without a caption",
        int(no_text.sum()),
        str(ids[int(np.argmax(no_text))]) if no_text.any() else "",
    )
    keep &= ~no_text
    no_region = np.asarray([not r for r in region_boxes]) & keep
    log.add(
        "images without a region",
        int(no_region.sum()),
        str(ids[int(np.argmax(no_region))]) if no_region.any() else "",
    )
    keep &= ~no_region
    files = [str(r["file_name"]) for r in image_records]
    candidates = np.flatnonzero(keep)
    probed = probe_images([image_dir / files[i] for i in candidates], progress=progress)
    for i, result in zip(candidates.tolist(), probed):
        if isinstance(result, str):
            keep[i] = False
            log.add("images whose file is missing or unreadable", 1, f"{image_dir / files[i]}: {result}")
        elif result != (int(heights[i]), int(widths[i])):
            keep[i] = False
            log.add("images whose file size differs from the JSON's width/height", 1,
                    f"{files[i]} is {result[1]}x{result[0]}")  # fmt: skip
    rows = np.flatnonzero(keep).tolist()
    if not rows:
        raise VillaError(f"no image of {instances} has a caption, a region and a readable file")
    if spec.kind in ("grid", "proposals"):
        computed = computed_regions(
            spec, [image_dir / files[i] for i in rows], heights[rows], widths[rows], progress=progress
        )
        for i, boxes in zip(rows, computed):
            region_boxes[i] = boxes
            region_labels[i] = label_by_overlap(np.asarray(boxes), objects[i])

    split_of = assign_splits(
        [(str(ids[i]), files[i], Path(files[i]).name) for i in rows], None, splits, seed, log
    )
    rows = [i for i, s in zip(rows, split_of) if s is not None]
    split_of = [s for s in split_of if s is not None]
    if not rows:
        raise VillaError("no image is left after applying the splits file")

    warnings = check_vocabulary_matches(vocabulary, [texts[i] for i in rows])
    columns = {
        "image_id": [ids[i] for i in rows],
        "image_filepath": [files[i] for i in rows],
        "image_size": [[int(heights[i]), int(widths[i])] for i in rows],
        "split": split_of,
        "text": [texts[i] for i in rows],
        "region_coord": [region_boxes[i] for i in rows],
        "num_regions": [len(region_boxes[i]) for i in rows],
        "reg_to_attr": [region_labels[i] for i in rows],
    }
    if proposals is not None or spec.kind != "boxes":
        columns["object_boxes"] = [[box for box, lab in objects[i] if lab] for i in rows]
        columns["object_labels"] = [[lab for _, lab in objects[i] if lab] for i in rows]
    dataset_dir = publish(
        out,
        columns,
        vocabulary,
        source="coco",
        image_dir=image_dir,
        copy_images=copy_images,
        overwrite=overwrite,
        info={
            "created_by": created_by,
            "skipped": log.counts,
            "regions": "proposals"
            if proposals is not None
            else str(spec)
            if spec.kind != "boxes"
            else "instances",
        },
        progress=progress,
    )
    lines = summary_lines(columns, vocabulary, True) + log.lines() + warnings
    num_images = {s: split_of.count(s) for s in dict.fromkeys(split_of)}
    return ImportResult(dataset_dir, num_images, int(sum(columns["num_regions"])), lines)


def _proposal_regions(proposals, position, ids, heights, widths, objects, max_regions, min_score, log):
    """Per image: the top ``max_regions`` proposals scoring >= ``min_score``, clipped, labelled by IoU >= 0.5."""
    records = read_json(proposals, "proposals")
    if isinstance(records, dict) and isinstance(records.get("annotations"), list):
        records = records["annotations"]
    if not isinstance(records, list):
        raise VillaError(f"{proposals} must be a COCO detection-results list of {{image_id, bbox, score}}")
    require_keys(records, ("image_id", "bbox", "score"), f"{proposals}: proposal")
    strangers = [r["image_id"] for r in records if int(r["image_id"]) not in position]
    log.add("proposals of image ids that the instances file does not list", len(strangers),
            str(strangers[0]) if strangers else "")  # fmt: skip
    records = [r for r in records if int(r["image_id"]) in position and float(r["score"]) >= min_score]
    by_image: dict[int, list] = defaultdict(list)
    for r in records:
        by_image[position[int(r["image_id"])]].append(r)
    regions: list[list[list[float]]] = [[] for _ in ids]
    labels: list[list[list[str]]] = [[] for _ in ids]
    dropped = 0
    for i, recs in by_image.items():
        recs = sorted(recs, key=lambda r: -float(r["score"]))[:max_regions]
        xywh = np.asarray([r["bbox"] for r in recs], dtype=np.float64).reshape(-1, 4)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        boxes, valid = clip_boxes(xyxy, np.full(len(xyxy), heights[i]), np.full(len(xyxy), widths[i]))
        dropped += int((~valid).sum())
        boxes = boxes[valid]
        regions[i] = boxes.tolist()
        labels[i] = label_by_overlap(boxes, objects[i])
    log.add("proposals of zero area or outside their image", dropped)
    return regions, labels


def label_by_overlap(boxes: np.ndarray, objects: list[tuple[list[float], str | None]]) -> list[list[str]]:
    """Each region's labels: those of every labelled object box it overlaps with IoU >= 0.5 (sorted names).

    boxes ``[M, 4]``; objects: (box, label or None) pairs of one image."""
    labelled = [(box, lab) for box, lab in objects if lab]
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not labelled:
        return [[] for _ in boxes]
    iou = box_iou(boxes, np.asarray([b for b, _ in labelled]))
    names = [lab for _, lab in labelled]
    return [sorted({names[j] for j in np.flatnonzero(row >= IOU_THRESHOLD)}) for row in iou]
