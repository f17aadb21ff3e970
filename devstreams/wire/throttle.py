"""Log throttles: say a repeating thing the first time, then at most once per interval.

Plain objects with ``now`` passed in, shared by every role (a full disk, a flood,
a failing event subscriber, an agent that cannot reach its hub): one log line per
interval, with the count of what was left out, instead of a line per occurrence.
"""

from dataclasses import dataclass, field


@dataclass
class EveryInterval:
    """Say yes at most once per ``interval`` seconds, counting the noes in between.

    For errors that repeat per row or per message (a full disk, a flood): one log
    line per minute that says how many were left out, instead of a traceback each.
    """

    interval: float
    _next: float | None = field(init=False, default=None)
    _suppressed: int = field(init=False, default=0)

    def ready(self, now: float) -> tuple[bool, int]:
        """(log now?, how many were suppressed since the last yes)."""
        if self._next is None or now >= self._next:
            suppressed, self._suppressed = self._suppressed, 0
            self._next = now + self.interval
            return True, suppressed
        self._suppressed += 1
        return False, 0


class LogLimiter:
    """``EveryInterval`` per key (one per cause, per subscriber ...)."""

    def __init__(self, interval: float = 60.0):
        self.interval = interval
        self._gates: dict[object, EveryInterval] = {}

    def ready(self, key: object, now: float) -> tuple[bool, int]:
        """(log now?, how many for this key were suppressed since its last yes)."""
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = EveryInterval(self.interval)
        return gate.ready(now)

    def allow(self, key: object, now: float) -> bool:
        return self.ready(key, now)[0]
