"""Fleet provisioning from the CLI (issue 10): ``device import`` and ``device list --online/--limit``.

The reader of import files is pure (devstreams/fleetimport.py) and tested directly;
everything else runs the real ``devstreams`` command, and the online part a real hub
with real agents.
"""

import json
import time
from pathlib import Path

import pytest
from devprocs import Devstreams, wait_online
from helpers import cli

from broker.registry import open_registry
from devstreams.fleetimport import MAX_LINE_BYTES, ImportFileError, parse, parse_line
from devstreams.wire.connstr import parse as parse_cs
from devstreams.wire.errors import ConfigError


def one_line_error(result) -> str:
    assert result.returncode != 0, result.stdout[:300]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def registered(data_dir) -> dict[str, bytes]:
    registry = open_registry(Path(data_dir))
    try:
        return {d.id: d.key for d in registry.all()}
    finally:
        registry.close()


def imported(result) -> list[dict]:
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return [json.loads(line) for line in result.stdout.splitlines()]


def check_connection_strings(rows: list[dict], data_dir, host="localhost", port=None) -> None:
    """Every printed connection string names its device and carries the key the registry holds."""
    keys = registered(data_dir)
    for row in rows:
        assert set(row) == {"device_id", "connection_string"}
        cs = parse_cs(row["connection_string"])
        assert cs.device_id == row["device_id"] and cs.host == host
        assert cs.key == keys[row["device_id"]] and len(cs.key) == 32
        if port is not None:
            assert cs.port == port


# -- the pure reader --------------------------------------------------------------------------------

def test_reader_ids_comments_blank_lines_and_json_lines():
    lines = [b"# fleet of plant 3\n", b"pump-1\n", b"\n", b"  pump-2   # the spare\r\n",
             b'{"device_id": "pump-3"}\n', b'{"device_id": "pump-4", "tags": {}}\n',
             b'{"device_id": "pump-5", "tags": null}', b"   \n"]
    entries = parse(lines, "fleet.txt")
    assert [(e.line, e.device_id) for e in entries] == [(2, "pump-1"), (4, "pump-2"), (5, "pump-3"),
                                                        (6, "pump-4"), (7, "pump-5")]
    assert parse_line("\ufeffpump-1\n".encode()) == "pump-1"  # a byte order mark


@pytest.mark.parametrize("line, why", [
    (b"bad/id", "invalid device ID 'bad/id'"),
    (b"two words", "invalid device ID 'two words'"),
    (b"x" * 129, "invalid device ID"),
    (b'{"device_id": "pump-9"', "malformed JSON"),
    (b'["pump-9"]', "must be an object"),
    (b'{"device_id": 7}', "\"device_id\" must be a string"),
    (b'{"tags": {}}', "without \"device_id\""),
    (b'{"device_id": "pump-9", "site": "x"}', "unknown field 'site'"),
    (b'{"device_id": "bad id"}', "invalid device ID 'bad id'"),
    (b'{"device_id": "pump-9", "tags": {"site now": "plant-3"}}', "invalid tag key 'site now'"),
    (b'{"device_id": "pump-9", "tags": {"site": ""}}', "invalid tag value ''"),
    (b'{"device_id": "pump-9", "tags": {' + b", ".join(b'"k%d": "v"' % n for n in range(33)) + b'}}',
     "at most 32 tags"),
    (b'{"device_id": "pump-9", "tags": {"site": 3}}', "\"tags\" must be an object of string values"),
    (b'{"device_id": "pump-9", "tags": ["site"]}', "\"tags\" must be an object of string values"),
    (b'{"device_id": "pump-9", "tags": {"s": "' + b"v" * 300 + b'"}}', "invalid tag value"),
    (b"\xff\xfepump", "not UTF-8"),
    (b"p" * (MAX_LINE_BYTES + 1), f"longer than {MAX_LINE_BYTES} bytes"),
    (b"[" * 4000, "nested too deeply"),
], ids=lambda v: v[:24].decode(errors="replace") if isinstance(v, bytes) else "")
def test_reader_names_the_bad_line(line, why):
    with pytest.raises(ImportFileError) as info:
        parse([b"ok-1\n", b"# comment\n", line + b"\n", b"ok-2\n"], "fleet.txt")
    assert info.value.line == 3
    message = str(info.value)
    assert message.startswith("fleet.txt, line 3: ") and why in message and "nothing was imported" in message
    assert "\n" not in message and len(message) < 400


def test_reader_refuses_duplicates_and_empty_files():
    with pytest.raises(ImportFileError, match=r"line 4: device 'a' is already on line 1"):
        parse([b"a\n", b"b\n", b"\n", b'{"device_id": "a"}\n'], "f")
    with pytest.raises(ConfigError, match="no device IDs in f"):
        parse([b"# nothing\n", b"\n"], "f")


# -- device import, the real command -----------------------------------------------------------------

@pytest.mark.timeout(120)
def test_import_10000_devices_from_a_file(tmp_path):
    data_dir = tmp_path / "hub"
    ids = [f"meter-{n:05d}" for n in range(10_000)]
    listing = tmp_path / "fleet.txt"
    listing.write_text("# 10k meters\n" + "\n".join(ids) + "\n")
    rows = imported(cli("device", "import", str(listing), "--data-dir", str(data_dir), timeout=100))
    assert [r["device_id"] for r in rows] == ids  # one JSON line per device, in file order
    assert set(registered(data_dir)) == set(ids)
    check_connection_strings(rows, data_dir)
    assert len({r["connection_string"] for r in rows}) == 10_000  # a key of its own each
    # the same string 'device show' prints
    shown = json.loads(cli("device", "show", "meter-04711", "--json", "--data-dir", str(data_dir)).stdout)
    assert shown["connectionString"] == rows[4711]["connection_string"]

    everything = json.loads(cli("device", "list", "--json", "--data-dir", str(data_dir)).stdout)
    assert [d["deviceId"] for d in everything] == ids
    first = json.loads(cli("device", "list", "--json", "--limit", "3", "--data-dir", str(data_dir)).stdout)
    assert [d["deviceId"] for d in first] == ids[:3]
    text = cli("device", "list", "--limit", "2", "--data-dir", str(data_dir)).stdout
    assert "meter-00001" in text and "meter-00002" not in text


BAD_LINES = [
    ("invalid", "bad/id", "invalid device ID 'bad/id'"),
    ("duplicate", "good-1", "device 'good-1' is already on line 2"),
    ("registered", "old-1", "device 'old-1' is already registered"),
    ("malformed JSON", '{"device_id": "good-9",', "malformed JSON"),
    ("tags", '{"device_id": "good-9", "tags": {"site": "plant/3"}}', "invalid tag value 'plant/3'"),
]


@pytest.mark.parametrize("kind, bad, why", BAD_LINES, ids=[b[0] for b in BAD_LINES])
def test_a_bad_line_imports_nothing_and_names_the_line(tmp_path, kind, bad, why):
    data_dir = str(tmp_path / "hub")
    assert cli("device", "add", "old-1", "--data-dir", data_dir).returncode == 0
    listing = tmp_path / "fleet.txt"
    good = [f"good-{n}" for n in range(1, 501)]
    listing.write_text("\n".join(["# fleet", *good, bad, "good-999"]) + "\n")  # bad: line 502
    result = cli("device", "import", str(listing), "--data-dir", data_dir)
    error = one_line_error(result)
    assert error.startswith(f"devstreams: error: {listing}, line 502: ") and why in error, error
    assert "nothing was imported" in error
    assert result.stdout == ""
    assert set(registered(data_dir)) == {"old-1"}  # all or nothing


def test_import_from_stdin_with_and_without_tags(tmp_path):
    data_dir = tmp_path / "hub"
    plain = cli("device", "import", "-", "--data-dir", str(data_dir), input="pump-1\n\n# spare:\npump-2\n")
    rows = imported(plain)
    assert [r["device_id"] for r in rows] == ["pump-1", "pump-2"]
    json_lines = '{"device_id": "pump-3"}\n{"device_id": "pump-4", "tags": {}}\npump-5\n'
    rows += imported(cli("device", "import", "-", "--data-dir", str(data_dir), input=json_lines))
    assert [r["device_id"] for r in rows] == ["pump-1", "pump-2", "pump-3", "pump-4", "pump-5"]
    check_connection_strings(rows, data_dir)

    tagged = '{"device_id": "pump-6"}\n{"device_id": "pump-7", "tags": {"site": "plant-3", "kind": "pump"}}\n'
    rows += imported(cli("device", "import", "-", "--data-dir", str(data_dir), input=tagged))
    check_connection_strings(rows, data_dir)
    shown = json.loads(cli("device", "show", "pump-7", "--json", "--data-dir", str(data_dir)).stdout)
    assert shown["tags"] == {"site": "plant-3", "kind": "pump"}
    assert json.loads(cli("device", "show", "pump-6", "--json", "--data-dir", str(data_dir)).stdout)["tags"] == {}
    bad_tag = '{"device_id": "pump-8"}\n{"device_id": "pump-9", "tags": {"site": "plant 3"}}\n'
    error = one_line_error(cli("device", "import", "-", "--data-dir", str(data_dir), input=bad_tag))
    assert "stdin, line 2: invalid tag value 'plant 3'" in error
    assert set(registered(data_dir)) == {f"pump-{n}" for n in range(1, 8)}

    assert "no device IDs in stdin" in one_line_error(
        cli("device", "import", "-", "--data-dir", str(data_dir), input="# nobody\n"))
    missing = tmp_path / "nope.txt"
    assert f"cannot read {missing}" in one_line_error(cli("device", "import", str(missing), "--data-dir",
                                                          str(data_dir)))
    assert "--limit must be at least 1" in one_line_error(cli("device", "list", "--limit", "0", "--data-dir",
                                                              str(data_dir)))


# -- with a running hub: imported devices log in; list --online --------------------------------------

def listed(hub, *flags) -> list[str]:
    result = cli("device", "list", "--json", *flags, "--data-dir", str(hub.data_dir))
    assert result.returncode == 0, result.stderr
    return [d["deviceId"] for d in json.loads(result.stdout)]


@pytest.mark.timeout(90)
def test_imported_devices_log_in_and_list_online_limit(hub, tmp_path):
    rows = imported(cli("device", "import", "-", "--data-dir", str(hub.data_dir),
                        input="field-a\nfield-b\nfield-c\nfield-d\n"))
    # the running hub's address is in the strings, and the hub knows the devices at once
    check_connection_strings(rows, hub.data_dir, host=hub.settings.advertised_host(), port=hub.hub.mqtt_port)
    strings = {r["device_id"]: r["connection_string"] for r in rows}
    agents = []
    try:
        for device_id in ("field-b", "field-d"):
            proc = Devstreams(tmp_path / f"agent-{device_id}.log", "agent", "--connection-string",
                              strings[device_id], "--ca-file", hub.ca_file, "--echo")
            agents.append(proc)
            wait_online(hub, device_id, proc)
        deadline = time.monotonic() + 20
        while listed(hub, "--online") != ["field-b", "field-d"]:  # presence is written just after login
            assert time.monotonic() < deadline, listed(hub, "--online")
            time.sleep(0.1)
        assert listed(hub, "--online", "--limit", "1") == ["field-b"]
        assert listed(hub, "--limit", "2") == ["field-a", "field-b"]
        assert listed(hub) == ["field-a", "field-b", "field-c", "field-d"]
        text = cli("device", "list", "--online", "--data-dir", str(hub.data_dir)).stdout
        assert "field-b" in text and "field-d" in text and "field-a" not in text and "field-c" not in text
        assert "online" in text and "not running" not in text
    finally:
        for proc in agents:
            proc.stop()


def test_list_online_without_a_hub_is_empty(tmp_path):
    data_dir = str(tmp_path / "hub")
    imported(cli("device", "import", "-", "--data-dir", data_dir, input="d1\nd2\n"))
    registry = open_registry(tmp_path / "hub")
    registry.set_presence("d1", True)  # a flag left behind by a hub killed with -9
    registry.close()
    assert json.loads(cli("device", "list", "--online", "--json", "--data-dir", data_dir).stdout) == []
    text = cli("device", "list", "--online", "--data-dir", data_dir).stdout
    assert "hub not running" in text and "d1" not in text


def test_registry_add_devices_is_all_or_nothing(tmp_path):
    from broker.registry import DevicesExistError
    registry = open_registry(tmp_path)
    try:
        registry.add_device("old-1")
        registry.add_device("old-2")
        with pytest.raises(DevicesExistError) as info:
            registry.add_devices(["new-1", "old-2", "new-2", "old-1"])
        assert sorted(info.value.device_ids) == ["old-1", "old-2"]
        assert "'old-" in str(info.value) and "(and 1 more)" in str(info.value)
        with pytest.raises(ConfigError, match="more than once"):
            registry.add_devices(["new-1", "new-1"])
        with pytest.raises(ConfigError, match="invalid device ID"):
            registry.add_devices(["new-1", "bad/id"])
        assert [d.id for d in registry.all()] == ["old-1", "old-2"]  # nothing of the refused batches
        added = registry.add_devices(["new-2", "new-1"])
        assert [d.id for d in added] == ["new-2", "new-1"]
        assert all(registry.get(d.id).key == d.key and len(d.key) == 32 for d in added)
        assert len({d.key for d in added}) == 2
        # the hub can write presence right after: the import's transaction is closed
        registry.set_presence("new-1", True)
        assert [d.id for d in registry.devices(online_only=True)] == ["new-1"]
        assert [d.id for d in registry.devices(limit=2)] == ["new-1", "new-2"]
    finally:
        registry.close()


def test_output_lost_says_the_devices_are_registered(tmp_path):
    """Printing happens after the commit: if it fails, the one-line error says what exists."""
    import subprocess
    import sys

    from helpers import REPO
    data_dir = tmp_path / "hub"
    listing = tmp_path / "fleet.txt"
    listing.write_text("\n".join(f"lost-{n}" for n in range(5000)) + "\n")  # more than a pipe buffer
    proc = subprocess.Popen([sys.executable, "-m", "devstreams", "device", "import", str(listing),
                             "--data-dir", str(data_dir)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before anything is printed
    stderr = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(60) == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "the 5000 devices are registered, but printing their connection strings failed" in lines[0]
    assert "device show ID" in lines[0]
    assert len(registered(data_dir)) == 5000
