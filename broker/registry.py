"""The device registry and activity log, in SQLite in the data dir.

One file (``registry.db``, WAL mode) is shared by the running hub and the CLI
commands: the CLI writes (add, disable, remove …) and the hub notices through
``PRAGMA data_version`` within ``registry_poll_interval``.
"""

import os
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from wire.errors import ConfigError
from wire.names import check_device_id

SERVICE_POLICY = "service"
KEY_BYTES = 32

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    key BLOB NOT NULL,
    enabled INTEGER NOT NULL DEFAULT 1,
    created REAL NOT NULL,
    online INTEGER NOT NULL DEFAULT 0,
    last_seen REAL
);
CREATE TABLE IF NOT EXISTS policies (
    name TEXT PRIMARY KEY,
    key BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS activity (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    kind TEXT NOT NULL,            -- 'request' (negotiation) or 'stream' (data, from the gateway)
    device TEXT NOT NULL,
    name TEXT NOT NULL,
    stream_id TEXT,
    outcome TEXT NOT NULL,
    reason TEXT,
    latency_ms REAL,
    bytes_to_device INTEGER,
    bytes_to_service INTEGER,
    duration_s REAL
);
CREATE INDEX IF NOT EXISTS activity_device ON activity (device, seq);
"""


class DeviceExistsError(ConfigError):
    """``device add`` of an ID that is already registered."""


class UnknownDeviceError(ConfigError):
    """A command named a device that is not registered."""


@dataclass(frozen=True)
class Device:
    id: str
    key: bytes
    enabled: bool
    created: float
    online: bool
    last_seen: float | None

    def __repr__(self) -> str:  # keep keys out of logs
        return f"Device(id={self.id!r}, enabled={self.enabled}, online={self.online})"


def _row_to_device(row) -> Device:
    return Device(id=row[0], key=bytes(row[1]), enabled=bool(row[2]), created=row[3],
                  online=bool(row[4]), last_seen=row[5])


class Registry:
    def __init__(self, path: Path):
        self.path = path
        try:
            if not path.exists():  # it holds device and service keys: owner-only from the start
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            self._db = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError(f"cannot open the registry {path}: {exc}") from None

    def close(self) -> None:
        self._db.close()

    def data_version(self) -> int:
        """Changes when another connection (a CLI command) commits."""
        return self._db.execute("PRAGMA data_version").fetchone()[0]

    # -- devices -------------------------------------------------------------------------------

    def add_device(self, device_id: str) -> Device:
        check_device_id(device_id)
        key = secrets.token_bytes(KEY_BYTES)
        try:
            self._db.execute("INSERT INTO devices (id, key, created) VALUES (?, ?, ?)",
                             (device_id, key, time.time()))
        except sqlite3.IntegrityError:
            raise DeviceExistsError(f"device {device_id!r} already exists: use 'devstreams device show "
                                    f"{device_id}' or 'device rotate-key {device_id}'") from None
        return self.require(device_id)

    def get(self, device_id: str) -> Device | None:
        row = self._db.execute("SELECT id, key, enabled, created, online, last_seen FROM devices "
                               "WHERE id = ?", (device_id,)).fetchone()
        return _row_to_device(row) if row else None

    def require(self, device_id: str) -> Device:
        device = self.get(device_id)
        if device is None:
            raise UnknownDeviceError(f"no device {device_id!r} on this hub: "
                                     "'devstreams device list' shows the registered ones")
        return device

    def all(self) -> list[Device]:
        rows = self._db.execute("SELECT id, key, enabled, created, online, last_seen FROM devices "
                                "ORDER BY id").fetchall()
        return [_row_to_device(r) for r in rows]

    def remove(self, device_id: str) -> None:
        self.require(device_id)
        self._db.execute("DELETE FROM devices WHERE id = ?", (device_id,))

    def set_enabled(self, device_id: str, enabled: bool) -> None:
        self.require(device_id)
        self._db.execute("UPDATE devices SET enabled = ? WHERE id = ?", (int(enabled), device_id))

    def rotate_key(self, device_id: str) -> Device:
        self.require(device_id)
        self._db.execute("UPDATE devices SET key = ? WHERE id = ?",
                         (secrets.token_bytes(KEY_BYTES), device_id))
        return self.require(device_id)

    def set_presence(self, device_id: str, online: bool, when: float | None = None) -> None:
        self._db.execute("UPDATE devices SET online = ?, last_seen = ? WHERE id = ?",
                         (int(online), when or time.time(), device_id))

    def mark_all_offline(self) -> None:
        self._db.execute("UPDATE devices SET online = 0 WHERE online = 1")

    # -- service policy ------------------------------------------------------------------------

    def policy_key(self, name: str = SERVICE_POLICY, create: bool = False) -> bytes | None:
        row = self._db.execute("SELECT key FROM policies WHERE name = ?", (name,)).fetchone()
        if row:
            return bytes(row[0])
        if not create:
            return None
        key = secrets.token_bytes(KEY_BYTES)
        self._db.execute("INSERT OR IGNORE INTO policies (name, key) VALUES (?, ?)", (name, key))
        return self.policy_key(name)

    def rotate_policy_key(self, name: str = SERVICE_POLICY) -> bytes:
        self._db.execute("INSERT OR REPLACE INTO policies (name, key) VALUES (?, ?)",
                         (name, secrets.token_bytes(KEY_BYTES)))
        return self.policy_key(name)  # type: ignore[return-value]

    # -- activity log --------------------------------------------------------------------------

    def log_request(self, *, device: str, name: str, stream_id: str | None, outcome: str,
                    reason: str, latency_ms: float, when: float | None = None) -> None:
        self._db.execute("INSERT INTO activity (time, kind, device, name, stream_id, outcome, reason, "
                         "latency_ms) VALUES (?, 'request', ?, ?, ?, ?, ?, ?)",
                         (when or time.time(), device, name, stream_id, outcome, reason, latency_ms))

    def log_stream(self, *, device: str, name: str, stream_id: str, reason: str,
                   bytes_to_device: int, bytes_to_service: int, duration_s: float,
                   when: float | None = None) -> None:
        self._db.execute("INSERT INTO activity (time, kind, device, name, stream_id, outcome, reason, "
                         "bytes_to_device, bytes_to_service, duration_s) "
                         "VALUES (?, 'stream', ?, ?, ?, 'closed', ?, ?, ?, ?)",
                         (when or time.time(), device, name, stream_id, reason, bytes_to_device,
                          bytes_to_service, duration_s))

    def activity(self, device: str | None = None, limit: int = 200) -> list[dict]:
        sql = ("SELECT time, kind, device, name, stream_id, outcome, reason, latency_ms, "
               "bytes_to_device, bytes_to_service, duration_s FROM activity")
        args: tuple = ()
        if device:
            sql += " WHERE device = ?"
            args = (device,)
        sql += " ORDER BY seq DESC LIMIT ?"
        rows = self._db.execute(sql, args + (limit,)).fetchall()
        keys = ("time", "kind", "device", "name", "stream_id", "outcome", "reason", "latency_ms",
                "bytes_to_device", "bytes_to_service", "duration_s")
        return [dict(zip(keys, r)) for r in reversed(rows)]

    def prune_activity(self, days: int) -> None:
        self._db.execute("DELETE FROM activity WHERE time < ?", (time.time() - days * 86400,))


def open_registry(data_dir: Path) -> Registry:
    return Registry(data_dir / "registry.db")


