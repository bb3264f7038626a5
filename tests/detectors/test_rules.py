"""Rule files and agency overrides are validated with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from detectors.engine import DETECTORS, Engine
from detectors.rules import (
    DEFAULT_RULES_DIR,
    VIEWPOINTS,
    RuleError,
    apply_overrides,
    load_overrides,
    load_rule_file,
    load_rules,
    rule_from_dict,
)

RULE_FILES = sorted(DEFAULT_RULES_DIR.glob("*.yml"))


def minimal(**changes: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "id": "x",
        "detector": "off_hours",
        "title": "t",
        "description": "d",
        "viewpoint": "unnatural_time",
        "level": "low",
    }
    doc.update(changes)
    return doc


class TestBundledRules:
    """Every bundled rule loads, has its metadata, and runs."""

    @pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.stem)
    def test_rule_file_is_complete(self, path: Path) -> None:
        """id matches file and detector, metadata present, viewpoint known."""
        rule = load_rule_file(path)
        assert rule.id == path.stem == rule.detector
        assert rule.detector in DETECTORS
        assert rule.viewpoint in VIEWPOINTS
        assert rule.tags and rule.falsepositives and rule.description.strip()
        assert rule.title_en and rule.reasons

    @pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.stem)
    def test_rule_has_samples_and_tests(self, path: Path) -> None:
        """One rule = one test module = one samples dir with positives and negatives."""
        root = Path(__file__).resolve().parents[1]
        assert (root / "detectors" / f"test_{path.stem}.py").is_file()
        assert (root / "samples" / path.stem / "positive.jsonl").is_file()
        assert (root / "samples" / path.stem / "negative.jsonl").is_file()

    def test_engine_builds_with_all_rules(self) -> None:
        """The engine accepts every bundled rule's params."""
        engine = Engine(load_rules())
        assert len(engine.detectors) == len(RULE_FILES)


class TestValidation:
    """Bad rules and overrides name the file, the key and the reason."""

    @pytest.mark.parametrize(
        ("doc", "key"),
        [
            (minimal(level="urgent"), "level"),
            (minimal(viewpoint="vibes"), "viewpoint"),
            (minimal(title=""), "title"),
            (minimal(colour="red"), "colour"),
            (minimal(tags="x"), "tags"),
            (minimal(reasons={"night": {"title": "n", "level": "huge"}}), "reasons.night.level"),
            (minimal(allowlist={"people": []}), "allowlist.people"),
            (minimal(enabled="yes"), "enabled"),
        ],
    )
    def test_bad_rule(self, doc: dict[str, object], key: str) -> None:
        """Each defect is reported against its key."""
        with pytest.raises(RuleError) as info:
            rule_from_dict(doc, "rule.yml")
        assert info.value.key == key and info.value.source == "rule.yml"

    def test_bad_param_names_the_param(self) -> None:
        """Unknown or mistyped params fail when the engine builds the detector."""
        for params, key in (({"grace_minutes": "x"}, "params.grace_minutes"), ({"nope": 1}, "params.nope")):
            with pytest.raises(RuleError) as info:
                Engine([rule_from_dict(minimal(params=params))])
            assert info.value.key == key

    def test_unknown_detector(self) -> None:
        """A rule naming no known detector is an error."""
        with pytest.raises(RuleError, match="no detector named"):
            Engine([rule_from_dict(minimal(detector="telepathy"))])

    def test_invalid_yaml(self, tmp_path: Path) -> None:
        """YAML syntax errors are RuleErrors, not tracebacks."""
        path = tmp_path / "bad.yml"
        path.write_text("id: [unclosed", encoding="utf-8")
        with pytest.raises(RuleError, match="not valid YAML"):
            load_rule_file(path)


class TestOverrides:
    """An agency changes thresholds and allowlists in its own file."""

    def test_override_params_level_allowlist(self, tmp_path: Path) -> None:
        """Params merge, level replaces, allowlists extend."""
        path = tmp_path / "agency.yml"
        path.write_text(
            "overrides:\n  off_hours:\n    level: critical\n    params: {grace_minutes: 90}\n"
            "    allowlist: {users: [night-duty]}\n    reasons: {night: {level: high}}\n",
            encoding="utf-8",
        )
        rules = apply_overrides(load_rules(), load_overrides(path))
        rule = next(r for r in rules if r.id == "off_hours")
        assert rule.level == "critical"
        assert rule.params["grace_minutes"] == 90 and rule.params["timezone"] == "Asia/Tokyo"
        assert "night-duty" in rule.allowlist.users
        assert rule.reason("night").level == "high"

    @pytest.mark.parametrize(
        ("text", "match"),
        [
            ("overrides:\n  no_such_rule: {level: low}\n", "no such rule"),
            ("overrides:\n  off_hours: {title: x}\n", "cannot be overridden"),
            ("overrides:\n  off_hours: {level: extreme}\n", "must be one of"),
            ("rules: {}\n", "one key"),
            ("overrides:\n  off_hours: {reasons: {dawn: {level: low}}}\n", "no reason"),
        ],
    )
    def test_bad_overrides(self, tmp_path: Path, text: str, match: str) -> None:
        """Override mistakes are reported with the file and key."""
        path = tmp_path / "agency.yml"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(RuleError, match=match) as info:
            apply_overrides(load_rules(), load_overrides(path))
        assert str(path) in str(info.value)


class TestDescriptions:
    """Mail, reports and the console explain each rule in Japanese by default."""

    @pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.stem)
    def test_japanese_description(self, path: Path) -> None:
        """Every bundled rule has a Japanese description, used for lang=ja only."""
        rule = load_rule_file(path)
        assert rule.description_ja and rule.describe("ja") != rule.describe("en")
        assert any("\u3040" <= c <= "\u30ff" for c in rule.describe("ja"))
        assert "\n" not in rule.describe("ja")
