"""DataLoader workers and streamed images change no result: same losses and weights as one process."""

from __future__ import annotations

import functools

import torch
from test_training import Points, mse

from villa.engine.checkpoints import load_checkpoint
from villa.engine.training import fit


def _fit_dropout(tmp_path, num_workers: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 1))
    result = fit(
        model,
        Points(40, 1),
        Points(16, 2),
        mse,
        collate_fn=lambda b: b,
        batch_size=8,
        epochs=3,
        optimizer_factory=functools.partial(torch.optim.SGD, lr=0.05),
        run_dir=tmp_path / f"w{num_workers}",
        device=torch.device("cpu"),
        seed=5,
        num_workers=num_workers,
        progress=False,
    )
    return [(h["train_loss"], h["val_loss"]) for h in result.history], model.state_dict()


def test_workers_keep_random_streams_of_every_epoch(tmp_path):
    """Dropout draws the same masks in every epoch with and without (persistent) workers."""
    history0, state0 = _fit_dropout(tmp_path, 0)
    history2, state2 = _fit_dropout(tmp_path, 2)
    assert history0 == history2
    for name in state0:
        assert torch.equal(state0[name], state2[name])


def test_stage2_streaming_with_workers_equals_cached(tmp_path):
    """Stage 2 with images decoded per batch in 2 workers trains exactly like images cached in memory."""
    from test_stage2_e2e import build_fixture

    from villa.encoders import get_encoder
    from villa.vlm.run import run_stage2

    enc = get_encoder("default", device="cpu")
    data_dir, stage1_dir, _ = build_fixture(tmp_path, enc.name, enc.dim)
    runs = {}
    for name, cache_mb, workers in (("cached", 1024, 0), ("streaming", 0, 2)):
        result = run_stage2(
            data_dir=data_dir,
            run_dir=tmp_path / name,
            stage_1_ckpt_dir=stage1_dir,
            epochs=1,
            batch_size=2,
            device="cpu",
            progress=False,
            image_cache_mb=cache_mb,
            num_workers=workers,
        )
        runs[name] = ([(h["train_loss"], h["val_loss"]) for h in result.history], result.last_checkpoint)
    assert runs["cached"][0] == runs["streaming"][0]
    cached, streamed = (load_checkpoint(runs[n][1])["model"] for n in ("cached", "streaming"))
    assert all(torch.equal(cached[k], streamed[k]) for k in cached)
