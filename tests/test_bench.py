"""The benchmark runs end to end (--quick): every path carries every byte intact. No speed is asserted."""

import json
import subprocess
import sys

import psutil
import pytest

from helpers import REPO, have_mosquitto


@pytest.mark.timeout(180)
def test_quick_benchmark_is_correct_and_cleans_up(tmp_path):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    result = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "quick.json").read_text())
    for name in ("direct", "ssh -R", "devstreams"):
        path = data["paths"][name]
        assert path["bulk"]["bytes"] == data["sizes"]["bulk_bytes"]
        assert path["concurrent"]["intact"] == path["concurrent"]["connections"], path["concurrent"]["errors"]
        assert path["pingpong"]["rounds"] == data["sizes"]["pingpong_rounds"]
    assert data["setup"]["streams"] == data["sizes"]["setup_streams"]
    assert data["rate"]["failed"] == 0
    assert data["idle"]["devices"] == data["sizes"]["idle_devices"]
    markdown = (tmp_path / "quick.md").read_text()
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
    leftovers = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not leftovers, f"the benchmark left processes behind: {leftovers}"
