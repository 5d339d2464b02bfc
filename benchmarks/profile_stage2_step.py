"""Where a stage-2 training step's time goes on a device: batch assembly, host->device copy, the step itself
(device time vs the host's time to issue it: launch-bound or compute-bound), and torch.profiler's top operators.

    python benchmarks/profile_stage2_step.py --data-dir DIR --stage-1-ckpt-dir DIR --device cuda [--batch-size 64]

Uses the package's own pieces as ``python -m villa.stage2`` runs them (``build_stage2_datasets`` with ViLLA
pairs, the encoder's image model in channels-last, ``RegionTextLoss``, stage 2's default Adam, autocast): a
diagnosis for choosing speed levers, not a before/after benchmark. Prints milliseconds per step.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--stage-1-ckpt-dir", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    from villa.datasets import Dataset
    from villa.datasets.images import ResizePolicy
    from villa.encoders import get_encoder
    from villa.engine.device import autocast, resolve_device
    from villa.engine.training import _backward_and_step, move_to_device
    from villa.features.embeddings import preprocessed_encoder
    from villa.vlm.data import collate_region_text
    from villa.vlm.run import DEFAULT_OPTIMIZER, RegionTextLoss, build_stage2_datasets

    device = resolve_device(args.device)
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(
        f"device {device}{gpu}; {os.cpu_count()} CPU cores; torch {torch.__version__}; load {os.getloadavg()}"
    )
    name, weights = preprocessed_encoder(Dataset.open(args.data_dir).root, None, None)
    enc = get_encoder(name, clip_weights=weights, device="cpu")
    t = time.perf_counter()
    train_set, _ = build_stage2_datasets(
        args.data_dir, enc.name, "villa", args.stage_1_ckpt_dir, False, ResizePolicy.of(enc)
    )
    print(
        f"datasets built in {time.perf_counter() - t:.1f}s: {len(train_set)} images, {train_set.num_pairs} pairs"
    )
    torch.manual_seed(0)
    model = enc.build_image_model().to(
        device, memory_format=torch.channels_last if device.type == "cuda" else None
    )
    optimizer = DEFAULT_OPTIMIZER([p for p in model.parameters() if p.requires_grad])
    loss_fn = RegionTextLoss()
    channels_last = device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=collate_region_text,
        generator=torch.Generator().manual_seed(0),
    )
    steps = min(args.steps, len(loader))
    it = iter(loader)
    t = time.perf_counter()
    batches = [next(it) for _ in range(steps)]
    assembly = (time.perf_counter() - t) / steps
    _sync(device)
    t = time.perf_counter()
    on_device = [move_to_device(b, device, False, channels_last) for b in batches]
    _sync(device)
    copy = (time.perf_counter() - t) / steps
    pairs = sum(len(b["text"]) for b in batches) / steps

    def train_steps(batches):
        for batch in batches:
            with autocast(device, True):
                loss, _ = loss_fn(model, batch)
            _backward_and_step(model, loss, optimizer, None, None)

    train_steps(on_device[:3])  # warm-up (cuDNN autotuning, allocator)
    _sync(device)
    t = time.perf_counter()
    train_steps(on_device)
    issued = (time.perf_counter() - t) / steps
    _sync(device)
    step = (time.perf_counter() - t) / steps
    with torch.no_grad():
        _sync(device)
        t = time.perf_counter()
        for batch in on_device:
            with autocast(device, True):
                loss_fn(model, batch)
        _sync(device)
        forward = (time.perf_counter() - t) / steps
    print(
        f"per step (batch {args.batch_size} images, {pairs:.0f} pairs, {steps} steps, {device}):\n"
        f"  batch assembly on the host   {assembly * 1e3:8.2f} ms\n"
        f"  host->device copy            {copy * 1e3:8.2f} ms\n"
        f"  train step (device done)     {step * 1e3:8.2f} ms  (host done issuing: {issued * 1e3:.2f} ms)\n"
        f"  forward only, no grad        {forward * 1e3:8.2f} ms",
        flush=True,
    )
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        train_steps(on_device[:5])
        _sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=45))
    if device.type == "cuda":
        print(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=45)
        )


if __name__ == "__main__":
    main()
