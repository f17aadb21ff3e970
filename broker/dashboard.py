"""The hub's HTTPS face: ``/metrics`` (Prometheus, bearer token) and the dashboard.

Served on the built-in gateway's port (``Gateway.http``) and, with ``hub up --port``, on
the single port (``Route.HTTP`` of the front door); ``devstreams.observe.http`` says why
this is not websockets' ``process_request``.  The decisions are pure (broker/webauth.py:
tickets, sessions, CSRF; broker/webview.py: routes, pages, filters, chart history); this
module reads the hub's state and files and carries them out.

Files in the data dir:

- ``keys/metrics.token``: the bearer token of ``/metrics`` (0600, made on first use;
  ``devstreams hub metrics-token`` prints it);
- ``dashboard-logins/<sha256 of a login token>``: one-time login tickets made by
  ``devstreams hub dashboard-url`` (0600, in a 0700 directory), holding the time they were
  made; the hub deletes a ticket when it is used (so only one login succeeds) and accepts it
  within ``dashboard_login_ttl``.  Expired tickets are removed when a new one is made or used.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from importlib import resources
from pathlib import Path

from devstreams.observe.http import HttpServer, Request, Response, metrics_answer
from devstreams.observe.metrics import CONTENT_TYPE, Metrics, StateCollector
from devstreams.wire.events import StreamClosed
from devstreams.wire.frontdoor import Route as DoorRoute
from devstreams.wire.topics import Role

from . import access, webauth, webview
from .datadir import bearer_token, write_private
from .registry import ADMIN_OPERATOR

log = logging.getLogger(__name__)

METRICS_TOKEN_FILE = "metrics.token"
TICKETS_DIR = "dashboard-logins"
MAX_TICKETS = 1000    # tickets kept at once (expired ones are removed first)
SECURITY_HEADERS = [("content-security-policy", "default-src 'self'; script-src 'self'; style-src 'self'; "
                                                "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'"),
                    ("x-frame-options", "DENY"), ("referrer-policy", "no-referrer")]


# -- tokens and tickets in the data dir -----------------------------------------------------------

def metrics_token(data_dir: Path) -> str:
    """The bearer token of ``/metrics``: 43 URL-safe characters in keys/metrics.token (0600), made on first use."""
    return bearer_token(Path(data_dir) / "keys" / METRICS_TOKEN_FILE, min_length=16)


def _tickets(data_dir: Path) -> Path:
    path = Path(data_dir) / TICKETS_DIR
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _prune(folder: Path, now: float, ttl: float) -> None:
    try:
        names = sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime)
    except OSError:
        return
    for n, path in enumerate(names):
        try:
            if len(names) - n > MAX_TICKETS or not webauth.ticket_valid(float(path.read_text()), now, ttl):
                path.unlink(missing_ok=True)
        except (OSError, ValueError):
            path.unlink(missing_ok=True)


def issue_login(data_dir: Path, now: float, ttl: float, operator: str = ADMIN_OPERATOR) -> str:
    """A new one-time login token (for ``hub dashboard-url``); its ticket (when, whose view) is left for the hub."""
    folder = _tickets(data_dir)
    _prune(folder, now, ttl)
    token = webauth.new_token()
    write_private(folder / webauth.ticket_name(token), f"{now!r} {operator}".encode())
    return token


def consume_login(data_dir: Path, token: str | None, now: float, ttl: float) -> str | None:
    """Use up ``token``'s ticket: the operator whose view it opens, once, within ``ttl`` of its making;
    None for a malformed, unknown, used or expired token."""
    if not webauth.well_formed(token):
        return None
    path = _tickets(data_dir) / webauth.ticket_name(token)
    try:
        made, _, operator = path.read_text()[:120].partition(" ")
        path.unlink()     # the one request that removes it wins; a second use finds nothing
        made_at = float(made)
    except (OSError, ValueError):
        return None
    if not webauth.ticket_valid(made_at, now, ttl):
        return None
    return operator.strip() or ADMIN_OPERATOR


# -- the server -----------------------------------------------------------------------------------

class HubWeb:
    """The hub's metrics, sessions and pages; ``attach`` it once the gateway runs, ``start`` with the controller."""

    def __init__(self, hub):
        self.hub = hub
        s = hub.settings
        self.metrics = Metrics()
        self.sessions = webauth.Sessions(s.dashboard_session_ttl, s.dashboard_max_sessions)
        self.history = webview.History()
        self.server = HttpServer(self.handle, max_header_bytes=s.http_max_header_bytes,
                                 max_body_bytes=s.http_max_body_bytes, max_connections=s.http_max_connections,
                                 request_timeout=max(30.0, s.dashboard_refresh * 3))
        self.token = ""
        self._sampler: asyncio.Task | None = None
        self._static: dict[str, bytes] = {}
        StateCollector(self.metrics, self.state)

    def attach(self, routes: dict) -> None:
        """Serve on the built-in gateway's listener and on the single port (if either exists)."""
        self.token = metrics_token(self.hub.data_dir)
        if self.hub.gateway is not None:
            self.hub.gateway.http = self.server
            # Built-in gateway: opened streams and refusals.  Its StreamClosed reaches the controller,
            # which emits its own (for every gateway, standalone ones too): counted there, once.
            self.hub.gateway.events.subscribe(
                lambda event: None if isinstance(event, StreamClosed) else self.metrics.on_event(event))
        gate = getattr(self.hub.broker, "gate", None)
        if gate is not None:
            gate.events.subscribe(self.metrics.on_event)
        routes[DoorRoute.HTTP] = self.server.protocol_factory

    def start(self) -> None:
        """With the controller made (before it connects): count its events, sample the charts."""
        self.hub.controller.events.subscribe(self.metrics.on_event)
        self._sampler = asyncio.ensure_future(self._sample())
        where = self.endpoints()
        if where["dashboard"]:
            log.info("dashboard on %s (log in: devstreams hub dashboard-url), metrics on %s (bearer token: "
                     "devstreams hub metrics-token)", where["dashboard"], where["metrics"])

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
        await self.server.stop()

    def endpoints(self) -> dict:
        """Where the dashboard and /metrics are, for hub.json and 'hub show' (None without a listener)."""
        host = self.hub.settings.advertised_host()
        if self.hub.front_door is not None:
            port = self.hub.front_door.sockets[0].getsockname()[1]
        elif self.hub.gateway is not None:
            port = self.hub.gateway.port
        else:
            return {"dashboard": None, "metrics": None}
        return {"dashboard": f"https://{host}:{port}/", "metrics": f"https://{host}:{port}/metrics"}

    # -- state ------------------------------------------------------------------------------------

    def state(self) -> dict:
        hub = self.hub
        out: dict = {}
        if hub.registry is not None:
            out["devices"] = hub.registry.count()
        if hub.controller is not None:
            out["devices_online"] = len(hub.controller.online_devices)
            out["open_streams"] = hub.controller.open_streams
            rows = hub.open_streams()
            out["live_bytes"] = (sum(r["bytes_to_device"] or 0 for r in rows),
                                 sum(r["bytes_to_service"] or 0 for r in rows))
        gate = getattr(hub.broker, "gate", None)
        if gate is not None:
            out["connections"] = {role.value: len(gate.connected(role)) for role in Role}
        return out

    def _bytes_total(self, state: dict) -> int:
        live = state.get("live_bytes", (0, 0))
        return self.metrics.closed_bytes["to_device"] + self.metrics.closed_bytes["to_service"] + sum(live)

    async def _sample(self) -> None:
        while True:
            try:
                state = self.state()
                self.history.add(time.time(), state.get("open_streams", 0), self._bytes_total(state))
            except Exception:
                log.exception("dashboard chart sample failed")
            await asyncio.sleep(self.hub.settings.dashboard_chart_interval)

    # -- requests ---------------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        where = webview.route(request.method, request.path)
        if where.name == "metrics":
            return metrics_answer(request, self.token, self.metrics.text, CONTENT_TYPE)
        if where.name == "static":
            return self._static_file(where.arg)
        if where.name == "login":
            return self._login(request)
        now = time.time()
        session = self.sessions.get(webauth.cookie_value(request.headers.get("cookie")), now)
        if session is not None and session.read_only and self._operator(session, now) is None:
            self.sessions.end(session.id)   # the operator was removed, disabled or expired: so is its view
            session = None
        if where.session and session is None:
            if request.path.startswith("/api/") or request.method == "POST":
                return Response.text(401, "log in first: open the URL 'devstreams hub dashboard-url' prints")
            return self._html(401, webview.message_html(
                "Log in to the devstreams hub", "Open the one-time URL this command prints on the hub's machine:"))
        if where.name == "not-found":
            return Response.text(404, f"nothing at {request.path[:80]}")
        if where.name == "method":
            return Response.text(405, f"{request.method} is not served at {request.path[:80]}")
        if request.method == "POST" and not session.csrf_ok(request.headers.get("x-csrf-token")):
            return Response.text(403, "missing or wrong X-CSRF-Token: reload the page")
        return getattr(self, "_" + where.name)(request, session, where.arg, now)

    def _login(self, request: Request) -> Response:
        s = self.hub.settings
        now = time.time()
        operator = consume_login(self.hub.data_dir, request.query.get("token"), now, s.dashboard_login_ttl)
        if operator is None or access.standing(self.hub.registry.operator(operator), operator, now) is not None:
            log.info("dashboard: refused a login link (unknown, used or expired, or its operator is gone)")
            return self._html(401, webview.message_html(
                "This login link is not valid", "It was used already, has expired or was never issued. "
                "Run this on the hub's machine for a new one:"))
        session = self.sessions.start(now, scope=self.hub.registry.operator(operator).name)
        log.info("dashboard: new session for %s (%d open)", session.scope, len(self.sessions))
        return Response(303, b"", headers=[("location", "/"), ("set-cookie", webauth.set_cookie(session.id, s.dashboard_session_ttl)),
                                           ("referrer-policy", "no-referrer")])

    def _logout(self, request, session, arg, now) -> Response:
        self.sessions.end(session.id)
        return Response(204, b"", headers=[("set-cookie", webauth.clear_cookie())])

    def _page(self, request, session, arg, now) -> Response:
        s = self.hub.settings
        devices = self._scoped_devices(session, now)
        return self._html(200, webview.page_html(csrf=session.csrf, refresh_s=s.dashboard_refresh,
                                                 summary=self._summary(session, now, devices=devices),
                                                 devices=self._devices_page(request.query, devices),
                                                 view=session.scope, read_only=session.read_only))

    def _state(self, request, session, arg, now) -> Response:
        rows = self._visible_streams(session)
        chart = self.history.series() if not session.read_only else []   # no hub-wide totals for an operator
        return self._json({"summary": self._summary(session, now, streams=rows),
                           "streams": webview.stream_rows(rows, now), "chart": chart, "time": now,
                           "read_only": session.read_only})

    def _devices(self, request, session, arg, now) -> Response:
        page = self._devices_page(request.query, self._scoped_devices(session, now))
        return self._json(page | {"html": webview.device_rows_html(page)})

    def _activity(self, request, session, arg, now) -> Response:
        q = request.query
        rows = self.hub.registry.activity(limit=webview.ACTIVITY_ROWS,
                                          operator=session.scope if session.read_only else None)
        return self._json({"rows": webview.activity_rows(rows, q.get("device", ""), q.get("operator", ""),
                                                         q.get("outcome", ""))})

    def _close(self, request, session, stream_id, now) -> Response:
        rows = {r["stream_id"]: r for r in self.hub.open_streams()}
        row = rows.get(stream_id)
        if row is None:
            return Response.text(404, f"no open stream {stream_id[:64]}")
        if not session.may_close(row):
            return Response.text(403, "this session may not close that stream")
        log.info("dashboard: closing stream %s (%s/%s)", stream_id[:8], row["device"], row["name"])
        self.hub.controller.close_stream(stream_id, "stream closed by an operator (dashboard)")
        return self._json({"closed": stream_id})

    def _summary(self, session, now: float, *, devices: list | None = None, streams: list | None = None) -> dict:
        """Devices, online and open streams the session may see (``devices``/``streams``: already read)."""
        controller = self.hub.controller
        online = controller.online_devices if controller is not None else set()
        if session.read_only:
            devices = self._scoped_devices(session, now) if devices is None else devices
            streams = self._visible_streams(session) if streams is None else streams
            return {"devices": len(devices), "online": sum(d.id in online for d in devices),
                    "open_streams": len(streams)}
        return {"devices": self.hub.registry.count(), "online": len(online),
                "open_streams": controller.open_streams if controller is not None else 0}

    def _visible_streams(self, session) -> list[dict]:
        """The open streams a session may see: all for admin, its own for an operator."""
        rows = self.hub.open_streams()
        return [r for r in rows if r.get("operator") == session.scope] if session.read_only else rows

    def _operator(self, session, now: float):
        """The session's operator while it may still log in (None: removed, disabled, expired)."""
        operator = self.hub.registry.operator(session.scope)
        return operator if access.standing(operator, session.scope, now) is None else None

    def _scoped_devices(self, session, now: float) -> list:
        """The devices a session may see: all for admin, the operator's scope otherwise."""
        devices = self.hub.registry.all()
        if not session.read_only:
            return devices
        operator = self._operator(session, now)
        if operator is None:     # gone meanwhile: nothing
            return []
        return [d for d in devices if access.device_in_scope(operator.devices, d.id, d.tags)]

    def _devices_page(self, query: dict, devices: list) -> dict:
        online = self.hub.controller.online_devices if self.hub.controller is not None else set()
        return webview.device_page(devices, online, query.get("q", ""),
                                   webview.page_number(query.get("page")), self.hub.settings.dashboard_page_size)

    def _static_file(self, name: str) -> Response:
        if name not in self._static:
            self._static[name] = resources.files("broker").joinpath("dashboard_static", name).read_bytes()
        return Response(200, self._static[name], content_type=webview.STATIC_FILES[name])

    @staticmethod
    def _html(status: int, text: str) -> Response:
        return Response(status, text.encode(), content_type="text/html; charset=utf-8", headers=list(SECURITY_HEADERS))

    @staticmethod
    def _json(doc: dict) -> Response:
        return Response(200, json.dumps(doc, separators=(",", ":")).encode(), content_type="application/json")
