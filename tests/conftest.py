"""Suite-wide guards and the shared real brokers.

* No personal number in anything a test run prints or logs: every test's
  captured stdout, stderr and log records (the worker's structured logs
  included, when the worker runs in-process) are scanned after the test; a
  12-digit run, plain, grouped 4-4-4 or full-width, turns a passing test into
  a failure naming where it appeared. Subprocess outputs are checked by the
  tests that start them.
* No personal number in any mail: at the end of the session every mail any
  :class:`support.MailSink` received (escalation and console tests alike) is
  scanned.
* The real brokers (``apache_kafka``, ``tansu``, ``broker``, see
  ``brokerfixtures.py``) are defined once here, so every test directory shares
  one tansu and one Apache Kafka broker per session.
"""

from __future__ import annotations

import sys
from collections.abc import Generator, Iterator
from typing import Any

import pytest
from brokerfixtures import apache_kafka as apache_kafka
from brokerfixtures import broker as broker
from brokerfixtures import mark_integration
from brokerfixtures import tansu as tansu
from leakcheck import find_leak


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests using a real broker are marked ``integration``."""
    mark_integration(items)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Generator[None, Any, None]:
    """Fail a passing test whose captured output carries a 12-digit run."""
    outcome = yield
    report = outcome.get_result()
    if report.outcome != "passed":
        return
    for section, content in report.sections:
        if not section.endswith(report.when):
            continue  # earlier phases were checked in their own report
        where = find_leak(content)
        if where is not None:
            report.outcome = "failed"
            report.longrepr = f"possible personal number in {section}: ...{where}..."
            return


@pytest.fixture(scope="session", autouse=True)
def no_personal_number_in_any_mail() -> Iterator[None]:
    """After the session: no mail received by any sink holds a 12-digit run."""
    yield
    support = sys.modules.get("support")  # no sink was ever started unless it was imported
    if support is None:
        return
    found = []
    for rec in support.ALL_RECEIVED:
        for text in support.mail_texts(rec.msg):
            hits = support.leaks(text)
            if hits:
                found.append((rec.subject, hits[:3]))
    assert not found, f"personal-number-like digit runs in {len(found)} mail(s): {found[:5]}"
