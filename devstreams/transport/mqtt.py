"""An asyncio face for paho-mqtt, shared by the controller, the agent and the service SDK.

paho runs its network loop in a thread (``loop_start``) and reconnects by itself
with backoff.  Callbacks there only hand work to the asyncio loop with
``call_soon_threadsafe`` inside a ``try``: an exception in a paho callback would
silently kill its thread.  Before every connect the password (a short-lived SAS
token) and the last will (with a fresh connection nonce) are renewed, and on
every connect all subscriptions are made again (``session_present`` is false
after a broker restart).

Failures say why, once: paho hands ``on_connect_fail`` no exception (it catches
the ``OSError`` of ``reconnect()`` in its loop and drops it), so ``_Client``
records it; :func:`describe_connect_error` turns it into one sentence ("TLS: the
hub's certificate is not trusted: pass --ca-file", "cannot reach hub at H:P:
connection refused") that a retrying session logs at warning level the first
time and then at most once a minute per cause (:class:`LogLimiter`), and that a
session which does not retry raises.

Reconnects (:func:`reconnect_delay`): paho's own backoff waits exactly 1, 2,
4 ... s, so when a hub restarts its whole fleet would come back in the same
second, again and again.  ``_Client`` replaces paho's wait: the first retry after
a lost connection comes at a random moment within ``reconnect_window``, later
ones back off exponentially from ``reconnect_min`` to ``reconnect_max`` with
jitter.  A hub admitting logins at a bounded rate answers the rest "server
unavailable" (CONNACK 3), and they back off the same way.

Through an HTTP proxy: paho 2.2 has no documented way to hand it a socket
(``proxy_set`` needs the unmaintained PySocks and paho itself reads only
``mqtt_proxy``), so ``_Client`` overrides ``_create_socket_connection`` -- the one
method that makes paho's TCP connection -- to return a ``CONNECT`` tunnel from
``devstreams.transport.proxy``; paho's TLS handshake and everything after it run
inside the tunnel unchanged.  A refused or unreachable proxy is a failed connect
like any other (retried with the same backoff), and its sentence names the proxy.

Takeover: when another connection logs in with the same client id, the hub
writes one PUBLISH on ``devstreams/devices/<id>/notice`` and closes this one.
The session logs that once and waits a growing, jittered delay before
reconnecting, so two copies of one agent alternate visibly instead of fighting
every second.
"""

import asyncio
import json
import logging
import random
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from devstreams.transport.proxy import Proxy, ProxyTunnelError, open_tunnel
from devstreams.wire.errors import HubUnavailableError, ProxyError, UnauthorizedError
from devstreams.wire.frontdoor import MQTT_WS_PATH
from devstreams.wire.throttle import LogLimiter
from devstreams.wire.topics import SERVICE_PREFIX, device_notice

log = logging.getLogger(__name__)

# Control messages travel at QoS 0: nothing relies on MQTT redelivery (a request not
# answered in time fails), and amqtt's QoS 1 adds a PUBACK round trip per message and
# stalls up to 5 s on a late PUBACK.  TCP already orders and delivers while connected.
CONTROL_QOS = 0
# Transport= of a connection string -> the paho transports a session takes in turn
TRANSPORTS = {"mqtt": ("tcp",), "wss": ("websockets",), "auto": ("tcp", "websockets")}

# CONNACK reasons that mean "your credentials are refused" (MQTT 3.1.1 rc 4 and 5 as paho maps them).
AUTH_REFUSED = {134, 135}


# OpenSSL verify codes (X509_V_ERR_*) that mean "I do not know who signed this certificate".
_UNTRUSTED = {2, 18, 19, 20, 21, 27}
_NAME_MISMATCH = {62, 64}  # host name, IP address


def describe_connect_error(exc: BaseException | None, host: str, port: int, peer: str = "hub") -> tuple[str, str]:
    """(cause key, one sentence) for why a connection to the hub (or ``peer``) failed."""
    where = f"{host}:{port}"
    if isinstance(exc, ProxyTunnelError):  # first: it is an OSError too
        return f"proxy-{exc.kind}", exc.message
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = getattr(exc, "verify_code", None)
        if code in _NAME_MISMATCH:
            return "tls-name", (f"TLS: the {peer}'s certificate does not name {host!r}: connect with a name "
                                "it was issued for ('devstreams hub up --host NAME' adds one)")
        if code in _UNTRUSTED:
            return "tls-trust", (f"TLS: the {peer}'s certificate is not trusted: pass --ca-file "
                                 "(the hub's ca.pem, printed by 'devstreams hub show')")
        return "tls-verify", f"TLS: the {peer}'s certificate was refused: {getattr(exc, 'verify_message', exc)}"
    if isinstance(exc, ssl.SSLError):
        return "tls", f"TLS: the handshake with the {peer} at {where} failed: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "refused", f"cannot reach {peer} at {where}: connection refused"
    if isinstance(exc, socket.gaierror):
        return "dns", f"cannot reach {peer} at {where}: unknown host name ({exc.strerror})"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timeout", f"cannot reach {peer} at {where}: timed out"
    if isinstance(exc, OSError):
        return "os", f"cannot reach {peer} at {where}: {exc.strerror or exc}"
    return "unknown", f"cannot reach {peer} at {where}"


def takeover_delay(count: int, low: float, high: float, jitter: float) -> float:
    """Wait after the ``count``-th takeover in a row: low, 2*low, 4*low ... up to high, times jitter."""
    return min(high, low * 2 ** max(0, count - 1)) * jitter


def reconnect_delay(attempt: int, low: float, high: float, window: float, rand: float) -> float:
    """Seconds before reconnect ``attempt`` (0 = the first after a lost connection); ``rand`` in [0, 1).

    The first is spread over ``window``; then low, 2*low, 4*low ... up to high, each
    times a jitter between 0.5 and 1.5, so retries never line up again.
    """
    if attempt <= 0:
        return window * rand
    return min(high, low * 2 ** (attempt - 1)) * (0.5 + rand)


class _Client(paho.Client):
    """paho's client, keeping the exception of the last failed connect (paho drops it),
    and waiting :func:`reconnect_delay` between attempts instead of paho's fixed doubling."""

    last_connect_error: BaseException | None = None
    delay_for: Callable[[int], float] | None = None   # attempt -> seconds
    next_delay: float | None = None                   # one wait chosen by the session (a takeover)
    attempt = 0                                       # reset by the session after a successful CONNACK
    proxy: Proxy | None = None                        # an HTTP proxy to tunnel through, else direct
    transports: tuple[str, ...] = ("tcp",)            # paho transports, taken in turn (Transport=auto: both)
    turn = 0                                          # which of them the next attempt uses
    worked = True                                     # the last attempt got a CONNACK (or none was made yet)

    def _create_socket(self):
        """With several transports (``Transport=auto``), an attempt that got no CONNACK makes the
        next one use the other transport; the one that worked stays.  paho 2.2 reads ``_transport``
        only here (its public setter refuses while paho still counts the old socket as open)."""
        if not self.worked:
            self.turn += 1
        self.worked = False
        self._transport = self.transports[self.turn % len(self.transports)]
        return super()._create_socket()

    def _create_socket_connection(self) -> socket.socket:
        """Replaces paho 2's TCP connect when a proxy is set (see the module docstring)."""
        if self.proxy is None:
            return super()._create_socket_connection()
        return open_tunnel(self.proxy, self._host, self._port, self._connect_timeout)

    def _reconnect_wait(self) -> None:
        """Replaces paho 2's ``_reconnect_wait`` (it reads paho's private connection state to stop early)."""
        if self.delay_for is None:
            return super()._reconnect_wait()
        delay = self.next_delay if self.next_delay is not None else self.delay_for(self.attempt)
        self.next_delay = None
        self.attempt += 1
        deadline = time.monotonic() + delay
        stopping = (paho._ConnectionState.MQTT_CS_DISCONNECTING, paho._ConnectionState.MQTT_CS_DISCONNECTED)
        while self._state not in stopping and not self._thread_terminate:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(remaining, 0.5))

    def reconnect(self) -> MQTTErrorCode:
        try:
            rc = super().reconnect()
        except OSError as exc:
            self.last_connect_error = exc
            raise
        self.last_connect_error = None
        return rc


@dataclass(frozen=True)
class Will:
    topic: str
    payload: Callable[[str], bytes]  # built from the connection nonce
    retain: bool = True


class MqttSession:
    """One MQTT connection that stays up: ``await start()``, ``publish()``, ``await stop()``."""

    def __init__(self, *, client_id: str, host: str, port: int, username: str,
                 password: Callable[[], str], ssl_context: ssl.SSLContext,
                 subscriptions: tuple[str, ...] = (), on_message: Callable[[str, bytes], None] | None = None,
                 on_connected: Callable[[str], None] | None = None,
                 on_disconnected: Callable[[], None] | None = None,
                 will: Will | None = None, keepalive: int = 30,
                 reconnect_min: float = 1.0, reconnect_max: float = 30.0, reconnect_window: float = 1.0,
                 retry_first_connect: bool = True,
                 takeover_min: float = 2.0, takeover_max: float = 60.0, stop_when_refused: bool = False,
                 peer: str = "hub", proxy: Proxy | None = None, transport: str = "mqtt"):
        self.client_id = client_id
        self.proxy = proxy  # HTTP proxy (already chosen for host:port by the caller), None = direct
        self.peer = peer  # who we connect to, in log lines and errors: the hub, or the MQTT broker
        self.host, self.port = host, port
        self._username = username
        self._password = password
        self._subscriptions = subscriptions
        self._on_message = on_message
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self._will = will
        self._keepalive = keepalive
        self._retry_first = retry_first_connect  # devices wait for the hub; a service call should not
        self._takeover_min, self._takeover_max = takeover_min, takeover_max
        self._takeovers = 0            # in a row: reset once a connection held for long
        self._connected_at = 0.0
        self._displaced = False
        self._stop_when_refused = stop_when_refused  # a device disabled while running: give up, say why
        self.failure: asyncio.Future | None = None   # set to the error that ended the session for good
        self._log_limit = LogLimiter(60.0)
        self.conn_id = ""
        self.connected = False
        self.ever_connected = False
        self._stopping = False
        self._background = False   # start_in_background(): never give up, not even on refused credentials
        self._answered = False     # this connection attempt got a CONNACK (refused or not)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future | None = None
        self._pending_subs: dict[int, str] = {}
        self._client = _Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                               clean_session=True, protocol=paho.MQTTv311)
        self._client.tls_set_context(ssl_context)
        self._client.proxy = proxy
        # Transport (devstreams.wire.connstr): MQTT over TLS, over WebSocket (the hub's single port), or
        # both in turn.  No ALPN is offered: the single port also tells MQTT from HTTP by the first byte,
        # and a context that offered "mqtt" would send a WebSocket attempt to the MQTT side.
        self._client.transports = TRANSPORTS[transport]
        self._client.ws_set_options(path=MQTT_WS_PATH)
        self._client.delay_for = lambda attempt: reconnect_delay(attempt, reconnect_min, reconnect_max,
                                                                 reconnect_window, random.random())
        self._client.suppress_exceptions = True
        self._client.on_connect = self._paho_on_connect
        self._client.on_disconnect = self._paho_on_disconnect
        self._client.on_subscribe = self._paho_on_subscribe
        self._client.on_message = self._paho_on_message
        self._client.on_connect_fail = self._paho_on_connect_fail
        self._client.on_socket_open = self._paho_on_socket_open

    # -- lifecycle (asyncio side) ---------------------------------------------------------------

    async def start(self, timeout: float = 30.0) -> None:
        """Connect and subscribe; raise UnauthorizedError or HubUnavailableError."""
        self._begin(wait=True)
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except asyncio.TimeoutError:
            await self.stop()
            raise HubUnavailableError(
                f"no answer from the hub at {self.host}:{self.port}"
                f"{f' through proxy {self.proxy}' if self.proxy is not None else ''} within {timeout:g} s: "
                "check the host, port and that 'devstreams hub up' is running") from None
        except BaseException:
            await self.stop()
            raise

    def start_in_background(self) -> None:
        """Connect without waiting: failures are logged (one line per cause) and retried for ever."""
        self._begin(wait=False)

    def _begin(self, wait: bool) -> None:
        self._loop = asyncio.get_running_loop()
        # without a waiter, a refusal is logged and retried like any other failure
        self._ready = self._loop.create_future() if wait else None
        self._background = not wait
        self.failure = self._loop.create_future()
        self._renew()
        try:
            self._client.connect_async(self.host, self.port, keepalive=self._keepalive)
        except (OSError, ValueError) as exc:
            raise HubUnavailableError(f"cannot reach the {self.peer} at {self.host}:{self.port}: {exc}") from None
        self._client.loop_start()

    async def stop(self) -> None:
        self._stopping = True
        client = self._client
        try:
            client.disconnect()
        except Exception:  # already gone
            pass
        await asyncio.get_running_loop().run_in_executor(None, client.loop_stop)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        """Queue a message; False if it could not be queued (not connected).

        Not while a reconnect is in flight either: paho would queue it on a socket whose
        CONNECT may yet be refused, and the caller would wait for an answer that never comes.
        """
        if not self.connected:
            return False
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    # -- paho thread ----------------------------------------------------------------------------

    def _renew(self) -> None:
        """Fresh token and will nonce before each (re)connect."""
        self.conn_id = uuid.uuid4().hex[:16]
        self._client.username_pw_set(self._username, self._password())
        if self._will is not None:
            self._client.will_set(self._will.topic, self._will.payload(self.conn_id), qos=CONTROL_QOS,
                                  retain=self._will.retain)

    def _post(self, fn: Callable, *args) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closing
            pass

    def _settle(self, exc: BaseException | None) -> None:
        fut = self._ready
        if fut is None or fut.done():
            return
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)

    @staticmethod
    def _paho_on_socket_open(client, userdata, sock) -> None:
        # paho leaves Nagle on: each small control packet would wait for the peer's
        # delayed ACK (~40 ms per hop, ~150 ms per stream request).
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass

    def _paho_on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            self._answered = True
            client.worked = True   # a CONNACK came: this transport reaches the hub
            if reason_code.is_failure:
                self._connect_refused(reason_code)
                return
            self.connected = True
            self._connected_at = time.monotonic()
            self._displaced = False
            client.attempt = 0   # the next lost connection starts with a spread first retry again
            log.info("connected to %s:%s as %s%s%s", self.host, self.port, self.client_id,
                     " (MQTT over WebSocket)" if client.transport == "websockets" else "",
                     f" through proxy {self.proxy}" if self.proxy is not None else "")
            self._pending_subs.clear()
            for topic in self._subscriptions:
                rc, mid = client.subscribe(topic, qos=CONTROL_QOS)
                if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                    self._pending_subs[mid] = topic
            if not self._subscriptions:
                self._post(self._connected_ready)
        except Exception:
            log.exception("error in MQTT connect handler")

    def _who_must_exist(self) -> str:
        """What the hub must still admit for this login to work (MQTT 3.1.1 CONNACK has no reason text)."""
        if self._username.startswith(SERVICE_PREFIX):
            name = self._username[len(SERVICE_PREFIX):]
            return (f"that operator {name} exists on the hub, is enabled and has not expired "
                    f"('devstreams operator show {name}' on the hub)")
        return "that the device is registered and enabled"

    def _connect_refused(self, reason_code) -> None:
        value = getattr(reason_code, "value", 0)
        if value in AUTH_REFUSED and self._background:
            if self._log_limit.allow(f"connack-{value}", time.monotonic()):
                log.error("the %s refused the credentials of %r (%s); retrying", self.peer, self.client_id,
                          reason_code)
        elif value in AUTH_REFUSED:
            msg = (f"the {self.peer} refused the credentials of {self.client_id!r} ({reason_code}): "
                   f"check the connection string and {self._who_must_exist()}")
            log.error("%s", msg)
            if not self.ever_connected:
                self._post(self._settle, UnauthorizedError(msg))
                self._client.disconnect()  # no point retrying a wrong key
            elif self._stop_when_refused:
                self._post(self._fail, UnauthorizedError(msg))
                self._client.disconnect()
        elif self._log_limit.allow(f"connack-{value}", time.monotonic()):
            log.warning("%s refused the connection: %s; retrying", self.peer, reason_code)

    def _fail(self, exc: BaseException) -> None:
        if self.failure is not None and not self.failure.done():
            self.failure.set_result(exc)

    def _connected_ready(self) -> None:
        self.ever_connected = True
        self._settle(None)
        if self._on_connected is not None:
            try:
                self._on_connected(self.conn_id)
            except Exception:
                log.exception("error in on_connected handler")

    def _paho_on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        try:
            topic = self._pending_subs.pop(mid, None)
            if any(rc.is_failure for rc in reason_codes):
                log.error("the hub refused the subscription to %s", topic)
                if not self.ever_connected:
                    self._post(self._settle, UnauthorizedError(f"the hub refused the subscription to {topic}"))
                return
            if not self._pending_subs:
                self._post(self._connected_ready)
        except Exception:
            log.exception("error in MQTT subscribe handler")

    def _paho_on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            was = self.connected
            self.connected = False
            if was and not self._stopping and not self._displaced:
                log.warning("lost the connection to the %s (%s); reconnecting", self.peer, reason_code)
            elif not was and not self._answered and not self._stopping and \
                    self._log_limit.allow("no-connack", time.monotonic()):
                # e.g. Mosquitto while the hub's auth hook is down: no verdict, so not a refusal
                log.warning("the %s at %s:%s closed the connection before answering the login; retrying",
                            self.peer, self.host, self.port)
            self._answered = False
            if was and self._on_disconnected is not None:
                self._post(self._on_disconnected)
            if not self._stopping:
                self._renew()
        except Exception:
            log.exception("error in MQTT disconnect handler")

    def _paho_on_connect_fail(self, client, userdata) -> None:
        try:
            key, cause = describe_connect_error(getattr(client, "last_connect_error", None), self.host, self.port,
                                                self.peer)
            tried_all = client.turn + 1 >= len(client.transports)   # Transport=auto: WebSocket not tried yet
            if not self.ever_connected and not self._retry_first and tried_all:
                exc = getattr(client, "last_connect_error", None)
                if isinstance(exc, ProxyTunnelError):
                    self._post(self._settle, ProxyError(cause, str(exc.proxy), exc.status))
                    client.disconnect()
                    return
                if key.startswith("tls"):
                    text = cause
                else:
                    text = (f"{cause}: check the host and port in the connection string and that "
                            "'devstreams hub up' is running")
                self._post(self._settle, HubUnavailableError(text))
                client.disconnect()
                return
            if self._log_limit.allow(key, time.monotonic()):
                log.warning("%s (retrying)", cause)
            else:
                log.debug("connect to %s:%s failed again: %s", self.host, self.port, cause)
            self._renew()
        except Exception:
            log.exception("error in MQTT connect-fail handler")

    def _on_takeover(self, client, payload: bytes) -> None:
        """Another connection logged in with our client id; the hub is closing this one."""
        now = time.monotonic()
        if self._connected_at and now - self._connected_at > 2 * self._takeover_max:
            self._takeovers = 0  # we held the session for long: this is a new episode
        self._takeovers += 1
        delay = takeover_delay(self._takeovers, self._takeover_min, self._takeover_max, random.uniform(0.8, 1.2))
        self._displaced = True
        client.next_delay = delay
        try:
            reason = json.loads(payload).get("reason") or ""
        except (ValueError, AttributeError):
            reason = ""
        reason = reason if isinstance(reason, str) and reason else \
            f"another connection with device ID {self.client_id} took over"
        log.warning("%s; retrying in %.0f s (is a second agent running with these credentials?)",
                    reason[:200], delay)

    def _paho_on_message(self, client, userdata, message) -> None:
        try:
            if message.topic == device_notice(self.client_id):
                self._on_takeover(client, bytes(message.payload))  # in paho's thread: before its reconnect wait
                return
            if self._on_message is not None:
                self._post(self._on_message, message.topic, bytes(message.payload))
        except Exception:
            log.exception("error in MQTT message handler")
