"""No personal number in any output of ``leakwatch analyze``: alerts, report, stdout, stderr.

The input puts valid My Numbers (check digit and all) everywhere an agency's
export might: user, terminal, subject, device, department and id columns,
plain and grouped 4-4-4, in a bad row's values, in the file name and in the
``--checked-by`` text. The run must raise findings (so the outputs do quote
users, terminals and records) and still no 12-digit run may appear.
"""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest

from leakwatch.cli import main
from schemas.mynumber import check_digit, is_valid_mynumber

#: A 12-digit run, plain or grouped 4-4-4 by a hyphen or a space.
TWELVE = re.compile(r"(?<!\d)\d{12}(?!\d)")
GROUPED = re.compile(r"(?<!\d)\d{4}[- ]\d{4}[- ]\d{4}(?!\d)")


def my_number(body: str) -> str:
    """A valid personal number from an 11-digit body."""
    number = body + str(check_digit(body))
    assert is_valid_mynumber(number)
    return number


def grouped(number: str, sep: str) -> str:
    return sep.join((number[:4], number[4:8], number[8:]))


USER = my_number("10000000019")
TERMINAL = my_number("20000000028")
SUBJECT = my_number("30000000037")
DEVICE = my_number("40000000046")
DEPARTMENT = my_number("50000000055")
EVENT = my_number("60000000064")
FILE = my_number("70000000073")
CHECKER = my_number("80000000082")
NUMBERS = (USER, TERMINAL, SUBJECT, DEVICE, DEPARTMENT, EVENT, FILE, CHECKER)


def leaks(text: str) -> list[str]:
    """Every 12-digit run (plain or grouped) in ``text``."""
    return TWELVE.findall(text) + GROUPED.findall(text)


def jsonl_input(path: Path) -> None:
    """A Saturday night of lookups, prints and USB writes, numbers in every field."""
    lines = []
    for i in range(12):
        lines.append(
            {
                "event_id": f"{EVENT}-{i}" if i % 2 else grouped(EVENT, "-") + f"/{i}",
                "ts": f"2019-02-02T22:{10 + i:02d}:00+09:00",
                "user": USER if i % 3 else grouped(USER, " "),
                "terminal": TERMINAL if i % 2 else f"pc-{grouped(TERMINAL, '-')}",
                "action": "search",
                "result": "success",
                "mynumber_ref": True,
                "subject": SUBJECT if i % 2 else grouped(SUBJECT, " "),
                "department": f"課{DEPARTMENT}",
            }
        )
    common = {"user": USER, "terminal": TERMINAL, "mynumber_ref": True, "department": DEPARTMENT}
    lines.append({**common, "event_id": "p1", "ts": "2019-02-04T10:00:00+09:00", "action": "print_screen", "result": "success", "subject": SUBJECT})
    lines.append({**common, "event_id": "x1", "ts": "2019-02-04T10:05:00+09:00", "action": "export", "result": "denied", "subject": SUBJECT})
    lines.append({**common, "event_id": "u1", "ts": "2019-02-04T10:10:00+09:00", "action": "usb_write", "result": "success", "device": DEVICE, "records": 5000})
    lines.append({**common, "event_id": "bad", "ts": "2019-02-04T10:10:00+09:00", "action": SUBJECT, "result": "success"})
    path.write_bytes(b"\n".join(orjson.dumps(line) for line in lines) + b"\n")


def csv_input(path: Path) -> None:
    """The same kind of data as a Japanese CSV export, numbers in every column."""
    rows = ["通番,日時,職員名,端末番号,操作内容,処理結果,個人番号参照,対象者,媒体,所属"]
    for i in range(12):
        rows.append(f"{EVENT[:-2]}{i:02d},2019/02/09 23:{10 + i:02d}:00,{grouped(USER, '-')},{TERMINAL},照会,成功,あり,{SUBJECT},,{DEPARTMENT}")
    rows.append(f"c-usb,2019/02/09 23:30:00,{USER},{TERMINAL},USB書込,成功,あり,,{grouped(DEVICE, ' ')},{DEPARTMENT}")
    rows.append(f"c-bad,2019/02/09 23:31:00,{USER},{TERMINAL},{grouped(SUBJECT, '-')},成功,あり,,,")
    rows.append(f"c-bad2,{SUBJECT},{USER},{TERMINAL},照会,成功,あり,,,")
    path.write_text("\r\n".join(rows) + "\r\n", encoding="cp932")


class TestNoPersonalNumberInOutputs:
    """Personal numbers go in; only pseudonymous tokens come out, everywhere."""

    @pytest.mark.parametrize("lang", ["ja", "en"])
    def test_analyze_outputs(self, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, lang: str) -> None:
        """Alerts JSONL, HTML report, stdout and stderr carry no 12-digit run."""
        monkeypatch.setenv("LEAKWATCH_PSEUDONYM_KEY", "no-personal-number-test-key-01")
        jsonl = tmp_path / "events.jsonl"
        csv = tmp_path / f"export_{FILE}.csv"
        jsonl_input(jsonl)
        csv_input(csv)
        assert leaks(jsonl.read_text(encoding="utf-8")) and leaks(csv.read_text(encoding="cp932"))
        alerts, report = tmp_path / f"alerts_{FILE}.jsonl", tmp_path / "report.html"
        code = main(
            [
                "analyze", str(jsonl), str(csv), str(tmp_path / f"missing_{grouped(FILE, '-')}.tsv"),
                "--alerts", str(alerts), "--report", str(report), "--lang", lang,
                "--checked-by", f"監査担当 {CHECKER}", "--progress",
            ]
        )  # fmt: skip
        captured = capsys.readouterr()
        assert code == 0, captured.err
        alert_text = alerts.read_text(encoding="utf-8")
        html = report.read_text(encoding="utf-8")
        outputs = {"alerts": alert_text, "report": html, "stdout": captured.out, "stderr": captured.err}

        # The run is meaningful: findings that quote users, terminals, records and devices.
        docs = [orjson.loads(line) for line in alert_text.splitlines()]
        rules = {d["rule_id"] for d in docs}
        assert {"off_hours", "repeated_queries", "unusual_operation", "unauthorized_attempts", "usb_writes"} <= rules, rules
        assert any(d["evidence"]["subjects"] for d in docs)
        assert any(d["evidence"]["devices"] for d in docs)
        assert all(d["user"].startswith("mn_") for d in docs)
        assert "mn_" in html
        assert captured.err.count(".csv:") >= 2  # the two bad CSV rows were reported

        for name, text in outputs.items():
            assert not leaks(text), f"personal number in {name}: {leaks(text)[:3]}"
            for number in NUMBERS:
                assert number not in text, f"{number} in {name}"

    def test_pattern_catches_numbers(self) -> None:
        """The leak patterns used above do match every form the inputs contain."""
        text = " ".join([USER, grouped(USER, "-"), grouped(USER, " "), f"課{DEPARTMENT}", f"x{EVENT}-1"])
        assert len(leaks(text)) == 5
