"""Gateway limits, all named, with defaults."""

from dataclasses import dataclass

from devstreams.wire.streamproto import MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class GatewaySettings:
    host: str = "0.0.0.0"
    port: int = 8443                    # 0 = the OS picks
    public_url: str | None = None       # what tokens name as audience; default wss://localhost:<port>
    peer_timeout: float = 60.0          # how long the first side waits for its peer
    ping_interval: float = 10.0         # a silently dead peer is noticed within interval + timeout
    ping_timeout: float = 10.0
    close_timeout: float = 2.0          # how long a closing handshake may take before the socket is cut
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_queue: int = 8                  # messages a side may send before its peer arrives (then reading pauses)
    write_limit: int = 256 * 1024       # bytes buffered for a slow reader before the relay stops reading its peer
    max_streams: int = 1000             # streams open or waiting at once
    max_lifetime: float = 0.0           # seconds; 0 = unlimited
    open_timeout: float = 10.0          # TLS + HTTP upgrade must finish within this
    listen_backlog: int = 4096          # connections queued before accept (asyncio's default, 100, drops SYNs in bursts)
