"""Control-plane messages: plain dataclasses <-> JSON bytes, with validation.

Sans-I/O: everything here works on bytes and objects.  ``decode_*`` raise
``MessageError`` for anything malformed or oversized, so a broken or hostile
peer costs one log line, never a crash.
"""

import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from .errors import DevstreamsError
from .names import DEVICE_ID_RE, STREAM_NAME_RE

MAX_MESSAGE_BYTES = 16 * 1024


class MessageError(DevstreamsError):
    """A control message that cannot be understood."""


class Outcome(str, Enum):
    """How a create-stream request ended, as the hub tells the service."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"
    NOT_FOUND = "not-found"
    OFFLINE = "offline"
    DISABLED = "disabled"
    TIMEOUT = "timeout"
    LIMIT = "limit"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"        # the operator's scope does not include this device or stream
    BAD_REQUEST = "bad-request"


@dataclass(frozen=True)
class StreamRequest:
    """Hub -> device: a service wants a stream."""

    rid: str
    stream_id: str
    name: str
    url: str
    token: str
    expires: float  # epoch seconds; a request seen after this is stale and ignored


@dataclass(frozen=True)
class StreamResponse:
    """Device -> hub: 200 accepts, 400 rejects (with a reason)."""

    rid: str
    status: int
    reason: str = ""


@dataclass(frozen=True)
class Presence:
    """Device -> hub (retained; the offline one is the last will)."""

    online: bool
    conn: str  # a nonce per connection, so a late will of an old connection is ignored


@dataclass(frozen=True)
class ServiceRequest:
    """Service -> hub: create a stream to a device."""

    rid: str
    device: str
    name: str
    response_timeout: float = 60.0
    join_timeout: float = 60.0      # after the device accepts: how long each side has to join at the gateway


@dataclass(frozen=True)
class ServiceResponse:
    """Hub -> service: the outcome; url/token/stream_id only when accepted."""

    rid: str
    outcome: Outcome
    reason: str = ""
    url: str = ""
    token: str = ""
    stream_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GatewayEvent:
    """Gateway -> hub: a stream opened (first side arrived) or closed (with its record)."""

    event: str                 # "opened" or "closed"
    stream_id: str
    device: str = ""
    name: str = ""
    reason: str = ""
    bytes_to_device: int = 0
    bytes_to_service: int = 0
    duration: float = 0.0
    service_host: str = ""     # the service side's address as the gateway saw it (audit)


MAX_CONTROL_STREAMS = 128  # stream ids per GatewayControl message (the hub splits longer lists)


@dataclass(frozen=True)
class GatewayControl:
    """Hub -> every gateway: end these streams now and refuse their unused tokens.

    ``streams``: stream ids (open, or accepted but not yet opened); ``device``: also
    end every open stream of this device (it was disabled, removed or re-keyed);
    ``reason`` goes to both sides in the WebSocket close.
    """

    streams: tuple[str, ...] = ()
    device: str = ""
    reason: str = ""


MAX_STATS_STREAMS = 100  # streams per GatewayStats message (the gateway splits longer lists)


@dataclass(frozen=True)
class GatewayStats:
    """Gateway -> hub, every second or so while streams are open, and at least every
    ``heartbeat`` seconds and on each (re)connect otherwise: ``[stream id, bytes to device,
    bytes to service]`` for each open stream, and the gateway's public URL and stream limit,
    so the hub refuses a stream it cannot hold before the device is asked (0: not said)."""

    streams: tuple[tuple[str, int, int], ...] = ()
    url: str = ""
    max_streams: int = 0


def encode(message: Any) -> bytes:
    data = asdict(message)
    for key, value in data.items():
        if isinstance(value, Enum):
            data[key] = value.value
    return json.dumps(data, separators=(",", ":")).encode()


def _load(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise MessageError("message is not JSON") from None
    if not isinstance(data, dict):
        raise MessageError("message is not a JSON object")
    return data


def _str(data: dict[str, Any], key: str, limit: int = 256, required: bool = True) -> str:
    value = data.get(key, None if required else "")
    if not isinstance(value, str) or len(value) > limit or (required and not value):
        raise MessageError(f"field {key!r} missing or invalid")
    return value


def _num(data: dict[str, Any], key: str, default: float | None = None) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise MessageError(f"field {key!r} must be a number")
    return float(value)


def decode_stream_request(payload: bytes) -> StreamRequest:
    d = _load(payload)
    return StreamRequest(rid=_str(d, "rid", 64), stream_id=_str(d, "stream_id", 64),
                         name=_str(d, "name", 64), url=_str(d, "url", 1024),
                         token=_str(d, "token", 4096), expires=_num(d, "expires"))


def decode_stream_response(payload: bytes) -> StreamResponse:
    d = _load(payload)
    status = d.get("status")
    if status not in (200, 400):
        raise MessageError("field 'status' must be 200 or 400")
    return StreamResponse(rid=_str(d, "rid", 64), status=status, reason=_str(d, "reason", 1024, required=False))


def decode_presence(payload: bytes) -> Presence:
    d = _load(payload)
    if not isinstance(d.get("online"), bool):
        raise MessageError("field 'online' must be true or false")
    return Presence(online=d["online"], conn=_str(d, "conn", 64))


def decode_service_request(payload: bytes) -> ServiceRequest:
    d = _load(payload)
    device, name = _str(d, "device", 128), _str(d, "name", 64)
    if not DEVICE_ID_RE.match(device):
        raise MessageError(f"invalid device ID {device!r}")
    if not STREAM_NAME_RE.match(name):
        raise MessageError(f"invalid stream name {name!r}")
    response_timeout = _num(d, "response_timeout", 60.0)
    # 'connect_timeout' is what SDKs before 0.2 called the join timeout
    join_timeout = _num(d, "join_timeout", _num(d, "connect_timeout", 60.0))
    if not (0 < response_timeout <= 3600 and 0 < join_timeout <= 3600):
        raise MessageError("timeouts must be between 0 and 3600 seconds")
    return ServiceRequest(rid=_str(d, "rid", 64), device=device, name=name,
                          response_timeout=response_timeout, join_timeout=join_timeout)


def decode_service_response(payload: bytes) -> ServiceResponse:
    d = _load(payload)
    try:
        outcome = Outcome(d.get("outcome"))
    except ValueError:
        raise MessageError("field 'outcome' is unknown") from None
    extra = d.get("extra") or {}
    if not isinstance(extra, dict):
        raise MessageError("field 'extra' must be an object")
    return ServiceResponse(rid=_str(d, "rid", 64), outcome=outcome, reason=_str(d, "reason", 1024, False),
                           url=_str(d, "url", 1024, False), token=_str(d, "token", 4096, False),
                           stream_id=_str(d, "stream_id", 64, False), extra=extra)


def decode_gateway_event(payload: bytes) -> GatewayEvent:
    d = _load(payload)
    event = d.get("event")
    if event not in ("opened", "closed"):
        raise MessageError("field 'event' must be 'opened' or 'closed'")
    counts = {}
    for key in ("bytes_to_device", "bytes_to_service"):
        value = d.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MessageError(f"field {key!r} must be a count")
        counts[key] = value
    return GatewayEvent(event=event, stream_id=_str(d, "stream_id", 64), device=_str(d, "device", 128, False),
                        name=_str(d, "name", 64, False), reason=_str(d, "reason", 256, False),
                        duration=max(0.0, _num(d, "duration", 0.0)),
                        service_host=_str(d, "service_host", 64, False), **counts)


def decode_gateway_control(payload: bytes) -> GatewayControl:
    d = _load(payload)
    streams = d.get("streams", [])
    if not isinstance(streams, list) or len(streams) > MAX_CONTROL_STREAMS:
        raise MessageError(f"field 'streams' must be a list of at most {MAX_CONTROL_STREAMS} stream ids")
    for sid in streams:
        if not isinstance(sid, str) or not 0 < len(sid) <= 64:
            raise MessageError("field 'streams' holds an invalid stream id")
    device = _str(d, "device", 128, required=False)
    if device and not DEVICE_ID_RE.match(device):
        raise MessageError(f"invalid device ID {device!r}")
    if not streams and not device:
        raise MessageError("a control message names no stream and no device")
    return GatewayControl(streams=tuple(streams), device=device, reason=_str(d, "reason", 120, required=False))


def decode_gateway_stats(payload: bytes) -> GatewayStats:
    d = _load(payload)
    rows = d.get("streams")
    if not isinstance(rows, list) or len(rows) > MAX_STATS_STREAMS:
        raise MessageError(f"field 'streams' must be a list of at most {MAX_STATS_STREAMS} entries")
    out = []
    for row in rows:
        if (not isinstance(row, list) or len(row) != 3 or not isinstance(row[0], str) or not 0 < len(row[0]) <= 64
                or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in row[1:])):
            raise MessageError("each entry of 'streams' must be [stream id, bytes to device, bytes to service]")
        out.append((row[0], row[1], row[2]))
    url = _str(d, "url", 1024, required=False)
    if url and not url.startswith(("wss://", "ws://")):
        raise MessageError("field 'url' must be a ws:// or wss:// URL")
    max_streams = d.get("max_streams", 0)
    if isinstance(max_streams, bool) or not isinstance(max_streams, int) or not 0 <= max_streams <= 10**7:
        raise MessageError("field 'max_streams' must be a whole number from 0 to 10000000")
    return GatewayStats(streams=tuple(out), url=url, max_streams=max_streams)
