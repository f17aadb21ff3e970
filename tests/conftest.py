import fcntl
import time

import psutil
import pytest

from helpers import BACKENDS, HubThread


@pytest.fixture
def hub(request, tmp_path):
    """An embedded hub; ``@pytest.mark.parametrize("hub", [...], indirect=True)`` picks other layouts."""
    h = HubThread(tmp_path / "hub", backend=getattr(request, "param", "embedded")).start()
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture(params=BACKENDS)
def any_hub(request, tmp_path):
    """A hub on each broker backend: the embedded one, and a real Mosquitto with our plugin."""
    h = HubThread(tmp_path / "hub", backend=request.param)
    try:
        h.start()
        yield h
    finally:
        h.stop()


def pytest_configure(config):
    import logging
    config.addinivalue_line("markers", "cpu_heavy: loads the machine; never runs beside a timing test")
    config.addinivalue_line("markers", "timing: asserts how fast something happens")
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


# The suite runs in parallel (pytest-xdist). A test that loads both cores for minutes (marked
# ``cpu_heavy``) must not run beside a test that asserts how fast something happens (marked
# ``timing``): it takes an exclusive lock that timing tests share, across worker processes.
@pytest.fixture(autouse=True)
def _cpu_lock(request, tmp_path_factory):
    heavy = request.node.get_closest_marker("cpu_heavy") is not None
    timing = request.node.get_closest_marker("timing") is not None
    if not heavy and not timing:
        yield
        return
    root = tmp_path_factory.getbasetemp()
    shared = root.parent if root.name.startswith("popen-gw") else root
    with open(shared / "cpu.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if heavy else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
