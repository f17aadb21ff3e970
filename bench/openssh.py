"""A throwaway OpenSSH server on loopback (the bench's bastion, the tests' device), ``ssh -R`` and ``ssh -L``."""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from .procs import stop_process

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
SSH = shutil.which("ssh")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15, proc: subprocess.Popen | None = None,
              log: Path | None = None) -> None:
    """Until something listens on ``port``; the error says why, with the end of ``log`` if given."""
    tail = (lambda: f": {log.read_text(errors='replace')[-2000:]}") if log is not None else (lambda: "")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}{tail()}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port} after {timeout} s{tail()}")


class Sshd:
    def __init__(self, directory: Path):
        if not (SSHD and SSH):
            raise RuntimeError("OpenSSH is missing: apt-get install openssh-server openssh-client")
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.host_key = directory / "host_ed25519"
        self.client_key = directory / "client_ed25519"
        for key in (self.host_key, self.client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        (directory / "authorized_keys").write_text((directory / "client_ed25519.pub").read_text())
        os.makedirs("/run/sshd", exist_ok=True)
        self.port = free_port()
        config = directory / "sshd_config"
        config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.host_key}",
            f"PidFile {directory}/sshd.pid", f"AuthorizedKeysFile {directory}/authorized_keys",
            "StrictModes no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes", "PermitRootLogin prohibit-password", "UsePAM no",
            "AllowTcpForwarding yes", "GatewayPorts no", "Subsystem sftp internal-sftp", "LogLevel ERROR",
            "MaxStartups 50:30:100", "MaxSessions 50", ""]))
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        wait_port(self.port, proc=self.proc)

    def ssh_options(self) -> list[str]:
        return ["-i", str(self.client_key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=20"]

    def reverse_tunnel(self, user: str, target_port: int) -> tuple[subprocess.Popen, int]:
        """``ssh -N -R``: the bastion's port forwards to target_port (the everyday alternative)."""
        return self._forward(user, "-R", target_port)

    def local_forward(self, user: str, bastion_port: int) -> tuple[subprocess.Popen, int]:
        """``ssh -N -L``: a local port (the operator's laptop) forwards through the bastion to its
        ``bastion_port`` (a ``-R`` port): how an operator reaches a device behind an ``ssh -R``
        bastion from elsewhere (``ssh -J`` carries the bytes the same way)."""
        return self._forward(user, "-L", bastion_port)

    def _forward(self, user: str, flag: str, to_port: int) -> tuple[subprocess.Popen, int]:
        """``ssh -N`` with one forward (``flag``: -R or -L) of a free loopback port to ``to_port``,
        once that port listens: (the ssh process, the port)."""
        port = free_port()
        proc = subprocess.Popen([SSH, *self.ssh_options(), "-N", "-o", "ExitOnForwardFailure=yes",
                                 flag, f"127.0.0.1:{port}:127.0.0.1:{to_port}", "-p", str(self.port),
                                 f"{user}@127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_port(port, proc=proc)
        return proc, port

    def stop(self) -> None:
        stop_process(self.proc)
