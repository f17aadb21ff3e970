"""Operators, device tags and the audit log from the CLI (issue 12), run as real ``devstreams`` processes.

The registry rules they rest on (scopes, tags, the admin operator) are tested
directly too; the hub-side authorization and revocation are the scenario tests'.
"""

import base64
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker import access
from devprocs import clean_env
from helpers import REPO, HubThread, cli

from broker.registry import (
    ADMIN_OPERATOR,
    ConfigError,
    OperatorExistsError,
    UnknownOperatorError,
    open_registry,
)
from devstreams import timespec
from devstreams.fleetimport import parse
from devstreams.wire.connstr import parse as parse_cs


def one_line_error(result) -> str:
    assert result.returncode != 0, result.stdout[:300]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def ok(*args) -> str:
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


@pytest.fixture
def data_dir(tmp_path):
    return str(tmp_path / "hubdata")


def registry_of(data_dir):
    return open_registry(Path(data_dir))


# -- pure parts ---------------------------------------------------------------------------------------

def test_time_specs():
    now = 1_800_000_000.0
    assert timespec.expiry("30d", now) == now + 30 * 86400
    assert timespec.expiry("2h30m", now) == now + 9000
    assert timespec.since("10m", now) == now - 600
    assert timespec.since("2026-01-02T03:04:05+00:00", now) == 1767323045.0
    for bad in ("", "soon", "10x", "-5m", "1" * 100):
        with pytest.raises(ConfigError):
            timespec.since(bad, now)
    with pytest.raises(ConfigError, match="in the past"):
        timespec.expiry("2001-01-01", now)
    with pytest.raises(ConfigError, match="more than 0"):
        timespec.expiry("0d", now)


def test_registry_operators_and_admin(tmp_path):
    registry = open_registry(tmp_path)
    admin = registry.ensure_admin()
    assert admin.builtin and admin.devices == () and admin.streams == () and len(admin.key) == 32
    assert registry.operator("service") == admin and registry.policy_key("service") == admin.key
    assert registry.ensure_admin() == admin  # idempotent: the key stays
    alice = registry.add_operator("alice", devices=["pump-*", "pump-*"], streams=["ssh"], max_streams=3)
    assert alice.devices == ("pump-*",) and alice.streams == ("ssh",) and alice.max_streams == 3
    assert "key" not in repr(alice) and alice.key.hex() not in repr(alice)
    with pytest.raises(OperatorExistsError):
        registry.add_operator("alice")
    with pytest.raises(UnknownOperatorError):
        registry.require_operator("nobody")
    assert registry.operator("nobody") is None
    registry.set_operator_enabled("alice", False)
    assert registry.policy_key("alice") is None  # a disabled operator's key admits nothing
    registry.set_operator_enabled("alice", True)
    rotated = registry.rotate_operator_key("alice")
    assert rotated.key != alice.key and registry.policy_key("alice") == rotated.key
    old_admin = registry.rotate_operator_key("admin").key
    assert old_admin != admin.key and registry.ensure_admin().key == old_admin
    expiring = registry.add_operator("temp", expires=time.time() + 0.3)
    assert registry.policy_key("temp") == expiring.key
    time.sleep(0.4)
    assert registry.policy_key("temp") is None and registry.require_operator("temp").expired(time.time())
    for bad in (lambda: registry.remove_operator("admin"), lambda: registry.set_operator_enabled("service", False)):
        with pytest.raises(ConfigError, match="cannot be"):
            bad()
    registry.remove_operator("alice")
    assert [o.name for o in registry.operators()] == ["admin", "temp"]


def test_reader_keeps_import_tags():
    entries = parse([b'{"device_id": "pump-1", "tags": {"site": "plant-3"}}\n', b"pump-2\n"])
    assert [(e.device_id, e.tags) for e in entries] == [("pump-1", {"site": "plant-3"}), ("pump-2", {})]


# -- operators ----------------------------------------------------------------------------------------

def test_operator_round_trip(data_dir):
    added = ok("operator", "add", "alice", "--devices", "pump-*", "--devices", "tag=site=plant-3,cam-1",
               "--streams", "ssh,web", "--expires", "30d", "--max-streams", "4",
               "--max-new-streams-per-second", "2.5", "--data-dir", data_dir).strip()
    cs = parse_cs(added)
    assert cs.policy == "alice" and cs.host == "localhost" and len(cs.key) == 32
    assert added.startswith("HostName=localhost;SharedAccessKeyName=alice;SharedAccessKey=")
    registry = registry_of(data_dir)
    assert registry.require_operator("alice").key == cs.key

    listing = json.loads(ok("operator", "list", "--json", "--data-dir", data_dir))
    assert [o["name"] for o in listing] == ["admin", "alice"]
    alice = listing[1]
    assert alice["devices"] == ["pump-*", "tag=site=plant-3", "cam-1"] and alice["streams"] == ["ssh", "web"]
    assert alice["enabled"] and not alice["builtin"] and not alice["expired"]
    assert alice["maxStreams"] == 4 and alice["maxNewStreamsPerSecond"] == 2.5
    assert 29.9 * 86400 < alice["expires"] - time.time() <= 30 * 86400
    assert listing[0]["builtin"] and listing[0]["devices"] == [] and listing[0]["streams"] == []
    text = ok("operator", "list", "--data-dir", data_dir)
    assert "alice" in text and "pump-*,tag=site=plant-3,cam-1" in text and "ssh,web" in text
    admin_key = registry.require_operator("admin").key
    for shown in (text, json.dumps(listing)):  # keys are never listed
        assert "SharedAccessKey" not in shown and "key" not in json.loads(json.dumps(listing))[1]
        for key in (cs.key, admin_key):
            assert base64.b64encode(key).decode() not in shown and key.hex() not in shown

    shown = json.loads(ok("operator", "show", "alice", "--json", "--data-dir", data_dir))
    assert shown["connectionString"] == added and shown["streams"] == ["ssh", "web"]
    assert "every stream" in ok("operator", "show", "admin", "--data-dir", data_dir)
    assert "SharedAccessKeyName=alice" in ok("operator", "show", "alice", "--data-dir", data_dir)

    assert "disabled operator alice" in ok("operator", "disable", "alice", "--data-dir", data_dir)
    assert json.loads(ok("operator", "show", "alice", "--json", "--data-dir", data_dir))["enabled"] is False
    assert "disabled" in ok("operator", "list", "--data-dir", data_dir)
    ok("operator", "enable", "alice", "--data-dir", data_dir)
    assert json.loads(ok("operator", "show", "alice", "--json", "--data-dir", data_dir))["enabled"] is True

    rotated = ok("operator", "rotate-key", "alice", "--data-dir", data_dir).strip()
    assert parse_cs(rotated).policy == "alice" and parse_cs(rotated).key != cs.key
    assert registry.require_operator("alice").key == parse_cs(rotated).key

    assert "removed operator alice" in ok("operator", "remove", "alice", "--data-dir", data_dir)
    assert [o["name"] for o in json.loads(ok("operator", "list", "--json", "--data-dir", data_dir))] == ["admin"]
    registry.close()


def test_hub_connection_string_is_admin(data_dir):
    ok("device", "add", "d1", "--data-dir", data_dir)  # makes the data dir
    first = parse_cs(ok("hub", "connection-string", "--data-dir", data_dir).strip())
    assert first.policy == ADMIN_OPERATOR
    assert parse_cs(ok("hub", "connection-string", "--data-dir", data_dir).strip()).key == first.key
    shown = json.loads(ok("operator", "show", "admin", "--json", "--data-dir", data_dir))
    assert parse_cs(shown["connectionString"]).key == first.key
    rotated = parse_cs(ok("hub", "connection-string", "--rotate", "--data-dir", data_dir).strip())
    assert rotated.key != first.key and rotated.policy == ADMIN_OPERATOR
    again = parse_cs(ok("operator", "rotate-key", "admin", "--data-dir", data_dir).strip())
    assert again.key not in (first.key, rotated.key)
    assert registry_of(data_dir).policy_key("service") == again.key


BAD_OPERATOR_COMMANDS = [
    (["add", "admin"], "reserved"),
    (["add", "service"], "reserved"),
    (["add", "bad/name"], "invalid operator name"),
    (["add", "x" * 61], "invalid operator name"),
    (["add", "bob", "--devices", "pump/*"], "invalid device scope 'pump/*'"),
    (["add", "bob", "--devices", "tag=site"], "tag=KEY=VALUE"),
    (["add", "bob", "--devices", "tag=site=plant 3"], "invalid tag value"),
    (["add", "bob", "--devices", "site=plant-3"], "invalid device scope"),
    (["add", "bob", "--devices", "pump-*,"], "empty item"),
    (["add", "bob", "--streams", "ssh,we b"], "invalid stream name 'we b'"),
    (["add", "bob", "--expires", "soon"], "--expires: cannot read 'soon'"),
    (["add", "bob", "--expires", "2001-01-01"], "in the past"),
    (["add", "bob", "--max-streams", "0"], "--max-streams must be at least 1"),
    (["add", "bob", "--max-new-streams-per-second", "0"], "more than 0"),
    (["add", "taken"], "already exists"),
    (["show", "ghost"], "no operator 'ghost'"),
    (["remove", "ghost"], "no operator 'ghost'"),
    (["disable", "ghost"], "no operator 'ghost'"),
    (["rotate-key", "ghost"], "no operator 'ghost'"),
    (["remove", "admin"], "cannot be removed"),
    (["disable", "admin"], "cannot be disabled"),
]


@pytest.mark.timeout(120)
def test_bad_operator_commands_give_one_line(data_dir):
    ok("operator", "add", "taken", "--data-dir", data_dir)
    for args, why in BAD_OPERATOR_COMMANDS:
        error = one_line_error(cli("operator", *args, "--data-dir", data_dir))
        assert why in error, (args, error)
    registry = registry_of(data_dir)
    assert [o.name for o in registry.operators()] == ["admin", "taken"]
    assert all(o.enabled for o in registry.operators())


# -- device tags --------------------------------------------------------------------------------------

def test_device_tags(data_dir):
    ok("device", "add", "pump-7", "--tag", "site=plant-3", "--tag", "kind=pump", "--data-dir", data_dir)
    ok("device", "add", "cam-1", "--tag", "site=plant-4", "--data-dir", data_dir)
    ok("device", "add", "bare", "--data-dir", data_dir)
    shown = json.loads(ok("device", "show", "pump-7", "--json", "--data-dir", data_dir))
    assert shown["tags"] == {"site": "plant-3", "kind": "pump"}
    assert "kind=pump,site=plant-3" in ok("device", "show", "pump-7", "--data-dir", data_dir)

    out = ok("device", "tag", "cam-1", "site=plant-3", "kind=camera", "--data-dir", data_dir)
    assert "kind=camera,site=plant-3" in out
    listing = json.loads(ok("device", "list", "--json", "--data-dir", data_dir))
    assert {d["deviceId"]: d["tags"] for d in listing} == {
        "bare": {}, "cam-1": {"site": "plant-3", "kind": "camera"}, "pump-7": {"site": "plant-3", "kind": "pump"}}
    text = ok("device", "list", "--data-dir", data_dir)
    assert "TAGS" in text and "kind=camera,site=plant-3" in text
    plant3 = json.loads(ok("device", "list", "--json", "--tag", "site=plant-3", "--data-dir", data_dir))
    assert [d["deviceId"] for d in plant3] == ["cam-1", "pump-7"]
    pumps = ok("device", "list", "--tag", "kind=pump", "--data-dir", data_dir)
    assert "pump-7" in pumps and "cam-1" not in pumps

    ok("device", "tag", "cam-1", "--remove", "kind", "--data-dir", data_dir)
    assert json.loads(ok("device", "show", "cam-1", "--json", "--data-dir", data_dir))["tags"] == {"site": "plant-3"}
    ok("device", "tag", "cam-1", "--remove", "site", "--remove", "absent", "--data-dir", data_dir)
    assert json.loads(ok("device", "show", "cam-1", "--json", "--data-dir", data_dir))["tags"] == {}
    assert registry_of(data_dir).get("pump-7").tags == {"site": "plant-3", "kind": "pump"}

    for args, why in ((["device", "add", "x1", "--tag", "site"], "write KEY=VALUE"),
                      (["device", "add", "x2", "--tag", "si te=a"], "invalid tag key 'si te'"),
                      (["device", "add", "x3", "--tag", "site=a", "--tag", "site=b"], "given twice"),
                      (["device", "tag", "pump-7", "site=plant/3"], "invalid tag value 'plant/3'"),
                      (["device", "tag", "pump-7"], "give tags to set"),
                      (["device", "tag", "ghost", "a=b"], "no device 'ghost'"),
                      (["device", "tag", "pump-7", *[f"k{n}=v" for n in range(31)]], "at most 32 tags"),
                      (["device", "list", "--tag", "nokey"], "write KEY=VALUE")):
        assert why in one_line_error(cli(*args, "--data-dir", data_dir)), args
    assert registry_of(data_dir).get("x1") is None
    assert registry_of(data_dir).get("pump-7").tags == {"site": "plant-3", "kind": "pump"}  # all or nothing


def test_import_with_tags_then_scope_by_tag(data_dir, tmp_path):
    fleet = tmp_path / "fleet.jsonl"
    fleet.write_text('{"device_id": "pump-1", "tags": {"site": "plant-3"}}\npump-2\n')
    rows = [json.loads(line) for line in ok("device", "import", str(fleet), "--data-dir", data_dir).splitlines()]
    assert [r["device_id"] for r in rows] == ["pump-1", "pump-2"]
    assert [d["deviceId"] for d in json.loads(
        ok("device", "list", "--json", "--tag", "site=plant-3", "--data-dir", data_dir))] == ["pump-1"]
    ok("operator", "add", "bob", "--devices", "tag=site=plant-3", "--data-dir", data_dir)
    registry = registry_of(data_dir)
    bob = registry.require_operator("bob")
    assert [d.id for d in registry.devices() if access.device_in_scope(bob.devices, d.id, d.tags)] == ["pump-1"]


# -- the activity log ---------------------------------------------------------------------------------

def _fill_log(data_dir) -> None:
    registry = registry_of(data_dir)
    now = time.time()
    registry.log_request(device="pump-7", name="ssh", stream_id="s1", outcome="accepted", reason="", latency_ms=3.0,
                         when=now - 7200, operator="alice", client_host="10.0.0.5")
    registry.log_request(device="cam-1", name="web", stream_id=None, outcome="forbidden",
                         reason="operator alice may not open stream 'web' to cam-1", latency_ms=0.1,
                         when=now - 60, operator="alice", client_host="10.0.0.5")
    registry.log_stream(device="pump-9", name="ssh", stream_id="s2", reason="closed by service", bytes_to_device=10,
                        bytes_to_service=20, duration_s=1.5, when=now - 30, operator="bob", client_host="10.0.0.6")
    registry.log_request(device="pump-9", name="ssh", stream_id="s3", outcome="accepted", reason="", latency_ms=2.0,
                         when=now - 10, operator="admin", client_host="127.0.0.1")
    registry.close()


def test_logs_operator_since_json(data_dir):
    ok("device", "add", "pump-7", "--data-dir", data_dir)
    _fill_log(data_dir)
    lines = [json.loads(line) for line in ok("logs", "--json", "--data-dir", data_dir).splitlines()]
    assert [e["operator"] for e in lines] == ["alice", "alice", "bob", "admin"]
    assert lines[0]["client_host"] == "10.0.0.5" and lines[2]["kind"] == "stream"
    assert [e["seq"] for e in lines] == sorted(e["seq"] for e in lines)

    alice = [json.loads(line) for line in ok("logs", "--operator", "alice", "--json", "--data-dir",
                                             data_dir).splitlines()]
    assert [(e["device"], e["outcome"]) for e in alice] == [("pump-7", "accepted"), ("cam-1", "forbidden")]
    recent = [json.loads(line) for line in ok("logs", "--operator", "alice", "--since", "10m", "--json",
                                              "--data-dir", data_dir).splitlines()]
    assert [e["device"] for e in recent] == ["cam-1"]
    assert [json.loads(line)["operator"] for line in ok("logs", "--since", "45s", "--json", "--data-dir",
                                                        data_dir).splitlines()] == ["bob", "admin"]
    # 'service' (the previous release's policy) means admin
    assert [json.loads(line)["device"] for line in ok("logs", "--operator", "service", "--json", "--data-dir",
                                                      data_dir).splitlines()] == ["pump-9"]
    assert ok("logs", "--operator", "nobody", "--data-dir", data_dir) == ""

    text = ok("logs", "--data-dir", data_dir)
    assert "alice" in text and "bob" in text and "forbidden" in text and "may not open stream 'web'" in text
    assert "--since: cannot read 'yesterday'" in one_line_error(cli("logs", "--since", "yesterday",
                                                                    "--data-dir", data_dir))


@pytest.mark.timeout(60)
def test_logs_follow_prints_new_rows_and_stops_on_sigterm(data_dir):
    ok("device", "add", "pump-7", "--data-dir", data_dir)
    _fill_log(data_dir)
    proc = subprocess.Popen([sys.executable, "-m", "devstreams", "logs", "--follow", "--json", "--operator", "alice",
                             "--data-dir", data_dir], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=clean_env())
    try:
        existing = [json.loads(proc.stdout.readline()) for _ in range(2)]
        assert [e["device"] for e in existing] == ["pump-7", "cam-1"]
        registry = registry_of(data_dir)
        registry.log_request(device="bob-only", name="ssh", stream_id=None, outcome="accepted", reason="",
                             latency_ms=1.0, operator="bob")
        for n in range(3):
            registry.log_request(device=f"pump-{n}", name="ssh", stream_id=None, outcome="accepted", reason="",
                                 latency_ms=1.0, operator="alice", client_host="10.0.0.9")
        registry.close()
        new = [json.loads(proc.stdout.readline()) for _ in range(3)]  # readline blocks: they must come
        assert [e["device"] for e in new] == ["pump-0", "pump-1", "pump-2"]
        assert all(e["operator"] == "alice" and e["client_host"] == "10.0.0.9" for e in new)
        assert new[0]["seq"] > existing[-1]["seq"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert out == "" and "Traceback" not in err  # nothing else: bob's row was never printed


# -- streams list -------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_streams_list_shows_the_operator(tmp_path):
    hub = HubThread(tmp_path / "hub").start()
    try:
        registry = hub.registry()
        now = time.time()
        # rows as another hub sharing the registry writes them (this hub only replaces its own)
        registry.replace_open_streams([{"stream_id": "a" * 32, "device": "pump-7", "name": "ssh", "state": "open",
                                        "created": now - 5, "gateway": "wss://gw", "service": "svc:x",
                                        "bytes_to_device": 1, "bytes_to_service": 2, "updated": now,
                                        "operator": "alice"}], hub="other")
        registry.close()
        rows = json.loads(ok("streams", "list", "--json", "--data-dir", str(hub.data_dir)))
        assert [(r["device"], r["operator"]) for r in rows] == [("pump-7", "alice")]
        table = ok("streams", "list", "--data-dir", str(hub.data_dir))
        assert "OPERATOR" in table.splitlines()[0] and "alice" in table.splitlines()[1]
    finally:
        hub.stop()
