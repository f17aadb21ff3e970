"""The device registry and activity log, in SQLite in the data dir.

One file (``registry.db``, WAL mode) is shared by the running hub and the CLI
commands: the CLI writes (add, disable, remove …) and the hub notices through
``PRAGMA data_version`` within ``registry_poll_interval``.  The hub publishes its
open streams in ``open_streams`` for ``devstreams streams list``; ``streams close``
leaves a row in ``stream_close_requests`` for the hub to act on.

A full disk: the hub's own writes (presence, activity log, open streams) are
best effort -- they fail with one error line per ``disk_error_log_interval``,
never a traceback per row, and streams keep flowing.  A command's write (``device
add`` …) fails with :class:`DiskFullError`, one line that says "disk full".
"""

import errno
import logging
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from devstreams.wire.errors import ConfigError
from devstreams.wire.names import check_device_id

from devstreams.wire.throttle import EveryInterval

log = logging.getLogger(__name__)

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
CREATE TABLE IF NOT EXISTS open_streams (
    stream_id TEXT PRIMARY KEY,
    device TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,           -- 'pending', 'accepted' (no side yet), 'open'
    created REAL NOT NULL,
    gateway TEXT,
    service TEXT,
    bytes_to_device INTEGER,       -- NULL where the gateway does not report live counts
    bytes_to_service INTEGER,
    updated REAL NOT NULL,
    hub TEXT NOT NULL DEFAULT ''   -- which hub wrote the row ('' = the one embedded hub)
);
CREATE TABLE IF NOT EXISTS stream_close_requests (
    stream_id TEXT PRIMARY KEY,
    requested REAL NOT NULL
);
"""

OPEN_STREAM_FIELDS = ("stream_id", "device", "name", "state", "created", "gateway", "service",
                      "bytes_to_device", "bytes_to_service", "updated")
OPEN_STREAMS_STALE_AFTER = 30.0  # s; open-stream rows a hub has not refreshed for this long are a gone hub's


class DiskFullError(ConfigError):
    """A write failed because the disk (or the database's size limit) is full."""


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "full" in str(exc)
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class DeviceExistsError(ConfigError):
    """``device add`` of an ID that is already registered."""


class DevicesExistError(DeviceExistsError):
    """``device import`` of IDs of which some are already registered (all of them in ``device_ids``)."""

    def __init__(self, device_ids: list[str]):
        more = f" (and {len(device_ids) - 1} more)" if len(device_ids) > 1 else ""
        super().__init__(f"device {device_ids[0]!r}{more} already exists: nothing was imported")
        self.device_ids = device_ids


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
    def __init__(self, path: Path, error_log_interval: float = 60.0):
        self.path = path
        self._write_errors = EveryInterval(error_log_interval)
        self.degraded = False     # opened read-only because the disk is full (see _open_read_only)
        self._next_retry = 0.0
        try:
            if not path.exists():  # it holds device and service keys: owner-only from the start
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            self._db = self._connect()
        except (sqlite3.Error, OSError) as exc:
            if not self._disk_full(exc) or not path.exists() or path.stat().st_size == 0:
                raise self._failure(f"cannot open the registry {path}", exc) from None
            self._db = self._open_read_only(exc)
            return
        try:
            self._db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            if not self._disk_full(exc) or not self._db.execute(
                    "SELECT 1 FROM sqlite_master WHERE name = 'devices'").fetchone():
                raise self._failure(f"cannot open the registry {path}", exc) from None
            # Full disk, existing registry: read-only work (logins, streams) still goes on.
            self._best_effort_failed("creating the registry's newer tables", exc)
        self._migrate()

    def _migrate(self) -> None:
        """Registries of earlier releases: add what this one needs, best effort (a full disk waits)."""
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(open_streams)").fetchall()}
        if columns and "hub" not in columns:
            self._best_effort("ALTER TABLE open_streams ADD COLUMN hub TEXT NOT NULL DEFAULT ''")
        # One 'stream closed' row per stream, however many controllers hear the gateway's report.
        self._best_effort("CREATE UNIQUE INDEX IF NOT EXISTS activity_stream_once ON activity (stream_id) "
                          "WHERE kind = 'stream'")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            db.close()
            raise
        return db

    def _open_read_only(self, exc: BaseException) -> sqlite3.Connection:
        """A full disk cannot hold SQLite's WAL index (``-shm``): read the file as it is.

        Logins and streams only read the registry, so the hub keeps serving; every
        write fails (logged once per interval, or DiskFullError for a command), and
        :meth:`data_version` reopens normally once there is room again.
        """
        self.degraded = True
        log.error("disk full: cannot open the registry %s for writing (%s); serving read-only until "
                  "there is free space", self.path, exc)
        return sqlite3.connect(f"{self.path.resolve().as_uri()}?immutable=1", uri=True, timeout=10,
                               isolation_level=None, check_same_thread=False)

    def _disk_full(self, exc: BaseException) -> bool:
        """A full-disk error, also when SQLite reports it as an I/O error (creating ``-shm``)."""
        if is_disk_full(exc) or self.degraded:
            return True
        try:
            return isinstance(exc, (sqlite3.Error, OSError)) and os.statvfs(self.path.parent).f_bavail == 0
        except OSError:
            return False

    def _failure(self, what: str, exc: BaseException) -> ConfigError:
        if self._disk_full(exc):
            return DiskFullError(f"disk full: {what} ({exc}); free space on the disk of {self.path.parent}")
        return ConfigError(f"{what}: {exc}")

    def _write(self, sql: str, args: tuple = ()) -> None:
        """A command's write: a full disk is a one-line DiskFullError."""
        try:
            self._db.execute(sql, args)
        except (sqlite3.OperationalError, OSError) as exc:  # (read-only when degraded: disk full)
            raise self._failure("cannot write the registry", exc) from None

    def _best_effort(self, sql: str, args: tuple = ()) -> bool:
        """The hub's own bookkeeping: never raises; failures are logged once per interval."""
        try:
            self._db.execute(sql, args)
            return True
        except (sqlite3.Error, OSError) as exc:
            self._best_effort_failed("writing the registry", exc)
            return False

    def _best_effort_failed(self, what: str, exc: BaseException, now: float | None = None) -> None:
        ready, suppressed = self._write_errors.ready(time.monotonic() if now is None else now)
        if ready:
            more = f"; {suppressed} more write(s) failed since the last report" if suppressed else ""
            kind = "disk full" if self._disk_full(exc) else "error"
            log.error("%s %s (%s): %s; activity log, presence and the open-stream list are not being "
                      "recorded, streams keep flowing%s", kind, what, self.path, exc, more)

    def close(self) -> None:
        self._db.close()

    def data_version(self) -> int:
        """Changes when another connection (a CLI command) commits (or the registry became writable)."""
        if self.degraded and time.monotonic() >= self._next_retry:
            self._next_retry = time.monotonic() + 1.0
            db = None
            try:
                db = self._connect()
                db.executescript(SCHEMA)
            except (sqlite3.Error, OSError):
                if db is not None:
                    db.close()
            else:
                self._db.close()
                self._db, self.degraded = db, False
                log.warning("the registry %s is writable again", self.path)
                return -1  # never a real data_version: the caller re-reads everything
        return self._db.execute("PRAGMA data_version").fetchone()[0]

    # -- devices -------------------------------------------------------------------------------

    def add_device(self, device_id: str) -> Device:
        check_device_id(device_id)
        key = secrets.token_bytes(KEY_BYTES)
        try:
            self._write("INSERT INTO devices (id, key, created) VALUES (?, ?, ?)", (device_id, key, time.time()))
        except sqlite3.IntegrityError:
            raise DeviceExistsError(f"device {device_id!r} already exists: use 'devstreams device show "
                                    f"{device_id}' or 'device rotate-key {device_id}'") from None
        return self.require(device_id)

    def add_devices(self, device_ids: list[str]) -> list[Device]:
        """Register many devices in one transaction: all of them, or (on any error) none.

        The check for IDs that are already registered runs inside the same write
        transaction as the inserts, so a concurrent ``device add`` cannot slip in
        between; :class:`DevicesExistError` lists them all.  A running hub sees the
        new devices at once (it reads the registry at each login).
        """
        for device_id in device_ids:
            check_device_id(device_id)
        if len(set(device_ids)) != len(device_ids):
            raise ConfigError("the same device ID is given more than once")
        now = time.time()
        rows = [(device_id, secrets.token_bytes(KEY_BYTES), now) for device_id in device_ids]
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                existing: list[str] = []
                for start in range(0, len(device_ids), 500):  # well below SQLite's variable limit
                    chunk = device_ids[start:start + 500]
                    existing += [r[0] for r in self._db.execute(
                        f"SELECT id FROM devices WHERE id IN ({', '.join('?' * len(chunk))})", chunk)]
                if existing:
                    raise DevicesExistError(existing)
                self._db.executemany("INSERT INTO devices (id, key, created) VALUES (?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.rollback()
                raise
        except (sqlite3.OperationalError, OSError) as exc:  # (read-only when degraded: disk full)
            raise self._failure("cannot write the registry", exc) from None
        return [Device(id=device_id, key=key, enabled=True, created=created, online=False, last_seen=None)
                for device_id, key, created in rows]

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
        return self.devices()

    def count(self) -> int:
        """How many devices are registered (the dashboard and /metrics ask often: no rows are read)."""
        return self._db.execute("SELECT count(*) FROM devices").fetchone()[0]

    def devices(self, online_only: bool = False, limit: int | None = None) -> list[Device]:
        """Devices by ID; the filtering and the limit are SQL, so a large fleet is not read whole."""
        sql = "SELECT id, key, enabled, created, online, last_seen FROM devices"
        args: tuple = ()
        if online_only:
            sql += " WHERE online = 1"
        sql += " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            args = (limit,)
        return [_row_to_device(r) for r in self._db.execute(sql, args).fetchall()]

    def remove(self, device_id: str) -> None:
        self.require(device_id)
        self._write("DELETE FROM devices WHERE id = ?", (device_id,))

    def set_enabled(self, device_id: str, enabled: bool) -> None:
        self.require(device_id)
        self._write("UPDATE devices SET enabled = ? WHERE id = ?", (int(enabled), device_id))

    def rotate_key(self, device_id: str) -> Device:
        self.require(device_id)
        self._write("UPDATE devices SET key = ? WHERE id = ?", (secrets.token_bytes(KEY_BYTES), device_id))
        return self.require(device_id)

    def set_presence(self, device_id: str, online: bool, when: float | None = None) -> None:
        self._best_effort("UPDATE devices SET online = ?, last_seen = ? WHERE id = ?",
                          (int(online), when or time.time(), device_id))

    def clear_online(self, device_id: str) -> None:
        """A device's connection ended while no hub was watching: offline, last seen unchanged."""
        self._best_effort("UPDATE devices SET online = 0 WHERE id = ? AND online = 1", (device_id,))

    def mark_all_offline(self) -> None:
        self._best_effort("UPDATE devices SET online = 0 WHERE online = 1")

    # -- service policy ------------------------------------------------------------------------

    def policy_key(self, name: str = SERVICE_POLICY, create: bool = False) -> bytes | None:
        row = self._db.execute("SELECT key FROM policies WHERE name = ?", (name,)).fetchone()
        if row:
            return bytes(row[0])
        if not create:
            return None
        key = secrets.token_bytes(KEY_BYTES)
        self._write("INSERT OR IGNORE INTO policies (name, key) VALUES (?, ?)", (name, key))
        return self.policy_key(name)

    def rotate_policy_key(self, name: str = SERVICE_POLICY) -> bytes:
        self._write("INSERT OR REPLACE INTO policies (name, key) VALUES (?, ?)",
                    (name, secrets.token_bytes(KEY_BYTES)))
        return self.policy_key(name)  # type: ignore[return-value]

    # -- activity log --------------------------------------------------------------------------

    def log_request(self, *, device: str, name: str, stream_id: str | None, outcome: str,
                    reason: str, latency_ms: float, when: float | None = None) -> None:
        self._best_effort("INSERT INTO activity (time, kind, device, name, stream_id, outcome, reason, "
                          "latency_ms) VALUES (?, 'request', ?, ?, ?, ?, ?, ?)",
                          (when or time.time(), device, name, stream_id, outcome, reason, latency_ms))

    def log_stream(self, *, device: str, name: str, stream_id: str, reason: str,
                   bytes_to_device: int, bytes_to_service: int, duration_s: float,
                   when: float | None = None) -> None:
        self._best_effort("INSERT OR IGNORE INTO activity (time, kind, device, name, stream_id, outcome, reason, "
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
        self._best_effort("DELETE FROM activity WHERE time < ?", (time.time() - days * 86400,))

    # -- open streams (hub -> 'streams list') and close requests ('streams close' -> hub) ------

    def replace_open_streams(self, rows: list[dict], hub: str = "", stale_after: float = OPEN_STREAMS_STALE_AFTER) -> bool:
        """One hub's whole current list, in one transaction; best effort.

        ``hub``: which hub's rows these replace (several hubs on an external broker share
        the registry).  A hub with open streams refreshes its rows every second or so;
        rows not refreshed for ``stale_after`` s belong to a hub that is gone and are dropped.
        """
        try:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("DELETE FROM open_streams WHERE hub = ? OR updated < ?",
                                 (hub, time.time() - stale_after))
                self._db.executemany(
                    f"INSERT OR REPLACE INTO open_streams ({', '.join(OPEN_STREAM_FIELDS)}, hub) "
                    f"VALUES ({', '.join('?' * len(OPEN_STREAM_FIELDS))}, ?)",
                    [tuple(row.get(k) for k in OPEN_STREAM_FIELDS) + (hub,) for row in rows])
            return True
        except (sqlite3.Error, OSError) as exc:
            if self._db.in_transaction:
                self._db.rollback()
            self._best_effort_failed("publishing the open streams", exc)
            return False

    def open_streams(self) -> list[dict]:
        rows = self._db.execute(f"SELECT {', '.join(OPEN_STREAM_FIELDS)} FROM open_streams "
                                "ORDER BY created").fetchall()
        return [dict(zip(OPEN_STREAM_FIELDS, r)) for r in rows]

    def request_close(self, stream_id: str) -> None:
        self._write("INSERT OR REPLACE INTO stream_close_requests (stream_id, requested) VALUES (?, ?)",
                    (stream_id, time.time()))

    def take_close_requests(self) -> list[str]:
        """The hub's side: the stream ids operators asked to close (each taken once)."""
        ids = [r[0] for r in self._db.execute("SELECT stream_id FROM stream_close_requests").fetchall()]
        if ids:
            self._best_effort("DELETE FROM stream_close_requests WHERE stream_id IN "
                              f"({', '.join('?' * len(ids))})", tuple(ids))
        return ids


def open_registry(data_dir: Path) -> Registry:
    return Registry(data_dir / "registry.db")


