"""Preprocessing in bounded memory: rich features shard by shard, resumable runs, pixel-capped batches."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from test_preprocess import make_dataset

import villa.features.preprocess as pre
from villa.datasets import Dataset, read_annotations, write_dataset
from villa.datasets.images import size_sorted_batches
from villa.docmnist.vocabulary import docmnist_vocabulary
from villa.encoders.rich import RichRegionFeatures, RunningMoments
from villa.features.embeddings import REGION_WORK_DIR, RegionEmbeddings, RegionWork


def all_rows(folder) -> tuple[np.ndarray, pd.DataFrame]:
    """Every region row in annotation order, and the stored mapping."""
    store = RegionEmbeddings.open(folder, expected_encoder="default")
    ids = read_annotations(folder)["image_id"]
    return store.take(store.rows(ids)[0]), store.mapping


@pytest.fixture
def counted_forward(monkeypatch):
    """Counts rich forward passes (= batches computed); ``state["stop_at"] = k`` raises KeyboardInterrupt
    in the k-th pass, as a Ctrl-C half-way through a run would."""
    state = {"calls": 0, "stop_at": None}
    forward = RichRegionFeatures.forward

    def counting(self, images, boxes):
        state["calls"] += 1
        if state["stop_at"] is not None and state["calls"] >= state["stop_at"]:
            raise KeyboardInterrupt
        return forward(self, images, boxes)

    monkeypatch.setattr(RichRegionFeatures, "forward", counting)
    return state


def test_running_moments_equal_fit_stats():
    """Chunked float64 moments give fit_stats' mean/std, also for a small spread on a large offset."""
    gen = torch.Generator().manual_seed(0)
    raw = 1e3 + torch.randn(1000, 16, generator=gen) * torch.logspace(-3, 1, 16)
    total = RunningMoments(16)
    for chunk in (raw[:1], raw[1:400], raw[400:400], raw[400:]):
        total.merge(RunningMoments.of(chunk))
    mean, std = total.mean_std()
    expected_mean, expected_std = RichRegionFeatures.fit_stats(raw)
    assert total.count == 1000
    torch.testing.assert_close(mean, expected_mean, rtol=0, atol=0)
    torch.testing.assert_close(std, expected_std, rtol=1e-6, atol=0)
    again = RunningMoments.from_arrays(total.count, total.arrays())
    assert again.count == total.count and np.array_equal(again.m2, total.m2)


def test_streamed_rich_equals_in_memory(tmp_path, monkeypatch):
    """Shard-by-shard rich features (a shard per batch here) equal the in-memory recipe: raw blocks of
    every image -> train-split statistics -> standardise and project."""
    from villa.encoders import get_encoder
    from villa.features.preprocess import iter_region_batches, to_model_input

    monkeypatch.setattr(pre, "WORK_SHARD_BYTES", 1)  # every batch its own work shard
    folder = make_dataset(tmp_path, n_images=9)
    pre.preprocess_dataset(folder, device="cpu", batch_size=2, progress=False)
    frame = read_annotations(folder)
    got, _ = all_rows(folder)

    enc = get_encoder("default")
    rich = RichRegionFeatures(enc.build_image_model(), enc.dim)
    batches = list(iter_region_batches(frame, Dataset.open(folder), 2))
    with torch.inference_mode():
        raw = torch.cat(
            [rich(to_model_input(b.images, torch.device("cpu")), torch.from_numpy(b.boxes)) for b in batches]
        )
        ids = np.concatenate([b.image_ids for b in batches])
        counts = np.concatenate([b.counts for b in batches])
        train = frame.set_index("image_id").loc[ids, "split"].to_numpy() == "train"
        expected = rich.finalize(raw, *rich.fit_stats(raw[torch.from_numpy(np.repeat(train, counts))]))
    order = pd.Series(np.arange(len(ids)), index=ids)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rows = np.concatenate([np.arange(starts[i], starts[i] + counts[i]) for i in order.loc[frame["image_id"]]])
    np.testing.assert_allclose(got, expected.numpy()[rows], rtol=1e-5, atol=1e-5)

    store = RegionEmbeddings.open(folder)
    assert len(store.manifest["shards"]) == 1  # the 5 work shards regrouped into one region_embs shard
    assert store.manifest["region_features_config"]["stats_num_regions"] == int(
        np.repeat(train, counts).sum()
    )
    assert not (folder / REGION_WORK_DIR).exists()


def test_interrupted_run_resumes_from_its_last_shard(tmp_path, monkeypatch, counted_forward, capsys):
    monkeypatch.setattr(pre, "WORK_SHARD_BYTES", 1)
    folder = make_dataset(tmp_path / "a", n_images=8)
    reference = tmp_path / "b" / "tiny_ds"
    shutil.copytree(folder, reference)
    pre.preprocess_dataset(reference, device="cpu", batch_size=2, progress=False)
    assert counted_forward["calls"] == 4  # 8 images, 2 per batch

    counted_forward.update(calls=0, stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        pre.preprocess_dataset(folder, device="cpu", batch_size=2, progress=False)
    assert not (folder / "region_embs").exists()
    progress = json.loads((folder / REGION_WORK_DIR / "progress.json").read_text())
    assert [s["images"] for s in progress["shards"]] == [2, 2]

    counted_forward.update(calls=0, stop_at=None)
    capsys.readouterr()
    summary = pre.preprocess_dataset(folder, device="cpu", batch_size=2, progress=False)
    assert counted_forward["calls"] == 2  # only the two batches the first run did not finish
    assert summary["num_images_resumed"] == 4
    assert "resuming the preprocessing" in capsys.readouterr().out
    assert not (folder / REGION_WORK_DIR).exists()

    got, got_map = all_rows(folder)
    want, want_map = all_rows(reference)
    assert np.array_equal(got, want)  # byte for byte: same batches, same statistics order
    pd.testing.assert_frame_equal(got_map, want_map)
    manifest = RegionEmbeddings.open(folder, verify=True).manifest
    assert set(manifest["files"]) == {"shard_00000.npy", "region_emb_mapping.feather"}


def test_changed_annotations_or_damage_discard_the_partial_work(
    tmp_path, monkeypatch, counted_forward, capsys
):
    monkeypatch.setattr(pre, "WORK_SHARD_BYTES", 1)
    folder = make_dataset(tmp_path, n_images=8)

    def interrupted():
        counted_forward.update(calls=0, stop_at=3)
        with pytest.raises(KeyboardInterrupt):
            pre.preprocess_dataset(folder, device="cpu", batch_size=2, progress=False)
        counted_forward.update(calls=0, stop_at=None)
        return capsys.readouterr().out.splitlines()

    interrupted()
    # new annotations (one caption changed): the stored rows may describe other regions
    frame = read_annotations(folder)
    frame.loc[0, "text"] = frame.loc[0, "text"] + " . the color is red"
    write_dataset(folder, vocabulary=docmnist_vocabulary(), source="test", columns=frame)
    assert [line for line in interrupted() if "partial" in line] == [
        f"discarding the partial preprocessing in {folder / REGION_WORK_DIR}: "
        "its annotations_sha256 differ from this run's"
    ]
    # a damaged shard file
    part = folder / REGION_WORK_DIR / "part_00001.npy"
    part.write_bytes(part.read_bytes()[:-4])
    pre.preprocess_dataset(folder, device="cpu", batch_size=2, progress=False)
    assert "part_00001.npy is damaged" in capsys.readouterr().out
    assert counted_forward["calls"] == 4  # everything again
    assert not (folder / REGION_WORK_DIR).exists()


def test_region_work_keeps_listed_shards_of_its_key_only(tmp_path):
    key = {"encoder": "default", "region_features": "rich", "dim": 3}
    lines = []
    work = RegionWork.open(tmp_path, key, log=lines.append)
    work.add([7, 9], [2, 1], np.ones((3, 3), np.float32), (3, np.zeros((2, 3))))
    (tmp_path / REGION_WORK_DIR / ".part_00001.npy.x.tmp").write_bytes(b"half")  # a killed write
    again = RegionWork.open(tmp_path, dict(key), log=lines.append)
    assert again.covered_ids().tolist() == [7, 9] and lines == [
        f"resuming the preprocessing in {tmp_path / REGION_WORK_DIR}: 1 shards (2 images) done"
    ]
    assert sorted(p.name for p in (tmp_path / REGION_WORK_DIR).iterdir()) == [
        "part_00000.npy", "part_00000_ids.npy", "part_00000_stats.npy", "progress.json"
    ]  # fmt: skip
    ids, counts, rows, moments = next(again.shards())
    assert counts.tolist() == [2, 1] and rows.shape == (3, 3) and moments[0] == 3
    other = RegionWork.open(tmp_path, {**key, "region_features": "reference", "dim": 4}, log=lines.append)
    assert other.covered_ids().tolist() == [] and lines[-1].endswith(
        "its dim, region_features differ from this run's"
    )


def test_size_sorted_batches_cap_pixels():
    sizes = np.array([[84, 84]] * 5 + [[150, 200], [160, 210], [40, 40], [300, 400]])
    plain = size_sorted_batches(sizes, 4)
    assert [b.tolist() for b in plain] == [[7, 0, 1, 2], [3, 4, 5, 6], [8]]
    assert [b.tolist() for b in size_sorted_batches(sizes, 4, max_pixels=10**9)] == [
        b.tolist() for b in plain
    ]
    capped = size_sorted_batches(sizes, 4, max_pixels=3 * 84 * 84)
    assert np.array_equal(np.concatenate(capped), np.concatenate(plain))  # same order, finer cuts
    for batch in capped:
        area = len(batch) * sizes[batch, 0].max() * sizes[batch, 1].max()
        assert len(batch) <= 4 and (area <= 3 * 84 * 84 or len(batch) == 1)
    assert [len(b) for b in capped] == [3, 3, 1, 1, 1]


@pytest.mark.slow
def test_torchrun_resumes_a_single_process_run(tmp_path, monkeypatch, counted_forward, capfd):
    """Two gloo ranks resume what an interrupted single process left: they skip its images, rank 0 records
    every rank's shards and publishes what one process would have written."""
    import socket

    import torch.multiprocessing as mp
    from test_preprocess import _rank_worker

    monkeypatch.setattr(pre, "WORK_SHARD_BYTES", 1)
    single = make_dataset(tmp_path / "single", n_images=8)
    multi = make_dataset(tmp_path / "multi", n_images=8)
    pre.preprocess_dataset(single, device="cpu", batch_size=2, progress=False)
    counted_forward.update(calls=0, stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        pre.preprocess_dataset(multi, device="cpu", batch_size=2, progress=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    capfd.readouterr()
    mp.spawn(_rank_worker, args=(2, port, str(multi)), nprocs=2, join=True)
    assert "resuming the preprocessing" in capfd.readouterr().out  # rank 0's line
    assert not (multi / REGION_WORK_DIR).exists()
    got, got_map = all_rows(multi)
    want, _ = all_rows(single)
    assert len(got_map) == 8 and got_map["image_id"].is_unique
    # atol: other batches than one process's; z-scoring magnifies float32 batching noise a little
    np.testing.assert_allclose(got, want, atol=2e-3)
    config = RegionEmbeddings.open(multi).manifest["region_features_config"]
    assert (
        config["stats_num_regions"]
        == RegionEmbeddings.open(single).manifest["region_features_config"]["stats_num_regions"]
    )


_KILLED_RUN = """
import os, signal, sys

import villa.features.embeddings as emb
import villa.features.preprocess as pre

pre.WORK_SHARD_BYTES = 1  # every batch of 2 images its own work shard
save, saved = emb.save_npy, []


def save_then_die(path, array):
    # a rich shard is 3 files (rows, ids, moments): die as the 3rd shard's 2nd file starts, with its rows
    # file already in place but not listed, and the ids file's temporary open
    if len(saved) == 7:
        os.kill(os.getpid(), signal.SIGKILL)
    saved.append(path)
    return save(path, array)


emb.save_npy = save_then_die
pre.preprocess_dataset(sys.argv[1], device="cpu", batch_size=2, progress=False)
"""


@pytest.mark.slow
def test_sigkilled_run_resumes_from_its_last_complete_shard(tmp_path, monkeypatch, counted_forward, capsys):
    """A process killed outright (SIGKILL: no exception handler, no cleanup) half-way through a run: the next
    run keeps its 2 complete shards, drops the half-written third, computes only the rest and publishes what
    an uninterrupted run writes, byte for byte."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    monkeypatch.setattr(pre, "WORK_SHARD_BYTES", 1)
    folder = make_dataset(tmp_path / "a", n_images=8)
    reference = tmp_path / "b" / "tiny_ds"
    shutil.copytree(folder, reference)
    pre.preprocess_dataset(reference, device="cpu", batch_size=2, progress=False)

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(folder)], env=env, cwd=repo)
    assert killed.returncode == -signal.SIGKILL
    work = folder / REGION_WORK_DIR
    progress = json.loads((work / "progress.json").read_text())
    assert [s["images"] for s in progress["shards"]] == [2, 2]
    leftovers = {p.name for p in work.iterdir()} - {n for s in progress["shards"] for n in s["files"]}
    assert "part_00002.npy" in leftovers and any(n.endswith(".tmp") for n in leftovers)
    assert not (folder / "region_embs").exists()

    counted_forward.update(calls=0)
    capsys.readouterr()
    summary = pre.preprocess_dataset(folder, device="cpu", batch_size=2, progress=False)
    assert counted_forward["calls"] == 2 and summary["num_images_resumed"] == 4
    assert f"resuming the preprocessing in {work}: 2 shards (4 images) done" in capsys.readouterr().out
    assert not work.exists()
    got, got_map = all_rows(folder)
    want, want_map = all_rows(reference)
    assert np.array_equal(got, want)
    pd.testing.assert_frame_equal(got_map, want_map)
    RegionEmbeddings.open(folder, verify=True)
