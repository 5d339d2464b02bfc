"""Evaluate an image model on a dataset's test split.

With region labels (``reg_to_attr``): text->region / region->text retrieval and zero-shot AUROC on the labelled
regions, plus (for a ViLLA model) the stage-1 mapping precision/recall/F1 per split and per kind. Without
region labels: the same metrics at the image level, each image scored against the attributes its text mentions
(text->image R-Precision, zero-shot AUROC per attribute), by its best region or by its whole-image embedding
(:data:`IMAGE_SCORES`). ``metrics.json`` says which evaluation ran (``"evaluation": "regions" | "images"``)
and, at the image level, how images were scored (``"image_score"``).

A metric without a value is ``null`` (printed "n/a"). ``metrics.json`` also holds ``trivial`` (summary keys
that are 100 whatever the model on this data, e.g. region->text R-Precision with one attribute),
``small_split`` (true under :data:`~villa.evaluation.metrics.SMALL_SPLIT_IMAGES` images) and ``warnings``
(one line each, printed by :func:`format_metrics`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from villa.datasets import Dataset, region_boxes, region_offsets, region_truth, whole_image_boxes
from villa.datasets.images import DEFAULT_CACHE_MB, ResizePolicy, size_sorted_batches
from villa.engine.device import autocast, resolve_device
from villa.evaluation.metrics import (
    PRECISION_KS,
    SMALL_SPLIT_IMAGES,
    metric_warnings,
    retrieval_metrics,
    retrieval_metrics_from_scores,
)
from villa.evaluation.report import fmt
from villa.features.embeddings import (
    TEXT_EMBS_DIR,
    check_encoder,
    load_attr_embs,
    preprocessed_encoder,
    read_manifest,
)
from villa.storage.errors import VillaError
from villa.storage.io import write_json
from villa.vlm.data import RegionTextDataset, image_store

METRICS_FILE = "metrics.json"
EVALUATIONS = ("regions", "images")
#: how an image is scored against an attribute without region labels (docs/method.md section 6.3):
#: ``regions``, the best cosine over its whole image and its regions (stage 1's image score, the max over
#: regions); ``whole``, the cosine of its whole-image embedding
IMAGE_SCORES = ("regions", "whole")


def summary_keys(evaluation: str = "regions") -> tuple[str, ...]:
    """The headline metric names of an evaluation (``metrics.json`` keys)."""
    unit = "region" if evaluation == "regions" else "image"
    return (
        f"text_to_{unit}_r_precision",
        f"{unit}_to_text_r_precision",
        *(f"precision_at_{k}" for k in PRECISION_KS),
        "zero_shot_auroc",
    )


SUMMARY_KEYS = summary_keys("regions")


@torch.no_grad()
def embed_regions(
    model: torch.nn.Module,
    dataset: RegionTextDataset,
    device: torch.device,
    batch_size: int = 256,
    amp: bool = True,
    progress: bool = True,
) -> torch.Tensor:
    """L2-normalised embeddings ``[P, D]`` (float32, CPU) of every box of ``dataset``, in pair order.

    Images are batched by similar size (little padding) and the rows put back in pair order.
    """
    model.eval().to(device)
    offsets = dataset.offsets.numpy()
    out: torch.Tensor | None = None
    batches = size_sorted_batches(dataset.images.out_sizes, batch_size)
    for positions in tqdm(batches, desc="embed regions", leave=False, disable=not progress):
        batch = dataset.__getitems__(positions)
        images = batch["images"].to(device).float().div_(255)
        with autocast(device, amp):
            embs = torch.nn.functional.normalize(
                model(images, batch["boxes"].to(device)).float(), dim=1
            ).cpu()
        rows = np.concatenate([np.arange(offsets[p], offsets[p + 1]) for p in positions.tolist()])
        if out is None:
            out = torch.zeros(dataset.num_pairs, embs.shape[1])
        out[torch.from_numpy(rows)] = embs
    return out if out is not None else torch.zeros(0, 0)


def image_units(frame) -> tuple[np.ndarray, np.ndarray]:
    """Every image's whole-image box followed by its regions' boxes.

    Returns (offsets int64 ``[N+1]``, boxes float32 ``[N + R, 4]``); image i's units are
    ``offsets[i]:offsets[i+1]``, the first of them its whole image.
    """
    region_starts = region_offsets(frame)
    offsets = region_starts + np.arange(len(frame) + 1)
    boxes = np.empty((int(offsets[-1]), 4), dtype=np.float32)
    whole = np.zeros(len(boxes), dtype=bool)
    whole[offsets[:-1]] = True
    boxes[whole] = whole_image_boxes(frame)
    boxes[~whole] = region_boxes(frame)
    return offsets, boxes


def best_unit_scores(
    embs: torch.Tensor, attr_embs: torch.Tensor, offsets: np.ndarray, chunk: int = 65536
) -> torch.Tensor:
    """Each image's best cosine over its units with each attribute: float64 ``[N, K]``.

    embs ``[P, D]`` (the units of all images, image by image), attr_embs ``[K, D]``, offsets int64 ``[N+1]``.
    Cosines are formed ``chunk`` units at a time, so memory holds ``[chunk, K]`` of them, not ``[P, K]``.
    """
    attrs = torch.nn.functional.normalize(attr_embs.double(), dim=1)
    owner = torch.from_numpy(np.repeat(np.arange(len(offsets) - 1), np.diff(offsets)))
    best = torch.full((len(offsets) - 1, attrs.shape[0]), -torch.inf, dtype=torch.float64)
    for start in range(0, len(owner), chunk):
        sims = torch.nn.functional.normalize(embs[start : start + chunk].double(), dim=1) @ attrs.T
        rows = owner[start : start + chunk, None].expand_as(sims)
        best.scatter_reduce_(0, rows, sims, "amax")
    return best


def evaluate_model(
    *,
    data_dir: str | os.PathLike,
    encoder: str | None = None,
    clip_weights: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    split: str = "test",
    device: str = "auto",
    batch_size: int = 256,
    amp: bool = True,
    out_path: str | os.PathLike | None = None,
    label: str | None = None,
    progress: bool = True,
    image_cache_mb: float = DEFAULT_CACHE_MB,
    stage_1_ckpt_dir: str | os.PathLike | None = None,
    detection: bool = True,
    detection_regions: str = "auto",
    detection_score: str = "sigmoid",
    detection_nms_iou: float | None = 0.5,
    detection_max_per_image: int | None = 100,
    image_score: str = "regions",
) -> dict:
    """Metrics (percent) of an image model on ``split`` of a dataset (see the module docstring).

    ``checkpoint``: a stage-2 ``best.pkl``; None evaluates the encoder's freshly built (untrained) image model.
    ``encoder``/``clip_weights`` None: those recorded by preprocessing. Attribute text embeddings are the
    dataset's ``attr_embs.pth``. ``stage_1_ckpt_dir``: a finished stage-1 run whose mapping metrics are added
    under ``"mapping"``. ``detection``: also zero-shot detection AP/AP50 (:func:`detection_metrics`) when the
    dataset has region labels, over the candidates ``detection_regions`` names (:func:`detection_candidates`),
    scored by ``detection_score`` (:func:`villa.evaluation.detection.region_scores`), with per-class NMS at
    ``detection_nms_iou`` and at most ``detection_max_per_image`` detections per image. ``image_score``: how an
    image is scored without region labels (:data:`IMAGE_SCORES`). Writes ``out_path`` (JSON) when given and
    returns the metrics dict.

    ``amp`` applies on CUDA only: on a CPU the embeddings are float32, so that a CPU's figures do not depend on
    whether it has bf16. Region vectors that differ by less than bf16's resolution (the untrained tower's) rank
    differently in bf16: on the worked example its text->region R-Precision was 13.0 in float32, 9.9 in bf16.
    """
    from villa.encoders import get_encoder
    from villa.engine.checkpoints import load_model_state

    amp = amp and resolve_device(device).type == "cuda"

    _check_image_score(image_score)
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise VillaError(
                f"no checkpoint to evaluate at {checkpoint}: train it first (python -m villa.stage2 ...)"
            )
    dataset = Dataset.open(data_dir)
    if detection:  # settings that would fail only after the embedding pass are refused first
        _check_detection_settings(
            dataset, detection_regions, detection_score, detection_nms_iou, detection_max_per_image
        )
    if stage_1_ckpt_dir is not None and (Path(stage_1_ckpt_dir) / "mapping_metrics.json").is_file():
        from villa.mapping.schema import check_mapping_inputs

        check_mapping_inputs(stage_1_ckpt_dir, dataset.root)  # (before the work: a mapping of these files)
    frame = dataset.annotations(split)
    encoder, clip_weights = preprocessed_encoder(dataset.root, encoder, clip_weights)
    enc = get_encoder(encoder, clip_weights=clip_weights, device="cpu")
    text_dir = dataset.root / TEXT_EMBS_DIR
    check_encoder(read_manifest(text_dir), enc.name, text_dir)
    names = dataset.vocabulary.names
    _, attr_embs = load_attr_embs(dataset.root, names)
    if attr_embs.shape[1] != enc.dim:
        raise VillaError(
            f"attr_embs.pth in {dataset.root} has dim {attr_embs.shape[1]}, encoder '{enc.name}' has {enc.dim}: "
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

    store = image_store(dataset, frame, ResizePolicy.of(enc), image_cache_mb, progress)
    if dataset.has_region_labels:
        evaluation = "regions"
        offsets, boxes = region_offsets(frame), region_boxes(frame)
        truth = region_truth(frame, names, reachable=False)  # what each region shows, mentioned or not
    else:
        evaluation = "images"  # each image against the attributes its text mentions
        if image_score == "whole":
            offsets, boxes = np.arange(len(frame) + 1), whole_image_boxes(frame)
        else:
            offsets, boxes = image_units(frame)
        truth = dataset.vocabulary.match_matrix(frame["text"].tolist())
    units = RegionTextDataset(store, offsets, boxes, torch.zeros(int(offsets[-1]), 0))
    embs = embed_regions(model, units, resolve_device(device), batch_size, amp, progress)
    truth = torch.from_numpy(np.asarray(truth))
    if evaluation == "images" and image_score == "regions":
        metrics = retrieval_metrics_from_scores(best_unit_scores(embs, attr_embs, offsets), truth, names)
    else:
        metrics = retrieval_metrics(embs, attr_embs, truth, names)
    if evaluation == "regions" and detection:
        spec, candidates = detection_candidates(dataset, frame, detection_regions, progress)
        if candidates is None:  # the dataset's own regions, already embedded
            cand_offsets, cand_boxes, cand_embs, objectness = offsets, boxes, embs, None
        else:
            cand_offsets, cand_boxes, objectness = candidates
            cand_units = RegionTextDataset(
                store, cand_offsets, cand_boxes, torch.zeros(int(cand_offsets[-1]), 0)
            )
            cand_embs = embed_regions(model, cand_units, resolve_device(device), batch_size, amp, progress)
        metrics["detection"] = detection_metrics(
            frame, dataset, cand_embs, attr_embs, boxes=cand_boxes, offsets=cand_offsets, objectness=objectness,
            score=detection_score, nms_iou=detection_nms_iou, max_per_image=detection_max_per_image,
        )  # fmt: skip
        metrics["detection"]["candidates"] = spec
    if evaluation == "images":
        metrics = {k.replace("region", "image"): v for k, v in metrics.items()}
        metrics["trivial"] = [k.replace("region", "image") for k in metrics["trivial"]]
        for per in metrics["per_attribute"].values():
            per["num_images"] = per.pop("num_regions")
    unit = "region" if evaluation == "regions" else "image"
    metrics["small_split"] = len(frame) < SMALL_SPLIT_IMAGES
    metrics["warnings"] = metric_warnings(metrics, summary_keys(evaluation), len(frame), unit)
    metrics = {
        "model": label or ("untrained" if checkpoint is None else checkpoint.parent.name),
        "evaluation": evaluation,
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "epoch": epoch,
        "encoder": enc.name,
        "dataset": dataset.name,
        "split": split,
        "num_images": len(frame),
        "image_score": image_score if evaluation == "images" else None,
        **metrics,
    }
    if stage_1_ckpt_dir is not None and (Path(stage_1_ckpt_dir) / "mapping_metrics.json").is_file():
        from villa.mapping.schema import read_mapping_metrics

        metrics["mapping"] = read_mapping_metrics(stage_1_ckpt_dir)
    if out_path is not None:
        write_json(out_path, metrics)
    return metrics


def _check_image_score(image_score: str) -> None:
    if image_score not in IMAGE_SCORES:
        raise VillaError(f"unknown image_score '{image_score}': use one of {', '.join(IMAGE_SCORES)}")


def check_evaluation_settings(image_score: str, score: str, nms_iou, max_per_image) -> None:
    """One-line errors for the evaluation settings that need no dataset (``image_score`` and the
    ``detection.*`` values but the candidates); the commands call it on the command line, before Hydra makes the
    run folder."""
    _check_image_score(image_score)
    _check_detection_values(score, nms_iou, max_per_image)


def _check_detection_values(score: str, nms_iou, max_per_image) -> None:
    """One-line errors for ``detection.score``, ``detection.nms_iou`` and ``detection.max_per_image``."""
    import numbers

    from villa.evaluation.detection import SCORES

    if score not in SCORES:
        raise VillaError(f"unknown detection.score '{score}': use one of {', '.join(SCORES)}")
    if nms_iou is not None and not (isinstance(nms_iou, numbers.Real) and 0 < nms_iou <= 1):
        raise VillaError(f"detection.nms_iou must be in (0, 1] or null, got {nms_iou!r}")
    if max_per_image is not None and (
        isinstance(max_per_image, bool)
        or not isinstance(max_per_image, numbers.Integral)
        or max_per_image < 1
    ):
        raise VillaError(f"detection.max_per_image must be a positive integer or null, got {max_per_image!r}")


def check_evaluation_config(cfg) -> None:
    """:func:`check_evaluation_settings` on a composed config (``python -m villa.evaluate``'s command-line check)."""
    detection = cfg.detection
    check_evaluation_settings(cfg.image_score, detection.score, detection.nms_iou, detection.max_per_image)


def _check_detection_settings(dataset: Dataset, regions: str, score: str, nms_iou, max_per_image) -> None:
    """One-line errors for detection settings, before any work."""
    _check_detection_values(score, nms_iou, max_per_image)
    spec = detection_candidate_spec(dataset, regions)
    if score == "cosine" and spec is not None and spec.kind == "proposals":
        raise VillaError(
            "detection.score=cosine cannot be combined with the proposals' objectness (a score in [0, 1] is needed):"
            " use detection.score=sigmoid or softmax, or detection.regions=dataset"
        )


def detection_candidate_spec(dataset: Dataset, spec: str = "auto"):
    """The candidates ``spec`` means on ``dataset``: None for the dataset's own regions, else a
    :class:`~villa.regions.RegionSpec` (proposals or a grid).

    ``spec``: ``"dataset"``, ``"proposals[:K]"``, ``"grid:RxC"`` (:mod:`villa.regions`), or ``"auto"``: proposals
    when the dataset's regions are the labelled objects' own boxes (:attr:`Dataset.regions_are_objects`: scoring
    those would classify given boxes, not detect) or are themselves proposals (recomputed, the same boxes, for
    their objectness), else the dataset's regions.
    """
    from villa.regions import parse_region_spec

    text = str(spec).strip().lower()
    if text == "auto":
        if dataset.regions_are_objects:
            text = "proposals"
        elif (dataset.regions or "").startswith("proposals:"):
            text = dataset.regions
        else:
            text = "dataset"
    if text == "dataset":
        return None
    return parse_region_spec(text, ("grid", "proposals"), what="detection.regions")


def detection_candidates(
    dataset: Dataset, frame, spec: str = "auto", progress: bool = True
) -> tuple[str, tuple[np.ndarray, np.ndarray, np.ndarray | None] | None]:
    """The candidate regions of zero-shot detection on ``frame``'s images (:func:`detection_candidate_spec`):
    ``(name, None)`` for the dataset's own regions, else ``(name, (offsets [N + 1], boxes [M, 4], objectness [M]
    or None))``, boxes in stored pixels. Proposals carry the proposer's objectness, which the detection score
    uses (:func:`detection_metrics`); an image too small for any proposal gets no candidate."""
    parsed = detection_candidate_spec(dataset, spec)
    if parsed is None:
        return f"dataset ({dataset.regions or 'regions'})", None
    paths = dataset.image_paths(frame["image_filepath"].tolist())
    found = parsed.for_files(paths, frame["image_size"].tolist(), strict=False, progress=progress)
    offsets = np.concatenate([[0], np.cumsum([len(b) for b, _ in found])]).astype(np.int64)
    boxes = (
        np.concatenate([b for b, _ in found]).astype(np.float32) if found else np.zeros((0, 4), np.float32)
    )
    objectness = (
        None if parsed.kind == "grid" else np.concatenate([o for _, o in found]) if found else np.zeros(0)
    )
    return str(parsed), (offsets, boxes.reshape(-1, 4), objectness)


def detection_metrics(
    frame,
    dataset: Dataset,
    region_embs: torch.Tensor,
    attr_embs: torch.Tensor,
    boxes: np.ndarray | None = None,
    offsets: np.ndarray | None = None,
    objectness: np.ndarray | None = None,
    *,
    score: str = "sigmoid",
    nms_iou: float | None = 0.5,
    max_per_image: int | None = 100,
) -> dict:
    """Zero-shot detection (COCO AP and AP50, percent) on ``frame``'s images, :mod:`villa.evaluation.detection`.

    Candidates: ``region_embs [M, D]`` at ``boxes [M, 4]``, image ``i`` owning rows ``offsets[i]:offsets[i+1]``
    (default: the split's own regions, :func:`region_boxes` / :func:`region_offsets`). Every candidate is
    scored against every attribute prompt by the ``score`` rule over all the vocabulary's attributes
    (``"sigmoid"``: each attribute against the region's mean similarity to the vocabulary, so an attribute
    needs no competitors); with the candidates' ``objectness [M]`` (region proposals), a detection's score is
    the geometric mean of that class score and the candidate's objectness, as RegionCLIP's zero-shot
    inference combines class scores with proposal scores. Then per-class NMS at ``nms_iou`` and each image's
    ``max_per_image`` best.
    Ground truth: the dataset's labelled objects (``object_boxes``/``object_labels``, e.g. COCO instances under
    proposals), else every labelled region with each of its ``reg_to_attr`` attributes. Overall AP is the
    mean over attributes with ground truth, as COCO's.
    """
    from villa.evaluation.detection import zero_shot_detection

    names = dataset.vocabulary.names
    image_ids = frame["image_id"].to_numpy(dtype=np.int64)
    own_boxes = region_boxes(frame)
    boxes = own_boxes if boxes is None else boxes
    offsets = region_offsets(frame) if offsets is None else offsets
    candidate_image = np.repeat(image_ids, np.diff(offsets))
    if dataset.has_objects:
        objects = [o or [] for o in frame["object_boxes"]]
        labels = [lab or [] for lab in frame["object_labels"]]
        gt_image = np.repeat(image_ids, [len(o) for o in objects])
        gt_boxes = np.asarray([b for o in objects for b in o], dtype=np.float64).reshape(-1, 4)
        gt_names = [n for lab in labels for n in lab]
    else:
        region_image = np.repeat(image_ids, frame["num_regions"].to_numpy(dtype=np.int64))
        region_labels = [attrs for per_image in frame["reg_to_attr"] for attrs in per_image]
        repeats = [len(a) for a in region_labels]
        gt_image = np.repeat(region_image, repeats)
        gt_boxes = np.repeat(own_boxes.astype(np.float64), repeats, axis=0)
        gt_names = [a for attrs in region_labels for a in attrs]
    index = {n: k for k, n in enumerate(names)}
    gt_labels = np.asarray([index[n] for n in gt_names], dtype=np.int64)
    sizes = {int(i): tuple(int(v) for v in hw) for i, hw in zip(image_ids, frame["image_size"])}
    result = zero_shot_detection(
        region_embs, attr_embs, names, candidate_image, boxes, gt_image, gt_boxes, gt_labels, sizes,
        score=score, nms_iou=nms_iou, max_detections_per_image=max_per_image, region_objectness=objectness,
    )  # fmt: skip
    return {
        "ap": None if math.isnan(result["ap"]) else result["ap"],
        "ap50": None if math.isnan(result["ap50"]) else result["ap50"],
        "score": score if objectness is None else f"sqrt({score} x objectness)",
        "nms_iou": nms_iou,
        "max_detections_per_image": max_per_image,
        "ground_truth": "objects" if dataset.has_objects else "regions",
        "num_candidates": int(len(boxes)),
        "num_detections": result["num_detections"],
        "num_gt": len(gt_labels),
        "per_attribute": result["per_attribute"],
    }


def _image_level(metrics: dict) -> str:
    scored_by = {
        "regions": "each image by its best region",
        "whole": "each image by its whole-image embedding",
    }
    how = scored_by.get(metrics.get("image_score"))
    return ", no region labels: image-level" + (f", {how}" if how else "")


def format_metrics(metrics: dict) -> str:
    """One line per summary metric, e.g. ``text_to_region_r_precision  63.21`` ("n/a": no value, "(trivial)":
    100 whatever the model), then the mapping F1s, then one ``warning:`` line per :func:`metric_warnings`."""
    evaluation = metrics.get("evaluation", "regions")
    units = metrics.get("num_regions") if evaluation == "regions" else metrics.get("num_images")
    lines = [
        f"{metrics.get('model')} on {metrics.get('dataset')}/{metrics.get('split')} "
        f"({units} {evaluation}{'' if evaluation == 'regions' else _image_level(metrics)})"
    ]
    trivial = set(metrics.get("trivial") or ())
    lines += [
        f"  {key:<28} {fmt(metrics.get(key), '6.2f')}{'  (trivial)' if key in trivial else ''}"
        for key in summary_keys(evaluation)
    ]
    detection = metrics.get("detection")
    if detection and detection.get("ap") is not None:
        where = f"  ({detection.get('candidates', 'regions')}, {detection.get('score')} scores)"
        lines.append(f"  {'zero_shot_detection_ap':<28} {fmt(detection['ap'], '6.2f')}{where}")
        lines.append(f"  {'zero_shot_detection_ap50':<28} {fmt(detection['ap50'], '6.2f')}")
    for split, m in (metrics.get("mapping") or {}).items():
        if not isinstance(m, dict) or "f1" not in m:  # (not a split's figures)
            continue
        kinds = "".join(f"  {k} {fmt(v.get('f1'), '.1f')}" for k, v in m.get("per_kind", {}).items())
        lines.append(
            f"  stage-1 mapping {split:<5} P {fmt(m.get('precision'), '.1f')}  R {fmt(m.get('recall'), '.1f')}  "
            f"F1 {fmt(m.get('f1'), '.1f')}{kinds}"
        )
    lines += [f"  warning: {w}" for w in metrics.get("warnings") or ()]
    return "\n".join(lines)


def evaluate_from_config(cfg) -> dict:
    """Hydra adapter: evaluate the experiment's ``eval_checkpoint`` (null = untrained) into ``run_dir/metrics.json``
    (with ``env.json``); the ``logger`` trackers get the headline metrics, in the training run's tracker runs
    when ``run_dir`` is the training run's folder (:func:`villa.engine.tracking.read_run_ids`)."""
    from villa.engine.environment import write_environment
    from villa.engine.hydra_app import to_container
    from villa.engine.tracking import headline_metrics, open_tracker, read_run_ids, tracker_settings

    stage = cfg.get("stage")
    if stage not in ("stage2", "evaluate"):
        raise VillaError(
            f"experiment '{cfg.get('task_name')}' is a '{stage}' experiment: nothing to evaluate"
        )
    from villa.engine.hydra_app import claim_runs_folder

    claim_runs_folder(cfg)
    tracker = open_tracker(tracker_settings(cfg), cfg.run_dir, params=to_container(cfg))
    write_environment(cfg.run_dir, "evaluate", seed=int(cfg.seed), device=resolve_device(cfg.device))
    metrics = evaluate_model(
        data_dir=cfg.data_dir,
        encoder=cfg.encoder,
        clip_weights=cfg.clip_weights,
        checkpoint=cfg.eval_checkpoint,
        split=cfg.eval_split,
        device=cfg.device,
        batch_size=int(cfg.eval_batch_size),
        amp=bool(cfg.amp),
        out_path=Path(cfg.run_dir) / METRICS_FILE,
        label=cfg.task_name,
        progress=bool(cfg.progress),
        image_cache_mb=float(cfg.image_cache_mb),
        detection_regions=str(cfg.detection.regions),
        detection_score=str(cfg.detection.score),
        detection_nms_iou=None if cfg.detection.nms_iou is None else float(cfg.detection.nms_iou),
        detection_max_per_image=None
        if cfg.detection.max_per_image is None
        else int(cfg.detection.max_per_image),
        image_score=str(cfg.image_score),
        # (stage 2's experiments declare pairs and stage_1_ckpt_dir; the untrained tower has neither)
        stage_1_ckpt_dir=cfg.get("stage_1_ckpt_dir") if cfg.get("pairs", "villa") == "villa" else None,
    )
    tracker.start(read_run_ids(cfg.run_dir))
    tracker.log_summary(headline_metrics(metrics), step=metrics.get("epoch") or 0)
    tracker.close()
    print(format_metrics(metrics))
    print(f"wrote {Path(cfg.run_dir) / METRICS_FILE}")
    return metrics
