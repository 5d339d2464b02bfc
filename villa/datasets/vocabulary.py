"""A dataset's attribute vocabulary (``attributes.yaml``) and the text matcher: the one reader and writer.

File format::

    attributes:
      - name: half moon              # required; may be several words
        prompts: ["a half moon", "there is a half moon"]   # optional; default: [name]
        match: ["half moon", "half moons"]                 # optional; default: [name, plural(name)]
        kind: shape                                        # optional; groups per-kind metrics
    negated: drop        # optional: drop (default) or keep the attributes a text mentions only to deny them
    uncertain: keep      # optional: keep (default) or drop the attributes a text mentions only as possible

An image's attributes come from its **text**: attribute ``a`` is mentioned when the lower-cased text holds one
of ``a.match`` as a whole word or whole phrase (no letter, digit or underscore on either side; any run of
white space inside a phrase matches a single space). Each mention is present, negated ("no half moon") or
uncertain ("possibly a half moon"), read by :mod:`villa.datasets.assertion`; the policy keys say which
mentions count. Nothing else decides it: stage 1 trains on these sets, never on region labels.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path

import numpy as np

from villa.datasets.assertion import NEGATED, PRESENT, STATUS_NAMES, UNCERTAIN, mention_status, normalise
from villa.storage.errors import VillaError

VOCABULARY_FILE = "attributes.yaml"
#: the values of the policy keys, default first
NEGATED_POLICIES = ("drop", "keep")
UNCERTAIN_POLICIES = ("keep", "drop")

#: irregular English plurals common in captions (the default ``match`` of a name ending in one of these words)
IRREGULAR_PLURALS = {
    "person": "people",
    "man": "men",
    "woman": "women",
    "child": "children",
    "mouse": "mice",
    "foot": "feet",
    "tooth": "teeth",
    "goose": "geese",
    "knife": "knives",
    "leaf": "leaves",
    "wolf": "wolves",
    "shelf": "shelves",
    "loaf": "loaves",
    "calf": "calves",
    "half": "halves",
    "sheep": "sheep",
    "fish": "fish",
    "deer": "deer",
    "skis": "skis",
    "scissors": "scissors",
    "glasses": "glasses",
}


def plural(phrase: str) -> str:
    """The English plural of a noun phrase's last word: ``"half moon" -> "half moons"``, ``"bus" -> "buses"``."""
    head, _, last = phrase.rpartition(" ")
    lower = last.lower()
    if lower in IRREGULAR_PLURALS:
        word = IRREGULAR_PLURALS[lower]
    elif lower.endswith(("s", "x", "z", "ch", "sh")):
        word = last + "es"
    elif len(lower) > 1 and lower.endswith("y") and lower[-2] not in "aeiou":
        word = last[:-1] + "ies"
    else:
        word = last + "s"
    return f"{head} {word}" if head else word


@dataclass(frozen=True)
class Attribute:
    """One vocabulary entry (see the module docstring)."""

    name: str
    prompts: tuple[str, ...]
    match: tuple[str, ...]
    kind: str | None = None


def _normalise_space(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True)
class Mentions:
    """Every attribute mention in a list of texts, with its assertion status (``M`` mentions).

    ``text``, ``attribute``: int64 ``[M]`` (text index, vocabulary index); ``start``, ``end``: int64 ``[M]``
    character offsets in ``corpus`` (the :func:`~villa.datasets.assertion.normalise`-d texts joined with
    U+0000); ``status``: uint8 ``[M]`` (``PRESENT``, ``UNCERTAIN`` or ``NEGATED``).
    """

    corpus: str
    text: np.ndarray
    attribute: np.ndarray
    start: np.ndarray
    end: np.ndarray
    status: np.ndarray

    def __len__(self) -> int:
        return len(self.text)

    def sentence(self, i: int, limit: int = 70) -> str:
        """The (lower-cased) sentence holding mention ``i``, cut to about ``limit`` characters around it."""
        start, end = int(self.start[i]), int(self.end[i])
        left = max(self.corpus.rfind(c, 0, start) for c in _SENTENCE_STOPS) + 1
        right = min((p for p in (self.corpus.find(c, end) for c in _SENTENCE_STOPS) if p >= 0), default=None)
        left = max(left, start - limit // 2)
        right = min(len(self.corpus) if right is None else right, max(end, left + limit))
        return " ".join(self.corpus[left:right].split())


#: characters an example sentence stops at (as the assertion scopes do)
_SENTENCE_STOPS = ".!?;\0\n"


@dataclass(frozen=True)
class Vocabulary:
    """The attributes of a dataset, in file order (the order of every ``[.., K]`` axis in the pipeline), and the
    policy for negated and uncertain mentions (``negated``: ``drop`` or ``keep``; ``uncertain``: ``keep`` or
    ``drop``)."""

    attributes: tuple[Attribute, ...]
    negated: str = NEGATED_POLICIES[0]
    uncertain: str = UNCERTAIN_POLICIES[0]
    _patterns: tuple[re.Pattern, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not self.attributes:
            raise VillaError("the attribute vocabulary is empty")
        names = [a.name for a in self.attributes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise VillaError(f"the attribute vocabulary names {duplicates[0]!r} twice")
        if self.negated not in NEGATED_POLICIES:
            raise VillaError(f"negated must be {' or '.join(NEGATED_POLICIES)}, got {self.negated!r}")
        if self.uncertain not in UNCERTAIN_POLICIES:
            raise VillaError(f"uncertain must be {' or '.join(UNCERTAIN_POLICIES)}, got {self.uncertain!r}")
        patterns = []
        for attr in self.attributes:
            alternatives = sorted({normalise(_normalise_space(m)) for m in attr.match if m.strip()}, key=len)
            if not alternatives:
                raise VillaError(f"attribute {attr.name!r} has no non-empty 'match' phrase")
            # longest first, so "half moons" wins over "half moon" at the same position
            body = "|".join(r"\s+".join(map(re.escape, m.split())) for m in reversed(alternatives))
            patterns.append(re.compile(rf"(?<!\w)(?:{body})(?!\w)"))
        object.__setattr__(self, "_patterns", tuple(patterns))

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_names(cls, names: Iterable[str], kinds: dict[str, str] | None = None) -> Vocabulary:
        """Every attribute with the default prompts and match phrases (and ``kinds[name]`` if given)."""
        return cls(tuple(make_attribute(n, kind=(kinds or {}).get(n)) for n in names))

    def with_policy(self, negated: str | None = None, uncertain: str | None = None) -> Vocabulary:
        """This vocabulary with the policy keys given (None: unchanged), e.g. from ``--negated=keep``."""
        return replace(
            self,
            negated=self.negated if negated is None else negated,
            uncertain=self.uncertain if uncertain is None else uncertain,
        )

    # ---------------------------------------------------------------- views
    def __len__(self) -> int:
        return len(self.attributes)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.attributes]

    def index(self, name: str) -> int:
        for k, attr in enumerate(self.attributes):
            if attr.name == name:
                return k
        raise VillaError(f"unknown attribute {name!r}")

    def prompts(self, name: str) -> list[str]:
        return list(self.attributes[self.index(name)].prompts)

    @property
    def has_kinds(self) -> bool:
        return any(a.kind for a in self.attributes)

    @property
    def kinds(self) -> dict[str, str] | None:
        """attribute -> kind (``"other"`` for attributes without one), or None when no attribute has a kind."""
        if not self.has_kinds:
            return None
        return {a.name: a.kind or "other" for a in self.attributes}

    @property
    def kept_statuses(self) -> int:
        """The status flags of the mentions that count under the policy (``PRESENT`` always)."""
        return (
            PRESENT
            | (NEGATED if self.negated == "keep" else 0)
            | (UNCERTAIN if self.uncertain == "keep" else 0)
        )

    # ---------------------------------------------------------------- the text matcher
    def mentions(self, texts: Sequence[str], assertion: bool = True) -> Mentions:
        """Every mention of every attribute in ``texts``, with its status (all ``PRESENT`` when not
        ``assertion``).

        All texts are joined into one normalised string and each attribute is found by one regex scan, so
        the cost is K scans of the corpus, not N x K Python tests; the statuses take a few more scans
        (:func:`villa.datasets.assertion.mention_status`). A match cannot straddle two texts: their
        separator, U+0000, is neither ``\\w`` (so it bounds words) nor ``\\s`` (so no phrase spans it).
        """
        lowered = [normalise(t) for t in texts]
        corpus = "\0".join(lowered)
        spans = [
            np.fromiter(chain.from_iterable(m.span() for m in p.finditer(corpus)), np.int64)
            for p in self._patterns
        ]
        counts = np.fromiter((len(s) // 2 for s in spans), dtype=np.int64, count=len(spans))
        flat = np.concatenate(spans) if spans else np.zeros(0, np.int64)
        start, end = flat[0::2], flat[1::2]
        attribute = np.repeat(np.arange(len(spans), dtype=np.int64), counts)
        lengths = np.fromiter((len(t) + 1 for t in lowered), dtype=np.int64, count=len(lowered))
        text_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lowered) else lengths
        text = np.searchsorted(text_starts, start, side="right") - 1
        status = mention_status(corpus, start, end) if assertion else np.full(len(start), PRESENT, np.uint8)
        return Mentions(corpus, text, attribute, start, end, status)

    def status_matrix(self, texts: Sequence[str]) -> np.ndarray:
        """``[N, K]`` uint8: the OR of the status flags (``PRESENT | UNCERTAIN | NEGATED``) of the mentions
        of attribute ``k`` in text ``n``; 0 where it is not mentioned."""
        found = self.mentions(texts)
        out = np.zeros((len(texts), len(self.attributes)), dtype=np.uint8)
        for flag in (PRESENT, UNCERTAIN, NEGATED):
            hit = found.status == flag
            out[found.text[hit], found.attribute[hit]] |= flag
        return out

    def match_matrix(self, texts: Sequence[str]) -> np.ndarray:
        """``[N, K]`` bool: text ``n`` mentions attribute ``k`` (whole word/phrase, case-insensitive, plurals
        as listed in ``match``) at least once in a way the policy keeps: present always, negated only with
        ``negated: keep``, uncertain only with ``uncertain: keep``. With both ``keep`` every mention counts
        and no assertion status is computed."""
        if self.kept_statuses == PRESENT | NEGATED | UNCERTAIN:
            found = self.mentions(texts, assertion=False)
            out = np.zeros((len(texts), len(self.attributes)), dtype=bool)
            out[found.text, found.attribute] = True
            return out
        return (self.status_matrix(texts) & self.kept_statuses) != 0

    def affirmed_matrix(self, texts: Sequence[str]) -> np.ndarray:
        """``[N, K]`` bool: as :meth:`match_matrix`, but a negated mention never counts, whatever the policy.
        Sentence choice uses it, so a region is never paired with a sentence that denies its attribute."""
        return (self.status_matrix(texts) & self.kept_statuses & ~np.uint8(NEGATED)) != 0

    def text_attributes(self, texts: Sequence[str]) -> list[list[str]]:
        """Each text's attributes (vocabulary order), from :meth:`match_matrix`."""
        rows, cols = np.nonzero(self.match_matrix(texts))
        names = self.names
        out: list[list[str]] = [[] for _ in texts]
        for r, c in zip(rows.tolist(), cols.tolist()):
            out[r].append(names[c])
        return out

    def assertion_summary(self, texts: Sequence[str]) -> str:
        """One line: how many mentions of ``texts`` are negated and uncertain, an example of each, the policy.

        e.g. ``negation: 412 of 3,120 attribute mentions negated (e.g. "no triangle can be seen"), 17 uncertain
        (e.g. "possibly a star"); negated: drop, uncertain: keep``
        """
        found = self.mentions(texts)
        parts = []
        for flag in (NEGATED, UNCERTAIN):
            hits = np.flatnonzero(found.status == flag)
            count = (
                f"{len(hits):,} of {len(found):,} attribute mentions" if flag == NEGATED else f"{len(hits):,}"
            )
            example = f' (e.g. "{found.sentence(int(hits[0]))}")' if len(hits) else ""
            parts.append(f"{count} {STATUS_NAMES[flag]}{example}")
        return f"negation: {', '.join(parts)}; negated: {self.negated}, uncertain: {self.uncertain}"

    # ---------------------------------------------------------------- file
    def to_dict(self) -> dict:
        entries = []
        for attr in self.attributes:
            entry: dict = {"name": attr.name, "prompts": list(attr.prompts), "match": list(attr.match)}
            if attr.kind:
                entry["kind"] = attr.kind
            entries.append(entry)
        return {"negated": self.negated, "uncertain": self.uncertain, "attributes": entries}


def make_attribute(
    name: str,
    prompts: Sequence[str] | None = None,
    match: Sequence[str] | None = None,
    kind: str | None = None,
) -> Attribute:
    """An :class:`Attribute` with the defaults filled in: prompts ``[name]``, match ``[name, plural(name)]``."""
    if not isinstance(name, str) or not name.strip():
        raise VillaError(f"an attribute needs a non-empty 'name', got {name!r}")
    name = _normalise_space(name)
    prompts = [name] if prompts is None else [str(p) for p in prompts]
    if match is None:
        match = list(dict.fromkeys([name, plural(name)]))
    return Attribute(name=name, prompts=tuple(prompts), match=tuple(str(m) for m in match), kind=kind or None)


def _field_list(entry: dict, key: str, where: str) -> list[str] | None:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value) or not value:
        raise VillaError(f"{where}: '{key}' must be a non-empty list of strings")
    return value


def vocabulary_from_dict(data, where: str = "vocabulary") -> Vocabulary:
    """Build a :class:`Vocabulary` from the parsed YAML (``{"attributes": [...], "negated": ..., "uncertain":
    ...}``); one-line errors."""
    if not isinstance(data, dict) or not isinstance(data.get("attributes"), list):
        raise VillaError(
            f"{where} must hold a list under 'attributes:' (see docs/datasets.md, 'The vocabulary and the matcher')"
        )
    unknown = sorted(map(str, set(data) - {"attributes", "negated", "uncertain"}))
    if unknown:
        raise VillaError(
            f"{where} has unknown top-level keys {unknown} (allowed: attributes, negated, uncertain)"
        )
    policy = {}
    for key, allowed in (("negated", NEGATED_POLICIES), ("uncertain", UNCERTAIN_POLICIES)):
        value = data.get(key, allowed[0])
        if value not in allowed:
            raise VillaError(f"{where}: '{key}' must be {' or '.join(allowed)}, got {value!r}")
        policy[key] = value
    attributes = []
    for i, entry in enumerate(data["attributes"]):
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict):
            raise VillaError(f"{where}: attribute #{i + 1} must be a mapping with a 'name'")
        unknown = sorted(set(entry) - {"name", "prompts", "match", "kind"})
        if unknown:
            raise VillaError(
                f"{where}: attribute #{i + 1} has unknown keys {unknown} (allowed: name, prompts, match, kind)"
            )
        kind = entry.get("kind")
        if kind is not None and not isinstance(kind, str):
            raise VillaError(f"{where}: attribute #{i + 1}: 'kind' must be a string")
        attributes.append(
            make_attribute(
                entry.get("name"),
                _field_list(entry, "prompts", where),
                _field_list(entry, "match", where),
                kind,
            )
        )
    return Vocabulary(tuple(attributes), **policy)


def load_vocabulary_file(path: str | os.PathLike) -> Vocabulary:
    """Read a vocabulary YAML file anywhere on disk (e.g. a user's ``--attributes`` file)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise VillaError(f"attribute vocabulary {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VillaError(f"{path} is not valid YAML: {first}") from None
    return vocabulary_from_dict(data, str(path))


def write_vocabulary(folder: str | os.PathLike, vocabulary: Vocabulary) -> Path:
    """Write ``<folder>/attributes.yaml`` atomically."""
    import yaml

    from villa.storage.io import atomic_path

    path = Path(folder) / VOCABULARY_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(vocabulary.to_dict(), sort_keys=False, allow_unicode=True, width=110))
    return path
