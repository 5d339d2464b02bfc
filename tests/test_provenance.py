"""Every consumer of a stage-1 mapping checks that it was made from the dataset's current files: stage 1 records
the sha256 of ``annotations.feather`` and of ``region_embs/manifest.json`` in ``mapping_metrics.json``; stage 2,
evaluation and the figures refuse, in one line naming the stage-1 command, a mapping made from other inputs or
one that does not record them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_stage1_run import make_dataset

from villa.datasets import Dataset
from villa.mapping.run import run_stage1
from villa.storage.artifacts import file_sha256
from villa.storage.errors import VillaError
from villa.vlm.run import stage2_frames


@pytest.fixture
def mapped(tmp_path):
    """A tiny dataset and a finished one-epoch stage-1 run on it (in a run folder named ``stage1``)."""
    data = make_dataset(tmp_path / "data" / "tiny")
    run_dir = tmp_path / "ckpt" / "tiny" / "stage1"
    run_stage1(data, run_dir, epochs=1, batch_size=4, device="cpu", progress=False, seed=3)
    return data, run_dir


def _refused(action, *needles: str) -> str:
    with pytest.raises(VillaError) as info:
        action()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_stage1_records_what_its_mapping_is_made_from(mapped):
    data, run_dir = mapped
    inputs = json.loads((run_dir / "mapping_metrics.json").read_text())["inputs"]
    assert inputs == {
        "dataset_dir": str(data.resolve()),
        "annotations_sha256": file_sha256(data / "annotations.feather"),
        "region_embs_manifest_sha256": file_sha256(data / "region_embs" / "manifest.json"),
    }
    from villa.mapping.schema import read_mapping_metrics

    assert set(read_mapping_metrics(run_dir)) == {"train", "val", "test"}  # the record is not a split
    train, val = stage2_frames(Dataset.open(data), "villa", run_dir)  # current: accepted
    assert len(train) == 12 and len(val) == 6


def test_stage2_refuses_a_mapping_of_a_reimported_dataset(mapped):
    data, run_dir = mapped
    make_dataset(data, seed=7)  # re-imported: new annotations (and embeddings) under the same folder
    _refused(
        lambda: stage2_frames(Dataset.open(data), "villa", run_dir),
        "was made from other annotations.feather",
        "re-run python -m villa.stage1 experiment=stage1",
    )
    _refused(
        lambda: stage2_frames(Dataset.open(data), "random_mapping", run_dir), "other annotations.feather"
    )


def test_stage2_refuses_a_mapping_of_other_region_embeddings(mapped):
    from villa.features.embeddings import write_region_embeddings

    data, run_dir = mapped
    frame = Dataset.open(data).annotations()
    regions = int(frame["num_regions"].sum())
    write_region_embeddings(
        data, frame["image_id"], frame["num_regions"], np.ones((regions, 12), np.float32), encoder="default"
    )
    _refused(
        lambda: stage2_frames(Dataset.open(data), "villa", run_dir),
        "other region embeddings (region_embs/manifest.json)",
        "python -m villa.stage1",
    )
    shutil.rmtree(data / "region_embs")
    _refused(lambda: stage2_frames(Dataset.open(data), "villa", run_dir), "no longer has", "preprocess")


def test_another_dataset_of_the_same_name_is_refused(mapped, tmp_path):
    """The mapping of one dataset read for another (same folder name, same size) is refused, naming both."""
    data, run_dir = mapped
    other = make_dataset(tmp_path / "elsewhere" / "tiny", seed=11)
    message = _refused(lambda: stage2_frames(Dataset.open(other), "villa", run_dir), "python -m villa.stage1")
    assert str(data.resolve()) in message and str(other.resolve()) in message


def test_a_mapping_that_records_no_inputs_is_refused(mapped):
    """A stage-1 run folder written before the inputs were recorded is refused the same way."""
    data, run_dir = mapped
    path = run_dir / "mapping_metrics.json"
    record = json.loads(path.read_text())
    del record["inputs"]
    path.write_text(json.dumps(record))
    _refused(
        lambda: stage2_frames(Dataset.open(data), "villa", run_dir),
        "does not record the dataset it was made from",
        "re-run python -m villa.stage1",
    )


def test_evaluation_refuses_mapping_metrics_of_other_inputs(mapped, monkeypatch):
    """Before any work: the mapping metrics a ViLLA evaluation reports must be of this dataset's files."""
    import villa.evaluation.run as evaluation

    data, run_dir = mapped
    make_dataset(data, seed=7)

    def no_work(*args, **kwargs):
        raise AssertionError("the mapping is checked before the model is built")

    monkeypatch.setattr(evaluation, "preprocessed_encoder", no_work)
    _refused(
        lambda: evaluation.evaluate_model(
            data_dir=data, stage_1_ckpt_dir=run_dir, device="cpu", progress=False
        ),
        "other annotations.feather",
        "python -m villa.stage1",
    )
