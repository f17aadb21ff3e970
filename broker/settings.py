"""Every hub limit as a named setting, with defaults that work out of the box.

Settings come from, in order: the defaults below, ``<data-dir>/hub.toml`` (same
names), and ``devstreams hub up`` flags.  Nothing else hides a limit.  Each field's
comment is its documentation: ``python -m broker.settings`` makes README's table from
them (a test compares the two), and ``devstreams hub show --settings`` prints the
values in force.
"""

import dataclasses
import io
import math
import tokenize
import tomllib
from dataclasses import dataclass
from pathlib import Path

from devstreams.wire.errors import ConfigError
from devstreams.wire.streamproto import CHUNK_BYTES, MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class HubSettings:
    # Where the hub listens and what names it answers to.
    bind: str = "0.0.0.0"                 # address both listeners bind to
    hosts: tuple[str, ...] = ()           # extra names for the certificate; the first is advertised
    mqtt_port: int = 8883                 # MQTT over TLS (0 = the OS picks)
    gateway_port: int = 8443              # the built-in gateway's WebSocket over TLS (0 = the OS picks)
    port: int = -1                        # one TLS port for MQTT, MQTT over WebSocket and streams (-1: mqtt_port and gateway_port)
    gateway_urls: tuple[str, ...] = ()    # external gateways (wss://…); empty = the built-in one
    broker_url: str = ""                  # an external MQTT broker (mqtts://host:port); empty = the embedded one
    broker_ca_file: str = ""              # CA that signed the external broker's certificate; empty = the hub's CA
    advertised_mqtt_port: int = 0         # the MQTT port put in connection strings; 0 = the port served (or the broker URL's)
    # Stream negotiation.
    response_timeout: float = 60.0        # s; longest a device may take to answer a request
    join_timeout: float = 60.0            # s; after the device accepts, longest a side may take to join at the gateway
    max_concurrent_streams: int = 1000    # streams being negotiated or open, per hub (and per built-in gateway)
    max_new_streams_per_second: float = 200.0  # average rate of new stream requests the hub admits
    new_streams_burst: int = 200          # new stream requests admitted at once above that rate
    max_pending_per_device: int = 256     # unanswered requests one device may have at once
    # Per service connection (MQTT client id): one client's flood is refused at its own door.
    service_requests_per_second: float = 100.0  # stream requests one service connection may make per second
    service_requests_burst: int = 200     # stream requests one service connection may make at once
    # Broker.
    max_connections: int = 12000          # MQTT connections (devices, services, gateways) at once
    max_connect_packet_bytes: int = 8192  # largest MQTT CONNECT the gate reads before authenticating
    connect_packet_timeout: float = 10.0  # s; a TLS client must send CONNECT within this
    registry_poll_interval: float = 0.5   # s; how soon a CLI change (disable, remove) reaches the hub
    session_expiry_check_interval: float = 1.0  # s; how soon a session whose SAS token ran out is dropped
    max_logins_per_second: float = 500.0  # MQTT logins admitted per second (embedded broker); beyond it CONNACK 3 "server unavailable", and clients back off
    logins_burst: int = 1000              # MQTT logins admitted at once above that rate
    listen_backlog: int = 4096            # TCP connections each listener (MQTT, gateway) queues before accepting them; the kernel caps it at net.core.somaxconn
    # Broker, after login (gate): bigger packets close the connection before their body is read.
    max_packet_bytes: int = 65536         # any MQTT packet a client sends after CONNECT
    max_retained_payload_bytes: int = 1024  # a retained PUBLISH (presence on a status topic)
    takeover_timeout: float = 5.0         # s; a second login waits this long for the older connection to end
    max_unauthenticated_connections: int = 1000  # not logged in yet; beyond it the oldest are dropped
    # Gateway (the built-in one).
    gateway_peer_timeout: float = 60.0    # s; how long the first side waits for its peer
    gateway_ping_interval: float = 10.0   # s; heartbeat pings to each side of a stream at least this often
    gateway_ping_timeout: float = 10.0    # s; a side silent for ping interval + this, while read, is lost
    gateway_close_timeout: float = 2.0    # s; longest an abnormal close may take (a clean one waits for the reader)
    max_stream_lifetime: float = 0.0      # s; a stream is ended after this (0 = unlimited)
    gateway_open_timeout: float = 10.0    # s; TLS handshake + WebSocket upgrade must finish within this
    gateway_max_message_bytes: int = MAX_MESSAGE_BYTES  # largest WebSocket message a side may send
    gateway_max_queue: int = 8            # messages a side may send before its peer arrives (then reading pauses)
    gateway_write_limit: int = 256 * 1024  # bytes buffered for a slow reader before the relay stops reading its peer
    # Activity log.
    activity_retention_days: int = 30     # activity log entries older than this are pruned at start
    open_streams_refresh: float = 1.0     # s; how often 'devstreams streams list' sees new byte counts
    open_streams_cpu_share: float = 0.02  # most of a core writing that list may take (with thousands of streams it is written less often)
    disk_error_log_interval: float = 60.0  # s; a failing disk (full) is logged once per this, not per row
    memory_trim_interval: float = 10.0    # s; after streams ended, free memory goes back to the OS at most this often
    memory_full_collect_interval: float = 600.0  # s; between the full GC collections of the objects frozen after bursts (cycles among them wait this long)
    # External broker (hub up --broker-url): the broker asks the hub's auth hook about every login and topic.
    auth_hook_bind: str = "127.0.0.1"     # address the auth hook (HTTP, token-protected) listens on
    auth_hook_port: int = 8884            # the auth hook's port (0 = the OS picks)
    auth_hook_max_body_bytes: int = 4096  # largest auth hook request body (a login or a topic check)
    auth_hook_max_header_bytes: int = 8192  # largest auth hook request line + headers
    auth_hook_request_timeout: float = 10.0  # s; a hook connection silent this long (mid-request or idle) is closed
    auth_hook_max_connections: int = 64   # auth hook connections at once (a broker keeps one or a few)
    auth_hook_client_timeout: float = 2.0  # s; longest the Mosquitto plugin waits for one hook answer, then denies
    # Dashboard and /metrics (HTTPS on the gateway's port, or the single port).
    dashboard_login_ttl: float = 300.0    # s; a 'hub dashboard-url' link works once, within this
    dashboard_session_ttl: float = 43200.0  # s; a dashboard login lasts this long (sessions end when the hub restarts)
    dashboard_max_sessions: int = 64      # dashboard sessions at once; beyond it the oldest is logged out
    dashboard_page_size: int = 50         # devices per page of the dashboard's list (at most 500)
    dashboard_refresh: float = 2.0        # s; how often an open dashboard page asks for fresh numbers
    dashboard_chart_interval: float = 10.0  # s; one point of the streams/throughput charts per this (they keep 360 points)
    http_max_header_bytes: int = 8192     # largest request line + headers of /metrics and dashboard requests
    http_max_body_bytes: int = 16384      # largest request body of a dashboard request
    http_max_connections: int = 64        # /metrics and dashboard connections at once

    def advertised_host(self) -> str:
        return self.hosts[0] if self.hosts else "localhost"

    def advertised_port(self) -> int:
        """The MQTT port for connection strings when no hub runs to say which port it bound."""
        if self.advertised_mqtt_port:
            return self.advertised_mqtt_port
        if self.port >= 0:
            return self.port
        return broker_address(self)[1] if self.broker_url else self.mqtt_port

    def replace(self, **changes) -> "HubSettings":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def _coerce(name: str, value, default):
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"hub.toml: {name} must be a list of strings")
        return tuple(value)
    kind = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(
        type(default), type(default).__name__)
    if isinstance(default, bool) != isinstance(value, bool):  # TOML true is not 1, nor 1 true
        raise ConfigError(f"hub.toml: {name} must be {kind}")
    if not isinstance(value, type(default)) and not (isinstance(default, float) and isinstance(value, int)):
        raise ConfigError(f"hub.toml: {name} must be {kind}")
    return type(default)(value)


RENAMED = {"connect_timeout": "join_timeout"}  # hub.toml names of earlier releases, still read


def load(data_dir: Path, base: HubSettings | None = None) -> HubSettings:
    """Apply ``<data-dir>/hub.toml`` on top of ``base``; unknown names are errors, not silence."""
    base = base or HubSettings()
    path = data_dir / "hub.toml"
    if not path.exists():
        return base
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, OSError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    known = {f.name: f for f in dataclasses.fields(HubSettings)}
    changes = {}
    for name, value in raw.items():
        key = RENAMED.get(name.replace("-", "_"), name.replace("-", "_"))
        if key not in known:
            raise ConfigError(f"{path}: unknown setting {name!r} (known: {', '.join(sorted(known))})")
        changes[key] = _coerce(name, value, getattr(base, key))
    return dataclasses.replace(base, **changes)


def validate(s: HubSettings) -> HubSettings:
    for f in dataclasses.fields(s):  # TOML allows nan and inf; both would silently disable a limit
        if isinstance(getattr(s, f.name), float) and not math.isfinite(getattr(s, f.name)):
            raise ConfigError(f"setting {f.name} must be a finite number")
    for name in ("response_timeout", "join_timeout", "max_new_streams_per_second",
                 "registry_poll_interval", "gateway_peer_timeout", "gateway_ping_interval",
                 "gateway_ping_timeout", "gateway_close_timeout", "connect_packet_timeout",
                 "gateway_open_timeout", "service_requests_per_second", "session_expiry_check_interval",
                 "open_streams_refresh", "open_streams_cpu_share", "memory_full_collect_interval", "disk_error_log_interval", "takeover_timeout", "max_logins_per_second",
                 "memory_trim_interval",
                 "auth_hook_request_timeout", "auth_hook_client_timeout", "dashboard_login_ttl",
                 "dashboard_session_ttl", "dashboard_refresh", "dashboard_chart_interval"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"setting {name} must be greater than 0")
    for name in ("max_concurrent_streams", "new_streams_burst", "max_pending_per_device", "max_connections",
                 "activity_retention_days", "gateway_max_queue", "gateway_write_limit", "service_requests_burst",
                 "max_packet_bytes", "max_unauthenticated_connections", "logins_burst", "listen_backlog", "auth_hook_max_connections",
                 "dashboard_max_sessions", "dashboard_page_size", "http_max_connections"):
        if getattr(s, name) < 1:
            raise ConfigError(f"setting {name} must be at least 1")
    if s.open_streams_cpu_share > 1:
        raise ConfigError("setting open_streams_cpu_share is a share of one core: at most 1")
    if s.max_stream_lifetime < 0:
        raise ConfigError("setting max_stream_lifetime must be 0 (unlimited) or more")
    if s.max_connect_packet_bytes < 256:  # a CONNECT with a device ID and a SAS token needs ~300 bytes
        raise ConfigError("setting max_connect_packet_bytes must be at least 256")
    if not CHUNK_BYTES <= s.gateway_max_message_bytes <= MAX_MESSAGE_BYTES:
        raise ConfigError(f"setting gateway_max_message_bytes must be between {CHUNK_BYTES} (what the SDKs "
                          f"send) and {MAX_MESSAGE_BYTES} (what they accept)")
    if s.max_retained_payload_bytes < 0:
        raise ConfigError("setting max_retained_payload_bytes must be 0 or more")
    if s.max_packet_bytes < 1024:
        raise ConfigError("setting max_packet_bytes must be at least 1024 (stream requests carry tokens)")
    if s.broker_url:
        broker_address(s)
    if s.auth_hook_client_timeout > 60:  # Mosquitto waits on its only thread: every client stalls meanwhile
        raise ConfigError("setting auth_hook_client_timeout must be at most 60 s")
    if s.auth_hook_max_body_bytes < 1024:  # a login carries a client id, a username and a SAS token
        raise ConfigError("setting auth_hook_max_body_bytes must be at least 1024")
    if s.auth_hook_max_header_bytes < 1024:
        raise ConfigError("setting auth_hook_max_header_bytes must be at least 1024")
    if s.dashboard_page_size > 500:  # a page's HTML must stay small whatever the fleet's size
        raise ConfigError("setting dashboard_page_size must be at most 500")
    if s.http_max_header_bytes < 1024 or s.http_max_body_bytes < 1024:
        raise ConfigError("settings http_max_header_bytes and http_max_body_bytes must be at least 1024")
    if not s.auth_hook_bind.strip() or any(c.isspace() for c in s.auth_hook_bind):
        raise ConfigError("setting auth_hook_bind must be an address such as 127.0.0.1")
    for name in ("mqtt_port", "gateway_port", "advertised_mqtt_port", "auth_hook_port"):
        if not 0 <= getattr(s, name) < 65536:
            raise ConfigError(f"setting {name} must be a port number (0 lets the OS pick)")
    if not -1 <= s.port < 65536:
        raise ConfigError("setting port must be a port number (0 lets the OS pick; -1: separate MQTT and gateway ports)")
    if s.port >= 0 and s.broker_url:
        raise ConfigError("one port (--port) serves the embedded broker's MQTT; with an external broker MQTT is the "
                          "broker's own port: use --gateway-port for the streams")
    return s


def broker_address(s: HubSettings) -> tuple[str, int]:
    """(host, port) of ``broker_url``; a ConfigError says what a valid one looks like."""
    from urllib.parse import urlsplit
    hint = "broker_url must look like mqtts://HOST:PORT (MQTT over TLS)"
    try:
        url = urlsplit(s.broker_url)
        port = url.port or 8883
    except ValueError:
        raise ConfigError(f"{hint}, not {s.broker_url!r}") from None
    if url.scheme != "mqtts" or not url.hostname or url.path not in ("", "/") or url.query or url.username:
        raise ConfigError(f"{hint}, not {s.broker_url!r}")
    return url.hostname, port


def gateway_kwargs(s: HubSettings) -> dict:
    """The built-in gateway's ``GatewaySettings`` arguments: every gateway limit comes from here."""
    return dict(host=s.bind, port=s.gateway_port, peer_timeout=s.gateway_peer_timeout,
                ping_interval=s.gateway_ping_interval, ping_timeout=s.gateway_ping_timeout,
                close_timeout=s.gateway_close_timeout, max_lifetime=s.max_stream_lifetime,
                max_streams=s.max_concurrent_streams, open_timeout=s.gateway_open_timeout,
                max_message_bytes=s.gateway_max_message_bytes, max_queue=s.gateway_max_queue,
                write_limit=s.gateway_write_limit, listen_backlog=s.listen_backlog)


def settings_dict(s: HubSettings) -> dict:
    """JSON-ready settings, names as in hub.toml."""
    return {f.name: list(v) if isinstance(v := getattr(s, f.name), tuple) else v
            for f in dataclasses.fields(s)}


def field_comments() -> dict[str, str]:
    """Each field's ``# comment`` on its line(s) in this file: the one place a setting is described."""
    source = Path(__file__).read_text()
    body = source[source.index("class HubSettings"):source.index("    def advertised_host")]
    comments: dict[str, str] = {}
    line: list[tokenize.TokenInfo] = []
    for tok in tokenize.generate_tokens(io.StringIO(body).readline):
        if tok.type in (tokenize.NEWLINE, tokenize.ENDMARKER):  # end of one logical line
            names = [t for t in line if t.type not in (tokenize.INDENT, tokenize.DEDENT, tokenize.NL,
                                                       tokenize.COMMENT)]
            if len(names) > 1 and names[0].type == tokenize.NAME and names[1].string == ":":
                text = [t.string.lstrip("#").strip() for t in line  # not the group headings above it
                        if t.type == tokenize.COMMENT and t.start[0] >= names[0].start[0]]
                comments[names[0].string] = " ".join(text)
            line = []
        else:
            line.append(tok)
    return comments


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def readme_table(s: HubSettings | None = None) -> str:
    """The README's settings table (``python -m broker.settings`` prints it)."""
    s = s or HubSettings()
    comments = field_comments()
    rows = ["| setting (hub.toml) | default | what it is |", "|---|---|---|"]
    for f in dataclasses.fields(s):
        what = comments.get(f.name, "").replace("|", r"\|")
        rows.append(f"| `{f.name}` | `{_toml_value(getattr(s, f.name))}` | {what} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(readme_table(), end="")
