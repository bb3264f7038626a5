"""What a leaked personal number looks like, for the suite-wide guard and tests."""

from __future__ import annotations

import re

__all__ = ["LEAK", "WRITTEN_FORMS", "find_leak"]

#: What a leaked personal number looks like in any output: digits of any
#: script (``\d`` is Unicode-aware), grouped by ASCII or ideographic spaces or
#: ASCII or full-width hyphens.
LEAK = re.compile(r"(?<!\d)(?:\d{12}|\d{4}[ \-　－]\d{4}[ \-　－]\d{4})(?!\d)")
#: How a personal number may be written in an export: each must be pseudonymised and each is a leak.
WRITTEN_FORMS = {
    "plain": "123456789018",
    "hyphens": "1234-5678-9018",
    "spaces": "1234 5678 9018",
    "full-width digits": "１２３４５６７８９０１８",
    "full-width, full-width hyphens": "１２３４－５６７８－９０１８",
    "ASCII digits, full-width hyphens": "1234－5678－9018",
    "ideographic spaces": "1234\u30005678\u30009018",
    "full-width, ideographic spaces": "１２３４\u3000５６７８\u3000９０１８",
    "mixed widths": "1234５６７８9018",
}
_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")


def find_leak(text: str) -> str | None:
    """The first 12-digit run in ``text`` (JSON ``\\u`` escapes read as what they stand for), masked, or ``None``."""
    if "\\u" in text:
        text = _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)
    match = LEAK.search(text)
    if match is None:
        return None
    start = max(0, match.start() - 30)
    return text[start : match.start()] + "<12 digits>" + text[match.end() : match.end() + 30]
