"""Many idle devices in one process: raw MQTT 3.1.1 over TLS, as the real agent logs in.

Run as ``python -m bench.simdevices HOST PORT CA_FILE CONNSTR_FILE`` (one device connection
string per line); prints ``connected N`` once all are up, then idles (answering
nothing) until stdin closes.  Cheap on purpose: the hub's cost per device is measured,
not this process's.
"""

import asyncio
import ssl
import struct
import sys

from devstreams.wire import connstr, sas, topics
from devstreams.wire import messages as msg

KEEPALIVE = 120


def _str(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(data)) + data


def _packet(kind: int, body: bytes) -> bytes:
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes([kind]) + bytes(encoded) + body


def connect_packet(client_id: str, password: str) -> bytes:
    flags = 0x80 | 0x40 | 0x02  # username, password, clean session
    header = _str("MQTT") + bytes([4, flags]) + struct.pack("!H", KEEPALIVE)
    return _packet(0x10, header + _str(client_id) + _str(client_id) + _str(password))


def subscribe_packet(topic: str) -> bytes:
    return _packet(0x82, struct.pack("!H", 1) + _str(topic) + bytes([0]))


def publish_packet(topic: str, payload: bytes) -> bytes:
    return _packet(0x31, _str(topic) + payload)  # QoS 0, retained


async def one_device(cs: connstr.ConnectionString, host: str, port: int, ctx: ssl.SSLContext) -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx)
    token = sas.make_token(cs.key, sas.device_resource(cs.device_id), 3600)
    writer.write(connect_packet(cs.device_id, token))
    connack = await reader.readexactly(4)
    if connack[3] != 0:
        raise RuntimeError(f"{cs.device_id} refused: CONNACK {connack[3]}")
    writer.write(subscribe_packet(topics.device_requests(cs.device_id)))
    await reader.readexactly(5)  # SUBACK
    writer.write(publish_packet(topics.device_status(cs.device_id),
                                msg.encode(msg.Presence(online=True, conn="sim"))))
    await writer.drain()
    return writer


async def main(host: str, port: int, ca_file: str, path: str) -> None:
    ctx = ssl.create_default_context(cafile=ca_file)
    strings = [connstr.parse(line) for line in open(path).read().split()]
    writers = []
    for start in range(0, len(strings), 50):  # 50 handshakes at a time
        batch = strings[start:start + 50]
        writers += await asyncio.gather(*(one_device(cs, host, port, ctx) for cs in batch))
    print(f"connected {len(writers)}", flush=True)

    async def keepalive() -> None:
        while True:
            await asyncio.sleep(KEEPALIVE / 2)
            for w in writers:
                w.write(b"\xc0\x00")  # PINGREQ

    pinger = asyncio.create_task(keepalive())
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes
    pinger.cancel()
    for w in writers:
        w.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]))
