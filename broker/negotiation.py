"""The negotiation core: every stream-negotiation rule, without I/O (sans-I/O).

Events and the current time go in as plain method calls with already-decoded
messages: a service request (with the registry's ``Device`` record, or None,
looked up by the caller), a device answer, presence, a gateway event, a timer
that fired, a registry change.  Each call returns a list of actions, small
frozen dataclasses the caller carries out in order:

    PublishToDevice  send a StreamRequest to the device over MQTT
    Answer           send a ServiceResponse to the service over MQTT
    Schedule/Cancel  start/stop a timer; when it fires, call ``timer(key, now)``
    Emit             an event for the activity log / registry: RequestAnswered,
                     StreamClosed, DevicePresence
    CloseStreams     a GatewayControl for every gateway (revocation)

The core owns one explicit state per stream (``State``: REQUESTED -> PENDING
-> ACCEPTED -> OPEN -> CLOSED, transitions in ``_move`` only; anything else,
such as a late device answer, a second close or a gateway event for a stream
it does not know, is ignored) and the admission limits of ``broker.limits``.
Like websockets' ``protocol.py`` or h11, it never reads a clock: every method
takes ``now`` (monotonic seconds; ``wall`` where an epoch time goes on the wire).

Tokens: the core decides *what* to mint (stream id, side, gateway, lifetime)
but is given the minting at construction -- ``mint(stream_id, side, audience,
ttl, device_id, stream_name)`` and ``new_id()`` -- because signing needs the
hub's key and ids need randomness.  Both are pure enough to inject in tests
(a fixed string, a counter) and the adapter (``broker.controller``) passes the
real ``devstreams.wire.streamtoken.mint`` bound to the signing key and ``uuid4``.  Letting
the adapter mint instead would split one decision (the token lifetime follows
the negotiated timeouts) over two modules.

Diagnostics go through ``logging`` like everywhere else; that is not I/O the
rules depend on.  The publish that can fail (the device's request) is reported
back by the adapter with ``undeliverable(rid, now)``.
"""

import enum
import logging
import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from devstreams.wire import messages as msg
from devstreams.wire import topics
from devstreams.wire.events import StreamClosed
from devstreams.wire.messages import Outcome
from devstreams.wire.streamproto import stream_url
from devstreams.wire.streamtoken import Side
from devstreams.wire.throttle import EveryInterval

from . import access
from .access import key_digest
from .limits import KeyedBuckets, StreamSlots, TokenBucket
from .registry import Device
from .settings import HubSettings

if TYPE_CHECKING:
    from .registry import Operator

log = logging.getLogger(__name__)


class State(enum.Enum):
    REQUESTED = "requested"   # admitted, slot held, not yet sent to the device
    PENDING = "pending"       # asked the device, waiting for its answer
    ACCEPTED = "accepted"     # the device accepted; waiting for a side at the gateway
    OPEN = "open"             # a side reached the gateway; only its close frees the slot
    CLOSED = "closed"


_TRANSITIONS = {
    State.REQUESTED: {State.PENDING, State.CLOSED},
    State.PENDING: {State.ACCEPTED, State.OPEN, State.CLOSED},
    State.ACCEPTED: {State.OPEN, State.CLOSED},
    State.OPEN: {State.CLOSED},
    State.CLOSED: set(),
}


@dataclass
class KnownStream:
    """A stream the controller negotiated: pending, accepted, or open at a gateway."""

    stream_id: str
    device: str
    name: str
    service: topics.Service  # who asked: the policy named in its login and its MQTT client id
    gateway: str
    device_key: bytes       # key_digest of the device key it was admitted under
    operator: str           # the operator it was admitted for (its registry name)
    operator_key: bytes     # key_digest of that operator's key then
    created: float          # wall clock
    state: State = State.REQUESTED
    bytes: tuple[int, int] | None = None  # (to device, to service) as a standalone gateway last reported
    # the request, while the device has not answered
    rid: str = ""
    service_rid: str = ""
    started: float = 0.0    # monotonic
    waited: float = 0.0     # the response timeout it was given
    url: str = ""
    service_token: str = field(default="", repr=False)
    seen_open: bool = False      # a gateway reported it opened before the device's answer arrived
    seen_closed: bool = False    # ... or closed

    @property
    def accepted(self) -> bool:
        return self.state in (State.ACCEPTED, State.OPEN)

    @property
    def opened(self) -> bool:
        return self.state is State.OPEN


def device_revocation(stream: KnownStream, device: Device | None) -> tuple[Outcome, str] | None:
    """Why ``stream`` may no longer flow because of its device, or None (ends every stream of the device)."""
    if device is None:
        return Outcome.NOT_FOUND, f"device {stream.device} removed"
    if not device.enabled:
        return Outcome.DISABLED, f"device {stream.device} disabled"
    if key_digest(device.key) != stream.device_key:
        return Outcome.UNAUTHORIZED, f"device {stream.device} key rotated"
    return None


def operator_revocation(stream: KnownStream, device: Device | None, operator: "Operator | None",
                        wall: float) -> tuple[Outcome, str] | None:
    """Why ``stream`` may no longer flow because of its operator (removed, disabled, re-keyed, expired,
    or the device left its scope), or None (ends this operator's streams only)."""
    return access.revocation_of(operator, stream.operator, stream.operator_key, stream.device,
                                device.tags if device else None, stream.name, wall)


@dataclass
class StreamBook:
    """Streams the controller knows, by id: plain object, no I/O."""

    _streams: dict[str, KnownStream] = field(default_factory=dict)

    def add(self, stream: KnownStream) -> None:
        self._streams[stream.stream_id] = stream

    def get(self, stream_id: str) -> KnownStream | None:
        return self._streams.get(stream_id)

    def remove(self, stream_id: str) -> KnownStream | None:
        return self._streams.pop(stream_id, None)

    def all(self) -> list[KnownStream]:
        return list(self._streams.values())

    def revoked(self, devices: dict[str, Device | None], operators: "dict[str, Operator | None]", wall: float
                ) -> list[tuple[KnownStream, Outcome, str, bool]]:
        """The streams to end now, each with whether its device is the cause (then all its streams end).

        ``devices`` and ``operators`` hold the registry's entry of each device and operator in the book.
        """
        found = []
        for stream in self._streams.values():
            device = devices.get(stream.device)
            why = device_revocation(stream, device)
            if why is not None:
                found.append((stream, *why, True))
                continue
            why = operator_revocation(stream, device, operators.get(stream.operator), wall)
            if why is not None:
                found.append((stream, *why, False))
        return found

    def operators(self) -> set[str]:
        return {k.operator for k in self._streams.values()}

    def __len__(self) -> int:
        return len(self._streams)


# -- actions ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PublishToDevice:
    device: str
    request: msg.StreamRequest


@dataclass(frozen=True)
class Answer:
    service: topics.Service
    response: msg.ServiceResponse


@dataclass(frozen=True)
class Schedule:
    """Call ``timer(key, now)`` after ``delay`` seconds (replaces a timer with the same key)."""

    key: Hashable
    delay: float


@dataclass(frozen=True)
class Cancel:
    key: Hashable


@dataclass(frozen=True)
class RequestAnswered:
    """One activity-log row per answered request (flood refusals excepted)."""

    device: str
    name: str
    stream_id: str | None
    outcome: Outcome
    reason: str
    latency_ms: float
    operator: str = ""


@dataclass(frozen=True)
class FloodRefused:
    """A request refused over its connection's rate (``service_requests_per_second``): counted, not logged."""

    operator: str


@dataclass(frozen=True)
class DevicePresence:
    device: str
    online: bool
    known: bool = True   # False: an 'offline' of a connection this controller never saw online (a
                         # retained status read at start, e.g. a device that left while no hub ran)


@dataclass(frozen=True)
class Emit:
    event: RequestAnswered | StreamClosed | DevicePresence | FloodRefused


@dataclass(frozen=True)
class CloseStreams:
    control: msg.GatewayControl


Action = PublishToDevice | Answer | Schedule | Cancel | Emit | CloseStreams

RESPONSE_TIMER = "response"
NO_SHOW_TIMER = "no-show"
_ENDED_MEMORY = 4096   # stream ids whose close was logged, so a repeated report is logged once


class Negotiation:
    """Decides every stream request; see the module docstring for the contract."""

    def __init__(self, settings: HubSettings, *, mint: Callable[..., str], new_id: Callable[[], str],
                 gateways: Callable[[], list[str]]):
        self._settings = settings
        self._mint = mint
        self._new_id = new_id
        self._gateways = gateways
        self._next_gateway = 0                         # round robin over the gateways with room
        self.presence: dict[str, str] = {}             # device id -> connection nonce
        self._by_rid: dict[str, KnownStream] = {}       # hub rid -> stream waiting for the device
        self.book = StreamBook()
        self._ended: OrderedDict[str, None] = OrderedDict()
        self.bucket = TokenBucket(settings.max_new_streams_per_second, settings.new_streams_burst)
        self.slots = StreamSlots(settings.max_concurrent_streams, settings.max_pending_per_device)
        self.service_buckets = KeyedBuckets(settings.service_requests_per_second, settings.service_requests_burst)
        self._flood_log = EveryInterval(settings.disk_error_log_interval)
        self._flooded: dict[str, int] = {}             # client id -> refusals since the last log line
        self._per_operator: Counter[str] = Counter()   # operator -> streams it holds in the book
        self._operator_buckets: dict[str, TokenBucket] = {}

    # -- state ------------------------------------------------------------------------------------

    @staticmethod
    def _move(stream: KnownStream, to: State) -> bool:
        """The one place a stream changes state; False (and no change) for a transition that is not allowed."""
        if to not in _TRANSITIONS[stream.state]:
            log.debug("stream %s: ignoring %s -> %s", stream.stream_id, stream.state.value, to.value)
            return False
        stream.state = to
        return True

    def state(self, stream_id: str) -> State | None:
        known = self.book.get(stream_id)
        return known.state if known is not None else None

    @property
    def open_streams(self) -> int:
        return len(self.slots)

    # -- service requests -------------------------------------------------------------------------

    def within_rate(self, service: topics.Service, now: float) -> bool:
        """Before decoding: may this service connection ask for one more stream now?"""
        return self.service_buckets.take(service, now)

    def refuse_flood(self, service: topics.Service, rid: str | None, now: float) -> list[Action]:
        """Over this connection's rate: answer LIMIT at once, no database work, one log line a minute."""
        actions: list[Action] = [Emit(FloodRefused(service.policy))]
        if rid:
            s = self._settings
            actions.append(Answer(service, msg.ServiceResponse(
                rid=rid, outcome=Outcome.LIMIT,
                reason=(f"this connection's limit of {s.service_requests_per_second:g} stream requests per second "
                        f"(burst {s.service_requests_burst}, service_requests_per_second) is reached; "
                        "retry shortly"))))
        self._flooded[service] = self._flooded.get(service, 0) + 1
        ready, _ = self._flood_log.ready(now)
        if ready:
            worst = sorted(self._flooded.items(), key=lambda kv: -kv[1])[:5]
            log.warning("refused stream requests over the per-connection rate limit: %s",
                        ", ".join(f"{cid} {n}" for cid, n in worst))
            self._flooded.clear()
        return actions

    def bad_request(self, service: topics.Service, rid: str | None, reason: str) -> list[Action]:
        """A request that failed validation: answered if it had a usable rid."""
        if not rid:
            return []
        return [Answer(service, msg.ServiceResponse(rid=rid, outcome=Outcome.BAD_REQUEST, reason=reason))]

    def admission(self, service: topics.Service, request: msg.ServiceRequest, device: Device | None,
                  operator: "Operator | None", now: float, wall: float) -> tuple[Outcome, str] | None:
        """The first rule the request breaks, or None: the operator's standing and scope come first
        (an operator learns nothing about devices outside its scope), then the registry, then limits."""
        refusal = access.refusal(operator, service.policy, request.device, device.tags if device else None,
                                 request.name, wall)
        if refusal is not None:
            return refusal
        assert operator is not None
        if device is None:
            return Outcome.NOT_FOUND, f"device {request.device} is not registered on this hub"
        if not device.enabled:
            return Outcome.DISABLED, f"device {request.device} is disabled"
        if request.device not in self.presence:
            return Outcome.OFFLINE, f"device {request.device} is not connected to the hub"
        refusal = self.slots.refusal(request.device)
        if refusal:
            return Outcome.LIMIT, refusal
        if self._gateway_with_room(advance=False) is None:  # refused before the device is asked
            return Outcome.LIMIT, self.slots.full_text([g.rstrip("/") for g in self._gateways()])
        if operator.max_streams is not None and self._per_operator[operator.name] >= operator.max_streams:
            return Outcome.LIMIT, (f"operator {operator.name}'s limit of {operator.max_streams} concurrent streams "
                                   "is reached; close one first")
        if not self._within_operator_rate(operator, now):
            return Outcome.LIMIT, (f"operator {operator.name}'s limit of {operator.new_streams_per_second:g} new "
                                   "streams per second is reached; retry shortly")
        if not self.bucket.take(now):
            return Outcome.LIMIT, (f"the hub's limit of {self._settings.max_new_streams_per_second:g} "
                                   "new streams per second is reached; retry shortly")
        return None

    def _within_operator_rate(self, operator: "Operator", now: float) -> bool:
        """The operator's own new-streams rate, when it has one (the hub's applies anyway)."""
        rate = operator.new_streams_per_second
        if rate is None:
            return True
        bucket = self._operator_buckets.get(operator.name)
        if bucket is None or bucket.rate != rate:
            bucket = self._operator_buckets[operator.name] = TokenBucket(rate, max(1, math.ceil(rate)))
        return bucket.take(now)

    def service_request(self, service: topics.Service, request: msg.ServiceRequest, device: Device | None, *,
                        operator: "Operator | None", now: float, wall: float,
                        started: float | None = None) -> list[Action]:
        """A decoded request; ``device`` is the registry's record of ``request.device`` (None: unknown),
        ``operator`` the registry's record of the operator the service's login names (None: removed).

        ``started``: when the request arrived (latency is measured from there), default ``now``.
        """
        started = now if started is None else started
        who = operator.name if operator is not None else service.policy
        refusal = self.admission(service, request, device, operator, now, wall)
        if refusal is not None:
            outcome, reason = refusal
            return [Answer(service, msg.ServiceResponse(rid=request.rid, outcome=outcome, reason=reason)),
                    Emit(RequestAnswered(request.device, request.name, None, outcome, reason,
                                         (now - started) * 1000, operator=who))]
        assert device is not None and operator is not None
        s = self._settings
        response_timeout = min(request.response_timeout, s.response_timeout)
        join_timeout = min(request.join_timeout, s.join_timeout)
        stream_id = self._new_id()
        rid = self._new_id()[:16]
        gateway = self._gateway_with_room(advance=True)
        assert gateway is not None  # admission checked
        url = stream_url(gateway, stream_id)
        ttl = response_timeout + join_timeout

        def token(side: Side) -> str:
            return self._mint(stream_id=stream_id, side=side, audience=gateway, ttl=ttl,
                              device_id=request.device, stream_name=request.name)

        known = KnownStream(stream_id=stream_id, device=request.device, name=request.name, service=service,
                            gateway=gateway, device_key=key_digest(device.key), operator=operator.name,
                            operator_key=key_digest(operator.key),
                            created=wall, rid=rid, service_rid=request.rid, started=started, waited=response_timeout,
                            url=url, service_token=token(Side.SERVICE))
        self.book.add(known)
        self._per_operator[operator.name] += 1
        self._by_rid[rid] = known
        self.slots.hold(stream_id, request.device, gateway)
        wire_request = msg.StreamRequest(rid=rid, stream_id=stream_id, name=request.name, url=url,
                                         token=token(Side.DEVICE), expires=wall + response_timeout)
        self._move(known, State.PENDING)
        return [Schedule((RESPONSE_TIMER, rid), response_timeout), PublishToDevice(request.device, wire_request)]

    def undeliverable(self, rid: str, now: float) -> list[Action]:
        """The adapter could not publish the request to the device."""
        known = self._by_rid.get(rid)
        if known is None:
            return []
        return self._finish(known, Outcome.OFFLINE, "the hub could not deliver the request to the device", now)

    # -- device answers, presence -----------------------------------------------------------------

    def device_answer(self, device: str | None, response: msg.StreamResponse, now: float) -> list[Action]:
        known = self._by_rid.get(response.rid)
        if known is None or known.device != device:
            log.debug("response from %s for an unknown or finished request", device)
            return []
        if response.status == 200:
            return self._finish(known, Outcome.ACCEPTED, "", now)
        return self._finish(known, Outcome.REJECTED, response.reason or "rejected by the device", now)

    def device_presence(self, device: str | None, presence: msg.Presence, now: float) -> list[Action]:
        """Online replaces the connection nonce; offline counts only from the connection that is current
        (an old connection's late will after a takeover is ignored)."""
        if not device:
            return []
        if presence.online:
            self.presence[device] = presence.conn
            return [Emit(DevicePresence(device, True))]
        if device not in self.presence:
            return [Emit(DevicePresence(device, False, known=False))]
        if self.presence[device] != presence.conn:
            return []
        del self.presence[device]
        actions: list[Action] = [Emit(DevicePresence(device, False))]
        for known in [k for k in self._by_rid.values() if k.device == device]:
            actions += self._finish(known, Outcome.OFFLINE, f"device {device} went offline before answering", now)
        return actions

    def _finish(self, known: KnownStream, outcome: Outcome, reason: str, now: float) -> list[Action]:
        """Answer the service once; the stream goes ACCEPTED (or OPEN) or CLOSED."""
        if self._by_rid.pop(known.rid, None) is None:
            return []
        actions: list[Action] = [Cancel((RESPONSE_TIMER, known.rid))]
        self.slots.answered(known.device)
        if outcome is Outcome.ACCEPTED:
            response = msg.ServiceResponse(rid=known.service_rid, outcome=outcome, url=known.url,
                                           token=known.service_token, stream_id=known.stream_id)
            if known.seen_closed:          # the gateway already saw it end
                self._close(known)
            elif known.seen_open:          # only its close frees the slot
                self._move(known, State.OPEN)
            else:
                # An accepted stream keeps its slot until the gateway reports it closed.  If no side ever
                # reaches the gateway, the slot is freed once both tokens have expired and the gateway's
                # peer wait is over.
                self._move(known, State.ACCEPTED)
                s = self._settings
                actions.append(Schedule((NO_SHOW_TIMER, known.stream_id),
                                        s.join_timeout + s.gateway_peer_timeout + 5))
        else:
            response = msg.ServiceResponse(rid=known.service_rid, outcome=outcome, reason=reason)
            self._close(known)
        actions.append(Answer(known.service, response))
        actions.append(Emit(RequestAnswered(known.device, known.name, known.stream_id, outcome, reason,
                                            (now - known.started) * 1000, operator=known.operator)))
        return actions

    def _close(self, known: KnownStream) -> None:
        self._move(known, State.CLOSED)
        self.slots.release(known.stream_id)
        if self.book.remove(known.stream_id) is not None:
            self._per_operator[known.operator] -= 1
            if self._per_operator[known.operator] <= 0:
                del self._per_operator[known.operator]

    # -- timers -----------------------------------------------------------------------------------

    def timer(self, key: Hashable, now: float) -> list[Action]:
        kind, ident = key  # type: ignore[misc]
        if kind == RESPONSE_TIMER:
            known = self._by_rid.get(ident)
            if known is None:
                return []
            return self._finish(known, Outcome.TIMEOUT,
                                f"timed out waiting for the response from device {known.device} ({known.waited:g} s)",
                                now)
        if kind == NO_SHOW_TIMER:       # no side came: free the slot (a stale timer of an open stream does nothing)
            return self.stream_closed(ident) if self.state(ident) is State.ACCEPTED else []
        return []

    def shutdown(self, now: float) -> list[Action]:
        """The hub stops: answer every pending request, stop every timer."""
        actions: list[Action] = []
        for known in list(self._by_rid.values()):
            actions += self._finish(known, Outcome.TIMEOUT, "the hub is shutting down", now)
        for known in self.book.all():
            if known.state is State.ACCEPTED:
                actions.append(Cancel((NO_SHOW_TIMER, known.stream_id)))
        return actions

    # -- gateway events ---------------------------------------------------------------------------

    def gateway_event(self, event: msg.GatewayEvent) -> list[Action]:
        """A standalone gateway's report (the built-in one calls the methods below directly)."""
        if event.event == "opened":
            return self.stream_opened(event.stream_id)
        return self.stream_ended(stream_id=event.stream_id, device=event.device, name=event.name,
                                 reason=event.reason, bytes_to_device=event.bytes_to_device,
                                 bytes_to_service=event.bytes_to_service, duration=event.duration,
                                 service_host=event.service_host)

    def _gateway_with_room(self, advance: bool) -> str | None:
        """The next gateway in turn that can take one more stream (None: all are full)."""
        gateways = self._gateways()
        for i in range(len(gateways)):
            at = (self._next_gateway + i) % len(gateways)
            gateway = gateways[at].rstrip("/")
            if self.slots.has_room(gateway):
                if advance:
                    self._next_gateway = at + 1
                return gateway
        return None

    def gateway_capacity(self, gateway: str, max_streams: int) -> None:
        """A gateway this hub sends streams to can hold ``max_streams`` (its own limit)."""
        gateway = gateway.rstrip("/")
        if gateway in (g.rstrip("/") for g in self._gateways()):
            self.slots.capacity[gateway] = max_streams

    def gateway_stats(self, stats: msg.GatewayStats) -> None:
        if stats.url and stats.max_streams:
            self.gateway_capacity(stats.url, stats.max_streams)
        for stream_id, to_device, to_service in stats.streams:
            known = self.book.get(stream_id)
            if known is not None:
                known.bytes = (to_device, to_service)

    def stream_opened(self, stream_id: str) -> list[Action]:
        """The gateway saw a side arrive: from now on only its close frees the slot."""
        known = self.book.get(stream_id)
        if known is None:
            return []
        if known.state is State.PENDING:     # the device's answer is still on its way
            known.seen_open = True
            return []
        if known.state is State.ACCEPTED and self._move(known, State.OPEN):
            return [Cancel((NO_SHOW_TIMER, stream_id))]
        return []

    def stream_closed(self, stream_id: str) -> list[Action]:
        """Free the stream's slot (a gateway close or the no-show timer); a second call does nothing."""
        known = self.book.get(stream_id)
        if known is None:
            self.slots.release(stream_id)
            return []
        if known.state in (State.REQUESTED, State.PENDING):  # the service is still owed its answer
            known.seen_closed = True
            self.slots.release(stream_id)
            return []
        actions: list[Action] = [Cancel((NO_SHOW_TIMER, stream_id))] if known.state is State.ACCEPTED else []
        self._close(known)
        return actions

    def stream_ended(self, *, stream_id: str, device: str, name: str, reason: str, bytes_to_device: int,
                     bytes_to_service: int, duration: float, service_host: str = "") -> list[Action]:
        """A stream closed at a gateway: free its slot and write it to the activity log (once)."""
        known = self.book.get(stream_id)
        operator = known.operator if known is not None else ""
        actions = self.stream_closed(stream_id)
        if stream_id in self._ended:
            return actions
        self._ended[stream_id] = None
        while len(self._ended) > _ENDED_MEMORY:
            self._ended.popitem(last=False)
        actions.append(Emit(StreamClosed(stream_id, device, name, reason, bytes_to_device, bytes_to_service,
                                         round(duration, 3), service_host=service_host, operator=operator)))
        return actions

    # -- revocation -------------------------------------------------------------------------------

    def devices_in_book(self) -> set[str]:
        return {k.device for k in self.book.all()}

    def operators_in_book(self) -> set[str]:
        return self.book.operators()

    def check_revocations(self, devices: dict[str, Device | None], operators: "dict[str, Operator | None]",
                          kicked_devices: dict[str, str] | None, now: float,
                          wall: float) -> tuple[int, list[Action]]:
        """After a registry change (or an operator's expiry): end every stream the registry no longer admits.

        ``devices`` and ``operators``: the registry's record of every device in
        ``devices_in_book()`` and operator in ``operators_in_book()``;
        ``kicked_devices`` (device -> reason): devices whose MQTT session was just
        dropped: gateways also end any open stream of theirs the core does not know
        (one that outlived a hub restart, at a standalone gateway).
        """
        by_reason: dict[tuple[str, Outcome, str], list[KnownStream]] = {}
        for stream, outcome, reason, device_wide in self.book.revoked(devices, operators, wall):
            device = stream.device if device_wide else ""   # a device's revocation ends all its streams
            by_reason.setdefault((device, outcome, reason), []).append(stream)
        covered = {device for device, _, _ in by_reason}
        for device, reason in (kicked_devices or {}).items():
            if device not in covered:
                by_reason[(device, Outcome.UNAUTHORIZED, reason)] = []
        ended = 0
        actions: list[Action] = []
        for (device, outcome, reason), streams in by_reason.items():
            ended += len(streams)
            actions += self._end_streams(streams, outcome, reason, now, device=device)
        return ended, actions

    def close_stream(self, stream_id: str, reason: str, now: float) -> tuple[bool, list[Action]]:
        """An operator's ``devstreams streams close``; False if the core did not know the stream."""
        known = self.book.get(stream_id)
        actions = self._end_streams([known] if known else [], Outcome.UNAUTHORIZED, reason, now,
                                    unknown=() if known else (stream_id,))
        return known is not None, actions

    def _end_streams(self, streams: list[KnownStream], outcome: Outcome, reason: str, now: float, *,
                     device: str = "", unknown: tuple[str, ...] = ()) -> list[Action]:
        actions: list[Action] = []
        ids = {k.stream_id for k in streams}
        for known in [k for k in self._by_rid.values() if k.stream_id in ids]:
            actions += self._finish(known, outcome, reason, now)     # answers the service, frees the slot
        for known in streams:
            if known.state is State.ACCEPTED:                         # no gateway holds it: free it here
                actions += self.stream_closed(known.stream_id)
        if streams or device:
            log.info("ending %d stream(s)%s: %s", len(streams), f" of device {device}" if device else "", reason)
        ordered = sorted(ids) + list(unknown)
        chunks = [ordered[i:i + msg.MAX_CONTROL_STREAMS] for i in range(0, len(ordered), msg.MAX_CONTROL_STREAMS)]
        for n, chunk in enumerate(chunks or [[]]):
            if not chunk and not device:
                continue
            actions.append(CloseStreams(msg.GatewayControl(streams=tuple(chunk), device=device if n == 0 else "",
                                                           reason=reason[:120])))
        return actions
