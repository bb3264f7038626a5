"""Importing exported logs: JSONL, CSV/TSV with mappings, bad rows, pseudonymisation."""

from __future__ import annotations

import gzip
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from schemas.event import Event, EventCodec, format_ts
from schemas.importers import (
    MAX_LINE,
    ColumnMapping,
    Importer,
    ImportIssue,
    MappingError,
    builtin_mapping,
    detect_format,
    load_mapping,
    mapping_from_dict,
)
from schemas.mynumber import Pseudonymizer, check_digit

REPO = Path(__file__).resolve().parents[2]
PPC_SAMPLE = REPO / "samples" / "ppc_log_sample.tsv"
KEY = b"importer-test-key-0123"
TWELVE = re.compile(r"(?<!\d)(?:\d{12}|\d{4}[ \-]\d{4}[ \-]\d{4})(?!\d)")


def codec() -> EventCodec:
    return EventCodec(Pseudonymizer(KEY))


def my_number(body: str) -> str:
    """A valid personal number from an 11-digit body."""
    return body + str(check_digit(body))


def read(path: Path, mapping: ColumnMapping | None = None, **kwargs: Any) -> tuple[list[Event], Importer]:
    importer = Importer(codec(), mapping, **kwargs)
    return list(importer.read(path)), importer


HEADER = "日時\t職員名\t端末番号\t操作内容\t処理結果\t個人番号参照\n"


class TestPpcSample:
    """The PPC's sample log reads with the default mapping."""

    def test_twelve_events_with_canonical_values(self) -> None:
        """All 12 rows become events with the right actions, results and references."""
        events, importer = read(PPC_SAMPLE)
        assert len(events) == 12
        assert not importer.issues
        assert [e.action for e in events] == [
            "login", "search", "login", "login", "export", "login",
            "print_screen", "search", "search", "search", "search", "search",
        ]  # fmt: skip
        assert [e.result for e in events] == ["success"] * 4 + ["failure", "success", "success"] + ["failure"] * 5
        assert [e.mynumber_ref for e in events] == [False, True, False, False, True, False] + [True] * 6
        assert {e.user for e in events} == {"オサム"}
        assert events[1].terminal == "172.16.100.xxx"

    def test_local_times_are_tokyo(self) -> None:
        """``YYYY/MM/DD hh:mm:ss`` is read as Asia/Tokyo local time (+09:00)."""
        events, _ = read(PPC_SAMPLE)
        assert format_ts(events[0].ts_ms) == "2019-02-02T19:48:52+09:00"
        assert format_ts(events[1].ts_ms) == "2019-02-02T22:11:03+09:00"
        assert format_ts(events[-1].ts_ms) == "2019-02-07T12:34:38+09:00"
        assert events[1].ts_ms == 1549113063000  # 2019-02-02T13:11:03Z

    def test_other_time_formats(self, tmp_path: Path) -> None:
        """Unpadded fields, missing seconds and full-width digits still parse; impossible dates do not."""
        path = tmp_path / "times.tsv"
        path.write_text(
            HEADER
            + "2019/2/4 9:05\tA\tPC-1\t検索\t成功\tあり\n"
            + "２０１９/０２/０４ １０:００:００\tA\tPC-1\t検索\t成功\tあり\n"
            + "2019/02/30 10:00:00\tA\tPC-1\t検索\t成功\tあり\n",
            encoding="utf-8",
        )
        events, importer = read(path)
        assert [format_ts(e.ts_ms) for e in events] == ["2019-02-04T09:05:00+09:00", "2019-02-04T10:00:00+09:00"]
        assert [(i.line, i.field) for i in importer.issues] == [(4, "ts")]

    def test_summary(self) -> None:
        """The file summary counts lines, rows and events and names the format and encoding."""
        _, importer = read(PPC_SAMPLE)
        (summary,) = importer.files
        assert (summary.format, summary.encoding) == ("tsv", "utf-8")
        assert (summary.lines, summary.rows, summary.events, summary.bad_rows) == (13, 12, 12, 0)
        assert summary.readable

    def test_derived_ids_are_stable_and_unique(self) -> None:
        """Without an id column, ids come from file name, line and content: same on every run."""
        first, _ = read(PPC_SAMPLE)
        again, _ = read(PPC_SAMPLE)
        ids = [e.event_id for e in first]
        assert ids == [e.event_id for e in again]
        assert len(set(ids)) == 12
        assert ids[0].split(":")[1] == "2"  # the header is line 1

    def test_derived_id_changes_with_content(self, tmp_path: Path) -> None:
        """A different row at the same line of a same-named file gets a different id."""
        lines = PPC_SAMPLE.read_text(encoding="utf-8").splitlines(keepends=True)
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        (tmp_path / "a" / "log.tsv").write_text("".join(lines), encoding="utf-8")
        (tmp_path / "b" / "log.tsv").write_text("".join(lines).replace("19:48:52", "19:48:53"), encoding="utf-8")
        a, _ = read(tmp_path / "a" / "log.tsv")
        b, _ = read(tmp_path / "b" / "log.tsv")
        assert a[0].event_id != b[0].event_id
        assert a[1].event_id == b[1].event_id

    def test_cp932_csv_with_bom_free_auto_encoding(self, tmp_path: Path) -> None:
        """The same export as Shift_JIS CSV reads identically (encoding detected)."""
        text = PPC_SAMPLE.read_text(encoding="utf-8").replace("\t", ",")
        path = tmp_path / "ppc_log_sample.csv"
        path.write_bytes(text.encode("cp932"))
        events, importer = read(path)
        reference, _ = read(PPC_SAMPLE)
        assert importer.files[0].encoding == "cp932"
        assert [(e.ts_ms, e.action, e.result, e.user) for e in events] == [
            (e.ts_ms, e.action, e.result, e.user) for e in reference
        ]

    def test_utf8_bom(self, tmp_path: Path) -> None:
        """A UTF-8 BOM (Excel's "CSV UTF-8") does not break the first header."""
        path = tmp_path / "bom.tsv"
        path.write_bytes(b"\xef\xbb\xbf" + PPC_SAMPLE.read_bytes())
        events, importer = read(path)
        assert len(events) == 12 and not importer.issues

    def test_full_width_values_match(self, tmp_path: Path) -> None:
        """Full-width letters in values match their half-width mapping keys (ＵＳＢ書込)."""
        path = tmp_path / "fw.tsv"
        path.write_text(HEADER + "2019/02/04 10:00:00\tオサム\tPC-1\tＵＳＢ書込\t成功\tあり\n", encoding="utf-8")
        (ev,), _ = read(path)
        assert ev.action == "usb_write"


class TestCustomMapping:
    """An agency adapts the importer to its own export with a YAML file, no code."""

    MAPPING = """\
name: city-hall
columns:
  ts: Timestamp
  user: Operator
  terminal: Host
  action: Operation
  result: Outcome
  event_id: Seq
  subject: Record
  records: Rows
  department: Section
values:
  action: {Query: search, Display: view, Export: export, Print Screen: print_screen, "USB Write": usb_write}
  result: {OK: success, NG: failure, Refused: denied}
defaults:
  mynumber_ref: true
time_format: "%d.%m.%Y %H:%M"
timezone: UTC
encoding: cp932
delimiter: ";"
skip_rows: 1
"""

    def write(self, tmp_path: Path, body: str) -> tuple[Path, ColumnMapping]:
        mapping_path = tmp_path / "city.yml"
        mapping_path.write_text(self.MAPPING, encoding="utf-8")
        data = tmp_path / "export.txt"
        data.write_bytes(body.encode("cp932"))
        return data, load_mapping(mapping_path)

    def test_english_headers_cp932(self, tmp_path: Path) -> None:
        """Headers, values, time format, time zone, encoding and delimiter all come from the file."""
        body = (
            "Exported by MyNumberSystem v2\r\n"
            "Seq;Timestamp;Operator;Host;Operation;Outcome;Record;Rows;Section;Note\r\n"
            "77;02.02.2019 13:11;山田 花子;ws-01;Query;OK;r-1;;市民課;夜間\r\n"
            "78;04.02.2019 00:30;山田 花子;ws-02;Export;Refused;;1,200;市民課;\r\n"
        )
        data, mapping = self.write(tmp_path, body)
        events, importer = read(data, mapping, fmt="csv")
        assert not importer.issues, importer.issues
        first, second = events
        assert (first.event_id, first.user, first.terminal, first.action, first.result) == ("77", "山田 花子", "ws-01", "search", "success")
        assert format_ts(first.ts_ms) == "2019-02-02T22:11:00+09:00"  # 13:11 UTC
        assert first.mynumber_ref is True  # from defaults
        assert (first.subject, first.department) == ("r-1", "市民課")
        assert (second.action, second.result, second.records) == ("export", "denied", 1200)
        assert importer.files[0].encoding == "cp932"

    def test_extends_builtin(self, tmp_path: Path) -> None:
        """``extends: ppc`` keeps the built-in values and changes only what is given."""
        path = tmp_path / "m.yml"
        path.write_text("extends: ppc\ncolumns:\n  user: 担当者\nvalues:\n  action:\n    個人番号照会: view\n", encoding="utf-8")
        mapping = load_mapping(path)
        data = tmp_path / "x.tsv"
        data.write_text(
            "日時\t担当者\t端末番号\t操作内容\t処理結果\t個人番号参照\n"
            "2019/02/04 10:00:00\t佐藤\tPC-1\t個人番号照会\t成功\tあり\n"
            "2019/02/04 10:01:00\t佐藤\tPC-1\t書き出し\t拒否\tあり\n",
            encoding="utf-8",
        )
        events, importer = read(data, mapping)
        assert [(e.user, e.action, e.result) for e in events] == [("佐藤", "view", "success"), ("佐藤", "export", "denied")]
        assert not importer.issues

    def test_tz_argument_overrides_mapping(self, tmp_path: Path) -> None:
        """An explicit time zone wins over the mapping's."""
        from zoneinfo import ZoneInfo

        (ev, *_), _ = read(PPC_SAMPLE, tz=ZoneInfo("UTC"))
        assert format_ts(ev.ts_ms) == "2019-02-03T04:48:52+09:00"

    @pytest.mark.parametrize(
        ("doc", "key"),
        [
            ({"columns": {"ts": "A"}, "colour": 1}, "colour"),
            ({"columns": {"when": "A"}}, "columns.when"),
            ({"columns": {"ts": "A"}, "values": {"action": {"X": "dance"}}}, "values.action.X"),
            ({"columns": {"ts": "A"}, "values": {"mynumber_ref": {"X": "yes"}}}, "values.mynumber_ref.X"),
            ({"columns": {"ts": "A"}, "values": {"result": {True: "success"}}}, "values.result.True"),
            ({"columns": {"ts": "A"}, "encoding": "klingon"}, "encoding"),
            ({"columns": {"ts": "A"}, "encoding": "base64"}, "encoding"),
            ({"columns": {"ts": "A"}, "timezone": "Mars/Olympus"}, "timezone"),
            ({"columns": {"ts": "A"}, "delimiter": ";;"}, "delimiter"),
            ({"columns": {"ts": "A"}, "defaults": {"ts": "x"}}, "defaults.ts"),
            ({"columns": {"ts": "A"}, "extends": "nope"}, "extends"),
            ({"columns": {}}, "columns"),
        ],
    )
    def test_invalid_mapping_names_the_key(self, doc: dict[Any, Any], key: str) -> None:
        """Every mistake in a mapping is reported with the key that is wrong."""
        with pytest.raises(MappingError) as info:
            mapping_from_dict(doc, "m.yml")
        assert info.value.key == key
        assert str(info.value).startswith(f"m.yml: {key}: ")

    def test_mapping_file_not_yaml(self, tmp_path: Path) -> None:
        """A broken YAML file is a MappingError, not a crash."""
        path = tmp_path / "bad.yml"
        path.write_text("columns: [unclosed\n", encoding="utf-8")
        with pytest.raises(MappingError, match="not valid YAML"):
            load_mapping(path)

    def test_builtin_is_valid(self) -> None:
        """The shipped PPC mapping loads and maps every canonical action."""
        mapping = builtin_mapping()
        assert mapping.name == "ppc"
        assert set(mapping.values["action"].values()) == {
            "login", "logout", "search", "view", "update", "export", "print",
            "print_screen", "usb_connect", "usb_write", "file_copy",
        }  # fmt: skip


class TestBadRows:
    """Bad rows are reported with file, line, field and reason; good rows still come through."""

    def test_row_problems(self, tmp_path: Path) -> None:
        """Each kind of bad row yields one issue on its own line; the rest are events."""
        path = tmp_path / "mixed.tsv"
        path.write_text(
            HEADER
            + "2019/02/04 09:00:00\tA\tPC-1\t検索\t成功\tあり\n"  # 2 ok
            + "2019/13/04 09:00:00\tA\tPC-1\t検索\t成功\tあり\n"  # 3 bad month
            + "2019/02/04 09:00:00\tA\tPC-1\t踊る\t成功\tあり\n"  # 4 unknown action
            + "2019/02/04 09:00:00\tA\tPC-1\t検索\t成功\n"  # 5 too few columns
            + "2019/02/04 09:00:00\t\tPC-1\t検索\t成功\tあり\n"  # 6 empty user
            + "\n"  # 7 blank: ignored
            + "2019/02/04 09:00:00\tA\tPC-1\t検索\t保留\tあり\n"  # 8 unknown result
            + "2019/02/04 09:00:00\tA\tPC-1\t検索\t成功\tたぶん\n"  # 9 unknown ref
            + "2019/02/04 09:05:00\tA\tPC-1\t照会\t成功\tあり\n",  # 10 ok
            encoding="utf-8",
        )
        events, importer = read(path)
        assert [e.action for e in events] == ["search", "view"]
        assert [(i.line, i.field) for i in importer.issues] == [
            (3, "ts"), (4, "action"), (5, "$"), (6, "user"), (8, "result"), (9, "mynumber_ref"),
        ]  # fmt: skip
        assert all(i.file == str(path) for i in importer.issues)
        assert "踊る" in importer.issues[1].reason and "values.action" in importer.issues[1].reason
        assert "5 columns" in importer.issues[2].reason
        summary = importer.files[0]
        assert (summary.rows, summary.events, summary.bad_rows) == (8, 2, 6)
        assert str(importer.issues[0]).startswith(f"{path}:3: ts: ")

    def test_undecodable_bytes(self, tmp_path: Path) -> None:
        """Bytes invalid in the encoding make that row an issue, not a crash."""
        path = tmp_path / "sjis.tsv"
        good = "2019/02/04 09:00:00\t山田\tPC-1\t検索\t成功\tあり\n".encode("cp932")
        broken = b"2019/02/04 09:01:00\t\x81\x20\x82\tPC-1\t" + "検索\t成功\tあり\n".encode("cp932")
        path.write_bytes(HEADER.encode("cp932") + good + broken + good.replace(b"09:00", b"09:02"))
        mapping = mapping_from_dict({"extends": "ppc", "encoding": "cp932"})
        events, importer = read(path, mapping)
        assert len(events) == 2
        (issue,) = importer.issues
        assert (issue.line, issue.field) == (3, "$")
        assert "cp932" in issue.reason

    def test_missing_header_column(self, tmp_path: Path) -> None:
        """A header without a required column is one file-level issue naming it."""
        path = tmp_path / "nohdr.tsv"
        path.write_text("日時\t職員名\t操作内容\t処理結果\t個人番号参照\n2019/02/04 09:00:00\tA\t検索\t成功\tあり\n", encoding="utf-8")
        events, importer = read(path)
        assert events == []
        (issue,) = importer.issues
        assert issue.line == 1 and "terminal" in issue.reason and "端末番号" in issue.reason
        assert not importer.files[0].readable

    def test_missing_file(self, tmp_path: Path) -> None:
        """A file that does not exist is reported (line 0), not raised."""
        events, importer = read(tmp_path / "nope.csv")
        assert events == []
        assert importer.issues[0].line == 0 and "cannot read" in importer.issues[0].reason
        assert not importer.files[0].readable

    def test_empty_file(self, tmp_path: Path) -> None:
        """An empty CSV has no header: one issue."""
        path = tmp_path / "empty.csv"
        path.write_bytes(b"")
        events, importer = read(path)
        assert events == [] and "no header" in importer.issues[0].reason

    def test_over_long_line(self, tmp_path: Path) -> None:
        """A line longer than the limit is skipped and reported; reading goes on."""
        path = tmp_path / "long.tsv"
        row = "2019/02/04 09:00:00\tA\tPC-1\t検索\t成功\tあり\n"
        path.write_text(HEADER + row + "2019/02/04 09:00:00\t" + "x" * (MAX_LINE + 10) + "\n" + row, encoding="utf-8")
        events, importer = read(path)
        assert len(events) == 2
        (issue,) = importer.issues
        assert issue.line == 3 and "longer than" in issue.reason

    def test_jsonl_bad_lines(self, tmp_path: Path) -> None:
        """Bad JSONL lines are issues with their line numbers; good lines are events."""
        good = {"event_id": "e1", "ts": "2019-02-04T09:00:00+09:00", "user": "u", "terminal": "t", "action": "search", "result": "success", "mynumber_ref": True}
        lines = [
            orjson.dumps(good),
            b"{not json",
            b"",
            orjson.dumps({**good, "event_id": "e2", "colour": "red"}),
            orjson.dumps({**good, "event_id": "e3", "ts": "2019-02-04 09:00:00"}),
            orjson.dumps({**good, "event_id": "e4"}),
        ]
        path = tmp_path / "events.ndjson"
        path.write_bytes(b"\n".join(lines) + b"\n")
        events, importer = read(path)
        assert [e.event_id for e in events] == ["e1", "e4"]
        assert [(i.line, i.field) for i in importer.issues] == [(2, "$"), (4, "colour"), (5, "ts")]
        assert importer.files[0].bad_rows == 3

    def test_jsonl_over_long_line(self, tmp_path: Path) -> None:
        """An over-long JSONL line is one issue; the lines after it are read."""
        good = b'{"event_id":"e1","ts":"2019-02-04T09:00:00+09:00","user":"u","terminal":"t","action":"search","result":"success","mynumber_ref":true}'
        path = tmp_path / "long.jsonl"
        path.write_bytes(b"\n".join([good, b'{"x":"' + b"y" * (MAX_LINE + 5) + b'"}', good.replace(b"e1", b"e2")]))
        events, importer = read(path)
        assert [e.event_id for e in events] == ["e1", "e2"]
        assert [(i.line, i.field) for i in importer.issues] == [(2, "$")]

    def test_pretty_json_array(self, tmp_path: Path) -> None:
        """A pretty-printed JSON array (.json) is read as one document."""
        good = {"event_id": "e1", "ts": "2019-02-04T09:00:00+09:00", "user": "u", "terminal": "t", "action": "search", "result": "success", "mynumber_ref": True}
        path = tmp_path / "events.json"
        path.write_bytes(orjson.dumps([good, {**good, "event_id": "e2"}], option=orjson.OPT_INDENT_2))
        events, importer = read(path)
        assert [e.event_id for e in events] == ["e1", "e2"] and not importer.issues

    def test_issue_cap(self, tmp_path: Path) -> None:
        """Issues beyond ``max_issues`` are counted but not kept."""
        path = tmp_path / "bad.tsv"
        path.write_text(HEADER + "x\ty\n" * 50, encoding="utf-8")
        _, importer = read(path, max_issues=10)
        assert len(importer.issues) == 10 and importer.issue_count == 50


class TestPseudonymisation:
    """Twelve-digit numbers in any mapped column leave as tokens, also in issue texts."""

    def test_numbers_in_every_column(self, tmp_path: Path) -> None:
        """Personal numbers in user, terminal, subject, department and id columns are replaced."""
        n1, n2, n3 = my_number("12345678901"), my_number("98765432109"), my_number("11122233344")
        grouped = f"{n3[:4]}-{n3[4:8]}-{n3[8:]}"
        path = tmp_path / "pii.tsv"
        path.write_text(
            "通番\t日時\t職員名\t端末番号\t操作内容\t処理結果\t個人番号参照\t対象者\t所属\n"
            f"{n1}\t2019/02/04 09:00:00\tuser{n1}\t{n2}\t検索\t成功\tあり\t{grouped}\t課{n2}\n"
            f"x2\t2019/02/04 09:00:00\tA\t{'１２３４５６７８９０１８'}\t検索\t成功\tあり\t{n3}\t課\n",
            encoding="utf-8",
        )
        events, importer = read(path)
        assert not importer.issues
        encoded = b"".join(codec().encode(e) for e in events).decode()
        assert not TWELVE.search(encoded), encoded
        first, second = events
        assert first.pii_scrubbed and second.pii_scrubbed
        assert first.user.startswith("user" + "mn_") and first.terminal.startswith("mn_")
        assert first.subject == second.subject  # the same person, grouped or not, same token
        assert first.event_id.startswith("mn_")
        assert second.terminal.startswith("mn_")  # full-width digits too

    def test_issue_reasons_are_scrubbed(self, tmp_path: Path) -> None:
        """A personal number quoted in an error message is replaced there too."""
        number = my_number("55566677788")
        path = tmp_path / f"export_{number}.tsv"
        path.write_text(HEADER + f"2019/02/04 09:00:00\tA\tPC-1\t{number}\t成功\tあり\n" + f"{number}\tA\tPC-1\t検索\t成功\tあり\n", encoding="utf-8")
        _, importer = read(path)
        assert len(importer.issues) == 2
        text = " ".join(str(i) for i in importer.issues) + importer.files[0].file
        assert number not in text and not TWELVE.search(text)
        assert "mn_" in importer.issues[0].reason


class TestFormats:
    """Format from the extension, by sniffing, or given explicitly; gzip is transparent."""

    @pytest.mark.parametrize(
        ("name", "fmt"),
        [("a.jsonl", "jsonl"), ("a.NDJSON", "jsonl"), ("a.json", "jsonl"), ("a.csv", "csv"), ("a.tsv", "tsv"), ("a.csv.gz", "csv")],
    )
    def test_by_extension(self, tmp_path: Path, name: str, fmt: str) -> None:
        """Known extensions decide without reading the file."""
        assert detect_format(tmp_path / name) == fmt

    @pytest.mark.parametrize(
        ("content", "fmt"),
        [(b'{"a": 1}\n', "jsonl"), ("日時\t職員名\n".encode(), "tsv"), ("日時,職員名\n".encode("cp932"), "csv"), (b"hello\n", None)],
    )
    def test_sniff_txt(self, tmp_path: Path, content: bytes, fmt: str | None) -> None:
        """``.txt`` and unknown extensions are sniffed from the first line."""
        path = tmp_path / "log.txt"
        path.write_bytes(b"\n" + content)
        assert detect_format(path) == fmt

    def test_explicit_wins(self, tmp_path: Path) -> None:
        """An explicit format overrides the extension; unknown formats are refused."""
        assert detect_format(tmp_path / "a.csv", "tsv") == "tsv"
        with pytest.raises(ValueError, match="unknown format"):
            detect_format(tmp_path / "a.csv", "xml")

    def test_unclear_txt_is_an_issue(self, tmp_path: Path) -> None:
        """A file whose format cannot be told is one issue asking for --format."""
        path = tmp_path / "log.txt"
        path.write_text("hello\n", encoding="utf-8")
        events, importer = read(path)
        assert events == [] and "--format" in importer.issues[0].reason

    def test_gzip(self, tmp_path: Path) -> None:
        """``.tsv.gz`` streams through gzip with the same result."""
        path = tmp_path / "ppc.tsv.gz"
        path.write_bytes(gzip.compress(PPC_SAMPLE.read_bytes()))
        events, importer = read(path)
        assert len(events) == 12 and importer.files[0].format == "tsv"


class TestStreaming:
    """Reading is lazy and reports progress in bytes."""

    def test_progress_reaches_total(self, tmp_path: Path) -> None:
        """The callback sees non-decreasing byte counts that end at the file size."""
        path = tmp_path / "big.tsv"
        row = "2019/02/04 09:00:00\tA\tPC-1\t検索\t成功\tあり\n"
        path.write_text(HEADER + row * 10_000, encoding="utf-8")
        seen: list[tuple[int, int]] = []
        events, _ = read(path, progress=lambda done, total: seen.append((done, total)))
        assert len(events) == 10_000
        assert len(seen) >= 3
        assert all(total == path.stat().st_size for _, total in seen)
        assert [d for d, _ in seen] == sorted(d for d, _ in seen)
        assert seen[-1][0] == path.stat().st_size

    def test_lazy(self, tmp_path: Path) -> None:
        """Events come one at a time: the first is available before the file is read."""
        path = tmp_path / "big.tsv"
        row = "2019/02/04 09:00:00\tA\tPC-1\t検索\t成功\tあり\n"
        path.write_text(HEADER + row * 20_000, encoding="utf-8")
        importer = Importer(codec())
        stream = importer.read(path)
        next(stream)
        assert importer.files[0].events < 20_000

    def test_issue_str(self) -> None:
        """Issues print as ``file:line: field: reason`` (no line for whole-file issues)."""
        assert str(ImportIssue("a.csv", 3, "ts", "bad")) == "a.csv:3: ts: bad"
        assert str(ImportIssue("a.csv", 0, "$", "cannot read")) == "a.csv: $: cannot read"
