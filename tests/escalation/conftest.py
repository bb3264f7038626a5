"""Fixtures of the escalation tests.

The real-broker fixtures (``apache_kafka``, ``tansu``, ``broker``) live in
``tests/integration/conftest.py``; conftest fixtures are only visible below
their directory, so they are loaded from there (not copied) and re-exported.

Every mail any :class:`MailSink` of this session received is scanned at the
end of the session: one personal-number-like digit run anywhere in a header or
a decoded text part fails the run (see ``test_no_personal_number_in_mail.py``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
from escalation_kit import ALL_RECEIVED, MailSink, leaks, mail_texts

_spec = importlib.util.spec_from_file_location(
    "leakwatch_integration_conftest", Path(__file__).resolve().parents[1] / "integration" / "conftest.py"
)
assert _spec is not None and _spec.loader is not None
_integration = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_integration)

apache_kafka = _integration.apache_kafka
tansu = _integration.tansu
broker = _integration.broker


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    names = {"broker", "apache_kafka", "tansu"}
    for item in items:
        if names.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def sink() -> Iterator[MailSink]:
    """A running SMTP server on a free loopback port (stopped afterwards)."""
    s = MailSink().start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="session", autouse=True)
def no_personal_number_in_any_mail() -> Iterator[None]:
    """After the session: no mail received by any sink holds a 12-digit run."""
    yield
    found = []
    for rec in ALL_RECEIVED:
        for text in mail_texts(rec.msg):
            hits = leaks(text)
            if hits:
                found.append((rec.subject, hits[:3]))
    assert not found, f"personal-number-like digit runs in {len(found)} mail(s): {found[:5]}"
