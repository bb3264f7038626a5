"""Reading exported log files into canonical events: JSONL, CSV and TSV.

Agencies rarely export the canonical JSON: their systems write CSV or TSV
with Japanese headers and values, local times without an offset, often in
Shift_JIS. A :class:`ColumnMapping` (a small YAML file, see
``schemas/mappings/ppc.yml``) says which column holds which field and what
the values mean, so a new export format needs a file, not code.

Every row goes through :meth:`schemas.event.EventCodec.from_dict`, so the
same validation and the same pseudonymisation apply as on the stream: a
12-digit number in any mapped column leaves as an ``mn_`` token. A bad row
becomes an :class:`ImportIssue` naming the file, the line, the field and the
reason; the good rows around it are still read. Files are streamed line by
line with a bound on line length, and a progress callback reports bytes read.
"""

from __future__ import annotations

import codecs
import csv
import functools
import gzip
import hashlib
import io
import os
import re
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from importlib import resources
from pathlib import Path
from typing import IO, Any, Final, cast
from zoneinfo import ZoneInfo

import orjson
import yaml

from schemas.event import (
    ACTIONS,
    OPTIONAL_INT_FIELDS,
    OPTIONAL_STR_FIELDS,
    REQUIRED_FIELDS,
    RESULTS,
    Event,
    EventCodec,
    EventError,
)

__all__ = [
    "FORMATS",
    "MAPPING_FIELDS",
    "MAX_LINE",
    "ColumnMapping",
    "FileSummary",
    "ImportIssue",
    "Importer",
    "MappingError",
    "ProgressCallback",
    "builtin_mapping",
    "detect_format",
    "load_mapping",
    "mapping_from_dict",
]

#: Formats the importer reads.
FORMATS: Final = ("jsonl", "csv", "tsv")
#: Canonical fields a mapping may name.
MAPPING_FIELDS: Final = (*REQUIRED_FIELDS, *OPTIONAL_STR_FIELDS, *OPTIONAL_INT_FIELDS)

#: ``progress(bytes_read, bytes_total)`` for the file being read.
ProgressCallback = Callable[[int, int], None]

_EXTENSIONS: Final = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}
_MAPPING_KEYS: Final = frozenset(
    {"name", "extends", "columns", "values", "defaults", "time_format", "timezone", "encoding", "delimiter", "skip_rows"}
)
_DELIMITER_NAMES: Final = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}
_BOOL_LITERALS: Final = {
    "true": True, "1": True, "yes": True, "y": True,
    "false": False, "0": False, "no": False, "n": False,
}  # fmt: skip
#: Longest physical line read (bytes for JSONL, characters for CSV); longer lines are reported.
MAX_LINE: Final = 1 << 20
#: Largest pretty-printed JSON array read as one document.
_MAX_JSON_DOC: Final = 256 << 20
_SNIFF_BYTES: Final = 64 << 10
_PROGRESS_EVERY: Final = 2048
#: Replacement for undecodable bytes: a Unicode noncharacter, never in real text.
_BAD_CHAR: Final = "\ufdd0"
_ERRORS: Final = "leakwatch-mark"
_VALUE_MAX: Final = 40


def _mark_undecodable(exc: UnicodeError) -> tuple[str, int]:
    if isinstance(exc, UnicodeDecodeError):
        return _BAD_CHAR, exc.end
    raise exc


codecs.register_error(_ERRORS, _mark_undecodable)


class MappingError(ValueError):
    """A mapping file that cannot be used: which file, which key, and why."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        super().__init__(f"{source}: {key}: {reason}")
        self.source = source
        self.key = key
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ImportIssue:
    """One problem in an input file; ``line`` is 1-based, 0 for the whole file."""

    file: str
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        """As a JSON object."""
        return {"file": self.file, "line": self.line, "field": self.field, "reason": self.reason}


@dataclass(slots=True)
class FileSummary:
    """What was read from one file."""

    file: str
    format: str = ""
    encoding: str = ""
    bytes: int = 0
    lines: int = 0
    rows: int = 0
    events: int = 0
    bad_rows: int = 0
    #: False when the file could not be read at all (missing, unreadable, no header).
    readable: bool = True


@dataclass(frozen=True, slots=True)
class ColumnMapping:
    """How the columns and values of a CSV/TSV export map to canonical fields."""

    #: Canonical field -> candidate header names (first present one wins).
    columns: Mapping[str, tuple[str, ...]]
    #: Canonical field -> {normalised source value: canonical value}.
    values: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: Canonical field -> value when the export has no such column.
    defaults: Mapping[str, Any] = field(default_factory=dict)
    time_formats: tuple[str, ...] = ("%Y/%m/%d %H:%M:%S",)
    timezone: str = "Asia/Tokyo"
    encoding: str = "auto"
    delimiter: str | None = None
    skip_rows: int = 0
    name: str = ""
    source: str = "<memory>"

    @property
    def tz(self) -> tzinfo:
        """The time zone of local times in the export."""
        return ZoneInfo(self.timezone)


def _norm(text: str) -> str:
    """Values and headers compare after NFKC (full/half width) and trimming."""
    return unicodedata.normalize("NFKC", text).strip()


def _names(source: str, key: str, value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str) and v.strip() for v in items):
        raise MappingError(source, key, "must be a header name or a list of header names")
    return tuple(_norm(v) for v in items)


def _canonical_value(source: str, key: str, fname: str, value: Any) -> Any:
    if fname == "action":
        if value not in ACTIONS:
            raise MappingError(source, key, f"must be one of {', '.join(sorted(ACTIONS))}; got {value!r}")
    elif fname == "result":
        if value not in RESULTS:
            raise MappingError(source, key, f"must be one of {', '.join(sorted(RESULTS))}; got {value!r}")
    elif fname == "mynumber_ref":
        if not isinstance(value, bool):
            raise MappingError(source, key, f"must be true or false; got {value!r}")
    elif fname in OPTIONAL_INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MappingError(source, key, f"must be a non-negative integer; got {value!r}")
    elif not isinstance(value, str) or not value:
        raise MappingError(source, key, f"must be a non-empty string; got {value!r}")
    return value


def _field_name(source: str, key: str, name: Any) -> str:
    if name not in MAPPING_FIELDS:
        raise MappingError(source, key, f"unknown field (known: {', '.join(MAPPING_FIELDS)})")
    return str(name)


def _check_tz(source: str, name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise MappingError(source, "timezone", "must be a time zone name like Asia/Tokyo")
    try:
        ZoneInfo(name)
    except Exception:  # zoneinfo raises several error types
        raise MappingError(source, "timezone", f"unknown time zone {name!r}") from None
    return name


def _check_encoding(source: str, key: str, name: Any) -> str:
    """A codec name the CSV importer can stream (``auto`` included)."""
    if not isinstance(name, str) or not name:
        raise MappingError(source, key, "must be an encoding name like utf-8 or cp932")
    if name == "auto":
        return name
    try:
        codecs.lookup(name)
    except LookupError:
        raise MappingError(source, key, f"unknown encoding {name!r}") from None
    try:
        b"a".decode(name)
    except LookupError:
        raise MappingError(source, key, f"{name!r} is not a text encoding") from None
    except UnicodeDecodeError:
        pass  # a real text codec (e.g. utf-16) that cannot decode one byte
    return name


def _merge(base: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in doc.items():
        if key in ("columns", "defaults") and isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = {**base[key], **value}
        elif key == "values" and isinstance(value, dict) and isinstance(base.get(key), dict):
            merged = dict(base[key])
            for fname, table in value.items():
                old = merged.get(fname)
                merged[fname] = {**old, **table} if isinstance(old, dict) and isinstance(table, dict) else table
            out[key] = merged
        else:
            out[key] = value
    return out


def _builtin_doc(name: str) -> dict[str, Any]:
    if not name.replace("_", "").isalnum():
        raise KeyError(name)
    ref = resources.files("schemas").joinpath("mappings", f"{name}.yml")
    if not ref.is_file():
        raise KeyError(name)
    doc = yaml.safe_load(ref.read_text(encoding="utf-8"))
    if not isinstance(doc, dict):  # pragma: no cover - shipped data
        raise KeyError(name)
    return doc


def mapping_from_dict(doc: Any, source: str = "<memory>") -> ColumnMapping:
    """Validate a mapping given as a mapping (as read from YAML)."""
    if not isinstance(doc, dict):
        raise MappingError(source, "$", "a mapping file must be a YAML mapping")
    unknown = set(doc) - _MAPPING_KEYS
    if unknown:
        raise MappingError(source, str(sorted(map(str, unknown))[0]), f"unknown key (allowed: {', '.join(sorted(_MAPPING_KEYS))})")
    base_name = doc.get("extends")
    if base_name is not None:
        try:
            base = _builtin_doc(str(base_name))
        except KeyError:
            raise MappingError(source, "extends", f"no built-in mapping named {base_name!r} (known: ppc)") from None
        doc = _merge(base, {k: v for k, v in doc.items() if k != "extends"})
    columns_doc = doc.get("columns")
    if not isinstance(columns_doc, dict) or not columns_doc:
        raise MappingError(source, "columns", "must map canonical fields to header names")
    columns = {
        _field_name(source, f"columns.{k}", k): _names(source, f"columns.{k}", v) for k, v in columns_doc.items()
    }
    values_doc = doc.get("values") or {}
    if not isinstance(values_doc, dict):
        raise MappingError(source, "values", "must map fields to {source value: canonical value}")
    values: dict[str, dict[str, Any]] = {}
    for fname, table in values_doc.items():
        where = f"values.{fname}"
        _field_name(source, where, fname)
        if not isinstance(table, dict):
            raise MappingError(source, where, "must be a mapping of source value to canonical value")
        out: dict[str, Any] = {}
        for raw, canonical in table.items():
            if isinstance(raw, bool) or raw is None:
                raise MappingError(source, f"{where}.{raw}", "quote this key (YAML reads yes/no/on/off/null unquoted as booleans)")
            out[_norm(str(raw))] = _canonical_value(source, f"{where}.{raw}", str(fname), canonical)
        values[str(fname)] = out
    defaults_doc = doc.get("defaults") or {}
    if not isinstance(defaults_doc, dict):
        raise MappingError(source, "defaults", "must map fields to values")
    defaults: dict[str, Any] = {}
    for fname, value in defaults_doc.items():
        where = f"defaults.{fname}"
        name = _field_name(source, where, fname)
        if name in ("ts", "event_id"):
            raise MappingError(source, where, f"{name} cannot have a default")
        defaults[name] = _canonical_value(source, where, name, value)
    formats_doc = doc.get("time_format", "%Y/%m/%d %H:%M:%S")
    formats = formats_doc if isinstance(formats_doc, list) else [formats_doc]
    if not formats or not all(isinstance(f, str) and f for f in formats):
        raise MappingError(source, "time_format", "must be a strptime format or a list of them")
    delimiter = doc.get("delimiter")
    if delimiter is not None:
        if not isinstance(delimiter, str):
            raise MappingError(source, "delimiter", "must be one character (or tab/comma/semicolon/pipe)")
        delimiter = _DELIMITER_NAMES.get(delimiter.lower(), delimiter)
        if len(delimiter) != 1 or delimiter in "\r\n\"":
            raise MappingError(source, "delimiter", "must be one character (or tab/comma/semicolon/pipe)")
    skip = doc.get("skip_rows", 0)
    if isinstance(skip, bool) or not isinstance(skip, int) or not 0 <= skip <= 1000:
        raise MappingError(source, "skip_rows", "must be an integer between 0 and 1000")
    name = doc.get("name", "")
    return ColumnMapping(
        columns=columns,
        values=values,
        defaults=defaults,
        time_formats=tuple(formats),
        timezone=_check_tz(source, doc.get("timezone", "Asia/Tokyo")),
        encoding=_check_encoding(source, "encoding", doc.get("encoding", "auto")),
        delimiter=delimiter,
        skip_rows=skip,
        name=str(name) if name else Path(source).stem,
        source=source,
    )


def load_mapping(path: Path) -> ColumnMapping:
    """Read and validate a mapping file."""
    source = str(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise MappingError(source, "$", f"not valid YAML: {exc}") from None
    except UnicodeDecodeError:
        raise MappingError(source, "$", "a mapping file must be UTF-8") from None
    except OSError as exc:
        raise MappingError(source, "$", f"cannot read: {exc.strerror}") from None
    return mapping_from_dict(doc, source)


def builtin_mapping(name: str = "ppc") -> ColumnMapping:
    """A mapping shipped in ``schemas/mappings/`` (default: the PPC sample's)."""
    try:
        doc = _builtin_doc(name)
    except KeyError:
        raise MappingError(name, "$", "no such built-in mapping") from None
    return mapping_from_dict(doc, f"builtin:{name}")


def _inner_name(path: Path) -> str:
    name = path.name.lower()
    return name[:-3] if name.endswith(".gz") else name


def detect_format(path: Path, explicit: str | None = None) -> str | None:
    """The format of ``path``: explicit, by extension, else sniffed from its start.

    Returns ``None`` when the file cannot be read or its format is unclear.
    """
    if explicit is not None:
        if explicit not in FORMATS:
            raise ValueError(f"unknown format {explicit!r} (known: {', '.join(FORMATS)})")
        return explicit
    fmt = _EXTENSIONS.get(os.path.splitext(_inner_name(path))[1])
    if fmt is not None:
        return fmt
    try:
        sample = _read_sample(path)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    return _sniff(sample)


def _sniff(sample: bytes) -> str | None:
    if sample.startswith(codecs.BOM_UTF8):
        sample = sample[3:]
    for raw_line in sample.splitlines():
        line = raw_line.strip()
        if not line:
            continue
        if line[:1] in (b"{", b"["):
            return "jsonl"
        if b"\t" in line:
            return "tsv"
        if b"," in line:
            return "csv"
        return None
    return None


def _open_binary(path: Path) -> tuple[IO[bytes], IO[bytes]]:
    """(raw file for progress, stream of content)."""
    raw = path.open("rb")
    if path.name.lower().endswith(".gz"):
        return raw, cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))
    return raw, raw


def _read_sample(path: Path) -> bytes:
    raw, stream = _open_binary(path)
    try:
        return stream.read(_SNIFF_BYTES)
    finally:
        stream.close()
        raw.close()


def _guess_encoding(sample: bytes) -> str:
    if sample.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if sample.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    cut = sample.rfind(b"\n")
    body = sample[: cut + 1] if cut >= 0 and len(sample) == _SNIFF_BYTES else sample
    for candidate in ("utf-8", "cp932"):
        try:
            body.decode(candidate)
        except UnicodeDecodeError:
            continue
        return candidate
    return "utf-8"


_FAST_FIELDS: Final = {"Y": r"(\d{4})", "m": r"(\d{1,2})", "d": r"(\d{1,2})", "H": r"(\d{1,2})", "M": r"(\d{1,2})", "S": r"(\d{1,2})"}


@functools.lru_cache(maxsize=32)
def _fast_time(fmt: str) -> re.Pattern[str] | None:
    """A regex for formats made of %Y %m %d %H %M [%S] in that order (strptime is slow)."""
    parts = re.split(r"%(.)", fmt)
    codes = parts[1::2]
    if codes not in (["Y", "m", "d", "H", "M", "S"], ["Y", "m", "d", "H", "M"]):
        return None
    out = []
    for i, part in enumerate(parts):
        out.append(_FAST_FIELDS[part] if i % 2 else re.escape(part))
    return re.compile("".join(out))


class _RowError(Exception):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(field, reason)
        self.field = field
        self.reason = reason


def _short(value: str) -> str:
    return repr(value if len(value) <= _VALUE_MAX else value[:_VALUE_MAX] + "…")


class _Plan:
    """One file's header resolved against the mapping (index per field)."""

    __slots__ = ("columns", "defaults", "fields", "header", "id_column", "mapping", "tz")

    def __init__(self, mapping: ColumnMapping, header: list[str], tz: tzinfo) -> None:
        self.mapping = mapping
        self.tz = tz
        self.header = [_norm(h.lstrip("\ufeff")) for h in header]
        index: dict[str, int] = {}
        for i, name in enumerate(self.header):
            index.setdefault(name, i)
        self.columns: list[tuple[str, int]] = []
        self.defaults = dict(mapping.defaults)
        self.id_column: int | None = None
        missing: list[str] = []
        for fname in MAPPING_FIELDS:
            found = next((index[n] for n in mapping.columns.get(fname, ()) if n in index), None)
            if found is None:
                if fname in REQUIRED_FIELDS and fname != "event_id" and fname not in self.defaults:
                    wanted = " / ".join(mapping.columns.get(fname, ())) or "(not in the mapping)"
                    missing.append(f"{fname} <- {wanted}")
                continue
            if fname == "event_id":
                self.id_column = found
            else:
                self.columns.append((fname, found))
        if missing:
            raise _RowError("$", f"header lacks required columns: {'; '.join(missing)}")
        self.fields = len(self.header)


class Importer:
    """Reads files into events, collecting issues; one instance per run.

    ``tz`` overrides the mapping's time zone for local times in CSV/TSV.
    Issues are kept up to ``max_issues`` (all are counted in
    :attr:`issue_count`); :attr:`files` has one summary per file read.
    """

    __slots__ = ("codec", "files", "fmt", "issue_count", "issues", "mapping", "max_issues", "progress", "tz")

    def __init__(
        self,
        codec: EventCodec,
        mapping: ColumnMapping | None = None,
        fmt: str | None = None,
        tz: tzinfo | None = None,
        progress: ProgressCallback | None = None,
        max_issues: int = 1000,
    ) -> None:
        if fmt is not None and fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
        self.codec = codec
        self.mapping = mapping if mapping is not None else builtin_mapping()
        self.fmt = fmt
        self.tz = tz
        self.progress = progress
        self.max_issues = max_issues
        self.issues: list[ImportIssue] = []
        self.issue_count = 0
        self.files: list[FileSummary] = []

    # -- issues -------------------------------------------------------------

    def safe(self, text: str) -> str:
        """``text`` with anything that could be a personal number pseudonymised."""
        return self.codec.pseudonymizer.scrub(text)[0]

    def _issue(self, summary: FileSummary, line: int, field_name: str, reason: str) -> None:
        self.issue_count += 1
        if len(self.issues) < self.max_issues:
            self.issues.append(ImportIssue(summary.file, line, self.safe(field_name), self.safe(reason)))

    # -- entry point --------------------------------------------------------

    def read(self, path: Path) -> Iterator[Event]:
        """Stream the events of one file (issues and summary recorded on ``self``)."""
        summary = FileSummary(self.safe(str(path)))
        self.files.append(summary)
        try:
            summary.bytes = path.stat().st_size
            if not path.is_file():
                raise IsADirectoryError(21, "not a regular file")
        except OSError as exc:
            summary.readable = False
            self._issue(summary, 0, "$", f"cannot read: {exc.strerror or exc}")
            return
        fmt = detect_format(path, self.fmt)
        if fmt is None:
            summary.readable = False
            self._issue(summary, 0, "$", "cannot tell the format from the name or content; use --format jsonl|csv|tsv")
            return
        summary.format = fmt
        try:
            if fmt == "jsonl":
                yield from self._read_jsonl(path, summary)
            else:
                yield from self._read_delimited(path, summary, fmt)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            self._issue(summary, summary.lines, "$", f"read error: {getattr(exc, 'strerror', None) or exc}")
            if summary.events == 0:
                summary.readable = False

    def _report_progress(self, raw: IO[bytes], total: int) -> None:
        if self.progress is not None:
            try:
                done = raw.tell()
            except (OSError, ValueError):
                return
            self.progress(min(done, total), total)

    # -- JSONL --------------------------------------------------------------

    def _read_jsonl(self, path: Path, summary: FileSummary) -> Iterator[Event]:
        summary.encoding = "utf-8"
        raw, stream = _open_binary(path)
        try:
            first = stream.read(_SNIFF_BYTES)
            head = first.lstrip()
            if head.startswith(b"["):
                line_end = head.find(b"\n")
                one_line = head if line_end < 0 else head[:line_end]
                try:
                    orjson.loads(one_line)
                except orjson.JSONDecodeError:
                    yield from self._read_json_document(first, stream, raw, summary)
                    return
            yield from self._jsonl_lines(_prepend(first, stream), raw, summary)
        finally:
            stream.close()
            raw.close()

    def _read_json_document(self, first: bytes, stream: IO[bytes], raw: IO[bytes], summary: FileSummary) -> Iterator[Event]:
        rest = stream.read(_MAX_JSON_DOC + 1 - len(first))
        data = first + rest
        summary.lines = data.count(b"\n") + 1
        if len(data) > _MAX_JSON_DOC:
            summary.readable = False
            self._issue(summary, 0, "$", "JSON array larger than 256 MiB; write one event per line (JSONL)")
            return
        events, errors = self.codec.decode(data)
        summary.rows = len(events) + len(errors)
        for err in errors:
            summary.bad_rows += 1
            self._issue(summary, 1, err.field, err.reason)
        summary.events = len(events)
        self._report_progress(raw, summary.bytes)
        yield from events

    def _jsonl_lines(self, lines: Iterator[bytes], raw: IO[bytes], summary: FileSummary) -> Iterator[Event]:
        decode = self.codec.decode
        total = summary.bytes
        lineno = 0
        for line in lines:
            lineno += 1
            if lineno % _PROGRESS_EVERY == 0:
                self._report_progress(raw, total)
            if line is _TOO_LONG:
                summary.rows += 1
                summary.bad_rows += 1
                self._issue(summary, lineno, "$", f"line longer than {MAX_LINE} bytes (skipped)")
                continue
            if not line.strip():
                continue
            summary.rows += 1
            events, errors = decode(line)
            if errors:
                summary.bad_rows += 1
                for err in errors:
                    self._issue(summary, lineno, err.field, err.reason)
            summary.events += len(events)
            yield from events
        summary.lines = lineno
        self._report_progress(raw, total)

    # -- CSV / TSV ----------------------------------------------------------

    def _read_delimited(self, path: Path, summary: FileSummary, fmt: str) -> Iterator[Event]:
        mapping = self.mapping
        encoding = mapping.encoding
        if encoding == "auto":
            encoding = _guess_encoding(_read_sample(path))
        summary.encoding = encoding
        delimiter = mapping.delimiter or ("\t" if fmt == "tsv" else ",")
        raw, stream = _open_binary(path)
        text = io.TextIOWrapper(stream, encoding=encoding, errors=_ERRORS, newline="")
        lines = _TextLines(text, encoding)
        try:
            reader = csv.reader(lines, delimiter=delimiter, strict=False)
            yield from self._rows(reader, lines, summary, raw, self.tz or mapping.tz, path.name)
        finally:
            text.close()
            raw.close()

    def _rows(
        self,
        reader: Iterator[list[str]],
        lines: _TextLines,
        summary: FileSummary,
        raw: IO[bytes],
        tz: tzinfo,
        base_name: str,
    ) -> Iterator[Event]:
        mapping = self.mapping
        total = summary.bytes
        plan: _Plan | None = None
        skipped = 0
        file_key = hashlib.sha256(base_name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        from_dict = self.codec.from_dict
        end = 0
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                start, end = end + 1, lines.count
                summary.rows += 1
                summary.bad_rows += 1
                self._issue(summary, start, "$", f"malformed row: {exc}")
                continue
            start, end = end + 1, lines.count
            bad = lines.problem(start, end)
            if bad is None and (not cells or all(not c.strip() for c in cells)):
                continue
            if plan is None:
                if skipped < mapping.skip_rows:
                    skipped += 1
                    continue
                if bad is not None:
                    summary.readable = False
                    self._issue(summary, start, "$", f"header row: {bad}; set encoding in the mapping")
                    return
                try:
                    plan = _Plan(mapping, cells, tz)
                except _RowError as exc:
                    summary.readable = False
                    headers = ", ".join(_short(h) for h in cells[:20])
                    self._issue(summary, start, exc.field, f"{exc.reason} (found: {headers})")
                    return
                continue
            summary.rows += 1
            if summary.rows % _PROGRESS_EVERY == 0:
                self._report_progress(raw, total)
            if bad is not None:
                summary.bad_rows += 1
                self._issue(summary, start, "$", f"{bad} (row skipped)")
                continue
            try:
                ev = from_dict(self._row_dict(plan, cells, start, file_key))
            except (_RowError, EventError) as exc:
                summary.bad_rows += 1
                self._issue(summary, start, exc.field, exc.reason)
                continue
            summary.events += 1
            yield ev
        summary.lines = lines.count
        if plan is None and summary.readable:
            summary.readable = False
            self._issue(summary, 0, "$", "no header row found (empty file?)")
        self._report_progress(raw, total)

    def _row_dict(self, plan: _Plan, cells: list[str], line: int, file_key: str) -> dict[str, Any]:
        n = len(cells)
        if n != plan.fields and not (n > plan.fields and not any(c.strip() for c in cells[plan.fields :])):
            raise _RowError("$", f"row has {n} columns, the header has {plan.fields}")
        values = plan.mapping.values
        obj: dict[str, Any] = dict(plan.defaults)
        for fname, index in plan.columns:
            cell = _norm(cells[index]) if index < n else ""
            if not cell:
                if fname in REQUIRED_FIELDS and fname not in obj:
                    raise _RowError(fname, f"empty (column {plan.header[index]})")
                continue
            table = values.get(fname)
            mapped = table.get(cell) if table else None
            if mapped is not None:
                obj[fname] = mapped
            elif fname == "ts":
                obj[fname] = self._parse_time(cell, plan)
            elif fname == "action":
                if cell not in ACTIONS:
                    raise _RowError(fname, f"unknown value {_short(cell)} in column {plan.header[index]} (add it under values.action in the mapping)")
                obj[fname] = cell
            elif fname == "result":
                if cell not in RESULTS:
                    raise _RowError(fname, f"unknown value {_short(cell)} in column {plan.header[index]} (add it under values.result in the mapping)")
                obj[fname] = cell
            elif fname == "mynumber_ref":
                flag = _BOOL_LITERALS.get(cell.lower())
                if flag is None:
                    raise _RowError(fname, f"unknown value {_short(cell)} in column {plan.header[index]} (add it under values.mynumber_ref in the mapping)")
                obj[fname] = flag
            elif fname in OPTIONAL_INT_FIELDS:
                digits = cell.replace(",", "").replace("_", "")
                if not digits.isascii() or not digits.isdigit():
                    raise _RowError(fname, f"not a whole number: {_short(cell)}")
                obj[fname] = int(digits)
            else:
                obj[fname] = cell
        if plan.id_column is not None and plan.id_column < n and cells[plan.id_column].strip():
            obj["event_id"] = _norm(cells[plan.id_column])
        else:
            content = "\x1f".join(cells).encode("utf-8", "surrogatepass")
            obj["event_id"] = f"{file_key}:{line}:{hashlib.sha256(content).hexdigest()[:10]}"
        return obj

    @staticmethod
    def _parse_time(cell: str, plan: _Plan) -> str:
        for fmt in plan.mapping.time_formats:
            try:
                if fmt == "iso8601":
                    dt = datetime.fromisoformat(cell)
                else:
                    fast = _fast_time(fmt)
                    if fast is None:
                        dt = datetime.strptime(cell, fmt)
                    else:
                        match = fast.fullmatch(cell)
                        if match is None:
                            continue
                        g = match.groups()
                        dt = datetime(int(g[0]), int(g[1]), int(g[2]), int(g[3]), int(g[4]), int(g[5]) if len(g) > 5 else 0)
            except ValueError:
                continue
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=plan.tz)
            return dt.isoformat()
        raise _RowError("ts", f"{_short(cell)} does not match {' or '.join(plan.mapping.time_formats)}")


#: Sentinel yielded for a line longer than :data:`MAX_LINE`.
_TOO_LONG: Final = b"\x00too-long\x00"


def _prepend(first: bytes, stream: IO[bytes]) -> Iterator[bytes]:
    """Physical lines of ``first`` + the rest of ``stream``, each at most MAX_LINE bytes."""
    pending = first
    while True:
        cut = pending.find(b"\n")
        if cut >= 0:
            line, pending = pending[: cut + 1], pending[cut + 1 :]
            yield line if len(line) <= MAX_LINE else _TOO_LONG
            continue
        if len(pending) > MAX_LINE:
            # skip the rest of an over-long line
            while True:
                chunk = stream.read(_SNIFF_BYTES)
                if not chunk:
                    pending = b""
                    break
                cut = chunk.find(b"\n")
                if cut >= 0:
                    pending = chunk[cut + 1 :]
                    break
            yield _TOO_LONG
            continue
        chunk = stream.read(_SNIFF_BYTES)
        if not chunk:
            if pending:
                yield pending
            return
        pending += chunk


class _TextLines:
    """Physical text lines for the csv reader, numbered, with their problems noted."""

    __slots__ = ("bad", "count", "encoding", "text")

    def __init__(self, text: IO[str], encoding: str) -> None:
        self.text = text
        self.encoding = encoding
        #: Lines read so far.
        self.count = 0
        #: Line number -> what is wrong with it (undecodable bytes, too long).
        self.bad: dict[int, str] = {}

    def __iter__(self) -> Iterator[str]:
        readline = self.text.readline
        while True:
            line = readline(MAX_LINE)
            if not line:
                return
            self.count += 1
            if len(line) >= MAX_LINE and not line.endswith(("\n", "\r")):
                while True:  # skip the rest of an over-long line
                    more = readline(MAX_LINE)
                    if not more or more.endswith(("\n", "\r")):
                        break
                self.bad[self.count] = f"line longer than {MAX_LINE} characters"
                yield "\n"
                continue
            if _BAD_CHAR in line:
                self.bad[self.count] = f"bytes that are not valid {self.encoding}"
                line = line.replace(_BAD_CHAR, "\ufffd")
            yield line

    def problem(self, start: int, end: int) -> str | None:
        """What is wrong with lines ``start..end``, if anything."""
        if not self.bad:
            return None
        for n in range(start, end + 1):
            found = self.bad.get(n)
            if found is not None:
                return found
        return None
