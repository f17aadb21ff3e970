"""Start the processes a benchmark needs and stop every one of them, whatever happens."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Processes:
    def __init__(self) -> None:
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> "Processes":
        signal.signal(signal.SIGTERM, self._on_term)
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()

    @staticmethod
    def _on_term(signum, frame):
        raise KeyboardInterrupt

    def add(self, proc: subprocess.Popen) -> subprocess.Popen:
        self._procs.append(proc)
        return proc

    def devstreams(self, *args: str, stdin=None) -> subprocess.Popen:
        return self.python("-m", "devstreams", *args, "--log-level", "warning", stdin=stdin)

    def python(self, *args: str, stdin=None) -> subprocess.Popen:
        return self.add(subprocess.Popen([sys.executable, *args], stdin=stdin, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True))

    def stop_all(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in self._procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()


def first_line(proc: subprocess.Popen, what: str) -> str:
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{what} exited: {proc.stderr.read()[-2000:]}")
    return line.strip()


def wait_file_json(path: Path, proc: subprocess.Popen, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"hub exited: {proc.stderr.read()[-2000:]}")
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            time.sleep(0.1)
    raise RuntimeError(f"{path} did not appear")
