"""The dashboard's decisions and pages, without I/O: routes, paging, filters, chart history, HTML.

broker/dashboard.py (``HubWeb``) reads the hub's state and calls these; tests call them
directly.  Every list a page shows is bounded (a page of devices, the last 200 activity
rows, 360 chart points), so a page's size does not grow with the fleet.
"""

from __future__ import annotations

import html
import math
from collections import deque
from dataclasses import dataclass

ACTIVITY_ROWS = 200          # the dashboard's "recent activity"
CHART_POINTS = 360           # one hour at the default dashboard_chart_interval of 10 s
MAX_FILTER = 100             # characters of a filter box that are used
STATIC_FILES = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}


# -- routes ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Route:
    name: str          # page, login, logout, metrics, static, state, devices, activity, close, not-found, method
    arg: str = ""      # the static file's name, or the stream id to close
    session: bool = True   # needs a dashboard session


def route(method: str, path: str) -> Route:
    """What a request is for; ``method`` not allowed there -> Route("method")."""
    get = method in ("GET", "HEAD")
    if path == "/metrics":
        return Route("metrics", session=False) if get else Route("method", session=False)
    if path == "/login":
        return Route("login", session=False) if get else Route("method", session=False)
    if path.startswith("/static/"):
        name = path[len("/static/"):]
        if name not in STATIC_FILES:
            return Route("not-found", session=False)
        return Route("static", name, session=False) if get else Route("method", session=False)
    if path == "/favicon.ico":
        return Route("not-found", session=False)
    if path == "/logout":
        return Route("logout") if method == "POST" else Route("method")
    if path.startswith("/api/streams/") and path.endswith("/close"):
        stream_id = path[len("/api/streams/"):-len("/close")]
        if not stream_id or "/" in stream_id or len(stream_id) > 64:
            return Route("not-found")
        return Route("close", stream_id) if method == "POST" else Route("method")
    simple = {"/": "page", "/api/state": "state", "/api/devices": "devices", "/api/activity": "activity"}
    if path in simple:
        return Route(simple[path]) if get else Route("method")
    return Route("not-found", session=path.startswith("/api/"))


# -- devices --------------------------------------------------------------------------------------

def tags_of(device) -> dict:
    """A device's tags if the registry has them (another issue adds them), else none."""
    tags = getattr(device, "tags", None) or {}
    return dict(tags) if isinstance(tags, dict) else {}


def device_row(device, online: set[str]) -> dict:
    return {"id": device.id, "online": device.id in online, "enabled": bool(device.enabled),
            "last_seen": device.last_seen, "tags": tags_of(device)}


def device_page(devices: list, online: set[str], query: str = "", page: int = 1, size: int = 50) -> dict:
    """One page of the devices matching ``query`` (substring of the id or of a tag ``k=v``), online first."""
    q = (query or "")[:MAX_FILTER].strip().lower()
    if q:
        devices = [d for d in devices if q in d.id.lower()
                   or any(q in f"{k}={v}".lower() for k, v in tags_of(d).items())]
    devices = sorted(devices, key=lambda d: (d.id not in online, d.id))
    pages = max(1, math.ceil(len(devices) / size))
    page = min(max(1, page), pages)
    rows = [device_row(d, online) for d in devices[(page - 1) * size: page * size]]   # only this page's rows
    return {"rows": rows, "page": page, "pages": pages, "total": len(devices), "query": q}


def page_number(text: str | None) -> int:
    return int(text) if text and text.isdigit() and len(text) < 7 else 1


# -- streams and activity -------------------------------------------------------------------------

def stream_rows(rows: list[dict], now: float) -> list[dict]:
    """``Hub.open_streams()`` rows as the page shows them (operator: the service that asked, if known)."""
    out = []
    for row in rows:
        out.append({"stream_id": row["stream_id"], "device": row["device"], "name": row["name"],
                    "state": row.get("state", ""), "operator": row.get("operator", "") or row.get("service") or "",
                    "age_s": round(max(0.0, now - (row.get("created") or now)), 1),
                    "bytes_to_device": row.get("bytes_to_device") or 0,
                    "bytes_to_service": row.get("bytes_to_service") or 0})
    out.sort(key=lambda r: -r["age_s"])
    return out


def activity_rows(rows: list[dict], device: str = "", operator: str = "", outcome: str = "") -> list[dict]:
    """The activity rows matching each non-empty filter (substring, case-insensitive), newest first."""
    wanted = [(k, (v or "")[:MAX_FILTER].strip().lower()) for k, v in
              (("device", device), ("operator", operator), ("outcome", outcome))]
    out = []
    for row in reversed(rows):
        shown = {**row, "operator": row.get("operator", "") or "",
                 "outcome": row.get("outcome") or (row.get("reason") and "closed") or ""}
        if all(not v or v in str(shown.get(k) or "").lower() for k, v in wanted):
            out.append(shown)
    return out[:ACTIVITY_ROWS]


# -- charts ---------------------------------------------------------------------------------------

class History:
    """The last hour of (time, open streams, bytes relayed so far): what the charts draw."""

    def __init__(self, capacity: int = CHART_POINTS):
        self._points: deque[tuple[float, int, int]] = deque(maxlen=capacity)

    def add(self, now: float, open_streams: int, bytes_total: int) -> None:
        self._points.append((now, open_streams, bytes_total))

    def series(self) -> list[dict]:
        """Points with throughput (bytes/s since the previous point; 0 for the first)."""
        out = []
        prev = None
        for t, streams, total in self._points:
            rate = (max(0, total - prev[2]) / (t - prev[0])) if prev and t > prev[0] else 0.0
            out.append({"t": t, "streams": streams, "bps": round(rate, 1)})
            prev = (t, streams, total)
        return out


# -- HTML -----------------------------------------------------------------------------------------

def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _table(id_: str, headings: list[str], body: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headings)
    return f'<table id="{id_}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def device_rows_html(page: dict) -> str:
    out = []
    for r in page["rows"]:
        tags = " ".join(f"{k}={v}" for k, v in sorted(r["tags"].items()))
        status = "online" if r["online"] else "offline" if r["enabled"] else "disabled"
        out.append(f'<tr data-device="{_e(r["id"])}"><td>{_e(r["id"])}</td>'
                   f'<td class="{"on" if r["online"] else "off"}">{status}</td>'
                   f'<td class="time" data-t="{_e(r["last_seen"] or "")}"></td><td>{_e(tags)}</td></tr>')
    return "".join(out)


def page_html(*, csrf: str, refresh_s: float, summary: dict, devices: dict, view: str = "admin",
              read_only: bool = False) -> str:
    """The dashboard, its summary and first page of devices server-rendered; dashboard.js fills the
    streams, activity and charts at once and keeps everything fresh by polling /api/*.

    ``view``: whose view (an operator's is read-only: its devices, streams and activity, no Close)."""
    who = f"operator {view}, read-only" if read_only else "admin"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>devstreams hub</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="csrf-token" content="{_e(csrf)}"><meta name="refresh-ms" content="{int(refresh_s * 1000)}">
<meta name="read-only" content="{'yes' if read_only else 'no'}">
<link rel="stylesheet" href="/static/dashboard.css"></head>
<body>
<header><h1>devstreams hub</h1><span id="view">{_e(who)}</span> <span id="summary">{_e(summary_text(summary))}</span>
<button id="logout" type="button">log out</button></header>
<section id="charts"><figure><figcaption>open streams (last hour)</figcaption><svg id="chart-streams" viewBox="0 0 300 80" preserveAspectRatio="none"></svg></figure>
<figure><figcaption>throughput, bytes/s (last hour)</figcaption><svg id="chart-throughput" viewBox="0 0 300 80" preserveAspectRatio="none"></svg></figure></section>
<section><h2>Open streams</h2>
{_table("streams", ["device", "stream", "operator", "state", "age", "to device", "to service", ""], "")}</section>
<section><h2>Devices</h2>
<input id="device-filter" type="search" maxlength="{MAX_FILTER}" placeholder="filter by id or tag (k=v)" value="{_e(devices["query"])}">
{_table("devices", ["device", "status", "last seen", "tags"], device_rows_html(devices))}
<div id="pager"><button id="prev" type="button">&lt;</button> <span id="page-info">page {devices["page"]} of {devices["pages"]} ({devices["total"]} devices)</span> <button id="next" type="button">&gt;</button></div></section>
<section><h2>Recent activity</h2>
<div class="filters"><input id="activity-device" maxlength="{MAX_FILTER}" placeholder="device">
<input id="activity-operator" maxlength="{MAX_FILTER}" placeholder="operator">
<input id="activity-outcome" maxlength="{MAX_FILTER}" placeholder="outcome"></div>
{_table("activity", ["time", "device", "stream", "operator", "outcome", "reason"], "")}</section>
<script src="/static/dashboard.js"></script>
</body></html>
"""


def summary_text(summary: dict) -> str:
    return (f"{summary.get('devices', 0)} devices, {summary.get('online', 0)} online, "
            f"{summary.get('open_streams', 0)} open streams")


def message_html(title: str, text: str) -> str:
    """The page without a session (or with a bad link): what to do next."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<link rel="stylesheet" href="/static/dashboard.css"></head>
<body><main class="message"><h1>{_e(title)}</h1><p>{_e(text)}</p>
<pre>devstreams hub dashboard-url</pre></main></body></html>
"""
