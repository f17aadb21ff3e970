"""The dashboard in a real browser (issue 13): Debian's chromium, headless, driven by Selenium through
Debian's chromium-driver (/usr/bin/chromedriver, given explicitly: Selenium Manager never runs and
nothing is downloaded).  The hub's self-signed certificate is accepted with --ignore-certificate-errors
(the page is still HTTPS, so the Secure cookie is set as in real use).

Logs in through the URL `devstreams hub dashboard-url` prints, sees the online device, sees a stream a
client opens appear without a reload, closes it from the page (accepting the confirm dialog) and checks
that the client's stream ended; a screenshot is saved.  Without the login token the page is refused.
"""

import os
import shutil
import subprocess
import sys
import time

import pytest

from devprocs import agent, service_flags
from helpers import REPO, HubThread, cli

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver;"
                " .ci/run installs them)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.selenium_manager import SeleniumManager  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture
def browser(tmp_path, monkeypatch):
    def no_downloads(*args, **kwargs):
        raise AssertionError("Selenium Manager must not run: the driver is Debian's chromium-driver")
    monkeypatch.setattr(SeleniumManager, "binary_paths", no_downloads)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--ignore-certificate-errors", "--no-proxy-server", "--window-size=1280,1000",
                 "--no-first-run", "--disable-extensions", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")),
                              options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def device_ids(browser) -> list[str]:
    """The device list's ids, read in one go (the list is re-rendered while the page polls)."""
    return browser.execute_script(
        "return Array.from(document.querySelectorAll('#devices tbody tr')).map(tr => tr.dataset.device);")


def dashboard_url(hub) -> str:
    result = cli("hub", "dashboard-url", "--data-dir", str(hub.data_dir))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.timeout(60)
def test_dashboard_in_chromium_login_live_stream_close_and_refusal(tmp_path, browser):
    hub = HubThread(tmp_path / "hub", dashboard_refresh=0.3, dashboard_chart_interval=0.5).start()
    client = None
    try:
        wait = WebDriverWait(browser, 15, ignored_exceptions=(StaleElementReferenceException,))
        root = hub.hub.endpoints["dashboard"]
        # without the login token: refused, and told how to log in
        browser.get(root)
        assert "devstreams hub dashboard-url" in browser.find_element(By.TAG_NAME, "body").text
        assert not browser.find_elements(By.ID, "streams")
        with agent(hub, tmp_path, "cam-7", "--echo"):
            url = dashboard_url(hub)
            browser.get(url)
            wait.until(EC.presence_of_element_located((By.ID, "streams")))
            assert browser.current_url == root      # redirected to the dashboard, token gone from the bar
            # the device list is re-rendered as the page polls: read it through the wait (stale is retried)
            wait.until(lambda d: "online" in d.find_element(By.CSS_SELECTOR, 'tr[data-device="cam-7"]').text)
            browser.execute_script("window.notReloaded = true;")
            # a client opens a stream: it appears without a reload
            client = subprocess.Popen([sys.executable, "-m", "devstreams", "connect", *service_flags(hub),
                                       "--device", "cam-7", "--stream", "echo"], cwd=REPO,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            client.stdin.write(b"ping\n")
            client.stdin.flush()
            assert client.stdout.readline() == b"ping\n"     # the stream is open and echoes
            stream_row = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#streams tbody tr")))
            assert "cam-7" in stream_row.text and "echo" in stream_row.text
            assert browser.execute_script("return window.notReloaded === true;")
            wait.until(lambda d: "5 B" in d.find_element(By.CSS_SELECTOR, "#streams tbody tr").text)  # live bytes
            shot = tmp_path / "dashboard.png"
            browser.save_screenshot(str(shot))
            print(f"\nscreenshot: {shot}")
            assert shot.stat().st_size > 1000
            # close it from the page: the confirm dialog, accepted
            browser.find_element(By.CSS_SELECTOR, "#streams tbody tr button.close").click()
            alert = wait.until(EC.alert_is_present())
            assert "cam-7" in alert.text
            alert.accept()
            # the client's stream ends (connect exits with the reason), and the row goes away
            started = time.monotonic()
            client.wait(timeout=15)          # stdin stays open: only the close can end it
            err = client.stderr.read()
            print(f"client ended {time.monotonic() - started:.2f} s after the click: {err.decode().strip()}")
            assert client.returncode != 0 and b"closed by an operator" in err, err
            client.stdin.close()
            client.stdout.close()
            client.stderr.close()
            client = None
            wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#streams tbody tr"))
            assert browser.execute_script("return window.notReloaded === true;")
            # the activity list shows the closed stream, filterable by device
            wait.until(lambda d: "closed by an operator" in d.find_element(By.ID, "activity").text)
            # a used login link does not log a second browser in. Leave the page first: its
            # polling, logged out by the deleted cookie, reloads itself (to the login page), and
            # that reload could replace the navigation to the used link.
            browser.get("about:blank")
            browser.delete_all_cookies()
            browser.get(url)
            assert "not valid" in browser.find_element(By.TAG_NAME, "body").text
            assert not browser.find_elements(By.ID, "streams")
    finally:
        if client is not None:
            client.kill()
            client.wait(10)
        hub.stop()


@pytest.mark.timeout(60)
def test_dashboard_in_chromium_with_two_thousand_devices(tmp_path, browser):
    """A fleet of 2,000: the page is one page of devices (its HTML under a bound), the pager and the
    filter box work in the browser."""
    hub = HubThread(tmp_path / "hub", dashboard_refresh=0.3).start()
    try:
        registry = hub.registry()
        registry.add_devices([f"unit-{n:05d}" for n in range(2000)])
        registry.close()
        wait = WebDriverWait(browser, 15, ignored_exceptions=(StaleElementReferenceException,))
        started = time.monotonic()
        browser.get(dashboard_url(hub))
        wait.until(EC.presence_of_element_located((By.ID, "devices")))
        print(f"\n2,000 devices: dashboard loaded in {time.monotonic() - started:.2f} s, "
              f"{len(browser.page_source)} characters")
        assert len(browser.page_source) < 64 * 1024
        assert "page 1 of 40 (2000 devices)" in browser.find_element(By.ID, "page-info").text
        assert len(browser.find_elements(By.CSS_SELECTOR, "#devices tbody tr")) == 50
        browser.find_element(By.ID, "next").click()
        wait.until(lambda d: "page 2 of 40" in d.find_element(By.ID, "page-info").text)
        assert device_ids(browser)[0] == "unit-00050"
        browser.find_element(By.ID, "device-filter").send_keys("unit-0199")
        wait.until(lambda d: "(10 devices)" in d.find_element(By.ID, "page-info").text)
        assert device_ids(browser) == [f"unit-{n:05d}" for n in range(1990, 2000)]
    finally:
        hub.stop()
