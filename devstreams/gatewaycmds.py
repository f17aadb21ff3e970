"""``devstreams gateway up``: a streaming gateway on its own, so several can run.

It needs the hub's stream-signing key and a TLS certificate; by default both
come from the hub's data dir (same machine, or a copy of those files).  Point
the hub at it with ``devstreams hub up --gateway-url <its public URL>``.  Its
limits are the hub's ``gateway_*`` settings (and ``max_concurrent_streams``) from
``<data-dir>/hub.toml`` when there is one, so one file sets every gateway; flags override.
"""

import logging
import os
import re
import socket
from pathlib import Path

from broker import datadir
from devstreams.transport.proxy import add_arguments as add_proxy_arguments
from devstreams.transport.proxy import from_arguments as proxy_from_arguments
from devstreams.transport.proxy import parse_proxy_url, select_proxy
from devstreams.wire.errors import ConfigError

from .signals import until_stopped

log = logging.getLogger(__name__)


def register(groups, common) -> None:
    gw = groups.add_parser("gateway", help="run a standalone streaming gateway").add_subparsers(
        dest="gateway_command", metavar="COMMAND")
    gw.required = True
    up = gw.add_parser("up", parents=[common], help="run a streaming gateway")
    up.add_argument("--data-dir", default=None, help="the hub data dir to take the signing key and "
                                                     "certificate from (default as for 'hub up')")
    up.add_argument("--signing-key-file", default=None, help="the hub's keys/stream-signing.key")
    up.add_argument("--cert-file", default=None, help="TLS certificate (PEM; default: the hub's)")
    up.add_argument("--key-file", default=None, help="TLS private key (PEM; default: the hub's)")
    up.add_argument("--bind", default="0.0.0.0")
    up.add_argument("--port", type=int, default=8443, help="port (default 8443; 0 = any)")
    up.add_argument("--public-url", default=None,
                    help="the URL clients use, e.g. wss://gw2.example:8443 (default wss://localhost:<port>)")
    up.add_argument("--peer-timeout", type=float, default=None,
                    help="how long a side waits for its peer (s; default: hub.toml gateway_peer_timeout, 60)")
    up.add_argument("--ping-interval", type=float, default=None,
                    help="s; default: hub.toml gateway_ping_interval, 10")
    up.add_argument("--ping-timeout", type=float, default=None,
                    help="s; default: hub.toml gateway_ping_timeout, 10")
    up.add_argument("--max-streams", type=int, default=None,
                    help="streams open or waiting at once (default: hub.toml max_concurrent_streams, 1000)")
    up.add_argument("--hub", default=None, metavar="HOST:PORT",
                    help="the hub's MQTT endpoint, to report streams (activity log, stream limits) from "
                         "another machine; default: the hub running on --data-dir, if any")
    up.add_argument("--ca-file", default=None, help="the hub's CA, for --hub (default: <data-dir>/tls/ca.pem)")
    add_proxy_arguments(up)  # for the MQTT reporter's connection to the hub
    up.add_argument("--metrics-token-file", default=None,
                    help="serve Prometheus /metrics on this gateway's port to clients that send "
                         "'Authorization: Bearer <the token in this file>' (default: no /metrics)")
    up.add_argument("--name", default=None, help="this gateway's name in reports (default: from its port)")
    up.set_defaults(run=gateway_up, default_log_level="info")


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror} (pass --data-dir of the hub "
                          "or the file explicitly)") from None


def _server_ssl(args, data: Path):
    import ssl

    from devstreams.transport.tls import server_context
    cert = Path(args.cert_file) if args.cert_file else data / "tls" / "server.pem"
    key = Path(args.key_file) if args.key_file else data / "tls" / "server.key"
    try:
        return server_context(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate {cert} / key {key}: {exc}") from None


def _local_hub(data: Path) -> tuple[str, int, str] | None:
    """The MQTT address and CA of a hub running on this data dir (from its hub.json), or None.

    A gateway without ``--hub`` beside the hub reports to it over MQTT like a remote
    one, so the hub frees the stream's slot and writes its activity log (once);
    writing the registry directly would leave the slot taken until a fallback timer.
    """
    info = datadir.running_endpoints(data)
    if not info or not isinstance(info.get("mqttPort"), int):
        return None
    bind = (info.get("settings") or {}).get("bind")
    host = bind if bind not in (None, "", "0.0.0.0", "::", "127.0.0.1") else "localhost"
    return host, info["mqttPort"], info.get("caFile") or str(data / "tls" / "ca.pem")


def _hub_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--hub {text!r}: expected HOST:PORT, e.g. hub.example.com:8883")
    return host.strip("[]"), int(port)


def _mqtt_reporter(args, data: Path, key: bytes, port: int, local: tuple[str, int, str] | None):
    from streamgw import MqttReporter
    from devstreams.transport.tls import client_context
    if local is not None:
        host, hub_port, ca = local
        ca = args.ca_file or ca
    else:
        host, hub_port = _hub_address(args.hub)
        ca = args.ca_file or (str(data / "tls" / "ca.pem") if (data / "tls" / "ca.pem").exists() else None)
    name = args.name or re.sub(r"[^A-Za-z0-9._-]", "-", f"{socket.gethostname()}-{port}")[:60]
    # A reporter on this machine (local hub) goes direct unless --proxy says otherwise; NO_PROXY applies.
    override = proxy_from_arguments(args)
    if local is not None and override is None:
        override = ""
    proxy = select_proxy(host, hub_port, override, os.environ)
    return MqttReporter(host=host, port=hub_port, ssl_context=client_context(ca), signing_key=key, name=name,
                        proxy=proxy)


def _limits(args, data: Path) -> dict:
    """The hub's gateway limits (hub.toml in the data dir, else defaults), then the flags."""
    from broker.settings import gateway_kwargs, load, validate
    limits = gateway_kwargs(validate(load(data)))
    for flag, name in (("peer_timeout", "peer_timeout"), ("ping_interval", "ping_interval"),
                       ("ping_timeout", "ping_timeout"), ("max_streams", "max_streams")):
        value = getattr(args, flag)
        if value is not None:
            if value <= 0:
                raise ConfigError(f"--{flag.replace('_', '-')} must be greater than 0")
            limits[name] = value
    limits.pop("host"), limits.pop("port")
    return limits


async def gateway_up(args) -> int:
    from streamgw import Gateway, GatewaySettings
    data = datadir.resolve(args.data_dir)
    key_path = Path(args.signing_key_file) if args.signing_key_file else data / "keys" / "stream-signing.key"
    key = _read(key_path, "stream-signing key")
    if len(key) < 32:
        raise ConfigError(f"{key_path} is too short to be a signing key")
    if args.public_url and not args.public_url.startswith("wss://"):
        raise ConfigError("--public-url must start with wss://")
    settings = GatewaySettings(**_limits(args, data), host=args.bind, port=args.port, public_url=args.public_url)
    metrics_token = None
    if args.metrics_token_file:
        metrics_token = _read(Path(args.metrics_token_file), "metrics token").decode("utf-8", "replace").strip()
        if len(metrics_token) < 16 or not metrics_token.isprintable() or " " in metrics_token:
            raise ConfigError(f"{args.metrics_token_file}: a metrics token is 16 or more printable characters "
                              "without spaces (e.g. the output of 'devstreams hub metrics-token')")
    if args.hub:
        _hub_address(args.hub)  # refuse a bad address before listening
    if args.proxy:
        parse_proxy_url(args.proxy)  # and a bad proxy URL
    # Stream events go to the gateway's sink; the MQTT reporter subscribes to it: to --hub, else to
    # a hub running on the data dir (this machine).  With neither, nothing reports: say so once.
    local = None if args.hub else _local_hub(data)
    if not args.hub and local is None:
        log.warning("no hub runs on %s and no --hub given: streams will not be reported (no activity log, "
                    "no slot accounting); start the hub first or pass --hub HOST:PORT", data)
    gateway = Gateway(settings, key, _server_ssl(args, data))
    if metrics_token:  # /metrics on this gateway's port, behind that bearer token
        from streamgw.metrics import serve_metrics
        serve_metrics(gateway, metrics_token)
    try:
        await gateway.start()
    except OSError as exc:
        raise ConfigError(f"cannot listen on {args.bind}:{args.port}: {exc.strerror or exc}") from None
    reporter = None
    if args.hub or local is not None:
        reporter = _mqtt_reporter(args, data, key, gateway.port, local)
        reporter.attach(gateway)  # the hub's revocations reach open streams; byte counts reach the hub
        await reporter.start()
    print(f"gateway listening on {args.bind}:{gateway.port} as {gateway.public_url}", flush=True)
    try:
        await until_stopped()
    finally:
        await gateway.stop()
        if gateway.http is not None:
            await gateway.http.stop()
        if reporter is not None:
            await reporter.stop()
    return 0
