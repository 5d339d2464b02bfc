"""Device-resident stage-1 training: the fixed-shape loss, the whole-split validation loss and the
resident epoch loop give what the DataLoader path gives; checkpoints written in the background are complete.

The CUDA-graph replay itself needs a GPU (benchmarks/gpu_smoke.py checks it); on the CPU the same resident
loop runs eagerly, so everything but the capture is covered here.
"""

from __future__ import annotations

import pytest
import torch

from villa.engine.checkpoints import LAST, CheckpointWriter, load_checkpoint, save_checkpoint
from villa.engine.training import fit
from villa.mapping.data import Stage1Dataset, collate_stage1
from villa.mapping.loss import MappingLoss
from villa.mapping.model import MappingModel
from villa.mapping.run import default_optimizer


def _split(n: int, r: int = 4, d: int = 8, k: int = 5, seed: int = 0) -> Stage1Dataset:
    gen = torch.Generator().manual_seed(seed)
    regions = torch.randn(n, r, d, generator=gen)
    counts = torch.randint(1, r + 1, (n,), generator=gen)
    mask = torch.arange(r) < counts.unsqueeze(1)
    mask[0] = False  # an image without regions: no score, no term
    regions[~mask] = 0.0
    multi_hot = torch.rand(n, k, generator=gen) < 0.4
    multi_hot[:, k - 1] = False  # an attribute no text mentions
    return Stage1Dataset.from_padded(regions, mask, multi_hot)


@pytest.mark.parametrize("one_proj,adapter", [(False, False), (True, True), (False, True)])
def test_static_shapes_give_the_packed_loss_and_gradients(one_proj, adapter):
    data = _split(12)
    attr = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    results = []
    for static in (False, True):
        model = MappingModel(8, num_attributes=5, one_proj=one_proj, adapter=adapter, seed=2)
        model.set_input_stats(data.regions)
        batch = data.batch(torch.arange(12)) if static else collate_stage1(data.__getitems__(range(12)))
        loss, n = MappingLoss(attr, reference_quirk=True, static_shapes=static)(model, batch)
        loss.backward()
        results.append((loss.detach(), int(n), [p.grad.clone() for p in model.parameters()]))
    (l1, n1, g1), (l2, n2, g2) = results
    assert n1 == n2 == int((data.multi_hot & (data.counts > 0).unsqueeze(1)).sum())
    torch.testing.assert_close(l1, l2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert one_proj or g2[0][4].abs().sum() == 0  # the unmentioned attribute's head gets no gradient


def test_dataset_loss_equals_the_batch_by_batch_validation_loss():
    data = _split(23, seed=1)
    attr = torch.randn(5, 8, generator=torch.Generator().manual_seed(4))
    model = MappingModel(8, num_attributes=5, seed=5).eval()
    loss_fn = MappingLoss(attr, reference_quirk=True)
    total, items = 0.0, 0
    with torch.no_grad():
        for start in range(0, 23, 5):  # batches of 5, the last one short
            loss, n = loss_fn(model, collate_stage1(data.__getitems__(range(start, min(start + 5, 23)))))
            total, items = total + float(loss) * int(n), items + int(n)
    got_total, got_items = loss_fn.dataset_loss(
        model, data.regions, data.counts, data.multi_hot, batch_size=5
    )
    assert int(got_items) == items
    assert float(got_total) == pytest.approx(total, rel=1e-5)


def test_resident_fit_matches_the_dataloader_fit(tmp_path):
    train, val = _split(50, seed=6), _split(17, seed=7)
    attr = torch.randn(5, 8, generator=torch.Generator().manual_seed(8))
    runs = {}
    for resident in (False, True):
        model = MappingModel(8, num_attributes=5, seed=9)
        loss = MappingLoss(attr, reference_quirk=True, static_shapes=resident)
        result = fit(
            model,
            train,
            val,
            loss,
            collate_fn=collate_stage1,
            batch_size=8,
            epochs=3,
            optimizer_factory=default_optimizer(lr=1e-2),
            run_dir=tmp_path / str(resident),
            device=torch.device("cpu"),
            seed=11,
            progress=False,
            resident=resident,
            cuda_graphs=True,  # (no CUDA here: ignored, eager resident steps)
            val_loss_fn=(lambda m, s, loss=loss: loss.dataset_loss(m, s.regions, s.counts, s.multi_hot, 8))
            if resident
            else None,
        )
        runs[resident] = (result.history, [p.detach().clone() for p in model.parameters()])
    (h1, p1), (h2, p2) = runs[False], runs[True]
    for row1, row2 in zip(h1, h2, strict=True):
        assert row2["train_loss"] == pytest.approx(row1["train_loss"], rel=1e-5)
        assert row2["val_loss"] == pytest.approx(row1["val_loss"], rel=1e-5)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert [r["improved"] for r in h1] == [r["improved"] for r in h2]
    # the background writer has finished: last.pkl holds the final epoch and the final weights
    ckpt = load_checkpoint(tmp_path / "True" / LAST)
    assert ckpt["epoch"] == 3 and len(ckpt["history"]) == 3
    torch.testing.assert_close(ckpt["model"]["W1"], p2[0])


def test_checkpoint_writer_saves_the_state_at_the_call_in_order(tmp_path):
    model = torch.nn.Linear(3, 2)
    with CheckpointWriter() as writer:
        writer.save(tmp_path / "a.pkl", model, epoch=1, history=[{"epoch": 1}])
        with torch.no_grad():
            model.weight.add_(1.0)  # training goes on while the file is written
        expected = model.weight.detach().clone()
        writer.save(tmp_path / "b.pkl", model, epoch=2)
    first, second = load_checkpoint(tmp_path / "a.pkl"), load_checkpoint(tmp_path / "b.pkl")
    torch.testing.assert_close(first["model"]["weight"] + 1.0, expected)
    torch.testing.assert_close(second["model"]["weight"], expected)
    assert first["history"] == [{"epoch": 1}] and second["epoch"] == 2
    assert not list(tmp_path.glob("*.tmp*"))


def test_checkpoint_writer_reports_a_failed_write(tmp_path):
    (tmp_path / "a_file").write_text("")
    writer = CheckpointWriter()
    writer.save(tmp_path / "a_file" / "x.pkl", torch.nn.Linear(2, 2))  # its folder is a file
    with pytest.raises(OSError):
        writer.wait()
    writer.wait()  # reported once


def test_resume_ignores_the_capturable_mode_a_graph_run_saved(tmp_path):
    train = _split(20, seed=12)
    attr = torch.randn(5, 8)
    model = MappingModel(8, num_attributes=5, seed=1)
    optimizer = default_optimizer()(model.parameters())
    state = {"history": [], "best_epoch": None, "best_val_loss": None}
    save_checkpoint(tmp_path / LAST, model, optimizer, None, 0, None, None, **state)
    ckpt = load_checkpoint(tmp_path / LAST)
    ckpt["optimizer"]["param_groups"][0]["capturable"] = True  # as a CUDA-graph run on a GPU leaves it
    torch.save(ckpt, tmp_path / LAST)
    result = fit(
        model,
        train,
        None,
        MappingLoss(attr),
        collate_fn=collate_stage1,
        batch_size=8,
        epochs=1,
        optimizer_factory=default_optimizer(),
        run_dir=tmp_path,
        device=torch.device("cpu"),
        resume=True,
        progress=False,
    )
    assert len(result.history) == 1


def test_run_stage1_with_resident_data_maps_as_the_dataloader_path(tmp_path, monkeypatch):
    """The wiring of run_stage1's resident path (static loss, whole-split validation), forced on the CPU."""
    from test_stage1_run import make_dataset

    from villa.mapping import run as stage1_run
    from villa.mapping.run import run_stage1

    data_dir = make_dataset(tmp_path / "data", counts=(40, 12, 12))
    common = dict(
        epochs=3,
        batch_size=8,
        seed=3,
        device="cpu",
        progress=False,
        optimizer_factory=default_optimizer(lr=1e-2),
    )
    loader = run_stage1(data_dir, tmp_path / "loader", **common)
    monkeypatch.setattr(stage1_run, "_device_memory_is_separate", lambda device: True)
    resident = run_stage1(data_dir, tmp_path / "resident", **common)
    for row1, row2 in zip(loader.fit.history, resident.fit.history, strict=True):
        assert row2["train_loss"] == pytest.approx(row1["train_loss"], rel=1e-5)
        assert row2["val_loss"] == pytest.approx(row1["val_loss"], rel=1e-5)
    assert resident.metrics == loader.metrics
    # too big for the budget: the DataLoader path
    small = run_stage1(data_dir, tmp_path / "budget", resident_data_mb=0, **common)
    losses = [[(r["train_loss"], r["val_loss"]) for r in run.fit.history] for run in (small, loader)]
    assert losses[0] == losses[1]


def test_checkpoint_snapshots_keep_the_state_dict_metadata():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    payload = CheckpointWriter.snapshot(model)
    assert payload["model"]._metadata == model.state_dict()._metadata  # module versions, for load_state_dict
    torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)).load_state_dict(payload["model"])
