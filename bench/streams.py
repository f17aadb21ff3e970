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


async def _rate(cs: str, ca: str, device: str, seconds: float, workers: int) -> dict:
    done, failed = 0, 0
    async with ServiceClient(cs, ca_file=ca) as svc:
        deadline = time.perf_counter() + seconds

        async def worker():
            nonlocal done, failed
            while time.perf_counter() < deadline:
                try:
                    await _one(svc, device)
                    done += 1
                except Exception:
                    failed += 1
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(workers)))
        elapsed = time.perf_counter() - start
    return {"streams_per_s": done / elapsed, "completed": done, "failed": failed, "seconds": elapsed,
            "workers": workers}


def setup_times(cs, ca, device, count) -> dict:
    return asyncio.run(_setup(cs, ca, device, count))


def stream_rate(cs, ca, device, seconds, workers=16) -> dict:
    return asyncio.run(_rate(cs, ca, device, seconds, workers))
