"""The embedding artifact schema: region rows per image, encoder and freshness checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from villa.features.embeddings import RegionEmbeddings, RegionEmbeddingWriter, file_sha256
from villa.storage.errors import VillaError


def write(tmp_path, extra=None):
    with RegionEmbeddingWriter(tmp_path, encoder="enc", dim=3, extra=extra) as writer:
        writer.add([10, 11], [2, 1], np.arange(9, dtype=np.float32).reshape(3, 3))
        writer.add([12], [2], np.full((2, 3), -1.0))


def test_gather_pads_regions_in_query_order(tmp_path):
    write(tmp_path)
    embs = RegionEmbeddings.open(tmp_path, expected_encoder="enc")
    padded, mask = embs.gather([12, 10, 11])
    assert mask.tolist() == [[True, True], [True, True], [True, False]]
    assert padded[0].tolist() == [[-1, -1, -1]] * 2
    assert padded[1].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert padded[2, 0].tolist() == [6, 7, 8] and padded[2, 1].abs().sum() == 0
    embs.check_covers([10, 12], [2, 2])
    with pytest.raises(VillaError, match="no region embeddings"):
        embs.check_covers([10, 99])
    with pytest.raises(VillaError, match="do not match"):
        embs.check_covers([10], [3])


def test_refuses_other_encoder_and_stale_annotations(tmp_path):
    (tmp_path / "annotations.feather").write_bytes(b"version 1")
    write(tmp_path, extra={"annotations_sha256": file_sha256(tmp_path / "annotations.feather")})
    RegionEmbeddings.open(tmp_path, expected_encoder="enc")
    with pytest.raises(VillaError, match="encoder 'enc'.*uses encoder 'other'"):
        RegionEmbeddings.open(tmp_path, expected_encoder="other")
    (tmp_path / "annotations.feather").write_bytes(b"version 2")
    with pytest.raises(VillaError, match="older annotations"):
        RegionEmbeddings.open(tmp_path)


def test_failed_write_keeps_previous_embeddings(tmp_path):
    write(tmp_path)
    with pytest.raises(ValueError), RegionEmbeddingWriter(tmp_path, encoder="new", dim=3) as writer:
        writer.add([1], [1], np.zeros((2, 3)))
    manifest = json.loads((tmp_path / "region_embs" / "manifest.json").read_text())
    assert manifest["encoder"] == "enc" and manifest["num_regions"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["region_embs"]
