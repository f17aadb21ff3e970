"""``devstreams gateway up``: a streaming gateway on its own, so several can run.

It needs the hub's stream-signing key and a TLS certificate; by default both
come from the hub's data dir (same machine, or a copy of those files).  Point
the hub at it with ``devstreams hub up --gateway-url <its public URL>``.
"""

import logging
from pathlib import Path

from broker import datadir
from wire.errors import ConfigError

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
    up.add_argument("--peer-timeout", type=float, default=60.0, help="how long a side waits for its peer (s)")
    up.add_argument("--ping-interval", type=float, default=10.0)
    up.add_argument("--ping-timeout", type=float, default=10.0)
    up.add_argument("--max-streams", type=int, default=1000)
    up.set_defaults(run=gateway_up, default_log_level="info")


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror} (pass --data-dir of the hub "
                          "or the file explicitly)") from None


def _server_ssl(args, data: Path):
    import ssl
    cert = Path(args.cert_file) if args.cert_file else data / "tls" / "server.pem"
    key = Path(args.key_file) if args.key_file else data / "tls" / "server.key"
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate {cert} / key {key}: {exc}") from None
    return ctx


def _activity_logger(data: Path):
    """Closed streams go to the hub's activity log when its registry is reachable here."""
    if not (data / "registry.db").exists():
        return None
    from broker.registry import open_registry
    registry = open_registry(data)

    def record(rec) -> None:
        registry.log_stream(device=rec.device_id, name=rec.stream_name, stream_id=rec.stream_id,
                            reason=rec.close_reason, bytes_to_device=rec.bytes_to_device,
                            bytes_to_service=rec.bytes_to_service, duration_s=round(rec.duration, 3))
    return record


async def gateway_up(args) -> int:
    from streamgw import Gateway, GatewaySettings
    data = datadir.resolve(args.data_dir)
    key_path = Path(args.signing_key_file) if args.signing_key_file else data / "keys" / "stream-signing.key"
    key = _read(key_path, "stream-signing key")
    if len(key) < 32:
        raise ConfigError(f"{key_path} is too short to be a signing key")
    if args.public_url and not args.public_url.startswith("wss://"):
        raise ConfigError("--public-url must start with wss://")
    settings = GatewaySettings(host=args.bind, port=args.port, public_url=args.public_url,
                               connect_timeout=args.peer_timeout, ping_interval=args.ping_interval,
                               ping_timeout=args.ping_timeout, max_streams=args.max_streams)
    gateway = Gateway(settings, key, _server_ssl(args, data), on_stream_closed=_activity_logger(data))
    try:
        await gateway.start()
    except OSError as exc:
        raise ConfigError(f"cannot listen on {args.bind}:{args.port}: {exc.strerror or exc}") from None
    print(f"gateway listening on {args.bind}:{gateway.port} as {gateway.public_url}", flush=True)
    try:
        await until_stopped()
    finally:
        await gateway.stop()
    return 0
