"""Image-level retrieval on a box-free import: the whole image as one region vs the image's best region.

    python benchmarks/regions_image_pooling.py --out=OUT [--encoder=mobilenet_v2 --seeds=23,24,25]

Reads what ``benchmarks/regions_experiment.py --out=OUT`` trained: the ``table`` arm's dataset (imported with
``--regions=proposals``, no region labels), its ViLLA runs and the CLIP runs, per seed, and the untrained tower
once. For each model it embeds the test images two ways and scores every attribute against every image:

- ``whole``: the whole image as one region (what ``python -m villa.evaluate`` does without region labels);
- ``best region``: the highest cosine over the image's proposals;

then text->image R-Precision and zero-shot AUROC (``villa.evaluation.metrics``, macro over attributes), and
ViLLA - CLIP paired by seed with its 95% Student-t interval.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def image_scores(model, store, frame, attr, offsets, boxes) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines ``[N, K]`` of the N images with the K attributes: the whole image's, and the best proposal's."""
    from villa.datasets import whole_image_boxes
    from villa.evaluation.run import embed_regions
    from villa.vlm.data import RegionTextDataset

    n = len(frame)
    whole = whole_image_boxes(frame)
    cpu = torch.device("cpu")
    units = RegionTextDataset(store, np.arange(n + 1), whole, torch.zeros(n, 0))
    emb_whole = embed_regions(model, units, cpu, 256, False, False)
    units = RegionTextDataset(store, offsets, boxes, torch.zeros(int(offsets[-1]), 0))
    emb_regions = embed_regions(model, units, cpu, 256, False, False)
    attr = torch.nn.functional.normalize(attr.double(), dim=1)
    s_whole = torch.nn.functional.normalize(emb_whole.double(), dim=1) @ attr.T
    s_regions = torch.nn.functional.normalize(emb_regions.double(), dim=1) @ attr.T  # [M, K]
    owner = torch.from_numpy(np.repeat(np.arange(n), np.diff(offsets)))[:, None].expand_as(s_regions)
    s_best = torch.full((n, attr.shape[0]), -2.0, dtype=torch.float64).scatter_reduce(
        0, owner, s_regions, "amax"
    )
    return s_whole, s_best


def summary(sims: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """Text->image R-Precision and zero-shot AUROC (%, macro over attributes) of image scores ``[N, K]``."""
    from villa.evaluation.metrics import auroc, r_precision

    t2i, labels = sims.T.contiguous(), truth.T.contiguous()
    return float(np.nanmean(r_precision(t2i, labels).numpy()) * 100), float(
        np.nanmean(auroc(t2i, labels).numpy()) * 100
    )


def main() -> None:
    from villa.datasets import Dataset, region_boxes, region_offsets
    from villa.datasets.images import ResizePolicy
    from villa.docmnist.complexity_sweep import t_interval
    from villa.encoders import get_encoder
    from villa.engine.checkpoints import load_model_state
    from villa.features.embeddings import load_attr_embs, preprocessed_encoder
    from villa.vlm.data import image_store

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the --out of regions_experiment.py")
    parser.add_argument("--encoder", default="mobilenet_v2")
    parser.add_argument("--seeds", default="23,24,25")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]

    dataset = Dataset.open(args.out / "data" / f"table_{args.encoder}")
    frame = dataset.annotations("test")
    encoder_name, clip_weights = preprocessed_encoder(dataset.root, None, None)
    encoder = get_encoder(encoder_name, clip_weights=clip_weights, device="cpu")
    _, attr = load_attr_embs(dataset.root, dataset.vocabulary.names)
    truth = torch.from_numpy(np.asarray(dataset.vocabulary.match_matrix(frame["text"].tolist()))).bool()
    store = image_store(dataset, frame, ResizePolicy.of(encoder), 512, False)
    offsets, boxes = region_offsets(frame), region_boxes(frame)
    print(f"{dataset.root.name}/test: {len(frame)} images, {int(offsets[-1])} proposals")
    print("model      seed  R-Prec whole  R-Prec best region  AUROC whole  AUROC best region")
    found: dict[tuple[str, str], dict[int, tuple[float, float]]] = {}
    runs = {
        "villa": lambda s: (
            args.out / "runs" / f"table_{args.encoder}" / f"s{s}" / "runs" / "stage2" / "best.pkl"
        ),
        "clip": lambda s: args.out / "runs" / f"clip_{args.encoder}" / f"s{s}" / "clip" / "best.pkl",
        "untrained": lambda s: None,
    }
    for seed in seeds:
        for label, checkpoint in runs.items():
            if label == "untrained" and seed != seeds[0]:
                continue  # (no seed changes it)
            model = encoder.build_image_model()
            if checkpoint(seed) is not None:
                load_model_state(checkpoint(seed), model)
            model.eval()
            s_whole, s_best = image_scores(model, store, frame, attr, offsets, boxes)
            (rp_w, au_w), (rp_b, au_b) = summary(s_whole, truth), summary(s_best, truth)
            found.setdefault((label, "rp"), {})[seed] = (rp_w, rp_b)
            found.setdefault((label, "auroc"), {})[seed] = (au_w, au_b)
            print(
                f"{label:<10} {seed:>4}  {rp_w:12.2f}  {rp_b:18.2f}  {au_w:11.2f}  {au_b:17.2f}", flush=True
            )
    for metric in ("rp", "auroc"):
        for k, pooling in enumerate(("whole", "best region")):
            diffs = [found[("villa", metric)][s][k] - found[("clip", metric)][s][k] for s in seeds]
            interval = t_interval(diffs)
            name = "R-Prec" if metric == "rp" else "AUROC"
            print(
                f"ViLLA - CLIP, {name}, {pooling}: {interval['mean']:+.2f} "
                f"[{interval['ci95_low']:+.2f}, {interval['ci95_high']:+.2f}] over {interval['n']} seeds"
            )


if __name__ == "__main__":
    main()
