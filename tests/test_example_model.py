"""The example model shipped in villa/example_model: small, loadable offline, used by the notebook and the README's
"Use a trained model" commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "villa" / "example_model"


def test_example_model_is_small_and_complete():
    from villa.inference.model_folder import read_config

    size = sum(p.stat().st_size for p in EXAMPLE.iterdir())
    assert size <= 10 * 2**20, f"{size / 2**20:.1f} MB"
    config = read_config(EXAMPLE)  # format, version, every file's size and sha256
    assert config["source"]["pairs"] == "villa" and config["vocabulary"] == "attributes.yaml"
    card = (EXAMPLE / "MODEL_CARD.md").read_text()
    assert (
        "benchmarks/make_example_model.py" in card
        and "## Metrics" in card
        and "text_to_region_r_precision" in card
    )


def test_notebook_runs_headless(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("VILLA_MODEL", raising=False)
    notebook = nbformat.read(REPO / "notebooks" / "use_a_trained_model.ipynb", as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})  # fmt: skip
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if {"image/png", "image/jpeg"} & set(o.get("data", {}))]
    assert len(images) == 3  # the new image (a JPEG), the drawn predictions and the heatmap (PNGs)
    assert sum("image/png" in o["data"] for o in images) == 2
    table = next(o["data"]["text/plain"] for o in outputs if "text/html" in o.get("data", {}))
    for column in ("box", "query", "score", "cosine"):
        assert column in table
    assert "a half moon" in table


@pytest.mark.slow
def test_readme_commands_draw_a_png(tmp_path):
    """The README's "Use a trained model" lines, as a user types them (in a fresh process, from the repo root)."""
    from villa.datasets.shapes import make_shapes_coco

    make_shapes_coco(tmp_path / "shapes", num_images=2, seed=99, progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    before = sorted(p.name for p in REPO.iterdir())
    done = subprocess.run(
        [sys.executable, "-m", "villa.predict", "model=villa/example_model", f"images={tmp_path}/shapes/images/*.jpg",
         'queries=["a star","a half moon"]', f"out={tmp_path / 'predictions'}", "top_k=1", "progress=false"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in REPO.iterdir()) == before  # Hydra wrote nothing next to the command
    data = json.loads((tmp_path / "predictions" / "predictions.json").read_text())
    assert len(data["images"]) == 2 and len(data["annotations"]) == 4
    assert all((tmp_path / "predictions" / i["drawn"]).is_file() for i in data["images"])
