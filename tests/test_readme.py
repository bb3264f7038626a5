"""The README documents every setting the worker reads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from streams.config import Settings
from streams.console import ConsoleSettings
from streams.mail_settings import MailSettings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


class TestReadmeSettings:
    """Each LEAKWATCH_* variable appears in the README's settings tables."""

    @pytest.mark.parametrize(
        ("cls", "prefix"),
        [(Settings, "LEAKWATCH_"), (MailSettings, "LEAKWATCH_MAIL_"), (ConsoleSettings, "LEAKWATCH_CONSOLE_")],
        ids=["core", "mail", "console"],
    )
    def test_every_setting_documented(self, cls: type, prefix: str) -> None:
        """No setting is missing from the README."""
        missing = [f"{prefix}{f.name.upper()}" for f in dataclasses.fields(cls) if f"`{prefix}{f.name.upper()}`" not in README]
        assert not missing, f"add to README: {missing}"

    def test_first_two_commands(self) -> None:
        """The README's first two commands are the demo and the tests; CI runs the latter."""
        ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text(encoding="utf-8")
        blocks = README.split("```sh", 2)
        commands = [line.split("#")[0].strip() for line in blocks[1].split("```")[0].strip().splitlines()]
        assert commands[:2] == ["make demo", "make test"]
        assert ci.strip().splitlines()[-1] == "make test"
