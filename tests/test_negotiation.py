"""Stream negotiation through a real hub (TLS on loopback), real agents and service clients."""

import asyncio
import time

import pytest

from device_agent import AgentSettings, DeviceAgent
from helpers import HubThread, run, wait_for
from service_client import (DeviceDisabledError, DeviceNotFoundError, DeviceOfflineError, LimitExceededError,
                            ServiceClient, StreamRejectedError, StreamTimeoutError, UnauthorizedError)
from devstreams.wire.connstr import parse


@pytest.fixture
def hub(any_hub):
    """The tests taking ``hub`` run on both broker backends: embedded, and Mosquitto with our plugin."""
    return any_hub


def rejecting(reason_fn):
    async def handler(request):
        await request.reject(reason_fn(request))
    return handler


async def accepting(request):
    stream = await request.accept()
    await stream.close()


def agent(hub, device_id, handler, **settings):
    cs = hub.add_device(device_id)
    return DeviceAgent(cs, handler, ca_file=hub.ca_file, settings=AgentSettings(**settings))


def service(hub):
    return ServiceClient(hub.service_cs(), ca_file=hub.ca_file)


def test_accept_returns_url_and_token(hub):
    async def main():
        async with agent(hub, "pump-1", accepting), service(hub) as svc:
            info = await svc.create_stream("pump-1", "ssh", response_timeout=10)
            assert info.accepted
            assert info.url.startswith(f"wss://localhost:{hub.gateway_port}/streams/")
            assert info.stream_id in info.url
            assert info.token.count(".") == 2  # a JWT
            assert info.token not in repr(info)
    run(main())


def test_reject_carries_reason(hub):
    async def main():
        async with agent(hub, "pump-2", rejecting(lambda r: f"no {r.name} here")), service(hub) as svc:
            with pytest.raises(StreamRejectedError) as err:
                await svc.create_stream("pump-2", "rdp")
            assert err.value.reason == "no rdp here"
    run(main())


@pytest.mark.timing
def test_unknown_offline_and_disabled_devices(hub):
    hub.add_device("sleeping")
    hub.add_device("banned")
    registry = hub.registry()
    registry.set_enabled("banned", False)

    async def main():
        async with service(hub) as svc:
            with pytest.raises(DeviceNotFoundError):
                await svc.create_stream("nobody", "ssh")
            started = time.monotonic()
            with pytest.raises(DeviceOfflineError):
                await svc.create_stream("sleeping", "ssh", response_timeout=30)
            assert time.monotonic() - started < 5, "offline must be answered at once, not after the timeout"
            with pytest.raises(DeviceDisabledError):
                await svc.create_stream("banned", "ssh")
    run(main())


@pytest.mark.timing
def test_timeout_when_device_does_not_answer(hub):
    async def slow(request):
        await asyncio.sleep(30)

    async def main():
        async with agent(hub, "slowpoke", slow), service(hub) as svc:
            started = time.monotonic()
            with pytest.raises(StreamTimeoutError, match="timed out waiting for the response from device"):
                await svc.create_stream("slowpoke", "ssh", response_timeout=1)
            assert 0.9 < time.monotonic() - started < 5
    run(main())
    outcomes = [e["outcome"] for e in hub.registry().activity(device="slowpoke")]
    assert outcomes == ["timeout"]


def test_handler_exception_becomes_reject(hub):
    async def broken(request):
        raise RuntimeError("boom")

    async def main():
        async with agent(hub, "buggy", broken), service(hub) as svc:
            with pytest.raises(StreamRejectedError, match="RuntimeError"):
                await svc.create_stream("buggy", "ssh")
            # the agent is still alive and answering
            with pytest.raises(StreamRejectedError):
                await svc.create_stream("buggy", "ssh")
    run(main())


def test_wrong_keys_are_refused(hub):
    good = parse(hub.add_device("keyed"))
    wrong_device = str(good.__class__(host=good.host, port=good.port, device_id="keyed", key=b"x" * 32))
    svc = parse(hub.service_cs())
    wrong_service = str(svc.__class__(host=svc.host, port=svc.port, policy="service", key=b"y" * 32))

    async def main():
        with pytest.raises(UnauthorizedError):
            await DeviceAgent(wrong_device, accepting, ca_file=hub.ca_file).start(timeout=20)
        client = ServiceClient(wrong_service, ca_file=hub.ca_file)
        with pytest.raises(UnauthorizedError):
            await client.create_stream("keyed", "ssh")
    run(main())


def test_disable_and_remove_drop_live_connection(hub):
    async def main():
        a = agent(hub, "victim", accepting, reconnect_max=2, reconnect_window=0.5)
        await a.start()
        try:
            async with service(hub) as svc:
                await wait_for(lambda: "victim" in hub.hub.controller.online_devices, what="victim online")
                hub.registry().set_enabled("victim", False)
                await wait_for(lambda: "victim" not in hub.hub.controller.online_devices, timeout=10,
                               what="disabled device dropped")
                with pytest.raises(DeviceDisabledError):
                    await svc.create_stream("victim", "ssh")
                # its next login is refused, and an agent refused after it was connected stops: its
                # device was revoked, retrying could never succeed (devstreams.transport.mqtt)
                with pytest.raises(UnauthorizedError):
                    await asyncio.wait_for(a.wait_closed(), 15)
                await a.stop()
                hub.registry().set_enabled("victim", True)
                a = DeviceAgent(hub.call(hub.hub.device_connection_string, "victim"), accepting,
                                ca_file=hub.ca_file, settings=AgentSettings(reconnect_max=2, reconnect_window=0.5))
                await a.start()
                await wait_for(lambda: "victim" in hub.hub.controller.online_devices, timeout=15,
                               what="re-enabled device back")
                hub.registry().rotate_key("victim")  # the agent's key is now the old one
                await wait_for(lambda: "victim" not in hub.hub.controller.online_devices, timeout=10,
                               what="re-keyed device dropped")
                await asyncio.sleep(3)
                assert "victim" not in hub.hub.controller.online_devices, "the old key must not log in again"
                with pytest.raises(DeviceOfflineError):
                    await svc.create_stream("victim", "ssh")
                hub.registry().remove("victim")
                with pytest.raises(DeviceNotFoundError):
                    await svc.create_stream("victim", "ssh")
        finally:
            await a.stop()
    run(main())


def test_limits_refuse_without_disturbing_others(tmp_path):
    hub = HubThread(tmp_path / "hub", max_concurrent_streams=2).start()
    try:
        gate = asyncio.Event

        async def main():
            release = gate()

            async def hold(request):
                await release.wait()
                await request.reject("released")

            async with agent(hub, "busy", hold), service(hub) as svc:
                first = asyncio.create_task(svc.create_stream("busy", "a"))
                second = asyncio.create_task(svc.create_stream("busy", "b"))
                await asyncio.sleep(0.5)
                with pytest.raises(LimitExceededError, match="concurrent streams"):
                    await svc.create_stream("busy", "c")
                release.set()
                for task in (first, second):
                    with pytest.raises(StreamRejectedError, match="released"):
                        await task
        run(main())
    finally:
        hub.stop()


def test_rate_limit(tmp_path):
    hub = HubThread(tmp_path / "hub", max_new_streams_per_second=1, new_streams_burst=3).start()
    try:
        async def main():
            async with agent(hub, "rated", rejecting(lambda r: "ok")), service(hub) as svc:
                results = await asyncio.gather(*(svc.create_stream("rated", "x") for _ in range(6)),
                                               return_exceptions=True)
                kinds = sorted(type(r).__name__ for r in results)
                assert kinds.count("StreamRejectedError") == 3
                assert kinds.count("LimitExceededError") == 3
        run(main())
    finally:
        hub.stop()


@pytest.mark.timeout(90)
def test_fifty_parallel_requests_to_ten_devices(hub):
    async def main():
        agents = [agent(hub, f"dev-{i}", rejecting(lambda r, i=i: f"dev-{i}:{r.name}")) for i in range(10)]
        for a in agents:
            await a.start()
        try:
            async with service(hub) as svc:
                async def one(n):
                    device, name = f"dev-{n % 10}", f"s{n}"
                    with pytest.raises(StreamRejectedError) as err:
                        await svc.create_stream(device, name, response_timeout=30)
                    return err.value.reason == f"{device}:{name}"
                results = await asyncio.gather(*(one(n) for n in range(50)))
                assert all(results)
        finally:
            for a in agents:
                await a.stop()
    run(main(), timeout=80)
    assert len([e for e in hub.registry().activity(limit=1000) if e["outcome"] == "rejected"]) == 50


@pytest.mark.timeout(90)
def test_agent_reconnects_after_hub_restart(tmp_path):
    hub = HubThread(tmp_path / "hub").start()
    try:
        cs = hub.add_device("phoenix")

        async def main():
            async def echo_once(request):
                async with await request.accept() as stream:
                    await stream.send(await stream.recv())

            a = DeviceAgent(cs, echo_once, ca_file=hub.ca_file,
                            settings=AgentSettings(reconnect_min=1, reconnect_max=2, reconnect_window=0.5))
            await a.start()
            try:
                await wait_for(lambda: "phoenix" in hub.hub.controller.online_devices, what="online")
                await asyncio.get_running_loop().run_in_executor(None, hub.stop)
                await wait_for(lambda: not a.connected, what="agent notices the hub is gone")
                await asyncio.get_running_loop().run_in_executor(None, hub.start)
                await wait_for(lambda: a.connected and "phoenix" in hub.hub.controller.online_devices,
                               timeout=30, what="agent back after restart")
                async with service(hub) as svc:
                    async with await (await svc.create_stream("phoenix", "ssh")).open() as stream:
                        await stream.send(b"back")
                        assert await stream.recv() == b"back"
            finally:
                await a.stop()
        run(main(), timeout=80)
    finally:
        hub.stop()
