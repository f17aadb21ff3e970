"""streamgw/passthrough.py: which bytes the relay passes itself and which websockets parses.

Frames are built with websockets' own serializer (client side: masked), so every
case is what a real client sends, plus hostile headers no client would.
"""

import asyncio
import os
import random
import tempfile
from pathlib import Path

import pytest
from websockets.client import ClientProtocol
from websockets.exceptions import PayloadTooBig, ProtocolError
from websockets.frames import Frame, Opcode
from websockets.protocol import CLIENT, SERVER, Protocol, State
from websockets.uri import parse_uri

from broker import pki
from devstreams.transport.passthrough import HAND, PASS, WAIT, MaskSource, binary_header, client_frame_parts, scan
from devstreams.transport.tls import client_context
from devstreams.transport.wslink import LiveClientConnection
from devstreams.wire.streamproto import CHUNK_BYTES
from helpers import TlsPair

MAX = 256 * 1024


def frame(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin).serialize(mask=True)


def test_a_whole_binary_frame_passes_with_its_payload_bounds_for_each_length_encoding():
    for size in (0, 1, 125, 126, 65535, 65536, 200_000):
        data = os.urandom(size)
        raw = b"junk" + frame(Opcode.BINARY, data)
        kind, start, end = scan(raw, 4, MAX)
        assert (kind, end) == (PASS, len(raw))
        mask = raw[start - 4:start]
        assert bytes(b ^ mask[i % 4] for i, b in enumerate(raw[start:end])) == data


@pytest.mark.parametrize("raw", [
    frame(Opcode.TEXT, b"eof"),
    frame(Opcode.BINARY, b"first", fin=False),
    frame(Opcode.CONT, b"more"),
    frame(Opcode.PING, b"hb"),
    frame(Opcode.PONG, b"hb"),
    frame(Opcode.CLOSE, b"\x03\xe8bye"),
], ids=["text", "fragment", "continuation", "ping", "pong", "close"])
def test_every_other_whole_frame_is_handed_to_websockets_exactly(raw):
    assert scan(raw + b"\x82", 0, MAX) == (HAND, 0, len(raw))


def test_inside_a_fragmented_message_even_a_binary_frame_is_websockets_to_judge():
    raw = frame(Opcode.BINARY, b"x")
    assert scan(raw, 0, MAX, fragmented=True) == (HAND, 0, len(raw))


def test_a_frame_cut_anywhere_waits_for_the_rest():
    for raw in (frame(Opcode.BINARY, os.urandom(70_000)), frame(Opcode.BINARY, os.urandom(300)),
                frame(Opcode.PING, b"hb")):
        for cut in range(min(20, len(raw))):
            assert scan(raw[:cut], 0, MAX).kind == WAIT
        assert scan(raw[:-1], 0, MAX) == (WAIT, 0, len(raw))   # the header says where the frame ends
        assert scan(raw, 0, MAX).kind != WAIT


@pytest.mark.parametrize("head", [
    bytes((0x82, 0x05)) + b"hello",                    # unmasked: a client must mask
    bytes((0xC2, 0x85)) + b"mask" + b"hello",          # RSV1 (compression was not negotiated)
    bytes((0x82, 0xFF)) + (2**63).to_bytes(8, "big"),  # a 2**63-byte frame: refused on its header
    bytes((0x82, 0xFE)) + (MAX + 1).to_bytes(2, "big")[-2:] if MAX + 1 < 65536 else
    bytes((0x82, 0xFF)) + (MAX + 1).to_bytes(8, "big"),  # one byte over max_size
], ids=["unmasked", "reserved-bit", "huge", "over-max-size"])
def test_a_header_websockets_refuses_is_handed_over_at_once_with_all_that_follows(head):
    data = head + b"rest of the read"
    assert scan(data, 0, MAX) == (HAND, 0, len(data))   # nothing waits for a payload that will never count


def test_max_size_none_means_no_limit():
    raw = frame(Opcode.BINARY, os.urandom(MAX + 10))
    assert scan(raw, 0, None).kind == PASS


def test_binary_header_is_what_websockets_writes_for_a_final_binary_frame():
    for size in (0, 125, 126, 65535, 65536, 300_000):
        data = os.urandom(size)
        assert binary_header(size) + data == Frame(Opcode.BINARY, data).serialize(mask=False)


@pytest.mark.parametrize("masked", [True, False], ids=["client-frames", "server-frames"])
def test_random_frame_mixes_cut_at_random_points_come_out_exactly_as_websockets_parses_them(masked):
    """The loop of devstreams.transport.wslink, played on a sans-I/O websockets protocol (the
    gateway's side reads masked frames, the agent's and the proxy's unmasked ones): what it passes
    plus what websockets parses from the handed bytes is, in order, the very frames sent."""
    rnd = random.Random(14)
    for _ in range(200):
        sent, raw = [], b""
        for _ in range(rnd.randint(1, 12)):
            pick = rnd.random()
            if pick < 0.6:
                f = Frame(Opcode.BINARY, rnd.randbytes(rnd.choice((0, 1, 64, 200, 70_000))))
                sent.append(f)
            elif pick < 0.7:
                f = Frame(Opcode.PING, rnd.randbytes(4))
            elif pick < 0.8:
                f = Frame(Opcode.TEXT, b"eof")
                sent.append(f)
            else:   # a fragmented binary message
                parts = [rnd.randbytes(rnd.randint(0, 500)) for _ in range(rnd.randint(2, 4))]
                fs = [Frame(Opcode.BINARY if i == 0 else Opcode.CONT, p, fin=i == len(parts) - 1)
                      for i, p in enumerate(parts)]
                sent.extend(fs)
                raw += b"".join(x.serialize(mask=masked) for x in fs)
                continue
            raw += f.serialize(mask=masked)
        got = relay_like(raw, [rnd.randint(1, 9000) for _ in range(40)], masked)
        assert [(f.opcode, f.data, f.fin) for f in got] == [(f.opcode, f.data, f.fin) for f in sent]


def open_protocol(side) -> Protocol:
    ws = Protocol(side, state=State.OPEN, max_size=MAX)
    assert not ws.reader.buffer
    return ws


def relay_like(raw: bytes, cuts: list[int], masked: bool = True) -> list[Frame]:
    """Feed ``raw`` in reads of the sizes ``cuts`` (then the rest) as ``_LivenessMixin._pass_frames`` does."""
    ws = open_protocol(SERVER if masked else CLIENT)
    out: list[Frame] = []
    partial, need, reads = b"", 0, []
    pos = 0
    for n in cuts:
        reads.append(raw[pos:pos + n])
        pos += n
    reads.append(raw[pos:])
    for data in reads:
        if partial and len(partial) + len(data) < need:
            partial += data
            continue
        data, partial = partial + data, b""
        at = 0
        while at < len(data):
            kind, start, end = scan(data, at, ws.max_size, ws.cur_size is not None, masked)
            if kind == PASS:
                mask = data[start - 4:start] if masked else b"\0\0\0\0"
                out.append(Frame(Opcode.BINARY, bytes(b ^ mask[i % 4] for i, b in enumerate(data[start:end]))))
                at = end
            elif kind == HAND:
                ws.receive_data(data[at:end])
                out.extend(e for e in ws.events_received() if e.opcode in (Opcode.BINARY, Opcode.TEXT, Opcode.CONT))
                assert not ws.reader.buffer   # websockets stands between frames again
                at = end
            else:
                partial, need = data[at:], (end - at if end else 0)
                break
    assert not partial
    return out


def test_websockets_still_refuses_what_is_handed_to_it():
    """The errors stay websockets': a frame over max_size (1009) and an unmasked frame (1002)."""
    for head, error in ((bytes((0x82, 0xFF)) + (MAX + 1).to_bytes(8, "big"), PayloadTooBig),
                        (bytes((0x82, 0x05)) + b"hello", ProtocolError)):
        ws = open_protocol(SERVER)
        kind, _, end = scan(head, 0, MAX)
        assert kind == HAND
        ws.receive_data(head[:end])
        assert isinstance(ws.parser_exc, error)


def test_a_client_reads_unmasked_frames_and_hands_a_masked_one_to_websockets():
    data = os.urandom(300)
    raw = Frame(Opcode.BINARY, data).serialize(mask=False)
    kind, start, end = scan(raw, 0, MAX, masked=False)
    assert (kind, raw[start:end]) == (PASS, data)
    masked = Frame(Opcode.BINARY, data).serialize(mask=True)
    assert scan(masked, 0, MAX, masked=False) == (HAND, 0, len(masked))   # websockets: "incorrect masking"


def test_client_frame_is_what_websockets_parses_with_a_fresh_mask_each_time():
    for size in (0, 1, 125, 126, 65535, 65536, 100_000):
        data = os.urandom(size)
        one, two = b"".join(client_frame_parts(data)), b"".join(client_frame_parts(memoryview(data)))
        server = open_protocol(SERVER)
        server.receive_data(one + two)
        frames = server.events_received()
        assert [(f.opcode, f.data, f.fin) for f in frames] == [(Opcode.BINARY, data, True)] * 2
        start = len(one) - size
        assert one[start - 4:start] != two[start - 4:start]   # a new mask per frame (odds of a tie: 2**-32)


def test_masks_are_consecutive_os_urandom_bytes_each_used_once(monkeypatch):
    """Every mask is the next 4 bytes the CSPRNG gave, across batch boundaries, none used twice."""
    drawn, real = [], os.urandom

    def urandom(n):
        drawn.append(real(n))
        return drawn[-1]

    monkeypatch.setattr("devstreams.transport.passthrough.os.urandom", urandom)
    source = MaskSource()
    masks = [source.take() for _ in range(2 * MaskSource.BATCH // 4 + 3)]
    assert len(drawn) == 3 and all(len(d) == MaskSource.BATCH for d in drawn)
    assert b"".join(masks) == b"".join(drawn)[:4 * len(masks)]


def test_the_frames_of_one_write_reach_the_tls_transport_as_one_buffer():
    """A pump's (and the relay's) frames of one read go to the TLS transport in one ``write``: TLS
    transports encrypt each buffer on its own, so frames given one by one would each end in a
    record of a few bytes; joined they fill 16 KiB records across their boundaries."""
    class Transport:
        def __init__(self):
            self.calls = []

        def write(self, data):
            self.calls.append(("write", bytes(data)))

        def writelines(self, pieces):
            self.calls.append(("writelines", [bytes(p) for p in pieces]))

    async def main():
        conn = LiveClientConnection(ClientProtocol(parse_uri("wss://localhost/")))
        conn.transport = Transport()
        data = [os.urandom(CHUNK_BYTES) for _ in range(3)] + [os.urandom(1000)]
        for chunk in data:
            conn.protocol.writes.extend(client_frame_parts(chunk))
        conn.send_data()
        return conn.transport.calls, data
    calls, data = asyncio.run(main())
    assert [kind for kind, _ in calls] == ["write"]
    server = open_protocol(SERVER)
    server.receive_data(calls[0][1])
    assert [f.data for f in server.events_received()] == data
    # what that buffer costs in TLS records: as few as its length allows (16 KiB each)
    files = pki.ensure_tls(Path(tempfile.mkdtemp(prefix="devstreams-test-")))
    records = tls_records(pki.server_context(files), client_context(files.ca_cert), [calls[0][1]])
    assert records == -(-len(calls[0][1]) // 16384)
    one_by_one = [b"".join(client_frame_parts(chunk)) for chunk in data]
    assert tls_records(pki.server_context(files), client_context(files.ca_cert), one_by_one) > records


def tls_records(server_ctx, client_ctx, writes: list[bytes]) -> int:
    """Application-data records a TLS client sends for ``writes``, one ``SSLObject.write`` each."""
    pair = TlsPair(server_ctx, client_ctx)
    for data in writes:
        pair.client.write(data)
    wire, count, pos = pair.c_out.read(), 0, 0
    while pos < len(wire):
        kind, length = wire[pos], int.from_bytes(wire[pos + 3:pos + 5], "big")
        count += kind == 23
        pos += 5 + length
    return count
