"""Fixtures shared across test modules."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch


def pytest_configure(config):
    """The suite runs torch on one CPU thread, in this process and in the processes tests start
    (``OMP_NUM_THREADS``). Many tests compare two runs bit for bit, some across processes, and multi-threaded
    CPU kernels are not bitwise reproducible on a loaded machine, nor across thread counts: two identical
    stage-2 runs differed in the last bits of the weights in 2 of 10 tries at 2 threads, 0 of 14 at 1."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Undo a test that changed the thread count (see :func:`pytest_configure`)."""
    yield
    torch.set_num_threads(1)


def synthetic_digit_pools(seed: int = 0, per_label: int = 3) -> dict:
    """Tiny stand-in for MNIST: blurred random strokes, ``per_label`` digits per label, for every split."""
    rng = np.random.default_rng(seed)
    images = np.zeros((10 * per_label, 28, 28), dtype=np.uint8)
    for i in range(len(images)):
        rows, cols = rng.integers(6, 22, size=(2, 12))
        for r, c in zip(rows, cols):
            images[i, r - 2 : r + 3, c - 2 : c + 3] = rng.integers(100, 256)
    labels = np.repeat(np.arange(10), per_label)
    return {split: (images, labels) for split in ("train", "val", "test")}


@pytest.fixture(scope="session")
def tiny_docmnist(tmp_path_factory):
    """A real (generator + default-encoder preprocessing) DocMNIST dataset: 32 train, 12 val, 12 test images.

    Even split sizes let a 2-process torchrun see exactly the batches of a single process.
    """
    from villa.docmnist.generate import generate_docmnist
    from villa.features.preprocess import preprocess_dataset

    root = tmp_path_factory.mktemp("tiny_docmnist")
    result = generate_docmnist(
        attribute_budget=240,
        target_sample_complexity=8,
        seed=3,
        val_attribute_budget=90,
        test_attribute_budget=90,
        data_root=root,
        digit_pools=synthetic_digit_pools(),
        progress=False,
    )
    preprocess_dataset(result.dataset_dir, encoder="default", device="cpu", progress=False)
    return result.dataset_dir


@pytest.fixture
def two_nodes():
    """Launch a command as two single-process torchrun "nodes" on localhost (``--nnodes=2``: both have
    LOCAL_RANK 0, global ranks 0 and 1), each in its own working directory.

    ``launch(args, cwds, timeout=..., node_env=[{...}, {...}])`` runs ``python -m torch.distributed.run
    <rendezvous flags> *args`` for node 0 and node 1 concurrently (``node_env``: extra variables per node)
    and returns ``[(returncode, stdout, stderr, seconds), ...]`` by node rank, ``seconds`` being each
    node's wall time from the common start. A node still running at ``timeout`` is stopped (its return
    code and seconds are then None): a hang fails the test, never blocks it.
    """
    import os
    import signal
    import socket
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]

    def launch(args, cwds, timeout=300, node_env=None):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        environ = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
        }
        node_env = node_env or [{}, {}]
        rendezvous = ["--nnodes=2", "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}"]
        # files, not pipes: a full pipe would block a process that nobody reads while we poll
        logs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in cwds]
        started = time.monotonic()
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--node_rank={rank}", *args],
                cwd=cwd,
                env={**environ, **node_env[rank]},
                stdout=logs[rank][0],
                stderr=logs[rank][1],
                text=True,
                start_new_session=True,
            )
            for rank, cwd in enumerate(cwds)
        ]
        ended = [None, None]
        while any(e is None for e in ended) and time.monotonic() - started < timeout:
            for i, proc in enumerate(procs):
                if ended[i] is None and proc.poll() is not None:
                    ended[i] = time.monotonic() - started
            time.sleep(0.1)
        results = []
        for i, proc in enumerate(procs):
            if ended[i] is None:
                # torchrun starts its workers in sessions of their own; on SIGTERM it stops them first
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            out, err = (log.seek(0) or log.read() for log in logs[i])
            results.append((None if ended[i] is None else proc.returncode, out, err, ended[i]))
        return results

    return launch
