"""Console sign-in: password hashes, signed sessions, CSRF tokens, throttling, settings (no browser)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from streams.config import ConfigError, load_settings
from streams.console import (
    ConsoleSettings,
    LoginThrottle,
    SessionSigner,
    _safe_next,
    hash_password,
    verify_password,
)

SECRET = b"unit-test-session-secret-0123456789"


class TestPasswords:
    """scrypt hashes with a random salt."""

    def test_verify(self) -> None:
        """The right password verifies, a wrong one does not."""
        encoded = hash_password("correct horse battery staple")
        assert encoded.startswith("scrypt$16384$8$1$")
        assert verify_password("correct horse battery staple", encoded)
        assert not verify_password("correct horse battery stapl", encoded)

    def test_salted(self) -> None:
        """The same password hashes differently each time."""
        assert hash_password("pw") != hash_password("pw")

    @pytest.mark.parametrize("encoded", ["", "plain", "scrypt$3$8$1$AAAA$AAAA", "md5$1$2$3$4$5", "scrypt$16384$8$1$!!$!!"])
    def test_malformed_hash_never_verifies(self, encoded: str) -> None:
        """Anything that is not one of our hashes refuses every password."""
        assert not verify_password("", encoded)
        assert not verify_password("pw", encoded)

    def test_empty_password_refused(self) -> None:
        """No hash for an empty password."""
        with pytest.raises(ValueError):
            hash_password("")

    def test_cli_helper(self) -> None:
        """``python -m streams.console hash-password --stdin`` prints a hash that verifies."""
        out = subprocess.run(
            [sys.executable, "-m", "streams.console", "hash-password", "--stdin"],
            input="s3cret passphrase\n", capture_output=True, text=True, check=True,
        ).stdout.strip()
        assert verify_password("s3cret passphrase", out)


class TestRandomTokens:
    """Random ids in audit records, sessions and nonces never look like a personal number."""

    def test_all_digit_randomness(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Even when the random hex happens to be all digits, no 12-digit run reaches a token, a nonce or an audit record."""
        import secrets

        from streams.config import Settings
        from streams.console import ConsoleService
        from streams.service_kit import random_token

        monkeypatch.setattr(secrets, "token_hex", lambda n=8: "1234567890" * (2 * n // 10 + 1))
        twelve = re.compile(r"\d{12}")
        assert len(random_token(8).replace("-", "")) >= 16 and not twelve.search(random_token(8))
        signer = SessionSigner(SECRET, 3600)
        nonce = signer.login_nonce(now=0.0)
        assert not twelve.search(nonce.split(".")[0]) and signer.check_login_nonce(nonce, nonce, now=1.0)
        session, _ = signer.issue("sato", now=0.0)
        assert not twelve.search(session.sid)
        service = ConsoleService(Settings(), ConsoleSettings(session_secret="x" * 16), clock=lambda: 0.0, rules={})
        for ok in (True, False):
            record = service.note_signin("sato", ok=ok, reason="" if ok else "wrong_password", remote="127.0.0.1")
            assert record.record_id.startswith("signin") and not twelve.search(record.to_json().decode())


class TestSessionSigner:
    """Signed, expiring session cookies and the CSRF token bound to each."""

    def test_round_trip(self) -> None:
        """A cookie issued for a user verifies to that user until it expires."""
        signer = SessionSigner(SECRET, 3600)
        session, cookie = signer.issue("sato", now=1000.0)
        got = signer.verify(cookie, now=2000.0)
        assert got == session and got.user == "sato" and got.via == "password"
        assert signer.verify(cookie, now=1000.0 + 3600) is None

    def test_tampering_detected(self) -> None:
        """A changed payload, a changed signature or another key's cookie is refused."""
        signer = SessionSigner(SECRET, 3600)
        _, cookie = signer.issue("sato", now=0.0)
        body, mac = cookie.split(".")
        _, other = signer.issue("suzuki", now=0.0)
        assert signer.verify(other.split(".")[0] + "." + mac, now=1.0) is None
        assert signer.verify(body + "." + mac[:-2] + "AA", now=1.0) is None
        assert SessionSigner(b"another-secret-of-enough-length", 3600).verify(cookie, now=1.0) is None
        for junk in ("", "x", "a.b.c", "!!!.???"):
            assert signer.verify(junk, now=1.0) is None

    def test_csrf_token_per_session(self) -> None:
        """Each session has its own token; another session's token or none is refused."""
        signer = SessionSigner(SECRET, 3600)
        a, _ = signer.issue("sato", now=0.0)
        b, _ = signer.issue("sato", now=0.0)
        assert signer.check_csrf(a, signer.csrf_token(a))
        assert signer.csrf_token(a) != signer.csrf_token(b)
        assert not signer.check_csrf(a, signer.csrf_token(b))
        assert not signer.check_csrf(a, "")
        assert not signer.check_csrf(a, None)

    def test_login_nonce(self) -> None:
        """The sign-in nonce must be genuine, unexpired and equal in cookie and form."""
        signer = SessionSigner(SECRET, 3600)
        nonce = signer.login_nonce(now=0.0)
        assert signer.check_login_nonce(nonce, nonce, now=10.0)
        assert not signer.check_login_nonce(nonce, nonce, now=3601.0)
        assert not signer.check_login_nonce(nonce, signer.login_nonce(now=0.0), now=10.0)
        forged = nonce.rsplit(".", 1)[0] + ".AAAA"
        assert not signer.check_login_nonce(forged, forged, now=10.0)
        assert not signer.check_login_nonce(None, nonce, now=10.0)


class TestLoginThrottle:
    """Failed sign-ins lock an account for the window."""

    def test_locks_and_unlocks(self) -> None:
        """Locked after ``limit`` failures, free again once they are older than the window; success resets."""
        t = LoginThrottle(limit=3, window_s=900)
        for i in range(3):
            assert not t.locked("sato", now=float(i))
            t.failed("sato", now=float(i))
        assert t.locked("sato", now=10.0)
        assert not t.locked("suzuki", now=10.0)
        assert not t.locked("sato", now=903.0)
        t.failed("sato", now=1000.0)
        t.succeeded("sato")
        assert not t.locked("sato", now=1001.0)


class TestConsoleSettings:
    """The ``console:`` section: accounts, secrets and limits are validated."""

    def test_users_from_environment(self) -> None:
        """Accounts can come as a JSON/YAML string in LEAKWATCH_CONSOLE_USERS."""
        encoded = hash_password("pw")
        cs = load_settings(ConsoleSettings, section="console", env={"LEAKWATCH_CONSOLE_USERS": f'{{"sato": "{encoded}"}}'})
        assert cs.accounts == {"sato": encoded}

    def test_bad_hash_named(self) -> None:
        """A plain-text password instead of a hash is a configuration error naming the account."""
        with pytest.raises(ConfigError, match=r"console\.users\.sato"):
            load_settings(ConsoleSettings, section="console", env={}, overrides={"users": {"sato": "hunter2"}})

    def test_personal_number_as_operator_refused(self) -> None:
        """An operator name is recorded in the audit trail: a 12-digit run is refused."""
        with pytest.raises(ConfigError, match="12-digit"):
            load_settings(ConsoleSettings, section="console", env={},
                          overrides={"users": {"123456789018": hash_password("pw")}})

    @pytest.mark.parametrize(
        ("name", "value"),
        [("session_secret", "short"), ("cookie_secure", "maybe"), ("ppc_prompt_days", 2), ("ppc_final_days_unauthorised", 10),
         ("list_limit", 0), ("proxy_header", "X Bad")],
    )
    def test_invalid_values(self, name: str, value: object) -> None:
        """Each bad value is reported with the setting's name."""
        with pytest.raises(ConfigError, match=rf"console\.{name}"):
            load_settings(ConsoleSettings, section="console", env={}, overrides={name: value})

    def test_settings_table_documents_every_field(self) -> None:
        """The README table generator covers the console section (secrets hidden)."""
        from streams.config import settings_table

        table = settings_table(ConsoleSettings, "console")
        assert "`LEAKWATCH_CONSOLE_USERS`" in table and "`LEAKWATCH_CONSOLE_PPC_FINAL_DAYS`" in table


class TestRedirectTarget:
    """After sign-in only same-site paths are followed."""

    @pytest.mark.parametrize("value", [None, "", "https://evil.example/", "//evil.example", "/\\evil", "console"])
    def test_refused(self, value: str | None) -> None:
        """Absolute, scheme-relative and odd targets fall back to the list."""
        assert _safe_next(value) == "/console"

    def test_kept(self) -> None:
        """A path on this site is kept with its query."""
        assert _safe_next("/alerts/lw-1?x=1") == "/alerts/lw-1?x=1"

