"""Which bytes of a stream's WebSocket are whole binary frames that can skip websockets' parser.

Almost every frame a stream carries is one complete binary message of up to
``CHUNK_BYTES`` (``wire/streamproto.py``): a header, a 4-byte mask from a client,
the payload.  websockets' parser takes each through a generator chain, an
``Opcode`` enum call, a ``Frame`` object and its checks: about 20 us per 64-byte
message, and the gateway's relay then serialized a second ``Frame`` for the peer.
That was a fifth of the gateway's CPU per relayed message (issue 10's 5,000
streams) and a hop's worth of issue 14's ping-pong.  Instead, such a frame's
header is read here and its payload goes on directly: the gateway's relay
unmasks it (websockets' C ``apply_mask``) and writes it to the peer behind a
server header of its own (the frame passes unchanged: same opcode, payload,
FIN); the agent's and the proxy's pumps write the payload to TCP as it lies in
the read (devstreams.transport.wslink ``_LivenessMixin``).

Everything else stays websockets' job, so the protocol's rules are enforced
in one place: control frames (ping, pong, close), text (``eof``, UTF-8 checked),
fragments and their continuations, and any header websockets must refuse
(a client frame without a mask or a server frame with one, reserved bits or
opcodes, a payload over ``max_size``).  websockets is handed exactly those bytes,
frame by frame, so its parser is always at a frame boundary when the next
header is read here.

``scan`` is pure (bytes in, a decision out) and safe on hostile input: it reads
only the header it needs and never trusts a length beyond ``max_size``.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from websockets.frames import apply_mask   # websockets' C extension when it is built (it is here)

PASS = "pass"    # a whole binary frame (FIN, no reserved bits, masked as the side expects, within max_size)
HAND = "hand"    # bytes websockets must parse: a whole other frame, or a header it will refuse
WAIT = "wait"    # the frame at ``pos`` is not complete yet: keep the bytes until more arrive

FIN_BINARY = 0x82          # FIN set, no reserved bits, opcode 2 (binary)
MASK_BIT = 0x80


class Scan(NamedTuple):
    kind: str
    start: int    # PASS: where the payload starts (a mask's 4 bytes just before, if masked)
    end: int      # PASS / HAND: where the bytes end (HAND of a refused header: the end of ``data``);
                  # WAIT: where the frame will end once its header is complete (else 0)


def scan(data: bytes | memoryview, pos: int, max_size: int | None, fragmented: bool = False,
         masked: bool = True) -> Scan:
    """The frame that starts at ``data[pos]``: pass it, hand it to websockets, or wait for more.

    ``max_size``: websockets' (None: no limit).  ``fragmented``: websockets' parser is inside a
    fragmented message (its ``cur_size`` is set): then every frame is websockets' (a binary frame
    there is its error to report).  ``masked``: frames must carry a mask (read by a server) or
    must not (read by a client).
    """
    avail = len(data) - pos
    if avail < 2:
        return Scan(WAIT, 0, 0)
    head1, head2 = data[pos], data[pos + 1]
    length = head2 & 0x7F
    if bool(head2 & MASK_BIT) != masked or head1 & 0x70:
        return Scan(HAND, pos, len(data))     # wrong masking or reserved bits: websockets fails the connection
    extended = 2 if length == 126 else 8 if length == 127 else 0
    if extended:
        if avail < 2 + extended:
            return Scan(WAIT, 0, 0)
        length = int.from_bytes(data[pos + 2:pos + 2 + extended], "big")
    if max_size is not None and length > max_size:
        return Scan(HAND, pos, len(data))     # websockets answers 1009 (message too big) on the length
    end = pos + 2 + extended + (4 if masked else 0) + length     # the mask, then the payload
    if end > len(data):
        return Scan(WAIT, 0, end)
    if head1 == FIN_BINARY and not fragmented:
        return Scan(PASS, end - length, end)
    return Scan(HAND, pos, end)


def binary_header(length: int, mask_bit: int = 0) -> bytes:
    """The header of a final binary frame of ``length`` bytes: a server's, or with ``MASK_BIT`` a client's."""
    if length < 126:
        return bytes((FIN_BINARY, mask_bit | length))
    if length < 65536:
        return bytes((FIN_BINARY, mask_bit | 126)) + length.to_bytes(2, "big")
    return bytes((FIN_BINARY, mask_bit | 127)) + length.to_bytes(8, "big")


class MaskSource:
    """Frame masks from the operating system's CSPRNG, drawn 4 KiB at a time.

    RFC 6455 (5.3) wants each frame's mask fresh and unpredictable, from a strong
    source of entropy; websockets takes 4 bytes of ``os.urandom`` per frame
    (``secrets.token_bytes``), a ``getrandom`` system call each: 5 % of the
    proxy's time in a bulk transfer.  The bytes here are the same ``os.urandom``
    bytes, each used once, fetched 1,024 masks at a time.
    """

    BATCH = 4096

    def __init__(self) -> None:
        self._pool = b""
        self._next = 0

    def take(self) -> bytes:
        if self._next >= len(self._pool):
            self._pool, self._next = os.urandom(self.BATCH), 0
        mask = self._pool[self._next:self._next + 4]
        self._next += 4
        return mask


_masks = MaskSource()


def client_frame_parts(payload: bytes | memoryview) -> tuple[bytes, bytes]:
    """A whole binary frame from a client, as websockets' ``send_binary`` writes it: (header with
    its mask, masked payload), to be joined with the other frames of the same write.

    websockets' serializer builds a ``Frame``, checks it, and writes the masked payload
    through a ``BytesIO``: one more copy of every byte and a few microseconds per frame.
    Each frame gets a fresh mask (``MaskSource``).
    """
    mask = _masks.take()
    return binary_header(len(payload), MASK_BIT) + mask, apply_mask(payload, mask)
