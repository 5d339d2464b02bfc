"""A failure on one rank of a torchrun job ends every rank within seconds, with one error line, no traceback.

Two single-process "nodes" on localhost, each in its own working directory, so that a relative path
resolves on one node only: the real way one rank fails while the other goes on. torchrun's agent only
stops the workers of its own node, so before villa's failure propagation the surviving node waited in
``init_process_group`` (gloo's default timeout: 30 minutes) or died with a broken-collective traceback.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

#: how much later than the failing node the other one may end (before: 30 minutes or a traceback)
MAX_LAG_S = 15


def worker_tracebacks(stderr: str) -> list[str]:
    """Lines of a traceback raised in a worker: villa frames, Hydra's job error, broken collectives.
    (torchrun's agent prints a traceback of its own ChildFailedError on every failed run; not ours.)"""
    pattern = re.compile(r'File ".*villa/|Error executing job|Connection closed by peer|^\[rank\d+\]:')
    return [line for line in stderr.splitlines() if pattern.search(line)]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def check_one_failure(results, failing: int, cause: str) -> None:
    (code0, _, err0, end0), (code1, _, err1, end1) = results
    codes, ends, errs = [code0, code1], [end0, end1], [err0, err1]
    print(f"exit codes {codes}, node end times {ends} s")
    assert None not in ends, (
        f"a node was still running at the timeout: {ends}\n{err0[-2000:]}\n{err1[-2000:]}"
    )
    assert all(code != 0 for code in codes), codes
    assert abs(end1 - end0) < MAX_LAG_S, f"the other node ended {abs(end1 - end0):.1f}s after the failing one"
    other = 1 - failing
    assert error_lines(errs[failing]) == [f"error: {cause}"], errs[failing][-3000:]
    assert error_lines(errs[other]) == [f"error: rank {failing} (node {failing}) failed: {cause}"], errs[
        other
    ][-3000:]
    for err in errs:
        assert not worker_tracebacks(err), worker_tracebacks(err)


def test_validation_failure_on_one_node_stops_the_waiting_node(tiny_docmnist, tmp_path, two_nodes):
    """Node 1 lacks the dataset (stage 1 refuses it) while rank 0 waits in init_process_group."""
    cwds = [tmp_path / "node0", tmp_path / "node1"]
    for cwd in cwds:
        cwd.mkdir()
    (cwds[0] / "dataset").symlink_to(tiny_docmnist)
    args = [
        "-m", "villa.stage1", "experiment=docmnist_stage1", "data_dir=dataset", f"checkpoint_dir={tmp_path / 'ck'}",
        "epochs=1", "batch_size=4", "device=cpu", "progress=false",
    ]  # fmt: skip
    results = two_nodes(args, cwds, timeout=120)
    cause = "dataset folder not found: 'dataset' (looked in the current directory and "
    # the data root in the message depends on PROJECT_DIR: compare up to it
    err1 = results[1][2]
    line = error_lines(err1)[0] if error_lines(err1) else err1[-3000:]
    assert line.startswith(f"error: {cause}"), line
    check_one_failure(results, failing=1, cause=line[len("error: ") :])
    assert not (tmp_path / "ck" / "docmnist_stage1" / "last.pkl").exists()


def test_failure_after_init_on_one_node_stops_the_other(tiny_docmnist, tmp_path, two_nodes):
    """Preprocessing: rank 1 finds an image of its shard missing after the process group is up, while
    rank 0 embeds its shard and then waits for rank 1's in a collective."""
    cwds = [tmp_path / "node0", tmp_path / "node1"]
    for cwd in cwds:
        cwd.mkdir()
        shutil.copytree(
            tiny_docmnist, cwd / "dataset", ignore=shutil.ignore_patterns("region_embs", "text_embs")
        )
    missing = sorted((cwds[1] / "dataset" / "images").iterdir())[1]  # image 1: rank 1's shard (rows 1::2)
    missing.unlink()
    args = ["preprocess/preprocess_docmnist.py", "--data_dir=dataset", "--device=cpu", "--no_progress"]
    args[0] = str(Path(__file__).resolve().parents[1] / args[0])
    results = two_nodes(args, cwds, timeout=180)
    cause = f"1 images listed in the annotations are missing, e.g. {(cwds[1] / 'dataset').resolve() / 'images' / missing.name}"
    # the message goes on with the command that rebuilds the dataset: compare up to it
    err1 = results[1][2]
    line = error_lines(err1)[0] if error_lines(err1) else err1[-3000:]
    assert line.startswith(f"error: {cause}: rebuild it"), line
    check_one_failure(results, failing=1, cause=line[len("error: ") :])
    assert not (cwds[0] / "dataset" / "region_embs").exists(), "nothing written by the failed job"
