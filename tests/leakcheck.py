"""What a leaked personal number looks like, for the suite-wide guard and tests."""

from __future__ import annotations

import re

__all__ = ["LEAK", "find_leak"]

#: What a leaked personal number looks like in any output.
LEAK = re.compile(r"(?<!\d)(?:\d{12}|\d{4}[ \-]\d{4}[ \-]\d{4})(?!\d)")


def find_leak(text: str) -> str | None:
    """The first 12-digit run in ``text``, masked for the report, or ``None``."""
    match = LEAK.search(text)
    if match is None:
        return None
    start = max(0, match.start() - 30)
    return text[start : match.start()] + "<12 digits>" + text[match.end() : match.end() + 30]
