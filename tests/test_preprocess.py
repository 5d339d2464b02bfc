"""Embedding preprocessing: artifacts, schema round-trip, refusal of foreign embeddings, bad inputs."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from villa.datasets import Dataset, read_annotations, write_dataset
from villa.datasets.text import split_sentences
from villa.docmnist.vocabulary import ATTRIBUTES, attribute_prompts, docmnist_vocabulary
from villa.features.embeddings import RegionEmbeddings, TextEmbeddingCache, load_attr_embs
from villa.features.preprocess import distinct_sentences, preprocess_dataset, shard_frame
from villa.storage.errors import VillaError

REPO = Path(__file__).resolve().parent.parent
CELL = 28


def make_dataset(root: Path, n_images: int = 7, seed: int = 0, name: str = "tiny_ds") -> Path:
    """A tiny DocMNIST-like dataset: coloured blobs in 3x3 grid cells, captions from the templates."""
    rng = np.random.default_rng(seed)
    folder = root / name
    (folder / "images").mkdir(parents=True)
    colours = {"red": (255, 0, 0), "green": (0, 255, 92), "blue": (0, 116, 255)}
    rows = []
    for i in range(n_images):
        canvas = np.zeros((84, 84, 3), np.uint8)
        cells = np.sort(rng.choice(9, size=int(rng.integers(1, 5)), replace=False))
        boxes, digits, cols, reg_to_attr = [], [], [], []
        for cell in cells:
            x, y = CELL * (cell % 3), CELL * (cell // 3)
            colour = list(colours)[int(rng.integers(3))]
            digit = ATTRIBUTES[int(rng.integers(10))]
            w = int(rng.integers(6, 20))
            canvas[y + 4 : y + 4 + w, x + 4 : x + 4 + w] = colours[colour]
            boxes.append([x, y, x + CELL, y + CELL])
            digits.append(digit)
            cols.append(colour)
            reg_to_attr.append([digit, colour])
        path = f"images/{i:06d}.png"
        Image.fromarray(canvas).save(folder / path)
        attrs = [a for a in ATTRIBUTES if a in set(digits) | set(cols)]
        sentences = list(dict.fromkeys(f"the number is a {d}" for d in digits)) + list(
            dict.fromkeys(f"the color is {c}" for c in cols)
        )
        rows.append(
            {
                "image_id": 100 + i,
                "image_size": [84, 84],
                "image_filepath": path,
                "region_coord": boxes,
                "num_regions": len(boxes),
                "split": ("train", "train", "val", "test")[i % 4],
                "text": " . ".join(sentences),
                "digit_label": digits,
                "color_label": cols,
                "shape_label": [None] * len(boxes),
                "size_label": [None] * len(boxes),
                "reg_to_attr": reg_to_attr,
                "attributes": attrs,
            }
        )
    write_dataset(folder, vocabulary=docmnist_vocabulary(), source="test", columns=pd.DataFrame(rows))
    return folder


def load_cli():
    spec = importlib.util.spec_from_file_location(
        "preprocess_docmnist", REPO / "preprocess/preprocess_docmnist.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    """A tiny dataset preprocessed once with the default encoder's reference recipe (batch of 3
    images: several batches)."""
    folder = make_dataset(tmp_path_factory.mktemp("pre"))
    summary = preprocess_dataset(
        folder, device="cpu", batch_size=3, progress=False, region_features="reference"
    )
    return folder, summary


def test_summary_counts(processed):
    folder, summary = processed
    frame = read_annotations(folder)
    assert summary["num_images"] == len(frame) == 7
    assert summary["num_regions"] == frame["num_regions"].sum()
    assert summary["encoder"] == "default" and summary["dim"] == 384
    assert summary["regions_per_s"] > 0 and summary["seconds"] >= summary["region_seconds"]


def test_attr_embs_roundtrip(processed):
    from villa.encoders import get_encoder

    folder, _ = processed
    raw = torch.load(folder / "attr_embs.pth", weights_only=True)
    assert list(raw) == list(ATTRIBUTES)
    assert all(v.dtype == torch.float32 and v.shape == (384,) for v in raw.values())
    names, embs = load_attr_embs(folder, ATTRIBUTES)
    torch.testing.assert_close(embs.norm(dim=1), torch.ones(len(ATTRIBUTES)))
    # recompute one attribute by the recipe of docs/method.md section 3.1: encode prompts, average, L2-normalise
    prompt_embs = get_encoder("default").encode_text(attribute_prompts("circle"))
    expected = torch.nn.functional.normalize(prompt_embs.mean(0), dim=0)
    torch.testing.assert_close(raw["circle"], expected, atol=1e-5, rtol=1e-4)


def test_region_embs_match_single_image_recipe(processed):
    """Stored rows == the regions of that image embedded alone (batching changes nothing)."""
    from villa.encoders import boxes_with_batch_index, get_encoder

    folder, _ = processed
    frame = read_annotations(folder)
    store = RegionEmbeddings.open(folder, expected_encoder="default")
    store.check_covers(frame["image_id"], frame["num_regions"])
    assert store.manifest["dataset"] == "tiny_ds"
    assert store.manifest["encoder_config"]["image_width"] == 16
    assert store.manifest["region_features"] == "reference"
    assert store.manifest["encoder_config"]["region_features"] == "reference"
    assert "region_features_config" not in store.manifest
    assert store.manifest["num_regions"] == frame["num_regions"].sum()
    digest = hashlib.sha256((folder / "annotations.feather").read_bytes()).hexdigest()
    assert store.manifest["annotations_sha256"] == digest
    model = get_encoder("default").build_image_model()
    for row in frame.iloc[[0, 4, 6]].itertuples():
        image = np.array(Image.open(folder / row.image_filepath).convert("RGB"))
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        with torch.inference_mode():
            alone = model(x, boxes_with_batch_index([torch.tensor(row.region_coord)]))
        rows, counts = store.rows([row.image_id])
        assert counts[0] == row.num_regions
        np.testing.assert_allclose(store.take(rows), alone.numpy(), atol=2e-5, rtol=1e-4)


def test_sentence_cache_covers_captions_and_prompts(processed):
    folder, _ = processed
    frame = read_annotations(folder)
    cache = TextEmbeddingCache.open(folder, expected_encoder="default")
    needed = {s for t in frame["text"] for s in split_sentences(t)}
    needed |= {p for a in ATTRIBUTES for p in attribute_prompts(a)}
    assert cache.missing(needed) == []
    assert len(cache.index) == len(needed)  # each distinct sentence stored once
    got = cache.lookup(sorted(needed))
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_each_sentence_encoded_once(tmp_path, monkeypatch):
    from villa.encoders.text import HFEncoder

    calls = []
    original = HFEncoder.encode_text

    def spy(self, texts, batch_size=None):
        calls.append(list(texts))
        return original(self, texts, batch_size)

    monkeypatch.setattr(HFEncoder, "encode_text", spy)
    folder = make_dataset(tmp_path, n_images=3)
    preprocess_dataset(folder, device="cpu", progress=False)
    encoded = [t for call in calls for t in call]
    assert len(encoded) == len(set(encoded))
    assert set(encoded) == set(distinct_sentences(read_annotations(folder)["text"], docmnist_vocabulary()))


def test_encoder_mismatch_refused(processed):
    folder, _ = processed
    with pytest.raises(VillaError, match="computed with encoder 'default'.*--encoder=clip_rn50"):
        RegionEmbeddings.open(folder, expected_encoder="clip_rn50")
    with pytest.raises(VillaError, match="encoder 'default'"):
        TextEmbeddingCache.open(folder, expected_encoder="clip_rn50")


def test_shard_frame_partitions_images():
    frame = pd.DataFrame({"image_id": np.arange(11)})
    parts = [shard_frame(frame, r, 3)["image_id"].tolist() for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(11))
    assert parts[1] == [1, 4, 7, 10]
    with pytest.raises(ValueError):
        shard_frame(frame, 3, 3)


def test_explicit_rank_embeds_its_share_only(tmp_path):
    """rank/world_size without torch.distributed: rank 1 embeds its images and writes nothing."""
    folder = make_dataset(tmp_path, n_images=5)
    with pytest.raises(VillaError, match="torchrun"):
        preprocess_dataset(folder, device="cpu", progress=False, rank=1, world_size=2)
    assert not (folder / "region_embs").exists() and not (folder / "attr_embs.pth").exists()


def test_failure_mid_run_keeps_previous_artifacts(tmp_path):
    folder = make_dataset(tmp_path, n_images=6)
    preprocess_dataset(folder, device="cpu", batch_size=2, progress=False)
    before = (folder / "region_embs" / "manifest.json").read_text()
    (folder / "images" / "000005.png").write_bytes(b"not a png")  # fails in the last batch
    with pytest.raises(VillaError, match="cannot decode image"):
        preprocess_dataset(folder, device="cpu", batch_size=2, progress=False)
    assert (folder / "region_embs" / "manifest.json").read_text() == before
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- CLI: bad input -> one line, exit 2
def run_cli(argv, capsys):
    cli = load_cli()
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    return exc.value.code, err


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_dir", "dataset folder not found"),
        ("no_annotations", "no annotations.feather"),
        ("unknown_encoder", "unknown encoder 'nope'"),
        ("clip_without_weights", "needs --clip_weights"),
        ("clip_missing_file", "CLIP weights file not found"),
        ("clip_garbage_file", "cannot read CLIP weights"),
        ("missing_image", "images listed in the annotations are missing"),
    ],
)
def test_cli_bad_input(case, expected, tmp_path, capsys):
    if case == "no_annotations":
        (tmp_path / "empty_ds").mkdir()
        data = tmp_path / "empty_ds"
    elif case == "missing_dir":
        data = tmp_path / "does_not_exist"
    else:
        data = make_dataset(tmp_path, n_images=2)
    argv = [f"--data_dir={data}", "--device=cpu", "--no_progress"]
    if case == "unknown_encoder":
        argv.append("--encoder=nope")
    if case.startswith("clip"):
        argv.append("--encoder=clip_rn50")
    if case == "clip_missing_file":
        argv.append(f"--clip_weights={tmp_path / 'RN50.pt'}")
    if case == "clip_garbage_file":
        (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
        argv.append(f"--clip_weights={tmp_path / 'bad.pt'}")
    if case == "missing_image":
        (data / "images" / "000001.png").unlink()
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and expected in err and "\n" not in err
    if Path(data).is_dir():
        assert sorted(p.name for p in Path(data).iterdir()) in (
            ["annotations.feather", "attributes.yaml", "dataset.json", "images"],
            [],
        )


def test_cli_runs_by_name_under_data_root(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PROJECT_DIR", str(tmp_path))
    make_dataset(tmp_path / "data", n_images=2, name="docmnist_tiny")
    summary = load_cli().main(["--data_dir=docmnist_tiny", "--device=cpu", "--no_progress", "--batch_size=8"])
    assert summary["num_images"] == 2
    assert (tmp_path / "data/docmnist_tiny/region_embs/manifest.json").is_file()
    assert '"num_regions"' in capsys.readouterr().out


def _rank_worker(rank: int, world_size: int, port: int, folder: str) -> None:
    import os

    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)},
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    summary = preprocess_dataset(folder, device="cpu", batch_size=2, progress=False)
    assert summary["world_size"] == world_size and summary["rank"] == rank


@pytest.mark.slow
def test_torchrun_style_sharding_matches_single_process(tmp_path):
    """Two gloo ranks each embed half the images; rank 0 writes what one process would have."""
    import socket

    import torch.multiprocessing as mp

    single = make_dataset(tmp_path / "single", n_images=5)
    multi = make_dataset(tmp_path / "multi", n_images=5)
    preprocess_dataset(single, device="cpu", progress=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank_worker, args=(2, port, str(multi)), nprocs=2, join=True)
    ids = read_annotations(single)["image_id"]
    one, two = RegionEmbeddings.open(single), RegionEmbeddings.open(multi)
    # rich features (the default's default): rank 0 standardises everything at once -> one shard
    assert two.manifest["region_features"] == "rich" and len(two.manifest["shards"]) == 1
    # atol: z-scoring magnifies float32 batching noise of the near-constant reference block
    np.testing.assert_allclose(two.take(two.rows(ids)[0]), one.take(one.rows(ids)[0]), atol=2e-3)
    torch.testing.assert_close(
        torch.load(multi / "attr_embs.pth", weights_only=True)["red"],
        torch.load(single / "attr_embs.pth", weights_only=True)["red"],
    )


# --------------------------------------------------------------------------- rich region features
def _rich_rows(folder: Path, frame: pd.DataFrame) -> np.ndarray:
    store = RegionEmbeddings.open(folder, expected_encoder="default")
    return store.take(store.rows(frame["image_id"])[0])


def test_rich_is_default_and_recorded(tmp_path):
    """The default encoder writes rich features, records the option, and they equal the recipe
    (raw blocks of every image -> train-split statistics -> fixed projection)."""
    from villa.encoders import get_encoder
    from villa.encoders.rich import RichRegionFeatures
    from villa.features.preprocess import iter_region_batches, to_model_input

    folder = make_dataset(tmp_path, n_images=8)
    preprocess_dataset(folder, device="cpu", batch_size=3, progress=False)
    frame = read_annotations(folder)
    store = RegionEmbeddings.open(folder, expected_encoder="default")
    assert store.manifest["region_features"] == "rich" and store.dim == 384
    assert store.manifest["encoder_config"]["region_features"] == "rich"
    config = store.manifest["region_features_config"]
    assert config["stats_split"] == "train"
    assert config["stats_num_regions"] == frame.loc[frame["split"] == "train", "num_regions"].sum()

    enc = get_encoder("default")
    rich = RichRegionFeatures(enc.build_image_model(), enc.dim)
    with torch.inference_mode():
        raw = torch.cat(
            [
                rich(to_model_input(b.images, torch.device("cpu")), torch.from_numpy(b.boxes))
                for b in iter_region_batches(frame, Dataset.open(folder), 100)
            ]
        )
        train = torch.from_numpy(np.repeat(frame["split"].to_numpy() == "train", frame["num_regions"]))
        expected = rich.finalize(raw, *rich.fit_stats(raw[train]))
    # z-scoring magnifies float32 batching noise of the near-constant reference block a little
    np.testing.assert_allclose(_rich_rows(folder, frame), expected.numpy(), atol=2e-3, rtol=1e-3)
    # regions are no longer near-identical (the reference recipe's cosine is ~0.99999)
    x = torch.nn.functional.normalize(torch.from_numpy(_rich_rows(folder, frame)), dim=1)
    assert (x @ x.T).min() < 0.9


def test_rich_statistics_use_only_train_images(tmp_path):
    """Overwriting every val/test image leaves the train regions' rich embeddings byte-identical,
    while overwriting a train image changes them (its statistics moved)."""
    folder = make_dataset(tmp_path, n_images=8)
    frame = read_annotations(folder)
    preprocess_dataset(folder, device="cpu", progress=False)
    train = np.repeat(frame["split"].to_numpy() == "train", frame["num_regions"])
    before = _rich_rows(folder, frame)

    noise = np.random.default_rng(5)

    def scribble(rows):
        for rel in frame.loc[rows, "image_filepath"]:
            Image.fromarray(noise.integers(0, 256, (84, 84, 3), dtype=np.uint8)).save(folder / rel)

    scribble(frame["split"] != "train")
    preprocess_dataset(folder, device="cpu", progress=False)
    after = _rich_rows(folder, frame)
    assert np.array_equal(after[train], before[train])
    assert not np.allclose(after[~train], before[~train])

    scribble(frame.index[frame["split"] == "train"][:1])
    preprocess_dataset(folder, device="cpu", progress=False)
    assert not np.allclose(_rich_rows(folder, frame)[train], before[train])


def test_rich_without_train_split_uses_all_regions(tmp_path):
    folder = make_dataset(tmp_path, n_images=3)
    frame = read_annotations(folder)
    frame["split"] = "test"
    write_dataset(folder, vocabulary=docmnist_vocabulary(), source="test", columns=frame)
    preprocess_dataset(folder, device="cpu", progress=False)
    config = RegionEmbeddings.open(folder).manifest["region_features_config"]
    assert config["stats_split"] == "all" and config["stats_num_regions"] == frame["num_regions"].sum()


def test_region_features_option_validated_and_cli_flag(tmp_path, capsys):
    folder = make_dataset(tmp_path, n_images=2)
    with pytest.raises(VillaError, match="region_features must be one of"):
        preprocess_dataset(folder, device="cpu", progress=False, region_features="fancy")
    load_cli().main([f"--data_dir={folder}", "--no_progress", "--region_features=reference"])
    assert RegionEmbeddings.open(folder).manifest["region_features"] == "reference"
