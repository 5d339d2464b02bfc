"""Stage 1 end to end on a tiny synthetic dataset: outputs, determinism, resume and bad input."""

import sys

import numpy as np
import pandas as pd
import pytest
import torch

from villa.datasets import write_dataset
from villa.docmnist.vocabulary import ATTRIBUTES, COLORS, DIGIT_WORDS, SHAPES, SIZES, docmnist_vocabulary
from villa.features.embeddings import save_attr_embs, write_region_embeddings
from villa.mapping.run import default_optimizer, run_stage1, run_stage1_from_config
from villa.mapping.schema import read_mapping, read_mapping_metrics
from villa.storage.errors import VillaError

DIM = 12


def make_dataset(root, counts=(12, 6, 6), dim=DIM, seed=0, encoder="default", drop_image=False, big_image=0):
    """A few DocMNIST-like rows; a region's embedding is the sum of its attributes' directions + noise.
    ``big_image``: the first image has that many regions (7-pixel cells)."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(len(ATTRIBUTES), dim))
    rows, embs = [], []
    image_id = 0
    for split, n in zip(("train", "val", "test"), counts):
        for _ in range(n):
            r = int(rng.integers(1, 4))
            cells = sorted(rng.choice(9, size=r, replace=False).tolist())
            if big_image and image_id == 0:
                r, cells = big_image, list(range(big_image))
            regions = []
            for _ in cells:
                attrs = [DIGIT_WORDS[rng.integers(10)], list(COLORS)[rng.integers(5)]]
                if rng.random() < 0.5:
                    attrs += [SHAPES[rng.integers(2)], SIZES[rng.integers(3)]]
                regions.append(attrs)
                vec = directions[[ATTRIBUTES.index(a) for a in attrs]].sum(0) + 0.1 * rng.normal(size=dim)
                embs.append(vec)
            present = [a for a in ATTRIBUTES if any(a in reg for reg in regions)]
            text = " . ".join(f"the value is {a}" for a in present)
            rows.append(
                {
                    "image_id": image_id,
                    "image_size": [84, 84],
                    "image_filepath": f"images/{image_id:06d}.png",
                    "region_coord": [
                        [28 * (c % 3), 28 * (c // 3), 28 * (c % 3) + 28, 28 * (c // 3) + 28]
                        if r <= 9
                        else [7 * (c % 12), 7 * (c // 12 % 12), 7 * (c % 12) + 7, 7 * (c // 12 % 12) + 7]
                        for c in cells
                    ],
                    "num_regions": r,
                    "split": split,
                    "text": text,
                    "digit_label": [reg[0] for reg in regions],
                    "color_label": [reg[1] for reg in regions],
                    "shape_label": [reg[2] if len(reg) > 2 else None for reg in regions],
                    "size_label": [reg[3] if len(reg) > 2 else None for reg in regions],
                    "reg_to_attr": regions,
                    "attributes": present,
                }
            )
            image_id += 1
    frame = pd.DataFrame(rows)
    root.mkdir(parents=True, exist_ok=True)
    write_dataset(root, vocabulary=docmnist_vocabulary(), source="test", columns=frame)
    emb = np.asarray(embs, dtype=np.float32)
    ids, nreg = frame["image_id"].to_numpy(), frame["num_regions"].to_numpy()
    if drop_image:  # the last image has no embeddings
        ids, nreg, emb = ids[:-1], nreg[:-1], emb[: -int(nreg[-1])]
    write_region_embeddings(root, ids, nreg, emb, encoder=encoder)
    attr = torch.from_numpy(rng.normal(size=(len(ATTRIBUTES), dim)).astype(np.float32))
    save_attr_embs(root, {a: attr[k] / attr[k].norm() for k, a in enumerate(ATTRIBUTES)})
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "docmnist_tiny")


def _run(dataset, run_dir, **kw):
    args = dict(epochs=2, batch_size=4, device="cpu", progress=False, seed=3)
    args.update(kw)
    return run_stage1(dataset, run_dir, **args)


def test_end_to_end_writes_mappings_and_metrics(dataset, tmp_path, capsys):
    result = _run(dataset, tmp_path / "run")
    run_dir = tmp_path / "run"
    for name in ("last.pkl", "best.pkl", "metrics.csv", "mapping_metrics.json"):
        assert (run_dir / name).is_file(), name
    assert len(pd.read_csv(run_dir / "metrics.csv")) == 2
    metrics = read_mapping_metrics(run_dir)
    assert set(metrics) == {"train", "val", "test"} and metrics == result.metrics
    assert set(metrics["val"]["per_kind"]) == {"digit", "color", "shape", "size"}
    assert 0 < metrics["val"]["f1"] <= 100
    assert "precision" in capsys.readouterr().out
    mapped = read_mapping(run_dir, "val")
    assert len(mapped) == 6 and (mapped["split"] == "val").all()
    for attrs, texts, n, present in zip(
        mapped["assigned_attributes"], mapped["assigned_text"], mapped["num_regions"], mapped["attributes"]
    ):
        assert len(attrs) == len(texts) == n
        flat = {a for region in attrs for a in region}
        assert flat <= set(present)
        assert flat == set(present)  # every mentioned attribute goes to at least its best region
        for region_attrs, text in zip(attrs, texts):
            assert text == " . ".join(f"the value is {a}" for a in region_attrs)


def test_same_seed_same_mapping_and_resume_matches(dataset, tmp_path):
    _run(dataset, tmp_path / "a")
    _run(dataset, tmp_path / "b")
    _run(dataset, tmp_path / "c", epochs=1)
    _run(dataset, tmp_path / "c", epochs=2, resume=True)
    ref = {s: (tmp_path / "a" / f"mapping_{s}.feather").read_bytes() for s in ("train", "val", "test")}
    for other in ("b", "c"):
        for split, data in ref.items():
            assert (tmp_path / other / f"mapping_{split}.feather").read_bytes() == data, (other, split)
    a = torch.load(tmp_path / "a" / "last.pkl", weights_only=True)["model"]
    c = torch.load(tmp_path / "c" / "last.pkl", weights_only=True)["model"]
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert len(pd.read_csv(tmp_path / "c" / "metrics.csv")) == 2


def test_training_learns_a_planted_mapping(tmp_path):
    data = make_dataset(tmp_path / "data" / "planted", counts=(96, 24, 4), seed=1)
    untrained = _run(data, tmp_path / "r0", epochs=0, epsilon=0.0)
    fast = default_optimizer(lr=3e-3)  # the tiny set has few steps per epoch
    trained = _run(data, tmp_path / "r1", epochs=20, batch_size=16, epsilon=0.0, optimizer_factory=fast)
    # untrained heads map at about 59 F1 (one-region images are trivially right); trained about 94
    assert trained.metrics["val"]["f1"] > 85 > untrained.metrics["val"]["f1"] + 15
    assert trained.mapped_with == "last.pkl" and untrained.mapped_with == "init"


def test_variants_change_what_they_say(dataset, tmp_path):
    """Each variant differs from the default run where it should: a variant silently ignored would not."""

    def run(name, **kw):
        result = _run(dataset, tmp_path / name, epochs=1, **kw)
        weights = torch.load(tmp_path / name / "last.pkl", weights_only=True)["model"]
        return result, weights, result.fit.history[0]["train_loss"]

    default, default_weights, default_loss = run("default")
    assert default.mapped_with == "last.pkl"
    # one shared head instead of one per attribute
    one, weights, loss = run("one_proj", one_proj=True)
    assert weights["W1"].shape == (1, DIM, DIM) and default_weights["W1"].shape == (len(ATTRIBUTES), DIM, DIM)
    assert loss != pytest.approx(default_loss, rel=1e-3)
    # the adapter mixes the raw input into every projection: same weights at init, another loss
    adapter, weights, loss = run("adapter", adapter=True)
    assert loss != pytest.approx(default_loss, rel=1e-3)
    # without the quirk every denominator loses n_pos: a lower loss on the same first batches
    plain, _, loss = run("plain", reference_quirk=False, map_weights="best")
    assert loss < default_loss - 0.01 and plain.mapped_with == "best.pkl"
    # a larger epsilon assigns at least as many pairs, and here strictly more
    wide, _, loss = run("wide", epsilon=10.0)
    assert loss == default_loss
    assert wide.metrics["test"]["num_assigned"] > default.metrics["test"]["num_assigned"]
    assert wide.metrics["test"]["recall"] == 100.0  # every mentioned attribute on every region
    for result in (one, adapter, plain, wide):
        assert 0 < result.metrics["test"]["f1"] <= 100


def test_bad_inputs_are_one_line_errors(dataset, tmp_path):
    with pytest.raises(VillaError, match="epsilon"):
        _run(dataset, tmp_path / "r", epsilon=-0.1)
    assert not (tmp_path / "r").exists()  # refused before any work
    with pytest.raises(VillaError, match="encoder 'clip_rn50'"):
        _run(dataset, tmp_path / "r", encoder="clip_rn50")
    with pytest.raises(VillaError, match="emb_dim"):
        _run(dataset, tmp_path / "r", emb_dim=DIM + 1)
    with pytest.raises(VillaError, match="not found"):
        _run(tmp_path / "nowhere", tmp_path / "r")
    missing = make_dataset(tmp_path / "data" / "missing", drop_image=True)
    with pytest.raises(VillaError, match="no region embeddings"):
        _run(missing, tmp_path / "r")
    empty = tmp_path / "data" / "noembs"
    make_dataset(empty)
    import shutil

    shutil.rmtree(empty / "region_embs")
    with pytest.raises(VillaError, match="no embeddings"):
        _run(empty, tmp_path / "r")


def test_config_glue_and_wrong_stage(dataset, tmp_path):
    from villa.engine.hydra_app import compose

    overrides = [
        "experiment=docmnist_stage1",
        f"data_dir={dataset}",
        f"checkpoint_dir={tmp_path}",
        "epochs=1",
        "batch_size=4",
        "device=cpu",
        "progress=false",
        "mapping.epsilon=0.3",
        "model.adapter=true",
    ]
    cfg = compose(overrides)
    result = run_stage1_from_config(cfg)
    assert result.run_dir == tmp_path / "docmnist_stage1"
    ckpt = torch.load(result.run_dir / "last.pkl", weights_only=True)
    assert ckpt["config"]["mapping"]["epsilon"] == 0.3 and ckpt["extra"]["model"]["adapter"] is True
    cfg.stage = "stage2"
    with pytest.raises(VillaError, match="stage"):
        run_stage1_from_config(cfg)


def test_cli_bad_epsilon_exits_2(dataset, tmp_path, monkeypatch, capsys):
    from villa import stage1

    argv = ["villa.stage1", "experiment=docmnist_stage1", f"data_dir={dataset}", f"checkpoint_dir={tmp_path}"]
    monkeypatch.setattr(sys, "argv", [*argv, "mapping.epsilon=-1", "device=cpu"])
    with pytest.raises(SystemExit) as exit_info:
        stage1.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: mapping.epsilon must be >= 0" in err and "Traceback" not in err


def test_a_failed_rerun_leaves_no_mapping_of_the_previous_run(dataset, tmp_path, monkeypatch):
    """Outputs of a run are recognisably from that run: a rerun that fails must not leave the previous
    run's mappings and metrics for stage 2 or the sweep to read as current."""
    from villa.mapping import run as stage1_run

    run_dir = tmp_path / "run"
    _run(dataset, run_dir, epochs=1)
    assert (run_dir / "mapping_metrics.json").is_file() and read_mapping(run_dir, "train") is not None

    def crash(*args, **kwargs):
        raise RuntimeError("killed half-way through training")

    monkeypatch.setattr(stage1_run, "fit", crash)
    with pytest.raises(RuntimeError, match="half-way"):
        _run(dataset, run_dir, epochs=1)
    assert not (run_dir / "mapping_metrics.json").exists()
    assert not list(run_dir.glob("mapping_*.feather"))
    with pytest.raises(VillaError, match="run stage 1"):
        read_mapping(run_dir, "train")
