"""devstreams-only figures: stream setup time and new streams per second, through the SDK."""

import asyncio
import time

from service_client import ServiceClient

from .measure import percentiles


async def _one(svc: ServiceClient, device: str) -> float:
    start = time.perf_counter()
    info = await svc.create_stream(device, "echo", response_timeout=30)
    async with await info.open() as stream:
        await stream.send(b"x")
        if await stream.recv() != b"x":
            raise AssertionError("echo returned something else")
        return (time.perf_counter() - start) * 1000


async def _setup(cs: str, ca: str, device: str, count: int) -> dict:
    async with ServiceClient(cs, ca_file=ca) as svc:
        await _one(svc, device)  # warm up TLS session caches, imports
        samples = [await _one(svc, device) for _ in range(count)]
    return percentiles(samples) | {"streams": count}


async def _rate(cs: str, ca: str, device: str, seconds: float, workers: int, clients: int = 4) -> dict:
    """New streams per second the hub sustains, from ``clients`` service connections (the hub also
    limits each connection on its own: ``service_requests_per_second``)."""
    done, failed = 0, 0
    services = [ServiceClient(cs, ca_file=ca) for _ in range(clients)]
    try:
        for svc in services:
            await svc.connect()
        deadline = time.perf_counter() + seconds

        async def worker(svc: ServiceClient):
            nonlocal done, failed
            while time.perf_counter() < deadline:
                try:
                    await _one(svc, device)
                    done += 1
                except Exception:
                    failed += 1
        start = time.perf_counter()
        await asyncio.gather(*(worker(services[i % clients]) for i in range(workers)))
        elapsed = time.perf_counter() - start
    finally:
        for svc in services:
            await svc.close()
    return {"streams_per_s": done / elapsed, "completed": done, "failed": failed, "seconds": elapsed,
            "workers": workers, "clients": clients}


def setup_times(cs, ca, device, count) -> dict:
    return asyncio.run(_setup(cs, ca, device, count))


def stream_rate(cs, ca, device, seconds, workers=16) -> dict:
    return asyncio.run(_rate(cs, ca, device, seconds, workers))
