"""Make the example model shipped in ``villa/example_model/`` from the shapes worked example.

    python benchmarks/make_example_model.py [--encoder=default] [--images=700 --epochs=20 --batch_size=64]
        [--work=/tmp/villa_example] [--out=villa/example_model] [--float16]

Runs the README's commands in order, each in its own process (one torch thread each, ``OMP_NUM_THREADS=1``):

1. ``python -m villa.datasets.shapes --out=WORK/shapes_coco --images=N --seed=0``
2. ``python -m villa.ingest coco ... --out=WORK/data/shapesN``
3. ``python3 preprocess/preprocess_dataset.py --data_dir=WORK/data/shapesN --encoder=ENCODER``
4. ``python -m villa.stage1 experiment=stage1 data_dir=... checkpoint_dir=WORK/checkpoints``
5. ``python -m villa.stage2 experiment=stage2 ... epochs=E batch_size=B`` (ViLLA) and ``experiment=clip`` (the
   CLIP baseline, trained the same way), then ``python -m villa.evaluate`` of both (``metrics.json``)
6. ``python -m villa.export run_dir=WORK/checkpoints/shapesN/stage2 out=OUT`` (and the baseline to
   ``WORK/export_clip``; ``benchmarks/bench_grounding.py`` compares them)

A step whose output is already there is skipped, so an interrupted run continues where it stopped
(``--force`` redoes everything). The images used for training are seed 0; the grounding benchmark draws its
held-out images with another seed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], env: dict) -> None:
    print("$", " ".join(args), flush=True)
    start = time.time()
    subprocess.run(args, check=True, cwd=ROOT, env=env)
    print(f"  ({time.time() - start:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--encoder", default="default", help="default | mobilenet_v2 (default: %(default)s)")
    parser.add_argument(
        "--images", type=int, default=700, help="shapes images to train on (default: %(default)s)"
    )
    parser.add_argument("--epochs", type=int, default=20, help="stage-2 epochs (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=64, help="stage-2 batch (default: %(default)s)")
    parser.add_argument("--stage1_epochs", type=int, default=30, help="stage-1 epochs (default: %(default)s)")
    parser.add_argument("--work", default="/tmp/villa_example", help="scratch folder (default: %(default)s)")
    parser.add_argument("--out", default=str(ROOT / "villa" / "example_model"), help="export folder")
    parser.add_argument("--float16", action="store_true", help="store the exported weights as float16")
    parser.add_argument("--force", action="store_true", help="redo every step")
    args = parser.parse_args(argv)

    work = Path(args.work).resolve()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    py = sys.executable
    coco = work / "shapes_coco"
    data = work / "data" / f"shapes{args.images}"
    ckpt = work / "checkpoints"
    runs = ckpt / data.name
    common = [f"data_dir={data}", f"checkpoint_dir={ckpt}", "device=cpu", "progress=false"]
    stage2 = [f"epochs={args.epochs}", f"batch_size={args.batch_size}"]

    def todo(path: Path) -> bool:
        return args.force or not path.exists()

    if todo(coco / "captions.json"):
        run([py, "-m", "villa.datasets.shapes", f"--out={coco}", f"--images={args.images}", "--seed=0",
             "--no_progress"], env)  # fmt: skip
    if todo(data / "dataset.json"):
        run([py, "-m", "villa.ingest", "coco", f"--images={coco / 'images'}",
             f"--instances={coco / 'instances.json'}", f"--captions={coco / 'captions.json'}", f"--out={data}",
             "--overwrite", "--no_progress"], env)  # fmt: skip
    if todo(data / "text_embs" / "manifest.json"):
        run([py, "preprocess/preprocess_dataset.py", f"--data_dir={data}", f"--encoder={args.encoder}",
             "--device=cpu", "--no_progress"], env)  # fmt: skip
    if todo(runs / "stage1" / "mapping_test.feather"):
        run([py, "-m", "villa.stage1", "experiment=stage1", *common, f"epochs={args.stage1_epochs}"], env)
    for experiment in ("stage2", "clip"):
        if todo(runs / experiment / "best.pkl"):
            run([py, "-m", "villa.stage2", f"experiment={experiment}", *common, *stage2], env)
        if todo(runs / experiment / "metrics.json"):
            run([py, "-m", "villa.evaluate", f"experiment={experiment}", *common], env)
    precision = ["float16=true"] if args.float16 else []
    made = " ".join(
        ["python benchmarks/make_example_model.py", f"--encoder={args.encoder}", f"--images={args.images}",
         f"--epochs={args.epochs}", f"--batch_size={args.batch_size}", f"--stage1_epochs={args.stage1_epochs}"]
        + (["--float16"] if args.float16 else [])
    )  # fmt: skip
    note = (
        f"**How this model was made**: `{made}` (see docs/predict.md): the shapes worked example "
        f"(python -m villa.datasets.shapes --images={args.images} --seed=0, then ingest, preprocessing, stage 1, "
        "stage 2), each step in its own process with OMP_NUM_THREADS=1, in a scratch folder (the paths below)."
    )
    run(
        [
            py,
            "-m",
            "villa.export",
            f"run_dir={runs / 'stage2'}",
            f"out={args.out}",
            f"note='{note}'",
            *precision,
        ],
        env,
    )
    run(
        [py, "-m", "villa.export", f"run_dir={runs / 'clip'}", f"out={work / 'export_clip'}", *precision], env
    )
    print(f"example model: {args.out}\nCLIP baseline: {work / 'export_clip'}\nruns: {runs}")


if __name__ == "__main__":
    main()
