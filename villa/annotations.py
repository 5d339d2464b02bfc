"""Schema of a dataset's ``annotations.feather``: the one reader and writer of that file.

One row per image. Columns (SPEC section 2):

============== =============================================================================
image_id       int, unique within the dataset
image_size     [height, width]
image_filepath path of the PNG relative to the dataset folder
region_coord   list of [x1, y1, x2, y2] boxes, one per region
num_regions    int
split          "train" | "val" | "test"
text           the caption: sentences joined with " . "
digit_label    list per region of the digit word
color_label    list per region of the colour
shape_label    list per region of the shape, None where the region has none
size_label     list per region of the size, None where the region has none
reg_to_attr    ground truth: list per region of its attributes (evaluation only)
attributes     attributes of the image (a set, stored as a list in vocabulary order)
============== =============================================================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from villa.errors import VillaError

if TYPE_CHECKING:  # pandas costs ~0.5 s and ~100 MB to import: the DocMNIST generator writes without it
    import pandas as pd

ANNOTATIONS_FILE = "annotations.feather"
SPLITS = ("train", "val", "test")
COLUMNS = (
    "image_id",
    "image_size",
    "image_filepath",
    "region_coord",
    "num_regions",
    "split",
    "text",
    "digit_label",
    "color_label",
    "shape_label",
    "size_label",
    "reg_to_attr",
    "attributes",
)
LIST_COLUMNS = (
    "image_size",
    "region_coord",
    "digit_label",
    "color_label",
    "shape_label",
    "size_label",
    "reg_to_attr",
    "attributes",
)


def annotations_path(dataset_dir: str | os.PathLike) -> Path:
    return Path(dataset_dir) / ANNOTATIONS_FILE


def write_annotations(dataset_dir: str | os.PathLike, frame: pd.DataFrame) -> Path:
    """Validate and write ``frame`` to ``<dataset_dir>/annotations.feather`` (atomically)."""
    from villa.io import write_feather

    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"annotation table lacks columns {missing}")
    if not frame["image_id"].is_unique:
        raise ValueError("image_id must be unique")
    path = annotations_path(dataset_dir)
    write_feather(path, frame[list(COLUMNS)])
    return path


def _arrow_schema():
    """The Arrow types of the table, as pandas writes them (strings as large_string)."""
    import pyarrow as pa

    text, words, ints = pa.large_string(), pa.list_(pa.string()), pa.list_(pa.int64())
    types = {
        "image_id": pa.int64(),
        "image_size": ints,
        "image_filepath": text,
        "region_coord": pa.list_(ints),
        "num_regions": pa.int64(),
        "split": text,
        "text": text,
        "digit_label": words,
        "color_label": words,
        "shape_label": words,
        "size_label": words,
        "reg_to_attr": pa.list_(words),
        "attributes": words,
    }
    return pa.schema([(c, types[c]) for c in COLUMNS])


def write_annotation_columns(dataset_dir: str | os.PathLike, columns: Mapping[str, Sequence]) -> Path:
    """Like :func:`write_annotations`, from plain per-column lists (Python lists, no pandas needed).

    Lets the DocMNIST generator start fast; the file reads back identically with :func:`read_annotations`.
    """
    import pyarrow as pa
    import pyarrow.feather as feather

    from villa.io import atomic_path

    missing = [c for c in COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"annotation table lacks columns {missing}")
    ids = list(columns["image_id"])
    if len(set(ids)) != len(ids):
        raise ValueError("image_id must be unique")
    schema = _arrow_schema()
    table = pa.Table.from_arrays(
        [pa.array(columns[c], type=schema.field(c).type) for c in COLUMNS], schema=schema
    )
    path = annotations_path(dataset_dir)
    with atomic_path(path) as tmp:
        feather.write_feather(table, tmp)
    return path


def read_annotations(dataset_dir: str | os.PathLike, split: str | None = None) -> pd.DataFrame:
    """Read the annotation table (list columns as Python lists), optionally one split only.

    Raises :class:`VillaError` when the file is missing or lacks columns, or the split is empty.
    """
    import pandas as pd
    import pyarrow.feather as feather

    path = annotations_path(dataset_dir)
    if not path.is_file():
        raise VillaError(f"no {ANNOTATIONS_FILE} in {dataset_dir}: is this a dataset folder?")
    try:
        table = feather.read_table(path)
    except Exception as err:  # a truncated or foreign file
        raise VillaError(f"cannot read {path}: {err}") from None
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise VillaError(f"{path} lacks columns {missing}")
    frame = pd.DataFrame(
        {
            c: (table.column(c).to_pylist() if c in LIST_COLUMNS else table.column(c).to_numpy())
            for c in COLUMNS
        }
    )
    if split is not None:
        if split not in SPLITS:
            raise VillaError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")
        frame = frame[frame["split"] == split].reset_index(drop=True)
        if frame.empty:
            raise VillaError(f"split '{split}' of {dataset_dir} has no images")
    return frame


def attribute_multi_hot(attribute_lists, vocabulary) -> np.ndarray:
    """Multi-hot matrix ``[N, K]`` (bool) of each row's attributes over ``vocabulary``."""
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
    """All region boxes ``[total_regions, 4]`` (x1, y1, x2, y2), float32, in row order."""
    boxes = [box for coords in frame["region_coord"] for box in coords]
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
