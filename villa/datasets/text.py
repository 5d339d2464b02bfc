"""Caption text handling shared by the stages.

:func:`split_sentences` cuts a text into the sentences that stage 1 assigns to regions and stage 2 embeds.
Its rules, in order:

1. A full stop is not a boundary when it is a decimal point (``3.5 cm``, ``0.75``), the stop of a known
   abbreviation (:data:`ABBREVIATIONS`: ``Dr.``, ``Mr.``, ``Mrs.``, ``Ms.``, ``Prof.``, ``St.``, ``Jr.``,
   ``Sr.``, ``vs.``, ``cf.``, ``approx.``, ``Fig.``, ``e.g.``, ``i.e.``, in any case) or ``No.`` before a
   number (``No. 5``).
2. An enumeration marker, a number of one or two digits followed by ``.`` or ``)`` (``1.``, ``2)``,
   ``(3)``) at the start of the text or right after a boundary, a colon or a line break, starts a new
   sentence and is dropped: ``IMPRESSION: 1. No effusion. 2. Stable cardiomegaly.`` gives
   ``IMPRESSION``, ``No effusion``, ``Stable cardiomegaly``.
3. Every other ``.``, and every ``!``, ``?`` and ``;``, ends a sentence (wherever it stands: ``a.b`` is
   two pieces).
4. Sentences are stripped of surrounding white space and kept when longer than 3 characters (shorter
   pieces are separators and stray markers).

On texts without digits next to a full stop, listed abbreviations, ``!``, ``?`` or ``;`` (DocMNIST's
captions, captions joined with ``" . "``) this is ``[s.strip() for s in text.split(".") if len(s.strip()) > 3]``.

:func:`split_clauses` cuts one sentence further, at its commas and at the words of :data:`CLAUSE_JOINERS`
("Two half moons, a red star and three circles on a cluttered background" gives ``Two half moons``,
``a red star``, ``three circles on a cluttered background``), so that stage 1 can pair a region with the
part of a sentence that names its attribute rather than with a sentence that lists every object of the
image (docs/method.md section 4.6). Pieces of 3 characters or fewer are dropped, as sentences are.
"""

from __future__ import annotations

import re

#: abbreviations whose full stop does not end a sentence (matched as whole words, any case)
ABBREVIATIONS = ("dr", "mr", "mrs", "ms", "prof", "st", "jr", "sr", "vs", "cf", "approx", "fig", "e.g", "i.e")

#: minimum length (exclusive) of a kept sentence
MIN_SENTENCE_CHARS = 3

#: words that join two clauses of a sentence ("a red star and two circles"); each starts a new clause
CLAUSE_JOINERS = ("and", "or", "but", "with", "while", "plus")
# a comma not between two digits ("1,000"), with an optional joining word after it; or a joining word
_CLAUSE_BOUNDARY = re.compile(
    r"(?:(?<!\d),|,(?!\d))\s*(?:(?:"
    + "|".join(CLAUSE_JOINERS)
    + r")\s+)?|\s(?:"
    + "|".join(CLAUSE_JOINERS)
    + r")\s",
    re.IGNORECASE,
)

# placeholders: a protected full stop, and a boundary put where an enumeration marker was
_KEPT_DOT, _BREAK = "\x00", "\x01"


def _abbreviation_stops(abbreviation: str) -> list[str]:
    """Patterns, each starting at one full stop of ``abbreviation + "."`` (``e.g.``: both stops), that
    match it when the abbreviation is a whole word. Every pattern starts with the full stop itself, so a
    search skips to the text's full stops instead of trying every position."""
    word = abbreviation + "."
    out = []
    for i, char in enumerate(word):
        if char == ".":
            before, after = re.escape(word[: i + 1]), re.escape(word[i + 1 :])
            out.append(rf"(?<={before})(?<![\w.]{before})" + (rf"(?={after})" if after else ""))
    return out


_STOP_RULES = [r"(?<=\d\.)(?=\d)"]  # decimal point
_STOP_RULES += [p for a in ABBREVIATIONS for p in _abbreviation_stops(a)]
_STOP_RULES.append(r"(?<=no\.)(?<![\w.]no\.)(?=\s*\d)")  # No. 5
# (every rule needs a letter or digit before the stop: checked first, it rejects " . " at once)
_PROTECTED = re.compile(r"\.(?<=\w\.)(?:" + "|".join(_STOP_RULES) + ")", re.IGNORECASE)
# a number followed by "." or ")": maybe a marker (literal first: a search jumps between those characters)
_DIGIT_DOT, _DIGIT_PAREN = re.compile(r"\.(?<=\d\.)"), re.compile(r"\)(?<=\d\))")
_MARKER = re.compile(r"(?:^|(?<=[.!?;:\n]))\s*(?:\(\d{1,2}\)|\d{1,2}[.)])(?=\s)")
_BOUNDARY = re.compile(r"[.!?;\x01]")


def split_sentences(text: str) -> list[str]:
    """Split a caption into sentences (rules in the module docstring), each stripped, in text order."""
    protected = _PROTECTED.search(text) is not None
    marker = _DIGIT_DOT.search(text) is not None or (")" in text and _DIGIT_PAREN.search(text) is not None)
    if not (protected or marker or "!" in text or "?" in text or ";" in text):
        # the common case (e.g. every DocMNIST caption): a plain split on full stops
        return [s for s in (p.strip() for p in text.split(".")) if len(s) > MIN_SENTENCE_CHARS]
    if protected:
        text = _PROTECTED.sub(_KEPT_DOT, text)
    if marker:
        text = _MARKER.sub(_BREAK, text)
    pieces = (p.strip().replace(_KEPT_DOT, ".") for p in _BOUNDARY.split(text))
    return [s for s in pieces if len(s) > MIN_SENTENCE_CHARS]


def clause_spans(sentence: str) -> list[tuple[int, int]]:
    """The ``(start, end)`` character spans of the clauses of one sentence (a piece of
    :func:`split_sentences`), in text order: the pieces between its commas (not those between two digits)
    and the joining words of :data:`CLAUSE_JOINERS`, stripped, kept when longer than 3 characters and when
    :func:`split_sentences` leaves them as they are (so a clause is always a text stage 2 can look up; a
    piece starting with a list marker, "2) small effusion", is dropped)."""
    spans, start = [], 0
    for boundary in [*_CLAUSE_BOUNDARY.finditer(sentence), None]:
        end = len(sentence) if boundary is None else boundary.start()
        piece = sentence[start:end]
        left = len(piece) - len(piece.lstrip())
        stripped = piece.strip()
        if len(stripped) > MIN_SENTENCE_CHARS and split_sentences(stripped) == [stripped]:
            spans.append((start + left, start + left + len(stripped)))
        if boundary is not None:
            start = boundary.end()
    return spans


def split_clauses(sentence: str) -> list[str]:
    """The clauses of one sentence (:func:`clause_spans`) as strings. A sentence without a comma or a joining
    word is its own single clause."""
    return [sentence[start:end] for start, end in clause_spans(sentence)]
