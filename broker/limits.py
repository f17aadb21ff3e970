"""Admission limits for new streams: plain objects, clock passed in, no I/O."""

from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    """At most ``rate`` admissions per second on average, ``burst`` at once."""

    rate: float
    burst: int
    _tokens: float = field(init=False)
    _stamp: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._tokens = float(self.burst)

    def take(self, now: float) -> bool:
        if self._stamp is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


@dataclass
class StreamSlots:
    """Streams being negotiated or open: per hub, per gateway, and per device (pending only).

    A gateway's capacity is what it announced (``GatewayStats.max_streams``); a
    gateway that has not announced one is bounded by the hub's limit only.  The
    count per gateway is this hub's own (the streams it sent there), exact and
    without lag; a gateway shared by several hubs still refuses over its limit
    itself, with a 503 at the upgrade.
    """

    max_streams: int
    max_pending_per_device: int
    _held: dict[str, str] = field(default_factory=dict)       # stream id -> gateway it was sent to
    _pending_by_device: dict[str, int] = field(default_factory=dict)
    _by_gateway: dict[str, int] = field(default_factory=dict)
    capacity: dict[str, int] = field(default_factory=dict)    # gateway -> streams it can hold

    def refusal(self, device: str) -> str | None:
        """Why a new stream to ``device`` cannot start now, or None."""
        if len(self._held) >= self.max_streams:
            return f"the hub's limit of {self.max_streams} concurrent streams is reached"
        if self._pending_by_device.get(device, 0) >= self.max_pending_per_device:
            return (f"device has {self.max_pending_per_device} unanswered stream requests "
                    "(max_pending_per_device)")
        return None

    def has_room(self, gateway: str) -> bool:
        limit = self.capacity.get(gateway)
        return limit is None or self._by_gateway.get(gateway, 0) < limit

    def full_text(self, gateways: list[str]) -> str:
        """The refusal when no gateway has room: each one's count and capacity."""
        each = ", ".join(f"{g} holds {self._by_gateway.get(g, 0)} of {self.capacity.get(g, '?')}" for g in gateways)
        return f"every streaming gateway is at capacity ({each}); retry later"

    def hold(self, stream_id: str, device: str, gateway: str = "") -> None:
        self._held[stream_id] = gateway
        self._by_gateway[gateway] = self._by_gateway.get(gateway, 0) + 1
        self._pending_by_device[device] = self._pending_by_device.get(device, 0) + 1

    def answered(self, device: str) -> None:
        left = self._pending_by_device.get(device, 0) - 1
        if left > 0:
            self._pending_by_device[device] = left
        else:
            self._pending_by_device.pop(device, None)

    def release(self, stream_id: str) -> bool:
        gateway = self._held.pop(stream_id, None)
        if gateway is None:
            return False
        left = self._by_gateway[gateway] - 1
        if left > 0:
            self._by_gateway[gateway] = left
        else:
            del self._by_gateway[gateway]
        return True

    def at(self, gateway: str) -> int:
        return self._by_gateway.get(gateway, 0)

    def __len__(self) -> int:
        return len(self._held)


class KeyedBuckets:
    """A TokenBucket per key (a service's MQTT client id), bounded in memory.

    A bucket that has been idle for ``burst / rate`` seconds is full again, the
    same as a new one, so dropping it loses nothing: the map only holds keys seen
    within that window.  ``forget`` drops a key at once (its client disconnected).
    """

    def __init__(self, rate: float, burst: int):
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, tuple[TokenBucket, float]] = {}
        self._idle = burst / rate
        self._next_sweep = 0.0

    def take(self, key: str, now: float) -> bool:
        if now >= self._next_sweep:
            self._sweep(now)
        bucket = self._buckets.get(key, (None, 0.0))[0] or TokenBucket(self.rate, self.burst)
        self._buckets[key] = (bucket, now)
        return bucket.take(now)

    def forget(self, key: str) -> None:
        self._buckets.pop(key, None)

    def _sweep(self, now: float) -> None:
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < self._idle}
        self._next_sweep = now + max(1.0, self._idle)

    def __len__(self) -> int:
        return len(self._buckets)


def refresh_after(now: float, interval: float, cost: float, share: float, longest: float) -> float:
    """When to rewrite a list whose last write took ``cost`` CPU-seconds.

    Every ``interval`` while that is cheap; with a long list, rarer, so that keeping
    it fresh takes at most ``share`` of a core; never later than ``longest``.
    """
    return now + min(longest, max(interval, cost / share))
