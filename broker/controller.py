"""The stream controller: negotiates streams between services and devices over MQTT.

It is an ordinary MQTT client of the broker (it logs in as ``hub:controller``),
so it could run against any broker that enforces the same ACL.  Flow for one
request (seed 002 steps 2, 3 and 5):

    service --req--> controller: checks device, presence, limits; mints two tokens
    controller --req--> device: url + device token        (wait <= response_timeout)
    device --res 200/400--> controller
    controller --res--> service: accepted (url + service token) | rejected | error

Every request ends in exactly one answer to the service and one activity-log row.
"""

import asyncio
import itertools
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from wire import messages as msg
from wire import sas, streamtoken, topics
from wire.messages import Outcome
from wire.mqtt import CONTROL_QOS, MqttSession
from wire.streamproto import stream_url

from .auth import CONTROLLER_RESOURCE
from .limits import StreamSlots, TokenBucket
from .registry import Registry
from .settings import HubSettings

log = logging.getLogger(__name__)

CONTROLLER_TOKEN_TTL = 24 * 3600


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
        self._mqtt = MqttSession(
            client_id=topics.CONTROLLER_USER, host=mqtt_host, port=mqtt_port,
            username=topics.CONTROLLER_USER,
            password=lambda: sas.make_token(controller_key, CONTROLLER_RESOURCE, CONTROLLER_TOKEN_TTL),
            ssl_context=ssl_context, on_message=self._on_message, keepalive=30,
            subscriptions=(topics.ALL_DEVICE_STATUS, topics.ALL_DEVICE_RESPONSES, topics.ALL_SERVICE_REQUESTS,
                           topics.ALL_GATEWAY_EVENTS))

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
        try:
            request = msg.decode_service_request(payload)
        except msg.MessageError as exc:
            rid = _rid_of(payload)
            if rid:
                self._answer(service, msg.ServiceResponse(rid=rid, outcome=Outcome.BAD_REQUEST, reason=str(exc)))
            raise
        started = time.monotonic()
        refusal = self._admission(request)
        if refusal is not None:
            outcome, reason = refusal
            self._answer(service, msg.ServiceResponse(rid=request.rid, outcome=outcome, reason=reason))
            self._log(request.device, request.name, None, outcome, reason, started)
            return
        self._send_to_device(service, request, started)

    # -- negotiation -----------------------------------------------------------------------------

    def _admission(self, request: msg.ServiceRequest) -> tuple[Outcome, str] | None:
        device = self._registry.get(request.device)
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

    def _send_to_device(self, service: str, request: msg.ServiceRequest, started: float) -> None:
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
        else:
            response = msg.ServiceResponse(rid=pending.service_rid, outcome=outcome, reason=reason)
            self._slots.release(pending.stream_id)
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

    def stream_closed(self, stream_id: str) -> None:
        timer = self._accepted.pop(stream_id, None)
        if timer is not None:
            timer.cancel()
        self._slots.release(stream_id)

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
