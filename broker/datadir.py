"""Where a hub keeps its state, so several hubs can run side by side.

``--data-dir`` wins, then ``DEVSTREAMS_DATA_DIR``, then ``~/.local/share/devstreams``.
Layout::

    hub.toml          optional settings
    registry.db       devices, service policy, activity log (SQLite)
    tls/              ca.pem (give this to clients), ca.key, server.pem, server.key
    keys/             stream-signing.key, controller.key, auth-hook.token (0600)
    mosquitto/        an external Mosquitto's plugin, config and persistence ('hub broker-config')
    hub.json          endpoints and settings of the running hub (written by 'hub up', read by 'hub show')
    hub.lock          locked by the running hub for its whole life; holds its pid

Only one hub with the embedded broker may run on a data dir: two would share one
registry (each marking the other's devices offline) and fight over ``hub.json``.  It
holds an exclusive ``flock`` on ``hub.lock``.  Hubs on an external broker
(``--broker-url``) share the data dir on purpose -- one registry and one set of keys
for several controllers -- so each holds a *shared* lock, which still keeps an
embedded hub out (and them out while an embedded hub runs).  The lock is a ``flock``:
the kernel drops it when the process ends in any way, kill -9 included, so "is a hub running here?" is answered by the lock, never by a
pid that may have been reused or by the registry's online flags that a killed hub
could not clear.
"""

import json
import logging
import os
import secrets
import time
from pathlib import Path

try:
    import fcntl
    msvcrt = None
except ImportError:  # Windows: a byte-range lock (also dropped by the OS when the process ends)
    fcntl = None
    import msvcrt

from devstreams.wire.errors import ConfigError

from .pki import write_private

log = logging.getLogger(__name__)

DATA_DIR_ENV = "DEVSTREAMS_DATA_DIR"
LOCK_FILE = "hub.lock"
LOCK_WAIT = 1.0  # a CLI probe holds the lock (shared) for microseconds; a starting hub retries this long
_WINDOWS_LOCK_OFFSET = 1 << 20  # the byte locked on Windows, away from the pid so it stays readable


class DataDirInUseError(ConfigError):
    """A second hub was started on a data dir that a running hub holds."""


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


HOOK_TOKEN_FILE = "auth-hook.token"


def hook_token_path(path: Path) -> Path:
    return path / "keys" / HOOK_TOKEN_FILE


def hook_token(path: Path) -> str:
    """The auth hook's bearer token: 43 URL-safe characters stored 0600 in keys/, created on first use.

    A broker (the Mosquitto plugin, EMQX) sends it with every hook call; printable ASCII with
    no newline, so it can be pasted into a broker's config and read back from the file as is.
    """
    return bearer_token(hook_token_path(path))


def bearer_token(token_path: Path, min_length: int = 32) -> str:
    """A bearer token kept in a file: 43 URL-safe characters, 0600, made on first use; one line if damaged."""
    if not token_path.exists():
        write_private(token_path, secrets.token_urlsafe(32).encode("ascii"))
    try:
        token = token_path.read_text("ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {token_path} ({exc}): remove it to make a new one") from None
    if len(token) < min_length or not token.isprintable() or " " in token:
        raise ConfigError(f"{token_path} is damaged: remove it to make a new one")
    return token


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


# -- the hub's lock --------------------------------------------------------------------------------

def _read_pid(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 32).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def _try_lock(fd: int, exclusive: bool) -> bool:
    """Lock without waiting: True if taken, False if another holder has it."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
    os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except OSError:  # EACCES or EDEADLOCK: another handle holds the byte
        return False


def _unlock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    else:
        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


class HubLock:
    """The exclusive lock a running hub holds on ``<data-dir>/hub.lock`` (see the module docstring)."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only descriptor drops the flock


def lock_hub(path: Path, wait: float = LOCK_WAIT, shared: bool = False) -> HubLock:
    """Take the data dir for this process, or raise DataDirInUseError naming the hub that has it.

    Called before the hub touches anything else in the data dir (ports, registry, hub.json).
    ``shared``: a hub on an external broker, which may run beside others like it.
    """
    lock_path = path / LOCK_FILE
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot open {lock_path}: {exc.strerror}") from None
    deadline = time.monotonic() + wait
    while True:
        try:
            if _try_lock(fd, exclusive=not shared):
                break
        except OSError as exc:
            os.close(fd)
            raise ConfigError(f"cannot lock {lock_path}: {exc.strerror}") from None
        if time.monotonic() >= deadline:
            pid = _read_pid(fd)
            os.close(fd)
            hint = ("a hub with the embedded broker holds it alone; several hubs share a data dir only "
                    "on an external broker (--broker-url)") if shared else "stop that hub first, or use another --data-dir"
            raise DataDirInUseError(f"data dir {path} is in use by hub pid {pid or '(starting)'}: {hint}")
        time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"{os.getpid()}\n".encode())
    return HubLock(lock_path, fd)


def running_hub(path: Path) -> int | None:
    """The pid of the hub holding this data dir (0 if it has not written it yet), or None if no hub runs."""
    try:
        fd = os.open(path / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None  # never had a hub, or not readable: nothing holds it that we can see
    try:
        # An exclusive probe sees both kinds of holder; another probe holds its lock for
        # microseconds, so a conflict counts only if it lasts over a few tries.
        for attempt in range(5):
            try:
                if _try_lock(fd, exclusive=True):
                    _unlock(fd)
                    return None
            except OSError:
                return None
            time.sleep(0.01 * attempt)
        return _read_pid(fd) or 0
    finally:
        os.close(fd)


def last_hub(lock: HubLock) -> bool:
    """After this hub released its lock: is no other hub left on the data dir?  (Then hub.json goes.)"""
    return running_hub(lock.path.parent) is None


def running_endpoints(path: Path) -> dict | None:
    """hub.json, but only while a hub holds the data dir: a killed hub's hub.json is stale."""
    if running_hub(path) is None:
        return None
    return read_endpoints(path)
