"""The real OpenSSH server for tests (from bench.openssh), failing clearly when OpenSSH is missing."""

import os

import pytest

from bench import openssh
from bench.openssh import free_port  # noqa: F401  (re-exported for tests)


def require_openssh() -> None:
    if openssh.SSHD and openssh.SSH:
        return
    if os.environ.get("CI"):
        pytest.fail("OpenSSH is missing: .ci/run should have installed openssh-server and openssh-client")
    pytest.skip("OpenSSH (sshd, ssh) not installed: apt-get install openssh-server openssh-client")


class Sshd(openssh.Sshd):
    def __init__(self, directory):
        require_openssh()
        super().__init__(directory)
