"""The benchmark runs end to end (--quick): every path carries every byte intact. No speed is asserted."""

import json
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
    for name in ("direct", "ssh -R", "devstreams"):
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
