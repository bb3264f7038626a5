"""Broker-free parts of the streaming worker: log scrubbing, reason codes, 12-digit pre-check, CLI errors."""

from __future__ import annotations

import io
import json
import logging
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import structlog

from detectors.rules import load_rules
from schemas.event import EventError
from schemas.mynumber import contains_twelve_digits
from streams.config import ConfigError, Settings, load_settings
from streams.detection import rules_version
from streams.engines import error_code, has_twelve_digits
from streams.logging import REDACTED, configure_logging, get_logger, scrub_personal_numbers
from streams.worker import topic_specs

REPO = Path(__file__).resolve().parents[2]


class TestLogScrubbing:
    """No 12-digit run survives into a log line, whatever carries it."""

    def test_processor_redacts_strings_ints_and_nested(self) -> None:
        """Strings, 12-digit integers and nested values are redacted; other values kept."""
        out = scrub_personal_numbers(
            None,
            "info",
            {"event": "x 1234 5678 9012 y", "n": 123456789012, "small": 42, "nested": {"k": ["123456789012"]}, "ok": "2024-11-19"},
        )
        assert out["event"] == f"x {REDACTED} y"
        assert out["n"] == REDACTED and out["small"] == 42
        assert out["nested"] == {"k": [REDACTED]}
        assert out["ok"] == "2024-11-19"

    def test_json_lines_from_structlog_and_stdlib(self) -> None:
        """Both structlog and stdlib loggers render one JSON object per line, scrubbed, with bound context."""
        stream = io.StringIO()
        configure_logging("info", "json", worker="w1", stream=stream)
        try:
            get_logger("leakwatch.test", partition=3).info("looked up 123456789012", rule_id="off_hours")
            try:
                raise ValueError("bad value 1234-5678-9012")
            except ValueError:
                logging.getLogger("thirdparty").exception("failed")
            get_logger("leakwatch.test").debug("not shown at info")
        finally:
            configure_logging("warning", "console", stream=io.StringIO())
            structlog.contextvars.clear_contextvars()
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert len(lines) == 2
        first, second = lines
        assert first["event"] == f"looked up {REDACTED}"
        assert (first["worker"], first["partition"], first["rule_id"], first["level"]) == ("w1", 3, "off_hours", "info")
        assert second["level"] == "error" and "ValueError" in second["exception"]
        assert not contains_twelve_digits(stream.getvalue().encode())


class TestReasonCodes:
    """The ``reason`` label of leakwatch_events_invalid_total stays bounded."""

    @pytest.mark.parametrize(
        ("error", "code"),
        [
            (EventError("user", "required field is missing"), "user.required"),
            (EventError("surname-of-anyone", "unknown field"), "unknown_field"),
            (EventError("$", "invalid JSON: unexpected character"), "json"),
            (EventError("$", "an event must be a JSON object, got int"), "$.an"),
        ],
    )
    def test_codes(self, error: EventError, code: str) -> None:
        """Known fields keep their code; producer-chosen names collapse to one label."""
        assert error_code(error) == code


class TestTwelveDigitCheck:
    """The fast 12-digit pre-check answers exactly like schemas.mynumber.contains_twelve_digits."""

    @pytest.mark.parametrize(
        "raw",
        [
            b"123456789012",
            b"1234 5678 9012",
            b"1234-5678-9012",
            b"1234-56789012",
            b"12345678 9012",
            b"x1234567890123y",
            b"12345678901",
            b"1234 5678  9012",
            b"2024-11-19T10:00:00+09:00",
            b'{"ts":"2024-11-19T10:00:00+09:00","terminal":"172.16.100.200","event_id":"ev-0000000001"}',
            b"0000-0000-0000",
            b"",
        ],
    )
    def test_same_answer(self, raw: bytes) -> None:
        """Fast and reference check agree."""
        assert has_twelve_digits(raw) == contains_twelve_digits(raw)

    def test_random_agreement(self) -> None:
        """Agreement on random strings of digits, separators, full-width forms, escapes and their pieces."""
        rnd = random.Random(4)
        pieces = [bytes([b]) for b in b"0123456789 -a,\\u"] + [
            c.encode() for c in "０９－　（課"
        ] + [b"\\u0031", b"\\u0020", b"\\uFF10", b"\\uff0d", b"\\u3000", b"\\u00e9", b"\xef", b"\xe3\x80", b"\xef\xbc"]
        for _ in range(20000):
            raw = b"".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 30)))
            assert has_twelve_digits(raw) == contains_twelve_digits(raw), raw


class TestTopicsAndRules:
    """Topic layout and the rules digest."""

    def test_checkpoint_topic_compacted_and_copartitioned(self) -> None:
        """Inputs and checkpoints share the partition count; checkpoints are compacted."""
        settings = load_settings(Settings, env={}, overrides={"partitions": 6})
        specs = {name: (parts, cfg) for name, parts, cfg in topic_specs(settings)}
        assert specs[settings.topic_access][0] == specs[settings.topic_operation][0] == specs[settings.topic_checkpoints][0] == 6
        assert specs[settings.topic_checkpoints][1] == {"cleanup.policy": "compact"}

    def test_rules_version_changes_with_params(self) -> None:
        """Same rules, same digest; a changed threshold, another digest."""
        from dataclasses import replace

        rules = load_rules()
        assert rules_version(rules) == rules_version(list(reversed(rules)))
        changed = [replace(r, params={**r.params, "threshold": 99}) if r.id == "repeated_queries" else r for r in rules]
        assert rules_version(changed) != rules_version(rules)
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{8}", rules_version(rules)), "a label must never hold 12 digits in a row"


class TestDetectionProcesses:
    """``detection_process``: how many detection children a worker runs."""

    @pytest.mark.parametrize(("value", "children"), [("false", 0), ("true", 1), ("1", 1), ("3", 3), ("64", 64)])
    def test_values(self, value: str, children: int) -> None:
        """false, true and a number give 0, 1 and that many children."""
        assert load_settings(Settings, env={}, overrides={"detection_process": value}).detection_processes() == children

    def test_auto_uses_the_cpus(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """auto: none on one CPU, one child per CPU from two, at most four."""
        import os

        settings = load_settings(Settings, env={}, overrides={"detection_process": "auto"})
        for cpus, children in ((1, 0), (2, 2), (3, 3), (16, 4)):
            monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cpus: set(range(n)), raising=False)
            assert settings.detection_processes() == children

    @pytest.mark.parametrize("value", ["0", "65", "two", "-1", "１"])
    def test_bad_values_name_the_setting(self, value: str) -> None:
        """Anything else is a configuration error naming the setting."""
        with pytest.raises(ConfigError, match="detection_process"):
            load_settings(Settings, env={}, overrides={"detection_process": value})


class TestWorkerCommandErrors:
    """``leakwatch worker`` reports bad settings in one line and exits 2."""

    @pytest.mark.parametrize(
        ("env", "message"),
        [
            ({"LEAKWATCH_PARTITIONS": "many"}, "LEAKWATCH_PARTITIONS"),
            ({"LEAKWATCH_LATENESS": "soon"}, "lateness"),
            ({"LEAKWATCH_RULES_PATH": "/nonexistent/rules"}, "rules directory does not exist"),
        ],
    )
    def test_bad_setting_exits_2(self, env: dict[str, str], message: str) -> None:
        """Exit status 2, a message naming the setting, no traceback."""
        proc = subprocess.run(
            [sys.executable, "-m", "leakwatch", "worker"],
            env={"PATH": "/usr/bin:/bin", **env},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
