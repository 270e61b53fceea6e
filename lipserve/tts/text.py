"""Text clean-up and limits before any engine sees it."""
from __future__ import annotations

import re
import unicodedata

from lipserve.errors import EmptyText, TextTooLong

_WHITESPACE = re.compile(r"\s+")


def normalize_text(text: str, max_chars: int) -> str:
    """NFC, control characters dropped, whitespace runs collapsed to one space, stripped.

    Raises EmptyText (400) when nothing speakable (no letter or digit in any script) is
    left, TextTooLong (413) when the cleaned text is longer than `max_chars` characters.
    Non-Latin scripts (Hangul, CJK, Arabic, ...) pass through unchanged apart from NFC.
    """
    if not isinstance(text, str):
        raise EmptyText("text must be a string", field="word")
    # NFC first: Korean typed as conjoining jamo becomes the precomposed syllables engines expect
    text = unicodedata.normalize("NFC", text)
    # whitespace controls (\n, \t) become spaces below; other controls would only confuse engines
    text = "".join(ch for ch in text if ch.isspace() or unicodedata.category(ch) != "Cc")
    text = _WHITESPACE.sub(" ", text).strip()
    if not any(ch.isalnum() for ch in text):
        raise EmptyText("text has nothing to speak (no letters or digits)", field="word")
    if len(text) > max_chars:
        raise TextTooLong(
            f"text is {len(text)} characters after whitespace clean-up; the limit is {max_chars}",
            field="word",
        )
    return text
