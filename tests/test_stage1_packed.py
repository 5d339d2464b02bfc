"""Stage 1 on packed regions: memory follows the real regions, and one image with many boxes changes nothing
else (same batches, same mapping whatever the chunking)."""

import numpy as np
import pandas as pd
import pytest
import torch

from villa.datasets import Dataset
from villa.features.embeddings import RegionEmbeddings
from villa.mapping.assign import map_split
from villa.mapping.data import Stage1Dataset, collate_stage1
from villa.mapping.loss import MappingLoss
from villa.mapping.model import MappingModel
from villa.mapping.run import run_stage1


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A tiny set whose first image has 100 regions (the others 1 to 3)."""
    from test_stage1_run import make_dataset

    return make_dataset(tmp_path_factory.mktemp("data") / "big", counts=(30, 8, 8), big_image=100)


def test_split_memory_follows_the_real_regions(big):
    dataset = Dataset.open(big)
    frame = dataset.annotations("train")
    data = Stage1Dataset.from_frame(frame, RegionEmbeddings.open(big), dataset.vocabulary)
    regions = int(frame["num_regions"].sum())
    assert data.max_regions == 100 and data.regions.shape == (regions, 12)  # not [30, 100, 12]
    per_image = data.nbytes - regions * 12 * 4
    assert per_image <= len(frame) * (20 + 3 * 8)  # multi-hot, counts and starts: nothing per region slot
    # a batch without the big image is as small as its own regions
    batch = collate_stage1(data.__getitems__([3, 1, 2]))
    assert batch["regions"].shape == (int(data.counts[[3, 1, 2]].sum()), 12)
    assert batch["mask"].shape == (3, int(data.counts[[3, 1, 2]].max()))


def test_resident_batch_pads_exactly_as_the_padded_split():
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([2, 0, 5, 1, 3])
    regions = torch.randn(int(counts.sum()), 4, generator=gen)
    data = Stage1Dataset(regions, counts, torch.rand(5, 3, generator=gen) < 0.5)
    mask = torch.arange(5) < counts.unsqueeze(1)
    padded = torch.zeros(5, 5, 4)
    padded[mask] = regions
    index = torch.tensor([4, 1, 2, 2])
    batch = data.batch(index)
    assert torch.equal(batch["regions"], padded[index]) and torch.equal(batch["mask"], mask[index])
    assert torch.equal(batch["multi_hot"], data.multi_hot[index])
    # and the fixed-shape loss on it equals the packed loss of the same images
    attr = torch.randn(3, 4, generator=gen)
    model = MappingModel(4, num_attributes=3, seed=1)
    packed, _ = MappingLoss(attr)(model, collate_stage1(data.__getitems__(index.tolist())))
    static, _ = MappingLoss(attr, static_shapes=True)(model, batch)
    torch.testing.assert_close(packed, static)
    with pytest.raises(ValueError, match="padded"):
        MappingLoss(attr, static_shapes=True)(model, collate_stage1(data.__getitems__([0, 2])))


def test_mapping_does_not_depend_on_the_chunk_size(big):
    dataset = Dataset.open(big)
    frame = dataset.annotations("train")
    data = Stage1Dataset.from_frame(frame, RegionEmbeddings.open(big), dataset.vocabulary)
    model = MappingModel(12, num_attributes=len(dataset.vocabulary), seed=4)
    model.set_input_stats(data.regions)
    attr = torch.randn(len(dataset.vocabulary), 12, generator=torch.Generator().manual_seed(5))
    outs = [
        map_split(
            model, frame, data.regions, data.counts, attr, dataset.vocabulary, seed=[7, 0], chunk_size=c
        )
        for c in (1, 4, 1000)
    ]
    for mapped, assigned in outs[1:]:
        pd.testing.assert_frame_equal(mapped, outs[0][0])
        assert np.array_equal(assigned, outs[0][1])
    assert outs[0][1].shape == (int(frame["num_regions"].sum()), len(dataset.vocabulary))
    assert len(outs[0][0]["assigned_attributes"].iloc[0]) == 100


def test_stage1_runs_on_a_split_with_one_many_box_image(big, tmp_path):
    result = run_stage1(big, tmp_path / "run", epochs=1, batch_size=4, device="cpu", progress=False, seed=3)
    assert result.metrics["train"]["num_images"] == 30 and 0 < result.metrics["train"]["f1"] <= 100
    assert result.metrics["val"]["small_split"] is True  # 8 images


def test_a_many_box_image_keeps_the_padded_resident_steps_within_their_budget(big, tmp_path, monkeypatch):
    """The resident path pads every batch to the split's largest region count: its step counts against
    ``resident_data_mb``, so a 100-box image sends a tight budget to the packed DataLoader path."""
    from villa.mapping import run as stage1_run

    monkeypatch.setattr(stage1_run, "_device_memory_is_separate", lambda device: True)  # (a GPU, on the CPU)
    common = dict(epochs=1, batch_size=4, device="cpu", progress=False, seed=3)
    # the data take ~10 KB; a padded step 2 x 4 bytes x 4 images x 100 slots x 20 heads x 12 = 768 KB
    tight = run_stage1(big, tmp_path / "tight", resident_data_mb=0.5, **common)
    roomy = run_stage1(big, tmp_path / "roomy", resident_data_mb=2, **common)
    assert tight.fit.step_mode == "loader" and roomy.fit.step_mode == "resident"
    assert tight.fit.history[0]["train_loss"] == pytest.approx(roomy.fit.history[0]["train_loss"], rel=1e-5)
