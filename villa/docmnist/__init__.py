"""DocMNIST: a synthetic vision-language dataset whose image-text sample complexity is dialled by flags."""

from villa.docmnist.vocabulary import (
    ATTRIBUTE_KIND,
    ATTRIBUTES,
    COLORS,
    DIGIT_WORDS,
    KINDS,
    SHAPES,
    SIZES,
    TEMPLATES,
    attribute_prompts,
    docmnist_vocabulary,
)

__all__ = [
    "ATTRIBUTES",
    "ATTRIBUTE_KIND",
    "COLORS",
    "DIGIT_WORDS",
    "KINDS",
    "SHAPES",
    "SIZES",
    "TEMPLATES",
    "attribute_prompts",
    "docmnist_vocabulary",
]
