"""Escalation mail: composing it (pure) and handing it to the SMTP relay.

Composition turns alerts into :class:`email.message.EmailMessage` objects and
does no I/O: everything it needs (language, time zone, links, the rule that
explains the alert, the clock reading for ``Date``) is passed in.

* Japanese by default, English selectable: subject
  ``【リスク事案】[高] 休日の個人番号参照 — user123``; body: what happened (rule
  title and description), when (Asia/Tokyo), who and which terminals, an
  evidence summary, what to do next, the alert link and the signed ack link.
* MIME: ``multipart/alternative`` (text/plain + text/html, UTF-8, base64),
  headers under :data:`email.policy.SMTP` (``utf8=False``) so the Japanese
  subject and display names are RFC 2047 encoded words.
* ``Message-ID`` is derived from the alert id and the step (``<lw-….alert@d>``,
  ``<lw-….step1@d>``, ``<lw-….update-r3@d>``), so every mail about one alert
  threads under its first one (``In-Reply-To``/``References``) and a resend
  after a crash carries the same id (receivers can drop the duplicate).
* Never a personal number: alerts carry pseudonyms only, and as a last line
  of defence every digit run that looks like one (12 digits, plain or 4-4-4)
  in subject, text and HTML is masked (:func:`scrub`).

Sending: :class:`SmtpSender` opens one connection per mail (aiosmtplib, TLS
none/STARTTLS/implicit, optional AUTH) and sorts the outcome per recipient:
accepted, refused permanently (5xx: goes to the mail DLQ) or refused for now
(4xx: retried). A relay that cannot be reached, or refuses the whole
transaction with a 4xx (or an AUTH/sender problem, which is configuration),
raises :class:`TemporaryFailure`: the caller backs off and tries again, and
nothing is lost.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from typing import Final

from detectors.rules import VIEWPOINTS, Rule
from schemas.alert import SEVERITY_RANK, Alert
from streams.mail_settings import MailSettings

__all__ = [
    "KINDS",
    "SEVERITY_WORDS",
    "MailContext",
    "MailItem",
    "SendResult",
    "SmtpSender",
    "TemporaryFailure",
    "compose_alert_mail",
    "compose_digest",
    "digest_id_for",
    "message_id",
    "scrub",
]

KINDS: Final = ("alert", "update", "step")
SEVERITY_WORDS: Final = {
    "ja": {"low": "低", "medium": "中", "high": "高", "critical": "重大"},
    "en": {"low": "Low", "medium": "Medium", "high": "High", "critical": "Critical"},
}
_WEEKDAYS_JA: Final = "月火水木金土日"
_MASK: Final = {"ja": "［伏字］", "en": "[masked]"}
#: Alert ids and pseudonyms (hex) are kept whole; anything else that looks like a personal number is masked.
_SCRUB: Final = re.compile(r"(lw-[0-9a-f]{8}-[0-9a-f]{8}-[0-9a-f]{8}|mn_[0-9a-f]{20})|(\d{4}[ \-]?\d{4}[ \-]?\d{4}\d*)")


def scrub(text: str, language: str = "ja") -> str:
    """``text`` with every personal-number-like digit run masked (alert ids and pseudonyms kept)."""
    mask = _MASK.get(language, _MASK["en"])
    return _SCRUB.sub(lambda m: m.group(1) or mask, text)


# --------------------------------------------------------------------------- ids


def message_id(alert_id: str, kind: str, number: int, domain: str) -> str:
    """The deterministic Message-ID of one mail about one alert."""
    if kind == "alert":
        local = f"{alert_id}.alert"
    elif kind == "update":
        local = f"{alert_id}.update-r{number}"
    elif kind == "step":
        local = f"{alert_id}.step{number}"
    else:
        raise ValueError(f"unknown mail kind {kind!r}")
    return f"<{local}@{domain}>"


def digest_id_for(mail_ids: Sequence[str]) -> str:
    """A digest's id from the mails it bundles (letters and 2-7 only: no long digit runs)."""
    digest = hashlib.sha256("\n".join(sorted(mail_ids)).encode()).digest()
    return base64.b32encode(digest).decode("ascii").rstrip("=").lower()[:26]


# --------------------------------------------------------------------------- composition


@dataclass(frozen=True, slots=True)
class MailContext:
    """What composition needs besides the alerts."""

    language: str
    tz: tzinfo
    from_address: str
    from_name: str
    domain: str
    now: datetime
    max_event_ids: int = 20
    #: Seconds until the next escalation tier if nobody acks ("what to do" text); None: no tier.
    next_tier_after_s: float | None = None

    @classmethod
    def from_settings(cls, mail: MailSettings, tz: tzinfo, now: datetime) -> MailContext:
        """Context from the mail settings; the Message-ID domain is the sender's."""
        name = mail.from_name or ("リスク事案通報 (leakwatch)" if mail.language == "ja" else "leakwatch risk alerts")
        domain = mail.from_address.rpartition("@")[2] or "leakwatch.invalid"
        return cls(mail.language, tz, mail.from_address, name, domain, now, mail.max_event_ids)


@dataclass(frozen=True, slots=True)
class MailItem:
    """One alert in a mail, with its links and why it is being mailed."""

    alert: Alert
    kind: str = "alert"
    #: Tier number of a step, revision of an update.
    number: int = 0
    alert_url: str = ""
    ack_url: str = ""
    #: Count in the previous mail (updates).
    previous_count: int = 0
    #: Seconds since the first mail (steps).
    waited_s: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown mail kind {self.kind!r}")


def _t(ctx: MailContext, ja: str, en: str) -> str:
    return ja if ctx.language == "ja" else en


def _severity(ctx: MailContext, severity: str) -> str:
    return SEVERITY_WORDS[ctx.language].get(severity, severity)


def _title(ctx: MailContext, alert: Alert) -> str:
    return alert.title if ctx.language == "ja" else (alert.title_en or alert.title)


def _when(ctx: MailContext, iso: str) -> str:
    try:
        dt = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    if dt.tzinfo is None:
        return iso
    local = dt.astimezone(ctx.tz)
    if ctx.language == "ja":
        return local.strftime(f"%Y-%m-%d（{_WEEKDAYS_JA[local.weekday()]}）%H:%M:%S %Z")
    return local.strftime("%a %Y-%m-%d %H:%M:%S %Z")


def _duration(ctx: MailContext, seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return _t(ctx, f"{s}秒", f"{s} seconds")
    if s < 3600 or s % 3600:
        m = max(1, round(s / 60))
        return _t(ctx, f"{m}分", f"{m} minutes")
    h = s // 3600
    return _t(ctx, f"{h}時間", f"{h} hours")


def _listing(values: Sequence[str], limit: int, ctx: MailContext) -> str:
    if not values:
        return _t(ctx, "（記録なし）", "(none recorded)")
    shown = ", ".join(values[:limit])
    rest = len(values) - limit
    if rest > 0:
        shown += _t(ctx, f" ほか{rest}件", f" and {rest} more")
    return shown


def _subject(ctx: MailContext, item: MailItem) -> str:
    a = item.alert
    sev = _severity(ctx, a.severity)
    if item.kind == "alert":
        tag = _t(ctx, "【リスク事案】", "[Risk incident] ")
    elif item.kind == "update":
        tag = _t(ctx, "【リスク事案・続報】", "[Risk incident update] ")
    else:
        tag = _t(ctx, f"【リスク事案・未確認につき上申 第{item.number}段階】", f"[Risk incident unacknowledged - escalation {item.number}] ")
    # English: an ASCII dash, since an encoded word next to plain words doubles the space when decoded.
    dash = "—" if ctx.language == "ja" else "-"
    subject = f"{tag}[{sev}] {_title(ctx, a)} {dash} {a.user}"
    if item.kind == "update":
        subject += _t(ctx, f"（{a.count}件）", f" ({a.count} events)")
    return subject


def _sections(ctx: MailContext, item: MailItem, rule: Rule | None) -> list[tuple[str, list[str]]]:
    """The body as (heading, lines) pairs, shared by the text and HTML parts."""
    a = item.alert
    sev = _severity(ctx, a.severity)
    out: list[tuple[str, list[str]]] = []

    lead: list[str] = []
    if item.kind == "alert":
        lead.append(_t(ctx, "リスク事案を検知しました。内容を確認し、対応する方が受領を記録してください。",
                       "leakwatch detected a risk incident. Please read it and record who handles it."))
    elif item.kind == "update":
        lead.append(_t(ctx, f"前回お知らせしたリスク事案の件数が増えました（{item.previous_count}件 → {a.count}件）。",
                       f"The risk incident reported earlier has grown ({item.previous_count} -> {a.count} events)."))
    else:
        lead.append(_t(ctx, f"このリスク事案は最初の通報から{_duration(ctx, item.waited_s)}が経過しても受領が記録されていないため、"
                            f"上申します（第{item.number}段階）。",
                       f"Nobody has acknowledged this risk incident {_duration(ctx, item.waited_s)} after the first mail, "
                       f"so it is escalated to you (tier {item.number})."))
    out.append(("", lead))

    what = [f"{_title(ctx, a)}（{_t(ctx, '重要度', 'severity')}: {sev}）" if ctx.language == "ja"
            else f"{_title(ctx, a)} (severity: {sev})"]
    if rule is not None:
        rule_title = rule.title if ctx.language == "ja" else rule.title_en
        what.append(_t(ctx, f"ルール: {rule_title}（{rule.id}）", f"Rule: {rule_title} ({rule.id})"))
    viewpoint = VIEWPOINTS.get(a.viewpoint)
    if viewpoint:
        what.append(_t(ctx, f"観点: {viewpoint[0]}", f"Viewpoint: {viewpoint[1]}"))
    if rule is not None:
        what.append(_t(ctx, "説明: ", "What it means: ") + rule.describe(ctx.language))
    out.append((_t(ctx, "何が起きたか", "What happened"), what))

    out.append(
        (
            _t(ctx, "いつ（日本時間）", "When") if _is_tokyo(ctx.tz) else _t(ctx, "いつ", "When"),
            [
                _t(ctx, "最初: ", "First: ") + _when(ctx, a.first_ts),
                _t(ctx, "最後: ", "Last:  ") + _when(ctx, a.last_ts),
            ],
        )
    )

    who = [_t(ctx, "職員: ", "Staff account: ") + a.user + (f"（{_t(ctx, '所属', 'department')}: {a.department}）" if a.department and ctx.language == "ja" else (f" (department: {a.department})" if a.department else ""))]
    who.append(_t(ctx, "端末: ", "Terminal(s): ") + _listing(list(a.terminals), 10, ctx))
    if a.devices:
        who.append(_t(ctx, "媒体・機器: ", "Device(s): ") + _listing(list(a.devices), 10, ctx))
    out.append((_t(ctx, "誰が・どの端末で", "Who and where"), who))

    evidence = [_t(ctx, f"該当操作: {a.count}件", f"Matching operations: {a.count}")]
    if a.subjects:
        evidence.append(_t(ctx, f"参照された記録（仮名）: {len(a.subjects)}件 — ", f"Records referenced (pseudonyms): {len(a.subjects)} — ")
                        + _listing(list(a.subjects), 5, ctx))
    evidence.append(_t(ctx, "イベントID: ", "Event ids: ") + _listing(list(a.event_ids), ctx.max_event_ids, ctx))
    out.append((_t(ctx, "証拠の概要", "Evidence"), evidence))

    todo: list[str] = []
    if item.ack_url:
        todo.append(_t(ctx, f"1. 対応する方は受領を記録してください: {item.ack_url}",
                        f"1. Whoever handles this: record your acknowledgment: {item.ack_url}"))
        todo.append(_t(ctx, f"   （リンクが使えない場合: leakwatch ack {a.alert_id} --by 氏名 --comment \"対応内容\"）",
                        f"   (without the link: leakwatch ack {a.alert_id} --by NAME --comment \"what you do\")"))
    else:
        todo.append(_t(ctx, f"1. 対応する方は受領を記録してください: leakwatch ack {a.alert_id} --by 氏名 --comment \"対応内容\"",
                        f"1. Whoever handles this: record it: leakwatch ack {a.alert_id} --by NAME --comment \"what you do\""))
    if ctx.next_tier_after_s is not None:
        todo.append(_t(ctx, f"   受領が記録されないと、最初の通報から{_duration(ctx, ctx.next_tier_after_s)}後に次の連絡先へ自動的に上申されます。",
                        f"   Without an acknowledgment it is escalated automatically {_duration(ctx, ctx.next_tier_after_s)} after the first mail."))
    todo.append(_t(ctx, "2. 当該職員の上長に、業務上の必要性（承認された時間外勤務・休日出勤、正規の手順か）を確認してください。",
                    "2. Ask the person's manager whether the work was needed and approved (overtime, holiday duty, normal procedure)."))
    todo.append(_t(ctx, "3. 正当な理由が確認できない場合は漏えい等事案（疑いを含む）として総括保護管理者に報告してください。"
                        "個人情報保護委員会への報告が必要になる場合があります（重大な事案は直ちに）。",
                    "3. If there is no legitimate reason, treat it as a (suspected) leak and report it to the chief privacy officer; "
                    "it may have to be reported to the PPC (serious cases at once)."))
    todo.append(_t(ctx, "4. 端末の操作ログと媒体を保全してください（削除・改ざんの防止）。",
                    "4. Preserve the terminal's logs and any media (protect them from deletion and tampering)."))
    if rule is not None and rule.falsepositives:
        todo.append(_t(ctx, "考えられる正当な理由: ", "Known legitimate causes: ") + " / ".join(rule.falsepositives))
    out.append((_t(ctx, "次にすべきこと", "What to do next"), todo))

    links = []
    if item.alert_url:
        links.append(_t(ctx, "詳細: ", "Details: ") + item.alert_url)
    links.append(_t(ctx, f"アラートID: {a.alert_id}（第{a.revision}版）", f"Alert id: {a.alert_id} (revision {a.revision})"))
    out.append((_t(ctx, "リンク", "Links"), links))
    return out


def _is_tokyo(tz: tzinfo) -> bool:
    return getattr(tz, "key", "") == "Asia/Tokyo"


def _footer(ctx: MailContext) -> str:
    return _t(
        ctx,
        "このメールは leakwatch が自動送信しています。個人番号と住民の氏名は記載していません（記録は仮名で示しています）。",
        "Sent automatically by leakwatch. It contains no personal numbers and no residents' names (records are pseudonyms).",
    )


def _render_text(sections: Sequence[tuple[str, Sequence[str]]], ctx: MailContext) -> str:
    parts = []
    for heading, lines in sections:
        block = (f"■ {heading}\n" if heading else "") + "\n".join(lines)
        parts.append(block)
    parts.append("-- \n" + _footer(ctx))
    return "\n\n".join(parts) + "\n"


_URL: Final = re.compile(r"(https?://[^\s<>\"]+)")


def _linkify(escaped: str) -> str:
    return _URL.sub(lambda m: f'<a href="{m.group(1)}">{m.group(1)}</a>', escaped)


def _render_html(sections: Sequence[tuple[str, Sequence[str]]], ctx: MailContext, ack_url: str = "") -> str:
    body = []
    for heading, lines in sections:
        if heading:
            body.append(f"<h2 style=\"font-size:1.05em;border-bottom:1px solid #ccc\">{html.escape(heading)}</h2>")
        body.append("<p>" + "<br>".join(_linkify(html.escape(line)) for line in lines) + "</p>")
    if ack_url:
        label = _t(ctx, "受領を記録する", "Acknowledge")
        body.insert(
            1,
            f'<p><a href="{html.escape(ack_url)}" style="display:inline-block;padding:.5em 1.2em;'
            f'background:#b00;color:#fff;text-decoration:none;border-radius:4px">{html.escape(label)}</a></p>',
        )
    lang = "ja" if ctx.language == "ja" else "en"
    return (
        f'<!DOCTYPE html><html lang="{lang}"><head><meta charset="utf-8"></head>'
        f'<body style="font-family:sans-serif;line-height:1.6">{"".join(body)}'
        f'<hr><p style="color:#666;font-size:.9em">{html.escape(_footer(ctx))}</p></body></html>'
    )


def _new_message(ctx: MailContext, recipients: Sequence[str], subject: str, msgid: str) -> EmailMessage:
    msg = EmailMessage(policy=SMTP)
    msg["From"] = Address(display_name=ctx.from_name, addr_spec=ctx.from_address)
    msg["To"] = [Address(addr_spec=r) for r in recipients]
    msg["Subject"] = scrub(subject, ctx.language)
    msg["Date"] = format_datetime(ctx.now)
    msg["Message-ID"] = msgid
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Auto-Response-Suppress"] = "All"
    return msg


def _set_body(msg: EmailMessage, text: str, html_text: str, ctx: MailContext) -> None:
    msg.set_content(scrub(text, ctx.language), charset="utf-8", cte="base64")
    msg.add_alternative(scrub(html_text, ctx.language), subtype="html", charset="utf-8", cte="base64")
    # The library's random boundary is 19 decimal digits: that would put a
    # "12-digit number" in every mail. Ours is derived from the Message-ID, in base32.
    seed = hashlib.sha256(str(msg["Message-ID"]).encode()).digest()
    msg.set_boundary("=_lw_" + base64.b32encode(seed).decode("ascii").rstrip("=").lower()[:32])


def compose_alert_mail(
    item: MailItem,
    recipients: Sequence[str],
    ctx: MailContext,
    rule: Rule | None = None,
    *,
    thread: str | None = None,
) -> EmailMessage:
    """The mail about one alert; ``thread`` is the Message-ID of its first mail (follow-ups)."""
    if not recipients:
        raise ValueError("a mail needs at least one recipient")
    a = item.alert
    msgid = message_id(a.alert_id, item.kind, item.number, ctx.domain)
    msg = _new_message(ctx, recipients, _subject(ctx, item), msgid)
    if thread and thread != msgid:
        msg["In-Reply-To"] = thread
        msg["References"] = thread
    msg["X-Leakwatch-Alert-Id"] = a.alert_id
    msg["X-Leakwatch-Severity"] = a.severity
    msg["X-Leakwatch-Rule"] = a.rule_id
    if a.severity == "critical":
        msg["Importance"] = "high"
        msg["X-Priority"] = "1"
    sections = _sections(ctx, item, rule)
    _set_body(msg, _render_text(sections, ctx), _render_html(sections, ctx, item.ack_url), ctx)
    return msg


def compose_digest(
    items: Sequence[MailItem],
    recipients: Sequence[str],
    ctx: MailContext,
    digest_id: str,
    rules: Mapping[str, Rule] | None = None,
) -> EmailMessage:
    """One mail bundling many non-critical alerts (a storm), most severe first."""
    if not items:
        raise ValueError("a digest needs at least one alert")
    if not recipients:
        raise ValueError("a mail needs at least one recipient")
    rules = rules or {}
    ordered = sorted(items, key=lambda i: (-SEVERITY_RANK.get(i.alert.severity, 0), i.alert.first_ts, i.alert.alert_id))
    counts: dict[str, int] = {}
    for i in items:
        counts[i.alert.severity] = counts.get(i.alert.severity, 0) + 1
    by_sev = " / ".join(
        f"{_severity(ctx, s)} {counts[s]}" for s in sorted(counts, key=lambda s: -SEVERITY_RANK.get(s, 0))
    )
    firsts = sorted(i.alert.first_ts for i in items)
    lasts = sorted(i.alert.last_ts for i in items)
    span = f"{_when(ctx, firsts[0])} 〜 {_when(ctx, lasts[-1])}"
    subject = _t(ctx, f"【リスク事案・まとめ】{len(items)}件（{by_sev}）", f"[Risk incidents digest] {len(items)} alerts ({by_sev})")
    msg = _new_message(ctx, recipients, subject, f"<digest.{digest_id}@{ctx.domain}>")
    msg["X-Leakwatch-Digest"] = str(len(items))

    lead = [
        _t(ctx, f"短時間に多数のリスク事案（重大を除く）が発生したため、{len(items)}件をまとめてお知らせします。"
                "重大な事案は個別にお知らせしています。",
           f"Many risk incidents (not critical) occurred in a short time; here are {len(items)} of them in one mail. "
           "Critical ones are always mailed individually."),
        _t(ctx, f"期間: {span}", f"Period: {span}"),
        _t(ctx, "各事案の受領は、事案ごとのリンクまたは leakwatch ack で記録してください。",
           "Acknowledge each one with its link or with leakwatch ack."),
    ]
    if ctx.next_tier_after_s is not None:
        lead.append(_t(ctx, f"受領が記録されない事案は、最初の通報から{_duration(ctx, ctx.next_tier_after_s)}後に自動的に上申されます。",
                       f"Unacknowledged ones are escalated {_duration(ctx, ctx.next_tier_after_s)} after the first mail."))
    text_blocks = ["\n".join(lead)]
    html_rows = []
    for n, i in enumerate(ordered, 1):
        a = i.alert
        label = {"alert": "", "update": _t(ctx, "【続報】", "[update] "), "step": _t(ctx, f"【上申 第{i.number}段階】", f"[escalation {i.number}] ")}[i.kind]
        dept = f"（{a.department}）" if a.department and ctx.language == "ja" else (f" ({a.department})" if a.department else "")
        head = f"{n}. {label}[{_severity(ctx, a.severity)}] {_title(ctx, a)} — {a.user}{dept}"
        when = f"{_when(ctx, a.first_ts)} 〜 {_when(ctx, a.last_ts)}"
        lines = [
            head,
            "   " + _t(ctx, f"{a.count}件、端末: ", f"{a.count} events, terminal(s): ") + _listing(list(a.terminals), 3, ctx),
            "   " + when,
        ]
        if i.alert_url:
            lines.append("   " + _t(ctx, "詳細: ", "Details: ") + i.alert_url)
        if i.ack_url:
            lines.append("   " + _t(ctx, "受領: ", "Acknowledge: ") + i.ack_url)
        lines.append("   " + _t(ctx, "ID: ", "Id: ") + a.alert_id)
        text_blocks.append("\n".join(lines))
        links = []
        if i.alert_url:
            links.append(f'<a href="{html.escape(i.alert_url)}">{html.escape(_t(ctx, "詳細", "details"))}</a>')
        if i.ack_url:
            links.append(f'<a href="{html.escape(i.ack_url)}">{html.escape(_t(ctx, "受領を記録", "acknowledge"))}</a>')
        html_rows.append(
            "<tr>"
            + "".join(
                f"<td>{html.escape(v)}</td>"
                for v in (
                    str(n),
                    label + _severity(ctx, a.severity),
                    _title(ctx, a),
                    a.user + dept,
                    str(a.count),
                    when,
                )
            )
            + f"<td>{' '.join(links)}<br><small>{html.escape(a.alert_id)}</small></td></tr>"
        )
    text = "\n\n".join(text_blocks) + "\n\n-- \n" + _footer(ctx) + "\n"
    heads = _t(ctx, "#,重要度,事案,職員,件数,日時,リンク", "#,severity,incident,staff,events,when,links").split(",")
    lang = "ja" if ctx.language == "ja" else "en"
    html_text = (
        f'<!DOCTYPE html><html lang="{lang}"><head><meta charset="utf-8"></head>'
        '<body style="font-family:sans-serif;line-height:1.5">'
        + "".join(f"<p>{html.escape(line)}</p>" for line in lead)
        + '<table border="1" cellpadding="4" style="border-collapse:collapse">'
        + "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in heads) + "</tr>"
        + "".join(html_rows)
        + f'</table><hr><p style="color:#666;font-size:.9em">{html.escape(_footer(ctx))}</p></body></html>'
    )
    _set_body(msg, text, html_text, ctx)
    return msg


# --------------------------------------------------------------------------- sending


class TemporaryFailure(Exception):
    """The relay could not take the mail now (unreachable, 4xx, AUTH/sender problem): retry later."""


@dataclass(slots=True)
class SendResult:
    """What the relay did with each recipient of one mail."""

    accepted: list[str] = field(default_factory=list)
    #: recipient -> (code, message): 5xx, will never work.
    refused_permanent: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: recipient -> (code, message): 4xx, try again later.
    refused_temporary: dict[str, tuple[int, str]] = field(default_factory=dict)

    def classify(self, recipient: str, code: int, message: str) -> None:
        """File one refused recipient by its reply code."""
        target = self.refused_permanent if 500 <= code < 600 else self.refused_temporary
        target[recipient] = (code, message)


class SmtpSender:
    """Delivers composed mails to the configured relay."""

    def __init__(self, mail: MailSettings) -> None:
        self.mail = mail

    def _client(self) -> object:
        import aiosmtplib

        m = self.mail
        context = None
        if m.tls != "none":
            context = ssl.create_default_context(cafile=m.tls_cafile or None)
            if not m.tls_verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        return aiosmtplib.SMTP(
            hostname=m.smtp_host,
            port=m.port,
            timeout=m.timeout,
            use_tls=m.tls == "implicit",
            start_tls=m.tls == "starttls",
            tls_context=context,
            username=m.username or None,
            password=m.password or None,
        )

    async def send(self, msg: EmailMessage, recipients: Sequence[str]) -> SendResult:
        """Send ``msg`` to ``recipients`` (envelope); :class:`TemporaryFailure` if not now."""
        import aiosmtplib

        result = SendResult()
        smtp = self._client()
        assert isinstance(smtp, aiosmtplib.SMTP)
        try:
            await smtp.connect()
            errors, _ = await smtp.send_message(msg, sender=self.mail.from_address, recipients=list(recipients))
        except aiosmtplib.SMTPRecipientsRefused as exc:
            for refused in exc.recipients:
                result.classify(refused.recipient, refused.code, refused.message)
            return result
        except (aiosmtplib.SMTPAuthenticationError, aiosmtplib.SMTPSenderRefused) as exc:
            # Configuration, not the message: keep the backlog and retry until fixed.
            raise TemporaryFailure(f"relay refused the sender/AUTH: {exc.code} {exc.message}") from exc
        except aiosmtplib.SMTPResponseException as exc:
            if 500 <= exc.code < 600:
                for r in recipients:
                    result.classify(r, exc.code, exc.message)
                return result
            raise TemporaryFailure(f"relay answered {exc.code} {exc.message}") from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise TemporaryFailure(f"relay unreachable: {exc!r}") from exc
        finally:
            if smtp.is_connected:
                try:
                    await smtp.quit()
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    smtp.close()
        for r in recipients:
            if r in errors:
                result.classify(r, errors[r].code, errors[r].message)
            else:
                result.accepted.append(r)
        return result
