"""The sweep's generate step beside other sweep processes: one complete dataset folder, reused, never clobbered."""

from __future__ import annotations

import threading

import pandas as pd
import pytest
from conftest import synthetic_digit_pools

from villa.docmnist.complexity_sweep import generate_shared
from villa.storage.errors import VillaError

PARAMS = {"attribute_budget": 240, "seed": 3, "val_attribute_budget": 90, "test_attribute_budget": 90}


def generate(root, target):
    return generate_shared(
        root, digit_pools=synthetic_digit_pools(), target_sample_complexity=target, progress=False, **PARAMS
    )


def check_complete(dataset_dir, result) -> None:
    frame = pd.read_feather(dataset_dir / "annotations.feather")
    assert len(frame) == sum(result.split_sizes.values())
    assert len(list((dataset_dir / "images").iterdir())) == len(frame)


def test_concurrent_targets_with_one_folder_share_it(tmp_path):
    """Targets 4 and 5 give the same folder; two sweeps generating them at once end with one complete copy."""
    start = threading.Barrier(2)
    results, errors = {}, []

    def worker(target):
        start.wait()
        try:
            results[target] = generate(tmp_path, target)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(t,)) for t in (4, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert results[4].dataset_dir == results[5].dataset_dir
    assert [p.name for p in tmp_path.iterdir()] == [results[4].dataset_dir.name], "no scratch folder left"
    check_complete(results[4].dataset_dir, results[4])


def test_a_later_process_reuses_the_folder_without_touching_it(tmp_path):
    first = generate(tmp_path, 4)
    # what the first sweep's preprocessing then writes into the dataset folder
    (first.dataset_dir / "region_embs").mkdir()
    (first.dataset_dir / "region_embs" / "manifest.json").write_text("{}")
    inode = first.dataset_dir.stat().st_ino

    second = generate(tmp_path, 5)
    assert second.dataset_dir == first.dataset_dir
    assert second.split_sizes == first.split_sizes and second.average_complexity == first.average_complexity
    assert (second.dataset_dir / "region_embs" / "manifest.json").is_file(), "the embeddings survive"
    assert second.dataset_dir.stat().st_ino == inode, "the folder was not replaced"
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.dataset_dir.name]


def test_another_dataset_under_the_same_name_is_refused(tmp_path):
    first = generate(tmp_path, 4)
    foreign = first.dataset_dir / "annotations.feather"
    foreign.write_bytes(b"someone else's table")
    with pytest.raises(VillaError, match="already holds another DocMNIST dataset"):
        generate(tmp_path, 4)
    assert foreign.read_bytes() == b"someone else's table"
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.dataset_dir.name]
