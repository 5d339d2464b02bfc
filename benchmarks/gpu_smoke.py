"""CUDA smoke check of the whole pipeline: device placement, mixed precision (bf16, and the fp16 +
GradScaler path), and CPU/GPU agreement of every stage on a small DocMNIST. Needs a GPU for its real
purpose; ``--device cpu`` runs the same code on the CPU (to check the script itself). Never run by the tests.

    python benchmarks/gpu_smoke.py --work /tmp/villa_smoke        # prints one PASS/FAIL line per check

Exit code 1 when any check fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from villa.engine import device as villa_device
from villa.engine.device import amp_dtype, needs_grad_scaler, resolve_device

CHECKS: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> bool:
    CHECKS.append((name, bool(ok), detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)
    return bool(ok)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


class DtypeProbe:
    """Records the dtype and device of the first convolution's output (what autocast actually ran)."""

    def __init__(self, model: torch.nn.Module):
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        self.seen: set[tuple[torch.dtype, str]] = set()
        conv.register_forward_hook(lambda _m, _i, out: self.seen.add((out.dtype, out.device.type)))


def stage2_fit(data_dir: Path, stage1_dir: Path, run_dir: Path, device: torch.device, epochs: int):
    """Stage-2 ViLLA training through the shared loop, with a probe on the model; returns (result, model, probe)."""
    from villa.encoders import get_encoder
    from villa.engine.training import fit
    from villa.vlm.data import collate_region_text
    from villa.vlm.run import DEFAULT_OPTIMIZER, DEFAULT_SCHEDULER, RegionTextLoss, build_stage2_datasets

    enc = get_encoder("default", device="cpu")
    train_set, val_set = build_stage2_datasets(data_dir, enc.name, "villa", stage1_dir, progress=False)
    torch.manual_seed(0)
    model = enc.build_image_model()
    probe = DtypeProbe(model)
    result = fit(
        model,
        train_set,
        val_set,
        RegionTextLoss(),
        collate_fn=collate_region_text,
        batch_size=64,
        epochs=epochs,
        optimizer_factory=DEFAULT_OPTIMIZER,
        scheduler_factory=DEFAULT_SCHEDULER,
        run_dir=run_dir,
        device=device,
        pin_memory=True,
        progress=False,
        desc=f"smoke-stage2-{run_dir.name}",
    )
    return result, model, probe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/villa_gpu_smoke", help="scratch folder (emptied first)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--budget", type=int, default=1500, help="train attribute budget of the small dataset"
    )
    parser.add_argument("--stage1-epochs", type=int, default=5)
    args = parser.parse_args()

    from villa.docmnist.generate import generate_docmnist
    from villa.engine.checkpoints import load_checkpoint
    from villa.evaluation.run import evaluate_model
    from villa.features.embeddings import RegionEmbeddings, load_attr_embs
    from villa.features.preprocess import preprocess_dataset
    from villa.mapping.run import run_stage1

    started = time.perf_counter()
    device = resolve_device(args.device)
    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}, device {device}", flush=True)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(
            f"gpu: {props.name}, {props.total_memory / 2**30:.0f} GiB, capability {props.major}.{props.minor}"
        )
        check("resolve_device('auto') picks the GPU", resolve_device("auto").type == "cuda")
        check("bf16 autocast where supported", amp_dtype(device) == torch.bfloat16, str(amp_dtype(device)))
        check("no GradScaler with bf16", not needs_grad_scaler(device))
    check("no autocast and no scaler on the CPU", amp_dtype(cpu) is None and not needs_grad_scaler(cpu))

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    gen = generate_docmnist(
        attribute_budget=args.budget,
        target_sample_complexity=8,
        seed=5,
        val_attribute_budget=args.budget // 2,
        test_attribute_budget=args.budget // 2,
        data_root=work / "data",
        progress=False,
    )
    gpu_dir = gen.dataset_dir
    cpu_dir = work / "data_cpu" / gpu_dir.name
    shutil.copytree(gpu_dir, cpu_dir)
    print(f"dataset {gpu_dir.name}: {gen.split_sizes}", flush=True)

    # 1. preprocessing on the GPU (bf16 autocast) against the CPU (float32)
    t = time.perf_counter()
    preprocess_dataset(gpu_dir, device=device, progress=False)
    gpu_pre = time.perf_counter() - t
    t = time.perf_counter()
    preprocess_dataset(cpu_dir, device=cpu, progress=False)
    cpu_pre = time.perf_counter() - t
    ids = np.arange(sum(gen.split_sizes.values()))
    regions_gpu, mask = RegionEmbeddings.open(gpu_dir).gather(ids)
    regions_cpu, mask_cpu = RegionEmbeddings.open(cpu_dir).gather(ids)
    err = relative_error(regions_gpu[mask], regions_cpu[mask_cpu])
    check("preprocess: region embeddings GPU ~ CPU", err < 1e-3, f"rel err {err:.2e}")
    attr_err = relative_error(load_attr_embs(gpu_dir)[1], load_attr_embs(cpu_dir)[1])
    check("preprocess: attribute text embeddings GPU ~ CPU", attr_err < 1e-2, f"rel err {attr_err:.2e}")
    print(f"preprocess: GPU {gpu_pre:.1f}s, CPU {cpu_pre:.1f}s", flush=True)

    # 2. stage 1 on each device from the same embeddings
    f1 = {}
    for name, dev in (("gpu", device), ("cpu", cpu)):
        t = time.perf_counter()
        res = run_stage1(
            gpu_dir, work / f"stage1_{name}", epochs=args.stage1_epochs, device=dev, progress=False, seed=23
        )
        f1[name] = res.metrics["val"]["f1"]
        print(f"stage 1 on {name}: {time.perf_counter() - t:.1f}s, val F1 {f1[name]:.1f}", flush=True)
    ckpt = load_checkpoint(work / "stage1_gpu" / "last.pkl")
    check(
        "stage 1: checkpoint tensors saved on the CPU",
        all(v.device.type == "cpu" for v in ckpt["model"].values()),
    )
    check("stage 1: val F1 GPU ~ CPU", abs(f1["gpu"] - f1["cpu"]) < 10, f"{f1['gpu']:.1f} vs {f1['cpu']:.1f}")
    if device.type == "cuda":
        # 2b. the three GPU step paths in float32 (no autocast): CUDA graph, resident eager, DataLoader
        paths = {"cuda_graph": {}, "resident": {"cuda_graphs": False}, "loader": {"resident_data_mb": 0}}
        runs = {}
        for name, kwargs in paths.items():
            t = time.perf_counter()
            res = run_stage1(
                gpu_dir, work / f"stage1_{name}", epochs=3, device=device, amp=False, progress=False, seed=23,
                **kwargs,
            )  # fmt: skip
            weights = load_checkpoint(work / f"stage1_{name}" / "last.pkl")["model"]["W1"]
            runs[name] = (res, weights, time.perf_counter() - t)
            print(f"stage 1 {name}: {runs[name][2]:.1f}s, mode {res.fit.step_mode}", flush=True)
        for name, (res, _, _) in runs.items():
            check(f"stage 1: {name} path taken", res.fit.step_mode == name, res.fit.step_mode)
        ref_res, ref_w, _ = runs["loader"]
        for name in ("cuda_graph", "resident"):
            res, w, _ = runs[name]
            gaps = [
                abs(a[k] - b[k]) / abs(b[k])
                for a, b in zip(res.fit.history, ref_res.fit.history)
                for k in ("train_loss", "val_loss")
            ]
            err = relative_error(w, ref_w)
            check(
                f"stage 1: {name} = DataLoader path (float32, 3 epochs)",
                max(gaps) < 1e-4
                and err < 1e-3
                and abs(res.metrics["val"]["f1"] - ref_res.metrics["val"]["f1"]) < 0.5,
                f"loss rel diff {max(gaps):.1e}, weights rel err {err:.1e}, val F1 {res.metrics['val']['f1']:.2f} vs "
                f"{ref_res.metrics['val']['f1']:.2f}",
            )

    # 3. stage 2 through the shared loop: bf16 autocast, placement, channels-last
    stage1_dir = work / "stage1_gpu"
    result, model, probe = stage2_fit(gpu_dir, stage1_dir, work / "stage2_bf16", device, epochs=2)
    losses = [row["train_loss"] for row in result.history]
    check("stage 2: losses finite", all(np.isfinite(losses)), str([round(v, 4) for v in losses]))
    check("stage 2: parameters on the device", all(p.device.type == device.type for p in model.parameters()))
    expected = {(amp_dtype(device) or torch.float32, device.type)}
    check("stage 2: convolutions ran in the autocast dtype", probe.seen >= expected, str(probe.seen))
    if device.type == "cuda":
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        check(
            "stage 2: conv weights channels-last on CUDA",
            conv.weight.is_contiguous(memory_format=torch.channels_last),
        )

    # 4. the fp16 + GradScaler path (GPUs without bf16) forced on this GPU
    if device.type == "cuda":
        original = villa_device.amp_dtype
        villa_device.amp_dtype = lambda dev: torch.float16 if dev.type == "cuda" else None
        try:
            result16, _, probe16 = stage2_fit(gpu_dir, stage1_dir, work / "stage2_fp16", device, epochs=1)
        finally:
            villa_device.amp_dtype = original
        scaler_state = load_checkpoint(work / "stage2_fp16" / "last.pkl").get("scaler")
        check("fp16: convolutions ran in float16", (torch.float16, "cuda") in probe16.seen, str(probe16.seen))
        check(
            "fp16: GradScaler state saved",
            bool(scaler_state),
            str(scaler_state and scaler_state.get("scale")),
        )
        check("fp16: loss finite", np.isfinite(result16.history[-1]["train_loss"]))

    # 5. evaluation of the same checkpoint on both devices
    metrics = {
        name: evaluate_model(
            data_dir=gpu_dir, checkpoint=work / "stage2_bf16" / "best.pkl", device=dev, progress=False
        )
        for name, dev in (("gpu", device), ("cpu", cpu))
    }
    gaps = {
        k: abs(metrics["gpu"][k] - metrics["cpu"][k])
        for k in ("text_to_region_r_precision", "region_to_text_r_precision", "zero_shot_auroc")
    }
    check("evaluate: metrics GPU ~ CPU (within 2 points)", max(gaps.values()) < 2, json.dumps(gaps))

    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")
    failed = [name for name, ok, _ in CHECKS if not ok]
    print(
        f"\n{len(CHECKS) - len(failed)}/{len(CHECKS)} checks passed in {time.perf_counter() - started:.0f}s"
        + (f"; FAILED: {', '.join(failed)}" if failed else ""),
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
