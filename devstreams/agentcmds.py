"""Device-side command: ``agent`` (the device-local proxy)."""

import asyncio
import logging
import os
import tomllib

from devstreams.transport.proxy import add_arguments as add_proxy_arguments
from devstreams.transport.proxy import from_arguments as proxy_from_arguments
from devstreams.wire.errors import ConfigError

from .signals import until_stopped

log = logging.getLogger(__name__)

DEVICE_CS_ENV = "DEVSTREAMS_DEVICE_CONNECTION_STRING"


def register(groups, common) -> None:
    p = groups.add_parser("agent", parents=[common], help="run the device agent (device-local proxy)",
                          description="Stay connected to the hub and serve streams: echo and/or "
                                      "local TCP targets from an allow-list.")
    p.add_argument("--connection-string", default=None,
                   help=f"the device connection string (or ${DEVICE_CS_ENV}, or 'connection_string' in --config)")
    p.add_argument("--ca-file", default=None, help="the hub's CA certificate (or $DEVSTREAMS_CA_FILE)")
    p.add_argument("--allow", action="append", default=[], metavar="NAME=HOST:PORT",
                   help="serve stream NAME by connecting to HOST:PORT (repeatable), e.g. ssh=127.0.0.1:22")
    p.add_argument("--echo", action="store_true", help="serve stream 'echo' by echoing bytes back")
    p.add_argument("--max-streams", type=int, default=None,
                   help="streams served at once; more are rejected as busy (default 256)")
    p.add_argument("--config", default=None, help="a TOML file with connection_string, ca_file, proxy, echo, "
                                                  "[allow] name = \"host:port\"")
    add_proxy_arguments(p)
    p.set_defaults(run=run_agent, default_log_level="info")


def _load_config(path: str | None) -> dict:
    if not path:
        return {}
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None


async def run_agent(args) -> int:
    from device_agent import AgentSettings, DeviceAgent
    from device_agent.targets import make_handler, parse_allow

    config = _load_config(args.config)
    cs = args.connection_string or os.environ.get(DEVICE_CS_ENV) or config.get("connection_string")
    if not cs:
        raise ConfigError(f"no device connection string: pass --connection-string, set {DEVICE_CS_ENV}, "
                          "or put connection_string in --config")
    allow_specs = [f"{k}={v}" for k, v in (config.get("allow") or {}).items()] + list(args.allow)
    allow = dict(parse_allow(spec) for spec in allow_specs)
    echo_enabled = bool(args.echo or config.get("echo"))
    if not allow and not echo_enabled:
        raise ConfigError("nothing to serve: add --allow NAME=HOST:PORT and/or --echo")
    max_streams = args.max_streams or config.get("max_streams") or AgentSettings.max_streams
    if not isinstance(max_streams, int) or max_streams < 1:
        raise ConfigError("max_streams must be a whole number of at least 1")
    agent = DeviceAgent(cs, make_handler(echo_enabled=echo_enabled, allow=allow),
                        ca_file=args.ca_file or config.get("ca_file"),
                        settings=AgentSettings(max_streams=max_streams),
                        proxy=proxy_from_arguments(args, config))
    # The hub may be unreachable for a long time at boot: a signal must still stop us.
    stopping = asyncio.create_task(until_stopped())
    starting = asyncio.create_task(agent.start(timeout=None))
    try:
        await asyncio.wait({stopping, starting}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # a refused key ends here, with its message
            offered = sorted(allow) + (["echo"] if echo_enabled else [])
            log.info("agent for device %s serving: %s", agent.device_id, ", ".join(offered))
            # ends on a signal, or raises when the hub no longer accepts this device (disabled meanwhile)
            closed = asyncio.create_task(agent.wait_closed())
            try:
                await asyncio.wait({stopping, closed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closed.cancel()
            if closed.done() and not closed.cancelled():
                closed.result()
    finally:
        for task in (stopping, starting):
            task.cancel()
        await asyncio.gather(stopping, starting, return_exceptions=True)
        await agent.stop()
    return 0


