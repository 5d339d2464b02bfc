"""Caption text handling shared by the stages."""

from __future__ import annotations


def split_sentences(text: str) -> list[str]:
    """Split a caption into sentences: on ".", stripped, kept when longer than 3 characters."""
    return [s.strip() for s in text.split(".") if len(s.strip()) > 3]
