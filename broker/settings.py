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
    # Per service connection (MQTT client id): one client's flood is refused at its own door.
    service_requests_per_second: float = 50.0
    service_requests_burst: int = 100
    # Broker.
    max_connections: int = 10000
    max_connect_packet_bytes: int = 8192
    connect_packet_timeout: float = 10.0  # a TLS client must send CONNECT within this
    registry_poll_interval: float = 0.5   # how soon a CLI change (disable, remove) reaches the hub
    session_expiry_check_interval: float = 1.0  # how soon a session whose SAS token ran out is dropped
    # Gateway (the built-in one).
    gateway_peer_timeout: float = 60.0    # how long the first side waits for its peer
    gateway_ping_interval: float = 10.0
    gateway_ping_timeout: float = 10.0
    gateway_close_timeout: float = 2.0    # dead peer noticed within ping interval + ping timeout + this
    max_stream_lifetime: float = 0.0      # 0 = unlimited
    # Activity log.
    activity_retention_days: int = 30
    open_streams_refresh: float = 1.0     # how often 'devstreams streams list' sees new byte counts
    disk_error_log_interval: float = 60.0  # a failing disk (full) is logged once per this, not per row

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
                 "service_requests_per_second", "session_expiry_check_interval", "open_streams_refresh",
                 "disk_error_log_interval"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"setting {name} must be greater than 0")
    for name in ("max_concurrent_streams", "new_streams_burst", "max_pending_per_device", "max_connections",
                 "service_requests_burst"):
        if getattr(s, name) < 1:
            raise ConfigError(f"setting {name} must be at least 1")
    for name in ("mqtt_port", "gateway_port"):
        if not 0 <= getattr(s, name) < 65536:
            raise ConfigError(f"setting {name} must be a port number (0 lets the OS pick)")
    return s


