"""``leakwatch analyze``: run the detectors over exported log files.

The offline counterpart of the streaming worker, for agencies that check
their logs monthly from exports: read every file (JSONL, CSV, TSV; Japanese
headers, Shift_JIS and all, see :mod:`schemas.importers`), sort the events by
event time, run the same :class:`~detectors.engine.Engine` with the same
rules and overrides, and write

* ``--alerts OUT.jsonl``: the final revision of every finding, one per line;
* ``--report OUT.html``: a self-contained report by PPC viewpoint, with the
  record of the check (いつ・誰が・何を・どのように) and the unreadable rows.

Exit status: 0 when the analysis ran (findings or not), 1 when no event
could be read, 2 on usage or configuration errors (with a one-line reason).
Nothing written to the outputs, stdout or stderr carries a personal number.
"""

from __future__ import annotations

import argparse
import getpass
import os
import secrets
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, tzinfo
from pathlib import Path
from typing import IO, Any, Final
from zoneinfo import ZoneInfo

from detectors.engine import Engine
from detectors.rules import (
    DEFAULT_RULES_DIR,
    Rule,
    RuleError,
    apply_overrides,
    load_overrides,
    load_rules,
)
from leakwatch import __version__
from leakwatch.report import LANGUAGES, ReportStats, render_report
from schemas.alert import SEVERITIES, SEVERITY_RANK, Alert
from schemas.event import Event, EventCodec, format_ts
from schemas.importers import (
    FORMATS,
    ColumnMapping,
    Importer,
    MappingError,
    builtin_mapping,
    load_mapping,
)
from schemas.mynumber import Pseudonymizer

__all__ = ["KEY_ENV", "configure", "final_alerts", "load_engine", "run"]

#: Environment variable holding the pseudonym key (same key as the streaming worker).
KEY_ENV: Final = "LEAKWATCH_PSEUDONYM_KEY"
_PROGRESS_MIN_BYTES: Final = 8 << 20
_STDERR_ISSUES: Final = 20


class UsageError(Exception):
    """A usage or configuration problem: reported in one line, exit status 2."""


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``leakwatch analyze``."""
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="exported logs (.jsonl/.ndjson/.json, .csv, .tsv, .txt; .gz too)")
    parser.add_argument("--alerts", type=Path, metavar="OUT.jsonl", help="write the final alerts here, one JSON object per line")
    parser.add_argument("--report", type=Path, metavar="OUT.html", help="write the HTML report here")
    parser.add_argument("--format", choices=FORMATS, help="input format (default: from the file extension)")
    parser.add_argument("--mapping", type=Path, metavar="FILE", help="column/value mapping for CSV/TSV exports (default: the PPC sample's)")
    parser.add_argument("--rules", type=Path, metavar="DIR", help="rules directory (default: the bundled rules)")
    parser.add_argument("--overrides", type=Path, metavar="FILE", help="the agency's rule overrides")
    parser.add_argument("--tz", metavar="ZONE", help="time zone of local times in CSV/TSV and of the report (default: the mapping's, Asia/Tokyo)")
    parser.add_argument("--pseudonym-key-file", type=Path, metavar="FILE", help=f"key for personal-number pseudonyms (else ${KEY_ENV}, else a random per-run key)")
    parser.add_argument(
        "--seed-history",
        nargs="+",
        action="extend",
        type=Path,
        default=[],
        metavar="FILE",
        help="earlier logs to learn normal use from, without alerting (put after the input files)",
    )
    parser.add_argument("--lang", choices=LANGUAGES, default="ja", help="report language (default: ja)")
    parser.add_argument("--checked-at", metavar="TIME", help="when the check was made, ISO 8601 (default: now)")
    parser.add_argument("--checked-by", metavar="NAME", help="who made the check (default: the login name)")
    parser.add_argument("--progress", action="store_true", help="print progress to stderr even when it is not a terminal")


def final_alerts(alerts: Iterable[Alert]) -> list[Alert]:
    """The newest revision of each finding, in a stable order."""
    latest: dict[str, Alert] = {}
    for alert in alerts:
        seen = latest.get(alert.alert_id)
        if seen is None or alert.revision > seen.revision:
            latest[alert.alert_id] = alert
    return sorted(latest.values(), key=lambda a: (a.first_ts, -SEVERITY_RANK.get(a.severity, 0), a.rule_id, a.user, a.alert_id))


def load_engine(rules_dir: Path | None, overrides: Path | None) -> Engine:
    """The engine over the rules (bundled or ``rules_dir``) with overrides applied.

    Raises :class:`RuleError` for any problem in the rules or the overrides.
    """
    rules: list[Rule] = load_rules(rules_dir or DEFAULT_RULES_DIR)
    if overrides is not None:
        rules = apply_overrides(rules, load_overrides(overrides))
    try:
        return Engine(rules)
    except ImportError as exc:
        raise RuleError(str(rules_dir or DEFAULT_RULES_DIR), "detector", f"cannot load detector module: {exc}") from None


class _Progress:
    """A percentage line on stderr, across all input files."""

    __slots__ = ("base", "enabled", "last", "stream", "total", "tty")

    def __init__(self, stream: IO[str], total: int, forced: bool) -> None:
        self.stream = stream
        self.total = max(total, 1)
        self.tty = stream.isatty()
        self.enabled = forced or (self.tty and total >= _PROGRESS_MIN_BYTES)
        self.base = 0
        self.last = -1

    def file_done(self, size: int) -> None:
        self.base += size

    def __call__(self, done: int, _total: int) -> None:
        if not self.enabled:
            return
        pct = min(100, (self.base + done) * 100 // self.total)
        step = pct if self.tty else pct - pct % 10
        if step == self.last:
            return
        self.last = step
        mb = (self.base + done) / 1048576
        line = f"analyze: {pct:3d}% ({mb:.1f} of {self.total / 1048576:.1f} MB read)"
        if self.tty:
            self.stream.write("\r" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled and self.tty and self.last >= 0:
            self.stream.write("\n")
            self.stream.flush()


def _tz(name: str | None, mapping: ColumnMapping) -> tuple[tzinfo, str]:
    if name is None:
        return mapping.tz, mapping.timezone
    try:
        return ZoneInfo(name), name
    except Exception:  # zoneinfo raises several error types
        raise UsageError(f"--tz: unknown time zone {name!r}") from None


def _key(args: argparse.Namespace) -> tuple[bytes, bool]:
    """(key, configured); a random key when none is configured."""
    key: bytes | None = None
    if args.pseudonym_key_file is not None:
        try:
            key = args.pseudonym_key_file.read_bytes().strip()
        except OSError as exc:
            raise UsageError(f"--pseudonym-key-file: cannot read: {exc.strerror}") from None
        where = "--pseudonym-key-file"
    elif os.environ.get(KEY_ENV):
        key = os.environ[KEY_ENV].encode("utf-8")
        where = KEY_ENV
    if key is None:
        return secrets.token_bytes(32), False
    if len(key) < 16:
        raise UsageError(f"{where}: the pseudonym key must be at least 16 bytes")
    return key, True


def _checked_at(value: str | None, tz: tzinfo) -> str:
    if value is None:
        return datetime.now(tz).isoformat(timespec="seconds")
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"--checked-at: not an ISO 8601 time: {value[:40]!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=tz)
    return dt.isoformat(timespec="seconds")


def _login_name() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return ""


def _check_output(path: Path | None, inputs: Sequence[Path], option: str) -> None:
    if path is None:
        return
    if path.is_dir():
        raise UsageError(f"{option}: is a directory")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise UsageError(f"{option}: directory does not exist")
    for source in inputs:
        try:
            if source.exists() and path.exists() and source.samefile(path):
                raise UsageError(f"{option}: would overwrite the input file")
        except OSError:
            continue


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _read_all(importer: Importer, paths: Sequence[Path], progress: _Progress | None) -> Iterator[Event]:
    for path in paths:
        yield from importer.read(path)
        if progress is not None:
            progress.file_done(importer.files[-1].bytes)


def _file_sizes(paths: Sequence[Path]) -> int:
    total = 0
    for path in paths:
        try:
            total += path.stat().st_size
        except OSError:
            continue
    return total


def run(args: argparse.Namespace) -> int:
    """Run the analysis; see the module docstring for the exit status."""
    err = sys.stderr
    # Messages may quote paths and values: scrub them with a throwaway key until ours is known.
    masker = Pseudonymizer(secrets.token_bytes(32))
    try:
        key, configured = _key(args)
        masker = Pseudonymizer(key)
        return _analyze(args, key, configured, masker)
    except (UsageError, RuleError, MappingError) as exc:
        print(f"leakwatch analyze: {masker.scrub(str(exc))[0]}", file=err)
        return 2


def _analyze(args: argparse.Namespace, key: bytes, configured: bool, masker: Pseudonymizer) -> int:
    out, err = sys.stdout, sys.stderr

    def safe(text: str) -> str:
        return masker.scrub(text)[0]

    mapping = load_mapping(args.mapping) if args.mapping is not None else builtin_mapping()
    tz, tz_name = _tz(args.tz, mapping)
    checked_at = _checked_at(args.checked_at, tz)
    checked_by = args.checked_by if args.checked_by is not None else _login_name()
    engine = load_engine(args.rules, args.overrides)
    _check_output(args.alerts, [*args.files, *args.seed_history], "--alerts")
    _check_output(args.report, [*args.files, *args.seed_history], "--report")
    if args.alerts is not None and args.report is not None and args.alerts.resolve() == args.report.resolve():
        raise UsageError("--alerts and --report must be different files")
    if not configured:
        print(
            f"leakwatch analyze: no pseudonym key configured (--pseudonym-key-file or ${KEY_ENV}); "
            "using a random key for this run, so record tokens are not comparable with other runs",
            file=err,
        )
    codec = EventCodec(Pseudonymizer(key), tz)
    started = time.monotonic()

    # Baselines from history (no alerts).
    seed_importer = Importer(codec, mapping, args.format, tz)
    seed_events = sorted(_read_all(seed_importer, args.seed_history, None), key=lambda e: (e.ts_ms, e.event_id))
    engine.seed(seed_events)
    del seed_events

    # The logs to check.
    progress = _Progress(err, _file_sizes(args.files), args.progress)
    importer = Importer(codec, mapping, args.format, tz, progress=progress)
    events: list[Event] = []
    seen_ids: set[str] = set()
    duplicates = 0
    users: set[str] = set()
    terminals: set[str] = set()
    for ev in _read_all(importer, args.files, progress):
        if ev.event_id in seen_ids:
            duplicates += 1
            continue
        seen_ids.add(ev.event_id)
        users.add(ev.user)
        terminals.add(ev.terminal)
        events.append(ev)
    progress.finish()
    del seen_ids
    events.sort(key=lambda e: (e.ts_ms, e.event_id))

    produced: list[Alert] = []
    process = engine.process
    for index, ev in enumerate(events):
        process(ev)
        if index % 4096 == 4095:
            produced.extend(engine.drain())
    produced.extend(engine.drain())
    produced.extend(engine.flush())
    late = len(engine.drain_late())
    alerts = final_alerts(produced)

    stats = ReportStats(
        events=len(events),
        users=len(users),
        terminals=len(terminals),
        bad_rows=sum(f.bad_rows for f in importer.files),
        duplicates=duplicates,
        late=late,
        seed_events=sum(f.events for f in seed_importer.files),
        first_ts=format_ts(events[0].ts_ms, tz) if events else None,
        last_ts=format_ts(events[-1].ts_ms, tz) if events else None,
        files=importer.files,
        seed_files=seed_importer.files,
        issues=[*seed_importer.issues, *importer.issues],
        issue_count=seed_importer.issue_count + importer.issue_count,
        checked_at=checked_at,
        checked_by=safe(checked_by),
        tool=f"leakwatch {__version__} (analyze)",
        rules_source=safe(str(args.rules or DEFAULT_RULES_DIR)),
        overrides_source=safe(str(args.overrides)) if args.overrides is not None else None,
        mapping_source=safe(mapping.source),
        timezone=tz_name,
        key_configured=configured,
    )
    try:
        if args.alerts is not None:
            _write_atomic(args.alerts, b"".join(a.to_json() + b"\n" for a in alerts))
        if args.report is not None:
            html = render_report(alerts, stats, engine.rules, args.lang)
            _write_atomic(args.report, html.encode("utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot write output: {safe(str(exc.strerror or exc))}") from None

    _summary(out, err, stats, alerts, args, time.monotonic() - started, safe)
    if not events:
        print("leakwatch analyze: no event could be read from the input files", file=err)
        return 1
    return 0


def _summary(out: IO[str], err: IO[str], stats: ReportStats, alerts: Sequence[Alert], args: Any, elapsed: float, safe: Any) -> None:
    for issue in stats.issues[:_STDERR_ISSUES]:
        print(f"leakwatch analyze: {issue}", file=err)
    if stats.issue_count > _STDERR_ISSUES:
        print(f"leakwatch analyze: ... and {stats.issue_count - _STDERR_ISSUES} more problems (see the report)", file=err)
    by_severity = ", ".join(
        f"{n} {s}" for s in reversed(SEVERITIES) if (n := sum(1 for a in alerts if a.severity == s))
    )
    print(
        f"read {stats.events} events ({stats.users} users, {stats.terminals} terminals) from "
        f"{len(stats.files)} file(s) in {elapsed:.1f}s; {stats.bad_rows} bad rows",
        file=out,
    )
    print(f"findings: {len(alerts)}" + (f" ({by_severity})" if by_severity else ""), file=out)
    counts: dict[str, int] = {}
    for alert in alerts:
        key = f"{alert.rule_id}/{alert.reason}"
        counts[key] = counts.get(key, 0) + 1
    for key, n in sorted(counts.items()):
        print(f"  {key}: {n}", file=out)
    if args.alerts is not None:
        print(f"alerts: {safe(str(args.alerts))}", file=out)
    if args.report is not None:
        print(f"report: {safe(str(args.report))}", file=out)
