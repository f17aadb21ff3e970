"""Echo sample, device side: accept streams named "echo" and send every byte back.

    DEVICE_CONNECTION_STRING='HostName=…;DeviceId=pump-7;SharedAccessKey=…' \
    DEVSTREAMS_CA_FILE=~/.local/share/devstreams/tls/ca.pem  python examples/echo_device.py
"""

import asyncio
import os

from device_agent import DeviceAgent


async def handler(request):
    if request.name != "echo":
        await request.reject(f"this device only echoes, not {request.name!r}")
        return
    async with await request.accept() as stream:
        async for chunk in stream:          # until the service sends EOF
            await stream.send(chunk)


async def main():
    async with DeviceAgent(os.environ["DEVICE_CONNECTION_STRING"], handler) as agent:
        print(f"device {agent.device_id} is waiting for streams", flush=True)
        await agent.wait_closed()


asyncio.run(main())
