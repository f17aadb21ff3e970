"""A standalone gateway tells the hub about its streams over MQTT.

The hub needs two facts from every gateway: a stream's first side arrived (its
concurrency slot stays taken) and a stream ended (free the slot, write bytes,
duration and reason to the activity log).  The built-in gateway calls the
controller directly; a gateway elsewhere logs in to the broker as
``hub:gateway`` with a token signed by the stream-signing key it already holds.
Reports made while the hub is unreachable are dropped (and logged).

The same session carries the hub's orders the other way: on the gateway control
topic the hub says which streams to end (a device was disabled or re-keyed, the
service key was rotated, an operator closed a stream).
"""

import asyncio
import logging
import ssl
from collections.abc import Callable

from devstreams.wire import messages as msg
from devstreams.wire import sas, topics
from devstreams.wire.events import StreamClosed, StreamOpened
from devstreams.transport.mqtt import CONTROL_QOS, MqttSession

log = logging.getLogger(__name__)

TOKEN_TTL = 24 * 3600
STATS_INTERVAL = 1.0  # seconds between byte-count reports while streams are open
HEARTBEAT = 30.0      # seconds between reports while no stream is open (the hub learns our capacity)


class MqttReporter:
    def __init__(self, *, host: str, port: int, ssl_context: ssl.SSLContext, signing_key: bytes, name: str,
                 proxy=None):
        """``proxy``: a ``devstreams.transport.proxy.Proxy`` to reach the hub through, None = direct."""
        self.client_id = f"{topics.GATEWAY_CLIENT_PREFIX}{name}"
        self._topic = topics.gateway_events(self.client_id)
        self._mqtt = MqttSession(
            client_id=self.client_id, host=host, port=port, username=topics.GATEWAY_USER,
            password=lambda: sas.make_token(signing_key, sas.GATEWAY_RESOURCE, TOKEN_TTL),
            ssl_context=ssl_context, proxy=proxy, keepalive=30, subscriptions=(topics.gateway_control(),),
            on_message=self._on_message, on_connected=self._on_connected)
        self._stats_topic = topics.gateway_stats(self.client_id)
        self._starting: asyncio.Task | None = None
        self._stats: asyncio.Task | None = None
        self._control: Callable[[msg.GatewayControl], object] | None = None
        self._open_streams: Callable[[], list[dict]] | None = None
        self._url: Callable[[], str] = lambda: ""
        self._max_streams = 0
        self._due = 0.0   # monotonic time of the next report even with no stream open (0: now)

    def attach(self, gateway, stats_interval: float = STATS_INTERVAL) -> None:
        """Report ``gateway``'s stream events, apply the hub's orders to it, send the hub its byte counts."""
        gateway.events.subscribe(self.on_event)
        self._control = gateway.apply_control
        self._open_streams = gateway.open_streams
        self._url = lambda: gateway.public_url
        self._max_streams = gateway.settings.max_streams
        self._stats_interval = stats_interval

    def _on_connected(self, conn_id: str) -> None:
        self._due = 0.0  # a hub that just (re)started learns our capacity at once

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            control = msg.decode_gateway_control(payload)
        except msg.MessageError as exc:
            log.warning("ignoring a bad control message from the hub: %s", exc)
            return
        if self._control is not None:
            try:
                self._control(control)
            except Exception:
                log.exception("applying a control message failed")

    async def start(self) -> None:
        """Connect in the background: the gateway serves streams even while the hub is away."""
        self._starting = asyncio.create_task(self._connect())
        if self._open_streams is not None:
            self._stats = asyncio.create_task(self._report_stats())

    async def _report_stats(self) -> None:
        """Byte counts of open streams every interval; with none open, our URL and capacity
        every ``HEARTBEAT`` and after each (re)connect (a hub on an external broker may restart
        without this session noticing)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._stats_interval)
            try:
                rows = [(r["stream_id"], r["bytes_to_device"], r["bytes_to_service"])
                        for r in self._open_streams() if r["paired"]]
                if not rows and loop.time() < self._due or not self._mqtt.connected:
                    continue
                self._due = loop.time() + HEARTBEAT
                for i in range(0, max(len(rows), 1), msg.MAX_STATS_STREAMS):
                    stats = msg.GatewayStats(streams=tuple(rows[i:i + msg.MAX_STATS_STREAMS]), url=self._url(),
                                             max_streams=self._max_streams)
                    self._mqtt.publish(self._stats_topic, msg.encode(stats), qos=CONTROL_QOS)
            except Exception:
                log.exception("reporting byte counts failed")

    async def _connect(self) -> None:
        try:
            await self._mqtt.start(timeout=None)
        except Exception as exc:  # a refused key: say so once, keep serving streams
            log.error("cannot report streams to the hub: %s", exc)

    async def stop(self) -> None:
        for task in (self._starting, self._stats):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self._mqtt.stop()

    @property
    def connected(self) -> bool:
        return self._mqtt.connected

    def on_event(self, event: object) -> None:
        """A subscriber for the gateway's ``EventSink``: its opened/closed events go to the hub."""
        if isinstance(event, StreamOpened):
            self._send(msg.GatewayEvent(event="opened", stream_id=event.stream_id))
        elif isinstance(event, StreamClosed):
            self._send(msg.GatewayEvent(event="closed", stream_id=event.stream_id, device=event.device,
                                        name=event.name, reason=event.reason[:256],
                                        bytes_to_device=event.bytes_to_device,
                                        bytes_to_service=event.bytes_to_service, duration=event.duration,
                                        service_host=event.service_host))

    def _send(self, event: msg.GatewayEvent) -> None:
        if not self._mqtt.publish(self._topic, msg.encode(event), qos=CONTROL_QOS):
            log.warning("hub unreachable: stream %s %s not reported", event.stream_id[:8], event.event)
