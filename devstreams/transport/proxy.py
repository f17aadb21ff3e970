"""Reaching the hub through an HTTP proxy (``CONNECT`` tunnels) for MQTT and the stream WebSockets.

Which proxy a connection uses is decided here, once, for both transports
(:func:`select_proxy`, pure: the environment is passed in): an explicit choice
(``--proxy URL``, ``proxy=`` in the SDKs) wins over ``https_proxy``/``HTTPS_PROXY``
(lower case first, as urllib and curl read them); ``no_proxy``/``NO_PROXY`` is
honoured for both, matched as urllib does (host, ``.domain`` suffix, ``host:port``,
``*``); an empty choice (``--no-proxy``, ``proxy=""``) means no proxy.  Every
connection to the hub is TLS, so ``http_proxy`` is not consulted (curl does the
same for https:// URLs).

The ``CONNECT`` handshake itself is python-socks' (maintained; websockets uses it
for SOCKS proxies): the sync API for paho's socket, the asyncio API for the
stream WebSockets.  Why not the proxy support built into each library: paho 2.2's
``proxy_set`` needs PySocks (unmaintained since 2019) and reads ``mqtt_proxy``,
not ``https_proxy``; websockets 15's ``connect(proxy=...)`` would work for the
streams, but it sends URL credentials without percent-decoding them and reports
failures with its own exception types, so the two transports would disagree on
both.  One library for both tunnels keeps the decision, the credentials and the
error lines identical.  Only ``http://`` proxies are accepted (TLS to the proxy
is not supported by python-socks' sync API).

Known limit of python-socks 2.x/3.x: it reads the proxy's answer with one ``recv``
and parses only its status line.  Proxies write the whole answer at once (squid,
tinyproxy, the usual corporate ones), but one that wrote the status line and its
headers in separate packets would leave header bytes in the tunnel, and the TLS
handshake with the hub would fail ("TLS: the handshake ... failed").

Credentials in the proxy URL are sent as ``Proxy-Authorization: Basic``; they are
never shown: :attr:`Proxy.display` is the URL without them, and every message
here uses it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit
from urllib.request import proxy_bypass_environment

from devstreams.wire.errors import ConfigError

DEFAULT_PORT = 1080  # a proxy URL without a port: curl's default (proxies differ: a URL should say it)
ENV_PROXY = ("https_proxy", "HTTPS_PROXY")
ENV_NO_PROXY = ("no_proxy", "NO_PROXY")


@dataclass(frozen=True)
class Proxy:
    """An HTTP proxy to tunnel through; ``display`` never contains the credentials."""

    host: str
    port: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @property
    def display(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def __str__(self) -> str:
        return self.display


class ProxyTunnelError(OSError):
    """The tunnel through the proxy could not be opened.

    An ``OSError`` so that paho's reconnect loop treats it like any failed connect
    (it catches only ``OSError``); ``kind`` is ``refused`` (the proxy answered
    ``status``), ``unreachable``, ``timeout`` or ``protocol``.
    """

    def __init__(self, message: str, *, kind: str, proxy: Proxy, target: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.proxy = proxy
        self.target = target
        self.status = status

    def __str__(self) -> str:
        return self.message


def parse_proxy_url(url: str) -> Proxy:
    """``http://[user:password@]host[:port]`` (a bare ``host:port`` too); ConfigError otherwise."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"proxy URL {_safe(url)!r} is not valid: {exc}") from None
    if parts.scheme.lower() != "http":
        raise ConfigError(f"proxy URL {_safe(url)!r}: only http:// proxies are supported "
                          "(the tunnel carries TLS to the hub either way)")
    if not parts.hostname:
        raise ConfigError(f"proxy URL {_safe(url)!r} has no host name")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"proxy URL {_safe(url)!r}: expected http://[user:password@]host:port, nothing after it")
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    if username is not None and password is None:
        password = ""
    return Proxy(parts.hostname, port or DEFAULT_PORT, username, password)


def _safe(url: str) -> str:
    """A proxy URL as it may be shown: credentials replaced."""
    scheme, sep, rest = url.rpartition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not at:
        return url
    return f"{scheme}{sep}[redacted]@{hostpart}"


def _env(environ: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    return _env_named(environ, names)[1]


def _env_named(environ: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str | None]:
    for name in names:
        value = environ.get(name)
        if value is not None:
            return name, value  # set but empty (lower case) still wins: "https_proxy=" turns it off
    return "", None


def _chosen(override: str | None, environ: Mapping[str, str]) -> Proxy | None:
    """The proxy URL in force before NO_PROXY, parsed; a bad one in the environment says which variable."""
    if override is not None:
        return parse_proxy_url(override) if override.strip() else None
    name, value = _env_named(environ, ENV_PROXY)
    if not value or not value.strip():
        return None
    try:
        return parse_proxy_url(value)
    except ConfigError as exc:
        raise ConfigError(f"${name}: {exc} (or pass --no-proxy / proxy=\"\" to ignore it)") from None


def select_proxy(host: str, port: int, override: str | None, environ: Mapping[str, str]) -> Proxy | None:
    """The proxy for a connection to ``host:port``, or None to connect directly.

    ``override``: None = take ``https_proxy``/``HTTPS_PROXY`` from ``environ``; "" = no
    proxy; else a proxy URL.  ``no_proxy``/``NO_PROXY`` applies either way (as in curl).
    """
    proxy = _chosen(override, environ)
    if proxy is None:
        return None
    no_proxy = _env(environ, ENV_NO_PROXY)
    if no_proxy and proxy_bypass_environment(f"{host}:{port}", {"no": no_proxy}):
        return None
    return proxy


@dataclass(frozen=True)
class ProxyChoice:
    """What a client was told about proxies, resolved per target (the gateway's URL comes later).

    Made once per client: a bad ``--proxy`` URL is refused when the client is made,
    not at the first stream.
    """

    override: str | None = None
    environ: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        _chosen(self.override, self.environ)

    def for_target(self, host: str, port: int) -> Proxy | None:
        return select_proxy(host, port, self.override, self.environ)


def choice(proxy: str | bool | None, environ: Mapping[str, str]) -> ProxyChoice:
    """The SDKs' ``proxy=`` argument: None = the environment, "" or False = none, a URL = that proxy."""
    if proxy is False:
        return ProxyChoice("", dict(environ))
    if proxy is True:
        return ProxyChoice(None, dict(environ))
    if proxy is not None and not isinstance(proxy, str):
        raise ConfigError("proxy must be a URL such as http://proxy:3128, \"\" for none, or None for "
                          "$HTTPS_PROXY")
    return ProxyChoice(proxy, dict(environ))


# -- opening tunnels (I/O) ---------------------------------------------------------------------------

def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _error(exc: BaseException, proxy: Proxy, host: str, port: int, timeout: float) -> ProxyTunnelError:
    from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError
    target = _target(host, port)
    if isinstance(exc, ProxyError) and exc.error_code:
        reason = str(exc.args[0]) if exc.args else str(exc.error_code)
        return ProxyTunnelError(f"proxy {proxy} refused CONNECT to {target}: {reason}", kind="refused",
                                proxy=proxy, target=target, status=exc.error_code)
    if isinstance(exc, ProxyConnectionError):
        cause = exc.__cause__
        why = (getattr(cause, "strerror", None) or str(cause)) if cause is not None else str(exc)
        if isinstance(cause, socket.gaierror):
            why = f"unknown host name ({cause.strerror})"
        return ProxyTunnelError(f"cannot reach proxy {proxy}: {str(why).lower()}", kind="unreachable",
                                proxy=proxy, target=target)
    if isinstance(exc, (ProxyTimeoutError, TimeoutError, socket.timeout, asyncio.TimeoutError)):
        return ProxyTunnelError(f"proxy {proxy} did not open a tunnel to {target} within {timeout:g} s",
                                kind="timeout", proxy=proxy, target=target)
    if isinstance(exc, ProxyError):
        return ProxyTunnelError(f"proxy {proxy} gave no valid answer to CONNECT {target}: {exc}", kind="protocol",
                                proxy=proxy, target=target)
    if isinstance(exc, OSError):
        return ProxyTunnelError(f"proxy {proxy}: the tunnel to {target} failed: {exc.strerror or exc}",
                                kind="unreachable", proxy=proxy, target=target)
    return ProxyTunnelError(f"proxy {proxy}: the tunnel to {target} failed: {type(exc).__name__}: {exc}",
                            kind="protocol", proxy=proxy, target=target)


def _socks_args(proxy: Proxy) -> tuple:
    from python_socks import ProxyType
    return ProxyType.HTTP, proxy.host, proxy.port, proxy.username, proxy.password


def open_tunnel(proxy: Proxy, host: str, port: int, timeout: float) -> socket.socket:
    """A blocking socket connected to ``host:port`` through ``proxy`` (for paho); ProxyTunnelError."""
    from python_socks.sync import Proxy as SyncProxy
    try:
        sock = SyncProxy(*_socks_args(proxy)).connect(host, port, timeout=timeout)
    except Exception as exc:  # python-socks' errors, OSError
        raise _error(exc, proxy, host, port, timeout) from None
    sock.settimeout(timeout)  # paho's TLS handshake follows on this socket, as on its own
    return sock


async def open_tunnel_async(proxy: Proxy, host: str, port: int, timeout: float) -> socket.socket:
    """A non-blocking socket connected to ``host:port`` through ``proxy`` (for websockets' ``sock=``)."""
    from python_socks.async_.asyncio import Proxy as AsyncProxy
    try:
        return await AsyncProxy(*_socks_args(proxy), loop=asyncio.get_running_loop()).connect(
            host, port, timeout=timeout)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise _error(exc, proxy, host, port, timeout) from None


def add_arguments(parser) -> None:
    """``--proxy URL`` / ``--no-proxy`` on every command that connects to the hub."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--proxy", default=None, metavar="URL",
                       help="reach the hub through this HTTP proxy, e.g. http://user:pass@proxy:3128 "
                            "(default: $HTTPS_PROXY / $https_proxy; $NO_PROXY is honoured)")
    group.add_argument("--no-proxy", action="store_true",
                       help="connect to the hub directly, ignoring $HTTPS_PROXY")


def from_arguments(args, config: Mapping | None = None) -> str | None:
    """The override from ``--proxy``/``--no-proxy`` (then a config file's ``proxy``): None = environment."""
    if getattr(args, "no_proxy", False):
        return ""
    if getattr(args, "proxy", None) is not None:
        return args.proxy
    value = (config or {}).get("proxy")
    if value is not None and not isinstance(value, str):
        raise ConfigError("'proxy' in the config file must be a string (a URL, or \"\" for none)")
    return value


__all__ = ["Proxy", "ProxyChoice", "ProxyTunnelError", "add_arguments", "choice", "from_arguments",
           "open_tunnel", "open_tunnel_async", "parse_proxy_url", "select_proxy"]
