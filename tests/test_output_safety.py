"""A delete or overwrite touches only what villa wrote: importers, generators, preprocessing, training runs and
the sweep refuse, in one line and before any work, to replace or delete a folder or file of the user's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from villa.storage.errors import VillaError


def _jpeg(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, size=(30, 30, 3), dtype=np.uint8)).save(path, quality=85)


def _table(root: Path, images: Path, rows=("a.jpg", "b.jpg")) -> dict[str, Path]:
    """A two-row table, its vocabulary and its images (written under ``images``)."""
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(rows):
        _jpeg(images / name, i)
    (root / "attributes.yaml").write_text("attributes: [cat]\n")
    (root / "pairs.csv").write_text(
        "image,text\n" + "".join(f"{r},a cat number {i}\n" for i, r in enumerate(rows))
    )
    return {"table": root / "pairs.csv", "attributes": root / "attributes.yaml", "images": images}


def _ingest(argv, capsys) -> tuple[int, str]:
    from villa import ingest

    with pytest.raises(SystemExit) as exit_info:
        ingest.main([*argv, "--no_progress"])
    return exit_info.value.code, capsys.readouterr().err.strip()


def _table_argv(paths: dict, out: Path, *extra: str) -> list[str]:
    return ["table", f"--table={paths['table']}", f"--images={paths['images']}",
            f"--attributes={paths['attributes']}", "--regions=grid:2x2", f"--out={out}", *extra]  # fmt: skip


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err


# --------------------------------------------------------------------------- importers: inputs are never replaced
def test_ingest_never_replaces_an_input(tmp_path, capsys):
    """--out equal to, or holding, an input is refused with or without --overwrite (symbolic links seen
    through), and every input is left as it was."""
    paths = _table(tmp_path, tmp_path / "IMG")
    before = _tree(tmp_path)
    (tmp_path / "link").symlink_to(tmp_path / "IMG")
    cases = [
        (tmp_path / "IMG", "is the --images folder"),
        (tmp_path / "link", "is the --images folder"),
        (tmp_path / "IMG" / ".." / "IMG", "is the --images folder"),
        (tmp_path, "contains the --images folder"),
    ]
    for out, message in cases:
        for extra in ((), ("--overwrite",)):
            _one_line(*_ingest(_table_argv(paths, out, *extra), capsys), message)
    # the table's own folder holds the table and the vocabulary
    elsewhere = _table(tmp_path / "t", tmp_path / "imgs2")
    _one_line(*_ingest(_table_argv({**elsewhere, "images": tmp_path / "IMG"}, tmp_path / "t", "--overwrite"), capsys),
              "contains the --table file")  # fmt: skip
    before_after = {k: v for k, v in _tree(tmp_path).items() if not k.startswith(("t/", "imgs2/"))}
    assert before_after == before, "an input changed"


def test_coco_import_never_replaces_its_json_files(tmp_path, capsys):
    import shutil

    from test_datasets import make_coco

    paths = make_coco(tmp_path / "coco")
    shutil.copytree(paths["images"], tmp_path / "imgs")
    before = _tree(tmp_path)
    argv = ["coco", f"--images={paths['images']}", f"--instances={paths['instances']}",
            f"--captions={paths['captions']}", f"--out={tmp_path / 'coco'}", "--overwrite"]  # fmt: skip
    _one_line(*_ingest(argv, capsys), "contains the --images folder")
    argv[1] = f"--images={tmp_path / 'imgs'}"  # the images elsewhere: the JSON files still are inputs
    _one_line(*_ingest(argv, capsys), "contains the --instances file")
    assert _tree(tmp_path) == before


def test_overwrite_replaces_only_a_villa_dataset(tmp_path, capsys):
    """An existing --out: refused without --overwrite; with it, replaced only when it is a villa dataset
    folder (its dataset.json), else refused with the user's files untouched."""
    paths = _table(tmp_path, tmp_path / "imgs")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("\\documentclass{article}")
    _one_line(*_ingest(_table_argv(paths, mine), capsys), "already exists: pass --overwrite")
    _one_line(
        *_ingest(_table_argv(paths, mine, "--overwrite"), capsys),
        "is not a folder villa wrote",
        "dataset.json",
    )
    assert _tree(mine) == {"thesis.tex": b"\\documentclass{article}"}
    (mine / "dataset.json").write_text('{"name": "my own dataset.json"}')  # not the contract's
    _one_line(*_ingest(_table_argv(paths, mine, "--overwrite"), capsys), "is not a folder villa wrote")

    from villa import ingest

    out = tmp_path / "ds"
    ingest.main([*_table_argv(paths, out), "--no_progress"])
    _one_line(*_ingest(_table_argv(paths, out), capsys), "already exists")
    ingest.main([*_table_argv(paths, out, "--overwrite", "--seed=3"), "--no_progress"])  # villa's: replaced
    assert json.loads((out / "dataset.json").read_text())["format"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_an_output_holding_a_referenced_image_is_refused(tmp_path):
    """A villa dataset folder that holds an image the new import reads (by an absolute path) is not replaced."""
    from villa.datasets.table import import_table

    paths = _table(tmp_path, tmp_path / "imgs")
    out = tmp_path / "ds"
    import_table(paths["table"], out, attributes=paths["attributes"], images=paths["images"],
                 regions="grid:2x2", progress=False)  # fmt: skip
    _jpeg(out / "extra.jpg", 5)
    (tmp_path / "pairs.csv").write_text(f"image,text\na.jpg,a cat\n{out / 'extra.jpg'},a cat again\n")
    with pytest.raises(VillaError, match="holds the image .*extra.jpg that this import reads"):
        import_table(paths["table"], out, attributes=paths["attributes"], images=paths["images"],
                     regions="grid:2x2", overwrite=True, progress=False)  # fmt: skip
    assert (out / "extra.jpg").is_file()


# --------------------------------------------------------------------------- --copy_images
def test_copy_images_keeps_every_file_inside_the_dataset(tmp_path):
    """``../`` and absolute image paths are copied below ``out/images``, never next to or above ``out``."""
    from villa.datasets.table import import_table

    images = tmp_path / "a" / "b" / "imgs"
    _jpeg(images / "in.jpg", 0)
    _jpeg(tmp_path / "a" / "up.jpg", 1)
    _jpeg(tmp_path / "abs" / "far.jpg", 2)
    (tmp_path / "attributes.yaml").write_text("attributes: [cat]\n")
    (tmp_path / "pairs.csv").write_text(
        f"image,text\nin.jpg,a cat\n../../up.jpg,one cat\n{tmp_path / 'abs' / 'far.jpg'},two cats\n"
    )
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "x" / "ds"
    result = import_table(tmp_path / "pairs.csv", out, attributes=tmp_path / "attributes.yaml", images=images,
                          regions="grid:2x2", copy_images=True, progress=False)  # fmt: skip
    created = {p for p in tmp_path.rglob("*")} - before
    assert all(p == out.parent or p.is_relative_to(out) for p in created), sorted(created)
    from villa.datasets import Dataset

    dataset = Dataset.open(result.dataset_dir)
    paths = dataset.image_paths(dataset.annotations()["image_filepath"].tolist())
    assert all(p.is_file() and p.resolve().is_relative_to(out.resolve()) for p in paths)
    # where each lands: as given inside the image folder, else at its absolute location below images/
    up, far = (str((tmp_path / p).relative_to("/")) for p in ("a/up.jpg", "abs/far.jpg"))
    assert sorted(str(p.relative_to(out / "images")) for p in paths) == sorted(["in.jpg", up, far])


def test_copy_images_refuses_two_images_on_one_file(tmp_path):
    from villa.datasets.importing import copy_targets

    with pytest.raises(VillaError, match="would both be copied to images/data/x/b.jpg") as info:
        copy_targets(["data/x/b.jpg", "../x/b.jpg"], "/data/img")
    assert "\n" not in str(info.value)
    # one file named twice is one copy, not a collision
    assert copy_targets(["a/../b.jpg", "b.jpg"], "/data/img") == ["b.jpg", "b.jpg"]


# --------------------------------------------------------------------------- generators
def test_shapes_generator_replaces_only_its_own_folder(tmp_path, capsys):
    from villa.datasets import shapes

    mine = tmp_path / "DIR"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    for argv, message in (
        ([], "already exists: pass --overwrite"),
        (["--overwrite"], "is not a folder villa wrote"),
    ):
        with pytest.raises(SystemExit) as info:
            shapes.main([f"--out={mine}", "--images=2", "--no_progress", *argv])
        _one_line(info.value.code, capsys.readouterr().err.strip(), message)
    assert _tree(mine) == {"thesis.tex": b"mine"}

    out = tmp_path / "shapes"
    shapes.make_shapes_coco(out, num_images=2, seed=1, progress=False)
    assert json.loads((out / "shapes.json").read_text())["generator"] == "villa.datasets.shapes"
    with pytest.raises(VillaError, match="already exists"):
        shapes.make_shapes_coco(out, num_images=2, seed=2, progress=False)
    shapes.make_shapes_coco(out, num_images=3, seed=2, progress=False, overwrite=True)
    assert len(json.loads((out / "instances.json").read_text())["images"]) == 3


def test_docmnist_overwrite_replaces_only_a_villa_dataset(tmp_path):
    from conftest import synthetic_digit_pools

    from villa.docmnist.generate import generate_docmnist

    params = dict(attribute_budget=40, target_sample_complexity=4, val_attribute_budget=0, test_attribute_budget=0,
                  digit_pools=synthetic_digit_pools(), progress=False)  # fmt: skip
    made = generate_docmnist(data_root=tmp_path / "a", **params).dataset_dir
    with pytest.raises(VillaError, match="already exists: pass --overwrite"):
        generate_docmnist(data_root=tmp_path / "a", **params)
    generate_docmnist(data_root=tmp_path / "a", overwrite=True, **params)  # its own folder: replaced
    theirs = tmp_path / "b" / made.name
    theirs.mkdir(parents=True)
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(VillaError, match="is not a folder villa wrote"):
        generate_docmnist(data_root=tmp_path / "b", overwrite=True, **params)
    assert _tree(theirs) == {"notes.txt": b"mine"}


# --------------------------------------------------------------------------- other deletes
def test_preprocessing_replaces_only_its_own_folders(tmp_path):
    from villa.features.embeddings import RegionWork, TextEmbeddingCache

    (tmp_path / "text_embs").mkdir()
    (tmp_path / "text_embs" / "mine.txt").write_text("mine")
    with pytest.raises(VillaError, match="text_embs is not .*villa wrote"):
        TextEmbeddingCache.write(tmp_path, "default", ["a"], np.ones((1, 2), np.float32))
    with pytest.raises(VillaError, match="text_embs is not .*villa wrote"):
        RegionWork.open(tmp_path, {"encoder": "default"}, log=lambda line: None)
    (tmp_path / "text_embs" / "mine.txt").unlink()
    (tmp_path / "text_embs").rmdir()
    (tmp_path / "region_embs.partial").mkdir()
    (tmp_path / "region_embs.partial" / "mine.txt").write_text("mine")
    with pytest.raises(VillaError, match="region_embs.partial is not .*villa wrote"):
        RegionWork.open(tmp_path, {"encoder": "default"}, log=lambda line: None)
    assert (tmp_path / "region_embs.partial" / "mine.txt").read_text() == "mine"


def test_runs_delete_only_their_own_stale_files(tmp_path):
    """A new training run and a stage-1 run delete the previous run's files, but not a user's file that happens
    to carry one of their names."""
    import torch

    from villa.mapping.schema import clear_outputs, write_mapping_metrics

    (tmp_path / "mapping_metrics.json").write_text("not json: my notes")
    with pytest.raises(VillaError, match="mapping_metrics.json is in the way"):
        clear_outputs(tmp_path)
    assert (tmp_path / "mapping_metrics.json").read_text() == "not json: my notes"
    write_mapping_metrics(tmp_path, {})
    clear_outputs(tmp_path)
    assert not (tmp_path / "mapping_metrics.json").exists()

    from villa.engine.training import _is_run_file
    from villa.storage.io import remove_own_file

    (tmp_path / "metrics.csv").write_text("my,own,table\n1,2,3\n")
    with pytest.raises(VillaError, match="metrics.csv is in the way of .* villa did not write it"):
        remove_own_file(tmp_path / "metrics.csv", _is_run_file, "this run's metrics.csv")
    (tmp_path / "last.pkl").write_bytes(b"\x80\x04my own pickle")
    with pytest.raises(VillaError, match="last.pkl is in the way"):
        remove_own_file(tmp_path / "last.pkl", _is_run_file, "this run's last.pkl")
    torch.save({"model": {}}, tmp_path / "best.pkl")
    remove_own_file(tmp_path / "best.pkl", _is_run_file, "this run's best.pkl")
    assert not (tmp_path / "best.pkl").exists()
    assert (tmp_path / "metrics.csv").read_text().startswith("my,own")


def test_sweep_refuses_a_folder_that_is_not_a_sweep(tmp_path):
    from villa.docmnist.complexity_sweep import run_sweep

    (tmp_path / "results.csv").write_text("my results")
    with pytest.raises(VillaError, match=r"is not a sweep folder .*\(results.csv\)"):
        run_sweep([4], 60, tmp_path, methods=["untrained"], device="cpu")
    assert (tmp_path / "results.csv").read_text() == "my results"


def test_check_output_dir_refuses_a_symbolic_link(tmp_path):
    from villa.storage.io import check_output_dir

    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(VillaError, match="is a symbolic link"):
        check_output_dir(tmp_path / "link", overwrite=True, is_own=lambda p: True, own_marker="x")
