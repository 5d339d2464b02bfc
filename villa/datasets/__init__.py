"""Datasets: the contract every stage reads, the attribute vocabulary and text matcher, and the importers.

- :mod:`villa.datasets.contract`   THE reader/writer/validator of a dataset folder
- :mod:`villa.datasets.vocabulary` ``attributes.yaml`` and the text matcher (an image's attributes come from its text)
- :mod:`villa.datasets.assertion`  each mention's status: present, negated or uncertain (NegEx / ConText)
- :mod:`villa.datasets.coco`       importer for COCO ``instances`` + ``captions`` JSON (and detection proposals)
- :mod:`villa.datasets.table`      importer for a CSV/JSONL table of image paths and texts
- :mod:`villa.datasets.shapes`     a synthetic COCO-format dataset of shapes amid clutter (tests, examples)

DocMNIST (``villa.docmnist``) is one dataset among others: its generator writes this same contract. Nothing
outside ``villa.docmnist`` and the DocMNIST sweep imports it.
"""

from villa.datasets.contract import (
    ANNOTATIONS_FILE,
    COLUMNS,
    INFO_FILE,
    SPLITS,
    Dataset,
    attribute_multi_hot,
    read_annotations,
    read_info,
    read_vocabulary,
    region_boxes,
    region_offsets,
    region_truth,
    whole_image_boxes,
    write_dataset,
)
from villa.datasets.vocabulary import (
    VOCABULARY_FILE,
    Attribute,
    Vocabulary,
    load_vocabulary_file,
    make_attribute,
    plural,
)

__all__ = [
    "ANNOTATIONS_FILE",
    "COLUMNS",
    "INFO_FILE",
    "SPLITS",
    "VOCABULARY_FILE",
    "Attribute",
    "Dataset",
    "Vocabulary",
    "attribute_multi_hot",
    "load_vocabulary_file",
    "make_attribute",
    "plural",
    "read_annotations",
    "read_info",
    "read_vocabulary",
    "region_boxes",
    "region_offsets",
    "region_truth",
    "whole_image_boxes",
    "write_dataset",
]
