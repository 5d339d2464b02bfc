"""THE reader and writer of stage-1 outputs in a stage-1 run folder.

``mapping_{split}.feather``: the split's annotation rows (the contract's columns, :mod:`villa.datasets.contract`)
plus

=================== ========================================================================
assigned_attributes list per region of the attributes assigned to it (vocabulary order)
assigned_text       list per region of its assigned text: the attributes' sentences joined with " . "
=================== ========================================================================

``mapping_metrics.json``: ``{split: {precision, recall, f1, num_assigned, num_true, per_kind: {kind:
{precision, recall, f1, num_assigned, num_true}}, num_images, small_split}}`` in percent, ``null`` where a
figure is 0/0 (:mod:`villa.mapping.metrics`), ``small_split`` true under 20 images (no split for a dataset
without region labels), plus ``"inputs"``: what the mapping was made from (:func:`mapping_inputs`: the
resolved dataset folder, the sha256 of its ``annotations.feather`` and of its ``region_embs/manifest.json``,
which records every embedding file's checksum). Written LAST: a stage-1 run is complete when it exists. Every
consumer of a mapping calls :func:`check_mapping_inputs` first, which refuses a mapping made from other
inputs, or one that does not record them. A stage-1 run deletes the previous run's outputs before it starts
(:func:`clear_outputs`), so a failed rerun never leaves files that a later stage would read as current.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from villa.datasets.contract import COLUMNS, OPTIONAL_COLUMNS, SPLITS
from villa.storage.artifacts import damaged, read_feather_table, read_json, rerun_stage
from villa.storage.errors import VillaError
from villa.storage.io import write_feather, write_json

MAPPING_COLUMNS = (*COLUMNS, "assigned_attributes", "assigned_text")
METRICS_FILE = "mapping_metrics.json"
#: the key of ``mapping_metrics.json`` that records the mapping's inputs (not a split)
INPUTS_KEY = "inputs"
#: the checksums :func:`mapping_inputs` records, and what each is of (for messages)
INPUT_FILES = {
    "annotations_sha256": "annotations.feather",
    "region_embs_manifest_sha256": "region embeddings (region_embs/manifest.json)",
}


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


def _is_stage1_output(path: Path) -> bool:
    """Whether ``path`` is a file stage 1 writes: a JSON object (metrics) or an Arrow file with the mapping's
    ``assigned_attributes`` column (only the schema is read)."""
    import json

    if path.suffix == ".json":
        try:
            return isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
        except (OSError, ValueError):
            return False
    try:
        import pyarrow.ipc

        with pyarrow.ipc.open_file(path) as reader:
            return "assigned_attributes" in reader.schema.names
    except Exception:  # not an Arrow file at all
        return False


def clear_outputs(run_dir: str | os.PathLike) -> None:
    """Delete a previous run's mappings and metrics (metrics first: it marks a complete run). A file of one of
    these names that stage 1 did not write is refused (one line), not deleted."""
    from villa.storage.io import remove_own_file

    run_dir = Path(run_dir)
    remove_own_file(run_dir / METRICS_FILE, _is_stage1_output, f"stage 1's {METRICS_FILE}")
    for split in SPLITS:
        path = mapping_path(run_dir, split)
        remove_own_file(path, _is_stage1_output, f"stage 1's {path.name}")


# --------------------------------------------------------------------------- provenance
def mapping_inputs(dataset_dir: str | os.PathLike) -> dict:
    """What a mapping of ``dataset_dir`` is made from: ``{"dataset_dir", "annotations_sha256",
    "region_embs_manifest_sha256"}`` (resolved folder; sha256 of ``annotations.feather`` and of
    ``region_embs/manifest.json``, None for a missing file). Hashed once per file version and process."""
    from villa.datasets.contract import annotations_path
    from villa.features.embeddings import MANIFEST_FILE, REGION_EMBS_DIR
    from villa.storage.artifacts import cached_sha256

    dataset_dir = Path(dataset_dir).resolve()
    files = {
        "annotations_sha256": annotations_path(dataset_dir),
        "region_embs_manifest_sha256": dataset_dir / REGION_EMBS_DIR / MANIFEST_FILE,
    }
    out: dict = {"dataset_dir": str(dataset_dir)}
    for key, path in files.items():
        out[key] = cached_sha256(path) if path.is_file() else None
    return out


def check_mapping_inputs(stage1_run_dir: str | os.PathLike, dataset_dir: str | os.PathLike) -> None:
    """Refuse (one line naming the stage-1 command that rebuilds it) the mapping in ``stage1_run_dir`` unless it
    was made from ``dataset_dir``'s current annotations and region embeddings, as its ``mapping_metrics.json``
    records (:func:`mapping_inputs`); a run that records no inputs is refused the same way."""
    run = Path(stage1_run_dir)
    path = run / METRICS_FILE

    def fix() -> str:
        return rerun_stage(run, Path(dataset_dir).resolve())

    if not path.is_file():
        if not any(mapping_path(run, split).is_file() for split in SPLITS):
            raise VillaError(
                f"no stage-1 mapping in {run}: run stage 1 first (python -m villa.stage1 experiment=... data_dir=...)"
            )
        raise VillaError(f"the stage-1 run in {run} did not finish (no {METRICS_FILE}): {fix()}")
    recorded = read_json(path, root=run, fix=fix).get(INPUTS_KEY)
    if not isinstance(recorded, dict) or not all(
        k in recorded and isinstance(recorded[k], str | None) for k in INPUT_FILES
    ):
        raise VillaError(
            f"the stage-1 mapping in {run} does not record the dataset it was made from (an older villa wrote "
            f"it), so it cannot be checked against {Path(dataset_dir)}: {fix()}"
        )
    current = mapping_inputs(dataset_dir)
    for key, what in INPUT_FILES.items():
        if recorded[key] == current[key]:
            continue
        source = recorded.get("dataset_dir")
        made = f" (it was made from {source})" if source and source != current["dataset_dir"] else ""
        if current[key] is None:
            raise VillaError(
                f"the stage-1 mapping in {run} was made from {what} that {current['dataset_dir']} no longer has"
                f"{made}: preprocess the dataset, then {fix()}"
            )
        raise VillaError(
            f"the stage-1 mapping in {run} was made from other {what} than {current['dataset_dir']} has now"
            f"{made}: {fix()}"
        )


def write_mapping_metrics(run_dir: str | os.PathLike, metrics: dict, inputs: dict | None = None) -> Path:
    """Write ``mapping_metrics.json``: ``metrics`` per split, and ``inputs`` (:func:`mapping_inputs` of the
    dataset the mapping was made from; a mapping written without them is refused by every consumer)."""
    path = Path(run_dir) / METRICS_FILE
    write_json(path, {**metrics, **({INPUTS_KEY: inputs} if inputs is not None else {})})
    return path


def read_mapping_metrics(run_dir: str | os.PathLike, fix: str | None = None) -> dict:
    """``{split: {precision, recall, f1, per_kind}}`` (the recorded inputs left out: see
    :func:`check_mapping_inputs`); one-line :class:`VillaError` when missing or damaged.

    ``fix``: the remedy the message names (default: re-run the stage-1 command of ``run_dir``).
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise VillaError(f"no {METRICS_FILE} in {run_dir}: run stage 1 first")
    metrics = read_json(path, root=run_dir, fix=fix or (lambda: rerun_stage(run_dir)))
    metrics.pop(INPUTS_KEY, None)
    return metrics
