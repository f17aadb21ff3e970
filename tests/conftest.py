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
