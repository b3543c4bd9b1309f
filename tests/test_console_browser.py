"""The web console in a real browser: Debian's Chromium, headless, driven
by Selenium through chromium-driver, against a real daemon with emulated
Windows devices checking in over mutual TLS.  One daemon and one browser
for the module; each page visited is saved as a screenshot under the test
run's temporary folder (``screenshots/``), to look at."""

from __future__ import annotations

import base64
import os
import shutil
import time
from collections.abc import Callable, Iterator

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from harness import Daemon, running_daemon
from mdmd import pki
from mdmd.sim.device import ManagementClient, WindowsDevice
from omadm_helpers import Enrolled, enroll, run_session

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CAMERA = "./Device/Vendor/MSFT/Policy/Config/Camera/AllowCamera"
# Bounded polling for what the daemon does in its own time.
PATIENCE = 20.0


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    # Fleet counts read at every page view (shown on the next), so that the
    # test sees compliance move without waiting.
    with running_daemon(tmp_path_factory.mktemp("console"), {"admin": {"metrics_cache_seconds": "0"}}) as d:
        yield d


@pytest.fixture(scope="module")
def devices(
    daemon: Daemon, tmp_path_factory: pytest.TempPathFactory
) -> list[tuple[Enrolled, ManagementClient]]:
    folder = tmp_path_factory.mktemp("devices")
    enrolled = []
    for hostname in ("FRONTDESK-0417", "LAB-PC-0022", "LAB-PC-0023"):
        device = enroll(daemon, WindowsDevice(key=pki.generate_rsa_key(), hostname=hostname), folder)
        client = ManagementClient(device.device)
        run_session(daemon, device, client)
        enrolled.append((device, client))
    return enrolled


@pytest.fixture(scope="module")
def alice(daemon: Daemon) -> str:
    """A named token: what the console does shows under alice."""
    status, body = daemon.admin("POST", "/api/v1/tokens", {"name": "alice"})
    assert status == 201 and isinstance(body, dict)
    return str(body["token"])


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.fail(
            "the browser tests need Debian's chromium and chromium-driver (.ci/run installs them: "
            "apt-get install chromium chromium-driver)",
            pytrace=False,
        )
    # Selenium must neither look for a driver on the network nor report
    # usage (it is given the driver; these make sure).
    os.environ.setdefault("SE_AVOID_STATS", "true")
    os.environ.setdefault("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-default-apps",
        "--no-first-run",
        "--no-default-browser-check",
        "--metrics-recording-only",
        # Nothing but loopback resolves: the browser cannot reach the network.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--proxy-server=direct://",
        "--window-size=1366,900",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Callable[[WebDriver, str], None]:
    folder = tmp_path_factory.mktemp("screenshots")

    def take(driver: WebDriver, name: str) -> None:
        # The whole page, however long (up to 4000 px), in one image.
        width, height = driver.execute_script(
            "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
        )
        shot = driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": min(height, 4000), "scale": 1},
            },
        )
        (folder / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))

    return take


def url(daemon: Daemon, path: str) -> str:
    return f"http://127.0.0.1:{daemon.port('admin')}{path}"


def check_labels(driver: WebDriver) -> None:
    """Every control a person fills in has a label tied to it."""
    for control in driver.find_elements(By.CSS_SELECTOR, "input, select, textarea"):
        if control.get_attribute("type") in ("hidden", "submit"):
            continue
        control_id = control.get_attribute("id")
        assert control_id, control.get_attribute("outerHTML")
        assert driver.find_elements(By.CSS_SELECTOR, f'label[for="{control_id}"]'), control_id


def sign_in(driver: WebDriver, daemon: Daemon, token: str, path: str = "/ui/fleet") -> None:
    driver.get(url(daemon, path))
    assert "/ui/signin" in driver.current_url
    check_labels(driver)
    field = driver.find_element(By.ID, "token")
    field.send_keys(token)
    go(driver, field, submit=True)
    assert driver.current_url == url(daemon, path)


def go(driver: WebDriver, element: WebElement, *, submit: bool = False) -> None:
    """Click (or submit the form of) *element* and wait for the next page."""
    page = driver.find_element(By.TAG_NAME, "html")
    if submit:
        element.submit()
    else:
        element.click()
    WebDriverWait(driver, PATIENCE).until(lambda _: _left(page))


def _left(page: WebElement) -> bool:
    """*page* (the old page's root element) is no longer in the document.
    Selenium's staleness_of knows only StaleElementReferenceException;
    Chromium sometimes answers for an element of a page it is replacing
    with an inspector error that says the same ("Node with given id does
    not belong to the document")."""
    try:
        page.is_enabled()
    except StaleElementReferenceException:
        return True
    except WebDriverException as e:
        if "does not belong to the document" in str(e):
            return True
        raise
    return False


def until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not check():
        assert time.monotonic() < deadline, f"not within {PATIENCE} s: {what}"
        time.sleep(0.2)


def test_find_a_device_restart_it_and_see_the_result(
    daemon: Daemon,
    devices: list[tuple[Enrolled, ManagementClient]],
    alice: str,
    browser: WebDriver,
    shots: Callable[[WebDriver, str], None],
) -> None:
    target, client = devices[1]
    sign_in(browser, daemon, alice)
    assert browser.find_element(By.TAG_NAME, "h1").text == "Fleet"
    shots(browser, "fleet")
    go(browser, browser.find_element(By.LINK_TEXT, "Devices"))
    check_labels(browser)
    search = browser.find_element(By.ID, "q")
    search.send_keys("lab-pc-0022")
    go(browser, search, submit=True)
    rows = browser.find_elements(By.CSS_SELECTOR, "table.list tbody tr")
    assert len(rows) == 1 and target.id in rows[0].text
    shots(browser, "devices")
    go(browser, rows[0].find_element(By.TAG_NAME, "a"))
    assert target.id in browser.find_element(By.CSS_SELECTOR, "p.meta").text
    check_labels(browser)
    shots(browser, "device")
    go(browser, browser.find_element(By.XPATH, "//button[normalize-space()='Restart…']"))
    assert browser.find_element(By.TAG_NAME, "h1").text == "Confirm: Restart"
    shots(browser, "confirm-restart")
    go(browser, browser.find_element(By.XPATH, "//button[normalize-space()='Confirm restart']"))
    assert "Action queued" in browser.find_element(By.CSS_SELECTOR, ".notice").text
    actions = browser.find_element(By.XPATH, "//caption[text()='Recent actions']/..")
    assert "Restart" in actions.text and "pending" in actions.text
    # The device checks in and carries it out; the page shows its answer.
    run_session(daemon, target, client)
    browser.refresh()
    actions = browser.find_element(By.XPATH, "//caption[text()='Recent actions']/..")
    assert "acknowledged" in actions.text and "200" in actions.text
    commands = browser.find_element(By.ID, "h-commands").find_element(By.XPATH, "..")
    assert "Exec" in commands.text and "200" in commands.text
    shots(browser, "device-after-restart")
    go(browser, browser.find_element(By.LINK_TEXT, "Show the message log"))
    messages = browser.find_elements(By.CSS_SELECTOR, "details.message")
    assert messages, "no message logged"
    for message in messages:
        message.find_element(By.TAG_NAME, "summary").click()
    # mdmd's Exec of RebootNow, indented, and the device's 200 for it.
    text = browser.find_element(By.TAG_NAME, "main").text
    assert "<LocURI>./Device/Vendor/MSFT/Reboot/RebootNow</LocURI>" in text
    assert "<Cmd>Exec</Cmd>" in text
    shots(browser, "message-log")


def test_a_profile_with_a_mistake_then_fixed_assigned_and_compliant(
    daemon: Daemon,
    devices: list[tuple[Enrolled, ManagementClient]],
    alice: str,
    browser: WebDriver,
    shots: Callable[[WebDriver, str], None],
) -> None:
    browser.get(url(daemon, "/ui/profiles"))
    if "/ui/signin" in browser.current_url:
        sign_in(browser, daemon, alice, "/ui/profiles")
    go(browser, browser.find_element(By.LINK_TEXT, "New profile"))
    check_labels(browser)
    browser.find_element(By.ID, "name").send_keys("no-camera")
    wrong = (
        f"<Replace><Item><Target><LocURI>{CAMERA}</LocURI></Target>"
        '<Meta><Format xmlns="syncml:metinf">integer</Format></Meta><Data>0</Data></Item></Replace>'
    )
    browser.find_element(By.ID, "syncml").send_keys(wrong)
    go(browser, browser.find_element(By.XPATH, "//button[text()='Create']"))
    error = browser.find_element(By.ID, "syncml-error")
    assert "format" in error.text.lower()
    assert browser.find_element(By.ID, "syncml").get_attribute("aria-invalid") == "true"
    assert browser.find_element(By.ID, "name").get_attribute("value") == "no-camera"
    shots(browser, "profile-error")
    field = browser.find_element(By.ID, "syncml")
    field.clear()
    field.send_keys(wrong.replace(">integer<", ">int<"))
    go(browser, browser.find_element(By.XPATH, "//button[text()='Create']"))
    assert browser.find_element(By.TAG_NAME, "h1").text == "Profile no-camera"
    browser.find_element(By.XPATH, "//label[starts-with(normalize-space(), 'all')]").click()
    go(browser, browser.find_element(By.XPATH, "//button[text()='Save assignment']"))
    assert "Assignment saved" in browser.find_element(By.CSS_SELECTOR, ".notice").text
    # Every device checks in, gets the profile and has it read back.
    for enrolled, client in devices:
        run_session(daemon, enrolled, client)
        assert client.nodes[CAMERA] == ("int", "0")

    def compliant() -> bool:
        browser.refresh()
        return "100%" in browser.find_element(By.ID, "h-compliance").find_element(By.XPATH, "..").text

    until(compliant, "the profile shows 100% compliance")
    shots(browser, "profile")
    go(browser, browser.find_element(By.LINK_TEXT, "Fleet"))
    until(
        lambda: "100%" in browser.find_element(By.ID, "h-compliance").find_element(By.XPATH, "..").text,
        "fleet",
    )
    shots(browser, "fleet-compliant")
    go(browser, browser.find_element(By.LINK_TEXT, "Profiles"))
    assert "100%" in browser.find_element(By.TAG_NAME, "main").text
    shots(browser, "profiles")


def test_groups_operations_and_the_audit_log_then_sign_out_closes_every_page(
    daemon: Daemon,
    devices: list[tuple[Enrolled, ManagementClient]],
    alice: str,
    browser: WebDriver,
    shots: Callable[[WebDriver, str], None],
) -> None:
    browser.get(url(daemon, "/ui/groups"))
    if "/ui/signin" in browser.current_url:
        sign_in(browser, daemon, alice, "/ui/groups")
    check_labels(browser)
    browser.find_element(By.ID, "name").send_keys("lab")
    go(browser, browser.find_element(By.XPATH, "//button[text()='Create']"))
    assert browser.find_element(By.TAG_NAME, "h1").text == "Group lab"
    browser.find_element(By.ID, "add").send_keys(f"{devices[1][0].id} {devices[2][0].id}")
    go(browser, browser.find_element(By.XPATH, "//button[text()='Change members']"))
    assert "Members changed" in browser.find_element(By.CSS_SELECTOR, ".notice").text
    assert devices[2][0].id in browser.find_element(By.TAG_NAME, "main").text
    shots(browser, "group")
    status, body = daemon.admin("POST", "/api/v1/groups/lab/actions", {"action": "defender_scan"})
    assert status == 202, body
    go(browser, browser.find_element(By.LINK_TEXT, "Operations"))
    assert "Defender scan" in browser.find_element(By.TAG_NAME, "main").text
    shots(browser, "operations")
    go(browser, browser.find_element(By.LINK_TEXT, "Audit log"))
    audit = browser.find_element(By.TAG_NAME, "main").text
    for action in ("console.signin", "action.restart", "profile.create", "profile.assign", "group.members"):
        assert f"alice {action}" in audit, action
    check_labels(browser)
    shots(browser, "audit")
    pages = [
        "/ui/fleet",
        "/ui/devices",
        f"/ui/devices/{devices[0][0].id}",
        f"/ui/devices/{devices[0][0].id}/messages",
        "/ui/profiles",
        "/ui/profiles/no-camera",
        "/ui/groups",
        "/ui/groups/lab",
        "/ui/operations",
        "/ui/audit",
    ]
    go(browser, browser.find_element(By.XPATH, "//button[text()='Sign out']"))
    assert "/ui/signin" in browser.current_url
    assert "You are signed out" in browser.find_element(By.TAG_NAME, "main").text
    shots(browser, "signed-out")
    assert browser.get_cookie("mdmd_session") is None
    for path in pages:
        browser.get(url(daemon, path))
        assert "/ui/signin" in browser.current_url, path
        shown = browser.find_element(By.TAG_NAME, "body").text
        assert all(d.id not in shown for d, _ in devices) and "no-camera" not in shown, path
    # The select of a sign-in page is labelled too (there is none): the
    # device list's state filter, once signed in again, works by keyboard.
    sign_in(browser, daemon, alice, "/ui/devices")
    Select(browser.find_element(By.ID, "state")).select_by_visible_text("enrolled")
    go(browser, browser.find_element(By.ID, "q"), submit=True)
    assert "state=enrolled" in browser.current_url
