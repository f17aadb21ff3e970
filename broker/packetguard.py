"""Checks every MQTT packet a client sends after CONNECT, before amqtt reads it (sans-I/O).

amqtt 0.12 trusts a packet's announced length: it reads the fixed header, then
``readexactly(remaining_length)``, so one PUBLISH announcing 256 MiB makes the
hub buffer 256 MiB.  A PUBLISH whose topic name holds ``+`` or ``#`` (forbidden
by MQTT 3.1.1 section 4.7.1) stalls that connection inside amqtt: no PINGRESP,
no keepalive.  And a retained payload is kept for ever, one per topic.

``PacketGuard`` is fed the client-to-broker bytes in whatever chunks the network
delivers and refuses, with a reason, as soon as it has seen enough:

- any packet whose remaining length is over ``max_packet_bytes``: decided from the
  fixed header alone, before a byte of the body is read or buffered;
- a malformed fixed header (remaining length over 4 bytes), a reserved packet type,
  a second CONNECT, a PUBLISH with QoS 3;
- a PUBLISH whose topic name is empty, longer than its packet, or holds ``+``/``#``;
- a retained PUBLISH whose payload is over ``max_retained_bytes`` (devices may
  only retain their presence on their status topic, a few dozen bytes).

It never buffers a body: at most a PUBLISH's topic (bounded by the packet
limit).  Refusal is final; the caller closes the connection.  No I/O, no clock.
"""

CONNECT, PUBLISH = 1, 3
RESERVED = (0, 15)
MAX_LENGTH_BYTES = 4


class PacketGuard:
    def __init__(self, max_packet_bytes: int, max_retained_bytes: int):
        self.max_packet_bytes = max_packet_bytes
        self.max_retained_bytes = max_retained_bytes
        self.refused: str | None = None
        self.packets = 0  # whole packets passed (for tests and logs)
        self._reset()

    def _reset(self) -> None:
        self._state = "type"
        self._byte1 = 0
        self._length = 0
        self._length_bytes = 0
        self._left = 0          # body bytes of the current packet not yet seen
        self._head = bytearray()  # a PUBLISH's topic-length field and topic, while collecting them
        self._need = 0          # how many bytes of _head we want

    @property
    def at_boundary(self) -> bool:
        """True when the next byte fed starts a new packet (the gate answers a lone PINGREQ itself)."""
        return self.refused is None and self._state == "type"

    def feed(self, data: bytes) -> str | None:
        """Inspect the next bytes; return None if all is well so far, else the (final) reason."""
        if self.refused is not None:
            return self.refused
        view = memoryview(data)
        i, n = 0, len(view)
        while i < n:
            if self._state == "type":
                self._byte1 = view[i]
                i += 1
                kind = self._byte1 >> 4
                if kind in RESERVED:
                    return self._refuse(f"reserved packet type {kind}")
                if kind == CONNECT:
                    return self._refuse("a second CONNECT")
                if kind == PUBLISH and (self._byte1 >> 1) & 3 == 3:
                    return self._refuse("PUBLISH with QoS 3")
                self._state, self._length, self._length_bytes = "length", 0, 0
            elif self._state == "length":
                byte = view[i]
                i += 1
                self._length += (byte & 0x7F) << (7 * self._length_bytes)
                self._length_bytes += 1
                if byte & 0x80:
                    if self._length_bytes == MAX_LENGTH_BYTES:
                        return self._refuse("malformed remaining length")
                    continue
                if self._length > self.max_packet_bytes:
                    return self._refuse(f"packet of {self._length} bytes is over the limit of "
                                        f"{self.max_packet_bytes} (max_packet_bytes)")
                self._left = self._length
                if self._byte1 >> 4 == PUBLISH:
                    if self._length < 2:
                        return self._refuse("PUBLISH without a topic")
                    self._state, self._head, self._need = "topic", bytearray(), 2
                else:
                    self._state = "body"
                    if self._left == 0:
                        self._done()
            elif self._state == "topic":
                take = min(self._need - len(self._head), n - i)
                self._head += view[i:i + take]
                i += take
                self._left -= take
                if len(self._head) < self._need:
                    continue
                if self._need == 2:
                    topic_len = int.from_bytes(self._head, "big")
                    if topic_len == 0:
                        return self._refuse("PUBLISH with an empty topic")
                    if 2 + topic_len > self._length:
                        return self._refuse("PUBLISH topic longer than its packet")
                    self._need = 2 + topic_len
                    continue
                reason = self._check_publish(bytes(self._head[2:]))
                if reason:
                    return self._refuse(reason)
                self._head = bytearray()
                self._state = "body"
                if self._left == 0:
                    self._done()
            else:  # body: skip it without keeping it
                take = min(self._left, n - i)
                i += take
                self._left -= take
                if self._left == 0:
                    self._done()
        return None

    def _check_publish(self, topic: bytes) -> str | None:
        if b"+" in topic or b"#" in topic:
            return f"PUBLISH to a topic with a wildcard ({_show(topic)})"
        if self._byte1 & 1:  # retain
            qos = (self._byte1 >> 1) & 3
            payload = self._length - 2 - len(topic) - (2 if qos else 0)
            if payload > self.max_retained_bytes:
                return (f"retained PUBLISH of {payload} bytes to {_show(topic)} is over the limit of "
                        f"{self.max_retained_bytes} (max_retained_payload_bytes)")
        return None

    def _done(self) -> None:
        self.packets += 1
        self._state = "type"

    def _refuse(self, reason: str) -> str:
        self.refused = reason
        return reason


def check_will(topic: str | None, message: bytes | None, retain: bool, max_retained_bytes: int) -> str | None:
    """The same rules for a CONNECT's last will, which the broker publishes for the client later."""
    raw = (topic or "").encode()
    if not raw:
        return "last will with an empty topic"
    if b"+" in raw or b"#" in raw:
        return f"last will to a topic with a wildcard ({_show(raw)})"
    if retain and len(message or b"") > max_retained_bytes:
        return (f"retained last will of {len(message)} bytes is over the limit of {max_retained_bytes} "
                "(max_retained_payload_bytes)")
    return None


def _show(topic: bytes) -> str:
    return repr(topic[:100].decode("utf-8", "replace"))
