"""The device registry and activity log, in SQLite in the data dir.

One file (``registry.db``, WAL mode) is shared by the running hub and the CLI
commands: the CLI writes (add, disable, remove …) and the hub notices through
``PRAGMA data_version`` within ``registry_poll_interval``.  The hub publishes its
open streams in ``open_streams`` for ``devstreams streams list``; ``streams close``
leaves a row in ``stream_close_requests`` for the hub to act on.

Operators (service identities) live in ``operators``: each has its own key, may
be disabled or expire, and is scoped to devices (ID globs, ``tag=KEY=VALUE``) and
stream names.  ``admin`` is built in (every device, every stream); the previous
release's single ``service`` policy becomes it on migration, so old service
connection strings (``SharedAccessKeyName=service``) keep working.  Device tags
are a JSON column of ``devices``, read with the device (one read per request).

A full disk: the hub's own writes (presence, activity log, open streams) are
best effort -- they fail with one error line per ``disk_error_log_interval``,
never a traceback per row, and streams keep flowing.  A command's write (``device
add`` …) fails with :class:`DiskFullError`, one line that says "disk full".
"""

import errno
import json
import logging
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from devstreams.wire.errors import ConfigError
from devstreams.wire.names import check_device_id, check_stream_name
from devstreams.wire.topics import POLICY_RE

from devstreams.wire.throttle import EveryInterval

log = logging.getLogger(__name__)

ADMIN_OPERATOR = "admin"           # built in: every device, every stream; 'hub connection-string' prints it
LEGACY_ADMIN_NAMES = ("service",)  # the previous release's one policy: its connection strings stay admin's
KEY_BYTES = 32

TAG_RE = re.compile(r"^[A-Za-z0-9._-]{1,60}$")   # tag keys and values alike
MAX_TAGS = 32                                     # per device
GLOB_RE = re.compile(r"^[A-Za-z0-9._*?\[\]!-]{1,128}$")  # a device-ID glob: ID characters and * ? [ ] !
TAG_SCOPE_PREFIX = "tag="
MAX_SCOPE_ENTRIES = 64                            # device scope entries, and stream names, per operator

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    key BLOB NOT NULL,
    enabled INTEGER NOT NULL DEFAULT 1,
    created REAL NOT NULL,
    online INTEGER NOT NULL DEFAULT 0,
    last_seen REAL,
    tags TEXT                      -- JSON object of tag key -> value; NULL = none
);
CREATE TABLE IF NOT EXISTS operators (
    name TEXT PRIMARY KEY,
    key BLOB NOT NULL,
    enabled INTEGER NOT NULL DEFAULT 1,
    created REAL NOT NULL,
    expires REAL,                  -- wall clock; NULL = never
    devices TEXT NOT NULL DEFAULT '[]',   -- JSON list of device-ID globs and 'tag=KEY=VALUE'; [] = every device
    streams TEXT NOT NULL DEFAULT '[]',   -- JSON list of stream names; [] = every stream
    max_streams INTEGER,           -- NULL = the hub's limit
    new_streams_per_second REAL    -- NULL = the hub's limit
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
    duration_s REAL,
    operator TEXT NOT NULL DEFAULT '',    -- who asked ('' = rows of earlier releases)
    client_host TEXT NOT NULL DEFAULT ''  -- the service's address as the gateway/broker saw it
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
    hub TEXT NOT NULL DEFAULT '',  -- which hub wrote the row ('' = the one embedded hub)
    operator TEXT                  -- who holds the stream (NULL where the hub did not say)
);
CREATE TABLE IF NOT EXISTS stream_close_requests (
    stream_id TEXT PRIMARY KEY,
    requested REAL NOT NULL
);
"""

OPEN_STREAM_FIELDS = ("stream_id", "device", "name", "state", "created", "gateway", "service",
                      "bytes_to_device", "bytes_to_service", "updated", "operator")
ACTIVITY_FIELDS = ("seq", "time", "kind", "device", "name", "stream_id", "outcome", "reason", "latency_ms",
                   "bytes_to_device", "bytes_to_service", "duration_s", "operator", "client_host")
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


class UnknownOperatorError(ConfigError):
    """A command named an operator that does not exist."""


class OperatorExistsError(ConfigError):
    """``operator add`` of a name that is already taken."""


@dataclass(frozen=True)
class Device:
    id: str
    key: bytes
    enabled: bool
    created: float
    online: bool
    last_seen: float | None
    tags: dict[str, str] = field(default_factory=dict, compare=False)

    def __repr__(self) -> str:  # keep keys out of logs
        return f"Device(id={self.id!r}, enabled={self.enabled}, online={self.online})"


@dataclass(frozen=True)
class Operator:
    """A service identity: its own key, and the devices and streams it may open streams to."""
    name: str
    key: bytes
    enabled: bool
    created: float                         # wall clock
    expires: float | None                  # wall clock; None = never
    devices: tuple[str, ...]               # device-ID globs and 'tag=KEY=VALUE'; () = every device
    streams: tuple[str, ...]               # stream names; () = every stream
    max_streams: int | None                # concurrent streams; None = the hub's limit
    new_streams_per_second: float | None   # None = the hub's limit

    @property
    def builtin(self) -> bool:
        return self.name == ADMIN_OPERATOR

    def expired(self, now: float) -> bool:
        return self.expires is not None and self.expires <= now

    def active(self, now: float) -> bool:
        """Whether the operator's key admits a login at wall-clock time ``now``."""
        return self.enabled and not self.expired(now)

    def __repr__(self) -> str:  # keep keys out of logs
        return f"Operator(name={self.name!r}, enabled={self.enabled}, devices={self.devices}, streams={self.streams})"


# -- tags and scopes: pure ---------------------------------------------------------------------

def check_tag(key: str, value: str) -> tuple[str, str]:
    """One tag: ConfigError (one line) unless key and value are 1-60 of ``A-Za-z0-9._-``."""
    for what, text in (("key", key), ("value", value)):
        if not isinstance(text, str) or not TAG_RE.match(text):
            shown = text if not isinstance(text, str) or len(text) <= 40 else text[:40] + "..."
            raise ConfigError(f"invalid tag {what} {shown!r}: use 1-60 letters, digits, '.', '_' or '-'")
    return key, value


def check_tags(tags: dict[str, str]) -> dict[str, str]:
    if not isinstance(tags, dict):
        raise ConfigError("tags must be KEY=VALUE pairs")
    for key, value in tags.items():
        check_tag(key, value)
    if len(tags) > MAX_TAGS:
        raise ConfigError(f"a device has at most {MAX_TAGS} tags ({len(tags)} given)")
    return dict(tags)


def parse_tag(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` (as typed on the command line) -> (key, value); ConfigError otherwise."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ConfigError(f"invalid tag {text[:40]!r}: write KEY=VALUE, e.g. site=plant-3")
    return check_tag(key, value)


def check_scope_entry(entry: str) -> str:
    """One device scope entry: a device-ID glob (``pump-*``) or ``tag=KEY=VALUE``."""
    if not isinstance(entry, str):
        raise ConfigError("a device scope entry must be text")
    if entry.startswith(TAG_SCOPE_PREFIX):
        rest = entry[len(TAG_SCOPE_PREFIX):]
        key, sep, value = rest.partition("=")
        if not sep:
            raise ConfigError(f"invalid device scope {entry[:60]!r}: a tag scope is tag=KEY=VALUE, e.g. "
                              "tag=site=plant-3")
        check_tag(key, value)
        return entry
    if not GLOB_RE.match(entry) or not entry[0].isalnum() and entry[0] not in "*?[":
        shown = entry if len(entry) <= 60 else entry[:60] + "..."
        raise ConfigError(f"invalid device scope {shown!r}: give a device-ID glob (letters, digits, '.', '_', "
                          "'-' and the wildcards * ? [...]), e.g. pump-*, or tag=KEY=VALUE")
    return entry


def _tags_from(text) -> dict[str, str]:
    if not text:
        return {}
    try:
        tags = json.loads(text)
    except ValueError:
        return {}
    return tags if isinstance(tags, dict) else {}


DEVICE_COLUMNS = "id, key, enabled, created, online, last_seen, tags"


def _row_to_device(row) -> Device:
    return Device(id=row[0], key=bytes(row[1]), enabled=bool(row[2]), created=row[3],
                  online=bool(row[4]), last_seen=row[5], tags=_tags_from(row[6]))


OPERATOR_COLUMNS = "name, key, enabled, created, expires, devices, streams, max_streams, new_streams_per_second"


def _row_to_operator(row) -> Operator:
    def names(text) -> tuple[str, ...]:
        try:
            value = json.loads(text or "[]")
        except ValueError:
            value = []
        return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()
    return Operator(name=row[0], key=bytes(row[1]), enabled=bool(row[2]), created=row[3], expires=row[4],
                    devices=names(row[5]), streams=names(row[6]), max_streams=row[7],
                    new_streams_per_second=row[8])


def check_operator_name(name: str) -> str:
    """A new operator's name: a topic level (``svc:<name>`` logins), not a built-in or legacy name."""
    if not isinstance(name, str) or not POLICY_RE.match(name):
        shown = name if not isinstance(name, str) or len(name) <= 40 else name[:40] + "..."
        raise ConfigError(f"invalid operator name {shown!r}: use 1-60 letters, digits, '.', '_' or '-'")
    if name == ADMIN_OPERATOR or name in LEGACY_ADMIN_NAMES:
        raise ConfigError(f"the operator name {name!r} is reserved (it is the built-in {ADMIN_OPERATOR!r} "
                          "operator): choose another name")
    return name


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def canonical_operator(name: str) -> str:
    """The operator a name means: the previous release's policy names mean admin."""
    return ADMIN_OPERATOR if name in LEGACY_ADMIN_NAMES else name


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
            self._refresh_columns()
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
        """Registries of earlier releases: add what this one needs, best effort (a full disk waits).

        One ``BEGIN IMMEDIATE`` transaction, so a hub and a CLI command opening an old
        registry at the same moment migrate it once (the second one finds it done);
        every step checks before it changes anything, so running it again is a no-op.
        The previous release's ``service`` policy key becomes the ``admin`` operator's
        key: service connection strings handed out before keep working.
        """
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._migrate_steps()
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.rollback()
                raise
        except (sqlite3.Error, OSError) as exc:
            self._best_effort_failed("upgrading the registry of an earlier release", exc)
        self._refresh_columns()

    def _columns(self, table: str) -> set[str]:
        return {r[1] for r in self._db.execute(f"PRAGMA table_info({table})").fetchall()}

    def _migrate_steps(self) -> None:
        added = {"open_streams": (("hub", "TEXT NOT NULL DEFAULT ''"), ("operator", "TEXT")),
                 "devices": (("tags", "TEXT"),),
                 "activity": (("operator", "TEXT NOT NULL DEFAULT ''"), ("client_host", "TEXT NOT NULL DEFAULT ''"))}
        for table, columns in added.items():
            have = self._columns(table)
            for name, decl in columns:
                if have and name not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
        # One 'stream closed' row per stream, however many controllers hear the gateway's report.
        self._db.execute("CREATE UNIQUE INDEX IF NOT EXISTS activity_stream_once ON activity (stream_id) "
                         "WHERE kind = 'stream'")
        self._db.execute("CREATE INDEX IF NOT EXISTS activity_operator ON activity (operator, seq)")
        has_policies = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'policies'").fetchone()
        if has_policies and not self._db.execute("SELECT 1 FROM operators WHERE name = ?",
                                                 (ADMIN_OPERATOR,)).fetchone():
            for legacy in LEGACY_ADMIN_NAMES:
                row = self._db.execute("SELECT key FROM policies WHERE name = ?", (legacy,)).fetchone()
                if row:
                    self._db.execute("INSERT INTO operators (name, key, enabled, created) VALUES (?, ?, 1, ?)",
                                     (ADMIN_OPERATOR, bytes(row[0]), time.time()))
                    log.info("registry upgraded: the %r policy's key is now the %r operator's", legacy,
                             ADMIN_OPERATOR)
                    break

    def _refresh_columns(self) -> None:
        """What the file has now: a registry of an earlier release that could not be upgraded (full
        disk, read-only) is still read, with no tags, no operators but the old policy, no audit columns."""
        try:
            devices, activity = self._columns("devices"), self._columns("activity")
            self._has_operators = bool(self._columns("operators"))
        except sqlite3.Error:
            devices, activity, self._has_operators = set(), set(), True
        columns = DEVICE_COLUMNS if "tags" in devices or not devices else DEVICE_COLUMNS.replace("tags", "NULL")
        self._device_sql = f"SELECT {columns} FROM devices"
        audit = "operator" in activity or not activity
        self._activity_columns = ", ".join(
            c if audit or c not in ("operator", "client_host") else f"'' AS {c}" for c in ACTIVITY_FIELDS)

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
                self._migrate()
                log.warning("the registry %s is writable again", self.path)
                return -1  # never a real data_version: the caller re-reads everything
        return self._db.execute("PRAGMA data_version").fetchone()[0]

    # -- devices -------------------------------------------------------------------------------

    def add_device(self, device_id: str, tags: dict[str, str] | None = None) -> Device:
        check_device_id(device_id)
        tags = check_tags(tags or {})
        key = secrets.token_bytes(KEY_BYTES)
        try:
            self._write("INSERT INTO devices (id, key, created, tags) VALUES (?, ?, ?, ?)",
                        (device_id, key, time.time(), json.dumps(tags, sort_keys=True) if tags else None))
        except sqlite3.IntegrityError:
            raise DeviceExistsError(f"device {device_id!r} already exists: use 'devstreams device show "
                                    f"{device_id}' or 'device rotate-key {device_id}'") from None
        return self.require(device_id)

    def add_devices(self, device_ids: list[str], tags: dict[str, dict[str, str]] | None = None) -> list[Device]:
        """Register many devices in one transaction: all of them, or (on any error) none.

        The check for IDs that are already registered runs inside the same write
        transaction as the inserts, so a concurrent ``device add`` cannot slip in
        between; :class:`DevicesExistError` lists them all.  A running hub sees the
        new devices at once (it reads the registry at each login).  ``tags``: device
        ID -> that device's tags (devices not in it get none).
        """
        for device_id in device_ids:
            check_device_id(device_id)
        if len(set(device_ids)) != len(device_ids):
            raise ConfigError("the same device ID is given more than once")
        tags = {device_id: check_tags(t) for device_id, t in (tags or {}).items() if t}
        now = time.time()
        rows = [(device_id, secrets.token_bytes(KEY_BYTES), now,
                 json.dumps(tags[device_id], sort_keys=True) if device_id in tags else None)
                for device_id in device_ids]
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
                self._db.executemany("INSERT INTO devices (id, key, created, tags) VALUES (?, ?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.rollback()
                raise
        except (sqlite3.OperationalError, OSError) as exc:  # (read-only when degraded: disk full)
            raise self._failure("cannot write the registry", exc) from None
        return [Device(id=device_id, key=key, enabled=True, created=created, online=False, last_seen=None,
                       tags=tags.get(device_id, {}))
                for device_id, key, created, _ in rows]

    def set_device_tags(self, device_id: str, set_tags: dict[str, str],
                        remove: Iterable[str] = ()) -> Device:
        """Set (add or change) and remove tags of one device, in one transaction; the device after it."""
        check_tags(set_tags)
        remove = list(remove)
        for key in remove:
            check_tag(key, "x")
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                tags = dict(self.require(device_id).tags)
                for key in remove:
                    tags.pop(key, None)
                tags.update(set_tags)
                check_tags(tags)
                self._db.execute("UPDATE devices SET tags = ? WHERE id = ?",
                                 (json.dumps(tags, sort_keys=True) if tags else None, device_id))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.rollback()
                raise
        except (sqlite3.OperationalError, OSError) as exc:
            raise self._failure("cannot write the registry", exc) from None
        return self.require(device_id)

    def get(self, device_id: str) -> Device | None:
        row = self._db.execute(f"{self._device_sql} WHERE id = ?", (device_id,)).fetchone()
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

    def devices(self, online_only: bool = False, limit: int | None = None,
                tag: tuple[str, str] | None = None) -> list[Device]:
        """Devices by ID; the filtering and the limit are SQL, so a large fleet is not read whole.

        ``tag``: only devices with this (key, value) tag.
        """
        sql = self._device_sql
        where: list[str] = []
        args: list = []
        if online_only:
            where.append("online = 1")
        if tag is not None:
            key, value = check_tag(*tag)
            where.append("json_extract(tags, ?) = ?")   # keys are [A-Za-z0-9._-]: safe inside "..."
            args += [f'$."{key}"', value]
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
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

    # -- operators (service identities) ---------------------------------------------------------

    def operator(self, name: str) -> Operator | None:
        """The operator a service login names (the previous release's ``service`` means admin)."""
        name = canonical_operator(name)
        if not self._has_operators:  # an earlier release's registry that could not be upgraded
            if name != ADMIN_OPERATOR:
                return None
            try:
                row = self._db.execute("SELECT key FROM policies WHERE name IN "
                                       f"({', '.join('?' * len(LEGACY_ADMIN_NAMES))})", LEGACY_ADMIN_NAMES).fetchone()
            except sqlite3.OperationalError:  # no policies table either
                return None
            return Operator(ADMIN_OPERATOR, bytes(row[0]), True, 0.0, None, (), (), None, None) if row else None
        row = self._db.execute(f"SELECT {OPERATOR_COLUMNS} FROM operators WHERE name = ?", (name,)).fetchone()
        return _row_to_operator(row) if row else None

    def require_operator(self, name: str) -> Operator:
        op = self.operator(name)
        if op is None:
            raise UnknownOperatorError(f"no operator {name!r} on this hub: 'devstreams operator list' shows them")
        return op

    def operators(self) -> list[Operator]:
        if not self._has_operators:
            admin = self.operator(ADMIN_OPERATOR)
            return [admin] if admin else []
        return [_row_to_operator(r) for r in self._db.execute(
            f"SELECT {OPERATOR_COLUMNS} FROM operators ORDER BY name").fetchall()]

    def ensure_admin(self) -> Operator:
        """The built-in admin operator, created (with a new key) if it does not exist yet."""
        admin = self.operator(ADMIN_OPERATOR)
        if admin is not None:
            return admin
        self._write("INSERT OR IGNORE INTO operators (name, key, enabled, created) VALUES (?, ?, 1, ?)",
                    (ADMIN_OPERATOR, secrets.token_bytes(KEY_BYTES), time.time()))
        return self.require_operator(ADMIN_OPERATOR)

    def add_operator(self, name: str, *, devices: Iterable[str] = (), streams: Iterable[str] = (),
                     expires: float | None = None, max_streams: int | None = None,
                     new_streams_per_second: float | None = None) -> Operator:
        check_operator_name(name)
        if isinstance(devices, str) or isinstance(streams, str):
            raise ConfigError("devices and streams are lists of entries, not one string")
        devices = _unique(check_scope_entry(e) for e in devices)
        streams = _unique(check_stream_name(n) for n in streams)
        for what, entries in (("device scope entries", devices), ("stream names", streams)):
            if len(entries) > MAX_SCOPE_ENTRIES:
                raise ConfigError(f"at most {MAX_SCOPE_ENTRIES} {what} per operator ({len(entries)} given)")
        now = time.time()
        if expires is not None and not expires > now:
            raise ConfigError("the expiry is in the past: give a later time or a duration like 30d")
        if max_streams is not None and (isinstance(max_streams, bool) or not isinstance(max_streams, int)
                                        or max_streams < 1):
            raise ConfigError("the operator's maximum concurrent streams must be at least 1")
        if new_streams_per_second is not None and not new_streams_per_second > 0:
            raise ConfigError("the operator's new streams per second must be more than 0")
        try:
            self._write(f"INSERT INTO operators ({OPERATOR_COLUMNS}) VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?)",
                        (name, secrets.token_bytes(KEY_BYTES), now, expires, json.dumps(devices),
                         json.dumps(streams), max_streams, new_streams_per_second))
        except sqlite3.IntegrityError:
            raise OperatorExistsError(f"operator {name!r} already exists: use 'devstreams operator show {name}' "
                                      f"or 'operator rotate-key {name}'") from None
        return self.require_operator(name)

    def remove_operator(self, name: str) -> None:
        if canonical_operator(name) == ADMIN_OPERATOR:
            raise ConfigError(f"the built-in {ADMIN_OPERATOR!r} operator cannot be removed: "
                              f"'devstreams operator rotate-key {ADMIN_OPERATOR}' replaces its key")
        op = self.require_operator(name)
        self._write("DELETE FROM operators WHERE name = ?", (op.name,))

    def set_operator_enabled(self, name: str, enabled: bool) -> Operator:
        if canonical_operator(name) == ADMIN_OPERATOR and not enabled:
            raise ConfigError(f"the built-in {ADMIN_OPERATOR!r} operator cannot be disabled: "
                              f"'devstreams operator rotate-key {ADMIN_OPERATOR}' replaces its key")
        op = self.require_operator(name)
        self._write("UPDATE operators SET enabled = ? WHERE name = ?", (int(enabled), op.name))
        return self.require_operator(op.name)

    def rotate_operator_key(self, name: str) -> Operator:
        if canonical_operator(name) == ADMIN_OPERATOR:
            self.ensure_admin()
        op = self.require_operator(name)
        self._write("UPDATE operators SET key = ? WHERE name = ?", (secrets.token_bytes(KEY_BYTES), op.name))
        return self.require_operator(op.name)

    # The previous release's interface (one service policy), kept for its callers.

    def policy_key(self, name: str = ADMIN_OPERATOR, create: bool = False) -> bytes | None:
        """The key that admits a service login as ``name`` now: None for an operator that does not
        exist, is disabled or has expired.  ``create``: make the admin operator if it is missing."""
        if create and canonical_operator(name) == ADMIN_OPERATOR:
            op: Operator | None = self.ensure_admin()
        else:
            op = self.operator(name)
        return op.key if op is not None and op.active(time.time()) else None

    # -- activity log --------------------------------------------------------------------------

    def log_request(self, *, device: str, name: str, stream_id: str | None, outcome: str,
                    reason: str, latency_ms: float, when: float | None = None, operator: str = "",
                    client_host: str = "") -> None:
        self._best_effort("INSERT INTO activity (time, kind, device, name, stream_id, outcome, reason, "
                          "latency_ms, operator, client_host) VALUES (?, 'request', ?, ?, ?, ?, ?, ?, ?, ?)",
                          (when or time.time(), device, name, stream_id, outcome, reason, latency_ms,
                           operator or "", client_host or ""))

    def log_stream(self, *, device: str, name: str, stream_id: str, reason: str,
                   bytes_to_device: int, bytes_to_service: int, duration_s: float,
                   when: float | None = None, operator: str = "", client_host: str = "") -> None:
        self._best_effort("INSERT OR IGNORE INTO activity (time, kind, device, name, stream_id, outcome, reason, "
                          "bytes_to_device, bytes_to_service, duration_s, operator, client_host) "
                          "VALUES (?, 'stream', ?, ?, ?, 'closed', ?, ?, ?, ?, ?, ?)",
                          (when or time.time(), device, name, stream_id, reason, bytes_to_device,
                           bytes_to_service, duration_s, operator or "", client_host or ""))

    def activity(self, device: str | None = None, limit: int = 200, *, operator: str | None = None,
                 since: float | None = None, after_seq: int | None = None) -> list[dict]:
        """Activity rows, oldest first: the newest ``limit`` matching ones, or with ``after_seq``
        the first ``limit`` ones after that row (``logs --follow``).

        ``operator``: rows of that operator (``admin`` includes rows logged under the
        previous release's ``service``); ``since``: rows at or after that wall-clock time.
        """
        where: list[str] = []
        args: list = []
        if device:
            where.append("device = ?")
            args.append(device)
        if operator:
            names = (ADMIN_OPERATOR, *LEGACY_ADMIN_NAMES) if canonical_operator(operator) == ADMIN_OPERATOR \
                else (operator,)
            where.append(f"operator IN ({', '.join('?' * len(names))})")
            args += names
        if since is not None:
            where.append("time >= ?")
            args.append(since)
        if after_seq is not None:
            where.append("seq > ?")
            args.append(after_seq)
        sql = f"SELECT {self._activity_columns} FROM activity"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq " + ("ASC" if after_seq is not None else "DESC") + " LIMIT ?"
        rows = self._db.execute(sql, args + [limit]).fetchall()
        if after_seq is None:
            rows.reverse()
        return [dict(zip(ACTIVITY_FIELDS, r)) for r in rows]

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


