"""Fixtures shared across test modules."""

from __future__ import annotations

import numpy as np
import pytest


def synthetic_digit_pools(seed: int = 0, per_label: int = 3) -> dict:
    """Tiny stand-in for MNIST: blurred random strokes, ``per_label`` digits per label, for every split."""
    rng = np.random.default_rng(seed)
    images = np.zeros((10 * per_label, 28, 28), dtype=np.uint8)
    for i in range(len(images)):
        rows, cols = rng.integers(6, 22, size=(2, 12))
        for r, c in zip(rows, cols):
            images[i, r - 2 : r + 3, c - 2 : c + 3] = rng.integers(100, 256)
    labels = np.repeat(np.arange(10), per_label)
    return {split: (images, labels) for split in ("train", "val", "test")}


@pytest.fixture(scope="session")
def tiny_docmnist(tmp_path_factory):
    """A real (generator + default-encoder preprocessing) DocMNIST dataset: 32 train, 12 val, 12 test images.

    Even split sizes let a 2-process torchrun see exactly the batches of a single process.
    """
    from villa.docmnist.generate import generate_docmnist
    from villa.preprocess import preprocess_dataset

    root = tmp_path_factory.mktemp("tiny_docmnist")
    result = generate_docmnist(
        attribute_budget=240,
        target_sample_complexity=8,
        seed=3,
        val_attribute_budget=90,
        test_attribute_budget=90,
        data_root=root,
        digit_pools=synthetic_digit_pools(),
        progress=False,
    )
    preprocess_dataset(result.dataset_dir, encoder="default", device="cpu", progress=False)
    return result.dataset_dir
