"""DocMNIST's attribute vocabulary and caption templates (docs/method.md section 2.2).

Everything dataset-specific that the models and losses must not hard-code lives here.
"""

from __future__ import annotations

DIGIT_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)

#: colour name -> RGB painted on every digit pixel whose grey value is >= 120
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "yellow": (208, 255, 0),
    "green": (0, 255, 92),
    "blue": (0, 116, 255),
    "purple": (184, 0, 255),
}
SHAPES: tuple[str, ...] = ("rectangle", "circle")
SIZES: tuple[str, ...] = ("small", "medium", "large")

#: the 20 attributes in vocabulary order
ATTRIBUTES: tuple[str, ...] = DIGIT_WORDS + tuple(COLORS) + SHAPES + SIZES

KINDS: tuple[str, ...] = ("digit", "color", "shape", "size")

#: attribute -> its kind
ATTRIBUTE_KIND: dict[str, str] = {
    **{a: "digit" for a in DIGIT_WORDS},
    **{a: "color" for a in COLORS},
    **{a: "shape" for a in SHAPES},
    **{a: "size" for a in SIZES},
}

#: kind -> caption sentence templates; ``{}`` is the attribute
TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("the color is {}", "the digit appears to be {}", "there is a {} image", "the image is {}"),
    "digit": (
        "the image shows a {}",
        "the digit appears to be {}",
        "there is an image showing a {}",
        "the number is a {}",
    ),
    "shape": ("the shape is a {}", "the shape appears to be a {}", "there is a {}", "the image has a {}"),
    "size": ("the shape size is {}", "the size of the shape is {}", "the shape is {}"),
}


def attribute_prompts(attribute: str) -> list[str]:
    """The prompts of one attribute: every caption template of its kind filled with it."""
    return [template.format(attribute) for template in TEMPLATES[ATTRIBUTE_KIND[attribute]]]


def docmnist_vocabulary():
    """DocMNIST's :class:`villa.datasets.Vocabulary`: the 20 attributes with their caption templates as prompts
    and their kinds (written into every DocMNIST folder as ``attributes.yaml``)."""
    from villa.datasets.vocabulary import Vocabulary, make_attribute

    return Vocabulary(
        tuple(make_attribute(a, prompts=attribute_prompts(a), kind=ATTRIBUTE_KIND[a]) for a in ATTRIBUTES)
    )
