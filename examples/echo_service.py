"""Echo sample, service side: open a stream to a device by its ID, send a line, print the echo.

    SERVICE_CONNECTION_STRING="$(devstreams hub connection-string)" \
    DEVSTREAMS_CA_FILE=~/.local/share/devstreams/tls/ca.pem  python examples/echo_service.py pump-7 "hello"
"""

import asyncio
import os
import sys

from service_client import ServiceClient


async def main(device_id: str, text: str):
    async with ServiceClient(os.environ["SERVICE_CONNECTION_STRING"]) as hub:
        info = await hub.create_stream(device_id, "echo")       # raises if rejected, offline, …
        async with await info.open() as stream:
            await stream.send(text.encode())
            await stream.send_eof()
            echoed = b"".join([chunk async for chunk in stream])
    print(echoed.decode())


asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "hello"))
