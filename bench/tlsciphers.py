"""TLS record ciphers on this CPU with the TLS stack devstreams uses (issue 14).

devstreams runs TLS through Python's ``ssl`` (asyncio: an ``SSLObject`` between two ``MemoryBIO``s;
OpenSSL underneath).  Measured here, for AES-128-GCM, AES-256-GCM and ChaCha20-Poly1305:

- ``memory_bio``: bytes written into one ``SSLObject`` and read out of its peer, BIOs shuttled by
  hand in one thread: the pure cost of encrypting + decrypting, as asyncio pays it (MB/s and CPU
  seconds per GB, both ends together);
- ``socket``: the same through two ``SSLSocket``s over a loopback TCP connection, a sender thread
  and a receiver thread (what a relay hop costs with the kernel in the way);
- ``openssl speed -evp`` (encryption only, 16 KiB blocks, one core) when the binary exists.

Python's ``ssl`` cannot choose TLS 1.3 suites (there is no ``set_ciphersuites``), so each cipher is
pinned in TLS 1.2 (``ECDHE-ECDSA-...``: the hub's certificate is ECDSA); the record cipher is the
same AEAD as in the TLS 1.3 suite of the same name.  ``negotiated``: which suite devstreams' own
contexts (broker/pki.server_context, devstreams/transport/tls.client_context) agree on today.
"""

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

CIPHERS = {  # name -> the TLS 1.2 cipher string that pins it
    "AES-128-GCM": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "AES-256-GCM": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ChaCha20-Poly1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
}
OPENSSL_EVP = {"AES-128-GCM": "aes-128-gcm", "AES-256-GCM": "aes-256-gcm", "ChaCha20-Poly1305": "chacha20-poly1305"}
CHUNK = 64 * 1024


@dataclass(frozen=True)
class TlsSizes:
    bytes_per_run: int
    repeats: int
    openssl_seconds: int


TLS_FULL = TlsSizes(256 << 20, 3, 3)
TLS_QUICK = TlsSizes(16 << 20, 1, 1)


def aes_ni() -> bool | None:
    """Whether the CPU advertises AES-NI (the ``aes`` flag), None if /proc/cpuinfo is unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = re.search(r"^flags\s*:(.*)$", text, re.M)
    return None if flags is None else "aes" in flags.group(1).split()


def contexts(tls_dir: Path, cipher: str | None) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """devstreams' server and client contexts; with ``cipher`` pinned to that TLS 1.2 suite."""
    from broker import pki
    from devstreams.transport.tls import client_context
    files = pki.ensure_tls(tls_dir)
    server, client = pki.server_context(files), client_context(files.ca_cert)
    if cipher is not None:
        for ctx in (server, client):
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_ciphers(cipher)
    return server, client


def _pump(src: ssl.MemoryBIO, dst: ssl.MemoryBIO) -> None:
    data = src.read()
    if data:
        dst.write(data)


def memory_bio(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, total: int) -> dict:
    """Client encrypts ``total`` bytes, server decrypts them; one thread, no sockets."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {client: False, server: False}
    while not all(done.values()):
        for obj in (client, server):
            if not done[obj]:
                try:
                    obj.do_handshake()
                    done[obj] = True
                except ssl.SSLWantReadError:
                    pass
        _pump(c_out, s_in)
        _pump(s_out, c_in)
    cipher = client.cipher()
    block = memoryview(os.urandom(CHUNK))
    sent = received = 0
    cpu, start = time.process_time(), time.perf_counter()
    while sent < total:
        sent += client.write(block)
        _pump(c_out, s_in)
        while True:
            try:
                received += len(server.read(CHUNK))
            except ssl.SSLWantReadError:
                break
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if received != sent:
        raise RuntimeError(f"TLS over memory BIOs: {received} of {sent} bytes arrived")
    return {"cipher": cipher[0], "version": cipher[1], "MBps": sent / seconds / 1e6,
            "cpu_s_per_GB": cpu / (sent / 1e9)}


def over_socket(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, total: int) -> dict:
    """``total`` bytes through two SSLSockets on loopback TCP; timed at the receiver."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    outcome: dict = {}

    def receive() -> None:
        try:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                buf = memoryview(bytearray(256 * 1024))
                got, start = 0, None
                while True:
                    n = tls.recv_into(buf)
                    if not n:
                        break
                    start = start or time.perf_counter()
                    got += n
                outcome.update(bytes=got, seconds=time.perf_counter() - start)
        except (OSError, ssl.SSLError) as exc:
            outcome["error"] = repr(exc)
    t = threading.Thread(target=receive)
    t.start()
    block = memoryview(os.urandom(CHUNK))
    cpu = time.process_time()
    try:
        with client_ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost") as tls:
            cipher = tls.cipher()
            sent = 0
            while sent < total:
                tls.sendall(block)
                sent += len(block)
            tls.shutdown(socket.SHUT_WR)
        t.join(120)
    finally:
        listener.close()
    cpu = time.process_time() - cpu
    if "error" in outcome or outcome.get("bytes") != sent:
        raise RuntimeError(f"TLS over loopback: {outcome}")
    return {"cipher": cipher[0], "version": cipher[1], "MBps": sent / outcome["seconds"] / 1e6,
            "cpu_s_per_GB": cpu / (sent / 1e9)}


def openssl_speed(evp: str, seconds: int) -> float | None:
    """``openssl speed -evp`` in MB/s for 16 KiB blocks (encryption only, one core); None without openssl."""
    binary = shutil.which("openssl")
    if not binary:
        return None
    result = subprocess.run([binary, "speed", "-mr", "-seconds", str(seconds), "-bytes", "16384", "-evp", evp],
                            capture_output=True, text=True, timeout=seconds * 5 + 30)
    for line in result.stdout.splitlines():
        if line.startswith("+F:"):  # +F:<n>:<name>:<bytes per second>
            return float(line.rsplit(":", 1)[1]) / 1e6
    return None


def probe(host: str, port: int, ca_file: str) -> dict:
    """The suite a devstreams client context negotiates with a running hub on ``port``."""
    from devstreams.transport.tls import client_context
    with socket.create_connection((host, port), 10) as raw:
        with client_context(ca_file).wrap_socket(raw, server_hostname="localhost") as tls:
            name, version, bits = tls.cipher()
    return {"cipher": name, "version": version, "bits": bits}


def run(sizes: TlsSizes, log=print) -> dict:
    import platform
    out: dict = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(),
                 "machine": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
                 "openssl": ssl.OPENSSL_VERSION, "aes_ni": aes_ni(), "sizes": sizes.__dict__,
                 "load_average_before": os.getloadavg(), "ciphers": {}}
    try:
        cpu_model = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
        out["cpu"] = cpu_model.group(1) if cpu_model else platform.processor()
    except OSError:
        out["cpu"] = platform.processor()
    with tempfile.TemporaryDirectory(prefix="devstreams-tls-") as tmp:
        server, client = contexts(Path(tmp), None)
        bio = memory_bio(server, client, 1 << 20)  # the defaults: what a devstreams connection gets
        out["negotiated"] = {"cipher": bio["cipher"], "version": bio["version"]}
        log(f"[tls] devstreams' contexts negotiate {bio['version']} {bio['cipher']}; AES-NI: {out['aes_ni']}")
        for name, spec in CIPHERS.items():
            server, client = contexts(Path(tmp), spec)
            row: dict = {}
            for kind, fn in (("memory_bio", memory_bio), ("socket", over_socket)):
                runs = [fn(server, client, sizes.bytes_per_run) for _ in range(sizes.repeats)]
                best = sorted(runs, key=lambda r: r["MBps"])[len(runs) // 2]  # the median run
                row[kind] = best | {"MBps_runs": [r["MBps"] for r in runs]}
            row["openssl_speed_MBps"] = openssl_speed(OPENSSL_EVP[name], sizes.openssl_seconds)
            out["ciphers"][name] = row
            log(f"[tls] {name}: {row['memory_bio']['MBps']:.0f} MB/s memory BIO, "
                f"{row['socket']['MBps']:.0f} MB/s loopback, openssl speed {row['openssl_speed_MBps'] or 0:.0f} MB/s")
    out["load_average_after"] = os.getloadavg()
    return out


def markdown(r: dict) -> list[str]:
    s = r["sizes"]
    load = " / ".join(f"{x:.1f}" for x in r["load_average_before"])
    load += "; after " + " / ".join(f"{x:.1f}" for x in r["load_average_after"])
    out = [f"# TLS ciphers on this CPU, {r['date']}", "",
           f"{r['cpu']} ({r['cores']} cores), AES-NI: {'yes' if r['aes_ni'] else 'no'}; {r['openssl']}; "
           f"{r['machine']}; load average before {load}.", "",
           f"devstreams' contexts negotiate today: **{r['negotiated']['version']} {r['negotiated']['cipher']}**.", "",
           f"{s['bytes_per_run'] >> 20} MiB per run, median of {s['repeats']}; each cipher pinned in TLS 1.2. "
           "Memory BIO: encrypt + decrypt in one thread (asyncio's path, CPU of both ends); loopback: two "
           "SSLSockets over TCP; openssl speed: encryption only, 16 KiB blocks.", "",
           "| cipher | memory BIO MB/s | CPU-s per GB (encrypt + decrypt) | loopback TLS MB/s | openssl speed MB/s |",
           "|---|---:|---:|---:|---:|"]
    for name, row in r["ciphers"].items():
        speed = row["openssl_speed_MBps"]
        out.append(f"| {name} | {row['memory_bio']['MBps']:.0f} | {row['memory_bio']['cpu_s_per_GB']:.2f} | "
                   f"{row['socket']['MBps']:.0f} | {'-' if speed is None else f'{speed:.0f}'} |")
    return out


def write(r: dict, directory: Path, stem: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    files = [directory / f"{stem}.json", directory / f"{stem}.md"]
    files[0].write_text(json.dumps(r, indent=2) + "\n")
    files[1].write_text("\n".join(markdown(r)) + "\n")
    return files
