"""The console on Apache Kafka: a live alert and an acknowledgment, as on tansu."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from console_kit import (
    HOTLINE,
    ConsoleWorker,
    MailSink,
    ensure_topics,
    new_context,
    off_hours_id,
    row,
    sign_in,
    weekend_events,
)
from playwright.sync_api import Browser, expect


@pytest.fixture(scope="module")
def apache_stack(apache_kafka: Any, sink: MailSink, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleWorker]:
    """One worker on Apache Kafka (no timed escalation)."""
    worker = ConsoleWorker(tmp_path_factory.mktemp("console-apache"), apache_kafka.bootstrap, sink)
    ensure_topics(worker)
    worker.start(timeout=180.0)
    try:
        yield worker
    finally:
        worker.stop()
        print(worker.log_tail(40))


class TestConsoleOnApacheKafka:
    """The same console behaviour against a real Apache Kafka broker."""

    def test_live_alert_and_console_ack(self, browser: Browser, apache_stack: ConsoleWorker, sink: MailSink) -> None:
        """An alert appears without reload, is acknowledged in the console, and the ack is on the acks topic."""
        ctx = new_context(browser)
        try:
            page = ctx.new_page()
            sign_in(page, apache_stack.base_url, user="suzuki")
            aid = off_hours_id("u-apache")
            page.evaluate("window.__sameDocument = 'yes'")
            apache_stack.produce(weekend_events("u-apache", "情報政策課"))
            expect(row(page, aid)).to_be_visible(timeout=60_000)
            assert page.evaluate("window.__sameDocument") == "yes"
            sink.wait_for_blocking(lambda m: bool(sink.about(aid, to=HOTLINE)), 60, "the hotline mail")
            row(page, aid).locator("a").click()
            expect(page).to_have_url(re.compile(re.escape(f"/alerts/{aid}") + "$"))
            page.click("#ack-btn")
            expect(page.locator("#a-msg")).to_have_text("受領を記録しました。")
            expect(page.locator('#d-trail tbody tr[data-action="ack"]')).to_contain_text("suzuki")
            acks = [a for a in apache_stack.read(apache_stack.topics["topic_acks"]) if a["alert_id"] == aid]
            assert [(a["by"], a["via"]) for a in acks] == [("suzuki", "console")]
        finally:
            ctx.close()
