"""The service side: ask the hub for a stream to a device by its ID.

    async with ServiceClient(connection_string, ca_file="ca.pem") as hub:
        info = await hub.create_stream("pump-7", "ssh")      # raises on anything but accept
        async with await info.open() as stream:
            await stream.send(b"hello")

Errors (all in ``devstreams.wire.errors``, re-exported here): DeviceNotFoundError,
DeviceOfflineError, DeviceDisabledError, StreamRejectedError (with the
device's reason), StreamTimeoutError, UnauthorizedError, ForbiddenError (outside
this operator's scope; also for devices this operator may not know of),
LimitExceededError, HubUnavailableError.
"""

import asyncio
import logging
import os
import uuid
import warnings
from dataclasses import dataclass, field

from devstreams.wire import connstr, sas, topics
from devstreams.wire import messages as msg
from devstreams.wire.errors import (ConfigError, DeviceDisabledError, DeviceNotFoundError, DeviceOfflineError,
                         ForbiddenError, HubUnavailableError, LimitExceededError, StreamError, StreamRejectedError,
                         StreamTimeoutError, UnauthorizedError)
from devstreams.wire.messages import Outcome
from devstreams.transport.mqtt import CONTROL_QOS, MqttSession
from devstreams.wire.names import check_device_id, check_stream_name
from devstreams.transport.proxy import choice as proxy_choice
from devstreams.transport.stream import Stream, open_stream
from devstreams.transport.tls import client_context

log = logging.getLogger(__name__)

TOKEN_TTL = 3600.0
ANSWER_GRACE = 5.0  # the hub answers a timeout itself; this covers a hub that went silent

_ERRORS = {
    Outcome.NOT_FOUND: DeviceNotFoundError,
    Outcome.OFFLINE: DeviceOfflineError,
    Outcome.DISABLED: DeviceDisabledError,
    Outcome.TIMEOUT: StreamTimeoutError,
    Outcome.LIMIT: LimitExceededError,
    Outcome.UNAUTHORIZED: UnauthorizedError,
    Outcome.FORBIDDEN: ForbiddenError,
    Outcome.BAD_REQUEST: ConfigError,
}


@dataclass(frozen=True)
class StreamInfo:
    """An accepted stream: where to connect and with what token."""

    device_id: str
    stream_name: str
    stream_id: str
    url: str
    token: str = field(repr=False)
    ssl_context: object = field(repr=False, compare=False, default=None)
    accepted: bool = True
    proxy: object = field(repr=False, compare=False, default=None)  # the client's ProxyChoice

    async def open(self, open_timeout: float = 30.0) -> Stream:
        """Connect the service side of the stream at the gateway."""
        return await open_stream(self.url, self.token, ssl_context=self.ssl_context, open_timeout=open_timeout,
                                 proxy=self.proxy)


class ServiceClient:
    def __init__(self, connection_string: str | connstr.ConnectionString, *, ca_file: str | None = None,
                 login_timeout: float = 60.0, proxy: str | bool | None = None):
        """``login_timeout``: how long ``connect()`` waits for the hub to accept the MQTT login.

        ``proxy``: an HTTP proxy URL (``http://user:pass@proxy:3128``) for the hub and the
        gateway; None = ``$HTTPS_PROXY``/``$https_proxy`` (``$NO_PROXY`` honoured); "" = none.
        """
        self.cs = connection_string if isinstance(connection_string, connstr.ConnectionString) \
            else connstr.parse(connection_string)
        if self.cs.is_device:
            raise ConfigError("this is a device connection string; services need the hub's service "
                              "connection string ('devstreams hub connection-string' prints it)")
        self.ssl_context = client_context(ca_file)
        self.proxy = proxy_choice(proxy, os.environ)
        self.client_id = topics.new_service_client_id(uuid.uuid4().hex[:20])
        self.service = topics.Service(self.cs.policy, self.client_id)
        self._pending: dict[str, asyncio.Future] = {}
        self._connect_lock = asyncio.Lock()
        cs = self.cs
        self._mqtt = MqttSession(
            client_id=self.client_id, host=cs.host, port=cs.port, username=topics.service_username(cs.policy),
            password=lambda: sas.make_token(cs.key, sas.service_resource(cs.policy), TOKEN_TTL),
            ssl_context=self.ssl_context, proxy=self.proxy.for_target(cs.host, cs.port), transport=cs.transport,
            subscriptions=(topics.service_responses(self.service),),
            on_message=self._on_message, on_disconnected=self._on_disconnected, keepalive=30,
            retry_first_connect=False)
        self._started = False
        self.login_timeout = login_timeout

    async def connect(self, timeout: float | None = None) -> None:
        """Log in to the hub (done by the first request if not before); ``timeout`` defaults to login_timeout."""
        async with self._connect_lock:
            if not self._started:
                await self._mqtt.start(timeout=self.login_timeout if timeout is None else timeout)
                self._started = True

    async def close(self) -> None:
        self._fail_all(HubUnavailableError("the service client was closed"))
        if self._started:
            self._started = False
            await self._mqtt.stop()

    async def __aenter__(self) -> "ServiceClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def create_stream(self, device_id: str, stream_name: str, response_timeout: float = 60.0,
                            join_timeout: float = 60.0, *, connect_timeout: float | None = None) -> StreamInfo:
        """Ask the device (through the hub) for a stream; return it when accepted, else raise.

        ``response_timeout``: how long the device may take to answer; ``join_timeout``: after
        it accepts, how long each side has to join the stream at the gateway (both capped
        by the hub's settings).  ``connect_timeout`` is the old name of ``join_timeout``.
        """
        join_timeout = _renamed(join_timeout, connect_timeout)
        check_device_id(device_id)
        check_stream_name(stream_name)
        if not (0 < response_timeout <= 3600 and 0 < join_timeout <= 3600):
            raise ConfigError("timeouts must be between 0 and 3600 seconds")
        await self.connect()
        rid = uuid.uuid4().hex[:16]
        future = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        request = msg.ServiceRequest(rid=rid, device=device_id, name=stream_name,
                                     response_timeout=response_timeout, join_timeout=join_timeout)
        try:
            if not self._mqtt.publish(topics.service_requests(self.service), msg.encode(request), qos=CONTROL_QOS):
                raise HubUnavailableError("not connected to the hub; retry when it is back")
            response = await asyncio.wait_for(future, response_timeout + ANSWER_GRACE)
        except asyncio.TimeoutError:
            raise StreamTimeoutError(f"no answer from the hub about device {device_id} within "
                                     f"{response_timeout + ANSWER_GRACE:g} s") from None
        finally:
            self._pending.pop(rid, None)
        return self._result(device_id, stream_name, response)

    async def connect_stream(self, device_id: str, stream_name: str, response_timeout: float = 60.0,
                             join_timeout: float = 60.0, *, connect_timeout: float | None = None) -> Stream:
        """``create_stream`` and ``open`` in one call (opening is bounded by the join timeout too)."""
        join_timeout = _renamed(join_timeout, connect_timeout)
        info = await self.create_stream(device_id, stream_name, response_timeout, join_timeout)
        return await info.open(open_timeout=join_timeout)

    def _result(self, device_id: str, stream_name: str, response: msg.ServiceResponse) -> StreamInfo:
        if response.outcome is Outcome.ACCEPTED:
            return StreamInfo(device_id=device_id, stream_name=stream_name, stream_id=response.stream_id,
                              url=response.url, token=response.token, ssl_context=self.ssl_context,
                              proxy=self.proxy)
        if response.outcome is Outcome.REJECTED:
            raise StreamRejectedError(f"device {device_id} rejected stream {stream_name!r}: {response.reason}",
                                      reason=response.reason)
        raise _ERRORS.get(response.outcome, StreamError)(response.reason or response.outcome.value)

    # -- MQTT callbacks (on the event loop) ------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            response = msg.decode_service_response(payload)
        except msg.MessageError as exc:
            log.warning("ignoring a malformed answer from the hub: %s", exc)
            return
        future = self._pending.get(response.rid)
        if future is not None and not future.done():
            future.set_result(response)

    def _on_disconnected(self) -> None:
        self._fail_all(HubUnavailableError("lost the connection to the hub while waiting for an answer"))

    def _fail_all(self, exc: Exception) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(exc)


def _renamed(join_timeout: float, connect_timeout: float | None) -> float:
    if connect_timeout is None:
        return join_timeout
    warnings.warn("connect_timeout is now called join_timeout", DeprecationWarning, stacklevel=3)
    return connect_timeout
