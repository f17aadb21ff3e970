"""Device-side limits, all named, all with defaults."""

from dataclasses import dataclass


@dataclass(frozen=True)
class AgentSettings:
    keepalive: int = 30                # MQTT keepalive; the hub notices a dead device after 1.5x this
    reconnect_min: float = 1.0         # backoff after the hub goes away ...
    reconnect_max: float = 30.0        # ... doubling (with jitter) up to this
    reconnect_window: float = 5.0      # the first retry after a lost connection comes at a random moment
                                       # within this many seconds, so a hub restart does not bring the whole
                                       # fleet back in the same second
    takeover_min: float = 2.0          # after another connection with this device ID took over: wait ...
    takeover_max: float = 60.0         # ... doubling (with jitter) up to this, so two copies alternate slowly
    token_ttl: float = 3600.0          # lifetime of the login token made from the device key
    max_streams: int = 256             # streams served at once; more are rejected as busy
    gateway_open_timeout: float = 30.0  # TLS handshake + WebSocket upgrade at the gateway must finish within this
