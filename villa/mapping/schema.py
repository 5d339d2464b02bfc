"""THE reader and writer of stage-1 outputs in a stage-1 run folder.

``mapping_{split}.feather``: the split's annotation rows (the contract's columns, :mod:`villa.datasets.contract`)
plus

=================== ========================================================================
assigned_attributes list per region of the attributes assigned to it (vocabulary order)
assigned_text       list per region of its assigned text: the attributes' sentences joined with " . "
=================== ========================================================================

``mapping_metrics.json``: ``{split: {precision, recall, f1, num_assigned, num_true, per_kind: {kind:
{precision, recall, f1, num_assigned, num_true}}, num_images, small_split}}`` in percent, ``null`` where a
figure is 0/0 (:mod:`villa.mapping.metrics`), ``small_split`` true under 20 images (``{}`` for a dataset
without region labels), written LAST: a stage-1 run is complete when it exists.
A stage-1 run deletes the previous run's outputs before it starts (:func:`clear_outputs`), so a failed rerun
never leaves files that a later stage would read as current.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from villa.artifacts import damaged, read_feather_table, read_json, rerun_stage
from villa.datasets.contract import COLUMNS, OPTIONAL_COLUMNS, SPLITS
from villa.errors import VillaError
from villa.io import write_feather, write_json

MAPPING_COLUMNS = (*COLUMNS, "assigned_attributes", "assigned_text")
METRICS_FILE = "mapping_metrics.json"


def mapping_path(run_dir: str | os.PathLike, split: str) -> Path:
    if split not in SPLITS:
        raise VillaError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")
    return Path(run_dir) / f"mapping_{split}.feather"


def write_mapping(run_dir: str | os.PathLike, split: str, frame: pd.DataFrame) -> Path:
    """Validate and write one split's mapping atomically; returns its path."""
    path = mapping_path(run_dir, split)
    frame = frame.copy()
    for optional in OPTIONAL_COLUMNS:
        if optional not in frame.columns:
            frame[optional] = None
    missing = [c for c in MAPPING_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"mapping table lacks columns {missing}")
    regions = frame["num_regions"].to_numpy()
    for column in ("assigned_attributes", "assigned_text"):
        lengths = frame[column].map(len).to_numpy()
        if (lengths != regions).any():
            raise ValueError(f"{column} must hold one entry per region")
    write_feather(path, frame[list(MAPPING_COLUMNS)])
    return path


def read_mapping(stage1_run_dir: str | os.PathLike, split: str) -> pd.DataFrame:
    """Read one split's mapping (list columns as Python lists).

    Raises :class:`VillaError` (one line, with the stage-1 command that rebuilds it) when the file is
    missing, damaged, lacks columns or holds a per-region list of the wrong length.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    path = mapping_path(stage1_run_dir, split)
    if not path.is_file():
        raise VillaError(
            f"no {path.name} in {stage1_run_dir}: run stage 1 first (python -m villa.stage1 experiment=...)"
        )
    if not (Path(stage1_run_dir) / METRICS_FILE).is_file():
        raise VillaError(
            f"the stage-1 run in {stage1_run_dir} did not finish (no {METRICS_FILE}): "
            f"{rerun_stage(stage1_run_dir)}"
        )

    def fix() -> str:
        return rerun_stage(stage1_run_dir)

    table = read_feather_table(path, Path(stage1_run_dir), fix, columns=MAPPING_COLUMNS)
    regions = table.column("num_regions")
    for column in ("region_coord", "assigned_attributes", "assigned_text"):
        try:
            lengths = pc.list_value_length(table.column(column))
            ok = pc.all(pc.equal(lengths, regions)).as_py() is not False
        except Exception:  # not a list column at all
            ok = False
        if not ok:
            raise damaged(path, stage1_run_dir, f"has a {column} that is not one entry per region", fix)
    data = {}
    for name in MAPPING_COLUMNS:
        column = table.column(name)
        nested = pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
        data[name] = column.to_pylist() if nested else column.to_numpy(zero_copy_only=False)
    return pd.DataFrame(data)


def clear_outputs(run_dir: str | os.PathLike) -> None:
    """Delete a previous run's mappings and metrics (metrics first: it marks a complete run)."""
    run_dir = Path(run_dir)
    (run_dir / METRICS_FILE).unlink(missing_ok=True)
    for split in SPLITS:
        mapping_path(run_dir, split).unlink(missing_ok=True)


def write_mapping_metrics(run_dir: str | os.PathLike, metrics: dict) -> Path:
    path = Path(run_dir) / METRICS_FILE
    write_json(path, metrics)
    return path


def read_mapping_metrics(run_dir: str | os.PathLike, fix: str | None = None) -> dict:
    """``{split: {precision, recall, f1, per_kind}}``; one-line :class:`VillaError` when missing or damaged.

    ``fix``: the remedy the message names (default: re-run the stage-1 command of ``run_dir``).
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise VillaError(f"no {METRICS_FILE} in {run_dir}: run stage 1 first")
    return read_json(path, root=run_dir, fix=fix or (lambda: rerun_stage(run_dir)))
