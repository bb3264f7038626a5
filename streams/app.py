"""The Faust application of a leakwatch worker.

Faust hosts what it is good at: the web server (``/metrics``, ``/healthz``,
``/readyz``) and low-volume agents (escalation, acknowledgments), which
other modules add through :data:`EXTENSIONS`: each listed module that can be
imported gets ``register(app, settings)`` called. The detection hot path is
not a Faust agent (see :mod:`streams.detection`): it runs as a
:class:`DetectionService`, a dependency of the app started together with it
(without waiting for Faust's own consumer group) and stopped after it, so on
SIGTERM the in-flight batch finishes and is checkpointed and committed.
"""

from __future__ import annotations

import asyncio
import importlib
import tempfile
from typing import Any, Final

import faust
import mode
import orjson
from faust.web import Request, Response, View

from streams import metrics
from streams.config import Settings
from streams.detection import DetectionLoop
from streams.logging import get_logger

__all__ = ["EXTENSIONS", "DetectionService", "app_id", "create_app", "faust_broker_args"]

#: Modules that add agents/views to the app: ``register(app, settings)``.
EXTENSIONS: Final = ("streams.escalation", "streams.console")

_log = get_logger("leakwatch.app")
#: What ``generate_latest`` writes (aiohttp refuses a charset parameter here; UTF-8 is the format's default).
_METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4"


def app_id(settings: Settings) -> str:
    """Faust's app id (its consumer group): distinct from the detection group."""
    return f"{settings.group_id}-app"


def faust_broker_args(settings: Settings) -> dict[str, Any]:
    """``broker`` and ``broker_credentials`` for faust.App from the core settings."""
    urls = [f"kafka://{host.strip()}" for host in settings.brokers.split(",") if host.strip()]
    args: dict[str, Any] = {"broker": urls}
    proto = settings.security_protocol
    if proto == "PLAINTEXT":
        return args
    ssl_context = None
    if proto in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        ssl_context = create_ssl_context(
            cafile=settings.ssl_cafile or None, certfile=settings.ssl_certfile or None, keyfile=settings.ssl_keyfile or None
        )
    if proto == "SSL":
        args["broker_credentials"] = faust.SSLCredentials(ssl_context)
    else:
        args["broker_credentials"] = faust.SASLCredentials(
            username=settings.sasl_username,
            password=settings.sasl_password,
            ssl_context=ssl_context,
            mechanism=settings.sasl_mechanism,
        )
    return args


class DetectionService(mode.Service):
    """Runs a :class:`DetectionLoop` for as long as the app runs."""

    def __init__(self, detection: DetectionLoop, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.detection = detection
        self._task: asyncio.Future[None] | None = None

    async def on_start(self) -> None:
        """Start the loop in the background (it connects and retries on its own)."""
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            await self.detection.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _log.error("detection loop failed", error=str(exc), error_type=type(exc).__name__)
            await self.crash(exc)

    async def on_stop(self) -> None:
        """Let the in-flight batch finish, checkpoint and commit, then return."""
        self.detection.request_stop()
        if self._task is not None and not self._task.done():
            await asyncio.shield(self._task)


def _json(view: View, doc: dict[str, Any], status: int = 200) -> Response:
    return view.bytes(orjson.dumps(doc), content_type="application/json", status=status)


def create_app(settings: Settings, *, detection: DetectionLoop | None = None) -> faust.App:
    """The worker's Faust app: web views, extensions and the detection service.

    The detection loop is reachable as ``app.leakwatch_detection``.
    """
    datadir = settings.data_dir or tempfile.mkdtemp(prefix="leakwatch-faust-")
    app = faust.App(
        app_id(settings),
        **faust_broker_args(settings),
        web_enabled=True,
        web_host=settings.web_host,
        web_bind=settings.web_host,
        web_port=settings.web_port,
        datadir=datadir,
        autodiscover=False,
        topic_replication_factor=settings.replication_factor,
        broker_session_timeout=10.0,
        broker_heartbeat_interval=3.0,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        store="memory://",
    )
    loop = detection if detection is not None else DetectionLoop(settings)
    service = DetectionService(loop)
    app.add_dependency(service)
    app.leakwatch_detection = loop  # type: ignore[attr-defined]
    app.leakwatch_settings = settings  # type: ignore[attr-defined]

    @app.page("/metrics")
    class MetricsView(View):
        """Prometheus text exposition of :mod:`streams.metrics`."""

        async def get(self, request: Request) -> Response:
            return self.bytes(metrics.render(), content_type=_METRICS_CONTENT_TYPE)

    @app.page("/healthz")
    class HealthView(View):
        """200 while the process runs."""

        async def get(self, request: Request) -> Response:
            return _json(self, {"status": "ok", "worker": loop.worker_name})

    @app.page("/readyz")
    class ReadyView(View):
        """200 when partitions are assigned and restored and the broker is reachable."""

        async def get(self, request: Request) -> Response:
            state = loop.readiness()
            return _json(self, state, 200 if state["ready"] else 503)

    for name in EXTENSIONS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            _log.warning("extension not installed, skipped", extension=name)
            continue
        register = getattr(module, "register", None)
        if register is None:
            _log.warning("extension has no register(app, settings), skipped", extension=name)
            continue
        register(app, settings)
        _log.info("extension registered", extension=name)
    return app
