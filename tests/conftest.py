"""Suite-wide guard: no personal number in anything a test run prints or logs.

Every test's captured stdout, stderr and log records (the worker's structured
logs included, when the worker runs in-process) are scanned after the test;
a 12-digit run, plain, grouped 4-4-4 or full-width, turns a passing test into
a failure naming where it appeared. Subprocess outputs are checked by the
tests that start them.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest
from leakcheck import find_leak


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
