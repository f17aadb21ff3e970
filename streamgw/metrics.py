"""A standalone gateway's own ``/metrics`` (``devstreams gateway up --metrics-token-file F``).

The gateway's events (stream opened/closed, sockets refused) feed the shared mapping of
``devstreams.observe.metrics``; open streams and their live byte counts are read at scrape
time.  Served on the gateway's listener beside the stream upgrades (``Gateway.http``).
"""

from devstreams.observe.http import HttpServer, Request, Response, metrics_answer
from devstreams.observe.metrics import CONTENT_TYPE, Metrics, StateCollector
from devstreams.wire.frontdoor import METRICS_PATH


def serve_metrics(gateway, token: str) -> Metrics:
    """Count ``gateway``'s events and answer ``GET /metrics`` with ``Authorization: Bearer <token>``."""
    metrics = Metrics()
    gateway.events.subscribe(metrics.on_event)

    def state() -> dict:
        rows = gateway.open_streams()
        return {"open_streams": len(rows),
                "live_bytes": (sum(r["bytes_to_device"] or 0 for r in rows),
                               sum(r["bytes_to_service"] or 0 for r in rows))}
    StateCollector(metrics, state)

    async def handle(request: Request) -> Response:
        if request.path != METRICS_PATH:
            return Response.text(404, "this gateway serves /metrics and stream upgrades only")
        return metrics_answer(request, token, metrics.text, CONTENT_TYPE)

    gateway.http = HttpServer(handle, request_timeout=gateway.settings.open_timeout)
    return metrics
