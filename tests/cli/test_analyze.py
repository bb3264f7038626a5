"""``leakwatch analyze`` and ``leakwatch rules`` through the real console entry point."""

from __future__ import annotations

import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import orjson
import pytest

from detectors.rules import VIEWPOINTS, load_rules
from leakwatch.cli import main
from leakwatch.report import ReportStats, render_report
from schemas.alert import Alert
from schemas.importers import ImportIssue

REPO = Path(__file__).resolve().parents[2]
PPC_SAMPLE = REPO / "samples" / "ppc_log_sample.tsv"
LEAKWATCH = Path(sys.executable).parent / "leakwatch"
KEY_ENV = {"LEAKWATCH_PSEUDONYM_KEY": "analyze-test-key-0123456789"}
HEADER = "日時\t職員名\t端末番号\t操作内容\t処理結果\t個人番号参照\n"

#: What the PPC sample must raise: (rule_id, reason).
PPC_EXPECTED = {
    ("off_hours", "weekend"),  # 2019/02/02 (Sat) 22:11 search with personal data
    ("unusual_operation", "print_screen"),  # 09:01 プリントスクリーン
    ("unauthorized_attempts", "denied_high_risk"),  # 08:30 書き出し 失敗
    ("unauthorized_attempts", "repeated_denied"),  # the failed searches
    ("unusual_terminal", "many_terminals"),  # seven terminals in a few days
}


def alerts_of(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def analyze(tmp_path: Path, *args: str | Path, name: str = "out") -> tuple[int, Path, Path]:
    alerts, report = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.html"
    code = main(["analyze", *map(str, args), "--alerts", str(alerts), "--report", str(report)])
    return code, alerts, report


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in KEY_ENV.items():
        monkeypatch.setenv(name, value)


class _Html(HTMLParser):
    """Collects tags, attributes and text of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(html: str) -> _Html:
    parser = _Html()
    parser.feed(html)
    parser.close()
    return parser


class TestPpcSample:
    """The PPC's sample log raises the findings its viewpoints describe."""

    def test_expected_findings(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Weekend search, print screen, failed write-out, repeated failures, many terminals."""
        code, alerts_path, report = analyze(tmp_path, PPC_SAMPLE, "--checked-at", "2019-03-01T10:00:00")
        assert code == 0
        alerts = alerts_of(alerts_path)
        found = {(a["rule_id"], a["reason"]) for a in alerts}
        assert found >= PPC_EXPECTED, found
        weekend = next(a for a in alerts if a["reason"] == "weekend")
        assert weekend["first_ts"] == "2019-02-02T22:11:03+09:00"
        assert weekend["user"] == "オサム" and weekend["evidence"]["terminals"] == ["172.16.100.xxx"]
        out = capsys.readouterr().out
        assert "read 12 events (1 users, 7 terminals)" in out
        assert report.is_file()

    def test_final_revision_only(self, tmp_path: Path) -> None:
        """Offline output has one line per finding: its last revision."""
        _, alerts_path, _ = analyze(tmp_path, PPC_SAMPLE)
        alerts = alerts_of(alerts_path)
        ids = [a["alert_id"] for a in alerts]
        assert len(ids) == len(set(ids))
        repeated = next(a for a in alerts if a["reason"] == "repeated_denied")
        assert repeated["count"] >= 3 and len(repeated["evidence"]["event_ids"]) >= 3

    def test_console_script(self, tmp_path: Path) -> None:
        """The installed ``leakwatch`` script runs the same analysis in a fresh process."""
        alerts, report = tmp_path / "a.jsonl", tmp_path / "r.html"
        proc = subprocess.run(
            [str(LEAKWATCH), "analyze", str(PPC_SAMPLE), "--alerts", str(alerts), "--report", str(report), "--lang", "en"],
            capture_output=True,
            text=True,
            timeout=120,
            env={"PATH": "/usr/bin:/bin", **KEY_ENV},
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        assert {(a["rule_id"], a["reason"]) for a in alerts_of(alerts)} >= PPC_EXPECTED
        assert "findings:" in proc.stdout
        assert '<html lang="en">' in report.read_text(encoding="utf-8")

    def test_deterministic(self, tmp_path: Path) -> None:
        """Two runs with the same key write byte-identical alerts."""
        _, first, _ = analyze(tmp_path, PPC_SAMPLE, name="one")
        _, second, _ = analyze(tmp_path, PPC_SAMPLE, name="two")
        assert first.read_bytes() == second.read_bytes()

    def test_files_out_of_order(self, tmp_path: Path) -> None:
        """Events are sorted by time: reversed rows split over files give the same findings."""
        rows = PPC_SAMPLE.read_text(encoding="utf-8").splitlines(keepends=True)[1:]
        late, early = tmp_path / "late.tsv", tmp_path / "early.tsv"
        late.write_text(HEADER + "".join(reversed(rows[6:])), encoding="utf-8")
        early.write_text(HEADER + "".join(reversed(rows[:6])), encoding="utf-8")
        _, split, _ = analyze(tmp_path, late, early, name="split")
        _, whole, _ = analyze(tmp_path, PPC_SAMPLE, name="whole")

        def key(a: dict[str, Any]) -> tuple[str, str, str, str, int]:
            return (a["rule_id"], a["reason"], a["first_ts"], a["last_ts"], a["count"])

        assert sorted(map(key, alerts_of(split))) == sorted(map(key, alerts_of(whole)))

    def test_seed_history_never_alerts(self, tmp_path: Path) -> None:
        """History only teaches baselines: its own weekend access is not reported."""
        history = tmp_path / "history.tsv"
        history.write_text(HEADER + "2019/01/26 22:00:00\tオサム\t172.16.100.xxx\t検索\t成功\tあり\n", encoding="utf-8")
        code, alerts_path, report = analyze(tmp_path, PPC_SAMPLE, "--seed-history", history)
        assert code == 0
        weekend = [a for a in alerts_of(alerts_path) if a["reason"] == "weekend"]
        assert [a["first_ts"][:10] for a in weekend] == ["2019-02-02"]
        assert "history.tsv" in report.read_text(encoding="utf-8")

    def test_duplicates_counted_once(self, tmp_path: Path) -> None:
        """The same event id in two files is analysed once and reported as a duplicate."""
        line = orjson.dumps({"event_id": "e1", "ts": "2019-02-02T22:11:03+09:00", "user": "u", "terminal": "t", "action": "search", "result": "success", "mynumber_ref": True})
        (tmp_path / "a.jsonl").write_bytes(line + b"\n")
        (tmp_path / "b.jsonl").write_bytes(line + b"\n")
        code, alerts_path, report = analyze(tmp_path, tmp_path / "a.jsonl", tmp_path / "b.jsonl")
        assert code == 0
        (weekend,) = alerts_of(alerts_path)
        assert weekend["count"] == 1
        assert "重複して除いた記録" in report.read_text(encoding="utf-8")


class TestExitCodes:
    """0 when the analysis ran, 1 when nothing could be read, 2 on usage or config errors."""

    def test_findings_still_exit_zero(self, tmp_path: Path) -> None:
        """Findings are results, not failures."""
        assert analyze(tmp_path, PPC_SAMPLE)[0] == 0

    def test_nothing_readable(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Only missing or unreadable files: exit 1, and the report still lists why."""
        code, alerts, report = analyze(tmp_path, tmp_path / "missing.csv")
        assert code == 1
        err = capsys.readouterr().err
        assert "missing.csv: $: cannot read" in err and "Traceback" not in err
        assert alerts.read_bytes() == b""
        assert "missing.csv" in report.read_text(encoding="utf-8")

    def test_some_bad_rows_exit_zero(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Bad rows are reported on stderr and in the report; the good rows are analysed."""
        path = tmp_path / "mixed.tsv"
        path.write_text(HEADER + "2019/02/02 22:11:03\tA\tPC\t検索\t成功\tあり\n2019/02/99 22:11:03\tA\tPC\t検索\t成功\tあり\n", encoding="utf-8")
        code, alerts, report = analyze(tmp_path, path)
        assert code == 0
        assert f"{path}:3: ts:" in capsys.readouterr().err
        assert len(alerts_of(alerts)) == 1
        html = report.read_text(encoding="utf-8")
        assert "2019/02/99" in html  # the reason quotes the bad value

    @pytest.mark.parametrize(
        ("extra", "message"),
        [
            (["--tz", "Mars/Olympus"], "--tz: unknown time zone"),
            (["--rules", "/nonexistent/rules"], "rules directory does not exist"),
            (["--checked-at", "yesterday"], "--checked-at: not an ISO 8601 time"),
        ],
    )
    def test_config_errors(self, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str) -> None:
        """Bad options give exit 2 and one clear line, no traceback."""
        code, _, _ = analyze(tmp_path, PPC_SAMPLE, *extra)
        err = capsys.readouterr().err
        assert code == 2
        assert message in err and "Traceback" not in err

    def test_bad_mapping(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A mapping error names the file and key."""
        mapping = tmp_path / "m.yml"
        mapping.write_text("columns: {ts: A}\nencoding: klingon\n", encoding="utf-8")
        code, _, _ = analyze(tmp_path, PPC_SAMPLE, "--mapping", mapping)
        assert code == 2
        assert f"{mapping}: encoding: unknown encoding" in capsys.readouterr().err

    def test_bad_overrides(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """An override of an unknown rule is a configuration error."""
        overrides = tmp_path / "o.yml"
        overrides.write_text("overrides:\n  no_such_rule: {enabled: false}\n", encoding="utf-8")
        code, _, _ = analyze(tmp_path, PPC_SAMPLE, "--overrides", overrides)
        assert code == 2
        assert f"{overrides}: overrides.no_such_rule: no such rule" in capsys.readouterr().err

    def test_short_key(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A pseudonym key shorter than 16 bytes is refused."""
        key = tmp_path / "key"
        key.write_text("short\n", encoding="utf-8")
        code, _, _ = analyze(tmp_path, PPC_SAMPLE, "--pseudonym-key-file", key)
        assert code == 2
        assert "at least 16 bytes" in capsys.readouterr().err

    def test_output_directory_missing(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """An output in a directory that does not exist fails before reading anything."""
        code = main(["analyze", str(PPC_SAMPLE), "--report", str(tmp_path / "no" / "r.html")])
        assert code == 2
        assert "--report: directory does not exist" in capsys.readouterr().err

    def test_random_key_is_announced(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
        """Without a configured key a per-run key is used, and stderr says so."""
        monkeypatch.delenv("LEAKWATCH_PSEUDONYM_KEY")
        code, _, report = analyze(tmp_path, PPC_SAMPLE)
        assert code == 0
        assert "random key" in capsys.readouterr().err
        assert "今回限りの鍵" in report.read_text(encoding="utf-8")

    def test_progress_flag(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """``--progress`` prints percentage lines on stderr even when it is not a terminal."""
        code, _, _ = analyze(tmp_path, PPC_SAMPLE, "--progress")
        assert code == 0
        assert "analyze: 100%" in capsys.readouterr().err


class TestReport:
    """The HTML report: viewpoints, the record of the check, escaping."""

    def test_sections_by_viewpoint(self, tmp_path: Path) -> None:
        """Every PPC viewpoint has a section; findings sit in their viewpoint's section."""
        _, alerts_path, report = analyze(tmp_path, PPC_SAMPLE, "--checked-by", "監査 太郎", "--checked-at", "2019-03-01T10:00:00")
        page = parse(report.read_text(encoding="utf-8"))
        sections = [a.get("data-viewpoint") for t, a in page.tags if t == "section" and a.get("class") == "viewpoint"]
        assert sections == list(VIEWPOINTS)
        articles = {a.get("id") for t, a in page.tags if t == "article"}
        assert articles == {a["alert_id"] for a in alerts_of(alerts_path)}
        text = "".join(page.text)
        for heading in ("点検の記録（いつ・誰が・何を・どのように）", "観点別の結果", "読み込めなかった行"):
            assert heading in text
        assert "監査 太郎" in text and "2019-03-01 (金) 10:00:00 +09:00" in text
        assert "2019-02-02 (土) 19:48:52 +09:00 – 2019-02-07 (木) 12:34:38 +09:00" in text  # period
        assert "休日の個人番号参照" in text
        assert "Approved overtime or holiday duty" in text  # the rule's false positives
        assert "<script" not in report.read_text(encoding="utf-8").lower()

    def test_english(self, tmp_path: Path) -> None:
        """``--lang en`` renders the same report in English."""
        _, _, report = analyze(tmp_path, PPC_SAMPLE, "--lang", "en")
        text = "".join(parse(report.read_text(encoding="utf-8")).text)
        assert "How these logs were checked" in text and "Personal data referenced on a weekend" in text

    def test_hostile_values_escaped(self, tmp_path: Path) -> None:
        """A user name like ``<script>`` is shown as text, never as markup."""
        path = tmp_path / "evil.tsv"
        path.write_text(HEADER + '2019/02/02 22:11:03\t<script>alert("x")</script>\tpc"><img src=x>\t検索\t成功\tあり\n', encoding="utf-8")
        code, _, report = analyze(tmp_path, path, "--checked-by", "<b>me</b>")
        assert code == 0
        html = report.read_text(encoding="utf-8")
        page = parse(html)
        assert not [t for t, _ in page.tags if t in ("script", "img", "b")]
        text = "".join(page.text)
        assert '<script>alert("x")</script>' in text and "<b>me</b>" in text
        assert "&lt;script&gt;" in html

    def test_render_is_pure(self) -> None:
        """``render_report`` renders alerts and issues without touching files."""
        rules = {r.id: r for r in load_rules()}
        alert = Alert(
            alert_id="lw-1", rule_id="off_hours", reason="night", title="夜間の個人番号参照", title_en="Night",
            severity="medium", viewpoint="unnatural_time", user="u&1", first_ts="2019-02-04T22:00:00+09:00",
            last_ts="2019-02-04T23:00:00+09:00", window_start="2019-02-04T00:00:00+09:00",
            window_end="2019-02-05T00:00:00+09:00", count=2, revision=3, event_ids=("e1", "e2"), terminals=("t1",),
            subjects=("mn_abc",),
        )  # fmt: skip
        stats = ReportStats(events=2, users=1, terminals=1, bad_rows=1, issues=[ImportIssue("f.csv", 7, "ts", "bad <time>")], issue_count=3)
        html = render_report([alert], stats, rules, "ja")
        assert "u&amp;1" in html and "bad &lt;time&gt;" in html and "mn_abc" in html
        assert "ほか 2 件" in html
        with pytest.raises(ValueError, match="unknown language"):
            render_report([], stats, rules, "fr")


class TestRulesCommand:
    """``leakwatch rules`` lists and validates rules and overrides."""

    def test_lists_rules(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Every bundled rule is listed with id, level, viewpoint and title."""
        assert main(["rules"]) == 0
        out = capsys.readouterr().out
        for rule in load_rules():
            assert rule.id in out and rule.title in out and rule.viewpoint in out

    def test_validate(self, capsys: pytest.CaptureFixture[str]) -> None:
        """``--validate`` prints one ok line."""
        assert main(["rules", "--validate"]) == 0
        assert capsys.readouterr().out.startswith("ok: ")

    def test_bad_override_param(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A parameter the detector rejects is reported as ``file: key: reason``, exit 2."""
        overrides = tmp_path / "o.yml"
        overrides.write_text("overrides:\n  off_hours:\n    params: {grace_minutes: 999}\n", encoding="utf-8")
        assert main(["rules", "--validate", "--overrides", str(overrides)]) == 2
        err = capsys.readouterr().err
        assert "off_hours.yml: params.grace_minutes: must be between 0 and 240" in err

    def test_disabled_rule_shown(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """An override that disables a rule shows in the list."""
        overrides = tmp_path / "o.yml"
        overrides.write_text("overrides:\n  off_hours: {enabled: false}\n", encoding="utf-8")
        assert main(["rules", "--overrides", str(overrides)]) == 0
        line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("off_hours"))
        assert " no " in line


class TestEvidenceTables:
    """Evidence and timeline rows read as tables, not as program output."""

    def test_rows_render_as_tables(self, tmp_path: Path) -> None:
        """The report shows the matching operations as a table and no raw dict text."""
        code, _, report = analyze(tmp_path, PPC_SAMPLE)
        html = report.read_text(encoding="utf-8")
        assert code == 0
        assert "該当する操作" in html and "直前の操作（職員）" in html and 'class="rows"' in html
        assert "{'ts'" not in html and "&#x27;ts&#x27;" not in html
        assert "操作記録（イベント）数" in html  # the summary label is untouched
