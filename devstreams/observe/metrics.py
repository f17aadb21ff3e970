"""Prometheus metrics from events: the mapping, no I/O.

Counters and the latency histogram move only when an event arrives (``Metrics.on_event``);
values that are state, not history (devices online, open streams, connections by role)
are read at scrape time by a collector the owner adds (``StateCollector``).  Every label
value is one of a small fixed set (the ``*_label`` functions): a free-text reason from a
client or a device never becomes a label, so the number of series stays bounded.

Each hub or gateway has its own ``CollectorRegistry`` (not prometheus_client's global one):
two hubs in one process (the tests) must not share counters.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from devstreams.wire.events import GatewayRefused, LoginRefused, StreamClosed, StreamOpened

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Stream setup latency: request received -> the service is answered (ms in events, s here).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# (pattern in the reason text, label), first match wins.  The texts are the gateway's and the
# negotiation core's own (streamgw/relay.py, broker/negotiation.py, broker/limits.py).
_CLOSE_REASONS = [
    (r"closed the stream$", "closed"),
    (r"aborted", "aborted"),
    (r"connection lost|peer connection lost", "lost"),
    (r"did not connect|never (came|connected)|did not join", "no-show"),
    (r"maximum lifetime", "lifetime"),
    (r"shutting down", "shutdown"),
    (r"closed by an operator|disabled|removed|key rotated|revoked|rotated", "revoked"),
]
_LIMITS = [
    (r"^operator \S+'s limit of \S+ concurrent streams", "operator_max_streams"),
    (r"^operator \S+'s limit of \S+ new streams per second", "operator_max_new_streams_per_second"),
    (r"concurrent streams", "max_concurrent_streams"),
    (r"max_pending_per_device", "max_pending_per_device"),
    (r"new streams per second", "max_new_streams_per_second"),
    (r"service_requests_per_second", "service_requests_per_second"),
    (r"at capacity", "gateway_capacity"),
]
_GATEWAY_REFUSALS = [
    (r"missing Authorization", "missing-token"),
    (r"missing or oversized bearer", "missing-token"),
    (r"expired", "token-expired"),
    (r"another gateway", "wrong-gateway"),
    (r"another stream", "wrong-stream"),
    (r"signature", "bad-signature"),
    (r"malformed|no valid side", "malformed-token"),
    (r"already ended", "stream-ended"),
    (r"already used", "token-reused"),
    (r"already connected", "side-connected"),
    (r"limit of .* streams", "gateway-limit"),
    (r"not a stream URL", "not-found"),
]


def _first(rules: list[tuple[str, str]], text: str, default: str = "other") -> str:
    for pattern, label in rules:
        if re.search(pattern, text or ""):
            return label
    return default


def close_reason_label(reason: str) -> str:
    """Why a stream ended, as one of: closed, aborted, lost, no-show, lifetime, shutdown, revoked, other."""
    return _first(_CLOSE_REASONS, reason)


def limit_label(reason: str) -> str:
    """Which limit refused a stream request (the setting's name, or gateway_capacity)."""
    return _first(_LIMITS, reason)


def gateway_refusal_label(reason: str) -> str:
    """Why a gateway refused a socket at the upgrade, as a short label."""
    return _first(_GATEWAY_REFUSALS, reason)


class Metrics:
    """The event-fed metric families of one hub or gateway, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("devstreams_stream_requests", "Stream requests answered, by outcome",
                                ["outcome"], registry=r)
        self.setup_seconds = Histogram("devstreams_stream_setup_seconds",
                                       "Time from a stream request to the service's answer (accepted streams)",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.limit_refusals = Counter("devstreams_limit_refusals", "Stream requests refused by a limit, by limit",
                                      ["limit"], registry=r)
        self.opened = Counter("devstreams_streams_opened", "Streams whose first side reached this gateway",
                              registry=r)
        self.ends = Counter("devstreams_stream_ends", "Streams ended, by close reason", ["reason"], registry=r)
        self.login_refusals = Counter("devstreams_login_refusals", "MQTT logins refused by the hub, by reason",
                                      ["reason"], registry=r)
        self.gateway_refusals = Counter("devstreams_gateway_refusals",
                                        "Stream sockets refused at the gateway's upgrade, by reason",
                                        ["reason"], registry=r)
        self.presence_changes = Counter("devstreams_device_presence_changes",
                                        "Devices coming online or going offline", ["state"], registry=r)
        # Bytes of ended streams; a StateCollector adds the live counts of open ones.
        self.closed_bytes = {"to_device": 0, "to_service": 0}

    def on_event(self, event: object) -> None:
        """An ``EventSink`` subscriber: count one event."""
        # The negotiation core's events are matched by name: devstreams/ may not import broker/.
        kind = type(event).__name__
        if kind == "RequestAnswered":
            outcome = getattr(event.outcome, "value", str(event.outcome))
            self.requests.labels(outcome).inc()
            if outcome == "accepted":
                self.setup_seconds.observe(max(0.0, event.latency_ms / 1000))
            elif outcome == "limit":
                self.limit_refusals.labels(limit_label(event.reason)).inc()
        elif kind == "FloodRefused":      # over a connection's request rate: answered, not logged
            self.limit_refusals.labels("service_requests_per_second").inc()
        elif isinstance(event, StreamClosed):
            self.ends.labels(close_reason_label(event.reason)).inc()
            self.closed_bytes["to_device"] += max(0, event.bytes_to_device or 0)
            self.closed_bytes["to_service"] += max(0, event.bytes_to_service or 0)
        elif isinstance(event, StreamOpened):
            self.opened.inc()
        elif isinstance(event, LoginRefused):
            self.login_refusals.labels(event.reason).inc()
        elif isinstance(event, GatewayRefused):
            self.gateway_refusals.labels(event.reason).inc()
        elif kind == "DevicePresence" and getattr(event, "known", True):
            self.presence_changes.labels("online" if event.online else "offline").inc()

    def text(self) -> bytes:
        """The Prometheus text exposition of everything in this registry."""
        return generate_latest(self.registry)


class StateCollector:
    """Values read at scrape time from the owner's state (``state()`` returns them).

    ``state()`` -> dict with any of: ``devices`` (registered), ``devices_online``,
    ``connections`` ({role: n}), ``open_streams``, ``live_bytes`` ((to device, to service) of
    the open streams).  Bytes relayed = ended streams' bytes (counted from events) + the live
    counts, so the counter moves while a long stream flows, not only when it ends.
    """

    def __init__(self, metrics: Metrics, state: Callable[[], dict]):
        self._metrics = metrics
        self._state = state
        metrics.registry.register(self)

    def describe(self) -> Iterable:
        return []  # no fixed description: families are built per scrape

    def collect(self) -> Iterable:
        state = self._state()
        if "devices" in state:
            yield GaugeMetricFamily("devstreams_devices_registered", "Devices in the registry", value=state["devices"])
        if "devices_online" in state:
            yield GaugeMetricFamily("devstreams_devices_online", "Devices connected now", value=state["devices_online"])
        if "connections" in state:
            family = GaugeMetricFamily("devstreams_mqtt_connections", "MQTT connections by role", labels=["role"])
            for role, n in sorted(state["connections"].items()):
                family.add_metric([role], n)
            yield family
        if "open_streams" in state:
            yield GaugeMetricFamily("devstreams_open_streams", "Streams being negotiated or open",
                                    value=state["open_streams"])
        live = state.get("live_bytes", (0, 0))
        family = CounterMetricFamily("devstreams_relayed_bytes", "Bytes relayed, by direction", labels=["direction"])
        family.add_metric(["to_device"], self._metrics.closed_bytes["to_device"] + live[0])
        family.add_metric(["to_service"], self._metrics.closed_bytes["to_service"] + live[1])
        yield family
