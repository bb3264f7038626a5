"""Fixtures of the console tests: brokers, an SMTP sink, headless Chromium.

The real-broker fixtures (``apache_kafka``, ``tansu``) come from the root
``tests/conftest.py`` (``tests/brokerfixtures.py``), shared by every test directory.

Chromium is Debian's ``/usr/bin/chromium`` driven by Playwright (never a
downloaded browser build). Tests using ``browser`` are marked ``browser``,
tests using a broker ``integration``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from console_kit import SCREENSHOTS, MailSink

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & {"stack", "apache_stack"}:  # direct users of a broker: see brokerfixtures
            item.add_marker(pytest.mark.integration)
        if names & {"browser", "page", "stack", "apache_stack"}:
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Headless Debian Chromium for one test module.

    Module scope on purpose: Playwright's sync API keeps an event loop running
    in this thread while it is open, which would break every asyncio test that
    runs after it (pytest-asyncio needs the thread's loop to itself).
    """
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} is missing: apt-get install chromium (scripts/install-system-deps.sh)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    """Where the test run leaves screenshots (artifacts/screenshots/)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


@pytest.fixture(scope="module")
def sink() -> Iterator[MailSink]:
    """A running SMTP sink for the module's worker."""
    with MailSink() as s:
        yield s
