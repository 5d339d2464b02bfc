"""Stage 1: the batched heads and the loss against hand-computed values."""

import math

import pytest
import torch

from villa.mapping.data import Stage1Dataset, collate_stage1
from villa.mapping.loss import MappingLoss, contrastive_terms, mapping_loss, region_scores
from villa.mapping.model import MappingModel


def _loop_heads(model, x, heads):
    outs = []
    for k in heads:
        k = 0 if model.one_proj else k
        hidden = torch.relu(x @ model.W1[k] + model.b1[k])
        outs.append(hidden @ model.W2[k] + model.b2[k])
    out = torch.stack(outs, 2)
    return 0.2 * out + 0.8 * x.unsqueeze(2) if model.adapter else out


@pytest.mark.parametrize("one_proj,adapter", [(False, False), (True, False), (False, True)])
def test_batched_heads_match_a_loop_over_heads(one_proj, adapter):
    model = MappingModel(6, num_attributes=5, one_proj=one_proj, adapter=adapter, seed=3)
    x = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(0))
    heads = torch.tensor([4, 0, 2])
    out = model(x, heads)
    assert out.shape == (4, 3, 3, 6)
    torch.testing.assert_close(out, _loop_heads(model, x, heads.tolist()))
    assert model.W1.shape == ((1 if one_proj else 5), 6, 6)


def test_init_is_seeded_and_linear_like():
    a, b, c = MappingModel(16, 3, seed=1), MappingModel(16, 3, seed=1), MappingModel(16, 3, seed=2)
    assert torch.equal(a.W1, b.W1) and torch.equal(a.b2, b.b2)
    assert not torch.equal(a.W1, c.W1)
    assert a.W1.abs().max() <= 1 / math.sqrt(16)


def test_only_selected_heads_get_gradients():
    model = MappingModel(4, num_attributes=3, seed=0)
    out = model(torch.randn(2, 2, 4), torch.tensor([1]))
    out.sum().backward()
    grads = model.W1.grad.abs().sum((1, 2))
    assert grads[1] > 0 and grads[0] == 0 and grads[2] == 0


def test_contrastive_terms_hand_computed():
    # 3 images, one attribute; images 0 and 2 have it, image 1 is the only negative
    scores = torch.tensor([[1.0], [2.0], [0.0]])
    present = torch.tensor([[True], [False], [True]])
    terms, n = contrastive_terms(scores, present)
    t0 = -math.log(math.exp(1) / (math.exp(1) + math.exp(2)))
    t2 = -math.log(1 / (1 + math.exp(2)))
    assert int(n) == 2
    torch.testing.assert_close(terms[:, 0], torch.tensor([t0, 0.0, t2]))
    # the reference quirk adds exp(0)=1 per image having the attribute (2 here) to every denominator
    quirk, _ = contrastive_terms(scores, present, reference_quirk=True)
    q0 = -math.log(math.exp(1) / (math.exp(1) + math.exp(2) + 2))
    q2 = -math.log(1 / (1 + math.exp(2) + 2))
    torch.testing.assert_close(quirk[:, 0], torch.tensor([q0, 0.0, q2]))


def test_attribute_without_negatives_gives_zero_term():
    terms, n = contrastive_terms(torch.tensor([[0.3], [0.7]]), torch.tensor([[True], [True]]))
    assert int(n) == 2 and torch.equal(terms, torch.zeros(2, 1))


def test_mapping_loss_end_to_end_hand_value():
    # D=2, attr along x; region cosines are cos(angle). Image 0: regions at 60 and 45 deg; image 1
    # (negative): one region at 30 deg plus a padding region exactly on the attribute, which must be ignored.
    def at(deg):
        r = math.radians(deg)
        return [math.cos(r), math.sin(r)]

    proj = torch.tensor([[at(60), at(0)], [at(30), at(0)]]).unsqueeze(2) * 3.0  # [B=2, R=2, Kp=1, D=2]
    proj[0, 1, 0] = torch.tensor(at(45)) * 2.0
    mask = torch.tensor([[True, True], [True, False]])
    attr = torch.tensor([[2.0, 0.0]])
    present = torch.tensor([[True], [False]])
    tau = 0.07
    scores = region_scores(proj, attr, mask, tau)
    torch.testing.assert_close(
        scores[:, 0], torch.tensor([math.cos(math.radians(45)), math.cos(math.radians(30))]) / tau
    )
    loss, n = mapping_loss(proj, attr, mask, present, tau)
    s_pos, s_neg = math.cos(math.radians(45)) / tau, math.cos(math.radians(30)) / tau
    expected = -s_pos + math.log(math.exp(s_pos) + math.exp(s_neg))
    assert n == 1
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss_q, _ = mapping_loss(proj, attr, mask, present, tau, reference_quirk=True)
    assert loss_q.item() == pytest.approx(-s_pos + math.log(math.exp(s_pos) + math.exp(s_neg) + 1), rel=1e-5)


def test_mapping_loss_callable_on_a_dataset_batch():
    gen = torch.Generator().manual_seed(0)
    regions = torch.randn(5, 3, 8, generator=gen)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    multi_hot = torch.zeros(5, 4, dtype=torch.bool)
    multi_hot[[0, 1, 2, 3, 4], [0, 1, 0, 2, 1]] = True
    data = Stage1Dataset.from_padded(regions, mask, multi_hot)
    assert data.regions.shape == (9, 8) and data.counts.tolist() == [2, 1, 3, 2, 1]  # packed: no padding
    batch = collate_stage1(data.__getitems__([2, 4]))
    assert batch["regions"].shape == (4, 8) and batch["mask"].tolist() == [[True] * 3, [True, False, False]]
    assert torch.equal(batch["regions"], torch.cat([regions[2], regions[4, :1]]))
    items = collate_stage1([data[2], data[4]])
    assert all(torch.equal(items[key], batch[key]) for key in batch)
    model = MappingModel(8, num_attributes=4, seed=0)
    loss_fn = MappingLoss(torch.randn(4, 8, generator=gen))
    loss, n = loss_fn(model, collate_stage1(data.__getitems__(range(5))))
    assert n == 5 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert model.W1.grad[3].abs().sum() == 0  # attribute 3 absent from the batch: its head is idle


@pytest.mark.parametrize("one_proj,adapter", [(False, False), (True, True)])
def test_argmax_shortcut_equals_direct_loss_and_gradients(one_proj, adapter):
    gen = torch.Generator().manual_seed(1)
    regions = torch.randn(6, 4, 8, generator=gen)
    mask = torch.ones(6, 4, dtype=torch.bool)
    mask[0, 2:] = mask[3, 1:] = False
    multi_hot = torch.rand(6, 5, generator=gen) < 0.5
    multi_hot[:, 4] = False
    batch = {"regions": regions, "mask": mask, "multi_hot": multi_hot}
    attr = torch.randn(5, 8, generator=gen)
    grads = []
    for shortcut in (True, False):
        model = MappingModel(8, num_attributes=5, one_proj=one_proj, adapter=adapter, seed=2)
        loss, n = MappingLoss(attr, reference_quirk=True, argmax_backward=shortcut)(model, batch)
        loss.backward()
        grads.append((loss.detach(), n, [p.grad.clone() for p in model.parameters()]))
    (l1, n1, g1), (l2, n2, g2) = grads
    assert n1 == n2 == int(multi_hot.sum())
    torch.testing.assert_close(l1, l2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    # the direct path agrees with the padded reference formulation
    model = MappingModel(8, num_attributes=5, one_proj=one_proj, adapter=adapter, seed=2)
    heads = multi_hot.any(0).nonzero().squeeze(1)
    ref, _ = mapping_loss(model(regions, heads), attr[heads], mask, multi_hot[:, heads], reference_quirk=True)
    torch.testing.assert_close(l1, ref.detach())


@pytest.mark.parametrize(
    "one_proj,adapter,heads", [(False, False, [3, 1]), (False, True, [0, 1, 2, 3]), (True, False, [2, 0])]
)
def test_replay_has_the_gradients_of_the_heads(one_proj, adapter, heads):
    # replay reuses project_cached's forward; its output and gradients equal the heads run under autograd
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, generator=gen)
    heads = torch.tensor(heads)
    rows = torch.randint(0, 5, (len(heads), 3), generator=gen)  # [Kp, B]: which row each column uses
    weight = torch.randn(len(heads), 3, 6, generator=gen)
    results = []
    for replayed in (True, False):
        model = MappingModel(6, num_attributes=4, one_proj=one_proj, adapter=adapter, seed=0)
        model.set_input_stats(torch.randn(20, 6, generator=torch.Generator().manual_seed(1)))
        if replayed:
            xs, hidden, out = model.project_cached(x, heads)
            k = torch.arange(len(heads)).unsqueeze(1) if len(hidden) > 1 else 0  # one_proj: one block
            proj = model.replay(xs[rows], hidden[k, rows], out[k, rows], heads, x[rows])
        else:
            full = model(x[None], heads)[0]  # [5, Kp, 6]: every head on every row
            proj = full[rows, torch.arange(len(heads)).unsqueeze(1)]
        (proj * weight).sum().backward()
        results.append((proj.detach(), [p.grad for p in model.parameters()]))
    (p1, g1), (p2, g2) = results
    torch.testing.assert_close(p1, p2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    if not one_proj and len(heads) < 4:
        assert g1[0][[0, 2]].abs().sum() == 0  # heads outside head_index stay idle


@pytest.mark.parametrize("adapter", [False, True])
def test_argmax_shortcut_under_autocast(adapter):
    # mixed precision (CUDA's AMP; bf16 autocast on CPU here): the cached rows come in the compute dtype
    gen = torch.Generator().manual_seed(1)
    batch = {
        "regions": torch.randn(6, 4, 8, generator=gen),
        "mask": torch.rand(6, 4, generator=gen) < 0.8,
        "multi_hot": torch.rand(6, 5, generator=gen) < 0.5,
    }
    attr = torch.randn(5, 8, generator=gen)
    results = []
    for shortcut in (True, False):
        model = MappingModel(8, num_attributes=5, adapter=adapter, seed=2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = MappingLoss(attr, reference_quirk=True, argmax_backward=shortcut)(model, batch)
        loss.backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        results.append((loss.detach().float(), model.W1.grad.clone()))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=0.05, atol=0.05)
    torch.testing.assert_close(g1, g2, rtol=0.1, atol=0.05)


@pytest.mark.parametrize("one_proj,adapter", [(False, False), (True, True)])
def test_project_grouped_applies_each_block_its_head(one_proj, adapter):
    model = MappingModel(6, num_attributes=4, one_proj=one_proj, adapter=adapter, seed=0)
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(0))
    heads, counts = torch.tensor([3, 0, 1]), torch.tensor([2, 0, 4])  # an empty block is skipped
    rows = torch.tensor([5, 1, 0, 1, 6, 2])
    out = model.project_grouped(x, rows, heads, counts)
    full = model(x[None], torch.arange(4))[0]  # [7, 4, 6]
    torch.testing.assert_close(out[:2], full[rows[:2], 3])
    torch.testing.assert_close(out[2:], full[rows[2:], 1])


def test_input_standardisation_removes_shift_and_scale():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=gen)
    shifted = 1e-4 * x + 3.0  # collapsed embeddings: one shared vector plus tiny deviations
    a, b = MappingModel(6, 2, seed=1), MappingModel(6, 2, seed=1)
    a.set_input_stats(x)
    b.set_input_stats(shifted)
    torch.testing.assert_close(b(shifted[None]), a(x[None]), atol=1e-3, rtol=1e-3)
    assert "in_mean" in b.state_dict()  # statistics travel with checkpoints


def test_the_number_of_heads_is_always_given():
    with pytest.raises(TypeError):
        MappingModel(8)  # no default vocabulary size: the heads follow the dataset's vocabulary
    assert MappingModel(8, num_attributes=7).W1.shape == (7, 8, 8)
