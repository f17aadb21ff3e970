"""One event sink: stream events go to one place and every consumer subscribes there.

The hub's controller emits the negotiation core's events (request answered,
stream ended, device online/offline) and a gateway emits its own
(``StreamOpened`` / ``StreamClosed``).  Consumers -- the activity
log and presence writer, a standalone gateway's MQTT reporter, the hub
forwarding its built-in gateway's events to the controller, later metrics --
subscribe to an ``EventSink`` instead of each having its own callback path.

It lives in ``wire`` because both the hub and the gateway use it and no role may
import another; it does no I/O.  A subscriber that raises does not stop the
others; its failures are logged at most once per ``log_interval`` seconds (a
failing disk would otherwise log once per stream).
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from .throttle import LogLimiter

log = logging.getLogger(__name__)

Subscriber = Callable[[object], object]


@dataclass(frozen=True)
class StreamOpened:
    """A gateway saw a stream's first side arrive: its concurrency slot stays taken."""
    stream_id: str


@dataclass(frozen=True)
class StreamClosed:
    """A stream ended at a gateway: free its slot and write it to the activity log."""
    stream_id: str
    device: str
    name: str
    reason: str
    bytes_to_device: int
    bytes_to_service: int
    duration: float
    service_host: str = ""   # the service side's address as the gateway saw it
    operator: str = ""       # who held the stream: filled in by the hub's controller, which knows


class EventSink:
    def __init__(self, *, log_interval: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self._subscribers: list[Subscriber] = []
        self._failures = LogLimiter(log_interval)   # per subscriber
        self._clock = clock

    def subscribe(self, subscriber: Subscriber) -> Subscriber:
        self._subscribers.append(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers = [s for s in self._subscribers if s != subscriber]

    def emit(self, event: object) -> None:
        """Hand ``event`` to every subscriber, in order; never raises."""
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception:
                self._failed(subscriber, event)

    def _failed(self, subscriber: Subscriber, event: object) -> None:
        ready, skipped = self._failures.ready(id(subscriber), self._clock())
        if ready:
            log.exception("event subscriber %s failed on %s%s", getattr(subscriber, "__qualname__", subscriber),
                          type(event).__name__, f" ({skipped} more failures not logged)" if skipped else "")


@dataclass(frozen=True)
class LoginRefused:
    """The hub's gate refused an MQTT connection before or at its login (metrics count these by reason).

    ``reason`` is a short fixed label (``bad-credentials``, ``not-authorized``, ``login-rate``, ...),
    never the client's own text, so a metric labelled with it stays small.
    """
    reason: str


@dataclass(frozen=True)
class GatewayRefused:
    """A gateway refused a stream socket at its HTTP upgrade (``status`` is the HTTP answer)."""
    reason: str
    status: int
