"""Detection from region proposals on a shapes set: ground-truth boxes vs proposals vs a box-free table import.

    python benchmarks/regions_experiment.py --out=results/regions [--images=800 --seeds=23,24,25 \\
        --encoder=default --stage2_epochs=12 --stage2_batch=64 --arms=gt,proposals,table \\
        --stage1_overrides="mapping.epsilon=0.3" --stage2_overrides="..." --villa_overrides="..."]

One shapes set (``python -m villa.datasets.shapes --images=N --seed=0``) is imported three ways, each an "arm":

- ``gt``: COCO import with the instance boxes as regions (``--regions=boxes``); detection is evaluated on
  proposals (``detection.regions=auto``), so it measures finding objects, not classifying given boxes;
- ``proposals``: COCO import with ``--regions=proposals`` (no ground-truth box is used in training or mapping;
  the instance boxes are kept as the objects for metrics only);
- ``table``: the same images and captions as a box-free table import with ``--regions=proposals`` (image-level
  evaluation: no region labels at all), evaluated twice: images scored by their best region (``image_score=regions``,
  the default) and by their whole-image embedding (``image_score=whole``).

Per arm: preprocessing (``--encoder``), then per seed stage 1 and ViLLA's stage 2, and evaluation of ViLLA, CLIP
and the untrained tower. The CLIP baseline trains on whole images and whole texts only, which the three arms
share (same images, same texts, same splits), so it is trained once per seed and evaluated on every arm. Seeds
change stage 1's and stage 2's initialisation and order, not the data. Every command runs as its own process
with ``--threads`` torch threads (1 by default; the commands are printed as they run and logged in
``<out>/commands.log``); a finished step (its output file present) is skipped and an interrupted training
continues from its ``last.pkl``, so a run can be resumed, and seeds can run as concurrent processes once
``--prepare_only`` has made the data. Results: ``<out>/results_<encoder><overrides>.csv`` (one row per arm, seed,
model and, on the table arm, image score) and ``<out>/summary_<encoder><overrides>.csv`` (mean and 95% Student-t
interval over the seeds, and ViLLA - CLIP paired by seed).

Overrides: ``--stage1_overrides`` go to stage 1, ``--stage2_overrides`` to the stage-2 training of ViLLA and CLIP
alike, ``--villa_overrides`` to ViLLA's stage 2 only (the CLIP runs are then reused). Runs made with overrides
have their own folders named after them, each group marked (``runs/<arm>_<encoder>+<stage-1 override>
+stage2.<override>+villa.<override>``, ``runs/clip_<encoder>+stage2.<override>``), so a rerun with other
overrides never picks up these runs. ``--images``, ``--stage2_epochs`` and ``--stage2_batch`` do not name folders:
give a run with other values of these its own ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from villa.engine.curves import CURVES_FILE
from villa.evaluation.run import IMAGE_SCORES

REPO = Path(__file__).resolve().parent.parent
ARMS = ("gt", "proposals", "table")
FOLDER_SUFFIX = {"regions": "", "whole": "_whole"}  # the run folder of each image score: <experiment><suffix>
MODELS = ("villa", "clip", "untrained")
METRICS = (
    "text_to_region_r_precision",
    "text_to_image_r_precision",
    "zero_shot_auroc",
    "detection_ap",
    "detection_ap50",
    "mapping_f1_val",
    "mapping_f1_test",
    "mapping_precision_val",
)


THREADS = 1  # torch threads of every command (--threads)
#: written when a training run has ended (its last epoch or an early stop); an interrupted run has best.pkl and
#: last.pkl but not this, and continues from last.pkl (resume=true)
TRAINED = CURVES_FILE


def run(command: list[str], log: Path) -> None:
    """Run one villa command (:data:`THREADS` torch threads), appending its output to ``log``; stop on failure."""
    print("$", shlex.join(command), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONPATH": str(REPO)}
    start = time.time()
    with open(log, "a") as fh:
        fh.write(f"$ {shlex.join(command)}\n")
        fh.flush()
        done = subprocess.run(command, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        fh.write(f"# exit {done.returncode} after {time.time() - start:.0f} s\n")
    if done.returncode != 0:
        sys.exit(f"error: the command above failed (exit {done.returncode}); see {log}")


def prepare(out: Path, images: int, encoder: str, arms: list[str], log: Path) -> dict[str, Path]:
    """Generate the shapes set and import + preprocess it once per arm; returns arm -> dataset folder."""
    py = sys.executable
    shapes = out / "shapes"
    if not (shapes / "captions.json").is_file():
        run([py, "-m", "villa.datasets.shapes", f"--out={shapes}", f"--images={images}", "--seed=0",
             "--no_progress"], log)  # fmt: skip
    data = {}
    for arm in arms:
        folder = out / "data" / f"{arm}_{encoder}"
        data[arm] = folder
        if not (folder / "dataset.json").is_file():
            if arm == "table":
                table = out / "pairs.jsonl"
                _write_table(shapes, table)
                (out / "attributes.yaml").write_text(_vocabulary(shapes))
                run([py, "-m", "villa.ingest", "table", f"--table={table}", f"--images={shapes / 'images'}",
                     f"--attributes={out / 'attributes.yaml'}", "--regions=proposals", f"--out={folder}",
                     "--no_progress"], log)  # fmt: skip
            else:
                regions = "boxes" if arm == "gt" else "proposals"
                run([py, "-m", "villa.ingest", "coco", f"--images={shapes / 'images'}",
                     f"--instances={shapes / 'instances.json'}", f"--captions={shapes / 'captions.json'}",
                     f"--regions={regions}", f"--out={folder}", "--no_progress"], log)  # fmt: skip
        if not (folder / "region_embs" / "manifest.json").is_file():
            run([py, "preprocess/preprocess_dataset.py", f"--data_dir={folder}", f"--encoder={encoder}",
                 "--device=cpu"], log)  # fmt: skip
    return data


def _write_table(shapes: Path, table: Path) -> None:
    """The shapes set as a box-free table: one row per image, its captions joined (as the COCO importer does)."""
    captions = json.loads((shapes / "captions.json").read_text())
    texts: dict[int, list[str]] = {}
    for c in captions["annotations"]:
        texts.setdefault(int(c["image_id"]), []).append(c["caption"].strip().rstrip(".").strip())
    files = {int(im["id"]): im["file_name"] for im in captions["images"]}
    rows = [{"id": i, "image": files[i], "text": " . ".join(t)} for i, t in sorted(texts.items())]
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _vocabulary(shapes: Path) -> str:
    categories = json.loads((shapes / "instances.json").read_text())["categories"]
    return "attributes:\n" + "".join(f"  - name: {c['name']}\n    kind: shape\n" for c in categories)


def train_clip(out: Path, folder: Path, seed: int, args, log: Path) -> Path:
    """The CLIP baseline of one seed (whole images and texts: the same for every arm); returns its best.pkl."""
    ckpt = out / "runs" / f"clip_{args.encoder}{_settings(args.stage2_overrides, 'stage2.')}" / f"s{seed}"
    run_dir = ckpt / "clip"
    if not (run_dir / TRAINED).is_file():
        run([sys.executable, "-m", "villa.stage2", "experiment=clip", "resume=true", f"data_dir={folder}", f"run_dir={run_dir}",
             f"checkpoint_dir={ckpt}", f"seed={seed}", "device=cpu", "progress=false",
             f"epochs={args.stage2_epochs}", f"batch_size={args.stage2_batch}", *args.stage2_overrides.split()],
            log)  # fmt: skip
    return run_dir / "best.pkl"


def train_and_evaluate(out: Path, arm: str, folder: Path, seed: int, clip: Path, args, log: Path) -> Path:
    """Stage 1, ViLLA and the three evaluations of one arm and seed; returns the folder of its runs."""
    py = sys.executable
    # the overrides name the runs' folder: runs made with other settings are never taken for these
    ckpt = out / "runs" / f"{arm}_{args.encoder}{_all_settings(args)}" / f"s{seed}"
    runs = ckpt / "runs"
    common = [f"data_dir={folder}", f"checkpoint_dir={ckpt}", f"seed={seed}", "device=cpu", "progress=false"]
    if not (runs / "stage1" / "mapping_metrics.json").is_file():
        run([py, "-m", "villa.stage1", "experiment=stage1", *common, f"run_dir={runs / 'stage1'}",
             *args.stage1_overrides.split()], log)  # fmt: skip
    stage2 = [f"run_dir={runs / 'stage2'}", f"stage_1_ckpt_dir={runs / 'stage1'}"]
    if not (runs / "stage2" / TRAINED).is_file():
        run([py, "-m", "villa.stage2", "experiment=stage2", "resume=true", *common, *stage2, f"epochs={args.stage2_epochs}",
             f"batch_size={args.stage2_batch}", *args.stage2_overrides.split(), *args.villa_overrides.split()],
            log)  # fmt: skip
    for experiment, folder_name, keys in evaluations(runs, clip, arm):
        if not (runs / folder_name / "metrics.json").is_file():
            run([py, "-m", "villa.evaluate", f"experiment={experiment}", *common, *keys], log)
    return runs


def _all_settings(args) -> str:
    """The folder- and file-name suffix of every override group of a run (empty without overrides)."""
    return (
        _settings(args.stage1_overrides)
        + _settings(args.stage2_overrides, "stage2.")
        + _settings(args.villa_overrides, "villa.")
    )


def _settings(overrides: str, group: str = "") -> str:
    """The folder-name suffix of one group of overrides: ``+<group>key=value`` each, sorted (empty without
    overrides; stage-1 overrides have no group mark, as before the other groups existed)."""
    return "".join(f"+{group}{o}" for o in sorted(overrides.split()))


def evaluations(runs: Path, clip: Path, arm: str) -> list[tuple[str, str, list[str]]]:
    """(experiment, run folder name, keys) of every evaluation of an arm: the three models, and on the table arm
    the three again with images scored by their whole-image embedding (folders ``<experiment>_whole``)."""
    models = {
        "stage2": [f"stage_1_ckpt_dir={runs / 'stage1'}", f"eval_checkpoint={runs / 'stage2' / 'best.pkl'}"],
        "clip": [f"eval_checkpoint={clip}"],
        "untrained": [],
    }
    scores = IMAGE_SCORES if arm == "table" else ("regions",)
    return [
        (experiment, experiment + FOLDER_SUFFIX[score],
         [f"run_dir={runs / (experiment + FOLDER_SUFFIX[score])}", *keys, f"image_score={score}"])
        for score in scores
        for experiment, keys in models.items()
    ]  # fmt: skip


def collect(out: Path, runs: dict[tuple[str, int], Path]) -> pd.DataFrame:
    rows = []
    for (arm, seed), folder in sorted(runs.items()):
        for score in IMAGE_SCORES if arm == "table" else ("regions",):
            for model, experiment in zip(MODELS, ("stage2", "clip", "untrained")):
                metrics = json.loads(
                    (folder / (experiment + FOLDER_SUFFIX[score]) / "metrics.json").read_text()
                )
                rows.append(_row(arm, seed, model, metrics))
    return pd.DataFrame(rows)


def _row(arm: str, seed: int, model: str, metrics: dict) -> dict:
    detection = metrics.get("detection") or {}
    mapping = metrics.get("mapping") or {}
    row = {"arm": arm, "seed": seed, "model": model, "image_score": metrics.get("image_score"),
           "candidates": detection.get("candidates")}  # fmt: skip
    for key in METRICS[:3]:
        row[key] = metrics.get(key)
    row["detection_ap"] = detection.get("ap")
    row["detection_ap50"] = detection.get("ap50")
    row["mapping_f1_val"] = (mapping.get("val") or {}).get("f1")
    row["mapping_f1_test"] = (mapping.get("test") or {}).get("f1")
    row["mapping_precision_val"] = (mapping.get("val") or {}).get("precision")
    return row


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    from villa.docmnist.complexity_sweep import t_interval

    rows = []
    keys = ["arm", "image_score"]  # (image_score: None on the arms with region labels)
    for (arm, score, model), group in results.groupby([*keys, "model"], sort=False, dropna=False):
        for metric in METRICS:
            values = group[metric].dropna().astype(float).tolist()
            if values:
                rows.append(
                    {"arm": arm, "image_score": score, "model": model, "metric": metric, **t_interval(values)}
                )
    for (arm, score), group in results.groupby(keys, sort=False, dropna=False):
        villa = group[group.model == "villa"].set_index("seed")
        clip = group[group.model == "clip"].set_index("seed")
        for metric in METRICS[:5]:
            paired = (villa[metric] - clip[metric]).dropna().astype(float).tolist()
            if paired:
                rows.append(
                    {"arm": arm, "image_score": score, "model": "villa - clip", "metric": metric,
                     **t_interval(paired)}
                )  # fmt: skip
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--seeds", default="23,24,25")
    parser.add_argument("--encoder", default="default")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--stage2_epochs", type=int, default=12)
    parser.add_argument("--stage2_batch", type=int, default=64)
    parser.add_argument(
        "--prepare_only", action="store_true", help="make the data (import, preprocess) and stop"
    )
    parser.add_argument(
        "--stage1_overrides",
        default="",
        help="extra stage-1 keys, space-separated (mapping.epsilon=0.3)",
    )
    parser.add_argument(
        "--stage2_overrides",
        default="",
        help="extra stage-2 keys of ViLLA and CLIP, space-separated (activation_checkpointing=true)",
    )
    parser.add_argument(
        "--villa_overrides",
        default="",
        help="extra stage-2 keys of ViLLA only, space-separated (whole_image_pairs=separate)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each command")
    args = parser.parse_args()
    global THREADS
    THREADS = args.threads
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        sys.exit(f"error: unknown arms {unknown}: use {', '.join(ARMS)}")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    data = prepare(out, args.images, args.encoder, arms, log)
    if args.prepare_only:
        return
    runs = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        clip = train_clip(out, data[arms[0]], seed, args, log)
        for arm in arms:
            runs[(arm, seed)] = train_and_evaluate(out, arm, data[arm], seed, clip, args, log)
    results = collect(out, runs)
    results.insert(0, "encoder", args.encoder)
    summary = summarise(results)
    summary.insert(0, "encoder", args.encoder)
    name = f"{args.encoder}{_all_settings(args)}"  # runs with other overrides into one --out keep their own files
    results.to_csv(out / f"results_{name}.csv", index=False)
    summary.to_csv(out / f"summary_{name}.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_rows", 200):
        print(summary.round(2).to_string(index=False))


if __name__ == "__main__":
    main()
