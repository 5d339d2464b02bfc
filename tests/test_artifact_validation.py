"""Each artifact's reader refuses damage with one line naming the file, the problem and the rebuild command."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from villa.docmnist.complexity_sweep import _check_settings, collect_results, write_step_times
from villa.engine.checkpoints import load_checkpoint, save_checkpoint
from villa.features.embeddings import (
    RegionEmbeddings,
    RegionEmbeddingWriter,
    TextEmbeddingCache,
    load_attr_embs,
    read_manifest,
    save_attr_embs,
)
from villa.mapping.schema import read_mapping, read_mapping_metrics
from villa.storage.errors import VillaError

DIM = 3
REBUILD = "re-run python3 preprocess/preprocess_dataset.py --data_dir="


def write_regions(root, encoder="enc"):
    with RegionEmbeddingWriter(root, encoder=encoder, dim=DIM) as writer:
        writer.add([10, 11], [2, 1], np.arange(9, dtype=np.float32).reshape(3, DIM))
        writer.add([12], [2], np.full((2, DIM), -1.0))
    return root / "region_embs"


def write_texts(root):
    TextEmbeddingCache.write(root, "enc", ["a red square", "the digit is 3"], np.eye(2, DIM))
    return root / "text_embs"


def refused(call, *patterns) -> str:
    """The one-line message of the VillaError ``call`` raises; each of ``patterns`` must occur in it."""
    with pytest.raises(VillaError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for pattern in patterns:
        assert pattern in message, message
    return message


def edit_manifest(folder, **changes):
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))
    return manifest


def truncate(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# --------------------------------------------------------------------------- region embeddings
def test_manifest_records_every_file(tmp_path):
    folder = write_regions(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == 2
    assert set(manifest["files"]) == {"shard_00000.npy", "shard_00001.npy", "region_emb_mapping.feather"}
    for name, record in manifest["files"].items():
        assert record["bytes"] == (folder / name).stat().st_size
        assert len(record["sha256"]) == 64
    assert [manifest["files"][f"shard_0000{i}.npy"]["rows"] for i in (0, 1)] == [3, 2]
    assert manifest["files"]["region_emb_mapping.feather"]["rows"] == 3
    RegionEmbeddings.open(tmp_path, verify=True)  # the recorded checksums are the files' own


def test_truncated_shard_is_named_before_memory_mapping(tmp_path):
    folder = write_regions(tmp_path)
    size = (folder / "shard_00000.npy").stat().st_size
    truncate(folder / "shard_00000.npy")
    refused(
        lambda: RegionEmbeddings.open(tmp_path),
        f"region_embs/shard_00000.npy in {tmp_path} is truncated ({size // 2:,} of {size:,} bytes): {REBUILD}",
    )


def test_old_manifest_is_accepted_and_checked_from_npy_headers(tmp_path):
    folder = write_regions(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format"] = 1
    del manifest["files"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    padded, _ = RegionEmbeddings.open(tmp_path).gather([12])
    assert padded[0].tolist() == [[-1.0] * DIM] * 2
    truncate(folder / "shard_00001.npy", keep=0.9)  # the header survives: its shape gives the size
    refused(lambda: RegionEmbeddings.open(tmp_path), "shard_00001.npy", "is truncated", REBUILD)
    truncate(folder / "shard_00001.npy", keep=0.3)  # the header is cut too
    refused(lambda: RegionEmbeddings.open(tmp_path), "shard_00001.npy", "no valid .npy header", REBUILD)


def test_shard_of_another_shape_or_dtype(tmp_path):
    folder = write_regions(tmp_path)
    edit_manifest(folder, files={})  # sizes unchecked: the header check must catch it on its own
    edit_manifest(folder, format=1)
    np.save(folder / "shard_00000.npy", np.zeros((3, DIM + 1), np.float32))
    refused(lambda: RegionEmbeddings.open(tmp_path), "shard_00000.npy", "has shape (3, 4), expected (3, 3)")
    np.save(folder / "shard_00000.npy", np.zeros((3, DIM), np.float64))
    refused(lambda: RegionEmbeddings.open(tmp_path), "shard_00000.npy", "holds float64, expected float32")


def test_checksums_by_policy(tmp_path, monkeypatch):
    folder = write_regions(tmp_path)
    shard = folder / "shard_00000.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    refused(lambda: RegionEmbeddings.open(tmp_path), "shard_00000.npy", "does not match the checksum")
    RegionEmbeddings.open(tmp_path, verify=False)
    monkeypatch.setenv("VILLA_VERIFY_CHECKSUMS", "0")
    RegionEmbeddings.open(tmp_path)
    monkeypatch.setattr(
        "villa.features.embeddings.CHECKSUM_LIMIT", 10
    )  # a "large" dataset: sizes only by default
    monkeypatch.delenv("VILLA_VERIFY_CHECKSUMS")
    RegionEmbeddings.open(tmp_path)
    monkeypatch.setenv("VILLA_VERIFY_CHECKSUMS", "1")
    refused(lambda: RegionEmbeddings.open(tmp_path), "does not match the checksum")


def test_damaged_region_manifest(tmp_path):
    folder = write_regions(tmp_path)
    text = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(text[: len(text) // 2])
    refused(
        lambda: RegionEmbeddings.open(tmp_path), "region_embs/manifest.json", "is not valid JSON", REBUILD
    )
    (folder / "manifest.json").write_text("")
    refused(lambda: RegionEmbeddings.open(tmp_path), "manifest.json", "is empty")
    (folder / "manifest.json").write_text("[1, 2]")
    refused(lambda: RegionEmbeddings.open(tmp_path), "manifest.json", "holds a JSON list")
    (folder / "manifest.json").write_text(text)
    edit_manifest(folder, shards="shard_00000.npy")
    refused(lambda: RegionEmbeddings.open(tmp_path), "manifest.json", "invalid shard list")
    (folder / "manifest.json").write_text(
        json.dumps({k: v for k, v in json.loads(text).items() if k != "dim"})
    )
    refused(lambda: read_manifest(folder), "lacks keys ['dim']")
    (folder / "manifest.json").write_text(text)
    edit_manifest(folder, format=99)
    refused(lambda: RegionEmbeddings.open(tmp_path), "has format 99, newer than this villa reads")


def test_mapping_rows_disagreeing_with_shards(tmp_path):
    folder = write_regions(tmp_path)
    mapping = pd.read_feather(folder / "region_emb_mapping.feather")
    edit_manifest(folder, format=1)  # no recorded sizes: the content checks must catch it
    mapping.iloc[:2].to_feather(folder / "region_emb_mapping.feather")
    refused(lambda: RegionEmbeddings.open(tmp_path), "region_emb_mapping.feather", "has 2 rows, expected 3")
    edit_manifest(folder, num_images=2)
    refused(lambda: RegionEmbeddings.open(tmp_path), "maps 3 regions, but the shards hold 5")
    twice = mapping.assign(image_id=[10, 11, 10])
    edit_manifest(folder, num_images=3)
    twice.to_feather(folder / "region_emb_mapping.feather")
    refused(lambda: RegionEmbeddings.open(tmp_path), "region_emb_mapping.feather", "lists image_id 10 twice")
    truncate(folder / "region_emb_mapping.feather")
    refused(
        lambda: RegionEmbeddings.open(tmp_path), "region_emb_mapping.feather", "not a readable feather table"
    )


def test_missing_shard_and_writer_refuses_a_repeated_image(tmp_path):
    folder = write_regions(tmp_path)
    (folder / "shard_00001.npy").unlink()
    refused(lambda: RegionEmbeddings.open(tmp_path), "region_embs/shard_00001.npy", "is missing", REBUILD)
    with (
        pytest.raises(ValueError, match="written twice"),
        RegionEmbeddingWriter(tmp_path, "e", DIM) as writer,
    ):
        writer.add([1, 1], [1, 1], np.zeros((2, DIM)))


def test_rebuild_command_names_a_non_default_encoder(tmp_path):
    folder = write_regions(tmp_path, encoder="clip_rn50")
    edit_manifest(folder, encoder_config={"clip_weights": "/w/RN50.pt"})
    truncate(folder / "shard_00000.npy")
    refused(
        lambda: RegionEmbeddings.open(tmp_path),
        f"--data_dir={tmp_path} --encoder=clip_rn50 --clip_weights=/w/RN50.pt",
    )


# --------------------------------------------------------------------------- text embeddings, attributes
def test_text_cache_round_trip_and_manifest(tmp_path):
    folder = write_texts(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["num_texts"] == 2 and set(manifest["files"]) == {"texts.feather", "embs.npy"}
    cache = TextEmbeddingCache.open(tmp_path, expected_encoder="enc", verify=True)
    assert cache.lookup(["the digit is 3"]).tolist() == [[0.0, 1.0, 0.0]]


@pytest.mark.parametrize("name", ["texts.feather", "embs.npy", "manifest.json"])
def test_truncated_text_cache_file(tmp_path, name):
    folder = write_texts(tmp_path)
    truncate(folder / name)
    refused(lambda: TextEmbeddingCache.open(tmp_path), f"text_embs/{name} in {tmp_path}", REBUILD)


def test_texts_and_embeddings_rows_disagree(tmp_path):
    folder = write_texts(tmp_path)
    edit_manifest(folder, format=1)  # no recorded rows or sizes
    np.save(folder / "embs.npy", np.eye(3, DIM, dtype=np.float32))
    refused(
        lambda: TextEmbeddingCache.open(tmp_path), "text_embs/embs.npy", "has shape (3, 3), expected (2, 3)"
    )
    np.save(folder / "embs.npy", np.eye(2, DIM, dtype=np.float32))
    pd.DataFrame({"text": ["a", "a"]}).to_feather(folder / "texts.feather")
    refused(lambda: TextEmbeddingCache.open(tmp_path), "texts.feather", "lists the sentence 'a' twice")


def test_damaged_attribute_embeddings(tmp_path):
    save_attr_embs(tmp_path, {"red": torch.ones(DIM), "blue": torch.zeros(DIM)})
    assert load_attr_embs(tmp_path, ["blue", "red"])[1].shape == (2, DIM)
    refused(
        lambda: load_attr_embs(tmp_path, ["green"]), "attr_embs.pth", "no embedding for attributes ['green']"
    )
    truncate(tmp_path / "attr_embs.pth")
    refused(lambda: load_attr_embs(tmp_path), f"attr_embs.pth in {tmp_path} is damaged or truncated", REBUILD)
    torch.save({"red": torch.ones(DIM), "blue": torch.ones(DIM + 1)}, tmp_path / "attr_embs.pth")
    refused(lambda: load_attr_embs(tmp_path), "holds embeddings of different sizes")


# --------------------------------------------------------------------------- run folders
def hydra_record(run_dir, stage, overrides):
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(f"task_name: x\nstage: {stage}\n")
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


def test_truncated_checkpoint_names_the_training_command(tmp_path):
    run_dir = tmp_path / "docmnist_stage1"
    hydra_record(run_dir, "stage1", ["experiment=docmnist_stage1", "data_dir=/d", "resume=true", "epochs=3"])
    save_checkpoint(run_dir / "last.pkl", torch.nn.Linear(2, 1), epoch=1)
    truncate(run_dir / "last.pkl")
    refused(
        lambda: load_checkpoint(run_dir / "last.pkl"),
        f"last.pkl in {run_dir} is damaged or truncated",
        ": re-run python -m villa.stage1 experiment=docmnist_stage1 data_dir=/d epochs=3",
    )
    # without a .hydra record (e.g. the sweep), the experiment of the folder's name
    other = tmp_path / "runs" / "docmnist_clip"
    other.mkdir(parents=True)
    torch.save({"model": {}, "epoch": "one"}, other / "best.pkl")
    refused(
        lambda: load_checkpoint(other / "best.pkl"),
        "has an invalid epoch",
        f"re-run python -m villa.stage2 experiment=docmnist_clip checkpoint_dir={tmp_path / 'runs'}",
    )
    torch.save([1, 2], other / "best.pkl")
    refused(lambda: load_checkpoint(other / "best.pkl"), "is not a villa checkpoint")


def test_damaged_mapping_outputs(tmp_path):
    hydra_record(tmp_path, "stage1", ["experiment=docmnist_stage1"])
    (tmp_path / "mapping_metrics.json").write_text('{"val": {"f1": 5')
    refused(
        lambda: read_mapping_metrics(tmp_path),
        f"mapping_metrics.json in {tmp_path} is not valid JSON",
        "re-run python -m villa.stage1 experiment=docmnist_stage1",
    )
    (tmp_path / "mapping_val.feather").write_bytes(b"ARROW1\x00\x00")
    refused(lambda: read_mapping(tmp_path, "val"), "mapping_val.feather", "not a readable feather table")


def test_mapping_with_a_list_of_the_wrong_length(tmp_path):
    from test_stage1_assign_metrics import _frame

    from villa.mapping.schema import MAPPING_COLUMNS

    frame = _frame()
    frame.at[0, "assigned_text"] = ["one", "two", "three", "four", "five", "six"]
    frame[list(MAPPING_COLUMNS)].to_feather(tmp_path / "mapping_val.feather")  # not through the writer
    (tmp_path / "mapping_metrics.json").write_text("{}")  # a finished run
    refused(
        lambda: read_mapping(tmp_path, "val"), "mapping_val.feather", "assigned_text that is not one entry"
    )


# --------------------------------------------------------------------------- the sweep's records
def test_damaged_sweep_records(tmp_path):
    root = tmp_path / "s23" / "c4"
    (root / "docmnist_stage2").mkdir(parents=True)
    (root / "dataset.json").write_text('{"dataset_dir": "x", "avg_train_com')
    refused(
        lambda: collect_results(tmp_path), f"s23/c4/dataset.json in {tmp_path} is not valid JSON", "delete it"
    )
    (root / "dataset.json").write_text('{"dataset_dir": "x", "avg_train_complexity": 3.5}')
    (root / "docmnist_stage2" / "metrics.json").write_text('{"text_to_region_r_precision": 1.0}')
    refused(lambda: collect_results(tmp_path), "metrics.json", "lacks keys ['region_to_text_r_precision'")
    metrics = {"text_to_region_r_precision": 1.0, "region_to_text_r_precision": 2.0, "zero_shot_auroc": 3.0}
    (root / "docmnist_stage2" / "metrics.json").write_text(json.dumps({**metrics, "detection": {"ap": "x"}}))
    refused(lambda: collect_results(tmp_path), "metrics.json", "without numeric ap/ap50", "delete it")
    (root / "docmnist_stage2" / "metrics.json").write_text(json.dumps(metrics))
    (root / "docmnist_stage1").mkdir()
    (root / "docmnist_stage1" / "mapping_metrics.json").write_text("{}")
    refused(lambda: collect_results(tmp_path), "mapping_metrics.json", "has no test metrics", "delete it")
    (tmp_path / "sweep_settings.json").write_text("{")
    refused(lambda: _check_settings(tmp_path, {"seed": 1}), "sweep_settings.json", "is not valid JSON")
    (root / "step_times.csv").write_text("seed,complexity,step,seconds\n23,4,generate,1.0\n23,4,prepro")
    refused(lambda: write_step_times(tmp_path), "s23/c4/step_times.csv", "is damaged")
    (root / "step_times.csv").write_text(
        "complexity,step,seconds\n4,generate,1.0\n"
    )  # the single-seed columns
    refused(lambda: write_step_times(tmp_path), "s23/c4/step_times.csv", "is damaged")
