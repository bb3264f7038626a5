"""Acknowledging escalated alerts: the ``acks`` topic, signed links, ``leakwatch ack``.

An acknowledgment (受領確認) says "a person has seen this alert and handles
it"; it stops the timed escalation of the alert. It is one record on the
``acks`` topic, keyed by alert id::

    {"alert_id": "lw-…", "by": "山田", "at": "2024-05-04T10:31:00+09:00",
     "via": "link" | "cli" | "console", "comment": "…"}

and one ``ack`` record on the audit topic (who, when, how).

Three ways to acknowledge:

* ``leakwatch ack ALERT_ID --by NAME [--comment TEXT]`` (this module's CLI);
* the link in every escalation mail: ``<public_url>/ack/<token>``, where the
  token is ``<alert_id>.<expiry>.<HMAC-SHA256(ack_secret, alert_id, expiry)>``.
  The token is the capability: GET shows a confirmation page (nothing
  changes, so link scanners and previews are harmless), POST records the ack
  and must carry the same token in its form body, so a cross-site form
  without the token cannot ack anything. Expired, forged and already-used
  tokens get a page saying so (410 / 403 / 409);
* the console (``via: console``), which uses :func:`publish_ack`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import html
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Any, Final, Protocol
from zoneinfo import ZoneInfo

import orjson

from streams.audit import AuditRecord, write_audit

__all__ = [
    "ALERT_ID_PATTERN",
    "VIAS",
    "AckBackend",
    "AckRecord",
    "TokenError",
    "ack_audit_record",
    "configure",
    "make_token",
    "publish_ack",
    "register_ack_view",
    "run",
    "verify_token",
]

VIAS: Final = ("link", "cli", "console")
ALERT_ID_PATTERN: Final = re.compile(r"^lw-[0-9a-f]{8}-[0-9a-f]{8}-[0-9a-f]{8}$")
_TWELVE_DIGITS: Final = re.compile(r"[0-9]{4}[ \-]?[0-9]{4}[ \-]?[0-9]{4}")
_MAX_NAME: Final = 100
_MAX_COMMENT: Final = 1000
_SIG_BYTES: Final = 20


@dataclass(frozen=True, slots=True)
class AckRecord:
    """One acknowledgment, as published on the acks topic."""

    alert_id: str
    by: str
    at: str
    via: str
    comment: str = ""

    def __post_init__(self) -> None:
        if not ALERT_ID_PATTERN.match(self.alert_id):
            raise ValueError(f"not an alert id: {self.alert_id!r}")
        if self.via not in VIAS:
            raise ValueError(f"via must be one of {', '.join(VIAS)}")
        check_text("by", self.by, _MAX_NAME, required=True)
        check_text("comment", self.comment, _MAX_COMMENT)
        if datetime.fromisoformat(self.at).tzinfo is None:
            raise ValueError("ack time must be timezone-aware")

    def to_json(self) -> bytes:
        return orjson.dumps(
            {"alert_id": self.alert_id, "by": self.by, "at": self.at, "via": self.via, "comment": self.comment},
            option=orjson.OPT_SORT_KEYS,
        )

    @classmethod
    def from_json(cls, raw: bytes) -> AckRecord:
        doc = orjson.loads(raw)
        return cls(doc["alert_id"], doc["by"], doc["at"], doc["via"], doc.get("comment") or "")


def check_text(name: str, value: str, limit: int, *, required: bool = False) -> None:
    """Reject empty (when required), overlong, control-character or personal-number-like input."""
    if required and not value.strip():
        raise ValueError(f"{name} is required")
    if len(value) > limit:
        raise ValueError(f"{name} is longer than {limit} characters")
    if any(ord(ch) < 32 and ch not in "\n\t" for ch in value):
        raise ValueError(f"{name} contains control characters")
    if _TWELVE_DIGITS.search(value):
        raise ValueError(f"{name} contains a 12-digit number; never write a personal number here")


def ack_audit_record(ack: AckRecord) -> AuditRecord:
    """The audit record of an acknowledgment."""
    detail: dict[str, Any] = {"comment": ack.comment} if ack.comment else {}
    return AuditRecord(
        action="ack",
        at=ack.at,
        actor=ack.by,
        via=ack.via,
        alert_ids=(ack.alert_id,),
        detail=detail,
        record_id=f"ack:{ack.alert_id}:{ack.at}",
    )


async def publish_ack(producer: Any, acks_topic: str, audit_topic: str, ack: AckRecord) -> None:
    """Produce the ack and its audit record; returns once the broker has both."""
    fut = await producer.send(acks_topic, value=ack.to_json(), key=ack.alert_id.encode())
    await write_audit(producer, audit_topic, [ack_audit_record(ack)])
    await fut


# --------------------------------------------------------------------------- tokens


class TokenError(ValueError):
    """An ack token that cannot be used: ``reason`` is malformed, forged or expired."""

    def __init__(self, reason: str, alert_id: str = "", expires: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.alert_id = alert_id
        self.expires = expires


def _signature(secret: bytes, alert_id: str, expires: int) -> str:
    mac = hmac.new(secret, f"leakwatch-ack\x1f{alert_id}\x1f{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:_SIG_BYTES]).rstrip(b"=").decode("ascii")


def make_token(secret: bytes, alert_id: str, expires: int) -> str:
    """The token of an ack link valid until ``expires`` (epoch seconds)."""
    if not ALERT_ID_PATTERN.match(alert_id):
        raise ValueError(f"not an alert id: {alert_id!r}")
    return f"{alert_id}.{expires}.{_signature(secret, alert_id, expires)}"


def verify_token(secret: bytes, token: str, now: float) -> tuple[str, int]:
    """``(alert_id, expires)`` of a genuine, unexpired token; else :class:`TokenError`."""
    parts = token.split(".")
    if len(parts) != 3 or not ALERT_ID_PATTERN.match(parts[0]) or not parts[1].isdigit():
        raise TokenError("malformed")
    alert_id, expires = parts[0], int(parts[1])
    if not hmac.compare_digest(parts[2], _signature(secret, alert_id, expires)):
        raise TokenError("forged", alert_id)
    if now >= expires:
        raise TokenError("expired", alert_id, expires)
    return alert_id, expires


# --------------------------------------------------------------------------- web


class AckBackend(Protocol):
    """What the ``/ack/<token>`` page needs from the running escalation service."""

    tz: tzinfo

    def ack_secret(self) -> bytes: ...
    def now(self) -> float: ...
    def ack_of(self, alert_id: str) -> AckRecord | None: ...
    def alert_summary(self, alert_id: str) -> dict[str, str] | None: ...
    async def record_ack(self, ack: AckRecord) -> AckRecord: ...


_PAGE_HEADERS: Final = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
}
_STYLE: Final = (
    "body{font-family:sans-serif;max-width:40em;margin:2em auto;line-height:1.6}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}"
    ".note{color:#555}.bad{color:#a00}"
)
_VIA_JA: Final = {"link": "メールのリンク", "cli": "コマンド", "console": "コンソール"}


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html><html lang="ja"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)} - leakwatch</title><style>{_STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )


def _summary_table(summary: dict[str, str] | None, alert_id: str) -> str:
    rows = [("アラートID", alert_id)]
    if summary:
        rows += [
            ("事案", summary.get("title", "")),
            ("重要度", summary.get("severity", "")),
            ("職員", summary.get("user", "")),
            ("日時", summary.get("when", "")),
        ]
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows if v)
    return f"<table>{cells}</table>"


def _acked_page(ack: AckRecord, tz: tzinfo, alert_id: str, summary: dict[str, str] | None) -> str:
    when = datetime.fromisoformat(ack.at).astimezone(tz).strftime("%Y-%m-%d %H:%M:%S %Z")
    comment = f"<p>コメント: {html.escape(ack.comment)}</p>" if ack.comment else ""
    return _page(
        "この事案は受領確認済みです",
        f"<p>{html.escape(ack.by)} さんが {html.escape(when)} に"
        f"{html.escape(_VIA_JA.get(ack.via, ack.via))}で受領を記録しています。"
        "このリンクは使用済みです。</p>"
        f"{comment}{_summary_table(summary, alert_id)}",
    )


def _error_page(error: TokenError, tz: tzinfo) -> tuple[str, int]:
    if error.reason == "expired":
        when = datetime.fromtimestamp(error.expires, tz).strftime("%Y-%m-%d %H:%M %Z")
        return (
            _page(
                "リンクの有効期限が切れています",
                f"<p class='bad'>この確認リンクは {html.escape(when)} に期限切れになりました。</p>"
                "<p>受領の記録は、担当者がコマンドで行えます:</p>"
                f"<pre>leakwatch ack {html.escape(error.alert_id)} --by 氏名 --comment \"…\"</pre>",
            ),
            410,
        )
    return (
        _page(
            "無効なリンクです",
            "<p class='bad'>このリンクは正しくありません（改変されたか、別の環境のものです）。"
            "受領は記録されていません。</p><p>メールのリンクをそのまま開いてください。</p>",
        ),
        403,
    )


def register_ack_view(app: Any, backend_of: Callable[[], AckBackend | None]) -> None:
    """Add ``/ack/{token}`` to a Faust app's web server.

    ``backend_of`` returns the running service, or None while it starts (503).
    """
    from faust.web import View

    @app.page("/ack/{token}", name="leakwatch-ack")
    class AckView(View):
        """GET: confirmation page; POST: record the acknowledgment."""

        def _reply(self, body: str, status: int = 200) -> Any:
            return self.html(body, status=status, headers=dict(_PAGE_HEADERS))

        def _starting(self) -> Any:
            return self._reply(
                _page("準備中です", "<p>監視サービスが起動中です。しばらくしてから再度開いてください。</p>"), 503
            )

        async def get(self, request: Any, token: str) -> Any:
            backend = backend_of()
            if backend is None:
                return self._starting()
            try:
                alert_id, expires = verify_token(backend.ack_secret(), token, backend.now())
            except TokenError as exc:
                body, status = _error_page(exc, backend.tz)
                return self._reply(body, status)
            summary = backend.alert_summary(alert_id)
            done = backend.ack_of(alert_id)
            if done is not None:
                return self._reply(_acked_page(done, backend.tz, alert_id, summary), 409)
            until = datetime.fromtimestamp(expires, backend.tz).strftime("%Y-%m-%d %H:%M %Z")
            form = (
                f"<p>以下のリスク事案について、受領（確認して対応すること）を記録します。"
                f"記録すると時間経過による上申は止まります。</p>{_summary_table(summary, alert_id)}"
                '<form method="post">'
                f'<input type="hidden" name="token" value="{html.escape(token)}">'
                '<p><label>氏名（必須）<br><input name="by" required maxlength="100"></label></p>'
                '<p><label>コメント<br><textarea name="comment" rows="3" cols="50" maxlength="1000">'
                "</textarea></label></p>"
                '<p><button type="submit">受領を記録する</button></p></form>'
                f"<p class='note'>このリンクの有効期限: {html.escape(until)}。"
                "個人番号や住民の氏名は入力しないでください。</p>"
            )
            return self._reply(_page("リスク事案の受領確認", form))

        async def post(self, request: Any, token: str) -> Any:
            backend = backend_of()
            if backend is None:
                return self._starting()
            form = await request.post()
            if not hmac.compare_digest(str(form.get("token", "")), token):
                return self._reply(
                    _page("確認できませんでした", "<p class='bad'>フォームに確認リンクのトークンがありません。"
                          "メールのリンクを開き、表示されたページから送信してください。</p>"),
                    400,
                )
            try:
                alert_id, _ = verify_token(backend.ack_secret(), token, backend.now())
            except TokenError as exc:
                body, status = _error_page(exc, backend.tz)
                return self._reply(body, status)
            summary = backend.alert_summary(alert_id)
            done = backend.ack_of(alert_id)
            if done is not None:
                return self._reply(_acked_page(done, backend.tz, alert_id, summary), 409)
            now = datetime.fromtimestamp(backend.now(), backend.tz)
            try:
                ack = AckRecord(
                    alert_id=alert_id,
                    by=str(form.get("by", "")).strip(),
                    at=now.isoformat(timespec="seconds"),
                    via="link",
                    comment=str(form.get("comment", "")).strip(),
                )
            except ValueError as exc:
                return self._reply(
                    _page("入力を確認してください", f"<p class='bad'>{html.escape(_ja_input_error(exc))}</p>"
                          "<p>ブラウザの「戻る」で入力し直してください。</p>"),
                    400,
                )
            recorded = await backend.record_ack(ack)
            if recorded is not ack:  # somebody else was first
                return self._reply(_acked_page(recorded, backend.tz, alert_id, summary), 409)
            when = now.strftime("%Y-%m-%d %H:%M:%S %Z")
            return self._reply(
                _page(
                    "受領を記録しました",
                    f"<p>{html.escape(ack.by)} さんの受領を {html.escape(when)} に記録しました。"
                    "時間経過による上申は停止しました。この記録は監査ログに残ります。</p>"
                    f"{_summary_table(summary, alert_id)}",
                )
            )


def _ja_input_error(exc: ValueError) -> str:
    text = str(exc)
    if "12-digit" in text:
        return "12桁の数字（個人番号の可能性）は入力できません。"
    if "required" in text:
        return "氏名を入力してください。"
    if "longer" in text:
        return "入力が長すぎます。"
    return "入力に使えない文字が含まれています。"


# --------------------------------------------------------------------------- CLI


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``leakwatch ack``."""
    parser.add_argument("alert_id", metavar="ALERT_ID", help="the alert to acknowledge (lw-…)")
    parser.add_argument("--by", required=True, metavar="NAME", help="who acknowledges (your name)")
    parser.add_argument("--comment", default="", help="what you are doing about it")
    parser.add_argument("--via", choices=("cli", "console"), default="cli", help=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE", help="worker config file (default: $LEAKWATCH_CONFIG)")
    parser.add_argument("--brokers", help="Kafka bootstrap servers (default: from the config)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for Kafka")


async def _produce(client_args: dict[str, Any], acks_topic: str, audit_topic: str, ack: AckRecord, timeout: float) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(acks="all", request_timeout_ms=int(timeout * 1000), **client_args)
    await asyncio.wait_for(producer.start(), timeout)
    try:
        await asyncio.wait_for(publish_ack(producer, acks_topic, audit_topic, ack), timeout)
    finally:
        await producer.stop()


def run(args: argparse.Namespace, now: Callable[[], float] | None = None) -> int:
    """Run ``leakwatch ack``; 0 when the ack is on the topic."""
    import time

    from streams.config import ConfigError, Settings, load_settings

    overrides = {"brokers": args.brokers} if args.brokers else None
    try:
        settings = load_settings(Settings, config_file=args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"leakwatch ack: {exc}", file=sys.stderr)
        return 2
    tz = ZoneInfo(settings.tz)
    at = datetime.fromtimestamp((now or time.time)(), UTC).astimezone(tz)
    try:
        ack = AckRecord(args.alert_id, args.by.strip(), at.isoformat(timespec="seconds"), args.via, args.comment.strip())
    except ValueError as exc:
        print(f"leakwatch ack: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_produce(settings.kafka_client_args(), settings.topic_acks, settings.topic_audit, ack, args.timeout))
    except Exception as exc:
        print(f"leakwatch ack: could not record the ack on {settings.brokers}: {exc!r}", file=sys.stderr)
        return 1
    print(f"受領を記録しました: {ack.alert_id}（{ack.by}、{at.strftime('%Y-%m-%d %H:%M:%S %Z')}）")
    return 0

