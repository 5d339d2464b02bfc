"""The sentence splitter on report-style text, DocMNIST captions and captions joined by the COCO importer."""

import numpy as np
import pytest

from villa.datasets.text import split_sentences


def _plain(text: str) -> list[str]:
    """The plain rule: split on every full stop, keep stripped pieces longer than 3 characters."""
    return [s.strip() for s in text.split(".") if len(s.strip()) > 3]


REPORT = (
    "FINDINGS: Dr. Smith compared with the prior study, i.e. the CT of 3.5.2021. "
    "A 3.5 cm nodule in the right upper lobe vs. 2.9 cm before; no pleural effusion. "
    "Heart size normal, e.g. cardiothoracic ratio 0.45! Is there a pneumothorax? None seen.\n"
    "IMPRESSION: 1. Growing nodule, approx. 6 mm per year. 2. No effusion. 3) Follow-up in No. 2 clinic "
    "at St. Mary's, Mrs. Jones informed."
)


def test_report_text_keeps_decimals_abbreviations_and_enumerations():
    assert split_sentences(REPORT) == [
        "FINDINGS: Dr. Smith compared with the prior study, i.e. the CT of 3.5.2021",
        "A 3.5 cm nodule in the right upper lobe vs. 2.9 cm before",
        "no pleural effusion",
        "Heart size normal, e.g. cardiothoracic ratio 0.45",
        "Is there a pneumothorax",
        "None seen",
        "IMPRESSION:",
        "Growing nodule, approx. 6 mm per year",
        "No effusion",
        "Follow-up in No. 2 clinic at St. Mary's, Mrs. Jones informed",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The lesion measures 3. No change since then.", ["The lesion measures 3", "No change since then"]),
        ("1. Heart normal\n2. Lungs clear", ["Heart normal", "Lungs clear"]),  # markers after line breaks
        ("(1) small effusion (2) no nodule", ["small effusion (2) no nodule"]),  # a marker mid-line stays
        ("Seen by DR. ADAMS and Prof. Lee", ["Seen by DR. ADAMS and Prof. Lee"]),
        (
            "Answer: no. It is absent",
            ["Answer: no", "It is absent"],
        ),  # "no." ends a sentence unless before a number
        ("Dose 0.5 mg. Repeat in 12 h", ["Dose 0.5 mg", "Repeat in 12 h"]),
        ("a.b red. ok. fine", ["b red", "fine"]),  # pieces of 3 characters or fewer are dropped
        ("", []),
    ],
)
def test_rules(text, expected):
    assert split_sentences(text) == expected


def test_sentences_joined_again_split_the_same():
    # stage 1 joins a region's sentences with " . " and stage 2 splits them again
    sentences = split_sentences(REPORT)
    assert split_sentences(" . ".join(sentences)) == sentences


def test_docmnist_captions_split_as_on_every_full_stop():
    from villa.docmnist.vocabulary import docmnist_vocabulary

    prompts = [p for attr in docmnist_vocabulary().attributes for p in attr.prompts]
    rng = np.random.default_rng(0)
    for _ in range(200):
        caption = " . ".join(rng.choice(prompts, size=int(rng.integers(1, 12))).tolist())
        assert split_sentences(caption) == _plain(caption)


def test_coco_importer_captions_split_as_on_every_full_stop():
    from villa.datasets.coco import _caption_text

    captions = [
        "A man riding a wave on top of a surfboard.",
        "Two dogs play in the grass ",
        "A plate with 2 eggs and a slice of toast.",
        "A kitchen with a stove, a sink and a fridge.",
        "a bus parked next to a red building",
    ]
    joined = _caption_text(captions)
    assert split_sentences(joined) == _plain(joined) == [c.strip().rstrip(".") for c in captions]
