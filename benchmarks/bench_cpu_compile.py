"""``torch.compile`` (inductor) for a stage-2 training step on the CPU, against the same steps in eager mode.

    python benchmarks/bench_cpu_compile.py --data-dir DIR --stage-1-ckpt-dir DIR [--batch-size 64]
        [--steps 6] [--precision bf16]

Builds stage 2's training set and image model as ``python -m villa.stage2 experiment=stage2`` does, then runs
``--steps`` training steps on seeded random batches, first with the eager model and then with
``torch.compile(model)`` (the same model object, as ``compile=true`` wraps it), and prints each step's
seconds. Batches differ in image size and in the number of regions, as in training, so the compiled model
meets new shapes: the first steps of each new shape include compilation.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--stage-1-ckpt-dir", required=True)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--precision", choices=("bf16", "float32"), default="bf16")
    args = parser.parse_args()

    from villa.datasets.images import ResizePolicy
    from villa.encoders import get_encoder
    from villa.engine.device import keep_cpu_memory
    from villa.features.embeddings import RegionEmbeddings
    from villa.vlm.run import DEFAULT_OPTIMIZER, RegionTextLoss, build_stage2_datasets

    keep_cpu_memory()
    encoder = get_encoder(RegionEmbeddings.open(args.data_dir).encoder, device="cpu")
    train_set, _ = build_stage2_datasets(
        args.data_dir, encoder.name, "villa", args.stage_1_ckpt_dir, False, ResizePolicy.of(encoder)
    )
    torch.manual_seed(0)
    model = encoder.build_image_model().train()
    optimizer = DEFAULT_OPTIMIZER([p for p in model.parameters() if p.requires_grad])
    loss_fn = RegionTextLoss()
    generator = torch.Generator().manual_seed(0)
    bf16 = args.precision == "bf16"

    def batch():
        index = torch.randperm(len(train_set), generator=generator)[: args.batch_size].tolist()
        return train_set.__getitems__(index)

    def step(net, items) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = loss_fn(net, items)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    print(f"{encoder.name}, batch {args.batch_size}, {args.precision}, {torch.get_num_threads()} threads")
    for name, net in (("eager", model), ("compiled", torch.compile(model))):
        seconds = []
        for _ in range(args.steps):
            items = batch()
            start = time.perf_counter()
            step(net, items)
            seconds.append(time.perf_counter() - start)
        print(f"{name:9s} step seconds: " + ", ".join(f"{s:.2f}" for s in seconds), flush=True)


if __name__ == "__main__":
    main()
