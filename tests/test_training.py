"""The shared training loop: checkpoints, metrics, resume, early stopping, determinism."""

from __future__ import annotations

import csv
import functools

import pytest
import torch

from villa.engine.checkpoints import load_checkpoint, load_model_state
from villa.engine.training import fit, read_metrics
from villa.storage.errors import VillaError


class Points(torch.utils.data.Dataset):
    """y = 3x - 1 with seeded noise; ``__getitems__`` returns a ready batch."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, generator=g)
        self.y = 3 * self.x - 1 + 0.1 * torch.randn(n, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitems__(self, indices):
        return {"x": self.x[indices], "y": self.y[indices]}


def mse(model, batch):
    return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"]), len(batch["x"])


def make_model():
    torch.manual_seed(0)
    return torch.nn.Linear(1, 1)


def run(tmp_path, epochs, resume=False, patience=None, val=True, lr=0.1):
    model = make_model()
    result = fit(
        model,
        Points(40, 1),
        Points(16, 2) if val else None,
        mse,
        collate_fn=lambda b: b,
        batch_size=8,
        epochs=epochs,
        optimizer_factory=functools.partial(torch.optim.SGD, lr=lr),
        run_dir=tmp_path,
        device=torch.device("cpu"),
        seed=5,
        resume=resume,
        early_stopping_patience=patience,
        progress=False,
    )
    return model, result


def test_fit_learns_and_writes_artifacts(tmp_path):
    model, result = run(tmp_path, epochs=6)
    assert abs(model.weight.item() - 3) < 0.2 and abs(model.bias.item() + 1) < 0.2
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 7))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert read_metrics(tmp_path) == result.history  # the reader gives back what fit wrote
    ckpt = load_checkpoint(tmp_path / "last.pkl")
    assert ckpt["epoch"] == 6 and len(ckpt["history"]) == 6
    assert load_checkpoint(tmp_path / "best.pkl")["epoch"] == result.best_epoch
    assert not list(tmp_path.glob(".*.tmp"))


def test_resume_matches_uninterrupted_run(tmp_path):
    full, _ = run(tmp_path / "full", epochs=4)
    run(tmp_path / "split", epochs=2)
    resumed, result = run(tmp_path / "split", epochs=4, resume=True)
    assert torch.equal(full.weight, resumed.weight) and torch.equal(full.bias, resumed.bias)
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]


def test_same_seed_same_weights(tmp_path):
    a, _ = run(tmp_path / "a", epochs=3)
    b, _ = run(tmp_path / "b", epochs=3)
    assert torch.equal(a.weight, b.weight)


def test_early_stopping(tmp_path):
    # lr 0 never improves after the first epoch, so patience 2 stops after epoch 3
    _, result = run(tmp_path, epochs=10, patience=2, lr=0.0)
    assert result.stopped_early and len(result.history) == 3 and result.best_epoch == 1


def test_train_loss_is_monitored_without_val_set(tmp_path):
    _, result = run(tmp_path, epochs=2, val=False)
    assert result.history[-1]["val_loss"] is None and result.best_epoch == 2


def test_bad_inputs(tmp_path):
    with pytest.raises(VillaError, match="epochs"):
        run(tmp_path, epochs=-1)
    with pytest.raises(VillaError, match="no checkpoint"):
        load_model_state(tmp_path / "missing.pkl", make_model())
    run(tmp_path, epochs=1)
    with pytest.raises(VillaError, match="does not fit"):
        load_model_state(tmp_path / "last.pkl", torch.nn.Linear(2, 1))


@pytest.mark.parametrize("keep", [True, False])
def test_cpu_keep_freed_memory_is_a_choice(tmp_path, monkeypatch, keep):
    # the allocator setting trades peak memory for speed: fit applies it only when asked
    import villa.engine.training

    calls = []
    monkeypatch.setattr(villa.engine.training, "keep_cpu_memory", lambda: calls.append(1) or True)
    fit(
        make_model(),
        Points(16, 1),
        None,
        mse,
        collate_fn=lambda b: b,
        batch_size=8,
        epochs=1,
        optimizer_factory=functools.partial(torch.optim.SGD, lr=0.1),
        run_dir=tmp_path,
        device=torch.device("cpu"),
        progress=False,
        cpu_keep_freed_memory=keep,
    )
    assert len(calls) == (1 if keep else 0)


@pytest.mark.parametrize("every_s,expected_last", [(0.0, 2), (1e9, None)])
def test_checkpoints_are_written_every_epoch_or_when_due(tmp_path, every_s, expected_last):
    """With checkpoint_every_s=0 every finished epoch is on disk when a later one fails; with a long interval
    nothing is written before the last epoch (the failed run leaves no checkpoint)."""

    def failing_at_epoch_3(model, batch, calls=[0]):  # noqa: B006 (a counter shared by the calls)
        calls[0] += 1
        if calls[0] > 2 * 5:  # 5 batches of 8 an epoch
            raise RuntimeError("boom")
        return mse(model, batch)

    with pytest.raises(RuntimeError, match="boom"):
        fit(
            make_model(), Points(40, 1), None, failing_at_epoch_3, collate_fn=lambda b: b, batch_size=8, epochs=4,
            optimizer_factory=functools.partial(torch.optim.SGD, lr=0.1), run_dir=tmp_path, device=torch.device("cpu"),
            progress=False, checkpoint_every_s=every_s,
        )  # fmt: skip
    if expected_last is None:
        assert not (tmp_path / "last.pkl").exists() and not (tmp_path / "best.pkl").exists()
    else:
        assert load_checkpoint(tmp_path / "last.pkl")["epoch"] == expected_last


def test_a_pending_best_model_is_written_before_the_last_checkpoint(tmp_path):
    # a long interval: the best epoch's weights wait in memory until the final write, then both files agree
    model = make_model()
    result = fit(
        model, Points(40, 1), Points(16, 2), mse, collate_fn=lambda b: b, batch_size=8, epochs=5,
        optimizer_factory=functools.partial(torch.optim.SGD, lr=0.5), run_dir=tmp_path, device=torch.device("cpu"),
        progress=False, checkpoint_every_s=1e9,
    )  # fmt: skip
    best, last = load_checkpoint(tmp_path / "best.pkl"), load_checkpoint(tmp_path / "last.pkl")
    assert best["epoch"] == result.best_epoch == last["best_epoch"]
    assert last["epoch"] == 5 and result.best_epoch == 4  # (this seed's val loss rises in epoch 5)
    assert not torch.equal(best["model"]["weight"], last["model"]["weight"])


def test_a_non_finite_loss_stops_a_cpu_run_at_its_step(tmp_path):
    calls = []

    def diverging(model, batch):
        calls.append(1)
        loss, n = mse(model, batch)
        return (loss * float("nan") if len(calls) == 2 else loss), n

    with pytest.raises(VillaError, match="the loss became nan"):
        fit(
            make_model(), Points(40, 1), None, diverging, collate_fn=lambda b: b, batch_size=8, epochs=1,
            optimizer_factory=functools.partial(torch.optim.SGD, lr=0.1), run_dir=tmp_path,
            device=torch.device("cpu"), progress=False,
        )  # fmt: skip
    assert len(calls) == 2  # not the whole epoch of 5 steps


def test_the_final_checkpoint_write_makes_no_host_copy_of_the_state(tmp_path, monkeypatch):
    """A model's state can be gigabytes (stage 1: K heads of D x D weights, two AdamW moments each): an epoch
    that another follows is snapshotted (training goes on while it is written); the final write reads the
    state in place, and a pending best model (already a private copy) is not copied again."""
    from villa.engine.checkpoints import CheckpointWriter

    written = []
    monkeypatch.setattr(CheckpointWriter, "submit", lambda self, files: written.append(files))
    model = make_model()
    fit(
        model, Points(40, 1), Points(16, 2), mse, collate_fn=lambda b: b, batch_size=8, epochs=3,
        optimizer_factory=functools.partial(torch.optim.Adam, lr=0.1), run_dir=tmp_path, device=torch.device("cpu"),
        progress=False, checkpoint_every_s=0,
    )  # fmt: skip
    assert [[path.name for path, _ in files] for files in written] == [["best.pkl", "last.pkl"]] * 3
    live = {model.weight.data_ptr()}
    (best1, last1), (best3, last3) = written[0], written[-1]
    assert last3[1]["epoch"] == 3
    assert last1[1]["model"]["weight"].data_ptr() not in live  # epoch 1 of 3: a snapshot
    assert last3[1]["model"]["weight"].data_ptr() in live  # the final write: the model itself
    assert torch.equal(last3[1]["model"]["weight"], model.weight.detach())
    assert (
        best1[1]["model"]["weight"].data_ptr() not in live
        and best3[1]["model"]["weight"].data_ptr() not in live
    )
