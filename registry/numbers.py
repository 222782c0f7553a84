"""Numbers in text from clients, upstreams and Redis: ASCII digits only.

`str.isdigit()` also takes '²' and other Unicode digits, which `int()` refuses: a header or a
query parameter holding one must be a bad value, not a 500.
"""

from __future__ import annotations


def is_count(text: str | None) -> bool:
    """True for a non-empty string of ASCII digits."""
    return bool(text) and text.isascii() and text.isdigit()  # type: ignore[union-attr]


def count_or_none(text: str | None) -> int | None:
    """The value of a string of ASCII digits (surrounding blanks allowed), else None."""
    text = (text or "").strip()
    return int(text) if is_count(text) else None
