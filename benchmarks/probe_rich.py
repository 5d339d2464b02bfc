"""Linear probes (diagnosis only): how much of each region attribute a region embedding exposes linearly.

    python benchmarks/probe_rich.py --data_dir=<a generated DocMNIST folder, e.g. docmnist_30000_15.2>

For every region of the train and val splits it computes, with the ``default`` encoder's untrained image
tower, the stage-1 region embeddings of both recipes of ``preprocess/preprocess_docmnist.py``:

* ``reference``: ``--region_features=reference`` (the reference recipe, docs/method.md section 3.2: stem + layer1-3, RoIAlign on the
  stride-16 map, layer4, attention pool);
* ``rich``: ``--region_features=rich`` (the default), the final 384-d vector, as preprocessing writes it;
* ``rich block <name>``: each block of the rich descriptor alone (``villa/encoders/rich.py``), after its
  fixed projection and before the final one.

Then, per attribute kind, it fits a linear softmax classifier (a torch ``nn.Linear`` on z-scored
features, full-batch L-BFGS, small L2) on the TRAIN regions and prints its accuracy on the VAL regions
(held out), next to the majority-class rate. The region labels come from the annotation table's
ground truth; the probe only measures the features: stage 1 never reads these labels. Classes: digit
(10), colour (5), shape (none / rectangle / circle), size (none / small / medium / large).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from villa.datasets import Dataset
from villa.docmnist.vocabulary import COLORS, DIGIT_WORDS, SHAPES, SIZES
from villa.encoders import get_encoder
from villa.encoders.rich import BLOCK_DIM, BLOCKS, RichRegionFeatures
from villa.engine.device import resolve_device
from villa.features.preprocess import embed_regions
from villa.storage.errors import VillaError

#: kind -> (annotation column, classes; None is the class "none")
KINDS = {
    "digit": ("digit_label", list(DIGIT_WORDS)),
    "color": ("color_label", list(COLORS)),
    "shape": ("shape_label", [None, *SHAPES]),
    "size": ("size_label", [None, *SIZES]),
}


def region_labels(frame) -> dict[str, torch.Tensor]:
    """Per kind, the class index ``[M]`` of every region, images in ``frame`` order."""
    out = {}
    for kind, (column, classes) in KINDS.items():
        index = {c: i for i, c in enumerate(classes)}
        out[kind] = torch.tensor([index[v] for values in frame[column] for v in values])
    return out


def embed(model: nn.Module, frame, dataset: Dataset, device, batch_size: int) -> torch.Tensor:
    """``[M, d]`` outputs of ``model`` for every region of ``frame``, in frame order."""
    parts, ids = [], []
    for image_ids, _, embs in embed_regions(
        model.to(device).eval(), frame, dataset, device, batch_size, False
    ):
        ids.append(image_ids)
        parts.append(torch.from_numpy(embs))
    if not np.array_equal(np.concatenate(ids), frame["image_id"].to_numpy()):
        raise RuntimeError("embed_regions returned the images in another order")
    return torch.cat(parts).float()


def linear_probe(
    x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, classes: int
) -> float:
    """Val accuracy (%) of a softmax classifier fitted on ``x_train [N, d]`` (z-scored with its stats)."""
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    layer = nn.Linear(x_train.shape[1], classes)
    with torch.no_grad():  # a seeded start, whatever the global RNG state
        layer.weight.zero_()
        layer.bias.zero_()
    optimizer = torch.optim.LBFGS(
        layer.parameters(), max_iter=300, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(layer(x_train), y_train) + 1e-4 * layer.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float((layer(x_val).argmax(1) == y_val).float().mean()) * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data_dir", required=True, help="a generated DocMNIST folder (images + annotations)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args()
    started = time.perf_counter()
    device = resolve_device(args.device)
    dataset = Dataset.open(args.data_dir)
    dataset_dir = dataset.root
    frame = dataset.annotations()
    frame = frame[frame["split"].isin(["train", "val"])].reset_index(drop=True)
    train = torch.from_numpy(np.repeat(frame["split"].to_numpy() == "train", frame["num_regions"].to_numpy()))
    labels = region_labels(frame)

    enc = get_encoder("default", device=device)
    features = {"reference": embed(enc.build_image_model(), frame, dataset, device, args.batch_size)}
    rich = RichRegionFeatures(enc.build_image_model(), enc.dim)
    raw = embed(rich, frame, dataset, device, args.batch_size)  # [M, len(BLOCKS) * BLOCK_DIM]
    mean, std = rich.fit_stats(raw[train])  # train-split statistics, as preprocessing computes them
    features["rich"] = rich.cpu().finalize(raw, mean, std)
    for b, name in enumerate(BLOCKS):
        features[f"rich block {name}"] = raw[:, b * BLOCK_DIM : (b + 1) * BLOCK_DIM]

    print(
        f"{dataset_dir.name}: {int(train.sum())} train / {int((~train).sum())} val regions; "
        f"linear probe val accuracy (%), fitted on train"
    )
    print(f"{'features':<26}" + "".join(f"{kind:>8}" for kind in KINDS))
    majority = [
        float((labels[k][~train] == torch.bincount(labels[k][train]).argmax()).float().mean()) * 100
        for k in KINDS
    ]
    print(f"{'(majority class)':<26}" + "".join(f"{m:>8.1f}" for m in majority))
    for name, x in features.items():
        accuracies = [
            linear_probe(x[train], labels[k][train], x[~train], labels[k][~train], len(KINDS[k][1]))
            for k in KINDS
        ]
        print(f"{name:<26}" + "".join(f"{a:>8.1f}" for a in accuracies))
    print(
        f"{time.perf_counter() - started:.0f} s, torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    try:
        main()
    except VillaError as err:  # a bad --data_dir etc.: one line, as the entry points do
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
