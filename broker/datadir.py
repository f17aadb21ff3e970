"""Where a hub keeps its state, so several hubs can run side by side.

``--data-dir`` wins, then ``DEVSTREAMS_DATA_DIR``, then ``~/.local/share/devstreams``.
Layout::

    hub.toml          optional settings
    registry.db       devices, service policy, activity log (SQLite)
    tls/              ca.pem (give this to clients), ca.key, server.pem, server.key
    keys/             stream-signing.key, controller.key (0600)
    hub.json          endpoints of the running hub (written by 'hub up', read by 'hub show')
"""

import json
import logging
import os
import secrets
from pathlib import Path

from wire.errors import ConfigError

from .pki import write_private

log = logging.getLogger(__name__)

DATA_DIR_ENV = "DEVSTREAMS_DATA_DIR"


def resolve(path: str | os.PathLike | None) -> Path:
    chosen = path or os.environ.get(DATA_DIR_ENV)
    if chosen:
        return Path(chosen).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "devstreams"


def ensure(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)
    except OSError as exc:
        raise ConfigError(f"cannot create data dir {path}: {exc.strerror}") from None
    return path


def require(path: Path) -> Path:
    """For commands that need an existing hub: say how to make one instead of creating it."""
    if not (path / "registry.db").exists():
        raise ConfigError(f"no hub in {path}: run 'devstreams hub up --data-dir {path}' first, "
                          f"or pass the right --data-dir / {DATA_DIR_ENV}")
    return path


def secret_key(path: Path, name: str) -> bytes:
    """A 32-byte random key stored 0600 in keys/, created on first use."""
    key_path = path / "keys" / name
    if not key_path.exists():
        write_private(key_path, secrets.token_bytes(32))
    data = key_path.read_bytes()
    if len(data) < 32:
        raise ConfigError(f"{key_path} is damaged (too short): remove it to make a new one")
    return data


def write_endpoints(path: Path, info: dict) -> None:
    """Best effort: a hub on a full disk still starts (the CLI then falls back to hub.toml)."""
    tmp = path / "hub.json.tmp"
    try:
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        tmp.replace(path / "hub.json")
    except OSError as exc:
        log.error("cannot write %s (%s): 'hub show' and the CLI will not see this hub's ports",
                  path / "hub.json", exc.strerror or exc)
        tmp.unlink(missing_ok=True)


def read_endpoints(path: Path) -> dict | None:
    try:
        return json.loads((path / "hub.json").read_text())
    except (OSError, ValueError):
        return None
