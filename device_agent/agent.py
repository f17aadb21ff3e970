"""The device side: stay connected to the hub, answer stream requests, serve streams.

    async def handler(request):
        stream = await request.accept()        # or: await request.reject("busy")
        async with stream:
            async for chunk in stream:
                await stream.send(chunk)

    async with DeviceAgent(connection_string, handler, ca_file="ca.pem") as agent:
        await agent.wait_closed()

Each request runs in its own task, so one agent serves many streams at once.
A handler that raises before answering turns into a reject; one that returns
without answering is rejected too, so the service never waits for nothing.
"""

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable

from devstreams.wire import connstr, sas, topics
from devstreams.wire import messages as msg
from devstreams.wire.errors import ConfigError, DevstreamsError, StreamError
from devstreams.transport.mqtt import CONTROL_QOS, MqttSession, Will
from devstreams.transport.proxy import choice as proxy_choice
from devstreams.transport.stream import Stream, open_stream
from devstreams.transport.tls import client_context

from .settings import AgentSettings

log = logging.getLogger(__name__)

Handler = Callable[["StreamRequest"], Awaitable[None]]


class StreamRequest:
    """One request from a service; answer it once with ``accept()`` or ``reject()``."""

    def __init__(self, agent: "DeviceAgent", wire_request: msg.StreamRequest):
        self._agent = agent
        self._wire = wire_request
        self.answered = False

    @property
    def name(self) -> str:
        return self._wire.name

    @property
    def stream_id(self) -> str:
        return self._wire.stream_id

    @property
    def request_id(self) -> str:
        return self._wire.rid

    @property
    def url(self) -> str:
        return self._wire.url

    @property
    def token(self) -> str:
        """The single-use bearer token for ``url`` (for a custom client; ``accept()`` uses it)."""
        return self._wire.token

    def __repr__(self) -> str:
        return f"StreamRequest(name={self.name!r}, stream_id={self.stream_id!r})"

    async def accept(self) -> Stream:
        """Tell the hub yes, then open this side of the stream at the gateway."""
        self._answer(200, "")
        return await open_stream(self._wire.url, self._wire.token, ssl_context=self._agent.ssl_context,
                                 proxy=self._agent.proxy,
                                 open_timeout=self._agent.settings.gateway_open_timeout)

    async def reject(self, reason: str = "") -> None:
        self._answer(400, reason)

    def _answer(self, status: int, reason: str) -> None:
        if self.answered:
            raise DevstreamsError("this stream request was already answered")
        self.answered = True
        self._agent.respond(msg.StreamResponse(rid=self._wire.rid, status=status, reason=reason[:1000]))


class DeviceAgent:
    def __init__(self, connection_string: str | connstr.ConnectionString, handler: Handler, *,
                 ca_file: str | None = None, settings: AgentSettings | None = None,
                 proxy: str | bool | None = None):
        """``proxy``: an HTTP proxy URL (``http://user:pass@proxy:3128``) for the hub and the
        gateway; None = ``$HTTPS_PROXY``/``$https_proxy`` (``$NO_PROXY`` honoured); "" = none."""
        self.cs = connection_string if isinstance(connection_string, connstr.ConnectionString) \
            else connstr.parse(connection_string)
        if not self.cs.is_device:
            raise ConfigError("this is a service connection string; the agent needs a device one "
                              "('devstreams device add ID' prints it)")
        self.device_id = self.cs.device_id
        self.settings = settings or AgentSettings()
        self.ssl_context = client_context(ca_file)
        self.proxy = proxy_choice(proxy, os.environ)
        self._handler = handler
        self._tasks: set[asyncio.Task] = set()
        self._closed: asyncio.Event | None = None
        self._mqtt = self._make_session()

    def _make_session(self) -> MqttSession:
        cs, s = self.cs, self.settings
        status = topics.device_status(cs.device_id)
        return MqttSession(
            client_id=cs.device_id, host=cs.host, port=cs.port, username=cs.device_id,
            password=lambda: sas.make_token(cs.key, sas.device_resource(cs.device_id), s.token_ttl),
            ssl_context=self.ssl_context, proxy=self.proxy.for_target(cs.host, cs.port), transport=cs.transport,
            subscriptions=(topics.device_requests(cs.device_id),),
            on_message=self._on_message, on_connected=self._on_connected,
            will=Will(status, lambda conn: msg.encode(msg.Presence(online=False, conn=conn))),
            keepalive=s.keepalive, reconnect_min=s.reconnect_min, reconnect_max=s.reconnect_max,
            reconnect_window=s.reconnect_window,
            takeover_min=s.takeover_min, takeover_max=s.takeover_max, stop_when_refused=True)

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, timeout: float | None = None) -> None:
        """Connect (retrying while the hub is unreachable); raise UnauthorizedError on bad credentials."""
        self._closed = asyncio.Event()
        await self._mqtt.start(timeout=timeout)

    async def wait_closed(self) -> None:
        """Return after ``stop()``; raise UnauthorizedError if the hub stopped accepting this device
        (disabled, removed or re-keyed while running): retrying could never succeed."""
        closed = asyncio.ensure_future(self._closed.wait())
        failed = asyncio.ensure_future(asyncio.shield(self._mqtt.failure))
        try:
            await asyncio.wait({closed, failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            failed.cancel()
        if self._mqtt.failure.done() and not self._closed.is_set():
            raise self._mqtt.failure.result()

    async def stop(self) -> None:
        if self._mqtt.connected:
            self._mqtt.publish(topics.device_status(self.device_id),
                               msg.encode(msg.Presence(online=False, conn=self._mqtt.conn_id)), qos=CONTROL_QOS, retain=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._mqtt.stop()
        if self._closed is not None:
            self._closed.set()

    async def __aenter__(self) -> "DeviceAgent":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def connected(self) -> bool:
        return self._mqtt.connected

    @property
    def active_streams(self) -> int:
        return len(self._tasks)

    # -- MQTT side -------------------------------------------------------------------------------

    def _on_connected(self, conn: str) -> None:
        self._mqtt.publish(topics.device_status(self.device_id),
                           msg.encode(msg.Presence(online=True, conn=conn)), qos=CONTROL_QOS, retain=True)

    def respond(self, response: msg.StreamResponse) -> None:
        if not self._mqtt.publish(topics.device_responses(self.device_id), msg.encode(response), qos=CONTROL_QOS):
            log.warning("could not send the answer to request %s: not connected", response.rid)

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            wire_request = msg.decode_stream_request(payload)
        except msg.MessageError as exc:
            log.warning("ignoring a malformed stream request: %s", exc)
            return
        if wire_request.expires < time.time():
            log.info("ignoring stale stream request %s (%s)", wire_request.rid, wire_request.name)
            return
        request = StreamRequest(self, wire_request)
        if len(self._tasks) >= self.settings.max_streams:
            request._answer(400, f"device busy: {self.settings.max_streams} streams already open")
            return
        task = asyncio.create_task(self._serve(request), name=f"stream-{wire_request.stream_id[:8]}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, request: StreamRequest) -> None:
        log.info("stream request %r", request.name)
        try:
            await self._handler(request)
        except asyncio.CancelledError:
            raise
        except StreamError as exc:
            log.warning("stream %s (%s) ended: %s", request.stream_id[:8], request.name, exc)
        except Exception as exc:
            log.exception("stream handler failed for %r", request.name)
            if not request.answered:
                request._answer(400, f"device handler error: {type(exc).__name__}")
            return
        if not request.answered:
            request._answer(400, "the device did not accept the stream")
