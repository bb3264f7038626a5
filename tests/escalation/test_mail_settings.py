"""Mail settings: the ``mail:`` section, ``LEAKWATCH_MAIL_*``, validation and routing."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.config import ConfigError, load_settings
from streams.mail_settings import MailSettings

CONFIG = """
brokers: 127.0.0.1:9092
mail:
  smtp_host: smtp.city.example.lg.jp
  tls: starttls
  from_address: leakwatch@city.example.lg.jp
  hotline: [hotline@city.example.lg.jp]
  executives: [cpo@city.example.lg.jp, mayor@city.example.lg.jp]
  language: en
  ack_secret: 0123456789abcdef0123
  routes:
    - {department: [税務課], to: [zeimu@city.example.lg.jp]}
    - {rule: [usb_write], severity: [high, critical], to: [joho@city.example.lg.jp]}
  tiers:
    - {after: 30m, to: [cpo@city.example.lg.jp]}
    - {after: 2h, to: [exec@city.example.lg.jp]}
  digest_threshold: 5
  digest_window: 90s
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "leakwatch.yml"
    path.write_text(text, encoding="utf-8")
    return path


class TestLoading:
    """The section is read like every other setting: defaults < file < environment."""

    def test_defaults_are_valid_and_disabled(self) -> None:
        """With nothing configured mail is off and every default validates."""
        mail = load_settings(MailSettings, section="mail", env={})
        assert not mail.enabled
        assert mail.language == "ja"
        assert mail.port == 25
        assert mail.digest_window_s == 60.0

    def test_file_section(self, tmp_path: Path) -> None:
        """The ``mail:`` mapping of the config file, structured values included."""
        mail = load_settings(MailSettings, section="mail", config_file=write(tmp_path, CONFIG), env={})
        assert mail.enabled and mail.port == 587
        assert mail.hotline == ("hotline@city.example.lg.jp",)
        assert [(t.number, t.after_s, t.to) for t in mail.parsed_tiers] == [
            (1, 1800.0, ("cpo@city.example.lg.jp",)),
            (2, 7200.0, ("exec@city.example.lg.jp",)),
        ]
        assert len(mail.parsed_routes) == 2
        assert mail.digest_threshold == 5 and mail.digest_window_s == 90.0

    def test_environment_overrides_file(self, tmp_path: Path) -> None:
        """``LEAKWATCH_MAIL_*`` wins; lists are comma-separated, structures JSON."""
        env = {
            "LEAKWATCH_MAIL_HOTLINE": "a@x.example.jp, b@x.example.jp",
            "LEAKWATCH_MAIL_TIERS": '[{"after": "1s", "to": ["t1@x.example.jp"]}]',
            "LEAKWATCH_MAIL_LANGUAGE": "ja",
            "LEAKWATCH_MAIL_SMTP_PORT": "2525",
        }
        mail = load_settings(MailSettings, section="mail", config_file=write(tmp_path, CONFIG), env=env)
        assert mail.hotline == ("a@x.example.jp", "b@x.example.jp")
        assert mail.parsed_tiers[0].after_s == 1.0
        assert mail.language == "ja" and mail.port == 2525

    @pytest.mark.parametrize(
        ("changes", "name"),
        [
            ({"tls": "ssl"}, "mail.tls"),
            ({"language": "fr"}, "mail.language"),
            ({"smtp_host": "relay", "hotline": ()}, "mail.hotline"),
            ({"hotline": ("not-an-address",)}, "mail.hotline"),
            ({"ack_secret": "short"}, "mail.ack_secret"),
            ({"digest_window": "soon"}, "mail.digest_window"),
            ({"tiers": [{"after": "2h", "to": ["a@x.jp"]}, {"after": "1h", "to": ["b@x.jp"]}]}, "mail.tiers[1].after"),
            ({"tiers": [{"to": ["a@x.jp"]}]}, "mail.tiers[0].after"),
            ({"tiers": [{"after": "1h", "to": []}]}, "mail.tiers[0].to"),
            ({"routes": [{"division": ["x"], "to": ["a@x.jp"]}]}, "mail.routes[0].division"),
            ({"routes": [{"severity": ["urgent"], "to": ["a@x.jp"]}]}, "mail.routes[0].severity"),
            ({"routes": [{"severity": ["high"]}]}, "mail.routes[0].to"),
        ],
    )
    def test_bad_values_name_the_setting(self, changes: dict[str, object], name: str) -> None:
        """Every bad value is a ConfigError naming exactly the offending key."""
        with pytest.raises(ConfigError) as err:
            MailSettings(**changes).validate()  # type: ignore[arg-type]
        assert err.value.name == name


class TestRouting:
    """Who gets an alert: hotline always, executives for critical, matching routes."""

    @pytest.fixture
    def mail(self, tmp_path: Path) -> MailSettings:
        return load_settings(MailSettings, section="mail", config_file=write(tmp_path, CONFIG), env={})

    def test_hotline_always(self, mail: MailSettings) -> None:
        """A high alert matching no route goes to the hotline only."""
        assert mail.recipients_for("high", "off_hours", "住民課") == ("hotline@city.example.lg.jp",)

    def test_critical_adds_executives(self, mail: MailSettings) -> None:
        """Critical alerts also reach the executive list."""
        assert mail.recipients_for("critical", "off_hours", None) == (
            "hotline@city.example.lg.jp",
            "cpo@city.example.lg.jp",
            "mayor@city.example.lg.jp",
        )

    def test_department_route(self, mail: MailSettings) -> None:
        """A department route adds its recipients for that department only."""
        assert "zeimu@city.example.lg.jp" in mail.recipients_for("medium", "off_hours", "税務課")
        assert "zeimu@city.example.lg.jp" not in mail.recipients_for("medium", "off_hours", "福祉課")

    def test_route_conditions_all_apply(self, mail: MailSettings) -> None:
        """Rule and severity conditions of one route must both match."""
        assert "joho@city.example.lg.jp" in mail.recipients_for("high", "usb_write", None)
        assert "joho@city.example.lg.jp" not in mail.recipients_for("medium", "usb_write", None)
        assert "joho@city.example.lg.jp" not in mail.recipients_for("high", "off_hours", None)

    def test_no_duplicates(self, mail: MailSettings) -> None:
        """An address listed twice is mailed once."""
        m = mail.replace(routes=[{"severity": ["critical"], "to": ["cpo@city.example.lg.jp", "hotline@city.example.lg.jp"]}])
        got = m.recipients_for("critical", "off_hours", None)
        assert len(got) == len(set(got)) == 3
