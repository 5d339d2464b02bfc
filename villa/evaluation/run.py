"""Evaluate an image model on the test regions: text->region / region->text retrieval and zero-shot AUROC."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from villa.annotations import attribute_multi_hot, read_annotations, region_boxes, region_offsets
from villa.device import autocast, resolve_device
from villa.docmnist.vocabulary import ATTRIBUTES
from villa.embeddings import TEXT_EMBS_DIR, check_encoder, load_attr_embs, read_manifest
from villa.errors import VillaError
from villa.evaluation.metrics import PRECISION_KS, retrieval_metrics
from villa.io import write_json
from villa.paths import resolve_dataset_dir
from villa.vlm.data import RegionTextDataset, load_images

METRICS_FILE = "metrics.json"
SUMMARY_KEYS = (
    "text_to_region_r_precision",
    "region_to_text_r_precision",
    *(f"precision_at_{k}" for k in PRECISION_KS),
    "zero_shot_auroc",
)


@torch.no_grad()
def embed_regions(
    model: torch.nn.Module,
    dataset: RegionTextDataset,
    device: torch.device,
    batch_size: int = 256,
    amp: bool = True,
    progress: bool = True,
) -> torch.Tensor:
    """L2-normalised embeddings ``[P, D]`` (float32, CPU) of every box of ``dataset``, in pair order."""
    model.eval().to(device)
    out = []
    starts = range(0, len(dataset), batch_size)
    for start in tqdm(starts, desc="embed regions", leave=False, disable=not progress):
        batch = dataset.__getitems__(list(range(start, min(start + batch_size, len(dataset)))))
        images = batch["images"].to(device).float().div_(255)
        with autocast(device, amp):
            embs = model(images, batch["boxes"].to(device))
        out.append(torch.nn.functional.normalize(embs.float(), dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def evaluate_model(
    *,
    data_dir: str | os.PathLike,
    encoder: str = "default",
    clip_weights: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    split: str = "test",
    device: str = "auto",
    batch_size: int = 256,
    amp: bool = True,
    out_path: str | os.PathLike | None = None,
    label: str | None = None,
    progress: bool = True,
) -> dict:
    """Retrieval metrics (percent) of an image model on the ground-truth regions of ``split``.

    ``checkpoint``: a stage-2 ``best.pkl``; None evaluates the encoder's freshly built (untrained) image
    model. Attribute text embeddings are the dataset's ``attr_embs.pth``, which must come from the same
    encoder. Writes ``out_path`` (JSON) when given and returns the metrics dict.
    """
    from villa.checkpoints import load_model_state
    from villa.encoders import get_encoder

    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise VillaError(
                f"no checkpoint to evaluate at {checkpoint}: train it first (python -m villa.stage2 ...)"
            )
    dataset_dir = resolve_dataset_dir(data_dir)
    frame = read_annotations(dataset_dir, split)
    enc = get_encoder(encoder, clip_weights=clip_weights, device="cpu")
    text_dir = dataset_dir / TEXT_EMBS_DIR
    check_encoder(read_manifest(text_dir), enc.name, text_dir)
    _, attr_embs = load_attr_embs(dataset_dir, ATTRIBUTES)
    if attr_embs.shape[1] != enc.dim:
        raise VillaError(
            f"attr_embs.pth in {dataset_dir} has dim {attr_embs.shape[1]}, encoder '{enc.name}' has {enc.dim}: "
            f"re-run preprocessing with --encoder={enc.name}"
        )

    model = enc.build_image_model()
    epoch = None
    if checkpoint is not None:
        ckpt = load_model_state(checkpoint, model)
        trained_with = (ckpt.get("extra") or {}).get("encoder")
        if trained_with is not None and trained_with != enc.name:
            raise VillaError(f"{checkpoint} was trained with encoder '{trained_with}', not '{enc.name}'")
        epoch = ckpt.get("epoch")

    offsets = region_offsets(frame)
    regions = RegionTextDataset(
        load_images(dataset_dir, frame, progress=progress),
        offsets,
        region_boxes(frame),
        torch.zeros(int(offsets[-1]), 0),
    )
    embs = embed_regions(model, regions, resolve_device(device), batch_size, amp, progress)
    truth = attribute_multi_hot(
        [attrs for per_image in frame["reg_to_attr"] for attrs in per_image], ATTRIBUTES
    )
    metrics = retrieval_metrics(embs, attr_embs, torch.from_numpy(np.asarray(truth)), ATTRIBUTES)
    metrics = {
        "model": label or ("untrained" if checkpoint is None else checkpoint.parent.name),
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "epoch": epoch,
        "encoder": enc.name,
        "dataset": dataset_dir.name,
        "split": split,
        "num_images": len(frame),
        **metrics,
    }
    if out_path is not None:
        write_json(out_path, metrics)
    return metrics


def format_metrics(metrics: dict) -> str:
    """One line per summary metric, e.g. ``text_to_region_r_precision  63.21``."""
    lines = [
        f"{metrics.get('model')} on {metrics.get('dataset')}/{metrics.get('split')} ({metrics.get('num_regions')} regions)"
    ]
    lines += [f"  {key:<28} {metrics[key]:6.2f}" for key in SUMMARY_KEYS]
    return "\n".join(lines)


def evaluate_from_config(cfg) -> dict:
    """Hydra adapter: evaluate the experiment's ``eval_checkpoint`` (null = untrained) into ``run_dir/metrics.json``."""
    stage = cfg.get("stage")
    if stage not in ("stage2", "evaluate"):
        raise VillaError(
            f"experiment '{cfg.get('task_name')}' is a '{stage}' experiment: nothing to evaluate"
        )
    metrics = evaluate_model(
        data_dir=cfg.data_dir,
        encoder=cfg.encoder,
        clip_weights=cfg.get("clip_weights"),
        checkpoint=cfg.get("eval_checkpoint"),
        split=cfg.get("eval_split", "test"),
        device=cfg.device,
        batch_size=int(cfg.get("eval_batch_size", 256)),
        amp=bool(cfg.amp),
        out_path=Path(cfg.run_dir) / METRICS_FILE,
        label=cfg.task_name,
        progress=bool(cfg.get("progress", True)),
    )
    print(format_metrics(metrics))
    print(f"wrote {Path(cfg.run_dir) / METRICS_FILE}")
    return metrics
