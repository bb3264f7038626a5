"""Personal-number recognition and pseudonymisation."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.mynumber import Pseudonymizer, check_digit, contains_twelve_digits, is_valid_mynumber

KEY = b"test-key-0123456789"


def valid(body: str) -> str:
    return body + str(check_digit(body))


class TestCheckDigit:
    """The check digit follows the ordinance's weights."""

    @pytest.mark.parametrize(
        ("body", "digit"),
        [("12345678901", 8), ("00000000000", 0), ("99999999999", 6)],
    )
    def test_known_values(self, body: str, digit: int) -> None:
        """Hand-computed check digits match."""
        assert check_digit(body) == digit

    def test_rejects_bad_body(self) -> None:
        """Only 11 ASCII digits are a body."""
        with pytest.raises(ValueError):
            check_digit("1234")

    @given(st.text(alphabet="0123456789", min_size=11, max_size=11))
    def test_valid_numbers_validate(self, body: str) -> None:
        """A body plus its check digit is valid; any other last digit is not."""
        number = valid(body)
        assert is_valid_mynumber(number)
        wrong = body + str((int(number[-1]) + 1) % 10)
        assert not is_valid_mynumber(wrong)


class TestPseudonymizer:
    """Every 12-digit run is replaced by a keyed token."""

    def test_replaces_plain_and_grouped(self) -> None:
        """Plain, space- and hyphen-grouped numbers are all replaced."""
        p = Pseudonymizer(KEY)
        n = valid("12345678901")
        for text in (n, f"{n[:4]} {n[4:8]} {n[8:]}", f"{n[:4]}-{n[4:8]}-{n[8:]}", f"id={n};"):
            out, hit = p.scrub(text)
            assert hit
            assert not re.search(r"\d{12}", out.replace(" ", "").replace("-", ""))
            assert "mn_" in out

    def test_same_number_same_token(self) -> None:
        """Grouping does not change the token; another key does."""
        n = valid("11122233344")
        p = Pseudonymizer(KEY)
        assert p.token(n) == p.token(f"{n[:4]}-{n[4:8]}-{n[8:]}")
        assert Pseudonymizer(b"another-key-000000").token(n) != p.token(n)

    def test_counts_valid_ones(self) -> None:
        """Only numbers with a valid check digit count as real personal numbers."""
        p = Pseudonymizer(KEY)
        p.scrub(valid("12345678901") + " and 123456789010")
        assert p.valid_seen == 1

    def test_leaves_other_digit_runs(self) -> None:
        """11 or 13 digits, dates and IPs are not touched."""
        p = Pseudonymizer(KEY)
        for text in ("12345678901", "1234567890123", "2019/02/02 22:11:03", "172.16.100.1"):
            assert p.scrub(text) == (text, False)

    def test_short_key_rejected(self) -> None:
        """Keys under 16 bytes are refused."""
        with pytest.raises(ValueError):
            Pseudonymizer(b"short")

    def test_bytes_precheck(self) -> None:
        """The raw-bytes pre-check sees 12 digits, grouped or not."""
        assert contains_twelve_digits(b'{"s":"1234 5678 9012"}')
        assert not contains_twelve_digits(b'{"ts":"2019-02-02T22:11:03+09:00"}')
