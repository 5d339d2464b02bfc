"""The dataset contract, the vocabulary and text matcher, and the COCO and table importers (bad input included)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from villa.datasets import Dataset, Vocabulary, load_vocabulary_file, plural, region_truth
from villa.datasets.coco import import_coco
from villa.datasets.table import import_table
from villa.storage.errors import VillaError


# --------------------------------------------------------------------------- vocabulary and matcher
@pytest.mark.parametrize(
    ("word", "expected"),
    [("star", "stars"), ("half moon", "half moons"), ("cross", "crosses"), ("box", "boxes"),
     ("butterfly", "butterflies"), ("key", "keys"), ("person", "people"), ("sheep", "sheep"),
     ("wine glass", "wine glasses"), ("knife", "knives")],
)  # fmt: skip
def test_plural(word, expected):
    assert plural(word) == expected


def test_matcher_whole_words_phrases_and_plurals():
    vocab = Vocabulary.from_names(["cross", "half moon", "person", "red"])
    texts = [
        "Stars scattered across a scene",  # "cross" inside "across" is not the word
        "Two HALF MOONS and a Cross.",
        "three people near a half-moon",  # a hyphen is a word boundary, so "half-moon" is not "half moon"
        "a red, reddish thing",
        "crosses",
    ]
    assert vocab.match_matrix(texts).tolist() == [
        [False, False, False, False],
        [True, True, False, False],
        [False, False, True, False],
        [False, False, False, True],
        [True, False, False, False],
    ]
    assert vocab.text_attributes(texts)[1] == ["cross", "half moon"]


def test_vocabulary_file_round_trip_and_defaults(tmp_path):
    path = tmp_path / "attributes.yaml"
    path.write_text(
        "attributes:\n"
        "  - name: half moon\n"
        "    prompts: [a half moon, there is a half moon]\n"
        "    kind: shape\n"
        "  - name: crescent\n"
        "    match: [crescent, crescents, sickle]\n"
        "  - red\n"
    )
    vocab = load_vocabulary_file(path)
    assert vocab.names == ["half moon", "crescent", "red"]
    assert vocab.prompts("half moon") == ["a half moon", "there is a half moon"]
    assert vocab.attributes[0].match == ("half moon", "half moons")  # default: the name and its plural
    assert vocab.prompts("red") == ["red"]
    assert vocab.kinds == {"half moon": "shape", "crescent": "other", "red": "other"}
    assert vocab.match_matrix(["a sickle"]).tolist() == [[False, True, False]]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("attributes: [", "not valid YAML"),
        ("names: [a]", "list under 'attributes:'"),
        ("attributes:\n  - name: a\n    colour: red\n", "unknown keys"),
        ("attributes:\n  - name: a\n  - name: a\n", "twice"),
        ("attributes: []", "empty"),
        ("attributes:\n  - prompts: [x]\n", "non-empty 'name'"),
    ],
)
def test_bad_vocabulary_files(tmp_path, text, message):
    path = tmp_path / "attributes.yaml"
    path.write_text(text)
    with pytest.raises(VillaError, match=message):
        load_vocabulary_file(path)


# --------------------------------------------------------------------------- a small COCO-format set
def _jpeg(path: Path, height: int, width: int, seed: int, mode: str = "RGB") -> None:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    (image.convert("L") if mode == "L" else image).save(path, quality=85)


def make_coco(root: Path) -> dict[str, Path]:
    """Six JPEGs of different sizes (one greyscale, one truncated), several captions per image, a plural and
    a two-word category, a crowd box, a box half outside its image and a zero-area box."""
    images = root / "images"
    images.mkdir(parents=True)
    sizes = [(120, 160), (90, 200), (150, 150), (100, 130), (80, 100), (110, 140)]
    records = []
    for i, (h, w) in enumerate(sizes, start=1):
        _jpeg(images / f"{i}.jpg", h, w, i, mode="L" if i == 3 else "RGB")
        records.append({"id": i, "file_name": f"{i}.jpg", "height": h, "width": w})
    data = (images / "5.jpg").read_bytes()
    (images / "5.jpg").write_bytes(data[: len(data) // 2])  # truncated: skipped and counted
    categories = [{"id": 1, "name": "star", "supercategory": "shape"},
                  {"id": 2, "name": "half moon", "supercategory": "shape"},
                  {"id": 3, "name": "cross", "supercategory": "shape"}]  # fmt: skip
    ann = [
        (1, 1, [10, 10, 30, 30]), (1, 2, [60, 20, 40, 40]), (1, 2, [100, 60, 30, 30]),
        (2, 3, [5, 5, 50, 50]), (2, 1, [180, 10, 40, 40]),  # half outside: clipped to the image
        (3, 2, [20, 20, 60, 60]), (3, 1, [100, 100, 0, 20]),  # zero width: skipped
        (4, 1, [10, 10, 40, 40]), (5, 1, [10, 10, 20, 20]), (6, 3, [30, 30, 50, 50]),
    ]  # fmt: skip
    annotations = [{"id": k, "image_id": i, "category_id": c, "bbox": b, "iscrowd": 0, "area": 1.0}
                   for k, (i, c, b) in enumerate(ann, start=1)]  # fmt: skip
    annotations.append({"id": 99, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1})
    captions = [
        (1, "A star and two half moons."), (1, "Two half moons next to a star"),
        (2, "A cross beside a star."), (3, "A half moon on grey."), (4, "A lonely star."),
        (5, "A star in a broken file."),
    ]  # image 6 has no caption: skipped  # fmt: skip
    paths = {"images": images, "instances": root / "instances.json", "captions": root / "captions.json"}
    paths["instances"].write_text(
        json.dumps({"images": records, "annotations": annotations, "categories": categories})
    )
    paths["captions"].write_text(json.dumps({
        "images": records,
        "annotations": [{"id": k, "image_id": i, "caption": c} for k, (i, c) in enumerate(captions)],
    }))  # fmt: skip
    return paths


def test_coco_import(tmp_path):
    paths = make_coco(tmp_path / "coco")
    result = import_coco(**paths, out=tmp_path / "ds", seed=1, progress=False)
    text = "\n".join(result.lines)
    assert "imported 4 images" in text
    assert "skipped 1 crowd annotations" in text
    assert "skipped 1 instance boxes of zero area or outside their image" in text
    assert "skipped 1 images without a caption (e.g. 6)" in text
    assert "skipped 1 images whose file is missing or unreadable" in text and "5.jpg" in text
    dataset = Dataset.open(result.dataset_dir)
    assert dataset.vocabulary.names == ["star", "half moon", "cross"] and dataset.has_region_labels
    assert dataset.vocabulary.kinds == {"star": "shape", "half moon": "shape", "cross": "shape"}
    frame = dataset.annotations().set_index("image_id")
    assert frame.loc[1, "text"] == "A star and two half moons . Two half moons next to a star"
    assert frame.loc[1, "attributes"] == ["star", "half moon"]
    assert frame.loc[1, "reg_to_attr"] == [["star"], ["half moon"], ["half moon"]]
    assert frame.loc[2, "region_coord"][1] == [180.0, 10.0, 200.0, 50.0]  # clipped to the 200-px width
    assert frame.loc[2, "image_size"] == [90, 200]
    assert frame.loc[3, "num_regions"] == 1
    # images are referenced where they are (no copy), any mode decodes to RGB
    assert dataset.image_root == paths["images"].resolve()
    from villa.datasets.images import decode_image

    grey = decode_image(dataset.image_paths([frame.loc[3, "image_filepath"]])[0])
    assert grey.shape == (150, 150, 3) and (grey[..., 0] == grey[..., 1]).all()
    assert set(frame["split"]) <= {"train", "val", "test"}


def test_coco_import_with_proposals_and_a_vocabulary(tmp_path):
    paths = make_coco(tmp_path / "coco")
    (tmp_path / "attributes.yaml").write_text(
        "attributes:\n  - name: star\n    prompts: [a star]\n  - name: crescent\n    match: [half moon, half moons]\n"
    )
    proposals = [
        {"image_id": 1, "bbox": [12, 12, 28, 28], "score": 0.9},  # IoU with the star ~0.87
        {"image_id": 1, "bbox": [60, 20, 20, 20], "score": 0.8},  # IoU 0.25 with a half moon: unlabelled
        {"image_id": 1, "bbox": [0, 0, 10, 10], "score": 0.01},  # below --min_score
        {"image_id": 2, "bbox": [5, 5, 50, 50], "score": 0.5},
        {"image_id": 3, "bbox": [20, 20, 60, 60], "score": 0.7},
        {"image_id": 4, "bbox": [0, 0, 30, 30], "score": 0.6},
        {"image_id": 4, "bbox": [10, 10, 40, 40], "score": 0.65},
    ]
    (tmp_path / "props.json").write_text(json.dumps(proposals))
    result = import_coco(
        **paths, out=tmp_path / "ds", attributes=tmp_path / "attributes.yaml", proposals=tmp_path / "props.json",
        min_score=0.05, max_regions=1, progress=False,
    )  # fmt: skip
    text = "\n".join(result.lines)
    assert "categories missing from the vocabulary" in text  # "cross"
    dataset = Dataset.open(result.dataset_dir)
    assert dataset.has_objects and dataset.info["regions"] == "proposals"
    frame = dataset.annotations().set_index("image_id")
    assert frame.loc[1, "region_coord"] == [[12.0, 12.0, 40.0, 40.0]]  # max_regions=1: the best only
    assert frame.loc[1, "reg_to_attr"] == [["star"]]
    assert frame.loc[3, "reg_to_attr"] == [["crescent"]]  # "half moon" maps to crescent by its match phrase
    assert frame.loc[4, "region_coord"] == [[10.0, 10.0, 50.0, 50.0]]  # top score, not first listed
    assert frame.loc[1, "object_labels"] == ["star", "crescent", "crescent"]
    assert frame.loc[1, "attributes"] == ["star", "crescent"]


def test_text_that_omits_objects_decides_the_image_attributes(tmp_path):
    """Stage 1 trains on what the text says: a labelled object the text never mentions is not an attribute of
    its image, and the mapping metrics count only the pairs the text makes reachable."""
    from villa.mapping.data import Stage1Dataset

    paths = make_coco(tmp_path / "coco")
    result = import_coco(**paths, out=tmp_path / "ds", seed=1, progress=False)
    dataset = Dataset.open(result.dataset_dir)
    frame = dataset.annotations().sort_values("image_id").reset_index(drop=True)
    row = frame.index[frame["image_id"] == 2][0]
    # image 2: a cross and a star, and its caption names both; drop the star from the text
    frame.at[row, "text"] = "A cross on its own"
    hot = dataset.vocabulary.match_matrix(frame["text"].tolist())
    assert hot[row].tolist() == [False, False, True]

    class NoEmbeddings:
        def gather_packed(self, ids):
            import torch

            return torch.zeros(3 * len(ids), 4), torch.full((len(ids),), 3)

    data = Stage1Dataset.from_frame(frame, NoEmbeddings(), dataset.vocabulary)
    assert data.multi_hot[row].tolist() == [False, False, True]  # from the text, not from the star's label
    frame.at[row, "attributes"] = dataset.vocabulary.text_attributes([frame.at[row, "text"]])[0]
    truth = region_truth(frame, dataset.vocabulary.names)
    full = region_truth(frame, dataset.vocabulary.names, reachable=False)
    assert full.sum() - truth.sum() == 1  # the unmentioned star


# --------------------------------------------------------------------------- the table importer
def test_table_import_csv_with_grid_regions(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    _jpeg(images / "a.jpg", 60, 90, 0)
    Image.fromarray(np.zeros((64, 64, 4), np.uint8)).save(images / "b.png")  # RGBA
    Image.fromarray(np.zeros((50, 40), np.uint8)).save(images / "c.png")  # greyscale
    (tmp_path / "attributes.yaml").write_text("attributes: [cat, dog]\n")
    (tmp_path / "pairs.csv").write_text(
        "image,text,split\na.jpg,Two cats and a dog,train\nb.png,A dog,val\nc.png,A cat,test\n"
    )
    result = import_table(
        tmp_path / "pairs.csv", tmp_path / "ds", images=images, attributes=tmp_path / "attributes.yaml",
        regions="grid:2x3", copy_images=True, progress=False,
    )  # fmt: skip
    dataset = Dataset.open(result.dataset_dir)
    assert not dataset.has_region_labels and dataset.image_root == result.dataset_dir / "images"
    frame = dataset.annotations().set_index("image_id")
    assert frame.loc[0, "num_regions"] == 6 and frame.loc[0, "region_coord"][5] == [60.0, 30.0, 90.0, 60.0]
    assert frame.loc[0, "attributes"] == ["cat", "dog"] and frame.loc[1, "split"] == "val"
    assert (result.dataset_dir / "images" / "b.png").is_file()


def test_table_import_jsonl_with_boxes_labels_and_a_split_file(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(4):
        _jpeg(images / f"{i}.jpg", 40, 50, i)
    (tmp_path / "attributes.yaml").write_text("attributes: [cat, dog]\n")
    rows = [
        {"id": 10 + i, "image": f"{i}.jpg", "text": "a cat and a dog",
         "boxes": [[0, 0, 20, 20], [20, 0, 50, 40]], "region_labels": [["cat"], ["dog"]]}
        for i in range(4)
    ]  # fmt: skip
    rows[3]["text"] = "  "  # an empty text: skipped and counted
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "splits.json").write_text(json.dumps({"train": [10, 11], "val": ["2.jpg"], "test": []}))
    result = import_table(
        tmp_path / "pairs.jsonl", tmp_path / "ds", images=images, attributes=tmp_path / "attributes.yaml",
        splits=tmp_path / "splits.json", progress=False,
    )  # fmt: skip
    assert "skipped 1 rows with an empty text" in "\n".join(result.lines)
    frame = Dataset.open(result.dataset_dir).annotations().set_index("image_id")
    assert frame["split"].to_dict() == {10: "train", 11: "train", 12: "val"}
    assert frame.loc[12, "reg_to_attr"] == [["cat"], ["dog"]]


# --------------------------------------------------------------------------- bad input: one line, exit 2, nothing written
def _ingest(argv, capsys):
    from villa import ingest

    with pytest.raises(SystemExit) as exit_info:
        ingest.main(argv)
    err = capsys.readouterr().err.strip()
    return exit_info.value.code, err


def _table_case(tmp_path, case: str) -> list[str]:
    images = tmp_path / "imgs"
    images.mkdir(exist_ok=True)
    _jpeg(images / "a.jpg", 30, 30, 0)
    _jpeg(images / "b.jpg", 30, 30, 1)
    vocab = tmp_path / "attributes.yaml"
    vocab.write_text("attributes: [cat]\n")
    table = tmp_path / "pairs.csv"
    table.write_text("image,text\na.jpg,a cat\nb.jpg,another cat\n")
    regions = "grid:2x2"
    if case == "malformed csv":
        table.write_bytes(b"image,text\n\xff\xfe\x00bad")
    elif case == "bad regions":
        regions = "grid:2by2"
    elif case == "no match":
        table.write_text("image,text\na.jpg,a dog\nb.jpg,a bird\n")
    elif case == "duplicate ids":
        table.write_text("id,image,text\n1,a.jpg,a cat\n1,b.jpg,a cat\n")
    elif case == "box outside":
        table.write_text('image,text,boxes\na.jpg,a cat,"[[40, 40, 50, 50]]"\n')
        regions = "boxes"
    elif case == "all images missing":
        table.write_text("image,text\nx.jpg,a cat\n")
    elif case == "bad boxes json":
        table.write_text('image,text,boxes\na.jpg,a cat,"[[1, 2"\n')
        regions = "boxes"
    elif case == "text too short to split":
        table.write_text("image,text\na.jpg,a cat\nb.jpg,cat. ok!\n")  # pieces of 3 characters or fewer
    return ["table", f"--table={table}", f"--images={images}", f"--attributes={vocab}",
            f"--regions={regions}", f"--out={tmp_path / 'out'}", "--no_progress"]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("malformed csv", "is not a readable CSV"),
        ("bad regions", "unknown --regions spec 'grid:2by2'"),
        ("no match", "no text mentions any of the 1 attributes"),
        ("duplicate ids", "id 1 appears twice"),
        ("box outside", "no row of"),
        ("all images missing", "no row of"),
        ("bad boxes json", "'boxes' is not valid JSON"),
        ("text too short to split", "row 2 (image b.jpg): the text 'cat. ok!' has no sentence longer than 3"),
    ],
)
def test_table_bad_input_is_one_line(tmp_path, capsys, case, message):
    code, err = _ingest(_table_case(tmp_path, case), capsys)
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary folder left


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("malformed json", "is not valid JSON"),
        ("caption of unknown image", "captions of image ids that"),
        ("duplicate image ids", "lists image id 1 twice"),
        ("no images folder", "--images folder"),
        ("annotation of unknown image", "annotations of image ids it does not list"),
        ("caption too short to split", "captions.json: image 4: the text 'A' has no sentence longer than 3"),
    ],
)
def test_coco_bad_input_is_one_line(tmp_path, capsys, case, message):
    paths = make_coco(tmp_path / "coco")
    instances = json.loads(paths["instances"].read_text())
    captions = json.loads(paths["captions"].read_text())
    if case == "malformed json":
        paths["captions"].write_text(paths["captions"].read_text()[:-20])
    elif case == "caption of unknown image":
        captions["annotations"].append({"id": 500, "image_id": 77, "caption": "a star"})
    elif case == "duplicate image ids":
        instances["images"].append(dict(instances["images"][0]))
    elif case == "no images folder":
        paths["images"] = tmp_path / "nowhere"
    elif case == "annotation of unknown image":
        instances["annotations"].append({"id": 500, "image_id": 77, "category_id": 1, "bbox": [0, 0, 5, 5]})
    elif case == "caption too short to split":
        captions["annotations"][4]["caption"] = "A."  # image 4's only caption
    if case not in ("malformed json", "no images folder"):
        paths["instances"].write_text(json.dumps(instances))
        paths["captions"].write_text(json.dumps(captions))
    argv = ["coco", f"--images={paths['images']}", f"--instances={paths['instances']}",
            f"--captions={paths['captions']}", f"--out={tmp_path / 'out'}", "--no_progress"]  # fmt: skip
    code, err = _ingest(argv, capsys)
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_ingest_usage_errors_are_one_line(tmp_path, capsys):
    code, err = _ingest(["parquet", "--out=x"], capsys)
    assert code == 2 and "\n" not in err and "invalid choice" in err
    code, err = _ingest(["coco", "--out=x"], capsys)
    assert code == 2 and "\n" not in err and "required" in err


def test_existing_output_is_refused_and_overwrite_replaces_it(tmp_path):
    paths = make_coco(tmp_path / "coco")
    import_coco(**paths, out=tmp_path / "ds", progress=False)
    with pytest.raises(VillaError, match="already exists"):
        import_coco(**paths, out=tmp_path / "ds", progress=False)
    import_coco(**paths, out=tmp_path / "ds", overwrite=True, seed=5, progress=False)
    assert Dataset.open(tmp_path / "ds").info["num_images"]


def test_shapes_generator_is_deterministic_and_coco_shaped(tmp_path):
    from villa.datasets.shapes import make_shapes_coco

    a = make_shapes_coco(tmp_path / "a", num_images=5, seed=3, progress=False)
    b = make_shapes_coco(tmp_path / "b", num_images=5, seed=3, progress=False)
    for name in ("instances.json", "captions.json", "images/000003.jpg"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    instances = json.loads((a / "instances.json").read_text())
    assert {"images", "annotations", "categories"} <= set(instances)
    assert any(c["name"] == "half moon" for c in instances["categories"])
    captions = json.loads((a / "captions.json").read_text())["annotations"]
    assert len(captions) == 15 and all(c["caption"].endswith(".") for c in captions)
