"""Recognising personal numbers (個人番号) and replacing them with keyed pseudonyms.

Records made to check handling must not contain personal numbers, so every
value that could be one is replaced before an event goes anywhere: a keyed
HMAC pseudonym keeps equal numbers equal (detectors can still count repeats)
without being reversible by anyone who lacks the key.

A run of exactly 12 digits (optionally grouped ``1234 5678 9012`` or
``1234-5678-9012``, ASCII or full-width digits, grouped by an ASCII or
ideographic space or an ASCII or full-width hyphen) is replaced whether or
not its check digit is valid: a mistyped personal number is still a personal
number, and the downstream leak test rejects any 12-digit run in any output.
``is_valid_mynumber`` tells the two apart so the pipeline can count real ones.

Digits of other scripts (Arabic-Indic, Devanagari, ...) are not personal
numbers here: My Numbers are written in ASCII or full-width digits.

:func:`contains_twelve_digits` decides on the raw JSON bytes whether an
event needs scrubbing at all, so it must never say no when the decoded
strings hold a match: it also answers yes for full-width digits and
hyphens, ASCII digits grouped by ideographic spaces, and JSON ``\\u``
escapes of digits, spaces, hyphens or full-width forms.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import unicodedata

__all__ = [
    "MYNUMBER_PATTERN",
    "Pseudonymizer",
    "check_digit",
    "contains_twelve_digits",
    "contains_wide_or_escaped_digits",
    "is_valid_mynumber",
]

#: A standalone 12-digit run, plain or grouped 4-4-4 by one separator: ASCII
#: or full-width digits (０-９, common in Japanese exports); an ASCII or
#: ideographic space or an ASCII or full-width hyphen.
MYNUMBER_PATTERN = re.compile(
    r"(?<![0-9０-９])(?:[0-9０-９]{12}|[0-9０-９]{4}([ \-　－])[0-9０-９]{4}\1[0-9０-９]{4})(?![0-9０-９])"
)
#: ASCII digits, plain or grouped by an ASCII space or hyphen or an ideographic space (U+3000).
_BYTES_PATTERN = re.compile(rb"[0-9]{4}(?:[ \-]|\xe3\x80\x80)?[0-9]{4}(?:[ \-]|\xe3\x80\x80)?[0-9]{4}")
#: UTF-8 of a full-width hyphen (U+FF0D) or digit (U+FF10-U+FF19).
_FULLWIDTH = re.compile(rb"\xef\xbc[\x8d\x90-\x99]")
#: A JSON escape that may decode to a digit or separator: U+0020-U+003F (space,
#: hyphen, digits), U+3000 (ideographic space), U+FF00-U+FF1F (full-width
#: hyphen and digits). Hex digits of an escape may be upper or lower case.
_ESCAPE = re.compile(rb"\\u(?:00[23]|3000|[fF][fF][01])")

_WEIGHTS = (2, 3, 4, 5, 6, 7, 2, 3, 4, 5, 6)  # Q_n for n = 1..11, P_1 = rightmost body digit


def check_digit(body: str) -> int:
    """The check digit for the first 11 digits of a personal number.

    As defined by the Ministry of Internal Affairs' ordinance: with P_n the
    n-th digit from the right of the 11-digit body and Q_n = n+1 (n<=6) or
    n-5 (n>=7), the check digit is 0 when sum(P_n*Q_n) mod 11 <= 1, else
    11 minus that remainder.
    """
    if len(body) != 11 or not body.isdigit():
        raise ValueError("body must be 11 ASCII digits")
    total = sum(int(d) * q for d, q in zip(reversed(body), _WEIGHTS, strict=True))
    remainder = total % 11
    return 0 if remainder <= 1 else 11 - remainder


def _digits(value: str) -> str:
    """The ASCII digits of a (possibly full-width, grouped) number."""
    return "".join(str(unicodedata.digit(c)) for c in value if c.isdigit())


def is_valid_mynumber(value: str) -> bool:
    """True when ``value`` is 12 digits (ASCII or full-width) whose last digit checks out."""
    if any(not (c.isdigit() or c in " -　－") for c in value):
        return False
    digits = _digits(value)
    if len(digits) != 12:
        return False
    return check_digit(digits[:11]) == int(digits[11])


def contains_twelve_digits(raw: bytes) -> bool:
    """Cheap pre-check on raw (UTF-8 JSON) bytes: could anything in here be a personal number?

    Never no when the decoded text holds a :data:`MYNUMBER_PATTERN` match
    (or an integer of 12 digits); yes for some that do not.
    """
    return _BYTES_PATTERN.search(raw) is not None or contains_wide_or_escaped_digits(raw)


def contains_wide_or_escaped_digits(raw: bytes) -> bool:
    """The part of :func:`contains_twelve_digits` beyond ASCII digits: full-width forms and JSON escapes.

    Both scans are guarded by a one-byte search (``memchr``), so input with
    neither costs next to nothing.
    """
    return (b"\xef" in raw and _FULLWIDTH.search(raw) is not None) or (b"\\" in raw and _ESCAPE.search(raw) is not None)


class Pseudonymizer:
    """Replaces personal-number-like values by ``mn_<hex>`` HMAC-SHA256 tokens.

    The same key gives the same token for the same number, across workers
    and restarts, so repeated look-ups of one record stay countable.
    """

    __slots__ = ("_key", "valid_seen")

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("pseudonym key must be at least 16 bytes")
        self._key = key
        #: How many replaced values had a valid check digit (real personal numbers).
        self.valid_seen = 0

    def token(self, number: str) -> str:
        """The pseudonymous token for one personal number."""
        digits = _digits(number)
        mac = hmac.new(self._key, digits.encode("ascii"), hashlib.sha256).hexdigest()
        # Groups of 8 hex digits: no run of 12 decimal digits can appear by chance.
        return f"mn_{mac[:8]}-{mac[8:16]}"

    def _replace(self, match: re.Match[str]) -> str:
        text = match.group(0)
        if is_valid_mynumber(text):
            self.valid_seen += 1
        return self.token(text)

    def scrub(self, value: str) -> tuple[str, bool]:
        """``value`` with every 12-digit run replaced, and whether anything was."""
        new, count = MYNUMBER_PATTERN.subn(self._replace, value)
        return new, count > 0
