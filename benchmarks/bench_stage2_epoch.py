"""Stage-2 epoch time on the CPU: this tree's code against the baseline commit, in one run, on the same data.

    python benchmarks/bench_stage2_epoch.py --data-dir DIR --stage-1-ckpt-dir DIR [--batch-size 64]
        [--repeats 3] [--threads 0] [--baseline-rev 7dcfd81] [--profile] [--eval-split test] [--amp true]

One *epoch* is what ``python -m villa.stage2`` does for an epoch: :func:`villa.vlm.run.run_stage2` with
``epochs=1`` (training pass over every train image, then the validation pass), timed by the training loop's
own ``seconds`` column (data set-up and checkpoint writing excluded); the short eval is
:func:`villa.evaluation.run.evaluate_model` of the resulting ``best.pkl`` on ``--eval-split``. Both code
paths run with the same seed, data, batch size and thread count, so the train/val losses and the retrieval
metrics must agree to float tolerance: the script prints the differences and exits 1 when they do not.

**How the baseline runs.** Each measurement runs in a fresh worker process (this file with ``--worker``):
``current`` imports ``villa`` from a copy of this tree's package taken at the start (uncommitted changes
included), ``baseline`` from ``git archive <baseline-rev> villa`` unpacked into a temporary folder
(``<baseline-rev>`` resolved to its commit once at the start; default ``7dcfd81``, a tree whose region head runs torchvision's RoIAlign on 14x14 crops), so the baseline is that
commit's code doing its real work its real way (same batch size, schedule, data and seed), not a copy or a
flag. Separate processes are
needed because one of the levers (``villa.engine.device.keep_cpu_memory``) is a process-wide allocator setting that
would otherwise speed the baseline up too; the parent only starts the workers, alternating baseline/current
``--repeats`` times, and records the load (``uptime``) around each. Both workers get the same ``--threads``
(0: torch's default, one per core) and the same environment (``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY``:
printed), so set those in front of the command to compare thread settings.

**Agreement.** The losses after the epoch must agree to ``1e-3`` relative (``RESULT_TOL``) and the short
eval's R-Precision / AUROC to ``0.5`` points (``EVAL_TOL``); the float32 sums run in a different order, so
bit-equality is not expected (measured: ~2e-6 on the losses, <= 0.01 points on R-Precision). When one side
runs in bf16 and the other in float32 (``--amp true``, the default, against a tree without CPU amp, on a CPU
with native bf16), the tolerances are ``2e-2`` relative (``BF16_RESULT_TOL``) and ``3`` points
(``BF16_EVAL_TOL``); each worker prints its precision and its peak RSS.

``--profile`` adds, in the first baseline/current pair's workers after the timed epoch (so it never slows a
timed epoch), (1) a section table: forward and
forward+backward time of each part of the model as that code path's ``forward()`` runs it, on one real
batch (stem, layer1-3, then for the baseline torchvision RoIAlign and layer4 on the 14x14 crops, for the
current tree layer4's 1x1 convolutions on the maps + RoIAlign as matrices and the rest of layer4; attention
pool, loss), the optimiser step, the image batch assembly (``__getitems__``: decoded-image gather, boxes,
precomputed text embeddings: stage 2 has no text tower in its step) and its uint8 -> float scaling, and a
full training step; (2) torch.profiler's top
operators over ``--profile-steps`` training steps, with their share of the profiled time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _trees import REPO, baseline_tree, current_tree, rev_parse, worker_env

RESULT_KEYS = ("train_loss", "val_loss")
RESULT_TOL = 1e-3  # relative, on the losses after the epoch
EVAL_TOL = 0.5  # points, on R-Precision and AUROC (percent)
# when one side runs in bf16 and the other in float32 (amp on a CPU with native bf16 against a tree without CPU amp)
BF16_RESULT_TOL = 2e-2
BF16_EVAL_TOL = 3.0
EVAL_KEYS = ("text_to_region_r_precision", "region_to_text_r_precision", "zero_shot_auroc")


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


# --------------------------------------------------------------------------- worker (one code path)
def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (and first-touch of this shape's memory)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def profile_sections(train_set, enc, batch_size: int, repeats: int, steps: int) -> dict:
    """Section timings on one real batch and torch.profiler's top operators over ``steps`` steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import villa.encoders.clip_resnet as cr
    from villa.vlm.loss import symmetric_info_nce
    from villa.vlm.run import DEFAULT_OPTIMIZER, RegionTextLoss

    torch.manual_seed(23)
    model = enc.build_image_model().train()
    v = model.visual
    optimizer = DEFAULT_OPTIMIZER([p for p in model.parameters() if p.requires_grad])
    loss_fn = RegionTextLoss()
    gen = torch.Generator().manual_seed(0)
    index = torch.randperm(len(train_set), generator=gen)[:batch_size].tolist()
    batch = train_set.__getitems__(index)
    images = batch["images"].float().div_(255)
    boxes = batch["boxes"]
    width = images.shape[-1]
    cl = torch.channels_last
    fast = hasattr(
        model, "_fast_crops"
    )  # this tree's forward(); the baseline's is torchvision RoIAlign + layer4
    with torch.no_grad():
        stem = v.stem(images.contiguous(memory_format=cl))
        l1 = v.layer1(stem)
        l2 = v.layer2(l1)
        l3 = v.layer3(l2)
        if fast:
            crops = model._fast_crops(l3, boxes, width)
            l4 = model._fast_layer4(*crops)
        else:
            rois = model.region_features(l3, boxes, width)
            l4 = v.layer4(rois.contiguous(memory_format=cl))
        emb = cr.attention_pool_first_token(v.attnpool, l4)

    def outputs(out):
        return out if isinstance(out, tuple) else (out,)

    def fwd(fn, xs):
        with torch.no_grad():
            fn(*xs)

    def fwd_bwd(fn, xs, needs_grad):
        xs = [x.detach().requires_grad_(needs_grad) for x in xs]
        out = outputs(fn(*xs))
        torch.autograd.backward(out, [torch.ones_like(o) for o in out])

    sections = [
        ("stem", lambda x: v.stem(x.contiguous(memory_format=cl)), (images,), False),
        ("layer1", v.layer1, (stem,), True),
        ("layer2", v.layer2, (l1,), True),
        ("layer3", v.layer3, (l2,), True),
    ]
    if fast:
        sections += [
            (
                "layer4[0] 1x1 convs on the maps + RoIAlign as matrices (bmm)",
                lambda f: model._fast_crops(f, boxes, width),
                (l3,),
                True,
            ),
            ("rest of layer4 on the 14x14 crops", model._fast_layer4, crops, True),
        ]
    else:
        sections += [
            ("RoIAlign (torchvision) 14x14", lambda f: model.region_features(f, boxes, width), (l3,), True),
            ("layer4 on the 14x14 crops", lambda r: v.layer4(r.contiguous(memory_format=cl)), (rois,), True),
        ]
    sections += [
        ("attention pool", lambda x: cr.attention_pool_first_token(v.attnpool, x), (l4,), True),
        ("loss", lambda e: symmetric_info_nce(e, batch["text"]), (emb,), True),
    ]
    rows = [
        (
            "image batch assembly (__getitems__)",
            _median_ms(lambda: train_set.__getitems__(index), repeats),
            None,
        ),
        ("uint8 -> float [0, 1]", _median_ms(lambda: batch["images"].float().div_(255), repeats), None),
    ]
    for name, fn, xs, grad in sections:
        forward_ms = _median_ms(lambda fn=fn, xs=xs: fwd(fn, xs), repeats)
        both_ms = _median_ms(lambda fn=fn, xs=xs, grad=grad: fwd_bwd(fn, xs, grad), repeats)
        rows.append((name, forward_ms, both_ms))

    def step():
        loss, _ = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def forward_backward():
        loss, _ = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()

    rows.append(("full forward + backward", None, _median_ms(forward_backward, repeats)))
    forward_backward()
    rows.append(("optimizer step (Adam)", None, _median_ms(optimizer.step, repeats)))
    full = _median_ms(step, repeats)
    rows.append(("full training step", None, full))

    loader = torch.utils.data.DataLoader(
        train_set, batch_size=batch_size, shuffle=True, generator=gen, collate_fn=lambda b: b
    )
    batches = iter(loader)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            batch = next(batches)
            step()
        profiled_s = time.perf_counter() - t0
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    top = [
        (e.key, e.self_cpu_time_total / 1e6, 100 * e.self_cpu_time_total / total, e.count)
        for e in events[:25]
    ]
    return {
        "pairs_in_batch": len(boxes),
        "sections": rows,
        "full_step_ms": full,
        "profiler_top": top,
        "profiled_steps": steps,
        "profiled_s": profiled_s,
    }


def worker(args) -> None:
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    import villa
    from villa.evaluation.run import evaluate_model
    from villa.vlm.run import run_stage2

    try:
        from villa.engine.device import amp_dtype

        precision = str(amp_dtype(torch.device("cpu")) if args.amp else None)
    except ImportError:
        precision = "None"
    out = {
        "label": args.label,
        "villa_file": villa.__file__,
        "threads": torch.get_num_threads(),
        "precision": "float32" if precision == "None" else precision.replace("torch.", ""),
        "load_before": uptime(),
    }
    with tempfile.TemporaryDirectory(prefix="bench_stage2_epoch_") as tmp:
        t0 = time.perf_counter()
        result = run_stage2(
            data_dir=args.data_dir,
            run_dir=Path(tmp) / "run",
            stage_1_ckpt_dir=args.stage_1_ckpt_dir,
            device="cpu",
            epochs=1,
            batch_size=args.batch_size,
            amp=args.amp,
            progress=False,
        )
        out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        out["run_stage2_s"] = time.perf_counter() - t0
        row = result.history[0]
        out.update(epoch_s=row["seconds"], data_s=row["data_seconds"], **{k: row[k] for k in RESULT_KEYS})
        out["load_after_epoch"] = uptime()
        if args.eval_split:
            t0 = time.perf_counter()
            metrics = evaluate_model(
                data_dir=args.data_dir,
                checkpoint=result.best_checkpoint,
                split=args.eval_split,
                device="cpu",
                amp=args.amp,
                progress=False,
            )
            out["eval_s"] = time.perf_counter() - t0
            out["eval"] = {k: metrics[k] for k in EVAL_KEYS if k in metrics}
    if args.profile:
        from villa.encoders import get_encoder
        from villa.vlm.run import build_stage2_datasets

        try:
            from villa.datasets.images import ResizePolicy
        except ImportError:  # a baseline tree from before villa/datasets/images.py
            from villa.images import ResizePolicy

        enc = get_encoder("default", device="cpu")
        train_set, _ = build_stage2_datasets(
            args.data_dir, enc.name, "villa", args.stage_1_ckpt_dir, False, ResizePolicy.of(enc)
        )
        out["profile"] = profile_sections(
            train_set, enc, args.batch_size, args.profile_repeats, args.profile_steps
        )
    Path(args.out).write_text(json.dumps(out))


# --------------------------------------------------------------------------- parent
def run_worker(label: str, tree: Path, args, tmp: Path, i: int, profile: bool) -> dict:
    out = tmp / f"{label}_{i}.json"
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker", "--label", label, "--out", str(out),
        "--data-dir", str(args.data_dir), "--stage-1-ckpt-dir", str(args.stage_1_ckpt_dir),
        "--batch-size", str(args.batch_size), "--threads", str(args.threads),
        "--eval-split", args.eval_split, "--profile-steps", str(args.profile_steps),
        "--profile-repeats", str(args.profile_repeats), "--amp", str(args.amp).lower(),
    ]  # fmt: skip
    if profile:
        cmd.append("--profile")
    subprocess.run(cmd, env=worker_env(tree), check=True, cwd=tmp)
    result = json.loads(out.read_text())
    print(
        f"  {label:8s} epoch {result['epoch_s']:7.1f} s  (data {result['data_s']:.1f} s)  "
        f"train_loss {result['train_loss']:.6f}  val_loss {result['val_loss']:.6f}  "
        + (
            f"eval t->r {result['eval'].get('text_to_region_r_precision', float('nan')):.2f}  "
            if "eval" in result
            else ""
        )
        + f"threads {result['threads']}  {result['precision']}  peak RSS {result['peak_rss_gb']:.2f} GB"
        f"  [{result['villa_file']}]\n"
        f"           before: {result['load_before']}\n"
        f"           after:  {result['load_after_epoch']}",
        flush=True,
    )
    return result


def print_profile(label: str, prof: dict) -> None:
    full = prof["full_step_ms"]
    print(
        f"\n### {label}: sections on one batch ({prof['pairs_in_batch']} pairs), median ms, % of a full step"
    )
    print("| section | forward ms | forward+backward ms | % of step |")
    print("|---|---|---|---|")
    for name, f, fb in prof["sections"]:
        share = fb if fb is not None else f
        print(
            f"| {name} | {'' if f is None else f'{f:.1f}'} | {'' if fb is None else f'{fb:.1f}'} | "
            f"{100 * share / full:.0f}% |"
        )
    print(
        f"\n{label}: torch.profiler over {prof['profiled_steps']} training steps ({prof['profiled_s']:.1f} s), "
        "top operators by self time"
    )
    print("| operator | self s | % | calls |")
    print("|---|---|---|---|")
    for name, secs, pct, count in prof["profiler_top"]:
        print(f"| `{name[:60]}` | {secs:.2f} | {pct:.1f}% | {count} |")


def tolerances(base: dict, cur: dict) -> tuple[float, float]:
    """(relative loss tolerance, metric tolerance in points) for two runs: wider when their precisions differ."""
    if base.get("precision", "float32") != cur.get("precision", "float32"):
        return BF16_RESULT_TOL, BF16_EVAL_TOL
    return RESULT_TOL, EVAL_TOL


def compare(base: dict, cur: dict) -> list[str]:
    problems = []
    result_tol, eval_tol = tolerances(base, cur)
    for key in RESULT_KEYS:
        diff = abs(base[key] - cur[key])
        print(f"  {key}: baseline {base[key]:.6f}  current {cur[key]:.6f}  |diff| {diff:.2e}")
        if diff > result_tol * max(1.0, abs(base[key])):
            problems.append(f"{key} differs by {diff:.2e}")
    for key in EVAL_KEYS:
        if key in base.get("eval", {}) and key in cur.get("eval", {}):
            b, c = base["eval"][key], cur["eval"][key]
            print(f"  {key}: baseline {b:.2f}  current {c:.2f}  |diff| {abs(b - c):.2f}")
            if abs(b - c) > eval_tol:
                problems.append(f"{key} differs by {abs(b - c):.2f} points")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--stage-1-ckpt-dir", required=True)
    parser.add_argument("--batch-size", type=int, default=64, help="the sweep's stage-2 batch (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="baseline/current pairs, alternating")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads in each worker; 0: torch's default"
    )
    parser.add_argument(
        "--baseline-rev",
        default="7dcfd81",
        help="git revision of the baseline (default 7dcfd81: a tree whose region head runs torchvision's RoIAlign on 14x14 crops)",
    )
    parser.add_argument("--eval-split", default="test", help="split of the short eval; '' skips it")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-steps", type=int, default=4)
    parser.add_argument("--profile-repeats", type=int, default=3)
    parser.add_argument("--only", choices=("baseline", "current"), help="run one side only")
    parser.add_argument(
        "--amp", type=lambda v: v.lower() in ("1", "true", "yes"), default=True,
        help="run_stage2's and the eval's amp on both sides (default true; a tree without CPU amp runs float32)",
    )  # fmt: skip
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--label", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    args.data_dir = Path(args.data_dir).resolve()
    args.stage_1_ckpt_dir = Path(args.stage_1_ckpt_dir).resolve()

    args.baseline_rev = rev_parse(args.baseline_rev)
    env_threads = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")}
    print(f"stage-2 epoch, batch {args.batch_size}, data {args.data_dir}, stage 1 {args.stage_1_ckpt_dir}")
    print(
        f"baseline = git {args.baseline_rev}; current = copy of {REPO} (git {_head()}); threads {args.threads or 'default'}; env {env_threads}"
    )
    print(f"start: {uptime()}", flush=True)
    results: dict[str, list[dict]] = {"baseline": [], "current": []}
    with tempfile.TemporaryDirectory(prefix="bench_stage2_epoch_") as tmp:
        tmp = Path(tmp)
        trees = {
            "baseline": baseline_tree(args.baseline_rev, Path(tempfile.mkdtemp(dir=tmp))),
            "current": current_tree(Path(tempfile.mkdtemp(dir=tmp))),
        }
        for i in range(args.repeats):
            for label in ("baseline", "current"):
                if args.only in (None, label):
                    results[label].append(
                        run_worker(label, trees[label], args, tmp, i, args.profile and i == 0)
                    )
    print(f"end: {uptime()}")

    if args.profile:
        for label, runs in results.items():
            if runs:
                print_profile(label, runs[0]["profile"])
    if not (results["baseline"] and results["current"]):
        return
    base = statistics.median(r["epoch_s"] for r in results["baseline"])
    cur = statistics.median(r["epoch_s"] for r in results["current"])
    pairs = [b["epoch_s"] / c["epoch_s"] for b, c in zip(results["baseline"], results["current"])]
    print(f"\n| batch {args.batch_size} | baseline ({args.baseline_rev[:7]}) | current | ratio |")
    print("|---|---|---|---|")
    for label in ("baseline", "current"):
        times = ", ".join(f"{r['epoch_s']:.1f}" for r in results[label])
        cells = f"{times} | " if label == "baseline" else f" | {times}"
        print(f"| {label} epochs (s, in run order) | {cells} | |")
    print(f"| epoch seconds (median of {args.repeats}) | {base:.1f} | {cur:.1f} | **{base / cur:.2f}x** |")
    print(
        f"| per-pair ratios (min-max {min(pairs):.2f}-{max(pairs):.2f}) | | | {', '.join(f'{p:.2f}x' for p in pairs)} |"
    )
    rss = [statistics.median(r["peak_rss_gb"] for r in results[k]) for k in ("baseline", "current")]
    print(f"| peak RSS of the worker (GB, median) | {rss[0]:.2f} | {rss[1]:.2f} | {rss[1] / rss[0]:.2f}x |")
    print("| precision | " + " | ".join(results[k][0]["precision"] for k in ("baseline", "current")) + " | |")
    result_tol, eval_tol = tolerances(results["baseline"][0], results["current"][0])
    print(
        f"agreement (first pair; tolerance {result_tol:g} relative on losses, {eval_tol} points on metrics):"
    )
    problems = compare(results["baseline"][0], results["current"][0])
    for label, runs in results.items():  # every repeat of one side must reproduce its first run
        spread = max((abs(r[k] - runs[0][k]) for r in runs[1:] for k in RESULT_KEYS), default=0.0)
        print(f"  {label}: largest loss difference between its repeats {spread:.2e}")
        if spread > RESULT_TOL * max(1.0, *(abs(runs[0][k]) for k in RESULT_KEYS)):
            problems.append(f"{label} repeats differ by {spread:.2e}")
    if problems:
        print("RESULTS DIFFER: " + "; ".join(problems))
        sys.exit(1)
    print("results agree")


def _head() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip() + (" + uncommitted changes" if _dirty() else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _dirty() -> bool:
    return bool(
        subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "villa"], capture_output=True, text=True
        ).stdout
    )


if __name__ == "__main__":
    main()
