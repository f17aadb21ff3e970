"""The data plane contract: how bytes, end-of-data and endings travel over a stream.

Over each side's WebSocket to the gateway:
- a binary message is stream data (any size up to ``MAX_MESSAGE_BYTES``);
- a text message is a control message; the only one today is ``EOF``: the
  sender will send no more data but keeps reading (TCP half-close);
- the WebSocket close code and reason say how the stream ended (codes below).
The gateway relays frames unchanged, so both kinds pass end to end.

A stream ends *cleanly* only when a side closes with ``CLOSE_NORMAL`` (the
other side then gets ``CLOSE_PEER_CLOSED``): the data that arrived is all there
was.  Every other ending is abnormal, and a local proxy turns it into a TCP
reset (RST), never a FIN, so a client cannot take a truncated transfer for a
complete one.  A side that aborts (its TCP connection was reset) closes with
``CLOSE_ABORTED``; the gateway passes that code and reason to the other side.

Liveness: each side sends a WebSocket ping at least every ping interval and
treats any bytes from the peer as a sign of life; silence for ping interval +
ping timeout *while it is reading* means the peer is lost.  A side that has
paused reading (its consumer is slow) does not count silence (``devstreams.wire.liveness``).
"""

from urllib.parse import urlsplit

EOF = "eof"

# Payload size the SDKs send in one binary message, and the most any side accepts.
CHUNK_BYTES = 64 * 1024
MAX_MESSAGE_BYTES = 256 * 1024

# WebSocket close codes (4000-4999 are for applications).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001          # gateway shutting down
CLOSE_PEER_CLOSED = 4000         # the other side closed its end
CLOSE_PEER_TIMEOUT = 4001        # the other side never connected within the connect timeout
CLOSE_PEER_LOST = 4002           # the other side vanished (crash, dead network, ping timeout)
CLOSE_PROTOCOL = 4003            # a side sent something the protocol does not allow
CLOSE_LIFETIME = 4004            # the stream reached its maximum life
CLOSE_ABORTED = 4005             # a side ended its end abnormally (its TCP connection reset, an error)
CLOSE_REVOKED = 4006             # an operator revoked access (device disabled, key rotated, stream closed)

CLOSE_REASONS = {
    CLOSE_PEER_CLOSED: "peer closed the stream",
    CLOSE_PEER_TIMEOUT: "peer did not connect in time",
    CLOSE_PEER_LOST: "peer connection lost",
    CLOSE_PROTOCOL: "protocol violation",
    CLOSE_LIFETIME: "stream reached its maximum lifetime",
    CLOSE_ABORTED: "peer aborted the stream",
    CLOSE_REVOKED: "access revoked",
    CLOSE_GOING_AWAY: "gateway shutting down",
}

STREAM_PATH_PREFIX = "/streams/"


def stream_url(gateway_base: str, stream_id: str) -> str:
    """``wss://host:port`` + stream id -> the URL both sides connect to."""
    return f"{gateway_base.rstrip('/')}{STREAM_PATH_PREFIX}{stream_id}"


def stream_id_from_path(path: str) -> str | None:
    """The stream id in a request path, or None if the path is not a stream path."""
    path = urlsplit(path).path
    if not path.startswith(STREAM_PATH_PREFIX):
        return None
    sid = path[len(STREAM_PATH_PREFIX):]
    if not sid or len(sid) > 64 or not all(c.isalnum() or c in "-_" for c in sid):
        return None
    return sid
