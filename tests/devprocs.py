"""Real ``devstreams`` processes for tests: started with logs in files, stopped without fail."""

import contextlib
import os
import select
import subprocess
import sys

from bench.procs import stop_process
from helpers import REPO, run, wait_for


SETTINGS_ENV = ("DEVSTREAMS_CONNECTION_STRING", "DEVSTREAMS_DEVICE_CONNECTION_STRING", "DEVSTREAMS_CA_FILE",
                "DEVSTREAMS_CONFIG")


def clean_env(extra: dict | None = None) -> dict:
    """os.environ without the settings a developer may have exported, plus extra."""
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS_ENV}
    return {**env, **(extra or {})}


class Devstreams:
    """A ``python -m devstreams …`` process; stderr (its log) goes to a file, stdout to a pipe."""

    def __init__(self, log_path, *args, env=None):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "devstreams", *args], cwd=REPO,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log,
                                     env=clean_env(env))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def first_line(self, timeout: float = 30) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().decode() if ready else ""
        assert line, f"no output from {self.proc.args[3]} after {timeout} s; log:\n{self.log()}"
        return line

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc.stdout.close()
        self._log.close()


def wait_online(hub, device_id, proc: Devstreams) -> None:
    try:
        run(wait_for(lambda: device_id in hub.hub.controller.online_devices, timeout=20,
                     what=f"agent {device_id} online"), timeout=25)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; agent log:\n{proc.log()}") from None


@contextlib.contextmanager
def agent(hub, tmp_path, device_id, *args, env=None):
    """``devstreams agent`` for a new device; args are its flags after the connection string."""
    proc = Devstreams(tmp_path / f"agent-{device_id}.log", "agent", "--connection-string",
                      hub.add_device(device_id), "--ca-file", hub.ca_file, *args, env=env)
    try:
        wait_online(hub, device_id, proc)
        yield proc
    finally:
        proc.stop()


@contextlib.contextmanager
def proxy(hub, tmp_path, device_id, stream):
    """``devstreams proxy`` on 127.0.0.1, port chosen by the OS; yields (port, process)."""
    proc = Devstreams(tmp_path / f"proxy-{device_id}-{stream}.log", "proxy", "--connection-string",
                      hub.service_cs(), "--ca-file", hub.ca_file, "--device", device_id, "--stream", stream,
                      "--bind", "127.0.0.1", "--port", "0")
    try:
        line = proc.first_line()
        assert line.startswith("proxy listening on 127.0.0.1:"), line
        port = int(line.split("127.0.0.1:", 1)[1].split()[0])
        assert port > 0 and f"device {device_id}" in line and f"stream {stream}" in line, line
        yield port, proc
    finally:
        proc.stop()


def connect(*args, env=None, input=b"", timeout=30) -> subprocess.CompletedProcess:
    """``devstreams connect`` with stdin from input; stdout as bytes, stderr as text."""
    result = subprocess.run([sys.executable, "-m", "devstreams", "connect", *args], cwd=REPO,
                            input=input, capture_output=True, timeout=timeout, env=clean_env(env))
    result.stderr = result.stderr.decode(errors="replace")
    return result


def service_flags(hub) -> list[str]:
    return ["--connection-string", hub.service_cs(), "--ca-file", hub.ca_file]


def service_env(hub) -> dict:
    return {"DEVSTREAMS_CONNECTION_STRING": hub.service_cs(), "DEVSTREAMS_CA_FILE": hub.ca_file}


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and stderr.endswith("\n"), f"expected one line on stderr, got:\n{stderr}"
    return lines[0]


def hub_up(log_path, data_dir) -> Devstreams:
    """``devstreams hub up`` on loopback, ports picked by the OS (it may refuse to start: not waited for)."""
    return Devstreams(log_path, "hub", "up", "--data-dir", str(data_dir), "--bind", "127.0.0.1",
                      "--mqtt-port", "0", "--gateway-port", "0")


class HubProcess:
    """``devstreams hub up`` as its own process (so a test can kill -9 it), up when constructed."""

    def __init__(self, data_dir, log_path, toml: str = ""):
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        if toml:
            (data_dir / "hub.toml").write_text(toml)
        self.proc = hub_up(log_path, data_dir)
        try:
            line = self.proc.first_line()
            assert "hub is up" in line, f"hub did not start: {line}\n{self.proc.log()}"
        except BaseException:
            self.proc.stop()
            raise
        self.ca_file = str(data_dir / "tls" / "ca.pem")

    def cli(self, *args) -> str:
        result = run_cli(*args, "--data-dir", str(self.data_dir))
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def service_cs(self) -> str:
        return self.cli("hub", "connection-string")

    def add_device(self, device_id: str) -> str:
        return self.cli("device", "add", device_id)

    def online(self, device_id: str) -> bool:
        from broker.registry import open_registry
        registry = open_registry(self.data_dir)
        try:
            device = registry.get(device_id)
            return bool(device and device.online)
        finally:
            registry.close()

    def stop(self) -> None:
        self.proc.stop()


def run_cli(*args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "devstreams", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=clean_env())
