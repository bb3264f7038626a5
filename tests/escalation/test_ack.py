"""Ack tokens (HMAC over alert id and expiry), ack records and the ``leakwatch ack`` arguments."""

from __future__ import annotations

import argparse

import orjson
import pytest
from escalation_kit import make_alert

from streams.ack import AckRecord, TokenError, ack_audit_record, configure, make_token, verify_token

SECRET = b"test-ack-secret-0123456789abcdef"
ALERT = make_alert("user123").alert_id
NOW = 1_714_800_000.0


class TestTokens:
    """A token is the capability to ack one alert until it expires."""

    def test_round_trip(self) -> None:
        """A fresh token verifies to its alert id and expiry."""
        token = make_token(SECRET, ALERT, int(NOW) + 3600)
        assert verify_token(SECRET, token, NOW) == (ALERT, int(NOW) + 3600)

    @pytest.mark.parametrize(
        "tamper",
        [
            lambda t: t.replace(ALERT, make_alert("other").alert_id),
            lambda t: t.replace(f".{int(NOW) + 3600}.", f".{int(NOW) + 999999}."),
            lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),
        ],
        ids=["other-alert", "longer-expiry", "signature"],
    )
    def test_tampered_token_is_forged(self, tamper: object) -> None:
        """Changing the alert, the expiry or the signature is detected."""
        token = make_token(SECRET, ALERT, int(NOW) + 3600)
        with pytest.raises(TokenError) as err:
            verify_token(SECRET, tamper(token), NOW)  # type: ignore[operator]
        assert err.value.reason == "forged"

    def test_other_secret_is_forged(self) -> None:
        """A token from another installation (other secret) does not verify."""
        token = make_token(b"another-secret-0123456789", ALERT, int(NOW) + 3600)
        with pytest.raises(TokenError) as err:
            verify_token(SECRET, token, NOW)
        assert err.value.reason == "forged"

    def test_expired(self) -> None:
        """At or after the expiry the token is refused, naming the alert."""
        token = make_token(SECRET, ALERT, int(NOW))
        with pytest.raises(TokenError) as err:
            verify_token(SECRET, token, NOW)
        assert (err.value.reason, err.value.alert_id) == ("expired", ALERT)

    @pytest.mark.parametrize("token", ["", "abc", f"{ALERT}.soon.sig", f"{ALERT}.1.2.3", "lw-1.100.sig"])
    def test_malformed(self, token: str) -> None:
        """Garbage is malformed, never an exception of another kind."""
        with pytest.raises(TokenError) as err:
            verify_token(SECRET, token, NOW)
        assert err.value.reason == "malformed"

    def test_token_is_url_safe(self) -> None:
        """Only characters that need no escaping in a URL path."""
        token = make_token(SECRET, ALERT, int(NOW) + 3600)
        assert set(token) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class TestAckRecord:
    """What goes on the acks topic: validated, no personal numbers."""

    def test_json_round_trip(self) -> None:
        """to_json/from_json keep every field."""
        ack = AckRecord(ALERT, "山田 太郎", "2024-05-04T10:31:00+09:00", "link", "調査を開始")
        again = AckRecord.from_json(ack.to_json())
        assert again == ack
        assert set(orjson.loads(ack.to_json())) == {"alert_id", "by", "at", "via", "comment"}

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"alert_id": "not-an-alert"},
            {"via": "fax"},
            {"by": "  "},
            {"at": "2024-05-04T10:31:00"},
            {"comment": "番号 123456789018 を確認"},
            {"by": "1234-5678-9018"},
            {"comment": "x" * 1001},
        ],
    )
    def test_invalid(self, kwargs: dict[str, str]) -> None:
        """Bad id, channel, empty name, naive time, a 12-digit number or overlong text is refused."""
        base = {"alert_id": ALERT, "by": "山田", "at": "2024-05-04T10:31:00+09:00", "via": "cli", "comment": ""}
        with pytest.raises(ValueError):
            AckRecord(**(base | kwargs))

    def test_audit_record(self) -> None:
        """The ack's audit record: who, when, how, about which alert."""
        ack = AckRecord(ALERT, "山田", "2024-05-04T10:31:00+09:00", "cli", "対応中")
        rec = ack_audit_record(ack)
        assert (rec.action, rec.actor, rec.via, rec.at, rec.alert_ids) == ("ack", "山田", "cli", ack.at, (ALERT,))
        assert rec.detail == {"comment": "対応中"}


class TestCliArguments:
    """``leakwatch ack ALERT_ID --by NAME [--comment TEXT]``."""

    def test_arguments(self) -> None:
        """The alert id is positional; --by is required."""
        parser = argparse.ArgumentParser()
        configure(parser)
        args = parser.parse_args([ALERT, "--by", "山田", "--comment", "確認中"])
        assert (args.alert_id, args.by, args.comment, args.via) == (ALERT, "山田", "確認中", "cli")
        with pytest.raises(SystemExit):
            parser.parse_args([ALERT])

    def test_bad_input_exits_2_before_kafka(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A wrong alert id or a personal number in the comment: exit 2 and why, nothing produced."""
        from leakwatch.cli import main

        assert main(["ack", "lw-nope", "--by", "山田", "--brokers", "127.0.0.1:1"]) == 2
        assert "not an alert id" in capsys.readouterr().err
        assert main(["ack", ALERT, "--by", "山田", "--comment", "1234 5678 9018", "--brokers", "127.0.0.1:1"]) == 2
        assert "12-digit" in capsys.readouterr().err
