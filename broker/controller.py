"""The stream controller: negotiates streams between services and devices over MQTT.

It is an ordinary MQTT client of the broker (it logs in as ``hub:controller``),
so it could run against any broker that enforces the same ACL.  Flow for one
request (seed 002 steps 2, 3 and 5):

    service --req--> controller: checks device, presence, limits; mints two tokens
    controller --req--> device: url + device token        (wait <= response_timeout)
    device --res 200/400--> controller
    controller --res--> service: accepted (url + service token) | rejected | error

Every request ends in exactly one answer to the service and one activity-log row,
except requests refused by the per-connection rate limit (a flood): those are
answered but only counted, in a log line at most once per ``disk_error_log_interval``.

Revocation: the controller remembers every stream it negotiated (``StreamBook``):
device, service client id, gateway, and digests of the device key and the
service key it was admitted under.  When the registry changes (the hub's
watcher calls ``check_revocations``) every stream whose device was disabled,
removed or re-keyed, or whose service key was rotated, ends: pending requests
are answered, and every gateway is told to close the stream with
CLOSE_REVOKED and refuse its unused tokens (``wire.topics.gateway_control``).
"""

import asyncio
import hashlib
import itertools
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from wire import messages as msg
from wire import sas, streamtoken, topics
from wire.messages import Outcome
from wire.mqtt import CONTROL_QOS, MqttSession
from wire.streamproto import stream_url

from .auth import CONTROLLER_RESOURCE
from .limits import EveryInterval, KeyedBuckets, StreamSlots, TokenBucket
from .registry import Device, Registry
from .settings import HubSettings

log = logging.getLogger(__name__)

CONTROLLER_TOKEN_TTL = 24 * 3600


def key_digest(key: bytes | None) -> bytes:
    """Enough of a key to notice it changed, without keeping the key."""
    return hashlib.sha256(key or b"").digest()[:16]


@dataclass
class KnownStream:
    """A stream the controller negotiated: pending, accepted, or open at a gateway."""

    stream_id: str
    device: str
    name: str
    service: str            # the requesting service's MQTT client id
    gateway: str
    device_key: bytes       # key_digest of the device key it was admitted under
    service_key: bytes      # key_digest of the service key then in force
    created: float          # wall clock
    accepted: bool = False
    opened: bool = False
    bytes: tuple[int, int] | None = None  # (to device, to service) as a standalone gateway last reported


SERVICE_KEY_ROTATED = "service key rotated"


def revocation(stream: KnownStream, device: Device | None, service_key: bytes) -> tuple[Outcome, str] | None:
    """Why ``stream`` may no longer flow given the registry now, or None."""
    if device is None:
        return Outcome.NOT_FOUND, f"device {stream.device} removed"
    if not device.enabled:
        return Outcome.DISABLED, f"device {stream.device} disabled"
    if key_digest(device.key) != stream.device_key:
        return Outcome.UNAUTHORIZED, f"device {stream.device} key rotated"
    if service_key != stream.service_key:
        return Outcome.UNAUTHORIZED, SERVICE_KEY_ROTATED
    return None


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

    def revoked(self, devices: dict[str, Device | None], service_key: bytes
                ) -> list[tuple[KnownStream, Outcome, str]]:
        """The streams to end now; ``devices`` holds the registry entry of each device in the book."""
        found = []
        for stream in self._streams.values():
            why = revocation(stream, devices.get(stream.device), service_key)
            if why is not None:
                found.append((stream, *why))
        return found

    def __len__(self) -> int:
        return len(self._streams)


@dataclass
class _Pending:
    rid: str
    service: str          # the requesting service's client id
    service_rid: str
    device: str
    name: str
    stream_id: str
    started: float
    service_token: str
    url: str
    timer: asyncio.TimerHandle | None = None


class StreamController:
    def __init__(self, settings: HubSettings, registry: Registry, *, controller_key: bytes,
                 signing_key: bytes, mqtt_host: str, mqtt_port: int, ssl_context,
                 gateways: Callable[[], list[str]]):
        self._settings = settings
        self._registry = registry
        self._signing_key = signing_key
        self._gateways = gateways
        self._gateway_cycle = itertools.count()
        self._presence: dict[str, str] = {}          # device id -> connection nonce
        self._pending: dict[str, _Pending] = {}      # hub rid -> request
        self._accepted: dict[str, asyncio.TimerHandle] = {}  # stream id -> no-show timer
        self._bucket = TokenBucket(settings.max_new_streams_per_second, settings.new_streams_burst)
        self._slots = StreamSlots(settings.max_concurrent_streams, settings.max_pending_per_device)
        self._service_buckets = KeyedBuckets(settings.service_requests_per_second, settings.service_requests_burst)
        self._flood_log = EveryInterval(settings.disk_error_log_interval)
        self._flooded: dict[str, int] = {}           # client id -> refusals since the last log line
        self._book = StreamBook()
        self._service_key = key_digest(registry.policy_key())
        self.on_gateway_control: Callable[[msg.GatewayControl], object] | None = None  # the built-in gateway
        self._mqtt = MqttSession(
            client_id=topics.CONTROLLER_USER, host=mqtt_host, port=mqtt_port,
            username=topics.CONTROLLER_USER,
            password=lambda: sas.make_token(controller_key, CONTROLLER_RESOURCE, CONTROLLER_TOKEN_TTL),
            ssl_context=ssl_context, on_message=self._on_message, keepalive=30,
            subscriptions=(topics.ALL_DEVICE_STATUS, topics.ALL_DEVICE_RESPONSES, topics.ALL_SERVICE_REQUESTS,
                           topics.ALL_GATEWAY_EVENTS, topics.ALL_GATEWAY_STATS))

    async def start(self) -> None:
        await self._mqtt.start(timeout=30)

    async def stop(self) -> None:
        for pending in list(self._pending.values()):
            self._finish(pending, Outcome.TIMEOUT, "the hub is shutting down")
        for timer in self._accepted.values():
            timer.cancel()
        await self._mqtt.stop()

    @property
    def online_devices(self) -> set[str]:
        return set(self._presence)

    @property
    def open_streams(self) -> int:
        return len(self._slots)

    # -- inbound ---------------------------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            if topic.endswith("/status"):
                self._on_presence(topics.device_of(topic), payload)
            elif topic.endswith("/streams/res"):
                self._on_device_response(topics.device_of(topic), payload)
            elif topic.endswith("/req"):
                self._on_service_request(topics.service_of(topic), payload)
            elif topic.endswith("/events"):
                self._on_gateway_event(payload)
            elif topic.endswith("/stats"):
                for stream_id, to_device, to_service in msg.decode_gateway_stats(payload).streams:
                    known = self._book.get(stream_id)
                    if known is not None:
                        known.bytes = (to_device, to_service)
        except msg.MessageError as exc:
            log.warning("ignoring a bad message on %s: %s", topic, exc)
        except Exception:
            log.exception("error handling a message on %s", topic)

    def _on_presence(self, device: str | None, payload: bytes) -> None:
        if not device or not payload:
            return
        presence = msg.decode_presence(payload)
        if presence.online:
            self._presence[device] = presence.conn
            self._registry.set_presence(device, True)
            log.info("device %s is online", device)
        elif self._presence.get(device) == presence.conn:
            del self._presence[device]
            self._registry.set_presence(device, False)
            log.info("device %s is offline", device)
            for pending in [p for p in self._pending.values() if p.device == device]:
                self._finish(pending, Outcome.OFFLINE, f"device {device} went offline before answering")

    def _on_device_response(self, device: str | None, payload: bytes) -> None:
        response = msg.decode_stream_response(payload)
        pending = self._pending.get(response.rid)
        if pending is None or pending.device != device:
            log.debug("response from %s for an unknown or finished request", device)
            return
        if response.status == 200:
            self._finish(pending, Outcome.ACCEPTED, "")
        else:
            self._finish(pending, Outcome.REJECTED, response.reason or "rejected by the device")

    def _on_service_request(self, service: str | None, payload: bytes) -> None:
        if not service:
            return
        started = time.monotonic()
        if not self._service_buckets.take(service, started):
            self._refuse_flood(service, payload)
            return
        try:
            request = msg.decode_service_request(payload)
        except msg.MessageError as exc:
            rid = _rid_of(payload)
            if rid:
                self._answer(service, msg.ServiceResponse(rid=rid, outcome=Outcome.BAD_REQUEST, reason=str(exc)))
            raise
        device = self._registry.get(request.device)
        refusal = self._admission(request, device)
        if refusal is not None:
            outcome, reason = refusal
            self._answer(service, msg.ServiceResponse(rid=request.rid, outcome=outcome, reason=reason))
            self._log(request.device, request.name, None, outcome, reason, started)
            return
        self._send_to_device(service, request, started, device)

    def _refuse_flood(self, service: str, payload: bytes) -> None:
        """Over this connection's rate: answer LIMIT at once, no database work, one log line a minute."""
        rid = _rid_of(payload)
        if rid:
            s = self._settings
            self._answer(service, msg.ServiceResponse(
                rid=rid, outcome=Outcome.LIMIT,
                reason=(f"this connection's limit of {s.service_requests_per_second:g} stream requests per second "
                        f"(burst {s.service_requests_burst}, service_requests_per_second) is reached; "
                        "retry shortly")))
        self._flooded[service] = self._flooded.get(service, 0) + 1
        ready, _ = self._flood_log.ready(time.monotonic())
        if ready:
            worst = sorted(self._flooded.items(), key=lambda kv: -kv[1])[:5]
            log.warning("refused stream requests over the per-connection rate limit: %s",
                        ", ".join(f"{cid} {n}" for cid, n in worst))
            self._flooded.clear()

    # -- negotiation -----------------------------------------------------------------------------

    def _admission(self, request: msg.ServiceRequest, device: Device | None) -> tuple[Outcome, str] | None:
        if device is None:
            return Outcome.NOT_FOUND, f"device {request.device} is not registered on this hub"
        if not device.enabled:
            return Outcome.DISABLED, f"device {request.device} is disabled"
        if request.device not in self._presence:
            return Outcome.OFFLINE, f"device {request.device} is not connected to the hub"
        refusal = self._slots.refusal(request.device)
        if refusal:
            return Outcome.LIMIT, refusal
        if not self._bucket.take(time.monotonic()):
            return Outcome.LIMIT, (f"the hub's limit of {self._settings.max_new_streams_per_second:g} "
                                   "new streams per second is reached; retry shortly")
        return None

    def _pick_gateway(self) -> str:
        gateways = self._gateways()
        return gateways[next(self._gateway_cycle) % len(gateways)].rstrip("/")

    def _send_to_device(self, service: str, request: msg.ServiceRequest, started: float, device: Device) -> None:
        s = self._settings
        response_timeout = min(request.response_timeout, s.response_timeout)
        connect_timeout = min(request.connect_timeout, s.connect_timeout)
        stream_id = uuid.uuid4().hex
        rid = uuid.uuid4().hex[:16]
        gateway = self._pick_gateway()
        url = stream_url(gateway, stream_id)
        ttl = response_timeout + connect_timeout

        def token(side: streamtoken.Side) -> str:
            return streamtoken.mint(self._signing_key, stream_id=stream_id, side=side, audience=gateway,
                                    ttl=ttl, device_id=request.device, stream_name=request.name)

        pending = _Pending(rid=rid, service=service, service_rid=request.rid, device=request.device,
                           name=request.name, stream_id=stream_id, started=started,
                           service_token=token(streamtoken.Side.SERVICE), url=url)
        self._pending[rid] = pending
        self._book.add(KnownStream(stream_id=stream_id, device=request.device, name=request.name, service=service,
                                   gateway=gateway, device_key=key_digest(device.key),
                                   service_key=self._service_key, created=time.time()))
        self._slots.hold(stream_id, request.device)
        wire_request = msg.StreamRequest(rid=rid, stream_id=stream_id, name=request.name, url=url,
                                         token=token(streamtoken.Side.DEVICE),
                                         expires=time.time() + response_timeout)
        pending.timer = asyncio.get_running_loop().call_later(
            response_timeout, self._expire, rid, response_timeout)
        if not self._mqtt.publish(topics.device_requests(request.device), msg.encode(wire_request), qos=CONTROL_QOS):
            self._finish(pending, Outcome.OFFLINE, "the hub could not deliver the request to the device")

    def _expire(self, rid: str, waited: float) -> None:
        pending = self._pending.get(rid)
        if pending is not None:
            self._finish(pending, Outcome.TIMEOUT,
                         f"timed out waiting for the response from device {pending.device} ({waited:g} s)")

    def _finish(self, pending: _Pending, outcome: Outcome, reason: str) -> None:
        if self._pending.pop(pending.rid, None) is None:
            return
        if pending.timer is not None:
            pending.timer.cancel()
        self._slots.answered(pending.device)
        if outcome is Outcome.ACCEPTED:
            response = msg.ServiceResponse(rid=pending.service_rid, outcome=outcome, url=pending.url,
                                           token=pending.service_token, stream_id=pending.stream_id)
            self._hold_until_closed(pending.stream_id)
            known = self._book.get(pending.stream_id)
            if known is not None:
                known.accepted = True
        else:
            response = msg.ServiceResponse(rid=pending.service_rid, outcome=outcome, reason=reason)
            self._slots.release(pending.stream_id)
            self._book.remove(pending.stream_id)
        self._answer(pending.service, response)
        self._log(pending.device, pending.name, pending.stream_id, outcome, reason, pending.started)

    def _hold_until_closed(self, stream_id: str) -> None:
        """An accepted stream keeps its slot until the gateway reports it closed.

        If no side ever reaches the gateway, the slot is freed once both tokens
        have expired and the gateway's peer wait is over.
        """
        s = self._settings
        delay = s.connect_timeout + s.gateway_peer_timeout + 5
        self._accepted[stream_id] = asyncio.get_running_loop().call_later(delay, self.stream_closed, stream_id)

    def _on_gateway_event(self, payload: bytes) -> None:
        """A standalone gateway's report (the built-in one calls the methods below directly)."""
        event = msg.decode_gateway_event(payload)
        if event.event == "opened":
            self.stream_opened(event.stream_id)
        else:
            self.stream_ended(stream_id=event.stream_id, device=event.device, name=event.name, reason=event.reason,
                              bytes_to_device=event.bytes_to_device, bytes_to_service=event.bytes_to_service,
                              duration=event.duration)

    def stream_ended(self, *, stream_id: str, device: str, name: str, reason: str, bytes_to_device: int,
                     bytes_to_service: int, duration: float) -> None:
        """A stream closed at a gateway: free its slot and write it to the activity log."""
        self.stream_closed(stream_id)
        try:
            self._registry.log_stream(device=device, name=name, stream_id=stream_id, reason=reason,
                                      bytes_to_device=bytes_to_device, bytes_to_service=bytes_to_service,
                                      duration_s=round(duration, 3))
        except Exception:
            log.exception("could not log a closed stream")

    def stream_opened(self, stream_id: str) -> None:
        """The gateway saw a side arrive: from now on only its close frees the slot."""
        timer = self._accepted.pop(stream_id, None)
        if timer is not None:
            timer.cancel()
        known = self._book.get(stream_id)
        if known is not None:
            known.opened = True

    def stream_closed(self, stream_id: str) -> None:
        timer = self._accepted.pop(stream_id, None)
        if timer is not None:
            timer.cancel()
        self._slots.release(stream_id)
        self._book.remove(stream_id)

    # -- revocation ------------------------------------------------------------------------------

    def known_streams(self) -> list[KnownStream]:
        return self._book.all()

    def check_revocations(self, kicked_devices: dict[str, str] | None = None) -> int:
        """After a registry change: end every stream the registry no longer admits; return how many.

        ``kicked_devices`` (device -> reason) are devices whose MQTT session was just
        dropped: gateways also end any open stream of theirs the controller does
        not know (one that outlived a hub restart, at a standalone gateway).
        """
        self._service_key = key_digest(self._registry.policy_key())
        devices = {d: self._registry.get(d) for d in {k.device for k in self._book.all()}}
        by_reason: dict[tuple[str, Outcome, str], list[KnownStream]] = {}
        for stream, outcome, reason in self._book.revoked(devices, self._service_key):
            device = "" if reason == SERVICE_KEY_ROTATED else stream.device  # device-wide at gateways
            by_reason.setdefault((device, outcome, reason), []).append(stream)
        covered = {device for device, _, _ in by_reason}
        for device, reason in (kicked_devices or {}).items():
            if device not in covered:
                by_reason[(device, Outcome.UNAUTHORIZED, reason)] = []
        ended = 0
        for (device, outcome, reason), streams in by_reason.items():
            ended += len(streams)
            self._end_streams(streams, outcome, reason, device=device)
        return ended

    def close_stream(self, stream_id: str, reason: str = "stream closed by an operator") -> bool:
        """An operator's ``devstreams streams close``; False if the controller did not know the stream."""
        known = self._book.get(stream_id)
        self._end_streams([known] if known else [], Outcome.UNAUTHORIZED, reason,
                          unknown=() if known else (stream_id,))
        return known is not None

    def _end_streams(self, streams: list[KnownStream], outcome: Outcome, reason: str, *, device: str = "",
                     unknown: tuple[str, ...] = ()) -> None:
        ids = {k.stream_id for k in streams}
        for pending in [p for p in self._pending.values() if p.stream_id in ids]:
            self._finish(pending, outcome, reason)          # answers the service, frees the slot
        for known in streams:
            if known.accepted and not known.opened:          # no gateway holds it: free it here
                self.stream_closed(known.stream_id)
        if streams or device:
            log.info("ending %d stream(s)%s: %s", len(streams), f" of device {device}" if device else "", reason)
        ordered = sorted(ids) + list(unknown)
        chunks = [ordered[i:i + msg.MAX_CONTROL_STREAMS] for i in range(0, len(ordered), msg.MAX_CONTROL_STREAMS)]
        for n, chunk in enumerate(chunks or [[]]):
            if not chunk and not device:
                continue
            control = msg.GatewayControl(streams=tuple(chunk), device=device if n == 0 else "", reason=reason[:120])
            self._mqtt.publish(topics.gateway_control(), msg.encode(control), qos=CONTROL_QOS)
            if self.on_gateway_control is not None:
                try:
                    self.on_gateway_control(control)
                except Exception:
                    log.exception("the built-in gateway failed to apply a revocation")

    # -- outbound --------------------------------------------------------------------------------

    def _answer(self, service: str, response: msg.ServiceResponse) -> None:
        self._mqtt.publish(topics.service_responses(service), msg.encode(response), qos=CONTROL_QOS)

    def _log(self, device: str, name: str, stream_id: str | None, outcome: Outcome, reason: str,
             started: float) -> None:
        latency_ms = (time.monotonic() - started) * 1000
        log.info("stream request %s/%s: %s in %.1f ms%s", device, name, outcome.value, latency_ms,
                 f" ({reason})" if reason else "")
        try:
            self._registry.log_request(device=device, name=name, stream_id=stream_id, outcome=outcome.value,
                                       reason=reason, latency_ms=round(latency_ms, 2))
        except Exception:
            log.exception("could not write the activity log")


def _rid_of(payload: bytes) -> str | None:
    """Best effort: the request id of a message that failed validation, to answer it."""
    try:
        rid = json.loads(payload).get("rid")
        return rid if isinstance(rid, str) and 0 < len(rid) <= 64 else None
    except Exception:
        return None
