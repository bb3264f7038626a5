"""The operator console end to end: real broker, real worker, real SMTP, headless Chromium.

The worker is ``python -m leakwatch worker`` (``create_app`` and its
``EXTENSIONS``: escalation and console). Events go in on the access topic;
the detection raises alerts; the console shows them live; the operator acts
in the browser; the records land on the topics and the escalation service
reacts (or, when acknowledged, does not).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from console_kit import (
    ACK_SECRET,
    HOTLINE,
    TIER1,
    ConsoleWorker,
    MailSink,
    ack_links,
    ensure_topics,
    http,
    new_context,
    off_hours_id,
    row,
    run_async,
    sign_in,
    weekend_events,
)
from playwright.sync_api import Browser, Page, expect

from schemas.alert import Alert, alert_id_for
from streams.ack import make_token

#: Tier 1 of the timed escalation: mailed this long after the first mail unless acknowledged.
TIER_AFTER_S = 12.0
TZ = ZoneInfo("Asia/Tokyo")
TWELVE = re.compile(r"\d{12}|\d{4}[- ]\d{4}[- ]\d{4}")


@pytest.fixture(scope="module")
def stack(tansu: Any, sink: MailSink, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleWorker]:
    """One worker on tansu with a short tier-1 escalation, for the whole module."""
    worker = ConsoleWorker(
        tmp_path_factory.mktemp("console"),
        tansu.bootstrap,
        sink,
        tiers=[{"after": f"{TIER_AFTER_S:.0f}s", "to": [TIER1]}],
    )
    ensure_topics(worker)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()
        print(worker.log_tail(30))


@pytest.fixture
def page(browser: Browser, stack: ConsoleWorker) -> Iterator[Page]:
    """A signed-in operator (sato) on the alert list."""
    ctx = new_context(browser)
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    sign_in(pg, stack.base_url)
    yield pg
    ctx.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


class TestConsoleLive:
    """Alerts appear live; acknowledging in the console stops the timed escalation."""

    def test_login_required(self, browser: Browser, stack: ConsoleWorker) -> None:
        """Pages redirect to the sign-in form and the API answers 401 without a session."""
        ctx = new_context(browser)
        try:
            pg = ctx.new_page()
            pg.goto(stack.base_url + "/alerts/" + off_hours_id("nobody"))
            expect(pg).to_have_url(re.compile(r"/console/login\?next=/alerts/"))
            for path in ("/console/api/alerts", "/console/api/me", "/console/api/overview", "/console/api/stream"):
                assert ctx.request.get(stack.base_url + path).status == 401, path
            pg.fill("input[name=user]", "sato")
            pg.fill("input[name=password]", "wrong password")
            pg.click("button[type=submit]")
            expect(pg.locator(".error")).to_contain_text("パスワードが違います")
            assert ctx.request.get(stack.base_url + "/console/api/alerts").status == 401
        finally:
            ctx.close()

    def test_alert_appears_live_filter_ack_stops_escalation(
        self, page: Page, stack: ConsoleWorker, sink: MailSink, screenshots: Path
    ) -> None:
        """A new alert shows up without reload; the operator filters, opens, acknowledges; no tier-1 mail follows."""
        acked_id = off_hours_id("u-tanaka")
        control_id = off_hours_id("u-kato")
        page.evaluate("window.__sameDocument = 'yes'")
        stack.produce(weekend_events("u-tanaka", "税務課") + weekend_events("u-kato", "市民課"))
        expect(row(page, acked_id)).to_be_visible(timeout=30_000)
        expect(row(page, control_id)).to_be_visible(timeout=30_000)
        assert page.evaluate("window.__sameDocument") == "yes", "the page was reloaded"

        # Filter: severity high and above, open alerts, user tanaka.
        page.select_option("#f-severity", "high,critical")
        page.select_option("#f-state", "new,escalated,acknowledged")
        page.fill("#f-q", "tanaka")
        expect(page.locator("#alerts tbody tr")).to_have_count(1)
        expect(row(page, acked_id)).to_contain_text("税務課")
        expect(row(page, acked_id)).to_contain_text("休日の個人番号参照")
        expect(page).to_have_url(re.compile(r"q=tanaka"))
        page.screenshot(path=str(screenshots / "console-list.png"))

        first = sink.wait_for_blocking(lambda m: bool(sink.about(acked_id, to=HOTLINE)), 30, "the hotline mail")
        first_mail_at = min(r.at for r in first if r.alert_id == acked_id)

        row(page, acked_id).locator("a").click()
        expect(page).to_have_url(re.compile(re.escape(f"/alerts/{acked_id}") + "$"))
        expect(page.locator("#d-title")).to_have_text("休日の個人番号参照")
        # Revisions at counts 1, 2 and 4: the page shows the newest (4 events, 8 in the timeline).
        expect(page.locator("#d-evidence tbody tr")).to_have_count(4)
        expect(page.locator("#d-timeline svg").first.locator("circle")).to_have_count(8)
        expect(page.locator("#d-timeline svg").nth(1).locator("circle.hit")).to_have_count(4)  # the enlarged stretch
        page.fill("#ack-form textarea[name=comment]", "本人に確認中")
        page.click("#ack-btn")
        expect(page.locator("#a-msg")).to_have_text("受領を記録しました。")
        acked_at = time.monotonic()
        trail_ack = page.locator('#d-trail tbody tr[data-action="ack"]')
        expect(trail_ack).to_contain_text("sato")
        expect(trail_ack).to_contain_text("コンソール")
        expect(trail_ack).to_contain_text("本人に確認中")
        expect(page.locator("#d-state")).to_contain_text("受領済")
        # The mail's audit record travels escalation -> audit topic -> console: checked after the
        # time-critical ack, and given the time a loaded CI machine needs.
        expect(page.locator("#d-trail tbody")).to_contain_text(HOTLINE, timeout=30_000)
        page.screenshot(path=str(screenshots / "console-detail.png"), full_page=True)
        assert acked_at < first_mail_at + TIER_AFTER_S, "acknowledged too late for the test to mean anything"

        acks = [a for a in stack.read(stack.topics["topic_acks"]) if a["alert_id"] == acked_id]
        assert [(a["by"], a["via"], a["comment"]) for a in acks] == [("sato", "console", "本人に確認中")]

        # The unacknowledged control alert is escalated to tier 1 ...
        sink.wait_for_blocking(lambda m: bool(sink.about(control_id, to=TIER1)), TIER_AFTER_S + 30, "tier-1 mail of the control alert")
        # ... the acknowledged one never is.
        time.sleep(max(0.0, first_mail_at + TIER_AFTER_S + 4.0 - time.monotonic()))
        assert sink.about(acked_id, to=TIER1) == []
        page.reload()
        expect(page.locator('#d-trail tbody tr[data-action="escalation.step"]')).to_have_count(0)

        page.goto(stack.base_url + f"/alerts/{control_id}")
        expect(page.locator('#d-trail tbody tr[data-action="escalation.step"]')).to_contain_text(TIER1)
        expect(page.locator("#d-tier")).to_contain_text("第1段階")

    def test_close_confirmed_starts_ppc_clock(self, page: Page, stack: ConsoleWorker, screenshots: Path) -> None:
        """Closing as a confirmed incident records the closure and shows the 速報/確報 deadlines."""
        aid = off_hours_id("u-mori")
        stack.produce(weekend_events("u-mori", "保険年金課"))
        expect(row(page, aid)).to_be_visible(timeout=30_000)
        row(page, aid).locator("a").click()
        expect(page.locator("#close-form")).to_be_visible()
        page.fill("#close-form textarea[name=comment]", "住民 1234-5678-9018 の件")
        page.click("#close-btn")
        expect(page.locator("#a-msg")).to_have_text("12桁の数字（個人番号の可能性）は入力できません。")
        expect(page.locator("#d-state")).not_to_contain_text("クローズ")
        page.check("#close-form input[value=confirmed]")
        page.check("#close-form input[name=unauthorised_purpose]")
        page.fill("#close-form textarea[name=comment]", "持ち出しを本人が認めた")
        page.click("#close-btn")
        expect(page.locator("#a-msg")).to_have_text("クローズしました。")
        expect(page.locator("#d-state")).to_contain_text("クローズ・事案確定")
        expect(page.locator("#close-form")).to_be_hidden()
        expect(page.locator("#ack-form")).to_be_hidden()

        today = datetime.now(TZ).date()
        ppc = page.locator("#ppc")
        expect(ppc).to_be_visible()
        for days in (3, 5, 60):  # 速報 from/due, 確報 (unauthorised purpose)
            expect(ppc).to_contain_text((today + timedelta(days=days)).strftime("%Y/%m/%d"))
        expect(ppc).to_contain_text("60日以内")
        expect(page.locator("#ppc-note")).to_contain_text("概ね3～5日")
        trail = page.locator("#d-trail tbody")
        expect(trail.locator('tr[data-action="alert.closed"]')).to_contain_text("持ち出しを本人が認めた")
        expect(trail.locator('tr[data-action="ack"]')).to_contain_text("sato")  # closing acknowledged it too
        page.screenshot(path=str(screenshots / "console-detail-confirmed.png"), full_page=True)

        states = [s for s in stack.read(stack.config["console"]["topic_states"]) if s["alert_id"] == aid]
        assert [(s["state"], s["resolution"], s["by"], s["unauthorised_purpose"]) for s in states] == [
            ("closed", "confirmed", "sato", True)
        ]
        assert states[0]["ppc"]["final_due"] == (today + timedelta(days=60)).isoformat()
        audit = [r for r in stack.read(stack.topics["topic_audit"]) if aid in r["alert_ids"]]
        assert {"ack", "alert.closed"} <= {r["action"] for r in audit}

        # A second close is refused, and the list shows the state.
        token = page.evaluate("fetch('/console/api/me').then(r => r.json()).then(d => d.csrf)")
        again = page.request.post(
            stack.base_url + f"/console/api/alerts/{aid}/close",
            data=orjson.dumps({"resolution": "false_positive", "comment": "x"}).decode(),
            headers={"X-CSRF-Token": token, "Content-Type": "application/json"},
        )
        assert again.status == 409
        page.goto(stack.base_url + "/console?state=closed")
        expect(row(page, aid)).to_contain_text("クローズ")

    def test_ack_link_works_once_and_expires(self, browser: Browser, page: Page, stack: ConsoleWorker, sink: MailSink) -> None:
        """The signed link in the mail acknowledges once (no sign-in needed); a second use and an expired link do not."""
        aid = off_hours_id("u-ito")
        stack.produce(weekend_events("u-ito", "税務課"))
        mails = sink.wait_for_blocking(lambda m: bool(sink.about(aid, to=HOTLINE)), 30, "the hotline mail")
        links = [link for r in mails if r.alert_id == aid for link in ack_links(r)]
        assert links, "the mail has no ack link"
        link = links[0]
        assert link.startswith(stack.base_url + "/ack/")

        ctx = new_context(browser)  # the mail reader's browser: not signed in to the console
        try:
            pg = ctx.new_page()
            pg.goto(link)
            pg.fill("input[name=by]", "山田 課長")
            pg.click("button[type=submit]")
            expect(pg.locator("h1")).to_have_text("受領を記録しました")
            pg.goto(link)
            expect(pg.locator("h1")).to_have_text("この事案は受領確認済みです")
            expect(pg.locator("body")).to_contain_text("使用済み")

            expired = make_token(ACK_SECRET.encode(), aid, int(time.time()) - 60)
            resp = pg.goto(stack.base_url + f"/ack/{expired}")
            assert resp is not None and resp.status == 410
            expect(pg.locator("h1")).to_have_text("リンクの有効期限が切れています")
            forged = link.rsplit(".", 1)[0] + ".AAAAAAAAAAAAAAAAAAAAAAAAAAA"
            resp = pg.goto(forged)
            assert resp is not None and resp.status == 403
        finally:
            ctx.close()

        page.goto(stack.base_url + f"/alerts/{aid}")
        trail_ack = page.locator('#d-trail tbody tr[data-action="ack"]')
        expect(trail_ack).to_contain_text("山田 課長")
        expect(trail_ack).to_contain_text("メール内の確認リンク")
        expect(page.locator("#d-state")).to_contain_text("受領済")
        expect(page.locator("#ack-form")).to_be_hidden()

    def test_csrf_token_required(self, page: Page, stack: ConsoleWorker) -> None:
        """POSTs without the session's CSRF token, with a wrong one, or from another origin are refused."""
        aid = off_hours_id("u-kato")
        url = stack.base_url + f"/console/api/alerts/{aid}/close"
        body = orjson.dumps({"resolution": "false_positive", "comment": "csrf test"}).decode()
        json_ct = {"Content-Type": "application/json"}
        assert page.request.post(url, data=body, headers=json_ct).status == 403
        assert page.request.post(url, data=body, headers={**json_ct, "X-CSRF-Token": "x" * 32}).status == 403
        token = page.evaluate("fetch('/console/api/me').then(r => r.json()).then(d => d.csrf)")
        evil = {**json_ct, "X-CSRF-Token": token, "Origin": "http://evil.example"}
        assert page.request.post(url, data=body, headers=evil).status == 403
        assert page.request.post(stack.base_url + "/console/logout", form={"csrf": "nope"}).status == 403
        # Nothing was closed by the refused requests.
        detail = page.request.get(stack.base_url + f"/console/api/alerts/{aid}").json()
        assert detail["closure"] is None
        # The same request with the token goes through (so the refusals were about the token).
        ok = page.request.post(url + "x", data=body, headers={**json_ct, "X-CSRF-Token": token})
        assert ok.status == 404  # unknown alert id: past the CSRF check

    def test_security_headers_and_no_inline_script(self, page: Page, stack: ConsoleWorker) -> None:
        """Every page has CSP without unsafe-inline scripts, DENY framing, nosniff, a referrer policy; HTML has no inline script."""
        for path in ("/console", "/console/overview", f"/alerts/{off_hours_id('u-tanaka')}", "/console/api/alerts"):
            resp = page.request.get(stack.base_url + path)
            h = resp.headers
            csp = h["content-security-policy"]
            assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp, path
            assert h["x-frame-options"] == "DENY"
            assert h["x-content-type-options"] == "nosniff"
            assert h["referrer-policy"] in ("same-origin", "no-referrer")
            if path != "/console/api/alerts":
                html = resp.text()
                assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html) == [], path
        status, headers, _ = http("GET", stack.base_url + "/console/login")
        assert status == 200 and headers["X-Frame-Options"] == "DENY"
        cookie = next(c for c in page.context.cookies() if c["name"] == "lw_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    def test_personal_number_never_rendered(self, page: Page, stack: ConsoleWorker) -> None:
        """A 12-digit run that slipped into an alert is masked in the list, the detail and the API."""
        bad = Alert(
            alert_id=alert_id_for("usb_write", "usb", "u-leaky", 0),
            rule_id="usb_write",
            reason="usb",
            title="USB書き出し 123456789018",
            title_en="USB write 1234 5678 9018",
            severity="critical",
            viewpoint="removable_media",
            user="u-leaky",
            first_ts="2024-05-07T10:00:00+09:00",
            last_ts="2024-05-07T10:05:00+09:00",
            window_start="2024-05-07T00:00:00+09:00",
            window_end="2024-05-08T00:00:00+09:00",
            count=1,
            revision=1,
            department="課-1234-5678-9018",
            terminals=("１２３４５６７８９０１８",),
        )
        stack.produce_raw(stack.topics["topic_alerts"], bad.alert_id.encode(), bad.to_json())
        expect(row(page, bad.alert_id)).to_be_visible(timeout=30_000)
        expect(row(page, bad.alert_id)).to_contain_text("［伏字］")
        assert TWELVE.findall(page.locator("body").inner_text()) == []
        page.goto(stack.base_url + f"/alerts/{bad.alert_id}")
        expect(page.locator("#d-title")).to_contain_text("［伏字］")
        assert TWELVE.findall(page.locator("body").inner_text()) == []
        api = page.request.get(stack.base_url + f"/console/api/alerts/{bad.alert_id}").text()
        assert TWELVE.findall(api) == [] and "１２３４" not in api

    def test_english_toggle_and_overview_charts(self, page: Page, stack: ConsoleWorker, screenshots: Path) -> None:
        """The page switches to English and back; the overview draws charts of the alerts and pipeline health."""
        expect(page.locator("#alerts thead")).to_contain_text("重要度")
        page.click("#lang")
        expect(page.locator("#alerts thead")).to_contain_text("Severity")
        expect(page.locator("html")).to_have_attribute("lang", "en")
        page.reload()
        expect(page.locator("#alerts thead")).to_contain_text("Severity")
        page.click("#lang")
        expect(page.locator("#alerts thead")).to_contain_text("重要度")

        page.click("nav >> text=概要")
        expect(page).to_have_url(re.compile(r"/console/overview$"))
        expect(page.locator("#o-sev svg rect").first).to_be_visible()
        expect(page.locator("#o-rule .legend")).to_contain_text("休日の個人番号参照")
        expect(page.locator("#o-users")).to_contain_text("u-tanaka")
        expect(page.locator("#o-depts")).to_contain_text("税務課")
        expect(page.locator("#o-health .metric")).to_have_count(4)
        expect(page.locator("#o-health .metric path")).to_have_count(4, timeout=15_000)  # sparklines drawn
        page.screenshot(path=str(screenshots / "console-overview.png"), full_page=True)

    def test_actions_survive_restart(self, page: Page, stack: ConsoleWorker) -> None:
        """A console started afresh on the same topics (as after a restart) sees the alert, its ack and its closure."""
        from streams.config import Settings, load_settings
        from streams.console import ConsoleService, ConsoleSettings

        aid = off_hours_id("u-restart")
        stack.produce(weekend_events("u-restart", "市民課"))
        expect(row(page, aid)).to_be_visible(timeout=30_000)
        token = page.evaluate("fetch('/console/api/me').then(r => r.json()).then(d => d.csrf)")
        headers = {"X-CSRF-Token": token, "Content-Type": "application/json"}
        base = stack.base_url + f"/console/api/alerts/{aid}"
        assert page.request.post(base + "/ack", data='{"comment": "確認します"}', headers=headers).status == 200
        body = orjson.dumps({"resolution": "false_positive", "comment": "承認済みの休日出勤"}).decode()
        assert page.request.post(base + "/close", data=body, headers=headers).status == 200

        core = {k: v for k, v in stack.config.items() if not isinstance(v, dict)}
        settings = load_settings(Settings, env={}, overrides=core)
        console = ConsoleSettings(topic_states=stack.config["console"]["topic_states"], session_secret="x" * 16)

        async def read_back() -> ConsoleService:
            service = ConsoleService(settings, console)
            await service.start()
            try:
                deadline = time.monotonic() + 30
                while not (service.caught_up and {tp.topic for tp in service._tps} == set(service.topics)):
                    assert time.monotonic() < deadline, "the fresh console did not catch up"
                    await asyncio.sleep(0.1)
            finally:
                await service.stop()
            return service

        fresh = run_async(read_back)
        assert fresh.store.state_of(aid) == "closed"
        assert fresh.store.acks[aid]["by"] == "sato" and fresh.store.acks[aid]["comment"] == "確認します"
        assert fresh.store.closures[aid]["resolution"] == "false_positive"
        actions = [r["action"] for r in fresh.store.trail(aid)]
        assert actions.index("ack") < actions.index("alert.closed")

    def test_reopen_closed_alert(self, page: Page, stack: ConsoleWorker, screenshots: Path) -> None:
        """A closed alert is reopened with a reason: on the topics, in the trail, back in the open list, closable again."""
        aid = off_hours_id("u-reopen")
        stack.produce(weekend_events("u-reopen", "市民課"))
        expect(row(page, aid)).to_be_visible(timeout=30_000)
        row(page, aid).locator("a").click()
        expect(page.locator("#close-form")).to_be_visible()
        expect(page.locator("#reopen-form")).to_be_hidden()
        page.fill("#close-form textarea[name=comment]", "承認済みの休日出勤")
        page.click("#close-btn")
        expect(page.locator("#a-msg")).to_have_text("クローズしました。")
        expect(page.locator("#reopen-form")).to_be_visible()
        page.click("#reopen-btn")  # no reason: the form does not go out
        expect(page.locator("#d-state")).to_contain_text("クローズ・誤検知")
        page.fill("#reopen-form textarea[name=comment]", "承認の記録が見つからない")
        page.click("#reopen-btn")
        expect(page.locator("#a-msg")).to_have_text("再オープンしました。")
        expect(page.locator("#d-state")).to_contain_text("受領済")  # closing acknowledged it; that stays
        expect(page.locator("#reopen-form")).to_be_hidden()
        expect(page.locator("#close-form")).to_be_visible()
        expect(page.locator("#close-form textarea[name=comment]")).to_have_value("")
        expect(page.locator("#a-status")).to_contain_text("再オープン: 承認の記録が見つからない")
        reopened = page.locator('#d-trail tbody tr[data-action="alert.reopened"]')
        for text in ("sato", "誤検知としたクローズを取消", "承認の記録が見つからない", "コンソール"):
            expect(reopened).to_contain_text(text)
        actions = page.locator("#d-trail tbody tr").evaluate_all("rows => rows.map(r => r.dataset.action)")
        assert actions.index("alert.closed") < actions.index("alert.reopened")
        page.screenshot(path=str(screenshots / "console-detail-reopened.png"), full_page=True)

        page.goto(stack.base_url + f"/console?state=new,escalated,acknowledged&q={aid}")
        expect(row(page, aid)).to_contain_text("受領済")
        expect(page.locator("#f-state")).to_have_value("new,escalated,acknowledged")
        page.goto(stack.base_url + f"/console?state=closed&q={aid}")  # a deep link filters from the first load on
        expect(page.locator("#empty")).to_be_visible()
        expect(page.locator("#alerts tbody tr")).to_have_count(0)
        expect(page).to_have_url(re.compile(r"state=closed"))

        states = [s for s in stack.read(stack.config["console"]["topic_states"]) if s["alert_id"] == aid]
        assert [(s["state"], s["version"], s["by"]) for s in states] == [("closed", 1, "sato"), ("open", 2, "sato")]
        assert states[1]["comment"] == "承認の記録が見つからない"
        assert states[1]["reopened_from"]["resolution"] == "false_positive"
        (rec,) = [r for r in stack.read(stack.topics["topic_audit"]) if aid in r["alert_ids"] and r["action"] == "alert.reopened"]
        assert (rec["actor"], rec["via"], rec["detail"]["comment"]) == ("sato", "console", "承認の記録が見つからない")
        assert rec["detail"]["previous_resolution"] == "false_positive" and rec["detail"]["closed_by"] == "sato"
        assert abs(datetime.fromisoformat(rec["at"]).timestamp() - time.time()) < 120

    def test_reopen_over_http(self, page: Page, stack: ConsoleWorker) -> None:
        """POST .../reopen: CSRF token and same origin required; refuses an open alert and a missing reason; versions count up."""
        aid = off_hours_id("u-reopen-api")
        stack.produce(weekend_events("u-reopen-api", "税務課"))
        expect(row(page, aid)).to_be_visible(timeout=30_000)
        token = page.evaluate("fetch('/console/api/me').then(r => r.json()).then(d => d.csrf)")
        base = stack.base_url + f"/console/api/alerts/{aid}"
        json_ct = {"Content-Type": "application/json"}
        ok = {**json_ct, "X-CSRF-Token": token}

        def post(action: str, body: dict[str, Any], headers: dict[str, str] = ok) -> Any:
            return page.request.post(f"{base}/{action}", data=orjson.dumps(body).decode(), headers=headers)

        why = {"comment": "再調査が必要"}
        assert post("reopen", why).status == 409  # not closed
        assert post("close", {"resolution": "false_positive", "comment": "誤検知"}).status == 200
        assert post("reopen", why, json_ct).status == 403
        assert post("reopen", why, {**json_ct, "X-CSRF-Token": "0" * 32}).status == 403
        assert post("reopen", why, {**ok, "Origin": "http://evil.example"}).status == 403
        assert post("reopen", {"comment": ""}).status == 400
        refused = post("reopen", {"comment": "住民 1234-5678-9018 の件"})
        assert refused.status == 400 and "12桁" in refused.json()["error_ja"]
        assert page.request.get(base).json()["summary"]["state"] == "closed", "a refused reopen changed the state"

        done = post("reopen", why)
        assert done.status == 200
        reopened = done.json()["reopened"]
        assert (reopened["state"], reopened["version"], reopened["by"], reopened["comment"]) == ("open", 2, "sato", "再調査が必要")
        assert post("reopen", why).status == 409
        assert post("close", {"resolution": "confirmed", "comment": "本人が認めた"}).status == 200
        detail = page.request.get(base).json()
        assert detail["summary"]["state"] == "closed" and detail["closure"]["version"] == 3
        assert detail["closure"]["resolution"] == "confirmed" and detail["reopened"] is None
        assert [r["action"] for r in detail["trail"] if r["action"] in ("ack", "alert.closed", "alert.reopened")] == [
            "ack", "alert.closed", "alert.reopened", "alert.closed"
        ]

    def test_sign_ins_audited(self, browser: Browser, stack: ConsoleWorker) -> None:
        """Successful and failed sign-ins reach the audit topic and ``leakwatch audit``; the password never does."""
        wrong = "not-the-password-4242"
        ctx = new_context(browser)
        try:
            pg = ctx.new_page()
            for user in ("suzuki", "mallory"):
                pg.goto(stack.base_url + "/console/login")
                pg.fill("input[name=user]", user)
                pg.fill("input[name=password]", wrong)
                pg.click("button[type=submit]")
                expect(pg.locator(".error")).to_contain_text("パスワードが違います")
            sign_in(pg, stack.base_url, "suzuki")
        finally:
            ctx.close()

        deadline = time.monotonic() + 30
        while True:  # written in the background: poll
            failed = stack.cli("audit", "--action", "console.signin_failed", "--json")
            assert failed.returncode == 0, failed.stderr
            records = [orjson.loads(line) for line in failed.stdout.splitlines()]
            tried = {(r["actor"], r["detail"].get("reason")) for r in records}
            if {("suzuki", "wrong_password"), ("mallory", "unknown_user")} <= tried:
                break
            assert time.monotonic() < deadline, f"failed sign-ins not audited: {tried}"
            time.sleep(0.5)
        assert all(r["via"] == "console" and r["detail"]["remote"] == "127.0.0.1" for r in records)
        assert wrong not in failed.stdout

        table = stack.cli("audit", "--action", "console.signin", "--actor", "suzuki")
        assert table.returncode == 0, table.stderr
        header, *rows = table.stdout.splitlines()
        assert header.split() == ["いつ", "誰が", "何を", "どのように"]
        assert rows and all("suzuki" in r and "コンソールにサインイン" in r for r in rows)
        everything = stack.cli("audit", "--json")
        assert wrong not in everything.stdout and TWELVE.findall(everything.stdout) == []

    def test_logout(self, page: Page, stack: ConsoleWorker) -> None:
        """Signing out ends the session: the API answers 401 and pages go to the sign-in form."""
        page.click("#logout button")
        expect(page).to_have_url(re.compile(r"/console/login$"))
        assert page.request.get(stack.base_url + "/console/api/me").status == 401
        page.goto(stack.base_url + "/console")
        expect(page).to_have_url(re.compile(r"/console/login\?next="))
