"""Personal-number recognition and pseudonymisation."""

from __future__ import annotations

import json
import re

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from leakcheck import WRITTEN_FORMS

from schemas.mynumber import (
    MYNUMBER_PATTERN,
    Pseudonymizer,
    check_digit,
    contains_twelve_digits,
    is_valid_mynumber,
)

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



#: Characters a hostile or merely unusual producer may surround a number with.
_TEXT = st.text(alphabet="0123456789０１２３４５６７８９ -　－ab課（）\\\"/", max_size=40)


class TestPrecheckIsSound:
    """contains_twelve_digits never says no where the decoded text holds a personal number."""

    @pytest.mark.parametrize("form", sorted(WRITTEN_FORMS))
    def test_every_written_form(self, form: str) -> None:
        """Each form is scrubbed after decoding and caught on the raw bytes, as UTF-8 and as JSON escapes."""
        text = f"番号{WRITTEN_FORMS[form]}です"
        assert MYNUMBER_PATTERN.search(text), "the scrub itself must see it"
        assert contains_twelve_digits(orjson.dumps({"subject": text}))
        assert contains_twelve_digits(json.dumps({"subject": text}, ensure_ascii=True).encode())
        escaped = json.dumps({"subject": text}, ensure_ascii=True)
        upper_hex = re.sub(r"\\u([0-9a-f]{4})", lambda m: "\\u" + m.group(1).upper(), escaped)
        assert orjson.loads(upper_hex) == {"subject": text}
        assert contains_twelve_digits(upper_hex.encode())

    def test_digit_by_digit_escapes(self) -> None:
        """A producer escaping every character (\\u0031...) cannot smuggle a number past the pre-check."""
        escaped = "".join(f"\\u{ord(c):04x}" for c in "123456789018")
        raw = b'{"subject":"' + escaped.encode() + b'"}'
        assert orjson.loads(raw)["subject"] == "123456789018"
        assert contains_twelve_digits(raw)

    def test_japanese_text_without_numbers_is_not_flagged(self) -> None:
        """Kanji, kana and full-width brackets alone do not send an event down the scrub path."""
        raw = orjson.dumps({"department": "市民課（窓口）", "system": "住民記録システム", "ts": "2024-11-18T08:10:03+09:00"})
        assert not contains_twelve_digits(raw)

    @given(_TEXT)
    def test_sound_for_any_text(self, text: str) -> None:
        """Whatever the text, encoded plainly or with escapes: a match after decoding means yes before."""
        if MYNUMBER_PATTERN.search(text):
            assert contains_twelve_digits(orjson.dumps({"s": text}))
            assert contains_twelve_digits(json.dumps({"s": text}, ensure_ascii=True).encode())

    def test_other_scripts_are_not_personal_numbers(self) -> None:
        """Digits of other scripts are not how a My Number is written; only ASCII and full-width count."""
        assert not MYNUMBER_PATTERN.search("١٢٣٤٥٦٧٨٩٠١٨")
        assert MYNUMBER_PATTERN.search("x１２３４５６７８９０１８x")


class TestNoAccidentalTwelveDigits:
    """Tokens and alert ids can never contain a 12-digit run by chance."""

    LEAK = re.compile(r"(?<!\d)\d{12}(?!\d)")

    def test_full_width_digits(self) -> None:
        """Full-width personal numbers (common in Japanese exports) are replaced too."""
        n = valid("12345678901")
        wide = n.translate(str.maketrans("0123456789", "０１２３４５６７８９"))
        p = Pseudonymizer(KEY)
        out, hit = p.scrub(f"番号{wide}です")
        assert hit and wide not in out and p.token(wide) == p.token(n)
        assert is_valid_mynumber(wide)
        assert contains_twelve_digits(wide.encode())

    @given(st.binary(min_size=1, max_size=32))
    def test_tokens_have_no_twelve_digit_run(self, key_tail: bytes) -> None:
        """Whatever the key, a token has no 12-digit run."""
        p = Pseudonymizer(b"k" * 16 + key_tail)
        for body in ("12345678901", "99999999999", "00000000001"):
            assert not self.LEAK.search(p.token(valid(body)))

    @given(st.text(max_size=20), st.integers(min_value=0, max_value=2**45))
    def test_alert_ids_have_no_twelve_digit_run(self, user: str, window: int) -> None:
        """Alert ids are hex in groups of 8, never 12 digits in a row."""
        from schemas.alert import alert_id_for

        assert not self.LEAK.search(alert_id_for("r", "x", user, window))

    @given(st.text(alphabet="0123456789abcdef", max_size=64))
    def test_grouped_hex_has_no_twelve_digit_run(self, digits: str) -> None:
        """Grouped hex keeps every digit and never shows 12 decimal digits in a row, even when all are digits."""
        from schemas.alert import grouped_hex

        out = grouped_hex(digits)
        assert out.replace("-", "") == digits and not self.LEAK.search(out)
        assert not self.LEAK.search(grouped_hex("0123456789" * 4))
