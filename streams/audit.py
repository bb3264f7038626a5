"""The audit trail: いつ・誰が・何を・どのように, on the ``audit`` topic.

Every escalation mail accepted by the SMTP server, every permanent mail
failure, every timed escalation step and every acknowledgment is one
:class:`AuditRecord` on the audit topic, so an auditor (監査責任者) can verify
that alerts reached people and were handled. The console adds closures,
reopenings and its sign-ins (successful and failed; a failed one names the
user name that was tried, never a password). ``leakwatch audit`` reads the
topic back::

    leakwatch audit                       # everything
    leakwatch audit --alert lw-0123...    # one alert (also digests containing it)
    leakwatch audit --since 24h --json    # last day, one JSON object a line
    leakwatch audit --action console.signin_failed --actor sato

Records never carry a personal number: alerts are referred to by id, people
by the names they gave (ack) or their mail addresses (recipients).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from typing import Any, Final, TextIO
from zoneinfo import ZoneInfo

import orjson

__all__ = [
    "ACTIONS",
    "AUDIT_SCHEMA_VERSION",
    "AuditRecord",
    "configure",
    "describe",
    "format_table",
    "parse_since",
    "read_audit",
    "run",
    "topic_partitions",
    "write_audit",
]

AUDIT_SCHEMA_VERSION: Final = 1
SYSTEM_ACTOR: Final = "leakwatch"

#: action -> (Japanese, English) wording of "what".
ACTIONS: Final = {
    "mail.sent": ("メール送信", "mail sent"),
    "digest.sent": ("まとめメール送信", "digest mail sent"),
    "escalation.step": ("未確認のため上申", "escalated (not acknowledged)"),
    "mail.failed": ("メール送信不能", "mail refused permanently"),
    "ack": ("受領確認", "acknowledged"),
    "alert.closed": ("クローズ", "closed"),
    "alert.reopened": ("再オープン", "reopened"),
    "console.signin": ("コンソールにサインイン", "signed in to the console"),
    "console.signin_failed": ("コンソールのサインイン失敗", "console sign-in failed"),
}
#: Resolutions of ``alert.closed`` (written by the console).
_RESOLUTIONS: Final = {
    "false_positive": ("（誤検知）", " as false positive"),
    "confirmed": ("（漏えい等事案と確定）", " as confirmed incident"),
}
#: Previous resolution of ``alert.reopened``.
_REOPENED_FROM: Final = {
    "false_positive": ("（誤検知としたクローズを取消）", " (was closed as false positive)"),
    "confirmed": ("（事案確定としたクローズを取消）", " (was closed as confirmed incident)"),
}
#: Why a console sign-in failed (``console.signin_failed``).
_SIGNIN_FAILURES: Final = {
    "unknown_user": ("未登録のユーザー名", "unknown user name"),
    "wrong_password": ("パスワード誤り", "wrong password"),
    "locked": ("ロック中", "account locked"),
}
_ACTION_NAME: Final = re.compile(r"^[a-z][a-z0-9_]*(?:\.[a-z0-9_]+)*$")
#: via -> (Japanese, English) wording of "how".
VIAS: Final = {
    "smtp": ("メール (SMTP)", "mail (SMTP)"),
    "link": ("メール内の確認リンク", "ack link in the mail"),
    "cli": ("コマンド (leakwatch ack)", "command line (leakwatch ack)"),
    "console": ("コンソール", "console"),
}
_KINDS: Final = {
    "alert": ("初報", "first report"),
    "update": ("続報", "update"),
    "step": ("上申", "escalation"),
    "digest": ("まとめ", "digest"),
}


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audited fact. ``at`` is timezone-aware ISO 8601."""

    action: str
    at: str
    actor: str
    via: str
    alert_ids: tuple[str, ...] = ()
    detail: dict[str, Any] = field(default_factory=dict)
    #: Deterministic where the fact is (mail ids), so a replayed write is recognisable.
    record_id: str = ""

    def __post_init__(self) -> None:
        # Other components add actions of their own (the console's alert.closed);
        # unknown ones are kept and shown by name, malformed ones refused.
        if not _ACTION_NAME.match(self.action):
            raise ValueError(f"malformed audit action {self.action!r}")
        if self.via not in VIAS:
            raise ValueError(f"unknown audit via {self.via!r}")
        if datetime.fromisoformat(self.at).tzinfo is None:
            raise ValueError("audit time must be timezone-aware")

    @property
    def key(self) -> bytes:
        """Kafka key: the alert (records of one alert stay in order), else the record id."""
        if len(self.alert_ids) == 1:
            return self.alert_ids[0].encode()
        return (self.record_id or self.action).encode()

    @property
    def when(self) -> datetime:
        return datetime.fromisoformat(self.at)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": AUDIT_SCHEMA_VERSION,
            "record_id": self.record_id,
            "action": self.action,
            "at": self.at,
            "actor": self.actor,
            "via": self.via,
            "alert_ids": list(self.alert_ids),
            "detail": self.detail,
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict(), option=orjson.OPT_SORT_KEYS)

    @classmethod
    def from_json(cls, raw: bytes) -> AuditRecord:
        doc = orjson.loads(raw)
        return cls(
            action=doc["action"],
            at=doc["at"],
            actor=doc["actor"],
            via=doc["via"],
            alert_ids=tuple(doc.get("alert_ids") or ()),
            detail=dict(doc.get("detail") or {}),
            record_id=doc.get("record_id", ""),
        )


async def write_audit(producer: Any, topic: str, records: Iterable[AuditRecord]) -> None:
    """Produce records and wait until the broker has them all (``acks=all`` producer)."""
    futures = [
        await producer.send(topic, value=r.to_json(), key=r.key, headers=[("action", r.action.encode())])
        for r in records
    ]
    for fut in futures:
        await fut


# --------------------------------------------------------------------------- reading


async def topic_partitions(client_args: dict[str, Any], topics: Sequence[str], *, wait: float = 0.0) -> dict[str, list[int]]:
    """Partition numbers of each topic (empty list: no such topic), optionally waiting for them.

    Uses the admin API: a consumer's ``topics()`` fetches metadata without
    updating what ``partitions_for_topic`` answers from.
    """
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**client_args)
    await admin.start()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            described = await admin.describe_topics(list(topics))
            out: dict[str, list[int]] = {t: [] for t in topics}
            for doc in described:
                if doc.get("error_code", 0) == 0 and doc.get("topic") in out:
                    out[doc["topic"]] = sorted(p["partition"] for p in doc.get("partitions", []) if p.get("leader", -1) >= 0)
            if all(out.values()) or loop.time() >= deadline:
                return out
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def read_audit(
    client_args: dict[str, Any],
    topic: str,
    *,
    since: datetime | None = None,
    timeout: float = 30.0,
) -> list[AuditRecord]:
    """Every record on the topic (from ``since``), up to its end at call time."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    parts = (await topic_partitions(client_args, [topic]))[topic]
    if not parts:
        return []
    consumer = AIOKafkaConsumer(enable_auto_commit=False, group_id=None, auto_offset_reset="earliest", **client_args)
    await consumer.start()
    out: list[AuditRecord] = []
    try:
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        end = await consumer.end_offsets(tps)
        if since is not None:
            found = await consumer.offsets_for_times({tp: int(since.timestamp() * 1000) for tp in tps})
            for tp in tps:
                ot = found.get(tp)
                consumer.seek(tp, ot.offset if ot is not None else end[tp])
        else:
            # An explicit seek: seek_to_beginning() followed by position() can
            # answer the end on Apache Kafka (the reset races the lookup).
            first = await consumer.beginning_offsets(tps)
            for tp in tps:
                consumer.seek(tp, first[tp])
        remaining = {tp for tp in tps if end[tp] > 0}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while remaining:
            for tp in list(remaining):
                if await consumer.position(tp) >= end[tp]:
                    remaining.discard(tp)
            if not remaining:
                break
            if loop.time() > deadline:
                raise TimeoutError(f"audit topic {topic!r} not read to its end within {timeout:.0f}s")
            batch = await consumer.getmany(*remaining, timeout_ms=500)
            for tp, messages in batch.items():
                for msg in messages:
                    if msg.offset >= end[tp] or msg.value is None:
                        continue
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        out.append(AuditRecord.from_json(msg.value))
    finally:
        await consumer.stop()
    if since is not None:
        out = [r for r in out if r.when >= since]
    out.sort(key=lambda r: r.when)
    return out


# --------------------------------------------------------------------------- display

_RELATIVE = re.compile(r"^\s*(\d+)\s*(m|h|d|w)\s*$")


def parse_since(text: str, tz: tzinfo, now: datetime) -> datetime:
    """``24h``/``7d``/``30m``/``2w`` ago, or an ISO date/datetime (naive: in ``tz``)."""
    match = _RELATIVE.match(text)
    if match:
        n, unit = int(match.group(1)), match.group(2)
        delta = {"m": timedelta(minutes=n), "h": timedelta(hours=n), "d": timedelta(days=n), "w": timedelta(weeks=n)}[unit]
        return now - delta
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since: expected e.g. 24h, 7d or 2024-05-01[T09:00], got {text!r}") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=tz)


def describe(record: AuditRecord, language: str = "ja") -> str:
    """The "what" of a record in words."""
    i = 0 if language == "ja" else 1
    d = record.detail
    what = ACTIONS[record.action][i] if record.action in ACTIONS else record.action
    if record.action == "alert.closed" and d.get("resolution") in _RESOLUTIONS:
        what += _RESOLUTIONS[d["resolution"]][i]
    if record.action == "alert.reopened" and d.get("previous_resolution") in _REOPENED_FROM:
        what += _REOPENED_FROM[d["previous_resolution"]][i]
    if record.action == "console.signin_failed" and d.get("reason") in _SIGNIN_FAILURES:
        what += f"（{_SIGNIN_FAILURES[d['reason']][0]}）" if i == 0 else f" ({_SIGNIN_FAILURES[d['reason']][1]})"
    kind = d.get("kind")
    if kind in _KINDS and record.action in ("mail.sent", "mail.failed"):
        what += f"（{_KINDS[kind][i]}）" if i == 0 else f" ({_KINDS[kind][i]})"
    if record.action == "escalation.step":
        what += f" 第{d.get('tier')}段階" if i == 0 else f" tier {d.get('tier')}"
    ids = list(record.alert_ids)
    if not ids:
        target = ""
    elif len(ids) == 1:
        target = ids[0]
    else:
        target = f"{len(ids)}件" if i == 0 else f"{len(ids)} alerts"
    parts = [what, target]
    recipients = d.get("recipients")
    if recipients:
        parts.append("→ " + ", ".join(recipients))
    if record.action == "mail.failed":
        parts.append(f"[{d.get('code', '')}] {d.get('reason', '')}".strip())
    if d.get("comment"):
        parts.append(f"「{d['comment']}」" if i == 0 else f'"{d["comment"]}"')
    if record.action.startswith("console.signin") and d.get("remote"):
        parts.append(f"{d['remote']} から" if i == 0 else f"from {d['remote']}")
    return " ".join(str(p) for p in parts if p)


def format_table(records: Sequence[AuditRecord], tz: tzinfo, language: str = "ja") -> str:
    """A plain-text table: いつ / 誰が / 何を / どのように."""
    i = 0 if language == "ja" else 1
    header = ("いつ", "誰が", "何を", "どのように") if i == 0 else ("when", "who", "what", "how")
    rows = [
        (
            r.when.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S %Z"),
            r.actor,
            describe(r, language),
            VIAS[r.via][i],
        )
        for r in records
    ]
    widths = [max([_width(h)] + [_width(row[c]) for row in rows]) for c, h in enumerate(header[:3])]

    def line(cells: Sequence[str]) -> str:
        padded = [cells[c] + " " * (widths[c] - _width(cells[c])) for c in range(3)]
        return "  ".join([*padded, cells[3]]).rstrip()

    out = [line(header)]
    out.extend(line(row) for row in rows)
    return "\n".join(out)


def _width(text: str) -> int:
    """Display width: East Asian wide characters count two columns."""
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


# --------------------------------------------------------------------------- CLI


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``leakwatch audit``."""
    parser.add_argument("--alert", metavar="ALERT_ID", help="only records about this alert (digests included)")
    parser.add_argument("--since", metavar="WHEN", help="only records since: 24h, 7d, or 2024-05-01[T09:00]")
    parser.add_argument("--action", metavar="ACTION", help=f"only this kind of record ({', '.join(ACTIONS)})")
    parser.add_argument("--actor", metavar="NAME", help="only records of this person (who acted, or the user name a sign-in tried)")
    parser.add_argument("--json", action="store_true", help="one JSON object a line instead of a table")
    parser.add_argument("--language", choices=("ja", "en"), default="ja", help="language of the table")
    parser.add_argument("--config", metavar="FILE", help="worker config file (default: $LEAKWATCH_CONFIG)")
    parser.add_argument("--brokers", help="Kafka bootstrap servers (default: from the config)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for Kafka")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run ``leakwatch audit``: print matching records; 0 on success."""
    from streams.config import ConfigError, Settings, load_settings

    out = out or sys.stdout
    overrides = {"brokers": args.brokers} if args.brokers else None
    try:
        settings = load_settings(Settings, config_file=args.config, overrides=overrides)
        tz = ZoneInfo(settings.tz)
        since = parse_since(args.since, tz, datetime.now(tz)) if args.since else None
    except (ConfigError, ValueError) as exc:
        print(f"leakwatch audit: {exc}", file=sys.stderr)
        return 2
    try:
        records = asyncio.run(
            read_audit(settings.kafka_client_args(), settings.topic_audit, since=since, timeout=args.timeout)
        )
    except Exception as exc:
        print(f"leakwatch audit: cannot read {settings.topic_audit!r} from {settings.brokers}: {exc}", file=sys.stderr)
        return 1
    if args.alert:
        records = [r for r in records if args.alert in r.alert_ids]
    if args.action:
        records = [r for r in records if r.action == args.action]
    if args.actor:
        records = [r for r in records if r.actor == args.actor]
    if args.json:
        for r in records:
            out.write(orjson.dumps(r.to_dict() | {"what": describe(r, args.language)}).decode() + "\n")
    elif records:
        out.write(format_table(records, tz, args.language) + "\n")
    else:
        out.write("該当する記録はありません。\n" if args.language == "ja" else "No matching records.\n")
    return 0
