"""The console's web layer on a real aiohttp server, without a broker or a browser.

``register`` adds the console to a Faust app; its aiohttp application is served
by ``aiohttp.test_utils.TestServer`` and driven by a real HTTP client. The
console service is not started (no Kafka), so its store is empty: these tests
are about sign-in, sessions, the proxy header, CSRF and headers. Sign-in audit
records wait in the service's queue (nothing writes them without Kafka), which
is where these tests read them; that they reach the audit topic and
``leakwatch audit`` is tested end to end in ``test_console_e2e.py``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import faust
import pytest
from aiohttp.test_utils import TestClient, TestServer
from console_kit import run_async

from streams.audit import AuditRecord
from streams.config import Settings, load_settings
from streams.console import ConsoleService, ConsoleSettings, hash_password, register

PASSWORD = "correct horse battery staple"
HASH = hash_password(PASSWORD)
ALERT = "lw-00000000-11111111-22222222"


def serve(console: ConsoleSettings, scenario: Callable[[TestClient], Awaitable[Any]]) -> Any:
    """Run ``scenario(client)`` against a Faust app with the console registered."""
    return serve_service(console, lambda client, _service: scenario(client))


def serve_service(console: ConsoleSettings, scenario: Callable[[TestClient, ConsoleService], Awaitable[Any]]) -> Any:
    """Run ``scenario(client, service)``: the same, with the (unstarted) console service at hand."""

    async def main() -> Any:
        settings = load_settings(Settings, env={}, overrides={"web_port": 6066})
        app = faust.App("console-web-test", broker="kafka://127.0.0.1:9", web_enabled=True, autodiscover=False, store="memory://")
        service = register(app, settings, console=console)
        assert service is not None
        app.web.init_server()
        async with TestClient(TestServer(app.web.web_app)) as client:
            return await scenario(client, service)

    return run_async(main)


def accounts(**extra: Any) -> ConsoleSettings:
    return ConsoleSettings(users={"sato": HASH}, session_secret="web-test-session-secret-01", **extra)


async def sign_in(client: TestClient, password: str = PASSWORD, user: str = "sato") -> Any:
    """GET the form (nonce cookie + field), POST it; returns the POST response."""
    form = await client.get("/console/login?next=/console")
    nonce = re.search(r'name="nonce" value="([^"]+)"', await form.text())
    assert nonce is not None
    return await client.post(
        "/console/login",
        data={"nonce": nonce.group(1), "next": "/console", "user": user, "password": password},
        allow_redirects=False,
    )


def queued(service: ConsoleService) -> list[tuple[str, str, str]]:
    """(action, actor, reason) of the sign-in audit records waiting to be written."""
    return [(r.action, r.actor, str(r.detail.get("reason", ""))) for r in service.audit_queue]


class TestSignIn:
    """Password sign-in with a signed session cookie."""

    def test_sign_in_and_me(self) -> None:
        """The right password redirects with an HttpOnly, SameSite=Strict cookie; /me then names the operator."""

        async def scenario(c: TestClient) -> None:
            r = await sign_in(c)
            assert r.status == 303 and r.headers["Location"] == "/console"
            cookie = r.headers.getall("Set-Cookie")
            session = next(v for v in cookie if v.startswith("lw_session="))
            assert "HttpOnly" in session and "SameSite=Strict" in session
            me = await (await c.get("/console/api/me")).json()
            assert me["user"] == "sato" and me["via"] == "password" and len(me["csrf"]) == 32

        serve(accounts(), scenario)

    def test_wrong_password_and_lockout(self) -> None:
        """A wrong password is 401 without a session; after the limit even the right one is refused for a while."""

        async def scenario(c: TestClient) -> None:
            for _ in range(2):
                assert (await sign_in(c, "nope")).status == 401
            assert (await c.get("/console/api/me")).status == 401
            assert (await sign_in(c)).status == 429

        serve(accounts(login_max_failures=2), scenario)

    def test_login_form_needs_its_nonce(self) -> None:
        """A sign-in POST without the form's nonce (login CSRF) is refused even with the right password."""

        async def scenario(c: TestClient) -> None:
            r = await c.post("/console/login", data={"user": "sato", "password": PASSWORD, "nonce": "x.1.y"}, allow_redirects=False)
            assert r.status == 403
            assert (await c.get("/console/api/me")).status == 401

        serve(accounts(), scenario)


class TestSignInAudit:
    """Every sign-in, successful or not, becomes an audit record; a password never does."""

    def test_success_and_failures_recorded(self) -> None:
        """Wrong password, unknown user, locked account and success: one record each, with the reason."""

        async def scenario(c: TestClient, service: ConsoleService) -> list[AuditRecord]:
            assert (await sign_in(c, "hunter2-wrong")).status == 401
            assert (await sign_in(c, "hunter2-wrong", user="nobody")).status == 401
            assert (await sign_in(c, "hunter2-wrong")).status == 401
            assert (await sign_in(c)).status == 429  # locked after two failures: even the right password
            assert queued(service) == [
                ("console.signin_failed", "sato", "wrong_password"),
                ("console.signin_failed", "nobody", "unknown_user"),
                ("console.signin_failed", "sato", "wrong_password"),
                ("console.signin_failed", "sato", "locked"),
            ]
            return list(service.audit_queue)

        records = serve_service(accounts(login_max_failures=2), scenario)
        for r in records:
            assert r.via == "console" and r.detail["remote"] == "127.0.0.1" and r.detail["method"] == "password"
            assert r.record_id and datetime.fromisoformat(r.at).tzinfo is not None
            assert "hunter2" not in r.to_json().decode() and PASSWORD not in r.to_json().decode()

        async def success(c: TestClient, service: ConsoleService) -> list[tuple[str, str, str]]:
            assert (await sign_in(c)).status == 303
            assert (await c.get("/console/api/me")).status == 200  # using the session is not another sign-in
            return queued(service)

        assert serve_service(accounts(), success) == [("console.signin", "sato", "")]

    def test_tried_name_cleaned(self) -> None:
        """A personal-number-like user name is masked, control characters dropped, length capped."""

        async def scenario(c: TestClient, service: ConsoleService) -> list[str]:
            await sign_in(c, "x", user="123456789018")
            await sign_in(c, "x", user="a\x07b" + "c" * 300)
            return [r.actor for r in service.audit_queue]

        masked, long = serve_service(accounts(), scenario)
        assert masked == "［伏字］"
        assert long == "ab" + "c" * 98

    def test_proxy_sign_in_recorded_once_per_session(self) -> None:
        """A proxy-vouched operator gets one record when the session starts, not one per request."""

        async def scenario(c: TestClient, service: ConsoleService) -> list[Any]:
            for _ in range(3):
                assert (await c.get("/console/api/me", headers={"X-Forwarded-User": "proxy-user"})).status == 200
            return [(r.action, r.actor, r.detail["method"]) for r in service.audit_queue]

        assert serve_service(accounts(trust_proxy_header=True), scenario) == [("console.signin", "proxy-user", "proxy")]


class TestProxyHeader:
    """Behind an authenticating reverse proxy, X-Forwarded-User names the operator."""

    def test_header_signs_in(self) -> None:
        """With trust_proxy_header, the header is the identity; without it the proxy session ends."""

        async def scenario(c: TestClient) -> None:
            r = await c.get("/console/api/me", headers={"X-Forwarded-User": "proxy-user"})
            assert r.status == 200 and (await r.json())["user"] == "proxy-user"
            assert (await c.get("/console/api/me")).status == 401

        serve(accounts(trust_proxy_header=True), scenario)

    def test_header_ignored_when_not_trusted(self) -> None:
        """Without trust_proxy_header, anybody can send the header: it is ignored."""

        async def scenario(c: TestClient) -> None:
            assert (await c.get("/console/api/me", headers={"X-Forwarded-User": "sato"})).status == 401

        serve(accounts(), scenario)

    def test_personal_number_as_user_refused(self) -> None:
        """A header value that looks like a personal number is not accepted as an operator."""

        async def scenario(c: TestClient) -> None:
            assert (await c.get("/console/api/me", headers={"X-Forwarded-User": "123456789018"})).status == 401

        serve(accounts(trust_proxy_header=True), scenario)


class TestCsrfAndHeaders:
    """Every POST needs the session's token; every response carries the security headers."""

    @pytest.mark.parametrize("verb", ["ack", "close", "reopen"])
    def test_post_needs_token(self, verb: str) -> None:
        """Signed out is 401; no token or a wrong one is 403; the right one passes (404: the alert is unknown here)."""

        async def scenario(c: TestClient) -> None:
            url = f"/console/api/alerts/{ALERT}/{verb}"
            body = {"comment": "理由", "resolution": "false_positive"}
            assert (await c.post(url, json=body)).status == 401
            assert (await sign_in(c)).status == 303
            token = (await (await c.get("/console/api/me")).json())["csrf"]
            assert (await c.post(url, json=body)).status == 403
            assert (await c.post(url, json=body, headers={"X-CSRF-Token": "0" * 32})).status == 403
            assert (await c.post(url, json=body, headers={"X-CSRF-Token": token, "Origin": "https://evil.example"})).status == 403
            assert (await c.post(url, json=body, headers={"X-CSRF-Token": token})).status == 404

        serve(accounts(), scenario)

    @pytest.mark.parametrize("path", ["/console/login", "/console/api/me", "/console/static/console.js"])
    def test_security_headers(self, path: str) -> None:
        """CSP without unsafe-inline scripts, no framing, nosniff, a referrer policy."""

        async def scenario(c: TestClient) -> Any:
            return (await c.get(path)).headers

        h = serve(accounts(), scenario)
        assert "script-src 'self'" in h["Content-Security-Policy"] and "unsafe-inline" not in h["Content-Security-Policy"]
        assert h["X-Frame-Options"] == "DENY" and h["X-Content-Type-Options"] == "nosniff"
        assert h["Referrer-Policy"] == "same-origin"

    def test_static_files_only_listed_assets(self) -> None:
        """Only the console's CSS/JS are served from /console/static; paths outside it are not."""

        async def scenario(c: TestClient) -> list[int]:
            return [
                (await c.get(p)).status
                for p in ("/console/static/console.css", "/console/static/console.html", "/console/static/..%2Fconsole.py")
            ]

        assert serve(accounts(), scenario) == [200, 404, 404]
