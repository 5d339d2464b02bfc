"""Stage 1: the assignment rule, sentence choice, assigned text, metrics and the mapping schema."""

import numpy as np
import pandas as pd
import pytest
import torch

from villa.datasets import attribute_multi_hot, region_truth
from villa.docmnist.vocabulary import ATTRIBUTE_KIND, ATTRIBUTES, docmnist_vocabulary
from villa.mapping.assign import assign_regions, assigned_columns, choose_sentences, score_regions
from villa.mapping.metrics import format_metrics_table, mapping_metrics
from villa.mapping.model import MappingModel
from villa.mapping.schema import read_mapping, read_mapping_metrics, write_mapping, write_mapping_metrics
from villa.storage.errors import VillaError


def _one(values, present=True):
    """One image's regions scoring ``values`` for one attribute: packed cosines [R, 1], counts, present."""
    cos = torch.tensor(values, dtype=torch.float32).reshape(-1, 1)
    return cos, torch.tensor([len(values)]), torch.tensor([[present]])


def _regions(assigned, image_rows=None):
    rows = assigned[:, 0] if image_rows is None else assigned[image_rows, 0]
    return rows.nonzero().flatten().tolist()


def test_epsilon_zero_assigns_the_argmax_and_all_ties():
    cos, counts, present = _one([0.5, 0.25, 0.5, 0.125])
    assert _regions(assign_regions(cos, counts, present, 0.0)) == [0, 2]
    cos, counts, present = _one([0.125, 0.75, 0.5])
    assert _regions(assign_regions(cos, counts, present, 0.0)) == [1]


def test_epsilon_margin_is_strict():
    cos, counts, present = _one([0.5, 0.25, 0.0, 0.125])
    # 0.5 - 0.25 = 0.25: the region at exactly max - epsilon is NOT assigned (score > max - epsilon)
    assert _regions(assign_regions(cos, counts, present, 0.25)) == [0]
    assert _regions(assign_regions(cos, counts, present, 0.5)) == [0, 1, 3]
    assert _regions(assign_regions(cos, counts, present, 10.0)) == [0, 1, 2, 3]


def test_other_images_and_absent_attributes_are_never_assigned():
    # two images packed: [0.25, 0.125] and [0.9]; the second image's 0.9 is no max of the first
    cos, counts, present = (
        torch.tensor([[0.25], [0.125], [0.9]]),
        torch.tensor([2, 1]),
        torch.tensor([[True], [True]]),
    )
    assigned = assign_regions(cos, counts, present, 0.0)
    assert _regions(assigned, slice(0, 2)) == [0] and _regions(assigned, slice(2, 3)) == [0]
    cos, counts, present = _one([0.25, 0.125], present=False)
    assert _regions(assign_regions(cos, counts, present, 1.0)) == []
    # an image without regions takes no rows
    cos, counts = torch.tensor([[0.5], [0.7]]), torch.tensor([0, 2, 0])
    assert _regions(assign_regions(cos, counts, torch.ones(3, 1, dtype=torch.bool), 0.0)) == [1]


@pytest.mark.parametrize("one_proj,adapter", [(False, False), (True, False), (False, True)])
def test_scoring_present_heads_only_equals_all_heads_where_present(one_proj, adapter):
    gen = torch.Generator().manual_seed(0)
    model = MappingModel(8, num_attributes=5, one_proj=one_proj, adapter=adapter, seed=1)
    model.set_input_stats(torch.randn(30, 8, generator=gen))
    counts = torch.randint(1, 5, (7,), generator=gen)
    counts[0] = 0  # an image without regions
    regions = torch.randn(int(counts.sum()), 8, generator=gen)  # packed, image by image
    present = torch.rand(7, 5, generator=gen) < 0.5
    present[:, 3] = False  # an attribute no text mentions: its head never runs
    attr = torch.randn(5, 8, generator=gen)
    full = score_regions(model, regions, counts, attr, chunk_size=3)
    only = score_regions(model, regions, counts, attr, present, chunk_size=3)
    wanted = present[torch.repeat_interleave(counts)]  # [M, K]
    assert full.shape == (len(regions), 5) and torch.isfinite(full).all()
    # the same arithmetic on the same rows (bit for bit with MKL; a tolerance for other BLAS)
    torch.testing.assert_close(only[wanted], full[wanted])
    assert torch.isinf(only[~wanted]).all()
    # the heads of the forward pass: the same cosines
    direct = torch.nn.functional.cosine_similarity(model(regions[None])[0], attr[None], dim=-1)
    torch.testing.assert_close(full, direct)
    for eps in (0.0, 0.2):
        assert torch.equal(
            assign_regions(only, counts, present, eps), assign_regions(full, counts, present, eps)
        )


def test_negative_epsilon_is_refused():
    cos, counts, present = _one([0.5])
    with pytest.raises(VillaError, match="epsilon"):
        assign_regions(cos, counts, present, -0.1)


def test_sentence_choice_is_seeded_and_matches_the_attribute():
    texts = [
        "the color is red . the image shows a one . the digit appears to be red . there is a circle",
        "the number is a seven . the image is blue",
    ]
    attrs = [["one", "red", "circle"], ["seven", "blue"]]
    a = choose_sentences(texts, attrs, docmnist_vocabulary(), seed=5)
    assert a.shape == (2, 20)
    assert a[0, ATTRIBUTES.index("one")] == "the image shows a one"
    assert a[0, ATTRIBUTES.index("red")] in {"the color is red", "the digit appears to be red"}
    assert a[1, ATTRIBUTES.index("blue")] == "the image is blue"
    assert a[1, ATTRIBUTES.index("red")] == "" and a[0, ATTRIBUTES.index("seven")] == ""
    assert (choose_sentences(texts, attrs, docmnist_vocabulary(), seed=5) == a).all()
    picks = {
        choose_sentences(texts, attrs, docmnist_vocabulary(), seed=s)[0, ATTRIBUTES.index("red")]
        for s in range(20)
    }
    assert picks == {"the color is red", "the digit appears to be red"}  # both candidates get drawn


def test_sentence_matching_is_whole_word_per_sentence():
    from villa.datasets import Vocabulary

    vocab = Vocabulary.from_names(["red", "b", "re", "x", "half moon"])
    sentences = [
        "The color is RED",
        "a re",
        "d b",
        "reddish",
        "two red red things",
        "a.b red",
        "x",
        "half  moons",
    ]
    got = vocab.match_matrix(sentences)
    expected = [
        [True, False, False, False, False],
        [False, False, True, False, False],
        [False, True, False, False, False],
        [False, False, False, False, False],  # "reddish" is not the word "red"
        [True, False, False, False, False],
        [True, True, False, False, False],  # "a.b": '.' bounds the word b
        [False, False, False, True, False],
        [False, False, False, False, True],  # a plural, any run of spaces inside the phrase
    ]
    assert got.tolist() == expected  # "a re" + "d b" never make "red": no match across sentences
    assert not vocab.match_matrix([]).any()


def test_assigned_columns_per_region_in_vocabulary_order():
    k_red, k_one, k_circle = ATTRIBUTES.index("red"), ATTRIBUTES.index("one"), ATTRIBUTES.index("circle")
    assigned = np.zeros((3, 20), dtype=bool)  # packed: image 0's two regions, image 1's one
    assigned[0, [k_red, k_one]] = True  # red comes after one in the vocabulary
    assigned[1, k_circle] = True
    counts = np.array([2, 1])
    sentences = np.full((2, 20), "", dtype=object)
    sentences[0, [k_red, k_one, k_circle]] = [
        "the color is red",
        "the image shows a one",
        "there is a circle",
    ]
    attrs, texts = assigned_columns(assigned, counts, sentences, ATTRIBUTES)
    assert attrs == [[["one", "red"], ["circle"]], [[]]]
    assert texts == [["the image shows a one . the color is red", "there is a circle"], [""]]


def test_metrics_hand_worked():
    truth_lists = [["one", "red"], ["two", "blue", "circle", "small"]]
    assigned_lists = [["one", "red", "circle"], ["blue", "circle"]]
    truth = attribute_multi_hot(truth_lists, ATTRIBUTES)
    assigned = attribute_multi_hot(assigned_lists, ATTRIBUTES)
    m = mapping_metrics(assigned, truth, ATTRIBUTES, ATTRIBUTE_KIND)
    # correct: one, red, blue, circle(region 1) = 4 of 5 assigned, of 6 true
    assert m["precision"] == pytest.approx(80.0)
    assert m["recall"] == pytest.approx(400 / 6)
    assert m["f1"] == pytest.approx(2 * 80 * (400 / 6) / (80 + 400 / 6))
    assert m["per_kind"]["digit"] == {
        "precision": 100.0, "recall": 50.0, "f1": pytest.approx(200 / 3), "num_assigned": 1, "num_true": 2
    }  # fmt: skip
    assert m["per_kind"]["shape"]["precision"] == 50.0 and m["per_kind"]["shape"]["recall"] == 100.0
    # nothing assigned to a kind that has a true pair: precision is 0/0, recall and F1 are 0 (nothing found)
    assert m["per_kind"]["size"] == {
        "precision": None,
        "recall": 0.0,
        "f1": 0.0,
        "num_assigned": 0,
        "num_true": 1,
    }
    table = format_metrics_table({"val": m})
    assert "val" in table and "80.0" in table and "digit F1" in table


def test_undefined_metrics_are_null_not_zero():
    import json

    # no region carries a shape or a size: recall and F1 of those kinds are 0/0, not 0
    truth = attribute_multi_hot([["one", "red"], ["two"]], ATTRIBUTES)
    assigned = attribute_multi_hot([["one"], ["two", "circle"]], ATTRIBUTES)
    m = mapping_metrics(assigned, truth, ATTRIBUTES, ATTRIBUTE_KIND)
    assert m["per_kind"]["size"] == {
        "precision": None,
        "recall": None,
        "f1": None,
        "num_assigned": 0,
        "num_true": 0,
    }
    # a wrong assignment of a kind without true pairs: precision 0, recall (and F1) undefined
    assert m["per_kind"]["shape"] == {
        "precision": 0.0,
        "recall": None,
        "f1": None,
        "num_assigned": 1,
        "num_true": 0,
    }
    assert m["per_kind"]["color"]["precision"] is None and m["per_kind"]["color"]["f1"] == 0.0
    assert json.loads(json.dumps(m))["per_kind"]["size"]["f1"] is None  # null in mapping_metrics.json
    empty = mapping_metrics(np.zeros((0, 20), bool), np.zeros((0, 20), bool), ATTRIBUTES, ATTRIBUTE_KIND)
    assert empty["precision"] is None and empty["recall"] is None and empty["f1"] is None
    header, line = format_metrics_table({"test": m}).splitlines()
    cells = dict(zip(header.replace(" F1", "_F1").split(), line.split()))
    assert cells["size_F1"] == "n/a" and cells["shape_F1"] == "n/a" and cells["color_F1"] == "0.0"
    assert format_metrics_table({"test": empty}).splitlines()[1].split()[1:4] == ["n/a"] * 3


def _frame():
    return pd.DataFrame(
        {
            "image_id": [3, 7],
            "image_size": [[84, 84], [84, 84]],
            "image_filepath": ["images/000003.png", "images/000007.png"],
            "region_coord": [[[0, 0, 28, 28], [28, 0, 56, 28]], [[56, 56, 84, 84]]],
            "num_regions": [2, 1],
            "split": ["val", "val"],
            "text": ["the number is a one . the color is red", "the image shows a two . the image is blue"],
            "digit_label": [["one", "one"], ["two"]],
            "color_label": [["red", "red"], ["blue"]],
            "shape_label": [[None, "circle"], [None]],
            "size_label": [[None, "small"], [None]],
            "reg_to_attr": [[["one", "red"], ["one", "red", "circle", "small"]], [["two", "blue"]]],
            "attributes": [["one", "red"], ["two", "blue"]],
            "object_boxes": [None, None],
            "object_labels": [None, None],
            "assigned_attributes": [[["one"], ["red"]], [["two", "blue"]]],
            "assigned_text": [
                ["the number is a one", "the color is red"],
                ["the image shows a two . the image is blue"],
            ],
        }
    )


def test_region_truth_flattens_regions_in_order_and_keeps_what_the_text_mentions():
    t = region_truth(_frame(), ATTRIBUTES, reachable=False)
    assert t.shape == (3, 20) and t.sum() == 8 and t[1, ATTRIBUTES.index("small")]
    # the text of image 3 mentions neither circle nor small: a mapping cannot find those pairs
    reachable = region_truth(_frame(), ATTRIBUTES)
    assert reachable.sum() == 6 and not reachable[1, ATTRIBUTES.index("small")]


def test_mapping_schema_round_trip(tmp_path):
    frame = _frame()
    write_mapping(tmp_path, "val", frame)
    with pytest.raises(VillaError, match="did not finish"):  # the metrics, written last, mark a complete run
        read_mapping(tmp_path, "val")
    write_mapping_metrics(tmp_path, {"val": {"f1": 50.0}})
    back = read_mapping(tmp_path, "val")
    assert back["assigned_attributes"].tolist() == frame["assigned_attributes"].tolist()
    assert back["assigned_text"].tolist() == frame["assigned_text"].tolist()
    assert back["reg_to_attr"].tolist() == frame["reg_to_attr"].tolist()
    assert back["image_id"].tolist() == [3, 7]
    assert read_mapping_metrics(tmp_path) == {"val": {"f1": 50.0}}


def test_mapping_schema_refuses_bad_input(tmp_path):
    with pytest.raises(VillaError, match="run stage 1"):
        read_mapping(tmp_path, "train")
    with pytest.raises(VillaError, match="unknown split"):
        read_mapping(tmp_path, "dev")
    write_mapping_metrics(tmp_path, {})
    bad = _frame()
    bad.at[0, "assigned_text"] = ["only one"]
    with pytest.raises(ValueError, match="one entry per region"):
        write_mapping(tmp_path, "val", bad)
    (tmp_path / "mapping_test.feather").write_text("not feather")
    with pytest.raises(VillaError, match="mapping_test.feather in .* is not a readable feather table"):
        read_mapping(tmp_path, "test")
