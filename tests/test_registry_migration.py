"""A data dir of the previous release (one ``service`` policy, no operators, no tags) opens and keeps working.

The old schema below is the previous release's ``broker/registry.py`` SCHEMA, copied
as it was (plus the index its ``_migrate`` added), so the test does not follow
later changes of the new one.
"""

import base64
import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from devprocs import Devstreams, HubProcess, connect

from broker.registry import ADMIN_OPERATOR, Registry, open_registry
from devstreams.wire import connstr

OLD_SCHEMA = """
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
CREATE UNIQUE INDEX IF NOT EXISTS activity_stream_once ON activity (stream_id) WHERE kind = 'stream';
"""

SERVICE_KEY = bytes(range(32))
DEVICE_KEYS = {"pump-1": bytes(range(100, 132)), "pump-2": bytes(range(200, 232))}


def old_data_dir(path: Path) -> Path:
    """registry.db as the previous release left it: two devices, the service policy, two log rows."""
    path.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path / "registry.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(OLD_SCHEMA)
    for n, (device_id, key) in enumerate(DEVICE_KEYS.items()):
        db.execute("INSERT INTO devices (id, key, enabled, created) VALUES (?, ?, ?, ?)",
                   (device_id, key, int(n == 0), 1_700_000_000.0 + n))
    db.execute("INSERT INTO policies (name, key) VALUES ('service', ?)", (SERVICE_KEY,))
    db.execute("INSERT INTO activity (time, kind, device, name, stream_id, outcome, reason, latency_ms) "
               "VALUES (1700000100, 'request', 'pump-1', 'ssh', 's-1', 'accepted', '', 4.5)")
    db.execute("INSERT INTO activity (time, kind, device, name, stream_id, outcome, reason, bytes_to_device, "
               "bytes_to_service, duration_s) VALUES (1700000200, 'stream', 'pump-1', 'ssh', 's-1', 'closed', "
               "'closed by service', 10, 20, 3.0)")
    db.close()
    return path


def check_migrated(registry: Registry) -> None:
    assert {d.id: d.key for d in registry.devices()} == DEVICE_KEYS
    assert [d.enabled for d in registry.devices()] == [True, False]
    assert all(d.tags == {} for d in registry.devices())
    admin = registry.operator(ADMIN_OPERATOR)
    assert admin is not None and admin.key == SERVICE_KEY and admin.enabled and admin.builtin
    assert admin.devices == () and admin.streams == ()
    assert registry.operator("service") == admin and registry.policy_key("service") == SERVICE_KEY
    assert registry.policy_key() == SERVICE_KEY and registry.ensure_admin().key == SERVICE_KEY
    assert [o.name for o in registry.operators()] == [ADMIN_OPERATOR]
    rows = registry.activity()
    assert [(r["kind"], r["operator"], r["client_host"]) for r in rows] == [("request", "", ""), ("stream", "", "")]
    assert rows[1]["bytes_to_service"] == 20 and [r["seq"] for r in rows] == [1, 2]


def test_old_registry_opens_keeps_devices_and_the_service_key(tmp_path):
    path = old_data_dir(tmp_path / "old")
    registry = open_registry(path)
    check_migrated(registry)
    # the new columns work on the upgraded file
    registry.set_device_tags("pump-1", {"site": "plant-3"})
    assert [d.id for d in registry.devices(tag=("site", "plant-3"))] == ["pump-1"]
    registry.log_request(device="pump-2", name="web", stream_id=None, outcome="forbidden", reason="x",
                         latency_ms=0.1, operator="alice", client_host="10.1.1.1")
    assert [r["device"] for r in registry.activity(operator="alice")] == ["pump-2"]
    registry.replace_open_streams([{"stream_id": "s", "device": "pump-1", "name": "ssh", "state": "open",
                                    "created": time.time(), "updated": time.time(), "operator": "alice"}])
    assert registry.open_streams()[0]["operator"] == "alice"
    registry.close()
    # opening again is a no-op: same keys, same admin, nothing added twice
    again = open_registry(path)
    assert again.get("pump-1").tags == {"site": "plant-3"}
    assert again.operator(ADMIN_OPERATOR).key == SERVICE_KEY and len(again.operators()) == 1
    assert len(again.activity()) == 3
    again.close()


def test_concurrent_openers_migrate_once(tmp_path):
    """A hub and CLI commands opening the old file at the same moment: one migration, no error."""
    path = old_data_dir(tmp_path / "old")
    results: list = []
    errors: list = []

    def opener():
        try:
            registry = open_registry(path)
            results.append((registry.operator(ADMIN_OPERATOR).key, len(registry.devices())))
            registry.close()
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert results == [(SERVICE_KEY, 2)] * 6
    registry = open_registry(path)
    check_migrated(registry)
    registry.close()


def test_old_registry_without_a_service_policy_gets_a_new_admin(tmp_path):
    """A previous-release data dir whose hub never started: no policy yet; admin is made on demand."""
    path = tmp_path / "fresh-old"
    path.mkdir()
    db = sqlite3.connect(path / "registry.db")
    db.executescript(OLD_SCHEMA)
    db.close()
    registry = open_registry(path)
    assert registry.operator(ADMIN_OPERATOR) is None and registry.policy_key() is None
    admin = registry.ensure_admin()
    assert len(admin.key) == 32 and registry.policy_key("service") == admin.key
    registry.close()


@pytest.mark.timeout(120)
def test_hub_up_on_an_old_data_dir_serves_old_connection_strings(tmp_path):
    """`devstreams hub up` on the old data dir: the old device key logs in, and an old-style service
    connection string (SharedAccessKeyName=service, the old key) opens a stream to it."""
    path = old_data_dir(tmp_path / "old")
    hub = HubProcess(path, tmp_path / "hub.log")
    agent = None
    try:
        shown = json.loads(hub.cli("hub", "show"))
        port = shown["mqttPort"]
        device_cs = str(connstr.for_hub("localhost", port, DEVICE_KEYS["pump-1"], device_id="pump-1"))
        service_cs = f"HostName=localhost;MqttPort={port};SharedAccessKeyName=service;" \
                     f"SharedAccessKey={base64.b64encode(SERVICE_KEY).decode()}"
        admin_cs = connstr.parse(hub.cli("hub", "connection-string"))
        assert admin_cs.policy == ADMIN_OPERATOR and admin_cs.key == SERVICE_KEY  # the same key, the new name
        agent = Devstreams(tmp_path / "agent.log", "agent", "--connection-string", device_cs,
                           "--ca-file", hub.ca_file, "--echo")
        deadline = time.monotonic() + 30
        while not hub.online("pump-1"):
            assert time.monotonic() < deadline, f"agent not online; log:\n{agent.log()}\nhub:\n{hub.proc.log()}"
            assert agent.proc.poll() is None, agent.log()
            time.sleep(0.2)
        echoed = connect("--connection-string", service_cs, "--ca-file", hub.ca_file, "--device", "pump-1",
                         "--stream", "echo", input=b"still here\n")
        assert echoed.returncode == 0, echoed.stderr
        assert echoed.stdout == b"still here\n"
    finally:
        if agent is not None:
            agent.stop()
        hub.stop()


def test_old_registry_read_only_is_still_read(tmp_path):
    """A full disk can keep the upgrade from running (the registry is then opened read-only):
    logins still find the devices and the old service key, and the log still reads."""
    path = old_data_dir(tmp_path / "old")
    registry = Registry.__new__(Registry)
    registry.path = path / "registry.db"
    registry._db = registry._open_read_only(OSError(28, "No space left on device"))  # as Registry() does then
    registry._refresh_columns()
    try:
        assert registry.get("pump-1").key == DEVICE_KEYS["pump-1"] and registry.get("pump-1").tags == {}
        assert [d.id for d in registry.devices()] == ["pump-1", "pump-2"]
        assert registry.policy_key("service") == SERVICE_KEY and registry.operator(ADMIN_OPERATOR).key == SERVICE_KEY
        assert [o.name for o in registry.operators()] == [ADMIN_OPERATOR]
        assert registry.operator("alice") is None
        assert [r["operator"] for r in registry.activity()] == ["", ""]
    finally:
        registry._db.close()
