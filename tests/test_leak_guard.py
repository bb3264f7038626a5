"""The suite-wide leak guard itself must work, or it guards nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from leakcheck import WRITTEN_FORMS, find_leak

pytest_plugins = ["pytester"]


class TestLeakGuard:
    """find_leak and the report hook catch 12-digit runs."""

    @pytest.mark.parametrize(
        "text",
        [
            "id 123456789018 x",
            "1234-5678-9018",
            "1234 5678 9018",
            "１２３４５６７８９０１８",
            "1234　5678　9018",
            "１２３４－５６７８－９０１８",
            '{"s":"\\u0031\\u0032\\u0033\\u0034\\u0035\\u0036\\u0037\\u0038\\u0039\\u0030\\u0031\\u0038"}',
        ],
    )
    def test_finds(self, text: str) -> None:
        """Plain, grouped and full-width runs are found."""
        assert find_leak(text) is not None

    @pytest.mark.parametrize("form", sorted(WRITTEN_FORMS))
    def test_finds_every_written_form(self, form: str) -> None:
        """Every form the pipeline must pseudonymise counts as a leak when it shows."""
        assert find_leak(f"subject {WRITTEN_FORMS[form]}.") is not None

    @pytest.mark.parametrize("text", ["1549113063000", "12345678901", "lw-12345678-12345678-12345678", "2019-02-02T22:11:03+09:00"])
    def test_ignores(self, text: str) -> None:
        """Epoch millis, 11 digits, grouped ids and timestamps are fine."""
        assert find_leak(text) is None

    def test_hook_fails_a_leaking_test(self, pytester: pytest.Pytester) -> None:
        """A test printing a personal number fails even though its assertions pass."""
        here = Path(__file__).parent
        pytester.makeconftest((here / "conftest.py").read_text(encoding="utf-8"))
        pytester.makepyfile(
            leakcheck=(here / "leakcheck.py").read_text(encoding="utf-8"),
            brokerfixtures=(here / "brokerfixtures.py").read_text(encoding="utf-8"),
        )
        pytester.makepyfile(test_leaks="def test_leaks():\n    print('subject 123456789018')\n")
        # Run it quietly: echoing its output here would (rightly) trip this test's own guard.
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "test_leaks.py"],
            cwd=pytester.path,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 1
        assert "possible personal number" in done.stdout
        assert "1 failed" in done.stdout and "error" not in done.stdout.lower().split("short test summary")[-1]
