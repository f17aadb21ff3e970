"""Running the hub against an external Mosquitto 2.0: its plugin, its config, its kick messages.

Mosquitto asks the hub's auth hook (broker/authhook.py) about every login and topic through
``devstreams_auth.c``, a small plugin compiled on the user's machine (it needs only
Mosquitto's headers: Debian ``mosquitto-dev``).  :func:`mosquitto_conf` prepares what the
config refers to (TLS files, the plugin, the hook token, a persistence dir) and returns a
complete ``mosquitto.conf``; the hub's controller ends sessions through the plugin by
publishing :func:`kick_payload` to :data:`CONTROL_TOPIC`.
"""

import ipaddress
import logging
import os
import pwd
import shutil
import subprocess
from pathlib import Path

from devstreams.wire.errors import ConfigError

from .. import datadir, pki

log = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/devstreams/v1"
SOURCE = Path(__file__).with_name("devstreams_auth.c")
PLUGIN_NAME = "devstreams_auth.so"
MOSQUITTO_DIR = "mosquitto"       # <data-dir>/mosquitto: the built plugin and Mosquitto's persistence
INSTALL_HINT = "apt-get install mosquitto-dev libmosquitto-dev gcc"


def kick_payload(clients=(), users=()) -> bytes:
    """The control message that makes the plugin disconnect these client ids and usernames.

    One ``kick-client <id>`` / ``kick-user <name>`` line each; the plugin obeys it only when the
    publisher is the hub's controller.  A name with a line break could smuggle in another line.
    """
    lines = []
    for verb, names in (("kick-client", clients), ("kick-user", users)):
        for name in names:
            if not name or "\n" in name or "\r" in name or "\0" in name:
                raise ValueError(f"cannot kick {name!r}: empty or has a line break")
            lines.append(f"{verb} {name}")
    return "\n".join(lines).encode("utf-8")


def build_plugin(dest_dir: Path) -> Path:
    """Compile the plugin into ``dest_dir`` (only when the source is newer) and return the .so.

    Built to a temporary name and renamed, so a running Mosquitto that has the old file
    loaded keeps working and a failed build leaves no half-written plugin behind.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / PLUGIN_NAME
    if target.exists() and target.stat().st_mtime >= SOURCE.stat().st_mtime:
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise ConfigError(f"no C compiler to build the Mosquitto plugin: run '{INSTALL_HINT}'")
    tmp = dest_dir / f".{PLUGIN_NAME}.{os.getpid()}.tmp"
    cmd = [compiler, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(tmp), str(SOURCE)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"cannot run {compiler} to build the Mosquitto plugin ({exc}): "
                          f"run '{INSTALL_HINT}'") from None
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        if "mosquitto" in done.stderr and "No such file" in done.stderr:
            raise ConfigError(f"Mosquitto's plugin headers are missing: run '{INSTALL_HINT}'")
        first = (done.stderr.strip().splitlines() or ["(no output)"])[0]
        raise ConfigError(f"building the Mosquitto plugin failed: {first}")
    if done.stderr.strip():
        log.warning("compiler warnings for %s: %s", SOURCE.name, done.stderr.strip())
    tmp.replace(target)
    log.info("built the Mosquitto plugin %s", target)
    return target


def hook_url(settings, port: int | None = None) -> str:
    """Where the plugin reaches the auth hook: plain HTTP, so loopback only."""
    host = settings.auth_hook_bind
    port = settings.auth_hook_port if port is None else port
    if host in ("0.0.0.0", "localhost", ""):
        host = "127.0.0.1"
    try:
        loopback = isinstance(ip := ipaddress.ip_address(host), ipaddress.IPv4Address) and ip.is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(f"the Mosquitto plugin calls the auth hook over plain HTTP on loopback only: set "
                          f"auth_hook_bind to 127.0.0.1 (it is {settings.auth_hook_bind!r}), and run "
                          "Mosquitto on the hub's machine")
    if not 0 < port < 65536:
        raise ConfigError("the broker must know the auth hook's port: set auth_hook_port (not 0)")
    return f"http://{host}:{port}"


def _line_safe(path: Path) -> str:
    text = str(path)
    if "\n" in text or "\r" in text or "#" in text:  # a config line cannot hold them
        raise ConfigError(f"path {text!r} cannot go into mosquitto.conf (line break or '#'): use another --data-dir")
    return text


def mosquitto_conf(data_dir: Path, settings, *, port: int, bind: str | None = None,
                   hook_port: int | None = None) -> str:
    """A complete mosquitto.conf for this hub, with everything it refers to made ready.

    ``port``/``bind``: Mosquitto's MQTT-over-TLS listener (``bind`` defaults to the hub's
    ``settings.bind``).  ``hook_port``: the auth hook's real port when it differs from
    ``settings.auth_hook_port`` (a hook started on port 0).  ``mosquitto -c FILE`` runs it as is.
    """
    data_dir = Path(data_dir).resolve()
    bind = settings.bind if bind is None else bind
    if not 0 < port < 65536:
        raise ConfigError("Mosquitto needs a fixed MQTT port (not 0)")
    url = hook_url(settings, hook_port)
    tls = pki.ensure_tls(data_dir / "tls", settings.hosts)
    home = data_dir / MOSQUITTO_DIR
    plugin = build_plugin(home)
    datadir.hook_token(data_dir)
    token_file = datadir.hook_token_path(data_dir)
    user = pwd.getpwuid(os.getuid()).pw_name
    lines = [
        "# mosquitto.conf for a devstreams hub (made by 'devstreams hub broker-config'; run: mosquitto -c FILE)",
        f"# data dir: {_line_safe(data_dir)}",
        "",
        "# Same settings on every listener; nobody logs in without a devstreams SAS login.",
        "per_listener_settings false",
        "allow_anonymous false",
        "",
        "# Run as the hub's user, so Mosquitto can read the hub's 0600 key files (as root it would switch",
        "# to the 'mosquitto' user otherwise).",
        f"user {user}",
        "",
        "# Every login and every topic is decided by the hub's auth hook, through the devstreams plugin.",
        f"plugin {_line_safe(plugin)}",
        f"plugin_opt_hook_url {url}",
        f"plugin_opt_token_file {_line_safe(token_file)}",
        f"plugin_opt_timeout_ms {max(1, round(settings.auth_hook_client_timeout * 1000))}",
        "",
        "# The hub's packet limit (max_packet_bytes): bigger packets close the connection.",
        f"max_packet_size {settings.max_packet_bytes}",
        "",
        "# Retained presence (devices' status topics) survives a broker restart.",
        "persistence true",
        f"persistence_location {_line_safe(home)}/",
        "autosave_interval 60",
        "",
        "log_dest stderr",
        "connection_messages true",
        "",
        "# MQTT over TLS with the hub's certificate: clients trust the hub's ca.pem as before.",
        f"listener {port} {bind}".rstrip(),
        f"cafile {_line_safe(tls.ca_cert)}",
        f"certfile {_line_safe(tls.server_cert)}",
        f"keyfile {_line_safe(tls.server_key)}",
        "# The hub's connection limit (max_connections).",
        f"max_connections {settings.max_connections}",
        "",
    ]
    return "\n".join(lines)
