"""Assertion status of attribute mentions (present / negated / uncertain), the vocabulary's policy, sentence
choice, the importers' summary line and the shapes generator's denial captions."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from villa.datasets import Dataset, Vocabulary, load_vocabulary_file
from villa.datasets.assertion import NEGATED, PRESENT, UNCERTAIN, mention_status, normalise
from villa.storage.errors import VillaError

FINDINGS = Vocabulary.from_names(
    ["pleural effusion", "pneumothorax", "cardiomegaly", "pneumonia", "atelectasis", "consolidation", "edema",
     "enlarged cardiomediastinum", "star", "circle", "no finding"]
)  # fmt: skip


def statuses(text: str, vocabulary: Vocabulary = FINDINGS) -> dict[str, int]:
    """attribute -> OR of its mentions' status flags in ``text``."""
    row = vocabulary.status_matrix([text])[0]
    return {name: int(row[k]) for k, name in enumerate(vocabulary.names) if row[k]}


# --------------------------------------------------------------------------- report and caption examples
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("No pleural effusion or pneumothorax. Mild cardiomegaly.", ["cardiomegaly"]),
        ("Negative for pneumothorax; possible small pleural effusion.", ["pleural effusion"]),
        ("There is no star here, only a circle.", ["circle"]),
    ],
)
def test_report_and_caption_examples(text, expected):
    assert FINDINGS.text_attributes([text]) == [expected]


def test_report_and_caption_statuses():
    assert statuses("Negative for pneumothorax; possible small pleural effusion.") == {
        "pleural effusion": UNCERTAIN,
        "pneumothorax": NEGATED,
    }
    assert statuses("There is no star here, only a circle.") == {"star": NEGATED, "circle": PRESENT}


# --------------------------------------------------------------------------- report-style text
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # pre-negation, lists, multi-word findings
        ("No evidence of pneumonia.", {"pneumonia": NEGATED}),
        ("There is no enlarged cardiomediastinum.", {"enlarged cardiomediastinum": NEGATED}),
        ("No focal consolidation, pleural effusion, or pneumothorax.",
         {"consolidation": NEGATED, "pleural effusion": NEGATED, "pneumothorax": NEGATED}),
        ("The lungs are clear without consolidation.", {"consolidation": NEGATED}),
        ("The patient denies edema.", {"edema": NEGATED}),
        # post-negation
        ("Pneumothorax is absent.", {"pneumothorax": NEGATED}),
        ("Pneumonia was ruled out.", {"pneumonia": NEGATED}),
        ("Pleural effusion is not seen.", {"pleural effusion": NEGATED}),
        ("Pneumothorax: none.", {"pneumothorax": NEGATED}),
        ("Pneumonia is unlikely.", {"pneumonia": NEGATED}),
        # uncertainty, pre and post
        ("Possible pneumonia.", {"pneumonia": UNCERTAIN}),
        ("Findings may represent atelectasis.", {"atelectasis": UNCERTAIN}),
        ("Suspicious for consolidation in the right lower lobe.", {"consolidation": UNCERTAIN}),
        ("Pneumonia cannot be excluded.", {"pneumonia": UNCERTAIN}),
        ("Likely atelectasis.", {"atelectasis": UNCERTAIN}),
        # double negation (ConText): "not ruled out" is uncertain, not negated
        ("Pneumonia is not ruled out.", {"pneumonia": UNCERTAIN}),
        ("Pneumonia has not been ruled out.", {"pneumonia": UNCERTAIN}),
        ("Cannot rule out pneumonia.", {"pneumonia": UNCERTAIN}),
        # pseudo-triggers negate nothing
        ("No change in the pleural effusion.", {"pleural effusion": PRESENT}),
        ("No interval change in cardiomegaly.", {"cardiomegaly": PRESENT}),
        ("Not only pneumonia but also edema.", {"pneumonia": PRESENT, "edema": PRESENT}),
        # scope ends at "but", "however", a sentence end, ";", another trigger
        ("No pneumothorax, but a small pleural effusion.", {"pneumothorax": NEGATED, "pleural effusion": PRESENT}),
        ("No pneumothorax; however, atelectasis is present.", {"pneumothorax": NEGATED, "atelectasis": PRESENT}),
        ("No pneumonia. Edema.", {"pneumonia": NEGATED, "edema": PRESENT}),
        ("No edema; cardiomegaly.", {"edema": NEGATED, "cardiomegaly": PRESENT}),
        ("Possible edema, no pneumothorax.", {"edema": UNCERTAIN, "pneumothorax": NEGATED}),
        # a window of words: a long sentence leaves the far finding present
        ("No acute osseous abnormality of the ribs is seen in this study and there is cardiomegaly.",
         {"cardiomegaly": PRESENT}),
        # a trigger inside the attribute's own name is part of the name
        ("No finding.", {"no finding": PRESENT}),
        # case and white space do not matter; a decimal point is no sentence end
        ("NO   PLEURAL\nEFFUSION.", {"pleural effusion": NEGATED}),
        ("No 3.5 cm consolidation.", {"consolidation": NEGATED}),
    ],
)  # fmt: skip
def test_report_statuses(text, expected):
    assert statuses(text) == expected


def test_each_text_is_its_own_scope():
    """A trigger at the end of one text never reaches the next one."""
    texts = ["There is no", "pneumonia.", "Edema is", "absent"]
    assert FINDINGS.status_matrix(texts)[
        [1, 2], [FINDINGS.index("pneumonia"), FINDINGS.index("edema")]
    ].tolist() == [
        PRESENT,
        PRESENT,
    ]


def test_mention_status_on_raw_spans():
    corpus = normalise("No pneumonia.\0Possible edema.")
    starts = np.asarray([3, corpus.index("edema")])
    status = mention_status(corpus, starts, starts + np.asarray([9, 5]))
    assert status.tolist() == [NEGATED, UNCERTAIN]
    assert mention_status(corpus, np.zeros(0, int), np.zeros(0, int)).shape == (0,)


# --------------------------------------------------------------------------- the policy
def test_policy_decides_which_mentions_count():
    text = ["No pneumothorax. Possible pneumonia. Mild cardiomegaly."]
    names = FINDINGS.names
    got = {
        (n, u): [names[k] for k in np.flatnonzero(FINDINGS.with_policy(n, u).match_matrix(text)[0])]
        for n in ("drop", "keep")
        for u in ("keep", "drop")
    }
    assert got[("drop", "keep")] == ["cardiomegaly", "pneumonia"]
    assert got[("drop", "drop")] == ["cardiomegaly"]
    assert got[("keep", "keep")] == ["pneumothorax", "cardiomegaly", "pneumonia"]
    assert got[("keep", "drop")] == ["pneumothorax", "cardiomegaly"]
    # a negated mention never counts for sentence choice, whatever the policy
    assert not FINDINGS.with_policy("keep").affirmed_matrix(text)[0, FINDINGS.index("pneumothorax")]
    assert FINDINGS.with_policy("keep").affirmed_matrix(text)[0, FINDINGS.index("pneumonia")]
    assert (FINDINGS.negated, FINDINGS.uncertain) == ("drop", "keep")  # the defaults


def test_present_mention_wins_over_a_negated_one():
    assert FINDINGS.text_attributes(["No edema on the left. Edema on the right."]) == [["edema"]]


def test_policy_keys_in_the_vocabulary_file(tmp_path):
    path = tmp_path / "attributes.yaml"
    path.write_text("negated: keep\nuncertain: drop\nattributes: [star, circle]\n")
    vocab = load_vocabulary_file(path)
    assert (vocab.negated, vocab.uncertain) == ("keep", "drop")
    assert vocab.text_attributes(["No star, possibly a circle."]) == [["star"]]
    path.write_text("attributes: [star]\n")
    assert (load_vocabulary_file(path).negated, load_vocabulary_file(path).uncertain) == ("drop", "keep")
    from villa.datasets.vocabulary import write_vocabulary

    assert load_vocabulary_file(write_vocabulary(tmp_path, vocab)) == vocab  # written and read back


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("negated: maybe\nattributes: [a]\n", "'negated' must be drop or keep"),
        ("uncertain: false\nattributes: [a]\n", "'uncertain' must be keep or drop"),
        ("negation: keep\nattributes: [a]\n", "unknown top-level keys ['negation']"),
    ],
)
def test_bad_policy_keys_are_one_line(tmp_path, text, message):
    path = tmp_path / "attributes.yaml"
    path.write_text(text)
    with pytest.raises(VillaError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_vocabulary_file(path)
    with pytest.raises(VillaError, match="negated must be"):
        FINDINGS.with_policy(negated="ignore")


# --------------------------------------------------------------------------- today's captions are unchanged
def test_docmnist_and_shapes_captions_match_as_before(tmp_path):
    """No DocMNIST or shapes caption (without --negations) holds a trigger that changes its attributes."""
    from conftest import synthetic_digit_pools

    from villa.datasets.shapes import CATEGORIES, make_shapes_coco
    from villa.docmnist.generate import generate_docmnist
    from villa.docmnist.vocabulary import ATTRIBUTES, TEMPLATES, docmnist_vocabulary

    vocab = docmnist_vocabulary()
    every_sentence = [
        t.format(a) for kind, templates in TEMPLATES.items() for t in templates for a in ATTRIBUTES
    ]
    result = generate_docmnist(
        attribute_budget=120, target_sample_complexity=8, seed=5, val_attribute_budget=0, test_attribute_budget=0,
        data_root=tmp_path, digit_pools=synthetic_digit_pools(per_label=1), progress=False,
    )  # fmt: skip
    captions = Dataset.open(result.dataset_dir).annotations()["text"].tolist()
    for texts in (every_sentence, captions):
        naive = vocab.with_policy("keep", "keep").match_matrix(texts)
        assert naive.any() and (vocab.match_matrix(texts) == naive).all()
        assert (vocab.status_matrix(texts)[naive] == PRESENT).all()
    assert Dataset.open(result.dataset_dir).vocabulary == vocab

    shapes = make_shapes_coco(tmp_path / "shapes", num_images=40, seed=1, progress=False)
    texts = [c["caption"] for c in json.loads((shapes / "captions.json").read_text())["annotations"]]
    shape_vocab = Vocabulary.from_names(CATEGORIES)
    naive = shape_vocab.with_policy("keep", "keep").match_matrix(texts)
    assert naive.any() and (shape_vocab.status_matrix(texts)[naive] == PRESENT).all()


# --------------------------------------------------------------------------- the shapes generator's denials
def _tree_digest(folder) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_shapes_negations(tmp_path):
    from villa.datasets.shapes import CATEGORIES, make_shapes_coco

    plain = make_shapes_coco(tmp_path / "plain", num_images=24, seed=2, progress=False)
    zero = make_shapes_coco(tmp_path / "zero", num_images=24, seed=2, progress=False, negations=0.0)
    denied = make_shapes_coco(tmp_path / "denied", num_images=24, seed=2, progress=False, negations=1.0)
    again = make_shapes_coco(tmp_path / "again", num_images=24, seed=2, progress=False, negations=1.0)
    every = make_shapes_coco(tmp_path / "every", num_images=4, seed=2, progress=False, negations=1.0,
                             objects=(16, 20), height=(400, 400), width=(500, 500))  # fmt: skip
    assert (every / "captions.json").is_file()  # images showing all 8 shapes have none to deny
    assert _tree_digest(zero) == _tree_digest(plain)  # P=0: byte-identical
    assert _tree_digest(again) == _tree_digest(denied)  # same seed, same bytes
    digests = _tree_digest(denied)
    assert {k: v for k, v in digests.items() if k not in ("captions.json", "shapes.json")} == {
        k: v for k, v in _tree_digest(plain).items() if k not in ("captions.json", "shapes.json")
    }  # the images and boxes do not change (the marker records the setting)

    def texts_of(folder):
        by_image: dict[int, list[str]] = {}
        for c in json.loads((folder / "captions.json").read_text())["annotations"]:
            by_image.setdefault(c["image_id"], []).append(c["caption"])
        return by_image

    before, after = texts_of(plain), texts_of(denied)
    vocab = Vocabulary.from_names(CATEGORIES)
    shown = {}
    for a in json.loads((plain / "instances.json").read_text())["annotations"]:
        shown.setdefault(a["image_id"], set()).add(CATEGORIES[a["category_id"] - 1])
    extra = []
    for image_id, captions in after.items():
        added = [c for c in captions if c not in before[image_id]]
        assert len(added) == 1 and len(captions) == len(before[image_id]) + 1
        denied_shapes = vocab.with_policy("keep").text_attributes(added)[0]
        assert len(denied_shapes) == 1 and denied_shapes[0] not in shown[image_id]  # an absent shape
        assert vocab.status_matrix(added)[0].max() == NEGATED
        extra.append(added[0])
        # the handled matcher reads the image's attributes as if the denial were not there
        assert vocab.text_attributes([" . ".join(captions)]) == vocab.text_attributes(
            [" . ".join(before[image_id])]
        )
        assert (
            vocab.with_policy("keep").text_attributes([" . ".join(captions)])[0]
            != vocab.text_attributes([" . ".join(captions)])[0]
        )
    assert len(set(extra)) > 5  # varied templates
    assert any(" no " in f" {t.lower()} " and t.split()[-2].endswith("s") for t in extra)  # plural forms too
    with pytest.raises(VillaError, match="--negations"):
        make_shapes_coco(tmp_path / "bad", num_images=1, negations=1.5, progress=False)


# --------------------------------------------------------------------------- sentence choice and pairs
def test_sentence_choice_never_picks_a_denial():
    from villa.mapping.assign import choose_sentences

    vocab = Vocabulary.from_names(["star", "circle"])
    texts = ["No star can be seen . A red star and a circle . A star", "No star here . A circle"]
    for v in (vocab, vocab.with_policy("keep")):
        mentioned = v.text_attributes(texts)
        for seed in range(12):
            chosen = choose_sentences(texts, mentioned, v, seed)
            assert chosen[0, 0] in ("A red star and a circle", "A star")
            assert chosen[1, 0] == ""  # only denied: with negated: keep stage 1 sees it, but gets no sentence
            assert chosen[1, 1] == "A circle"
    assert vocab.text_attributes(texts)[1] == ["circle"]
    assert vocab.with_policy("keep").text_attributes(texts)[1] == ["star", "circle"]


def test_oracle_pairs_never_carry_a_denial():
    import pandas as pd

    from villa.vlm.data import build_pairs

    vocab = Vocabulary.from_names(["star", "circle"]).with_policy("keep")
    frame = pd.DataFrame({
        "text": ["No star can be seen . A circle", "A star . No circle"],
        "image_size": [[10, 10], [10, 10]],
        "num_regions": [2, 1],
        "region_coord": [[[0, 0, 5, 5], [5, 5, 9, 9]], [[0, 0, 5, 5]]],
        "reg_to_attr": [[["star"], ["circle"]], [["star", "circle"]]],
    })  # fmt: skip
    offsets, _, texts = build_pairs(frame, "oracle", vocabulary=vocab, seed=0)
    regions = [texts[offsets[i] + 1 : offsets[i + 1]] for i in range(2)]  # each image's pairs after its whole
    # the star region of image 0 and the circle of image 1 have only a denial: no pair, not a denying one
    assert regions == [["A circle"], ["A star"]]


# --------------------------------------------------------------------------- the importers
def test_import_prints_and_records_the_policy(tmp_path, capsys):
    from villa.datasets.shapes import make_shapes_coco
    from villa.ingest import main

    coco = make_shapes_coco(tmp_path / "coco", num_images=20, seed=4, progress=False, negations=0.5)
    args = [f"--images={coco / 'images'}", f"--instances={coco / 'instances.json'}",
            f"--captions={coco / 'captions.json'}", "--no_progress"]  # fmt: skip
    main(["coco", *args, f"--out={tmp_path / 'handled'}"])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("negation:"))
    assert ' attribute mentions negated (e.g. "' in line and line.endswith("; negated: drop, uncertain: keep")
    handled = Dataset.open(tmp_path / "handled")
    assert (handled.vocabulary.negated, handled.vocabulary.uncertain) == ("drop", "keep")
    assert "negated: drop" in (tmp_path / "handled" / "attributes.yaml").read_text()

    main(["coco", *args, f"--out={tmp_path / 'naive'}", "--negated=keep", "--uncertain=drop"])
    assert "; negated: keep, uncertain: drop" in capsys.readouterr().out
    naive = Dataset.open(tmp_path / "naive")
    assert (naive.vocabulary.negated, naive.vocabulary.uncertain) == ("keep", "drop")
    # the stored attributes follow the policy: the naive import lists the denied shapes too
    h, n = handled.annotations(), naive.annotations()
    assert (h["text"] == n["text"]).all()
    extra = [set(b) - set(a) for a, b in zip(h["attributes"], n["attributes"])]
    assert any(extra) and all(not (set(a) - set(b)) for a, b in zip(h["attributes"], n["attributes"]))
    # reachable truth: a denied shape is never a pair the mapping may find
    assert handled.vocabulary.match_matrix(h["text"].tolist()).tolist() == [
        [name in attrs for name in handled.vocabulary.names] for attrs in h["attributes"]
    ]


def test_import_refuses_texts_that_only_deny(tmp_path):
    from villa.datasets.importing import check_vocabulary_matches

    vocab = Vocabulary.from_names(["star"])
    with pytest.raises(VillaError, match="every mention is negated or uncertain"):
        check_vocabulary_matches(vocab, ["No star here.", "There are no stars."])
    lines = check_vocabulary_matches(vocab.with_policy("keep"), ["No star here.", "A star."])
    assert lines == ['negation: 1 of 2 attribute mentions negated (e.g. "no star here"), 0 uncertain; '
                     "negated: keep, uncertain: keep"]  # fmt: skip


def test_free_is_not_a_negation_in_captions():
    """'free' alone is not a trigger ("a free park"); 'free of' is."""
    vocab = Vocabulary.from_names(["dog", "frisbee", "cloud"])
    assert vocab.text_attributes(["A dog catches a frisbee in a free park."]) == [["dog", "frisbee"]]
    assert vocab.text_attributes(["A blue sky free of clouds."]) == [[]]
