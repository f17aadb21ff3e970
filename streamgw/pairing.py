"""Which sockets belong to which stream: the gateway's state as plain objects, no I/O.

A side is *reserved* when its token passes (at the HTTP upgrade, so a refusal is
an HTTP status), and *attached* when its WebSocket is open.  Each token works
once (its ``jti`` is remembered until it expires) and each side of a stream can
be held by one socket only.
"""

from dataclasses import dataclass, field

from devstreams.wire.streamtoken import Side, StreamClaims


class Refusal(Exception):
    """Why a socket may not join; ``status`` is the HTTP answer."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class ReplayCache:
    """Token ids already used, kept until the token would have expired anyway."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}
        self._next_purge = 0.0

    def use(self, jti: str, expires_at: float, now: float) -> bool:
        if now >= self._next_purge:
            self._seen = {k: exp for k, exp in self._seen.items() if exp > now}
            self._next_purge = now + 10
        if jti in self._seen:
            return False
        self._seen[jti] = expires_at
        return True

    def __len__(self) -> int:
        return len(self._seen)


@dataclass
class StreamEntry:
    stream_id: str
    device_id: str
    stream_name: str
    created: float
    sides: dict[Side, object] = field(default_factory=dict)   # side -> connection handle
    attached: set[Side] = field(default_factory=set)
    finished: bool = False
    revoked: str = ""       # why an operator ended it (device disabled, stream closed …), if so
    record: object = None   # the relay's live StreamRecord once paired (bytes so far)

    @property
    def paired(self) -> bool:
        return len(self.attached) == 2


class Pairing:
    def __init__(self, max_streams: int):
        self.max_streams = max_streams
        self.replays = ReplayCache()
        self._streams: dict[str, StreamEntry] = {}
        self._ended: dict[str, float] = {}  # stream id -> when it ended (refuse latecomers)
        self._handles: dict[object, tuple[StreamEntry, Side]] = {}

    def __len__(self) -> int:
        return len(self._streams)

    def get(self, stream_id: str) -> StreamEntry | None:
        return self._streams.get(stream_id)

    def reserve(self, claims: StreamClaims, handle: object, now: float) -> StreamEntry:
        """Admit a socket whose token verified; raise Refusal otherwise."""
        if claims.stream_id in self._ended:
            raise Refusal(403, "this stream has already ended: create a new stream")
        entry = self._streams.get(claims.stream_id)
        if entry is None and len(self._streams) >= self.max_streams:
            raise Refusal(503, f"the gateway's limit of {self.max_streams} streams is reached")
        if not self.replays.use(claims.jti, claims.expires_at, now):
            raise Refusal(403, "this stream token was already used")
        if entry is not None and claims.side in entry.sides:
            raise Refusal(403, f"the {claims.side.value} side of this stream is already connected")
        if entry is None:
            entry = StreamEntry(claims.stream_id, claims.device_id, claims.stream_name, now)
            self._streams[claims.stream_id] = entry
        entry.sides[claims.side] = handle
        self._handles[handle] = (entry, claims.side)
        return entry

    def find(self, handle: object) -> tuple[StreamEntry, Side] | None:
        return self._handles.get(handle)

    def attach(self, entry: StreamEntry, side: Side) -> None:
        entry.attached.add(side)

    def release(self, entry: StreamEntry, side: Side) -> None:
        """A reserved side that never opened its WebSocket frees its place."""
        if side not in entry.attached:
            self._handles.pop(entry.sides.pop(side, None), None)
            if not entry.sides:
                self._streams.pop(entry.stream_id, None)

    def revoke(self, stream_id: str, now: float) -> StreamEntry | None:
        """Refuse every later socket of ``stream_id`` (its unused tokens die); return its entry if any.

        The caller closes the entry's sockets and then calls ``finish``.
        """
        self._mark_ended(stream_id, now)
        return self._streams.get(stream_id)

    def streams_of(self, device_id: str) -> list[StreamEntry]:
        return [e for e in self._streams.values() if e.device_id == device_id]

    def streams(self) -> list[StreamEntry]:
        return list(self._streams.values())

    def finish(self, entry: StreamEntry, now: float) -> bool:
        """End a stream once; True the first time."""
        if entry.finished:
            return False
        entry.finished = True
        self._streams.pop(entry.stream_id, None)
        for handle in entry.sides.values():
            self._handles.pop(handle, None)
        self._mark_ended(entry.stream_id, now)
        return True

    def _mark_ended(self, stream_id: str, now: float) -> None:
        self._ended[stream_id] = now
        if len(self._ended) > 4 * self.max_streams:  # forget the oldest; their tokens expired long ago
            for sid in sorted(self._ended, key=self._ended.get)[: len(self._ended) // 2]:
                del self._ended[sid]
