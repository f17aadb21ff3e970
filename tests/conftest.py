import time

import psutil
import pytest

from helpers import HubThread


@pytest.fixture
def hub(tmp_path):
    h = HubThread(tmp_path / "hub").start()
    try:
        yield h
    finally:
        h.stop()


def pytest_configure(config):
    import logging
    for noisy in ("transitions", "amqtt", "websockets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@pytest.fixture(autouse=True)
def no_leaked_processes():
    """Every process a test starts is stopped by it: a leaking suite is a failing suite."""
    yield
    deadline = time.monotonic() + 10
    while (children := psutil.Process().children(recursive=True)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not children, f"processes left behind: {[(c.pid, c.cmdline()) for c in children]}"
