"""Every hub limit as a named setting, with defaults that work out of the box.

Settings come from, in order: the defaults below, ``<data-dir>/hub.toml`` (same
names), and ``devstreams hub up`` flags.  Nothing else hides a limit.
"""

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

from wire.errors import ConfigError


@dataclass(frozen=True)
class HubSettings:
    # Where the hub listens and what names it answers to.
    bind: str = "0.0.0.0"
    hosts: tuple[str, ...] = ()           # extra names for the certificate; the first is advertised
    mqtt_port: int = 8883
    gateway_port: int = 8443
    gateway_urls: tuple[str, ...] = ()    # external gateways (wss://…); empty = the built-in one
    # Stream negotiation.
    response_timeout: float = 60.0        # longest a device may take to answer a request
    connect_timeout: float = 60.0         # longest a side may take to reach the gateway after accept
    max_concurrent_streams: int = 1000    # streams being negotiated or open, per hub
    max_new_streams_per_second: float = 200.0
    new_streams_burst: int = 200
    max_pending_per_device: int = 256     # unanswered requests one device may have at once
    # Broker.
    max_connections: int = 10000
    max_connect_packet_bytes: int = 8192
    connect_packet_timeout: float = 10.0  # a TLS client must send CONNECT within this
    registry_poll_interval: float = 0.5   # how soon a CLI change (disable, remove) reaches the hub
    # Broker, after login (gate): bigger packets close the connection before their body is read.
    max_packet_bytes: int = 65536         # any MQTT packet a client sends after CONNECT
    max_retained_payload_bytes: int = 1024  # a retained PUBLISH (presence on a status topic)
    takeover_timeout: float = 5.0         # a second login waits this long for the older connection to end
    max_unauthenticated_connections: int = 1000  # not logged in yet; beyond it the oldest are dropped
    # Gateway (the built-in one).
    gateway_peer_timeout: float = 60.0    # how long the first side waits for its peer
    gateway_ping_interval: float = 10.0
    gateway_ping_timeout: float = 10.0
    gateway_close_timeout: float = 2.0    # dead peer noticed within ping interval + ping timeout + this
    max_stream_lifetime: float = 0.0      # 0 = unlimited
    # Activity log.
    activity_retention_days: int = 30

    def advertised_host(self) -> str:
        return self.hosts[0] if self.hosts else "localhost"

    def replace(self, **changes) -> "HubSettings":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def _coerce(name: str, value, default):
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"hub.toml: {name} must be a list of strings")
        return tuple(value)
    if isinstance(default, bool) or not isinstance(value, type(default)) and not (
            isinstance(default, float) and isinstance(value, int)):
        raise ConfigError(f"hub.toml: {name} must be a {type(default).__name__}")
    return type(default)(value)


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
        key = name.replace("-", "_")
        if key not in known:
            raise ConfigError(f"{path}: unknown setting {name!r} (known: {', '.join(sorted(known))})")
        changes[key] = _coerce(name, value, getattr(base, key))
    return dataclasses.replace(base, **changes)


def validate(s: HubSettings) -> HubSettings:
    for name in ("response_timeout", "connect_timeout", "max_new_streams_per_second",
                 "registry_poll_interval", "gateway_peer_timeout", "gateway_ping_interval",
                 "gateway_ping_timeout", "gateway_close_timeout", "connect_packet_timeout",
                 "takeover_timeout"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"setting {name} must be greater than 0")
    for name in ("max_concurrent_streams", "new_streams_burst", "max_pending_per_device", "max_connections",
                 "max_packet_bytes", "max_unauthenticated_connections"):
        if getattr(s, name) < 1:
            raise ConfigError(f"setting {name} must be at least 1")
    if s.max_retained_payload_bytes < 0:
        raise ConfigError("setting max_retained_payload_bytes must be 0 or more")
    if s.max_packet_bytes < 1024:
        raise ConfigError("setting max_packet_bytes must be at least 1024 (stream requests carry tokens)")
    for name in ("mqtt_port", "gateway_port"):
        if not 0 <= getattr(s, name) < 65536:
            raise ConfigError(f"setting {name} must be a port number (0 lets the OS pick)")
    return s


