"""The benchmark runs end to end (--quick): every path carries every byte intact. No speed is asserted."""

import json
import os
import shutil
import subprocess
import sys

import psutil
import pytest

from helpers import REPO, have_mosquitto


@pytest.mark.timeout(300)
def test_quick_benchmark_is_correct_and_cleans_up(tmp_path):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    result = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=290)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "quick.json").read_text())
    names = ["direct", "ssh -R"] + (["stunnel"] if shutil.which("stunnel4") or shutil.which("stunnel") else [])
    assert list(data["paths"]) == names + ["devstreams"]
    for name in names + ["devstreams"]:
        path = data["paths"][name]
        assert path["bulk"]["bytes"] == data["sizes"]["bulk_bytes"]
        assert path["concurrent"]["intact"] == path["concurrent"]["connections"], path["concurrent"]["errors"]
        assert path["pingpong"]["rounds"] == data["sizes"]["pingpong_rounds"]
    assert data["setup"]["streams"] == data["sizes"]["setup_streams"]
    # the single-port row: every stream set up with MQTT over WebSocket on the hub's one port
    assert data["single_port"]["setup"]["streams"] == data["sizes"]["setup_streams"]
    assert data["rate"]["failed"] == 0
    assert data["idle"]["devices"] == data["sizes"]["idle_devices"]
    markdown = (tmp_path / "quick.md").read_text()
    assert "| devstreams on one port (MQTT over WebSocket) |" in markdown
    mem = data["memory_after_bulk"]
    assert 0 < mem["hub_rss_before_MiB"] and 0 < mem["hub_rss_after_MiB"] and "hub RSS before the bulk rows" in markdown
    assert markdown.startswith("# devstreams benchmark")
    mosquitto = data["mosquitto"]
    if have_mosquitto():
        assert mosquitto["skipped"] and "not measured" in markdown
    else:  # the same figures with the hub on a real Mosquitto, side by side with the embedded hub
        assert mosquitto["idle"]["devices"] == data["sizes"]["idle_devices"]
        assert mosquitto["idle"]["broker_rss_after_MiB"] > 0 and "hub_KiB_per_device" in mosquitto["idle"]
        assert mosquitto["setup"]["streams"] == data["sizes"]["setup_streams"]
        assert mosquitto["idle"]["setup_with_idle_devices"]["streams"] > 0
        assert "| devstreams on Mosquitto |" in markdown
    # the fleet stages (tiny in --quick) and the restart, on each backend that runs here
    fleet = data["fleet"]
    backends = ["embedded"] + ([] if have_mosquitto() else ["mosquitto"])
    if have_mosquitto():
        assert fleet["mosquitto"]["skipped"]
    for backend in backends:
        stages = fleet[backend]["stages"]
        assert [s["devices"] for s in stages] == fleet["sizes"]["stages"]
        for stage in stages:
            assert stage["connect_rate"] > 0 and stage["hub_rss_MiB"] > 0 and stage["hub_idle_cpu_percent"] >= 0
            assert stage["hub_cpu_ms_per_connect"] > 0 and 0 < stage["machine_busy_percent"] <= 100
            assert stage["setup"]["streams"] == fleet["sizes"]["setup_samples"]
        restart = fleet[backend]["restart"]
        # every device reconnected by itself and the registry shows each online again
        assert restart["back_online_seconds"] is not None, restart
        assert restart["connected_at_end"] == restart["registry_online_at_end"] == stages[-1]["devices"]
    assert "## Fleet (issue 10)" in markdown and "back online <= 60 s after a restart" in markdown
    # issue 14's anchor rows on the same processes (their details: test_anchors_quick_*)
    assert set(data["anchors"]["paths"]) >= {"direct", "ssh -R", "devstreams"}
    assert "## Anchors (issue 14)" in markdown
    leftovers = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not leftovers, f"the benchmark left processes behind: {leftovers}"


def test_fleet_targets_are_judged_on_the_last_stage_and_the_restart():
    from bench import fleet

    def stage(devices, rate, kib, p50, p99):
        return {"devices": devices, "added": devices, "connect_seconds": devices / rate, "connect_rate": rate,
                "KiB_per_device": kib, "hub_KiB_per_device": kib, "hub_rss_MiB": 100.0,
                "hub_idle_cpu_percent": 1.0, "setup": {"p50_ms": p50, "p99_ms": p99, "streams": 10}}
    restart = {"devices": 10000, "hub_up_seconds": 1.0, "back_online_seconds": None, "timeout_s": 300.0,
               "connected_at_end": 9000, "registry_online_at_end": 8000, "refused_during": 5, "errors_during": 0}
    backend = {"stages": [stage(1000, 400.0, 90.0, 50.0, 500.0), stage(10000, 310.0, 39.0, 19.0, 99.0)],
               "restart": restart}
    v = fleet.verdicts(backend)
    assert v["connect_rate_ratio"] == (310.0 / 400.0, True)
    assert v["connect_rate_per_s"] == (310.0, True)
    assert v["KiB_per_device"] == (39.0, True) and v["setup_p50_ms"][1] and v["setup_p99_ms"][1]
    assert v["back_online_s"] == (None, False)  # not all back within the timeout: missed
    backend["stages"][-1] = stage(10000, 250.0, 41.0, 21.0, 101.0)
    restart["back_online_seconds"] = 61.0
    assert not any(ok for _, ok in fleet.verdicts(backend).values())
    text = "\n".join(fleet.markdown({"embedded": backend, "mosquitto": {"skipped": "no Mosquitto"}}))
    assert "| 10,000 back online <= 60 s after a restart | 61.00 | missed |" in text
    assert "not measured: no Mosquitto" in text


@pytest.mark.timeout(120)
def test_streams_stage_quick_echoes_every_message_and_refuses_beyond_capacity(tmp_path):
    """``python -m bench --streams --quick``: 20 streams through the built-in gateway, each echoing
    1 message/s, all intact; requests beyond max_concurrent_streams never reach a device."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    result = subprocess.run([sys.executable, "-m", "bench", "--streams", "--quick", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads((tmp_path / "streams-quick.json").read_text())["streams"]
    n = r["sizes"]["streams"]
    assert r["hub_toml"] == {"max_concurrent_streams": n}
    assert r["open"]["opened"] == n and r["open"]["failed"] == 0 and r["open"]["setup"]["p50_ms"] > 0
    steady = r["steady"]
    assert steady["streams"] == n and steady["failed_streams"] == 0
    assert steady["to_device"] >= n and steady["to_service"] >= n and steady["hub_cpu_seconds"] >= 0
    # the load generator's CPU, by side (it shares the hub's cores)
    assert steady["devices_cpu_seconds"] >= 0 and steady["services_cpu_seconds"] >= 0 and steady["deferred_sends"] >= 0
    assert steady["sim_cpu_seconds"] == pytest.approx(steady["devices_cpu_seconds"] + steady["services_cpu_seconds"])
    close = r["close"]
    assert close["streams"] == close["intact"] == close["device_ended_clean"] == n, close
    assert close["device_ended_abnormal"] == 0 and close["hub_log_mismatches"] == 0
    assert close["messages_each_way"] >= steady["to_device"]
    beyond = r["beyond"]
    assert beyond["refused"] == beyond["requests"] > 0 and beyond["reached_devices"] == 0
    assert all(kind.startswith("LimitExceededError") for kind in beyond["outcomes"]), beyond["outcomes"]
    assert r["all_intact"] and r["beyond_ok"]
    markdown = (tmp_path / "streams-quick.md").read_text()
    # judged at 5,000 only; whether 20 echoes kept pace depends on the machine's load, not asserted
    assert "| 5,000 concurrent streams open and echoing, all intact | 20 / 20 intact, echoes " in markdown
    assert "| beyond capacity: refused before reaching a device | 10 / 10 refused, 0 reached | met |" in markdown
    assert "in the steady window (simulated devices " in markdown
    leftovers = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not leftovers, f"the benchmark left processes behind: {leftovers}"


def test_simulated_streams_compare_every_echoed_byte():
    """The service side's check: each message is unique per stream and position."""
    from bench.simstreams import MESSAGE_BYTES, parse_publish, payload
    assert len(payload(7, 3)) == MESSAGE_BYTES
    assert payload(7, 3) != payload(7, 4) and payload(7, 3) != payload(8, 3)
    # a QoS 1 PUBLISH: topic, packet id, payload
    body = b"\x00\x03a/b" + b"\x00\x09" + b"hello"
    assert parse_publish(0x32, body) == ("a/b", b"hello", 9)
    assert parse_publish(0x30, b"\x00\x03a/b" + b"hello") == ("a/b", b"hello", None)


def _need(tool: str, package: str) -> None:
    """Skip without ``tool`` on a developer's machine; in CI ($CI set) its absence is a failure."""
    if shutil.which(tool):
        return
    if os.environ.get("CI"):
        pytest.fail(f"{tool} is missing in CI: apt-get install {package}")
    pytest.skip(f"{tool} is not installed (apt-get install {package})")


@pytest.mark.timeout(180)
def test_anchors_quick_measure_every_path_with_iperf3_and_cpu_per_gb(tmp_path):
    """``python -m bench --anchors --quick``: iperf3 1 and 8 streams, bulk, ping-pong through direct,
    ssh -R, the stunnel chain and devstreams; CPU-s per GB of each path's relay processes; the table
    rows and issue 14's ratios to ssh -R."""
    _need("iperf3", "iperf3")
    if not (shutil.which("stunnel4") or shutil.which("stunnel")):
        _need("stunnel4", "stunnel4")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    result = subprocess.run([sys.executable, "-m", "bench", "--anchors", "--quick", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stderr[-3000:]
    a = json.loads((tmp_path / "anchors-quick.json").read_text())["anchors"]
    assert list(a["paths"]) == ["direct", "ssh -R", "ssh -L + -R", "stunnel", "devstreams"] and not a["skipped"]
    for name, p in a["paths"].items():
        assert p["iperf3_1"]["MBps"] > 0 and p["iperf3_8"]["MBps"] > 0, name
        assert p["bulk_MBps"] > 0 and p["pingpong_p50_ms"] > 0, name
    expected = {"ssh -R": {"sshd", "ssh"}, "ssh -L + -R": {"ssh -L", "sshd", "ssh -R"},
                "stunnel": {"stunnel A", "stunnel B", "stunnel C"}, "devstreams": {"proxy", "hub", "agent"}}
    for name, members in expected.items():
        cpu = a["paths"][name]["cpu_s_per_GB"]
        assert set(cpu) == members | {"total"}, cpu
        # every relay process of the path worked for the bytes it moved (a wrong pid would read 0)
        assert all(cpu[m] > 0 for m in members), (name, cpu)
        assert abs(cpu["total"] - sum(cpu[m] for m in members)) < 1e-6
        trip = a["paths"][name]["cpu_us_per_round_trip"]   # each relay process works on every round trip
        assert set(trip) == members | {"total"} and all(trip[m] > 0 for m in members), (name, trip)
    assert "cpu_s_per_GB" not in a["paths"]["direct"]
    assert a["negotiated"]["gateway (proxy -> hub, agent -> hub)"]["cipher"] == "TLS_AES_128_GCM_SHA256"
    for hop in a["negotiated"].values():  # both devstreams listeners, through devstreams' own client context
        assert hop["version"] in ("TLSv1.3", "TLSv1.2") and hop["cipher"]
    # the stunnel chain really is two TLS hops (each hop's client end logged the suite it negotiated)
    assert set(a["negotiated_stunnel"]) == {"hop 1 (A -> B)", "hop 2 (B -> C)"}
    assert all(suites and all(x.startswith("TLSv1.") for x in suites) for suites in a["negotiated_stunnel"].values())
    markdown = (tmp_path / "anchors-quick.md").read_text()
    assert "| path | 1 stream MB/s | 8 streams MB/s | bulk MB/s | ping-pong p50 | CPU-s per GB" in markdown
    for row in ("| direct |", "| ssh -R |", "| OpenSSH from elsewhere: ssh -L into the -R port, 2 SSH hops |",
                "| stunnel chain, 2 TLS hops (C) |", "| devstreams |", "| ping-pong p50 |",
                "| iperf3 1 stream, devstreams / ssh -R (>= 1.0x) |", "| iperf3 8 streams, devstreams / ssh -R (>= 1.0x) |",
                "| ping-pong p50, devstreams / ssh -R (<= 2x) |", "| CPU-s per GB, devstreams / ssh -R (<= 1.2x) |"):
        assert row in markdown, row
    leftovers = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not leftovers, f"the benchmark left processes behind: {leftovers}"


def test_anchor_verdicts_are_ratios_to_ssh():
    from bench import anchors

    def path(one, eight, p50, cpu):
        return {"iperf3_1": {"MBps": one}, "iperf3_8": {"MBps": eight}, "bulk_MBps": one,
                "pingpong_p50_ms": p50, "cpu_s_per_GB": {"x": cpu, "total": cpu},
                "cpu_us_per_round_trip": {"x": 100.0, "total": 100.0}}
    a = {"sizes": anchors.ANCHORS_QUICK.__dict__, "skipped": [],
         "paths": {"ssh -R": path(300.0, 260.0, 0.1, 4.0), "devstreams": path(300.0, 250.0, 0.2, 4.9)}}
    v = anchors.verdicts(a)
    assert v["bulk_1_vs_ssh"] == (1.0, True) and v["bulk_8_vs_ssh"][1] is False
    assert v["pingpong_vs_ssh"] == (pytest.approx(2.0), True)
    assert v["cpu_per_GB_vs_ssh"][1] is False and v["cpu_per_GB_vs_ssh"][0] == pytest.approx(4.9 / 4.0)
    del a["paths"]["devstreams"]["iperf3_8"]  # iperf3 missing for a path: that row says so, no verdict
    text = "\n".join(anchors.markdown(a))
    assert "not measured" in text and "bulk_8" not in anchors.verdicts(a)


def test_anchor_paths_are_measured_in_rounds_and_ratios_kept_per_round(monkeypatch):
    """Each round measures every path once (so compared paths share the load of the moment); a
    path's numbers are medians over rounds; the per-round ratios are kept beside them."""
    from types import SimpleNamespace

    from bench import anchors
    calls = []
    values = {"ssh -R": [(300.0, 0.10, 5.0), (100.0, 0.30, 9.0), (310.0, 0.11, 5.2)],
              "devstreams": [(330.0, 0.19, 5.5), (90.0, 0.70, 9.9), (320.0, 0.20, 6.0)]}

    def fake_round(name, port, iperf_port, group, sizes, log):
        n = sum(1 for c in calls if c == name)
        calls.append(name)
        mbps, p50, cpu = values.get(name, [(1.0, 1.0, 1.0)] * 3)[n]
        out = {"bulk_MBps": mbps, "pingpong_p50_ms": p50,
               "iperf3_1": {"MBps": mbps, "retries": 0}, "iperf3_8": {"MBps": mbps, "retries": 0}}
        if group is not None:
            out["cpu_s_per_GB"] = {"total": cpu}
            out["cpu_us_per_round_trip"] = {"total": 100 * p50}
        return out
    monkeypatch.setattr(anchors, "measure_round", fake_round)
    monkeypatch.setattr(anchors, "negotiated", lambda rig, log: {})
    monkeypatch.setattr(anchors, "CpuGroup", lambda pids: object())
    rig = SimpleNamespace(anchor_ports={"direct": 1, "ssh -R": 2, "devstreams": 3}, iperf_ports={},
                          relays={"ssh -R": {"sshd": [1]}, "devstreams": {"hub": [2]}})
    a = anchors.run_paths(rig, anchors.AnchorSizes(1.0, 3, 1, 1), log=lambda *_: None)
    assert calls == ["direct", "ssh -R", "devstreams"] * 3
    assert a["paths"]["devstreams"]["pingpong_p50_ms"] == 0.20 and a["paths"]["ssh -R"]["bulk_MBps"] == 300.0
    assert a["ratios_by_round"]["pingpong_vs_ssh"] == pytest.approx([1.9, 0.7 / 0.3, 0.2 / 0.11])
    assert a["ratios_by_round"]["cpu_per_GB_vs_ssh"] == pytest.approx([1.1, 1.1, 6.0 / 5.2])
    assert "| 1.90 / 2.33 / 1.82 |" in "\n".join(anchors.markdown(a))


def test_cpu_group_counts_a_process_and_its_children():
    """A relay that forks (sshd): a child's CPU time counts while it runs and after it was reaped."""
    from bench.anchors import CpuGroup
    code = ("import subprocess, sys\n"
            "input()\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time\\nt = time.process_time()\\n'\n"
            "    'while time.process_time() - t < 0.3: pass\\nimport sys\\nsys.stdin.read()'], stdin=subprocess.PIPE)\n"
            "print(child.pid, flush=True)\n"
            "input()\n"
            "child.communicate(b'')\n"
            "print('reaped', flush=True)\n"
            "sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        group = CpuGroup({"relay": [proc.pid]})
        before = group.snapshot()["relay"]
        proc.stdin.write("\n")
        proc.stdin.flush()
        child = psutil.Process(int(proc.stdout.readline()))
        import time
        deadline = time.monotonic() + 30
        while sum(child.cpu_times()[:2]) < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        live = group.snapshot()["relay"]
        assert live - before >= 0.25  # the live child's seconds, read from the child itself
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "reaped"
        # gone from the tree now: its seconds come from the parent's children_* times
        assert group.snapshot()["relay"] - before >= 0.25
        assert not psutil.Process(proc.pid).children()
    finally:
        proc.stdin.close()
        proc.wait(10)


@pytest.mark.timeout(120)
def test_tls_cipher_measurement_quick(tmp_path):
    """``python -m bench --tls --quick``: each cipher pinned, bytes through memory BIOs and loopback
    sockets, the suite devstreams negotiates today, AES-NI read from the CPU flags."""
    result = subprocess.run([sys.executable, "-m", "bench", "--tls", "--quick", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads((tmp_path / "tls-quick.json").read_text())
    assert r["negotiated"]["version"] == "TLSv1.3" and r["negotiated"]["cipher"].startswith("TLS_")
    expected = {"AES-128-GCM": "AES128-GCM", "AES-256-GCM": "AES256-GCM", "ChaCha20-Poly1305": "CHACHA20"}
    assert set(r["ciphers"]) == set(expected)
    for name, row in r["ciphers"].items():
        for kind in ("memory_bio", "socket"):  # the pinned cipher is the one that carried the bytes
            assert expected[name] in row[kind]["cipher"] and row[kind]["MBps"] > 0, (name, kind, row[kind])
        assert row["memory_bio"]["cpu_s_per_GB"] > 0
        if shutil.which("openssl"):
            assert row["openssl_speed_MBps"] > 0
    assert r["aes_ni"] in (True, False)
    markdown = (tmp_path / "tls-quick.md").read_text()
    for name in expected:
        assert f"| {name} | " in markdown
    assert "devstreams' contexts negotiate today: **TLSv1.3 TLS_" in markdown


@pytest.mark.timeout(120)
def test_anchors_without_iperf3_or_stunnel_skip_those_rows_with_one_line(tmp_path):
    """On a machine without iperf3 and stunnel (simulated) the anchors still run: one line each says
    what to install, the iperf3 cells read "not measured", the stunnel row is absent."""
    code = ("import sys; import bench.anchors as a; a.IPERF3 = a.STUNNEL = None\n"
            "from bench.__main__ import main\n"
            f"sys.exit(main(['--anchors', '--quick', '--out', {str(tmp_path)!r}]))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("iperf3 is not installed (apt-get install iperf3): iperf3 rows skipped") == 1
    assert result.stderr.count("stunnel is not installed (apt-get install stunnel4)") == 1
    a = json.loads((tmp_path / "anchors-quick.json").read_text())["anchors"]
    assert list(a["paths"]) == ["direct", "ssh -R", "ssh -L + -R", "devstreams"]
    assert all("iperf3_1" not in p and p["bulk_MBps"] > 0 for p in a["paths"].values())
    markdown = (tmp_path / "anchors-quick.md").read_text()
    assert "| devstreams | not measured | not measured |" in markdown and "| stunnel chain" not in markdown
    assert "| ping-pong p50, devstreams / ssh -R (<= 2x) |" in markdown
