"""Stage 2: train the region-text contrastive image model (docs/method.md section 5) or the CLIP baseline."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from villa.datasets import SPLITS, Dataset
from villa.datasets.images import DEFAULT_CACHE_MB, ResizePolicy
from villa.engine.device import resolve_device
from villa.engine.distributed import all_gather_no_grad, all_gather_with_grad
from villa.features.embeddings import TextEmbeddingCache, preprocessed_encoder
from villa.storage.errors import VillaError
from villa.vlm.data import PAIR_MODES, RegionTextDataset, build_dataset, collate_region_text
from villa.vlm.loss import TAU, WHOLE_IMAGE_PAIRS, separate_info_nce, symmetric_info_nce, whole_image_rows

DEFAULT_OPTIMIZER = functools.partial(
    torch.optim.Adam, lr=5e-5, weight_decay=0.2, betas=(0.9, 0.999), eps=1e-8
)
DEFAULT_SCHEDULER = functools.partial(
    torch.optim.lr_scheduler.ReduceLROnPlateau,
    mode="min",
    factor=0.5,
    patience=1,
    threshold=0.005,
    threshold_mode="abs",
)


class RegionTextLoss:
    """``loss_fn(model, batch)`` for :func:`villa.engine.training.fit`: symmetric InfoNCE over the batch's pairs.

    batch: images uint8 ``[B, 3, H, W]`` (scaled to [0, 1] here, on the device, so the host->device copy
    stays uint8), boxes ``[M, 5]``, text ``[M, D]``. Returns (the loss, M). ``whole_image_pairs``: one of
    :data:`~villa.vlm.loss.WHOLE_IMAGE_PAIRS` (``pooled``: one InfoNCE over all M pairs; ``separate``: the
    whole-image pairs' InfoNCE plus the region pairs').
    """

    def __init__(self, tau: float = TAU, whole_image_pairs: str = "pooled"):
        check_whole_image_pairs(whole_image_pairs)
        self.tau = tau
        self.whole_image_pairs = whole_image_pairs

    def __call__(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        images = batch["images"].float().div_(255)
        region_embs = model(images, batch["boxes"])
        # under torchrun the negatives are the pairs of the GLOBAL batch, as in one process
        region_embs, _ = all_gather_with_grad(region_embs)
        text = all_gather_no_grad(batch["text"])
        if self.whole_image_pairs == "separate":
            whole = all_gather_no_grad(whole_image_rows(batch["boxes"]))
            return separate_info_nce(region_embs, text, whole, self.tau), int(region_embs.shape[0])
        return symmetric_info_nce(region_embs, text, self.tau), int(region_embs.shape[0])


def check_stage2_config(cfg) -> None:
    """``pairs`` and ``whole_image_pairs`` of a composed config (``python -m villa.stage2``'s command-line check)."""
    from villa.engine.hydra_app import require_stage

    require_stage(cfg, "stage2")  # (another stage's experiment has no stage-2 keys)
    check_pairs(cfg.pairs)
    check_whole_image_pairs(cfg.whole_image_pairs)


def check_pairs(pairs: str) -> None:
    """One-line error unless ``pairs`` is one of :data:`~villa.vlm.data.PAIR_MODES`."""
    if pairs not in PAIR_MODES:
        raise VillaError(f"unknown pairs '{pairs}': use one of {', '.join(PAIR_MODES)}")


def check_whole_image_pairs(whole_image_pairs: str) -> None:
    """One-line error unless ``whole_image_pairs`` is one of :data:`~villa.vlm.loss.WHOLE_IMAGE_PAIRS`."""
    if whole_image_pairs not in WHOLE_IMAGE_PAIRS:
        raise VillaError(
            f"unknown whole_image_pairs '{whole_image_pairs}': use one of {', '.join(WHOLE_IMAGE_PAIRS)}"
        )


#: pair modes built from stage 1's mapping (the others read the dataset's annotations)
STAGE1_PAIR_MODES = ("villa", "random_mapping")


def stage2_frames(dataset: Dataset, pairs: str, stage_1_ckpt_dir: str | os.PathLike | None):
    """(train, val) frames: stage-1 mappings for ViLLA and the random mapping, annotations for the others."""
    check_pairs(pairs)
    if pairs == "oracle" and not dataset.has_region_labels:
        raise VillaError(
            f"pairs=oracle needs ground-truth region labels and {dataset.root} has none "
            f"(dataset.json: region_labels false): use pairs=villa, all_regions or random_mapping"
        )
    if pairs not in STAGE1_PAIR_MODES:
        return dataset.annotations("train"), dataset.annotations("val")
    from villa.mapping.schema import check_mapping_inputs, read_mapping

    if stage_1_ckpt_dir is None or not Path(stage_1_ckpt_dir).is_dir():
        raise VillaError(
            f"no stage-1 run folder at {stage_1_ckpt_dir}: run stage 1 first "
            "(python -m villa.stage1 experiment=stage1 data_dir=...) or set stage_1_ckpt_dir=..."
        )
    check_mapping_inputs(stage_1_ckpt_dir, dataset.root)  # made from this dataset's current files
    frames = []
    for split in ("train", "val"):
        frame = read_mapping(stage_1_ckpt_dir, split)
        if frame.empty:
            raise VillaError(f"the stage-1 mapping of split '{split}' in {stage_1_ckpt_dir} has no images")
        frames.append(frame)
    return tuple(frames)


def build_stage2_datasets(
    data_dir: str | os.PathLike,
    encoder_name: str,
    pairs: str = "villa",
    stage_1_ckpt_dir: str | os.PathLike | None = None,
    progress: bool = True,
    policy: ResizePolicy | None = None,
    image_cache_mb: float = DEFAULT_CACHE_MB,
    seed: int = 23,
) -> tuple[RegionTextDataset, RegionTextDataset]:
    """Train and val datasets (images resized by ``policy``, pair text embeddings precomputed from the cache).

    ``seed``: the random mapping's regions and the oracle's sentence choice draw from ``[seed, split index]``,
    the seeds stage 1 chooses its sentences with (same seed as stage 1: the oracle's sentences are its).
    """
    dataset = Dataset.open(data_dir)
    train_frame, val_frame = stage2_frames(dataset, pairs, stage_1_ckpt_dir)
    cache = TextEmbeddingCache.open(dataset.root, expected_encoder=encoder_name)
    policy = policy or ResizePolicy()
    return tuple(
        build_dataset(
            dataset, frame, cache, pairs, policy, image_cache_mb, progress, seed=[seed, SPLITS.index(split)]
        )
        for split, frame in (("train", train_frame), ("val", val_frame))
    )


def run_stage2(
    *,
    data_dir: str | os.PathLike,
    run_dir: str | os.PathLike,
    stage_1_ckpt_dir: str | os.PathLike | None = None,
    pairs: str = "villa",
    encoder: str | None = None,
    clip_weights: str | None = None,
    device: str = "auto",
    seed: int = 23,
    epochs: int = 100,
    batch_size: int = 256,
    optimizer_factory=DEFAULT_OPTIMIZER,
    scheduler_factory=DEFAULT_SCHEDULER,
    early_stopping_patience: int | None = 5,
    tau: float = TAU,
    whole_image_pairs: str = "pooled",
    amp: bool = True,
    compile: bool = False,
    resume: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
    progress: bool = True,
    image_cache_mb: float = DEFAULT_CACHE_MB,
    cpu_keep_freed_memory: bool | str = "auto",
    checkpoint_every_s: float = 30.0,
    activation_checkpointing: bool = False,
    config: dict | None = None,
    logger=None,
):
    """Train the image model on region-text pairs: ``pairs`` is a mode of :func:`villa.vlm.data.build_pairs`
    (``villa``, the ``clip`` baseline, or the ablations ``all_regions``, ``random_mapping``, ``oracle``).

    ``encoder``/``clip_weights`` None: those preprocessing recorded in the dataset's embeddings. Images keep
    decoded in memory when they fit ``image_cache_mb``, else are decoded per batch. ``activation_checkpointing``
    recomputes the tower's activations in the backward pass instead of keeping them (less memory, one more
    forward a step; same results). ``whole_image_pairs``: ``pooled`` (the reference: each whole-image pair is one of
    the batch's pairs) or ``separate`` (the whole-image pairs get their own InfoNCE, added to the region pairs').
    Writes ``run_dir/{metrics.csv,last.pkl,best.pkl,curves.png}`` through :func:`villa.engine.training.fit` and
    ``env.json``; ``logger`` (:class:`villa.engine.tracking.TrackerSettings` or a ``logger`` config node) names the
    experiment trackers that also get the run. Returns the FitResult.
    """
    from villa.encoders import get_encoder
    from villa.engine.environment import write_environment
    from villa.engine.tracking import open_tracker
    from villa.engine.training import fit

    check_whole_image_pairs(whole_image_pairs)
    dev = resolve_device(device)
    tracker = open_tracker(logger, run_dir, params=config)  # (a missing tracker package: refused here)
    write_environment(run_dir, "stage2", seed=seed, device=dev)
    encoder, clip_weights = preprocessed_encoder(Dataset.open(data_dir).root, encoder, clip_weights)
    enc = get_encoder(encoder, clip_weights=clip_weights, device="cpu")
    train_set, val_set = build_stage2_datasets(
        data_dir, enc.name, pairs, stage_1_ckpt_dir, progress, ResizePolicy.of(enc), image_cache_mb, seed
    )
    torch.manual_seed(seed)
    model = enc.build_image_model()
    if activation_checkpointing:
        if compile:  # (torch.compile traces the recomputation without the frozen BatchNorm statistics)
            raise VillaError("activation_checkpointing=true and compile=true cannot be combined: choose one")
        if not hasattr(model, "activation_checkpointing"):
            raise VillaError(
                f"encoder {enc.name}'s image tower has no activation_checkpointing: set it to false"
            )
        model.activation_checkpointing = True
    print(
        f"stage 2 ({pairs}): {len(train_set)} train images / {train_set.num_pairs} pairs, "
        f"{len(val_set)} val images / {val_set.num_pairs} pairs, encoder {enc.name}, device {dev}",
        flush=True,
    )
    result = fit(
        model,
        train_set,
        val_set,
        RegionTextLoss(tau, whole_image_pairs),
        collate_fn=collate_region_text,
        batch_size=batch_size,
        epochs=epochs,
        optimizer_factory=optimizer_factory or DEFAULT_OPTIMIZER,
        scheduler_factory=scheduler_factory,
        run_dir=run_dir,
        device=dev,
        seed=seed,
        amp=amp,
        compile=compile,
        resume=resume,
        early_stopping_patience=early_stopping_patience,
        num_workers=num_workers,
        pin_memory=pin_memory,
        config=config,
        extra={
            "encoder": enc.name,
            "encoder_config": enc.config,
            "pairs": pairs,
            "whole_image_pairs": whole_image_pairs,
        },
        desc=f"stage2-{pairs}",
        progress=progress,
        cpu_keep_freed_memory=cpu_keep_freed_memory,
        checkpoint_every_s=checkpoint_every_s,
        tracker=tracker,
    )
    tracker.close()
    return result


def run_stage2_from_config(cfg):
    """Hydra adapter: read the experiment's keys and call :func:`run_stage2`.

    Every key is read as composed (``configs/default.yaml`` and ``experiment/stage2.yaml`` declare them all), so
    each default lives in the YAML once and a misspelt or missing key fails here rather than falling back."""
    from villa.engine.hydra_app import claim_runs_folder, require_stage, training_arguments

    require_stage(cfg, "stage2")
    claim_runs_folder(cfg)
    return run_stage2(
        data_dir=cfg.data_dir,
        run_dir=cfg.run_dir,
        stage_1_ckpt_dir=cfg.stage_1_ckpt_dir,
        pairs=cfg.pairs,
        encoder=cfg.encoder,
        clip_weights=cfg.clip_weights,
        tau=float(cfg.tau),
        whole_image_pairs=str(cfg.whole_image_pairs),
        image_cache_mb=float(cfg.image_cache_mb),
        activation_checkpointing=bool(cfg.activation_checkpointing),
        **training_arguments(cfg),
    )
