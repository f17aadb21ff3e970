"""The stream controller: the MQTT adapter around the negotiation core.

It is an ordinary MQTT client of the broker: the embedded one, or any external
broker that asks the hub's auth hook (broker/authhook.py).  It logs in as
``hub:controller`` with a client id of its own (``hub:controller:<instance>``), so
several controllers share one broker without taking over each other's session.

Several controllers (``shared=True``, external brokers): service requests come
through the shared subscription ``$share/devstreams/...``, so each is handled by
exactly one controller.  Everything else reaches every controller: device answers
(the one that asked knows the request id; the others ignore it), presence (each
keeps its own view), gateway events (the controller that negotiated a stream frees
its slot; the activity log keeps one row per stream id) and gateway controls
(each applies them to its built-in gateway; closing twice is a no-op).  Flow for one
request (seed 002 steps 2, 3 and 5):

    service --req--> controller: checks device, presence, limits; mints two tokens
    controller --req--> device: url + device token        (wait <= response_timeout)
    device --res 200/400--> controller
    controller --res--> service: accepted (url + service token) | rejected | error

Every decision lives in ``broker.negotiation.Negotiation`` (sans-I/O, unit-tested
in tests/test_negotiation_core.py).  This module only does the I/O: it decodes
topics and payloads into calls on the core, looks devices up in the registry,
and carries out the actions the core returns -- MQTT publishes, timers
(``loop.call_later`` keyed by the action's key), activity-log and presence writes
to the registry (a failing disk is logged, never raised), and gateway controls.

Every request ends in exactly one answer to the service and one activity-log row,
except requests refused by the per-connection rate limit (a flood): those are
answered but only counted, in a log line at most once per ``disk_error_log_interval``.

Revocation: the core remembers every stream it negotiated (``StreamBook``).
When the registry changes (the hub's watcher calls ``check_revocations``, also when
an operator's expiry passes) every stream whose device was disabled, removed or
re-keyed, or whose operator was removed, disabled, re-keyed, expired or lost the
device or stream from its scope, ends: pending requests are answered, and every gateway is told to close
the stream with CLOSE_REVOKED and refuse its unused tokens
(``devstreams.wire.topics.gateway_control``).
"""

import asyncio
import functools
import json
import logging
import time
import uuid
from collections.abc import Callable, Hashable, Iterable

from devstreams.wire import messages as msg
from devstreams.wire import sas, streamtoken, topics
from devstreams.wire.events import EventSink, StreamClosed, StreamOpened
from devstreams.transport.mqtt import CONTROL_QOS, MqttSession

from . import negotiation as core
from .auth import CONTROLLER_RESOURCE
from .negotiation import KnownStream, Negotiation, StreamBook, key_digest  # noqa: F401 (re-exported)
from .registry import Registry
from .settings import HubSettings

log = logging.getLogger(__name__)

CONTROLLER_TOKEN_TTL = 24 * 3600
SHARE_PREFIX = "$share/devstreams/"   # MQTT 5 / Mosquitto / EMQX shared subscription group of all controllers


class StreamController:
    def __init__(self, settings: HubSettings, registry: Registry, *, controller_key: bytes,
                 signing_key: bytes, mqtt_host: str, mqtt_port: int, ssl_context,
                 gateways: Callable[[], list[str]], instance: str | None = None, shared: bool = False,
                 peer: str = "hub"):
        self._settings = settings
        self._registry = registry
        self._core = Negotiation(settings, mint=functools.partial(streamtoken.mint, signing_key),
                                 new_id=lambda: uuid.uuid4().hex, gateways=gateways)
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        # Stream events (the core's Emit actions) go to one sink; the activity log and presence
        # writer is its first subscriber, later ones (metrics) subscribe to ``events`` too.
        self.events = EventSink(log_interval=settings.disk_error_log_interval)
        self.events.subscribe(self._write_registry)
        self.on_gateway_control: Callable[[msg.GatewayControl], object] | None = None  # the built-in gateway
        self.instance = instance or uuid.uuid4().hex[:12]
        requests = (SHARE_PREFIX if shared else "") + topics.ALL_SERVICE_REQUESTS
        self._mqtt = MqttSession(
            client_id=topics.controller_client_id(self.instance), host=mqtt_host, port=mqtt_port,
            username=topics.CONTROLLER_USER,
            password=lambda: sas.make_token(controller_key, CONTROLLER_RESOURCE, CONTROLLER_TOKEN_TTL),
            ssl_context=ssl_context, on_message=self._on_message, keepalive=30, peer=peer,
            subscriptions=(topics.ALL_DEVICE_STATUS, topics.ALL_DEVICE_RESPONSES, requests,
                           topics.ALL_GATEWAY_EVENTS, topics.ALL_GATEWAY_STATS, topics.gateway_control()))

    async def start(self, timeout: float | None = 30.0) -> None:
        """Connect and subscribe.  ``timeout=None``: do not wait (an external broker may be down;
        the session logs one line per cause and keeps retrying)."""
        if timeout is None:
            self._mqtt.start_in_background()
        else:
            await self._mqtt.start(timeout=timeout)

    @property
    def connected(self) -> bool:
        return self._mqtt.ever_connected and self._mqtt.connected

    def publish(self, topic: str, payload: bytes) -> bool:
        """For the broker backend: e.g. a kick request to an external broker's plugin."""
        return self._mqtt.publish(topic, payload, qos=CONTROL_QOS)

    async def stop(self) -> None:
        self._apply(self._core.shutdown(time.monotonic()))
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        await self._mqtt.stop()

    @property
    def online_devices(self) -> set[str]:
        return set(self._core.presence)

    @property
    def _presence(self) -> dict[str, str]:
        """Device id -> connection nonce (tests read it)."""
        return self._core.presence

    @property
    def open_streams(self) -> int:
        return self._core.open_streams

    # -- inbound ---------------------------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            if topic.endswith("/status"):
                if payload:
                    device = topics.device_of(topic)
                    if device:
                        self._apply(self._core.device_presence(device, msg.decode_presence(payload),
                                                               time.monotonic()))
            elif topic.endswith("/streams/res"):
                self._apply(self._core.device_answer(topics.device_of(topic), msg.decode_stream_response(payload),
                                                     time.monotonic()))
            elif topic.endswith("/req"):
                self._on_service_request(topics.service_of(topic), payload)
            elif topic.endswith("/events"):
                self._apply(self._core.gateway_event(msg.decode_gateway_event(payload)))
            elif topic.endswith("/stats"):
                self._core.gateway_stats(msg.decode_gateway_stats(payload))
            elif topic == topics.gateway_control():  # ours or another controller's: closing twice is a no-op
                if self.on_gateway_control is not None:
                    self.on_gateway_control(msg.decode_gateway_control(payload))
        except msg.MessageError as exc:
            log.warning("ignoring a bad message on %s: %s", topic, exc)
        except Exception:
            log.exception("error handling a message on %s", topic)

    def _on_service_request(self, service: topics.Service | None, payload: bytes) -> None:
        if not service:
            return
        started = time.monotonic()
        if not self._core.within_rate(service, started):  # a flood: answer LIMIT at once, no database work
            self._apply(self._core.refuse_flood(service, _rid_of(payload), started))
            return
        try:
            request = msg.decode_service_request(payload)
        except msg.MessageError as exc:
            self._apply(self._core.bad_request(service, _rid_of(payload), str(exc)))
            raise
        device = self._registry.get(request.device)
        operator = self._registry.operator(service.policy)
        self._apply(self._core.service_request(service, request, device, operator=operator, now=time.monotonic(),
                                               wall=time.time(), started=started))

    # -- gateway callbacks (the built-in gateway, via hub.py) ------------------------------------

    def stream_ended(self, *, stream_id: str, device: str, name: str, reason: str, bytes_to_device: int,
                     bytes_to_service: int, duration: float, service_host: str = "") -> None:
        """A stream closed at a gateway: free its slot and write it to the activity log."""
        self._apply(self._core.stream_ended(stream_id=stream_id, device=device, name=name, reason=reason,
                                            bytes_to_device=bytes_to_device, bytes_to_service=bytes_to_service,
                                            duration=duration, service_host=service_host))

    def stream_opened(self, stream_id: str) -> None:
        """The gateway saw a side arrive: from now on only its close frees the slot."""
        self._apply(self._core.stream_opened(stream_id))

    def stream_closed(self, stream_id: str) -> None:
        self._apply(self._core.stream_closed(stream_id))

    # -- revocation ------------------------------------------------------------------------------

    def known_streams(self) -> list[KnownStream]:
        return self._core.book.all()

    def check_revocations(self, kicked_devices: dict[str, str] | None = None) -> int:
        """After a registry change: end every stream the registry no longer admits; return how many.

        ``kicked_devices`` (device -> reason) are devices whose MQTT session was just
        dropped: gateways also end any open stream of theirs the controller does
        not know (one that outlived a hub restart, at a standalone gateway).
        """
        devices = {d: self._registry.get(d) for d in self._core.devices_in_book()}
        operators = {o: self._registry.operator(o) for o in self._core.operators_in_book()}
        ended, actions = self._core.check_revocations(devices, operators, kicked_devices, time.monotonic(),
                                                      time.time())
        self._apply(actions)
        return ended

    def close_stream(self, stream_id: str, reason: str = "stream closed by an operator") -> bool:
        """An operator's ``devstreams streams close``; False if the controller did not know the stream."""
        known, actions = self._core.close_stream(stream_id, reason, time.monotonic())
        self._apply(actions)
        return known

    # -- outbound: carrying out the core's actions -----------------------------------------------

    def _apply(self, actions: Iterable[core.Action]) -> None:
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            try:
                queue[:0] = self._do(action)
            except Exception:
                log.exception("could not carry out %s", type(action).__name__)

    def _do(self, action: core.Action) -> list[core.Action]:
        if isinstance(action, core.Answer):
            self._mqtt.publish(topics.service_responses(action.service), msg.encode(action.response),
                               qos=CONTROL_QOS)
        elif isinstance(action, core.PublishToDevice):
            if not self._mqtt.publish(topics.device_requests(action.device), msg.encode(action.request),
                                      qos=CONTROL_QOS):
                return self._core.undeliverable(action.request.rid, time.monotonic())
        elif isinstance(action, core.Schedule):
            old = self._timers.pop(action.key, None)
            if old is not None:
                old.cancel()
            self._timers[action.key] = asyncio.get_running_loop().call_later(action.delay, self._fire, action.key)
        elif isinstance(action, core.Cancel):
            timer = self._timers.pop(action.key, None)
            if timer is not None:
                timer.cancel()
        elif isinstance(action, core.Emit):
            self.events.emit(action.event)
        elif isinstance(action, core.CloseStreams):
            self._mqtt.publish(topics.gateway_control(), msg.encode(action.control), qos=CONTROL_QOS)
            if self.on_gateway_control is not None:
                try:
                    self.on_gateway_control(action.control)
                except Exception:
                    log.exception("the built-in gateway failed to apply a revocation")
        return []

    def _fire(self, key: Hashable) -> None:
        self._timers.pop(key, None)
        self._apply(self._core.timer(key, time.monotonic()))

    def gateway_capacity(self, gateway: str, max_streams: int) -> None:
        """The built-in gateway's limit (a standalone gateway says its own in its stats)."""
        self._core.gateway_capacity(gateway, max_streams)

    def on_gateway_event(self, event) -> None:
        """A subscriber for a gateway's ``EventSink`` (the built-in gateway, via hub.py)."""
        if isinstance(event, StreamOpened):
            self.stream_opened(event.stream_id)
        elif isinstance(event, StreamClosed):
            self.stream_ended(stream_id=event.stream_id, device=event.device, name=event.name, reason=event.reason,
                              bytes_to_device=event.bytes_to_device, bytes_to_service=event.bytes_to_service,
                              duration=event.duration, service_host=event.service_host)

    def _write_registry(self, event) -> None:
        """The activity log and presence writer: the sink logs a failing disk, rate-limited."""
        if isinstance(event, core.RequestAnswered):
            log.info("stream request %s/%s by %s: %s in %.1f ms%s", event.device, event.name, event.operator,
                     event.outcome.value, event.latency_ms, f" ({event.reason})" if event.reason else "")
            self._registry.log_request(device=event.device, name=event.name, stream_id=event.stream_id,
                                       outcome=event.outcome.value, reason=event.reason,
                                       latency_ms=round(event.latency_ms, 2), operator=event.operator)
        elif isinstance(event, core.StreamClosed):
            self._registry.log_stream(device=event.device, name=event.name, stream_id=event.stream_id,
                                      reason=event.reason, bytes_to_device=event.bytes_to_device,
                                      bytes_to_service=event.bytes_to_service, duration_s=event.duration,
                                      operator=event.operator, client_host=event.service_host)
        elif isinstance(event, core.DevicePresence) and not event.known:
            self._registry.clear_online(event.device)   # a stale 'online' row, if any; last_seen stays
        elif isinstance(event, core.DevicePresence):
            log.info("device %s is %s", event.device, "online" if event.online else "offline")
            self._registry.set_presence(event.device, event.online)


def _rid_of(payload: bytes) -> str | None:
    """Best effort: the request id of a message that failed validation, to answer it."""
    try:
        rid = json.loads(payload).get("rid")
        return rid if isinstance(rid, str) and 0 < len(rid) <= 64 else None
    except Exception:
        return None
