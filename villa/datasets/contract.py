"""The dataset contract: the one reader, writer and validator of a dataset folder.

A dataset folder holds three files (and, usually, its images)::

    annotations.feather   one row per image (columns below)
    attributes.yaml       the attribute vocabulary (villa/datasets/vocabulary.py)
    dataset.json          {"format", "name", "source", "image_root", "region_labels", "objects", "num_images", ...}

``annotations.feather`` columns:

============== ======================================================================================
image_id       int, unique
image_filepath path of the image file, relative to the image root (or absolute)
image_size     [height, width] in pixels of the file as stored
split          "train" | "val" | "test"
text           the image's text (for DocMNIST: sentences joined with " . ")
region_coord   list of pixel boxes [x0, y0, x1, y1], 0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height
num_regions    int, len(region_coord) (>= 1)
attributes     the attributes the TEXT mentions (vocabulary order), written by this module's matcher
reg_to_attr    optional ground truth: per region, its attributes; null on every row of a dataset without
               region labels. Used for metrics only, never for training.
object_boxes   optional: labelled objects for detection metrics when the regions are not the objects
object_labels  (e.g. imported proposals): boxes [x0, y0, x1, y1] and one attribute name per box
============== ======================================================================================

Other columns (e.g. DocMNIST's ``digit_label``) are kept as written and returned by the reader.
``image_root`` in ``dataset.json`` is a path relative to the dataset folder (``"."``: images live inside it, as
DocMNIST's do) or absolute (an importer that references a user's image folder instead of copying it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from villa.datasets.vocabulary import VOCABULARY_FILE, Vocabulary, load_vocabulary_file, write_vocabulary
from villa.storage.errors import VillaError

if TYPE_CHECKING:  # pandas costs ~0.5 s and ~100 MB to import: the DocMNIST generator writes without it
    import pandas as pd

FORMAT_VERSION = 1
ANNOTATIONS_FILE = "annotations.feather"
INFO_FILE = "dataset.json"
SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = (
    "image_id",
    "image_filepath",
    "image_size",
    "split",
    "text",
    "region_coord",
    "num_regions",
)
OPTIONAL_COLUMNS = ("reg_to_attr", "object_boxes", "object_labels")
#: every column of the contract, in file order (``attributes`` is derived from ``text`` by the writer)
COLUMNS = (*REQUIRED_COLUMNS, "attributes", *OPTIONAL_COLUMNS)


def _arrow_types() -> dict:
    import pyarrow as pa

    text, words, ints, box_list = pa.large_string(), pa.list_(pa.string()), pa.list_(pa.int64()), None
    box_list = pa.list_(pa.list_(pa.float64()))
    return {
        "image_id": pa.int64(),
        "image_filepath": text,
        "image_size": ints,
        "split": text,
        "text": text,
        "region_coord": box_list,
        "num_regions": pa.int64(),
        "attributes": words,
        "reg_to_attr": pa.list_(words),
        "object_boxes": box_list,
        "object_labels": words,
    }


def annotations_path(dataset_dir: str | os.PathLike) -> Path:
    return Path(dataset_dir) / ANNOTATIONS_FILE


# --------------------------------------------------------------------------- validation
def _fail(message: str) -> None:
    raise VillaError(message)


def _check_boxes(
    boxes: Sequence, image_ids: Sequence[int], sizes: np.ndarray, counts: np.ndarray, what: str
) -> None:
    """Every box ``[x0, y0, x1, y1]`` lies inside its image (``sizes [N, 2]`` as H, W) with positive area."""
    flat = [b for per_image in boxes for b in per_image]
    if any(len(b) != 4 for b in flat):
        _fail(f"every {what} box must be [x0, y0, x1, y1]")
    array = np.asarray(flat, dtype=np.float64).reshape(-1, 4)
    owner = np.repeat(np.arange(len(counts)), counts)
    height, width = sizes[owner, 0], sizes[owner, 1]
    bad = ~np.isfinite(array).all(1)
    bad |= (array[:, 0] < 0) | (array[:, 1] < 0) | (array[:, 2] > width) | (array[:, 3] > height)
    bad |= (array[:, 2] <= array[:, 0]) | (array[:, 3] <= array[:, 1])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        _fail(
            f"{int(bad.sum())} {what} boxes lie outside their image or have no area, e.g. "
            f"{array[i].tolist()} in image {image_ids[owner[i]]} of size "
            f"{int(width[i])}x{int(height[i])} (boxes are [x0, y0, x1, y1] pixels)"
        )


def validate_columns(columns: Mapping[str, Sequence], vocabulary: Vocabulary) -> None:
    """Refuse a table that breaks the contract (one line, :class:`VillaError`)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        _fail(f"the annotation table lacks columns {missing}")
    n = len(columns["image_id"])
    lengths = {c: len(columns[c]) for c in columns}
    if any(v != n for v in lengths.values()):
        _fail(f"annotation columns differ in length: {lengths}")
    if n == 0:
        _fail("the annotation table has no images")
    ids = list(columns["image_id"])
    if len(set(ids)) != n:
        seen: set = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        _fail(f"image_id {dup} appears twice: ids must be unique")
    splits = set(columns["split"])
    if not splits <= set(SPLITS):
        _fail(f"unknown splits {sorted(map(str, splits - set(SPLITS)))}: use train, val and test")
    texts = columns["text"]
    empty = [i for i, t in zip(ids, texts) if not isinstance(t, str) or not t.strip()]
    if empty:
        _fail(f"{len(empty)} images have an empty text, e.g. image_id {empty[0]}")
    sizes = np.asarray(list(columns["image_size"]), dtype=np.int64)
    if sizes.shape != (n, 2) or (sizes <= 0).any():
        _fail("image_size must be [height, width] with positive integers for every image")
    counts = np.asarray(list(columns["num_regions"]), dtype=np.int64)
    boxes = columns["region_coord"]
    if any(len(b) != c for b, c in zip(boxes, counts.tolist())):
        _fail("num_regions must equal the number of boxes in region_coord on every row")
    if (counts < 1).any():
        _fail(f"image_id {ids[int(np.flatnonzero(counts < 1)[0])]} has no region: every image needs >= 1")
    _check_boxes(boxes, ids, sizes, counts, "region")
    names = set(vocabulary.names)
    labels = columns.get("reg_to_attr")
    if labels is not None and any(v is not None for v in labels):
        if any(v is None for v in labels):
            _fail("reg_to_attr must be given for every image or for none")
        if any(len(v) != c for v, c in zip(labels, counts.tolist())):
            _fail("reg_to_attr must hold one attribute list per region")
        unknown = {a for per_image in labels for region in per_image for a in region} - names
        if unknown:
            _fail(f"reg_to_attr names attributes missing from the vocabulary: {sorted(unknown)[:5]}")
    objects, object_labels = columns.get("object_boxes"), columns.get("object_labels")
    if (objects is None) != (object_labels is None):
        _fail("object_boxes and object_labels go together")
    if objects is not None and any(v is not None for v in objects):
        object_counts = np.asarray([len(v or []) for v in objects], dtype=np.int64)
        if any(len(v or []) != c for v, c in zip(object_labels, object_counts.tolist())):
            _fail("object_labels must hold one attribute name per object box")
        _check_boxes([v or [] for v in objects], ids, sizes, object_counts, "object")
        unknown = {a for per_image in object_labels for a in (per_image or [])} - names
        if unknown:
            _fail(f"object_labels names attributes missing from the vocabulary: {sorted(unknown)[:5]}")


# --------------------------------------------------------------------------- writing
def write_dataset(
    dataset_dir: str | os.PathLike,
    columns: Mapping[str, Sequence] | pd.DataFrame,
    vocabulary: Vocabulary,
    *,
    source: str,
    image_root: str | os.PathLike = ".",
    info: Mapping | None = None,
) -> Path:
    """Validate and write a dataset's ``annotations.feather``, ``attributes.yaml`` and ``dataset.json``.

    ``columns`` maps column name -> per-image values (Python lists; a DataFrame works too). The
    ``attributes`` column is (re)computed here from ``text`` with ``vocabulary``'s matcher, so no writer can
    leak region labels into training. Callers write into a temporary folder (``villa.storage.io.atomic_dir``) and
    publish it whole. Returns the path of the table.
    """
    import pyarrow as pa
    import pyarrow.feather as feather

    from villa.storage.artifacts import file_record
    from villa.storage.io import atomic_path, write_json

    if hasattr(columns, "columns") and hasattr(columns, "to_dict"):  # a DataFrame
        columns = {c: columns[c].tolist() for c in columns.columns}
    columns = dict(columns)
    validate_columns(columns, vocabulary)
    columns["attributes"] = vocabulary.text_attributes(list(columns["text"]))
    n = len(columns["image_id"])
    for optional in OPTIONAL_COLUMNS:
        columns.setdefault(optional, [None] * n)
    region_labels = any(v is not None for v in columns["reg_to_attr"])
    objects = any(v is not None for v in columns["object_boxes"])
    types = _arrow_types()
    extras = [c for c in columns if c not in COLUMNS]
    arrays = [pa.array(list(columns[c]), type=types[c]) for c in COLUMNS]
    arrays += [pa.array(list(columns[c])) for c in extras]
    table = pa.Table.from_arrays(arrays, names=[*COLUMNS, *extras])

    dataset_dir = Path(dataset_dir)
    path = annotations_path(dataset_dir)
    with atomic_path(path) as tmp:
        feather.write_feather(table, tmp)
    vocabulary_path = write_vocabulary(dataset_dir, vocabulary)
    files = {
        ANNOTATIONS_FILE: file_record(path, n),
        VOCABULARY_FILE: file_record(vocabulary_path, len(vocabulary)),
    }
    split_counts = {s: 0 for s in SPLITS}
    for split in columns["split"]:
        split_counts[split] += 1
    write_json(
        dataset_dir / INFO_FILE,
        {
            "format": FORMAT_VERSION,
            "source": source,
            "image_root": str(image_root),
            "region_labels": region_labels,
            "objects": objects,
            "num_images": {s: c for s, c in split_counts.items() if c},
            "num_regions": int(sum(int(c) for c in columns["num_regions"])),
            "num_attributes": len(vocabulary),
            **dict(info or {}),
            "files": files,
        },
    )
    return path


# --------------------------------------------------------------------------- reading
def rebuild_hint(dataset_dir: Path, info: dict | None = None) -> str:
    """How to rebuild a dataset folder: the command recorded in its ``dataset.json`` when readable."""
    command = (info or {}).get("created_by") if isinstance(info, dict) else None
    if isinstance(command, str) and command:
        return f"rebuild it: {command}"
    return "rebuild it with the command that made it (python -m villa.ingest ... or the DocMNIST generator)"


def read_info(dataset_dir: str | os.PathLike) -> dict:
    """``dataset.json`` as a dict (one-line errors for a missing or damaged file)."""
    from villa.storage.artifacts import read_json

    dataset_dir = Path(dataset_dir)
    path = dataset_dir / INFO_FILE
    if not path.is_file():
        if annotations_path(dataset_dir).is_file():
            raise VillaError(
                f"{dataset_dir} has no {INFO_FILE}: it was written by an older villa; {rebuild_hint(dataset_dir)}"
            )
        raise VillaError(f"no {ANNOTATIONS_FILE} in {dataset_dir}: is this a dataset folder?")
    return read_json(
        path, root=dataset_dir, fix=rebuild_hint(dataset_dir), required=("image_root", "region_labels")
    )


def is_dataset_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder villa wrote as a dataset: it holds a ``dataset.json`` that is a JSON object
    with the contract's ``format`` and ``image_root`` (the marker that lets ``--overwrite`` replace it)."""
    import json

    try:
        info = json.loads((Path(path) / INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and isinstance(info.get("format"), int) and "image_root" in info


def _check_recorded_files(dataset_dir: Path, info: dict) -> None:
    """Sizes of the files ``dataset.json`` records (a truncated copy says so); the vocabulary's checksum too."""
    from villa.storage.artifacts import check_file, verify_sha256

    fix = rebuild_hint(dataset_dir, info)
    files = info.get("files")
    if not isinstance(files, dict):
        return  # written before files were recorded: the readers' own checks still apply
    for name, record in files.items():
        if isinstance(record, dict):
            check_file(dataset_dir / name, dataset_dir, fix, record)
    record = files.get(VOCABULARY_FILE)
    if isinstance(record, dict) and isinstance(record.get("sha256"), str):  # small: always verified
        verify_sha256(dataset_dir / VOCABULARY_FILE, dataset_dir, record["sha256"], fix)


def read_vocabulary(dataset_dir: str | os.PathLike) -> Vocabulary:
    """The dataset's ``attributes.yaml``."""
    path = Path(dataset_dir) / VOCABULARY_FILE
    if not path.is_file():
        raise VillaError(f"no {VOCABULARY_FILE} in {dataset_dir}: {rebuild_hint(Path(dataset_dir))}")
    return load_vocabulary_file(path)


def read_annotations(dataset_dir: str | os.PathLike, split: str | None = None) -> pd.DataFrame:
    """Read the annotation table (list columns as Python lists), optionally one split only.

    Raises :class:`VillaError` when the file is missing, damaged or lacks columns, or the split is empty.
    """
    import pandas as pd
    import pyarrow as pa

    from villa.storage.artifacts import read_feather_table

    dataset_dir = Path(dataset_dir)
    path = annotations_path(dataset_dir)
    if not path.is_file():
        raise VillaError(f"no {ANNOTATIONS_FILE} in {dataset_dir}: is this a dataset folder?")
    info = None
    if (dataset_dir / INFO_FILE).is_file():
        with contextlib.suppress(VillaError):
            info = read_info(dataset_dir)
    table = read_feather_table(
        path, dataset_dir, rebuild_hint(dataset_dir, info), columns=(*REQUIRED_COLUMNS, "attributes")
    )
    data = {}
    for name in table.column_names:
        column = table.column(name)
        nested = pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
        data[name] = column.to_pylist() if nested else column.to_numpy(zero_copy_only=False)
    n = table.num_rows
    for optional in OPTIONAL_COLUMNS:
        data.setdefault(optional, [None] * n)
    order = [*COLUMNS, *(c for c in table.column_names if c not in COLUMNS)]
    frame = pd.DataFrame({c: data[c] for c in order})
    if split is not None:
        if split not in SPLITS:
            raise VillaError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")
        frame = frame[frame["split"] == split].reset_index(drop=True)
        if frame.empty:
            raise VillaError(f"split '{split}' of {dataset_dir} has no images")
    return frame


@dataclass(frozen=True)
class Dataset:
    """An opened dataset folder: its location, ``dataset.json`` and vocabulary; reads tables on demand."""

    root: Path
    info: dict
    vocabulary: Vocabulary

    @classmethod
    def open(cls, data_dir: str | os.PathLike) -> Dataset:
        """Open a dataset given as a path or as a folder name under the data root."""
        from villa.storage.paths import resolve_dataset_dir

        root = resolve_dataset_dir(data_dir)
        info = read_info(root)
        _check_recorded_files(root, info)
        return cls(root=root, info=info, vocabulary=read_vocabulary(root))

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def has_region_labels(self) -> bool:
        return bool(self.info.get("region_labels"))

    @property
    def has_objects(self) -> bool:
        return bool(self.info.get("objects"))

    @property
    def regions(self) -> str | None:
        """Where the regions came from, as ``dataset.json`` records it: ``"instances"`` or ``"boxes"`` (the
        data's own boxes), ``"grid:RxC"``, ``"proposals:K"`` (villa's proposer) or ``"proposals"`` (a
        detector's file); None when not recorded."""
        value = self.info.get("regions")
        return value if isinstance(value, str) else None

    @property
    def regions_are_objects(self) -> bool:
        """True when the regions are the labelled objects' own boxes (a COCO import's instance boxes, a table's
        labelled boxes): scoring them is classification of given boxes, not detection."""
        return self.has_region_labels and not self.has_objects and self.regions in ("instances", "boxes")

    @property
    def image_root(self) -> Path:
        return (self.root / self.info.get("image_root", ".")).resolve()

    @property
    def rebuild_hint(self) -> str:
        """How to rebuild this dataset (for error messages)."""
        return rebuild_hint(self.root, self.info)

    def annotations(self, split: str | None = None) -> pd.DataFrame:
        return read_annotations(self.root, split)

    def image_paths(self, filepaths: Sequence[str]) -> list[Path]:
        """Absolute paths of the images named by ``image_filepath`` values."""
        root = self.image_root
        return [root / p for p in filepaths]


# --------------------------------------------------------------------------- per-region helpers
def attribute_multi_hot(attribute_lists, vocabulary: Sequence[str]) -> np.ndarray:
    """Multi-hot matrix ``[N, K]`` (bool) of each row's attributes over ``vocabulary`` (names)."""
    index = {a: k for k, a in enumerate(vocabulary)}
    out = np.zeros((len(attribute_lists), len(vocabulary)), dtype=bool)
    rows = [i for i, attrs in enumerate(attribute_lists) for _ in attrs]
    cols = [index[a] for attrs in attribute_lists for a in attrs]
    out[rows, cols] = True
    return out


def region_offsets(frame: pd.DataFrame) -> np.ndarray:
    """``[N + 1]`` offsets: the regions of row i are rows ``offsets[i]:offsets[i+1]`` of any per-region array."""
    return np.concatenate([[0], np.cumsum(frame["num_regions"].to_numpy(dtype=np.int64))])


def region_boxes(frame: pd.DataFrame) -> np.ndarray:
    """All region boxes ``[total_regions, 4]`` (x0, y0, x1, y1), float32, in row order."""
    boxes = [box for coords in frame["region_coord"] for box in coords]
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def whole_image_boxes(frame: pd.DataFrame) -> np.ndarray:
    """One box per row covering its whole image ``[N, 4]`` (0, 0, W - 1, H - 1), float32, from ``image_size``."""
    sizes = np.asarray(frame["image_size"].tolist(), dtype=np.float32).reshape(-1, 2)  # [H, W]
    boxes = np.zeros((len(sizes), 4), dtype=np.float32)
    boxes[:, 2], boxes[:, 3] = sizes[:, 1] - 1, sizes[:, 0] - 1
    return boxes


def region_truth(frame: pd.DataFrame, vocabulary: Sequence[str], reachable: bool = True) -> np.ndarray:
    """Ground-truth region-attribute pairs ``[M, K]`` bool over the frame's M regions, in region order.

    ``reachable=True`` keeps only the attributes the region's image TEXT mentions: the pairs a mapping can
    possibly find (stage 1 assigns only mentioned attributes). On DocMNIST every region attribute is
    mentioned, so both are the same. Requires region labels.
    """
    if frame["reg_to_attr"].isna().any():
        raise VillaError("this dataset has no region labels (reg_to_attr): region metrics need them")
    truth = attribute_multi_hot([attrs for regions in frame["reg_to_attr"] for attrs in regions], vocabulary)
    if reachable:
        mentioned = attribute_multi_hot(frame["attributes"], vocabulary)
        truth &= np.repeat(mentioned, frame["num_regions"].to_numpy(dtype=np.int64), axis=0)
    return truth
