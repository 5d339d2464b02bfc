import numpy as np
import pandas as pd
import pytest
import torch

from villa.features.embeddings import TextEmbeddingCache
from villa.storage.errors import VillaError
from villa.vlm.data import RegionTextDataset, build_pairs, collate_region_text, text_embeddings


def _frame():
    return pd.DataFrame(
        {
            "image_size": [[84, 84], [84, 84]],
            "region_coord": [
                [[0, 0, 28, 28], [28, 0, 56, 28], [56, 0, 84, 28]],
                [[0, 28, 28, 56], [0, 56, 28, 84]],
            ],
            "num_regions": [3, 2],
            "text": ["the number is a one . the color is red", "the image shows a two"],
            "assigned_text": [
                ["the number is a one", "", "the color is red . the shape is a circle"],
                ["", ""],
            ],
        }
    )


def test_build_pairs_villa_whole_image_plus_assigned_regions():
    offsets, boxes, texts = build_pairs(_frame(), "villa")
    assert offsets.tolist() == [0, 3, 4]
    assert texts == [
        "the number is a one . the color is red",
        "the number is a one",
        "the color is red . the shape is a circle",
        "the image shows a two",
    ]
    assert boxes.tolist() == [[0, 0, 83, 83], [0, 0, 28, 28], [56, 0, 84, 28], [0, 0, 83, 83]]
    assert boxes.dtype == np.float32


def test_build_pairs_clip_whole_only_and_errors():
    offsets, boxes, texts = build_pairs(_frame(), "clip")
    assert offsets.tolist() == [0, 1, 2]
    assert texts == _frame()["text"].tolist()
    assert boxes.tolist() == [[0, 0, 83, 83], [0, 0, 83, 83]]
    with pytest.raises(VillaError, match="assigned_text"):
        build_pairs(_frame().drop(columns="assigned_text"), "villa")
    with pytest.raises(VillaError, match="pair mode"):
        build_pairs(_frame(), "regions")


def test_text_embeddings_average_sentences(tmp_path):
    sentences = ["the color is red", "the shape is a circle", "the number is a one"]
    embs = np.array([[3.0, 0, 0], [0, 2.0, 0], [0, 0, 1.0]], dtype=np.float32)
    TextEmbeddingCache.write(tmp_path, "fake", sentences, embs)
    cache = TextEmbeddingCache.open(tmp_path, "fake")
    out = text_embeddings(
        ["the color is red . the shape is a circle", "the number is a one", "the color is red"], cache
    )
    s = 1 / np.sqrt(2)
    assert out.shape == (3, 3)
    assert torch.allclose(
        out, torch.tensor([[s, s, 0], [0, 0, 1.0], [1.0, 0, 0]], dtype=torch.float32), atol=1e-6
    )
    with pytest.raises(VillaError, match="not in"):
        text_embeddings(["an unknown sentence"], cache)


def test_dataset_getitems_gathers_flat_pairs():
    images = torch.arange(3 * 3 * 2 * 2, dtype=torch.uint8).reshape(3, 3, 2, 2)
    offsets = [0, 2, 3, 6]
    boxes = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    text = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    ds = RegionTextDataset(images, offsets, boxes, text)
    batch = ds.__getitems__([2, 0])
    assert batch["images"].dtype == torch.uint8
    assert torch.equal(batch["images"], images[[2, 0]])
    assert batch["boxes"].shape == (5, 5)
    assert batch["boxes"][:, 0].tolist() == [0, 0, 0, 1, 1]
    assert torch.equal(batch["boxes"][:, 1:], boxes[[3, 4, 5, 0, 1]])
    assert torch.equal(batch["text"], text[[3, 4, 5, 0, 1]])
    assert collate_region_text(batch) is batch
    merged = collate_region_text([ds[2], ds[0]])
    for key in batch:
        assert torch.equal(merged[key], batch[key])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_region_text)
    first = next(iter(loader))
    assert first["boxes"][:, 0].tolist() == [0, 0, 1]
