"""The offline analysis report: one self-contained HTML page a non-specialist can read.

:func:`render_report` is a pure function of the final alerts, the run's
statistics and the rules: no I/O, no clock (the check's date comes in
:class:`ReportStats`). The page is organised by the PPC log-analysis
viewpoints, records who checked what, when and how (いつ・誰が・何を・
どのように) so an auditor can verify the check, and lists the rows that could
not be read. Every value is HTML-escaped; inline CSS only, no JavaScript.

Nothing here can introduce a personal number: alerts and issues are already
pseudonymised, and the page refers to records by their ``mn_`` tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from html import escape
from typing import Any, Final

from detectors.rules import VIEWPOINTS, Rule
from schemas.alert import SEVERITIES, SEVERITY_RANK, Alert
from schemas.importers import FileSummary, ImportIssue

__all__ = ["LANGUAGES", "ReportStats", "render_report"]

LANGUAGES: Final = ("ja", "en")


@dataclass(slots=True)
class ReportStats:
    """What the run read and how it was configured (the report's header)."""

    events: int = 0
    users: int = 0
    terminals: int = 0
    bad_rows: int = 0
    duplicates: int = 0
    late: int = 0
    seed_events: int = 0
    #: RFC 3339 times of the first and last event read.
    first_ts: str | None = None
    last_ts: str | None = None
    files: Sequence[FileSummary] = ()
    seed_files: Sequence[FileSummary] = ()
    #: The issues kept (may be fewer than ``issue_count``).
    issues: Sequence[ImportIssue] = ()
    issue_count: int = 0
    #: When and by whom the check was made (RFC 3339; free text).
    checked_at: str = ""
    checked_by: str = ""
    tool: str = "leakwatch"
    rules_source: str = ""
    overrides_source: str | None = None
    mapping_source: str = ""
    timezone: str = "Asia/Tokyo"
    #: True when pseudonyms come from a configured key (comparable across runs).
    key_configured: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


_T: Final[dict[str, dict[str, str]]] = {
    "ja": {
        "title": "特定個人情報 アクセスログ点検報告",
        "summary": "概要",
        "period": "対象期間",
        "events": "操作記録（イベント）数",
        "users": "職員アカウント数",
        "terminals": "端末数",
        "bad_rows": "読み込めなかった行",
        "duplicates": "重複して除いた記録",
        "late": "順序が大きく乱れ判定できなかった記録",
        "findings": "検出件数",
        "none": "なし",
        "how": "点検の記録（いつ・誰が・何を・どのように）",
        "when": "いつ",
        "who": "誰が",
        "what": "何を",
        "how_": "どのように",
        "files": "ファイル",
        "format": "形式",
        "encoding": "文字コード",
        "rows": "行数",
        "ok_rows": "読み込んだ記録",
        "unreadable": "読み込めず",
        "tool": "ツール",
        "rules": "適用した検知ルール",
        "overrides": "機関独自の設定（上書き）",
        "mapping": "列の対応表",
        "tz": "時刻の基準",
        "seed": "過去ログ（通常の利用状況の学習用）",
        "pseudo_fixed": "個人番号は記録に残さず、固定の鍵による仮名（mn_…）で表示しています。仮名は同じ鍵を使う点検どうしで比較できます。",
        "pseudo_random": "個人番号は記録に残さず、今回限りの鍵による仮名（mn_…）で表示しています。仮名は他の点検結果とは比較できません。",
        "overview": "観点別の結果",
        "viewpoint": "観点",
        "count": "件数",
        "highest": "最も高い重要度",
        "no_findings": "該当なし",
        "no_rules": "この観点の検知ルールは有効になっていません",
        "other": "その他の観点",
        "user": "職員",
        "department": "所属",
        "time": "日時",
        "window": "判定期間",
        "occurrences": "該当回数",
        "rule": "ルール",
        "description": "説明",
        "falsepositives": "誤検知の可能性（確認すること）",
        "evidence": "根拠",
        "event_ids": "記録ID",
        "terminal_list": "端末",
        "devices": "媒体",
        "subjects": "参照された記録（仮名）",
        "details": "補足",
        "rows_events": "該当する操作",
        "rows_timeline": "直前の操作（職員）",
        "col_ts": "日時",
        "col_event_id": "記録ID",
        "col_action": "操作",
        "col_result": "結果",
        "col_terminal": "端末",
        "col_subject": "対象（仮名）",
        "col_records": "件数",
        "col_device": "媒体",
        "issues": "読み込めなかった行",
        "issues_none": "すべての行を読み込みました。",
        "issues_more": "ほか {n} 件（表示を省略）",
        "line": "行",
        "field": "項目",
        "reason": "理由",
        "footer": "この報告書には個人番号（マイナンバー）を記載していません。記録は仮名で示しています。",
        "severity": "重要度",
        "of": "／",
    },
    "en": {
        "title": "Access log check: personal-number (My Number) data",
        "summary": "Summary",
        "period": "Period covered",
        "events": "Events (operations)",
        "users": "Staff accounts",
        "terminals": "Terminals",
        "bad_rows": "Rows that could not be read",
        "duplicates": "Duplicate events skipped",
        "late": "Events too far out of order to check",
        "findings": "Findings",
        "none": "none",
        "how": "How these logs were checked (when, who, what, how)",
        "when": "When",
        "who": "Who",
        "what": "What",
        "how_": "How",
        "files": "Files",
        "format": "Format",
        "encoding": "Encoding",
        "rows": "Rows",
        "ok_rows": "Events read",
        "unreadable": "not readable",
        "tool": "Tool",
        "rules": "Detection rules applied",
        "overrides": "Agency overrides",
        "mapping": "Column mapping",
        "tz": "Time zone",
        "seed": "History (to learn normal use)",
        "pseudo_fixed": "Personal numbers are never shown; records appear as pseudonyms (mn_…) from a fixed key, comparable between checks using the same key.",
        "pseudo_random": "Personal numbers are never shown; records appear as pseudonyms (mn_…) from a key used for this run only, not comparable with other checks.",
        "overview": "Results by viewpoint",
        "viewpoint": "Viewpoint",
        "count": "Findings",
        "highest": "Highest severity",
        "no_findings": "Nothing found",
        "no_rules": "No rule for this viewpoint is enabled",
        "other": "Other viewpoints",
        "user": "Staff",
        "department": "Department",
        "time": "Time",
        "window": "Window",
        "occurrences": "Occurrences",
        "rule": "Rule",
        "description": "Description",
        "falsepositives": "Possible innocent explanations (check these)",
        "evidence": "Evidence",
        "event_ids": "Event ids",
        "terminal_list": "Terminals",
        "devices": "Devices",
        "subjects": "Records referenced (pseudonyms)",
        "details": "Details",
        "rows_events": "Matching operations",
        "rows_timeline": "The user's preceding operations",
        "col_ts": "Time",
        "col_event_id": "Event id",
        "col_action": "Action",
        "col_result": "Result",
        "col_terminal": "Terminal",
        "col_subject": "Record (pseudonym)",
        "col_records": "Records",
        "col_device": "Device",
        "issues": "Rows that could not be read",
        "issues_none": "Every row was read.",
        "issues_more": "and {n} more (not shown)",
        "line": "Line",
        "field": "Field",
        "reason": "Reason",
        "footer": "This report contains no personal numbers (My Numbers). Records are shown as pseudonyms.",
        "severity": "Severity",
        "of": " / ",
    },
}

_SEVERITY_LABEL: Final = {
    "ja": {"low": "低", "medium": "中", "high": "高", "critical": "重大"},
    "en": {"low": "low", "medium": "medium", "high": "high", "critical": "critical"},
}
_WEEKDAYS: Final = {"ja": "月火水木金土日", "en": ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")}
_MAX_LIST: Final = 20

_CSS: Final = """
body{font-family:"Hiragino Sans","Yu Gothic","Meiryo",system-ui,sans-serif;margin:2rem auto;max-width:70rem;padding:0 1rem;color:#1b1b1b;line-height:1.6}
h1{font-size:1.6rem;border-bottom:3px solid #1b4f8a;padding-bottom:.3rem}
h2{font-size:1.25rem;margin-top:2.2rem;border-left:6px solid #1b4f8a;padding-left:.5rem}
h3{font-size:1.05rem;margin:.2rem 0}
table{border-collapse:collapse;margin:.5rem 0 1rem;width:100%}
th,td{border:1px solid #c8c8c8;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#eef2f7;font-weight:600;width:14rem}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.finding{border:1px solid #c8c8c8;border-left:8px solid #888;border-radius:4px;padding:.6rem .9rem;margin:.8rem 0;page-break-inside:avoid}
.sev-critical{border-left-color:#7a0019}.sev-high{border-left-color:#c0392b}.sev-medium{border-left-color:#d68910}.sev-low{border-left-color:#2e86c1}
.badge{display:inline-block;border-radius:3px;padding:0 .45rem;margin-right:.5rem;color:#fff;font-size:.85rem;font-weight:700}
.badge.critical{background:#7a0019}.badge.high{background:#c0392b}.badge.medium{background:#b9770e}.badge.low{background:#2e86c1}
.muted{color:#5a5a5a}.empty{color:#2d6a2d}
code{font-family:ui-monospace,"Cascadia Mono",Consolas,monospace;font-size:.88rem;word-break:break-all}
ul.plain{margin:.2rem 0;padding-left:1.2rem}
footer{margin-top:3rem;border-top:1px solid #c8c8c8;padding-top:.5rem;font-size:.9rem}
@media print{body{margin:0;max-width:none}.finding{break-inside:avoid}}
"""


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _when(ts: str | None, lang: str) -> str:
    """An RFC 3339 time as ``2019-02-02 (土) 22:11:03 +09:00``."""
    if not ts:
        return "-"
    try:
        dt = datetime.fromisoformat(ts)
    except ValueError:
        return ts
    day = _WEEKDAYS[lang][dt.weekday()]
    offset = dt.strftime("%z")
    offset = f"{offset[:3]}:{offset[3:]}" if offset else ""
    return f"{dt:%Y-%m-%d} ({day}) {dt:%H:%M:%S} {offset}".rstrip()


def _span(first: str | None, last: str | None, lang: str) -> str:
    if not first:
        return "-"
    if first == last or not last:
        return _when(first, lang)
    return f"{_when(first, lang)} – {_when(last, lang)}"


def _code_list(items: Iterable[object]) -> str:
    values = [f"<code>{_e(v)}</code>" for v in items]
    if not values:
        return "-"
    if len(values) <= _MAX_LIST:
        return ", ".join(values)
    return f"<details><summary>{', '.join(values[:_MAX_LIST])} …</summary>{', '.join(values[_MAX_LIST:])}</details>"


def _viewpoint_title(name: str, lang: str) -> str:
    titles = VIEWPOINTS.get(name)
    if titles is None:
        return name
    return titles[0] if lang == "ja" else titles[1]


def _badge(severity: str, lang: str) -> str:
    label = _SEVERITY_LABEL[lang].get(severity, severity)
    css = severity if severity in SEVERITY_RANK else "low"
    return f'<span class="badge {css}">{_e(label)}</span>'


def _sort_key(alert: Alert) -> tuple[int, str, str, str]:
    return (-SEVERITY_RANK.get(alert.severity, 0), alert.first_ts, alert.user, alert.alert_id)


def _finding(alert: Alert, rule: Rule | None, lang: str) -> str:
    t = _T[lang]
    title = alert.title if lang == "ja" else alert.title_en
    rows = [
        (t["user"], _e(alert.user)),
        (t["time"], _e(_span(alert.first_ts, alert.last_ts, lang))),
        (t["occurrences"], _e(alert.count)),
        (t["window"], _e(_span(alert.window_start, alert.window_end, lang))),
        (t["rule"], f"<code>{_e(alert.rule_id)}</code> / <code>{_e(alert.reason)}</code>"),
    ]
    if alert.department:
        rows.insert(1, (t["department"], _e(alert.department)))
    if rule is not None:
        rows.append((t["description"], _e(rule.describe(lang))))
        if rule.falsepositives:
            items = "".join(f"<li>{_e(fp)}</li>" for fp in rule.falsepositives)
            rows.append((t["falsepositives"], f'<ul class="plain">{items}</ul>'))
    evidence = [
        (t["event_ids"], _code_list(alert.event_ids)),
        (t["terminal_list"], _code_list(alert.terminals)),
    ]
    if alert.devices:
        evidence.append((t["devices"], _code_list(alert.devices)))
    if alert.subjects:
        evidence.append((t["subjects"], _code_list(alert.subjects)))
    for key, value in sorted(alert.details.items()):
        if key in _EVENT_TABLES:
            continue  # rendered as tables below
        shown = ", ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
        evidence.append((f'{t["details"]}: <code>{_e(key)}</code>', _e(shown)))
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    ev_body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in evidence)
    ev_body += "".join(
        f'<tr><th>{_e(t["rows_" + key])}</th><td>{_event_table(alert.details[key], lang)}</td></tr>'
        for key in _EVENT_TABLES
        if alert.details.get(key)
    )
    sev = alert.severity if alert.severity in SEVERITY_RANK else "low"
    return (
        f'<article class="finding sev-{_e(sev)}" id="{_e(alert.alert_id)}">'
        f"<h3>{_badge(alert.severity, lang)}{_e(title)}</h3>"
        f"<table>{body}</table>"
        f'<table class="evidence"><caption class="muted">{_e(t["evidence"])}</caption>{ev_body}</table>'
        "</article>"
    )


#: Detail keys holding event rows (see detectors.engine), shown as tables.
_EVENT_TABLES = ("events", "timeline")
_EVENT_COLUMNS = ("ts", "event_id", "action", "result", "terminal", "subject", "records", "device")


def _event_table(rows: Any, lang: str) -> str:
    """Evidence or timeline rows as a small table (times in the report's style)."""
    if not isinstance(rows, list):
        return _e(str(rows))
    head = "".join(f"<th>{_e(_T[lang]['col_' + c])}</th>" for c in _EVENT_COLUMNS)
    body = []
    for row in rows:
        if not isinstance(row, dict):
            continue
        cells = []
        for c in _EVENT_COLUMNS:
            value = row.get(c)
            text = _when(value, lang) if c == "ts" and isinstance(value, str) else ("" if value is None else str(value))
            cells.append(f"<td>{_e(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="rows"><tr>{head}</tr>{"".join(body)}</table>'


def _how_block(stats: ReportStats, rules: Mapping[str, Rule], lang: str) -> str:
    t = _T[lang]
    file_rows = []
    for f in stats.files:
        status = "" if f.readable else f' <span class="muted">({_e(t["unreadable"])})</span>'
        file_rows.append(
            f"<tr><td><code>{_e(f.file)}</code>{status}</td><td>{_e(f.format or '-')}</td>"
            f"<td>{_e(f.encoding or '-')}</td><td class=\"num\">{f.rows}</td>"
            f"<td class=\"num\">{f.events}</td><td class=\"num\">{f.bad_rows}</td></tr>"
        )
    files_table = (
        f"<table><tr><th>{_e(t['files'])}</th><th>{_e(t['format'])}</th><th>{_e(t['encoding'])}</th>"
        f"<th>{_e(t['rows'])}</th><th>{_e(t['ok_rows'])}</th><th>{_e(t['bad_rows'])}</th></tr>"
        + "".join(file_rows)
        + "</table>"
    )
    what = f"{files_table}<p>{_e(t['period'])}: {_e(_span(stats.first_ts, stats.last_ts, lang))}</p>"
    if stats.seed_files:
        seeds = ", ".join(f"<code>{_e(f.file)}</code>" for f in stats.seed_files)
        what += f"<p>{_e(t['seed'])}: {seeds} ({stats.seed_events})</p>"
    enabled = sorted((r for r in rules.values() if r.enabled), key=lambda r: r.id)
    rule_items = "".join(
        f"<li><code>{_e(r.id)}</code> {_e(r.title if lang == 'ja' else r.title_en)} "
        f"<span class=\"muted\">({_e(_viewpoint_title(r.viewpoint, lang))})</span></li>"
        for r in enabled
    )
    how_rows = [
        (t["tool"], _e(stats.tool)),
        (t["rules"], f"<code>{_e(stats.rules_source)}</code><ul class=\"plain\">{rule_items}</ul>"),
        (t["overrides"], f"<code>{_e(stats.overrides_source)}</code>" if stats.overrides_source else _e(t["none"])),
        (t["mapping"], f"<code>{_e(stats.mapping_source)}</code>" if stats.mapping_source else "-"),
        (t["tz"], _e(stats.timezone)),
        ("", _e(t["pseudo_fixed"] if stats.key_configured else t["pseudo_random"])),
    ]
    how = "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in how_rows) + "</table>"
    return (
        f'<section id="how"><h2>{_e(t["how"])}</h2><table>'
        f"<tr><th>{_e(t['when'])}</th><td>{_e(_when(stats.checked_at, lang))}</td></tr>"
        f"<tr><th>{_e(t['who'])}</th><td>{_e(stats.checked_by or '-')}</td></tr>"
        f"<tr><th>{_e(t['what'])}</th><td>{what}</td></tr>"
        f"<tr><th>{_e(t['how_'])}</th><td>{how}</td></tr>"
        "</table></section>"
    )


def _issues_block(stats: ReportStats, lang: str) -> str:
    t = _T[lang]
    if not stats.issue_count:
        return f'<section id="issues"><h2>{_e(t["issues"])}</h2><p class="empty">{_e(t["issues_none"])}</p></section>'
    rows = "".join(
        f"<tr><td><code>{_e(i.file)}</code></td><td class=\"num\">{i.line or '-'}</td>"
        f"<td><code>{_e(i.field)}</code></td><td>{_e(i.reason)}</td></tr>"
        for i in stats.issues
    )
    more = stats.issue_count - len(stats.issues)
    tail = f"<p class=\"muted\">{_e(t['issues_more'].format(n=more))}</p>" if more > 0 else ""
    return (
        f'<section id="issues"><h2>{_e(t["issues"])} ({stats.issue_count})</h2>'
        f"<table><tr><th>{_e(t['files'])}</th><th>{_e(t['line'])}</th><th>{_e(t['field'])}</th>"
        f"<th>{_e(t['reason'])}</th></tr>{rows}</table>{tail}</section>"
    )


def render_report(
    alerts: Iterable[Alert],
    stats: ReportStats,
    rules: Mapping[str, Rule],
    lang: str = "ja",
) -> str:
    """The whole report as one HTML document (final alerts, one per finding)."""
    if lang not in LANGUAGES:
        raise ValueError(f"unknown language {lang!r} (known: {', '.join(LANGUAGES)})")
    t = _T[lang]
    by_viewpoint: dict[str, list[Alert]] = {}
    all_alerts = sorted(alerts, key=_sort_key)
    for alert in all_alerts:
        by_viewpoint.setdefault(alert.viewpoint, []).append(alert)
    order = list(VIEWPOINTS) + sorted(v for v in by_viewpoint if v not in VIEWPOINTS)
    active = {r.viewpoint for r in rules.values() if r.enabled}

    severity_counts = {s: sum(1 for a in all_alerts if a.severity == s) for s in SEVERITIES}
    by_sev = "、".join if lang == "ja" else ", ".join
    counts_text = by_sev(
        f"{_SEVERITY_LABEL[lang][s]} {n}" for s, n in sorted(severity_counts.items(), key=lambda kv: -SEVERITY_RANK[kv[0]]) if n
    )
    summary_rows = [
        (t["period"], _e(_span(stats.first_ts, stats.last_ts, lang))),
        (t["events"], _e(f"{stats.events:,}")),
        (t["users"], _e(f"{stats.users:,}")),
        (t["terminals"], _e(f"{stats.terminals:,}")),
        (t["bad_rows"], f'<a href="#issues">{_e(f"{stats.bad_rows:,}")}</a>'),
        (t["findings"], _e(f"{len(all_alerts):,}") + (f" ({_e(counts_text)})" if counts_text else "")),
    ]
    if stats.duplicates:
        summary_rows.append((t["duplicates"], _e(f"{stats.duplicates:,}")))
    if stats.late:
        summary_rows.append((t["late"], _e(f"{stats.late:,}")))
    summary = "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in summary_rows) + "</table>"

    overview_rows = []
    sections = []
    for number, vp in enumerate(order, 1):
        found = by_viewpoint.get(vp, [])
        vp_title = _viewpoint_title(vp, lang) if vp in VIEWPOINTS else f"{t['other']}: {vp}"
        highest = _badge(found[0].severity, lang) if found else "-"
        overview_rows.append(
            f'<tr><td><a href="#vp-{_e(vp)}">{number}. {_e(vp_title)}</a></td>'
            f'<td class="num">{len(found)}</td><td>{highest}</td></tr>'
        )
        if found:
            body = "".join(_finding(a, rules.get(a.rule_id), lang) for a in found)
        elif vp in active:
            body = f'<p class="empty">{_e(t["no_findings"])}</p>'
        else:
            body = f'<p class="muted">{_e(t["no_rules"])}</p>'
        sections.append(
            f'<section class="viewpoint" id="vp-{_e(vp)}" data-viewpoint="{_e(vp)}">'
            f"<h2>{number}. {_e(vp_title)} ({len(found)})</h2>{body}</section>"
        )
    overview = (
        f'<section id="overview"><h2>{_e(t["overview"])}</h2><table>'
        f"<tr><th>{_e(t['viewpoint'])}</th><th>{_e(t['count'])}</th><th>{_e(t['highest'])}</th></tr>"
        + "".join(overview_rows)
        + "</table></section>"
    )
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="{lang}"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(t['title'])}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{_e(t['title'])}</h1>"
        f'<p class="muted">{_e(t["when"])}: {_e(_when(stats.checked_at, lang))}{_e(t["of"])}'
        f'{_e(t["who"])}: {_e(stats.checked_by or "-")}</p></header>'
        f'<section id="summary"><h2>{_e(t["summary"])}</h2>{summary}</section>'
        f"{overview}{''.join(sections)}{_how_block(stats, rules, lang)}{_issues_block(stats, lang)}"
        f"<footer>{_e(t['footer'])}</footer></body></html>\n"
    )
