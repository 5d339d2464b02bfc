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
"""

from __future__ import annotations

import re

#: abbreviations whose full stop does not end a sentence (matched as whole words, any case)
ABBREVIATIONS = ("dr", "mr", "mrs", "ms", "prof", "st", "jr", "sr", "vs", "cf", "approx", "fig", "e.g", "i.e")

#: minimum length (exclusive) of a kept sentence
MIN_SENTENCE_CHARS = 3

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
