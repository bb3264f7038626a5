"""Fixtures of the console tests: brokers, an SMTP sink, headless Chromium.

The real-broker fixtures (``apache_kafka``, ``tansu``) live in
``tests/integration/conftest.py``; conftest fixtures are only visible below
their directory, so they are loaded from there and re-exported.

Chromium is Debian's ``/usr/bin/chromium`` driven by Playwright (never a
downloaded browser build). Tests using ``browser`` are marked ``browser``,
tests using a broker ``integration``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
from console_kit import SCREENSHOTS, MailSink

_spec = importlib.util.spec_from_file_location(
    "leakwatch_integration_conftest_for_console", Path(__file__).resolve().parents[1] / "integration" / "conftest.py"
)
assert _spec is not None and _spec.loader is not None
_integration = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_integration)

apache_kafka = _integration.apache_kafka
tansu = _integration.tansu

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
        if names & {"apache_kafka", "tansu", "stack", "apache_stack"}:
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
    s = MailSink().start()
    try:
        yield s
    finally:
        s.stop()
