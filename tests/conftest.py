import pytest

from helpers import HubThread


@pytest.fixture
def hub(tmp_path):
    h = HubThread(tmp_path / "hub").start()
    try:
        yield h
    finally:
        h.stop()
