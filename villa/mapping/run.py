"""Stage 1 end to end: train the mapping model, assign regions for every split, write outputs and metrics."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from villa.datasets import SPLITS, Dataset, region_truth
from villa.engine import distributed
from villa.engine.checkpoints import BEST, LAST, load_model_state
from villa.engine.device import resolve_device
from villa.engine.environment import write_environment
from villa.engine.tracking import mapping_figures, open_tracker
from villa.engine.training import FitResult, fit
from villa.evaluation.metrics import SMALL_SPLIT_IMAGES
from villa.features.embeddings import RegionEmbeddings, load_attr_embs
from villa.mapping.assign import EPSILON, map_split
from villa.mapping.data import Stage1Dataset, collate_stage1
from villa.mapping.loss import TEMPERATURE, MappingLoss
from villa.mapping.metrics import format_metrics_table, mapping_metrics
from villa.mapping.model import MappingModel
from villa.mapping.schema import clear_outputs, mapping_inputs, write_mapping, write_mapping_metrics
from villa.storage.errors import VillaError

MAP_WEIGHTS = ("best", "last")


@dataclass
class Stage1Result:
    run_dir: Path
    metrics: dict = field(default_factory=dict)  # {split: {precision, recall, f1, per_kind}}
    fit: FitResult | None = None
    mapped_with: str = "init"  # which weights produced the mapping: best.pkl, last.pkl or init


def default_optimizer(lr: float = 1e-4, weight_decay: float = 0.01, fused: bool = True) -> Callable:
    """AdamW as in the reference (torch's default weight decay). ``fused`` runs the update as one kernel:
    the heads hold ``2 K D^2`` weights (about 6M for DocMNIST's 20 attributes) and a per-tensor update loop
    would take a third of a CPU step."""
    return functools.partial(torch.optim.AdamW, lr=lr, weight_decay=weight_decay, fused=fused)


def run_stage1(
    data_dir: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    encoder: str | None = None,
    emb_dim: int | None = None,
    one_proj: bool = False,
    adapter: bool = False,
    dropout: float = 0.0,
    standardize: bool = True,
    temperature: float = TEMPERATURE,
    reference_quirk: bool = True,
    optimizer_factory: Callable | None = None,
    scheduler_factory: Callable | None = None,
    batch_size: int = 48,
    epochs: int = 30,
    seed: int = 23,
    device: str | torch.device = "auto",
    amp: bool = True,
    compile: bool = False,
    resume: bool = False,
    early_stopping_patience: int | None = None,
    epsilon: float = EPSILON,
    map_weights: str = "last",
    chunk_size: int = 256,
    num_workers: int = 0,
    pin_memory: bool = False,
    progress: bool = True,
    cpu_keep_freed_memory: bool | str = "auto",
    checkpoint_every_s: float = 30.0,
    resident_data_mb: float = 2048,
    cuda_graphs: bool = True,
    config: dict | None = None,
    logger=None,
) -> Stage1Result:
    """Train the mapping model on ``data_dir``'s train split and write the mapping of every split.

    Reads the dataset (annotations and vocabulary; each image's attributes are read off its TEXT with the
    vocabulary's matcher), ``attr_embs.pth`` and ``region_embs/`` (refused unless computed by ``encoder``;
    None accepts the encoder that preprocessing used). Writes to ``run_dir``: ``metrics.csv``, ``last.pkl``,
    ``best.pkl`` (by :func:`villa.engine.training.fit`), ``mapping_{split}.feather`` and ``mapping_metrics.json``
    (mapping P/R/F1 per split and per attribute kind when the dataset has region labels, and the checksums
    of the annotations and region embeddings it was made from, which later stages check), and prints the
    metrics table. ``map_weights`` picks the weights that map: ``best`` (lowest val loss) or ``last``.

    Region embeddings are held packed (:class:`~villa.mapping.data.Stage1Dataset`): memory follows the
    number of regions, not the number of images times the largest region count. On CUDA, the train and
    val embeddings move to the device when they and the activations of one padded step take at most
    ``resident_data_mb`` MiB together (0: never), in one process: batches are then gathered there and padded
    to the split's largest region count, every
    head runs on every region slot (:class:`MappingLoss` ``static_shapes``: same loss, fixed shapes), the
    validation loss is computed in a few large steps, and with ``cuda_graphs`` each full training step is
    replayed as one CUDA graph. Results agree with the DataLoader path up to float rounding.
    The previous run's mappings and metrics are deleted first, so a failed run leaves none behind.
    ``env.json`` is written at the start and ``curves.png`` after training; ``logger``
    (:class:`villa.engine.tracking.TrackerSettings` or a ``logger`` config node) names the experiment trackers that
    get the run's epochs and mapping metrics.
    """
    check_mapping_settings(epsilon, map_weights)
    if not temperature > 0:
        raise VillaError(f"loss.temperature must be > 0, got {temperature}")
    if not 0 <= dropout < 1:
        raise VillaError(f"model.dropout must be in [0, 1), got {dropout}")
    dataset, run_dir = Dataset.open(data_dir), Path(run_dir)
    data_dir = dataset.root
    device = resolve_device(device)
    tracker = open_tracker(logger, run_dir, params=config)  # (a missing tracker package: refused here)
    if distributed.global_rank() == 0:  # (the process group is not joined yet: fit joins it)
        clear_outputs(run_dir)
    write_environment(run_dir, "stage1", seed=seed, device=device)

    frame = dataset.annotations()
    embeddings = RegionEmbeddings.open(data_dir, expected_encoder=encoder)
    inputs = mapping_inputs(data_dir)  # (hashed before training: what the mapping is made from)
    embeddings.check_covers(frame["image_id"].to_numpy(), frame["num_regions"].to_numpy())
    if emb_dim is not None and int(emb_dim) != embeddings.dim:
        raise VillaError(
            f"model.emb_dim={emb_dim} but the region embeddings in {data_dir} are {embeddings.dim}-d: "
            f"set model.emb_dim=null to take it from the manifest"
        )
    vocabulary = dataset.vocabulary
    _, attr_embs = load_attr_embs(data_dir, vocabulary.names)
    if attr_embs.shape[1] != embeddings.dim:
        raise VillaError(
            f"attribute embeddings are {attr_embs.shape[1]}-d but region embeddings {embeddings.dim}-d: "
            f"re-run preprocessing with one encoder"
        )
    splits = {s: frame[frame["split"] == s].reset_index(drop=True) for s in SPLITS}
    splits = {s: f for s, f in splits.items() if len(f)}
    if "train" not in splits:
        raise VillaError(f"{data_dir} has no train split")
    data = {s: Stage1Dataset.from_frame(f, embeddings, vocabulary) for s, f in splits.items()}

    model_config = {
        "emb_dim": embeddings.dim,
        "num_attributes": len(vocabulary),
        "one_proj": bool(one_proj),
        "adapter": bool(adapter),
        "dropout": float(dropout),
    }
    # (standardisation statistics live in the model's buffers, hence in every checkpoint)
    model = MappingModel(**model_config, seed=seed)
    if standardize:
        model.set_input_stats(data["train"].regions)
    fit_sets = (data["train"], data.get("val"))
    resident_bytes = sum(d.nbytes for d in fit_sets if d is not None)
    # a fixed-shape step projects every slot of a batch padded to the largest region count with every head
    # (hidden layer and output, float32): one image with many boxes makes every step that large
    padded_step_bytes = 2 * 4 * batch_size * data["train"].max_regions * len(vocabulary) * embeddings.dim
    resident = (
        _device_memory_is_separate(device)
        and not distributed.launched_by_torchrun()
        and resident_bytes + padded_step_bytes <= resident_data_mb * 2**20
    )
    loss = MappingLoss(attr_embs, tau=temperature, reference_quirk=reference_quirk, static_shapes=resident)
    if resident:
        fit_sets = tuple(d.to(device) if d is not None else None for d in fit_sets)
    result = fit(
        model,
        *fit_sets,
        loss,
        collate_fn=collate_stage1,
        batch_size=batch_size,
        epochs=epochs,
        optimizer_factory=optimizer_factory or default_optimizer(),
        scheduler_factory=scheduler_factory,
        run_dir=run_dir,
        device=device,
        seed=seed,
        amp=amp,
        compile=compile,
        resume=resume,
        early_stopping_patience=early_stopping_patience,
        num_workers=num_workers,
        pin_memory=pin_memory,
        config=config,
        extra={"model": model_config, "vocabulary": vocabulary.names, "encoder": embeddings.encoder},
        desc="stage1",
        progress=progress,
        cpu_keep_freed_memory=cpu_keep_freed_memory,
        checkpoint_every_s=checkpoint_every_s,
        tracker=tracker,
        resident=resident,
        cuda_graphs=cuda_graphs,
        val_loss_fn=(
            (lambda m, split: loss.dataset_loss(m, split.regions, split.counts, split.multi_hot, batch_size))
            if resident
            else None
        ),
    )
    del fit_sets  # (the device copies)

    if not distributed.context().is_main:
        # under torchrun, rank 0 alone maps and writes; the others wait for it
        distributed.barrier()
        return Stage1Result(run_dir=run_dir, fit=result)
    mapped_with = "init"
    for name in (BEST, LAST) if map_weights == "best" else (LAST,):
        if (run_dir / name).is_file():
            load_model_state(run_dir / name, model)
            mapped_with = name
            break
    model.to(device)

    metrics = {}
    for split, split_frame in splits.items():
        mapped, assigned = map_split(
            model,
            split_frame,
            data[split].regions,
            data[split].counts,
            attr_embs,
            vocabulary,
            epsilon=epsilon,
            seed=[seed, SPLITS.index(split)],
            device=device,
            chunk_size=chunk_size,
            progress=progress,
        )
        write_mapping(run_dir, split, mapped)
        if dataset.has_region_labels:
            truth = region_truth(split_frame, vocabulary.names)
            metrics[split] = mapping_metrics(assigned, truth, vocabulary.names, vocabulary.kinds)
            metrics[split]["num_images"] = len(split_frame)
            metrics[split]["small_split"] = len(split_frame) < SMALL_SPLIT_IMAGES
    write_mapping_metrics(run_dir, metrics, inputs)  # last: its presence marks a complete run
    tracker.log_summary(mapping_figures(metrics))
    tracker.close()
    print(f"mapping with {mapped_with} (epsilon {epsilon}) -> {run_dir}")
    if metrics:
        print(format_metrics_table(metrics), flush=True)
        for split, m in metrics.items():
            if m["small_split"]:
                print(
                    f"warning: only {m['num_images']} {split} images (under {SMALL_SPLIT_IMAGES}): "
                    "its figures rest on very few examples",
                    flush=True,
                )
    else:
        print("no region labels in this dataset: mapping precision/recall cannot be measured", flush=True)
    distributed.barrier()
    return Stage1Result(run_dir=run_dir, metrics=metrics, fit=result, mapped_with=mapped_with)


def check_mapping_settings(epsilon: float, map_weights: str) -> None:
    """One-line errors for the ``mapping.*`` settings; the command calls it on the command line, before Hydra
    makes the run folder."""
    try:
        valid = not isinstance(epsilon, bool) and float(epsilon) >= 0
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise VillaError(f"mapping.epsilon must be >= 0, got {epsilon}")
    if map_weights not in MAP_WEIGHTS:
        raise VillaError(f"mapping.weights must be one of {', '.join(MAP_WEIGHTS)}, got '{map_weights}'")


def check_mapping_config(cfg) -> None:
    """:func:`check_mapping_settings` on a composed config (``python -m villa.stage1``'s command-line check)."""
    from villa.engine.hydra_app import require_stage

    require_stage(cfg, "stage1")  # (another stage's experiment has no mapping keys)
    check_mapping_settings(cfg.mapping.epsilon, cfg.mapping.weights)


def _device_memory_is_separate(device: torch.device) -> bool:
    """Whether keeping the data resident pays: on a GPU it spares the per-step copies and makes CUDA graphs
    possible; in host memory the DataLoader path already reads the tensors in place."""
    return device.type == "cuda"


def run_stage1_from_config(cfg) -> Stage1Result:
    """Hydra glue: turn a composed ``experiment=docmnist_stage1`` config into :func:`run_stage1` arguments.

    Every key is read as composed (``configs/default.yaml`` and ``experiment/stage1.yaml`` declare them all), so
    each default lives in the YAML once and a misspelt or missing key fails here rather than falling back."""
    from villa.engine.hydra_app import claim_runs_folder, require_stage, training_arguments

    require_stage(cfg, "stage1")
    claim_runs_folder(cfg)
    model, loss, mapping = cfg.model, cfg.loss, cfg.mapping
    return run_stage1(
        cfg.data_dir,
        cfg.run_dir,
        encoder=cfg.encoder,
        emb_dim=model.emb_dim,
        one_proj=bool(model.one_proj),
        adapter=bool(model.adapter),
        dropout=float(model.dropout),
        standardize=bool(model.standardize),
        temperature=float(loss.temperature),
        reference_quirk=bool(loss.reference_quirk),
        epsilon=float(mapping.epsilon),
        map_weights=str(mapping.weights),
        chunk_size=int(mapping.chunk_size),
        resident_data_mb=float(cfg.resident_data_mb),
        cuda_graphs=bool(cfg.cuda_graphs),
        **training_arguments(cfg),
    )
