"""Turn a results dict into the markdown table, the JSON file and the chart."""

import json
from pathlib import Path

TARGETS = {
    "throughput_vs_ssh": 0.25,     # devstreams bulk >= 0.25 x ssh -R
    "latency_vs_ssh": 3.0,         # devstreams p50 ping-pong <= 3 x ssh -R
    "setup_p50_ms": 30.0,
    "setup_p99_ms": 150.0,
    "streams_per_s": 100.0,
    "KiB_per_device": 64.0,
    "rss_after_bulk_vs_before": 1.2,   # issue 10: hub RSS after the bulk rows within 20 % of before
}


def verdicts(r: dict) -> dict:
    paths = r["paths"]
    ds, ssh = paths["devstreams"], paths["ssh -R"]
    throughput = ds["bulk"]["MBps"] / ssh["bulk"]["MBps"]
    latency = ds["pingpong"]["p50_ms"] / ssh["pingpong"]["p50_ms"]
    return {
        "throughput_vs_ssh": (throughput, throughput >= TARGETS["throughput_vs_ssh"]),
        "latency_vs_ssh": (latency, latency <= TARGETS["latency_vs_ssh"]),
        "setup_p50_ms": (r["setup"]["p50_ms"], r["setup"]["p50_ms"] <= TARGETS["setup_p50_ms"]),
        "setup_p99_ms": (r["setup"]["p99_ms"], r["setup"]["p99_ms"] <= TARGETS["setup_p99_ms"]),
        "streams_per_s": (r["rate"]["streams_per_s"], r["rate"]["streams_per_s"] >= TARGETS["streams_per_s"]),
        "KiB_per_device": (r["idle"]["hub_KiB_per_device"],
                           r["idle"]["hub_KiB_per_device"] <= TARGETS["KiB_per_device"]),
        **({"rss_after_bulk_vs_before": (
            r["memory_after_bulk"]["hub_rss_after_MiB"] / r["memory_after_bulk"]["hub_rss_before_MiB"],
            r["memory_after_bulk"]["hub_rss_after_MiB"] / r["memory_after_bulk"]["hub_rss_before_MiB"]
            <= TARGETS["rss_after_bulk_vs_before"])} if "memory_after_bulk" in r else {}),
        # The stunnel chain is an anchor for speed and CPU only: it does not keep a half-closed
        # connection open (the exchange shuts one direction down first), so it can cut the other.
        "all_intact": (intact := all(p["concurrent"]["intact"] == p["concurrent"]["connections"]
                                     for name, p in paths.items() if not name.startswith("stunnel")), intact),
    }


def markdown(r: dict) -> str:
    s = r["sizes"]
    out = [f"# devstreams benchmark, {r['date']}", "",
           f"{r['cores']} cores, {r['machine']}; everything on loopback in one run.", "",
           f"| path | bulk {s['bulk_bytes'] >> 20} MiB (MB/s) | ping-pong p50 (ms) | p99 (ms) | "
           f"{s['concurrent_connections']} conns x {s['concurrent_bytes'] >> 20} MiB both ways (MB/s) | intact |",
           "|---|---:|---:|---:|---:|---:|"]
    for name, p in r["paths"].items():
        c = p["concurrent"]
        out.append(f"| {name} | {p['bulk']['MBps']:.0f} | {p['pingpong']['p50_ms']:.3f} | "
                   f"{p['pingpong']['p99_ms']:.3f} | {c['aggregate_MBps']:.0f} | {c['intact']}/{c['connections']} |")
    if any(name.startswith("stunnel") and p["concurrent"]["intact"] < p["concurrent"]["connections"]
           for name, p in r["paths"].items()):
        out += ["", "stunnel does not keep a half-closed connection open, so in the both-ways exchange (each side "
                    "shuts its sending direction down when done) it can cut the other direction: it is an anchor "
                    "for speed and CPU, not for integrity, and its row does not count in `all_intact`."]
    idle = r["idle"]
    out += ["", "| devstreams only | value |", "|---|---:|",
            f"| stream setup p50 / p99 ({r['setup']['streams']} in a row) | "
            f"{r['setup']['p50_ms']:.1f} / {r['setup']['p99_ms']:.1f} ms |",
            f"| new streams per second ({r['rate']['seconds']:.0f} s, {r['rate']['workers']} workers) | "
            f"{r['rate']['streams_per_s']:.0f} ({r['rate']['failed']} failed) |",
            f"| hub memory per idle device ({idle['devices']} devices) | {idle['hub_KiB_per_device']:.1f} KiB |",
            f"| stream setup p50 with them connected | {idle['setup_with_idle_devices']['p50_ms']:.1f} ms |"]
    mem = r.get("memory_after_bulk")
    if mem:
        out.append(f"| hub RSS before the bulk rows / at their end / {mem['settle_seconds']:g} s later | "
                   f"{mem['hub_rss_before_MiB']:.0f} / {mem['hub_rss_end_of_load_MiB']:.0f} / "
                   f"{mem['hub_rss_after_MiB']:.0f} MiB |")
    out.append("")
    out += brokers(r)
    out += ["", "| target | measured | met |", "|---|---:|:---:|"]
    for name, (value, ok) in verdicts(r).items():
        limit = TARGETS.get(name, "")
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        out.append(f"| {name} {('(' + str(limit) + ')') if limit != '' else ''} | {shown} | {'yes' if ok else 'NO'} |")
    if "anchors" in r:
        from .anchors import markdown as anchors_markdown
        out += [""] + anchors_markdown(r["anchors"])
    if "fleet" in r:
        from .fleet import markdown as fleet_markdown
        out += [""] + fleet_markdown(r["fleet"])
    return "\n".join(out) + "\n"


def brokers(r: dict) -> list[str]:
    """The embedded hub next to the hub on Mosquitto: memory per idle device and stream setup."""
    idle, setup = r["idle"], r["setup"]
    out = [f"| {idle['devices']} idle devices | memory per device: broker | hub | broker + hub | "
           "stream setup p50 / p99 | setup p50 / p99 with the devices connected |",
           "|---|---:|---:|---:|---:|---:|"]

    def row(name: str, broker: float | None, idle: dict, setup: dict) -> str:
        hub = idle["hub_KiB_per_device"]
        both = hub + (broker or 0.0)
        with_idle = idle["setup_with_idle_devices"]
        return (f"| {name} | {'(in the hub)' if broker is None else f'{broker:.1f} KiB'} | {hub:.1f} KiB | "
                f"{both:.1f} KiB | {setup['p50_ms']:.1f} / {setup['p99_ms']:.1f} ms | "
                f"{with_idle['p50_ms']:.1f} / {with_idle['p99_ms']:.1f} ms |")
    out.append(row("devstreams (embedded broker)", None, idle, setup))
    single = r.get("single_port")
    if single is not None:
        s1 = single["setup"]
        out.append(f"| devstreams on one port (MQTT over WebSocket) | | | | {s1['p50_ms']:.1f} / {s1['p99_ms']:.1f} ms | |")
    mosq = r.get("mosquitto")
    if mosq is None:
        return out
    if "skipped" in mosq:
        out.append(f"| devstreams on Mosquitto | not measured: {mosq['skipped']} | | | | |")
    else:
        out.append(row("devstreams on Mosquitto", mosq["idle"]["broker_KiB_per_device"], mosq["idle"],
                       mosq["setup"]))
    out += ["", "On Mosquitto, devices and services log in to Mosquitto (C, with the devstreams plugin "
            "asking the hub's auth hook); the hub process runs only the controller, the hook and the gateway. "
            "Memory: RSS delta of each process with the idle devices connected."]
    return out


def chart(r: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(r["paths"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.bar(names, [r["paths"][n]["bulk"]["MBps"] for n in names], color=["#888", "#c63", "#693", "#369"][:len(names)])
    a.set_ylabel("MB/s (higher is better)")
    a.set_title("bulk throughput, one connection")
    b.bar(names, [r["paths"][n]["pingpong"]["p50_ms"] for n in names], color=["#888", "#c63", "#693", "#369"][:len(names)])
    b.set_ylabel("ms (lower is better)")
    b.set_title("64-byte ping-pong p50")
    fig.suptitle(f"devstreams vs ssh -R vs direct ({r['date']}, {r['cores']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write(r: dict, directory: Path, stem: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    files = [directory / f"{stem}.json", directory / f"{stem}.md"]
    files[0].write_text(json.dumps(r, indent=2) + "\n")
    files[1].write_text(markdown(r))
    if chart(r, directory / f"{stem}.png"):
        files.append(directory / f"{stem}.png")
    return files
