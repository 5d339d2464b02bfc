"""torchrun across nodes: two single-process "nodes" on localhost (``--nnodes=2``; both LOCAL_RANK 0, global
ranks 0 and 1) through preprocessing, stage 1 and stage 2, against one process.

Each node has its own working directory; both write to the same dataset and checkpoint folders, and an
audit hook in node 1's workers records every file it creates, renames or removes there: only global rank 0
may write.
"""

from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

#: loaded by node 1's Python processes (``sitecustomize``): logs writes under VILLA_AUDIT_DIRS by a worker
AUDIT_HOOK = textwrap.dedent(
    """
    import os, sys
    _log, _dirs = os.environ.get("VILLA_AUDIT_LOG"), os.environ.get("VILLA_AUDIT_DIRS", "")
    _dirs = [d for d in _dirs.split(os.pathsep) if d]
    _events = {"os.rename", "os.replace", "os.mkdir", "os.remove", "os.rmdir", "os.symlink", "os.truncate",
               "shutil.rmtree", "shutil.move", "tempfile.mkstemp", "tempfile.mkdtemp", "os.chmod", "os.utime"}
    _busy = []

    def _hook(event, args):
        if _busy or not (event == "open" or event in _events):
            return
        if event == "open":
            path, mode, flags = (list(args) + [None, None])[:3]
            writes = any(c in (mode or "") for c in "wax+") or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            )
            paths = [path] if writes else []
        else:
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        for path in paths:
            if isinstance(path, int):
                continue
            full = os.path.abspath(os.fsdecode(path))
            if event == "os.mkdir" and os.path.isdir(full):  # exist_ok=True on an existing folder
                continue
            if any(full == d or full.startswith(d + os.sep) for d in _dirs):
                _busy.append(1)
                try:
                    with open(_log, "a") as out:
                        out.write(f"rank {os.environ.get('RANK')} {event} {full}\\n")
                finally:
                    _busy.pop()

    if _log and "RANK" in os.environ:  # workers only, not torchrun's agent
        sys.addaudithook(_hook)
    """
)


def run_one_process(overrides: list[str]) -> None:
    """The same stage in this process (no torchrun): the reference the two nodes must match."""
    from villa.engine.hydra_app import compose
    from villa.mapping.run import run_stage1_from_config
    from villa.vlm.run import run_stage2_from_config

    cfg = compose(overrides)
    (run_stage1_from_config if cfg.stage == "stage1" else run_stage2_from_config)(cfg)


def check_ran(results) -> None:
    for code, out, err, _ in results:
        assert code == 0, out[-3000:] + err[-3000:]


def losses(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "metrics.csv")[["train_loss", "val_loss"]]


def visible_files(folder: Path) -> list[str]:
    found = (p.relative_to(folder) for p in folder.rglob("*"))
    return sorted(str(p) for p in found if not any(part.startswith(".") for part in p.parts))


def test_two_nodes_match_one_process_and_only_rank_0_writes(tiny_docmnist, tmp_path, two_nodes):
    dataset = tmp_path / "dataset"  # the fixture's dataset without its embeddings
    shutil.copytree(
        tiny_docmnist, dataset, ignore=shutil.ignore_patterns("region_embs", "text_embs", "attr_embs.pth")
    )
    ckpt = tmp_path / "ckpt"
    cwds = [tmp_path / "node0", tmp_path / "node1"]
    for cwd in cwds:
        cwd.mkdir()
    audit_dir, audit_log = tmp_path / "audit", tmp_path / "node1_writes.log"
    audit_dir.mkdir()
    (audit_dir / "sitecustomize.py").write_text(AUDIT_HOOK)
    node1 = {
        "PYTHONPATH": os.pathsep.join([str(audit_dir), str(REPO), os.environ.get("PYTHONPATH", "")]),
        "VILLA_AUDIT_LOG": str(audit_log),
        "VILLA_AUDIT_DIRS": os.pathsep.join(str(p) for p in (dataset, ckpt, cwds[1])),
    }
    launch = lambda args: two_nodes(args, cwds, timeout=300, node_env=[{}, node1])  # noqa: E731
    # amp=false: bf16 rounds differently when the batch is split across processes; this test checks the split
    common = ["device=cpu", "amp=false", "progress=false", f"data_dir={dataset}"]

    # preprocessing: rank 1 embeds its shard, rank 0 gathers and writes
    check_ran(
        launch(
            [
                str(REPO / "preprocess" / "preprocess_docmnist.py"),
                f"--data_dir={dataset}",
                "--device=cpu",
                "--no_progress",
            ]
        )
    )
    one = np.concatenate([np.load(p) for p in sorted((tiny_docmnist / "region_embs").glob("shard_*.npy"))])
    two = np.concatenate([np.load(p) for p in sorted((dataset / "region_embs").glob("shard_*.npy"))])
    order = lambda d: pd.read_feather(d / "region_embs" / "region_emb_mapping.feather")  # noqa: E731
    rows = lambda m: np.concatenate([np.arange(s, s + n) for s, n in zip(m["start"], m["num_regions"])])  # noqa: E731
    m1, m2 = (
        order(tiny_docmnist).set_index("image_id"),
        order(dataset).set_index("image_id").loc[order(tiny_docmnist)["image_id"]],
    )
    np.testing.assert_allclose(two[rows(m2)], one[rows(m1)], rtol=1e-4, atol=1e-5)
    attr1, attr2 = torch.load(tiny_docmnist / "attr_embs.pth"), torch.load(dataset / "attr_embs.pth")
    assert attr1.keys() == attr2.keys() and all(torch.allclose(attr1[k], attr2[k], atol=1e-6) for k in attr1)

    # stage 1: 2 ranks x batch 4 = one process at batch 8
    stage1 = ["-m", "villa.stage1", "experiment=docmnist_stage1", "epochs=2", *common]
    check_ran(launch([*stage1, f"checkpoint_dir={ckpt}", "batch_size=4"]))
    run_one_process([*stage1[2:], f"checkpoint_dir={tmp_path / 'one'}", "batch_size=8"])
    one_dir, two_dir = tmp_path / "one" / "docmnist_stage1", ckpt / "docmnist_stage1"
    pd.testing.assert_frame_equal(losses(one_dir), losses(two_dir), rtol=1e-4)
    for split in ("train", "val", "test"):
        a = pd.read_feather(one_dir / f"mapping_{split}.feather")
        b = pd.read_feather(two_dir / f"mapping_{split}.feather")
        assert a["assigned_text"].map(list).tolist() == b["assigned_text"].map(list).tolist()

    # stage 2 on the two-node stage-1 mapping (identical to the one-process mapping, checked above)
    stage2 = [
        "-m",
        "villa.stage2",
        "experiment=docmnist_stage2",
        "epochs=1",
        f"stage_1_ckpt_dir={two_dir}",
        *common,
    ]
    check_ran(launch([*stage2, f"checkpoint_dir={ckpt}", "batch_size=4"]))
    run_one_process([*stage2[2:], f"checkpoint_dir={tmp_path / 'one'}", "batch_size=8"])
    # BatchNorm statistics are per rank on CPU (SyncBatchNorm needs CUDA): looser, as for --nproc_per_node=2
    pd.testing.assert_frame_equal(
        losses(tmp_path / "one" / "docmnist_stage2"), losses(ckpt / "docmnist_stage2"), rtol=2e-2
    )

    writes = audit_log.read_text().splitlines() if audit_log.exists() else []
    assert writes == [], "global rank 1 wrote:\n" + "\n".join(writes[:20])
    assert list(cwds[1].iterdir()) == [], "nothing in node 1's working directory"
    for stage in ("docmnist_stage1", "docmnist_stage2"):
        # the reference ran without Hydra's job (no log file, no .hydra/); rank 0 kept Hydra's outputs
        assert visible_files(ckpt / stage) == sorted(
            [*visible_files(tmp_path / "one" / stage), f"{stage}.log"]
        )
        assert (ckpt / stage / ".hydra" / "config.yaml").is_file()
