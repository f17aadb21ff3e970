"""Pipe two WebSockets into each other until one ends, then end the other with a reason.

A clean close (1000/1001) reaches the other side as ``CLOSE_PEER_CLOSED``; an
abort keeps its code and reason; anything else (a lost or silent side) is
``CLOSE_PEER_LOST``, so the other side's local proxy resets its TCP connection.

Backpressure comes from awaiting ``send``: a slow reader fills the writer's
buffer (``write_limit``), the relay stops reading, the source's receive queue
fills (``max_queue``), websockets stops reading the socket, and TCP flow control
slows the sender.  Messages (data and the ``eof`` control) pass unchanged.
"""

import asyncio
import time
from dataclasses import dataclass

from websockets.asyncio.connection import Connection
from websockets.exceptions import ConnectionClosed

from devstreams.wire.streamproto import CLOSE_ABORTED, CLOSE_LIFETIME, CLOSE_PEER_CLOSED, CLOSE_PEER_LOST, CLOSE_REASONS

NORMAL_CLOSES = {1000, 1001}


@dataclass
class StreamRecord:
    stream_id: str
    device_id: str
    stream_name: str
    started: float                 # wall clock
    duration: float = 0.0
    bytes_to_service: int = 0      # device -> service
    bytes_to_device: int = 0       # service -> device
    close_reason: str = ""


async def _pump(src: Connection, dst: Connection, record: StreamRecord, to_service: bool) -> None:
    try:
        async for message in src:
            await dst.send(message)
            if not isinstance(message, str):
                if to_service:
                    record.bytes_to_service += len(message)
                else:
                    record.bytes_to_device += len(message)
    except ConnectionClosed:
        pass


def _ended_normally(ws: Connection) -> bool:
    rcvd = ws.protocol.close_rcvd
    return rcvd is not None and rcvd.code in NORMAL_CLOSES


async def close_within(ws: Connection, code: int, reason: str, timeout: float) -> None:
    """An abnormal close: the receiver resets anyway, so nothing in flight is worth waiting for."""
    try:
        await asyncio.wait_for(ws.close(code, reason), timeout)
    except asyncio.TimeoutError:
        ws.transport.abort()


async def relay(device: Connection, service: Connection, record: StreamRecord, max_lifetime: float = 0,
                close_timeout: float = 2.0) -> None:
    """Relay until one side ends; close the other; fill in ``record``.

    A clean end closes the other side without a time limit: the close frame waits
    behind every byte still on its way to a slow reader (liveness cuts a dead one).
    """
    start = time.monotonic()
    pumps = {asyncio.create_task(_pump(device, service, record, True)): (device, service, "device"),
             asyncio.create_task(_pump(service, device, record, False)): (service, device, "service")}
    try:
        done, _ = await asyncio.wait(pumps, timeout=max_lifetime or None, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            record.close_reason = CLOSE_REASONS[CLOSE_LIFETIME]
            await asyncio.gather(close_within(device, CLOSE_LIFETIME, record.close_reason, close_timeout),
                                 close_within(service, CLOSE_LIFETIME, record.close_reason, close_timeout))
            return
        src, dst, name = pumps[done.pop()]
        # The pump stops when its source ended or its destination refused a send.
        ended, other, who = (src, dst, name) if src.close_code is not None or dst.close_code is None \
            else (dst, src, "service" if name == "device" else "device")
        rcvd = ended.protocol.close_rcvd
        if _ended_normally(ended):
            code, record.close_reason = CLOSE_PEER_CLOSED, f"{who} closed the stream"
            reason = CLOSE_REASONS[code]
        elif rcvd is not None and rcvd.code == CLOSE_ABORTED:  # pass the side's own reason on
            code, reason = CLOSE_ABORTED, f"{who} aborted: {rcvd.reason or 'no reason given'}"[:120]
            record.close_reason = reason
        else:
            code, record.close_reason = CLOSE_PEER_LOST, f"{who} connection lost"
            reason = CLOSE_REASONS[code]
        if code == CLOSE_PEER_CLOSED:
            await other.close(code, reason)
        else:
            await close_within(other, code, reason, close_timeout)
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        record.duration = time.monotonic() - start
