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


class EventSink:
    def __init__(self, *, log_interval: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self._subscribers: list[Subscriber] = []
        self._log_interval = log_interval
        self._clock = clock
        self._last_logged: dict[int, float] = {}   # id(subscriber) -> when its last failure was logged
        self._suppressed: dict[int, int] = {}

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
        index = id(subscriber)
        now = self._clock()
        last = self._last_logged.get(index)
        if last is not None and now - last < self._log_interval:
            self._suppressed[index] = self._suppressed.get(index, 0) + 1
            return
        self._last_logged[index] = now
        skipped = self._suppressed.pop(index, 0)
        log.exception("event subscriber %s failed on %s%s", getattr(subscriber, "__qualname__", subscriber),
                      type(event).__name__, f" ({skipped} more failures not logged)" if skipped else "")
