"""The stage-1 benchmark's baseline computes what villa computes: same loss, same mapping."""

import importlib.util
from pathlib import Path

import pytest
import torch

from villa.docmnist.vocabulary import ATTRIBUTES, docmnist_vocabulary
from villa.mapping.assign import map_split
from villa.mapping.data import collate_stage1
from villa.mapping.loss import MappingLoss
from villa.mapping.model import MappingModel

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_stage1.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_stage1", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _same_weights(reference) -> MappingModel:
    """A villa model holding the reference heads' weights (villa stores them in-by-out)."""
    first, second = reference.heads[0][0], reference.heads[0][2]
    model = MappingModel(first.in_features, len(reference.heads))
    with torch.no_grad():
        for k, head in enumerate(reference.heads):
            model.W1[k].copy_(head[0].weight.t())
            model.b1[k].copy_(head[0].bias)
            model.W2[k].copy_(head[2].weight.t())
            model.b2[k].copy_(head[2].bias)
    assert second.out_features == first.in_features
    return model


def test_reference_loss_equals_villa_loss(bench):
    frame, dataset, attr_embs = bench.synthetic(10, 16, seed=1)
    torch.manual_seed(0)
    reference = bench.ReferenceHeads(16, len(ATTRIBUTES))
    model = _same_weights(reference)
    idx = [7, 2, 5, 0, 9]
    per_image = torch.split(dataset.regions, dataset.counts.tolist())
    counts = dataset.counts[idx].tolist()
    regions = torch.cat([per_image[i] for i in idx])  # real regions only
    expected = bench.reference_loss(reference(regions), attr_embs, counts, dataset.multi_hot[idx].float())
    got, _ = MappingLoss(attr_embs, reference_quirk=True)(model, collate_stage1(dataset.__getitems__(idx)))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # and it is differentiable through every head that scores a present attribute
    expected.backward()
    present = dataset.multi_hot[idx].any(0)
    grads = torch.stack(
        [
            h[0].weight.grad.abs().sum() if h[0].weight.grad is not None else torch.tensor(0.0)
            for h in reference.heads
        ]
    )
    assert bool((grads[present] > 0).all()) and bool((grads[~present] == 0).all())


def test_reference_mapping_equals_map_split(bench):
    frame, dataset, attr_embs = bench.synthetic(12, 16, seed=2)
    torch.manual_seed(1)
    reference = bench.ReferenceHeads(16, len(ATTRIBUTES))
    model = _same_weights(reference)
    per_image = list(torch.split(dataset.regions, dataset.counts.tolist()))
    attrs, texts = bench.reference_map(reference, frame, per_image, dataset.multi_hot.float(), attr_embs)
    mapped, _ = map_split(
        model, frame, dataset.regions, dataset.counts, attr_embs, docmnist_vocabulary(), epsilon=0.2
    )
    assert [[sorted(r) for r in image] for image in attrs] == [
        [sorted(r) for r in image] for image in mapped["assigned_attributes"]
    ]
    # one sentence per attribute in these captions, so the texts agree too (up to sentence order)
    assert [[sorted(t.split(" . ")) for t in image] for image in texts] == [
        [sorted(t.split(" . ")) for t in image] for image in mapped["assigned_text"]
    ]
    assert sum(len(r) for image in attrs for r in image) >= sum(len(a) for a in frame["attributes"])


def test_reference_epoch_trains_on_full_batches_only(bench):
    frame, dataset, attr_embs = bench.synthetic(11, 16, seed=3)
    torch.manual_seed(2)
    reference = bench.ReferenceHeads(16, len(ATTRIBUTES))
    before = [p.detach().clone() for p in reference.parameters()]
    counts = dataset.counts.tolist()
    per_image = list(torch.split(dataset.regions, counts))
    steps = []
    reference.register_forward_hook(lambda module, inputs, output: steps.append(len(inputs[0])))
    seconds = bench.reference_train_epoch(
        reference, per_image, dataset.multi_hot.float(), attr_embs, batch_size=4, seed=5
    )
    assert seconds > 0
    # 11 images at batch 4: two full batches, the partial one dropped; a batch is its images' real
    # regions concatenated (no padding to the largest region count)
    order = torch.randperm(11, generator=torch.Generator().manual_seed(5)).tolist()
    assert steps == [sum(counts[i] for i in order[:4]), sum(counts[i] for i in order[4:8])]
    assert any(not torch.equal(a, b) for a, b in zip(before, reference.parameters()))
