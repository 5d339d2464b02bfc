"""The stage-2 ablation pair modes (all_regions, random_mapping, oracle) on a tiny frame, and through the
stage-2 runner and its experiment files."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from villa.docmnist.vocabulary import docmnist_vocabulary
from villa.mapping.assign import choose_sentences
from villa.storage.errors import VillaError
from villa.vlm.data import PAIR_MODES, build_pairs, oracle_pairs, random_mapping_pairs

VOCAB = docmnist_vocabulary()
NAMES = VOCAB.names


def _frame() -> pd.DataFrame:
    """Three images: 4, 2 and 1 regions. Stage 1 (assigned_*) is partly wrong; 'red' is in two regions of
    image 0 (two red sentences), stage 1 gave it to two regions (one of them wrongly)."""
    cell = [[0, 0, 28, 28], [28, 0, 56, 28], [56, 0, 84, 28], [0, 28, 28, 56]]
    return pd.DataFrame(
        {
            "image_size": [[84, 84]] * 3,
            "region_coord": [cell, cell[:2], cell[:1]],
            "num_regions": [4, 2, 1],
            "text": [
                "the number is a one . the color is red . the image shows a two . the color is blue . "
                "the number is a three . the image is red",
                "the image shows a five . the shape is a circle",
                "there is an image showing a nine",
            ],
            "reg_to_attr": [
                [["one", "red"], ["two", "blue"], ["three"], ["red"]],
                [["five"], ["circle"]],
                [["nine"]],
            ],
            "assigned_attributes": [
                [["one", "red"], ["two"], [], ["blue", "red"]],
                [["five", "circle"], []],
                [[]],
            ],
            "assigned_text": [
                [
                    "the number is a one . the color is red",
                    "the image shows a two",
                    "",
                    "the color is blue . the color is red",
                ],
                ["the image shows a five . the shape is a circle", ""],
                [""],
            ],
        }
    )


def _pairs_per_image_attr(frame, region):
    """(image, attribute) -> count of pairs, from region indices over the frame's regions."""
    image_of_region = np.repeat(np.arange(len(frame)), frame["num_regions"])
    return image_of_region[region]


def test_pair_modes_listed_and_unknown_refused():
    assert PAIR_MODES == ("villa", "clip", "all_regions", "random_mapping", "oracle")
    with pytest.raises(VillaError, match="unknown pair mode 'regions': use one of villa, clip, all_regions"):
        build_pairs(_frame(), "regions")


def test_all_regions_pairs_every_region_with_the_whole_text():
    frame = _frame()
    offsets, boxes, texts = build_pairs(frame, "all_regions")
    assert offsets.tolist() == [0, 5, 8, 10]  # whole pair + every region
    for i, text in enumerate(frame["text"]):
        assert texts[offsets[i] : offsets[i + 1]] == [text] * (offsets[i + 1] - offsets[i])
    assert boxes[0].tolist() == [0, 0, 83, 83] and boxes[1:5].tolist() == frame["region_coord"][0]


def test_random_mapping_keeps_stage1_counts_attributes_and_sentences():
    frame = _frame()
    region, attr, sentence = random_mapping_pairs(frame, VOCAB, seed=[23, 0])
    image = _pairs_per_image_attr(frame, region)
    stage1 = Counter(
        (i, NAMES.index(a))
        for i, regions in enumerate(frame["assigned_attributes"])
        for r in regions
        for a in r
    )
    assert Counter(zip(image.tolist(), attr.tolist())) == stage1  # same attributes, same count per image
    assert len(region) == 7
    # an attribute given to c regions lands on c DISTINCT regions of its own image
    assert len(set(zip(region.tolist(), attr.tolist()))) == len(region)
    starts = np.array([0, 4, 6, 7])
    assert ((region >= starts[image]) & (region < starts[image + 1])).all()
    by_pair = dict(zip(zip(image.tolist(), [NAMES[a] for a in attr]), sentence.tolist()))
    assert by_pair[(0, "red")] == "the color is red" and by_pair[(0, "blue")] == "the color is blue"
    assert by_pair[(1, "circle")] == "the shape is a circle"


def test_random_mapping_is_seeded():
    frame = _frame()
    first = build_pairs(frame, "random_mapping", vocabulary=VOCAB, seed=[5, 0])
    again = build_pairs(frame, "random_mapping", vocabulary=VOCAB, seed=[5, 0])
    assert first[0].tolist() == again[0].tolist() and first[1].tolist() == again[1].tolist()
    assert first[2] == again[2]
    layouts = {tuple(random_mapping_pairs(frame, VOCAB, seed=s)[0].tolist()) for s in range(8)}
    assert len(layouts) > 1, "different seeds move the pairs"
    # every sentence of stage 1 is still there (the texts' sentences, counted over each image)
    offsets, _, texts = first
    for i, regions in enumerate(frame["assigned_text"]):
        stage1 = sorted(s for t in regions for s in t.split(" . ") if s)
        moved = sorted(s for t in texts[offsets[i] + 1 : offsets[i + 1]] for s in t.split(" . "))
        assert moved == stage1


def test_random_mapping_keeps_an_attribute_without_a_sentence():
    """'red' is mentioned only by a 3-letter sentence, which split_sentences drops: stage 1 assigned it with
    no sentence; the random mapping moves it, still with none, and the other sentence stays aligned."""
    frame = pd.DataFrame(
        {
            "image_size": [[84, 84]],
            "region_coord": [[[0, 0, 28, 28], [28, 0, 56, 28]]],
            "num_regions": [2],
            "text": ["the number is a one . red . the shape is a circle"],
            "assigned_attributes": [[["one", "red", "circle"], []]],
            "assigned_text": [["the number is a one . the shape is a circle", ""]],
        }
    )
    region, attr, sentence = random_mapping_pairs(frame, VOCAB, seed=1)
    got = dict(zip([NAMES[a] for a in attr], sentence.tolist()))
    assert got == {"one": "the number is a one", "red": "", "circle": "the shape is a circle"}
    broken = frame.assign(assigned_text=[["the number is a one", ""]])
    with pytest.raises(VillaError, match="does not match its assigned attributes: re-run stage 1"):
        random_mapping_pairs(broken, VOCAB, seed=1)


def test_oracle_pairs_are_the_ground_truth_with_chosen_sentences():
    frame = _frame()
    region, attr, sentence = oracle_pairs(frame, VOCAB, seed=[23, 0])
    truth = [(r, NAMES[a]) for r, a in zip(region.tolist(), attr.tolist())]
    assert truth == [(0, "one"), (0, "red"), (1, "two"), (1, "blue"), (2, "three"), (3, "red"),
                     (4, "five"), (5, "circle"), (6, "nine")]  # fmt: skip
    mentioned = VOCAB.text_attributes(frame["text"].tolist())
    chosen = choose_sentences(frame["text"].tolist(), mentioned, VOCAB, [23, 0])
    image = _pairs_per_image_attr(frame, region)
    assert sentence.tolist() == chosen[image, attr].tolist()
    assert sentence[1] in ("the color is red", "the image is red") and sentence[1] == sentence[5]

    offsets, _, texts = build_pairs(frame, "oracle", vocabulary=VOCAB, seed=[23, 0])
    assert offsets.tolist() == [0, 5, 8, 10]  # every labelled region has a text here
    assert texts[1] == f"the number is a one . {sentence[1]}"
    assert texts[9] == "there is an image showing a nine"


def test_oracle_leaves_out_attributes_the_text_does_not_mention():
    frame = _frame()
    frame.at[2, "reg_to_attr"] = [["nine", "large"]]  # "large" is not in image 2's text
    region, attr, _ = oracle_pairs(frame, VOCAB, seed=0)
    assert [NAMES[a] for a in attr[region == 6]] == ["nine"]


def test_oracle_refused_without_region_labels():
    frame = _frame().assign(reg_to_attr=None)
    with pytest.raises(VillaError, match="pairs=oracle needs ground-truth region labels"):
        build_pairs(frame, "oracle", vocabulary=VOCAB)
    with pytest.raises(VillaError, match="pairs=oracle needs ground-truth region labels"):
        build_pairs(_frame().drop(columns="reg_to_attr"), "oracle", vocabulary=VOCAB)


def test_random_mapping_needs_the_stage1_columns():
    with pytest.raises(VillaError, match="no 'assigned_attributes' column"):
        build_pairs(_frame().drop(columns="assigned_attributes"), "random_mapping", vocabulary=VOCAB)


# --------------------------------------------------------------------------- through the stage-2 runner
@pytest.fixture(scope="module")
def stage2_fixture(tmp_path_factory):
    from test_stage2_e2e import _encoder, build_fixture

    enc = _encoder()
    return (*build_fixture(tmp_path_factory.mktemp("modes"), enc.name, enc.dim), enc)


def test_stage2_datasets_of_each_ablation(stage2_fixture):
    from villa.vlm.run import build_stage2_datasets

    data_dir, stage1_dir, frame, enc = stage2_fixture
    train = frame[frame["split"] == "train"]
    n_images, n_regions = len(train), int(train["num_regions"].sum())
    sets = {
        mode: build_stage2_datasets(data_dir, enc.name, mode, stage1_dir, progress=False, seed=23)[0]
        for mode in ("villa", "all_regions", "random_mapping", "oracle")
    }
    assert sets["all_regions"].num_pairs == n_images + n_regions
    assert sets["oracle"].num_pairs == n_images + n_regions  # every fixture region carries labels
    # stage 1 left the first region of each image empty; the random mapping moves its attributes anywhere
    assert sets["villa"].num_pairs == n_regions
    assert n_images < sets["random_mapping"].num_pairs <= n_images + n_regions
    again = build_stage2_datasets(data_dir, enc.name, "random_mapping", stage1_dir, progress=False, seed=23)[
        0
    ]
    assert np.array_equal(again.boxes.numpy(), sets["random_mapping"].boxes.numpy())


def test_oracle_refused_on_a_dataset_without_region_labels(stage2_fixture, tmp_path):
    from villa.datasets import write_dataset
    from villa.vlm.run import run_stage2

    data_dir, _, frame, enc = stage2_fixture
    unlabelled = tmp_path / "unlabelled"
    columns = frame.drop(columns=["assigned_attributes", "assigned_text", "attributes"]).assign(
        reg_to_attr=None
    )
    columns["image_filepath"] = [str(data_dir / p) for p in columns["image_filepath"]]
    write_dataset(unlabelled, vocabulary=VOCAB, source="test", columns=columns)
    shutil.copytree(data_dir / "text_embs", unlabelled / "text_embs")
    with pytest.raises(
        VillaError, match=r"pairs=oracle needs ground-truth region labels and .*unlabelled has none"
    ):
        run_stage2(
            data_dir=unlabelled, run_dir=tmp_path / "r", pairs="oracle", encoder=enc.name, device="cpu"
        )


@pytest.mark.parametrize(
    "experiment,pairs,stage1",
    [
        ("all_regions", "all_regions", None),
        ("random_mapping", "random_mapping", "/ck/ds/stage1"),
        ("oracle", "oracle", None),
        ("docmnist_all_regions", "all_regions", None),
        ("docmnist_random_mapping", "random_mapping", "/ck/docmnist_stage1"),
        ("docmnist_oracle", "oracle", None),
    ],
)
def test_experiment_files(experiment, pairs, stage1):
    from villa.engine.hydra_app import compose

    cfg = compose([f"experiment={experiment}", "data_dir=/data/ds", "checkpoint_dir=/ck"])
    assert cfg.stage == "stage2" and cfg.pairs == pairs and cfg.stage_1_ckpt_dir == stage1
    expected_run = f"/ck/{experiment}" if experiment.startswith("docmnist") else f"/ck/ds/{experiment}"
    assert cfg.run_dir == expected_run and cfg.eval_checkpoint == f"{expected_run}/best.pkl"
