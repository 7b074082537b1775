"""The admin page in a real browser: headless Chromium (Debian's chromium and
chromium-driver, which .ci/run installs) driven by Selenium, against the real
server started as `scim_appliance.py serve`.

One admin's first session, as the issue walks it: first-run setup with the
code the server printed, generate a token, read it from the page, use it for
a SCIM request that succeeds, see that request in the activity log, revoke
the token, see the next SCIM request refused. Screenshots of the token page
and the activity log are kept in tests/artifacts/ (or $SCIM_TEST_ARTIFACTS).
"""

import os
import re
import tempfile

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from conftest import LiveServer, ROOT
from scim_appliance import URN_USER

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = os.environ.get("SCIM_TEST_ARTIFACTS") or os.path.join(ROOT, "tests", "artifacts")
PASSWORD = "correct horse battery staple"


@pytest.fixture
def browser(tmp_path):
    assert os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER), (
        "the browser test needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # This machine's network is closed: no background connections, no updates.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                 "--user-data-dir=%s" % tempfile.mkdtemp(dir=str(tmp_path))):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def screenshot(driver, name):
    os.makedirs(ARTIFACTS, exist_ok=True)
    path = os.path.join(ARTIFACTS, name)
    assert driver.save_screenshot(path)
    assert os.path.getsize(path) > 10000
    return path


def submit(driver, form_selector, **fields):
    """Fill a form's fields by name and press its submit button, as a person would."""
    form = driver.find_element(By.CSS_SELECTOR, form_selector)
    for name, value in fields.items():
        field = form.find_element(By.NAME, name)
        field.clear()
        field.send_keys(value)
    click_and_wait(driver, form.find_element(By.CSS_SELECTOR, "button[type=submit]"))


def click_and_wait(driver, element):
    """Click something that loads a new page, and wait until that page is
    complete (so no later lookup finds an element of the old one).

    The old page is marked on its window object, which the next document
    replaces. (Waiting for an element of the old page to go stale raced with
    chromedriver: checking it while it left the document could fail with
    "Node with given id does not belong to the document".) While the browser
    is between pages a script can fail; it is tried again.
    """
    driver.execute_script("window.scimOldPage = true")
    element.click()
    WebDriverWait(driver, 20, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script("return !window.scimOldPage && document.readyState === 'complete'"))


def policy_violations(driver):
    """Console messages about the Content-Security-Policy (none expected)."""
    return [entry["message"] for entry in driver.get_log("browser") if "Content Security Policy" in entry["message"]]


def test_first_session_setup_token_activity_revocation(tmp_path, browser):
    server = LiveServer(str(tmp_path / "browser.db"))
    try:
        code = re.search(r"Admin setup code: (\S+)", server.banner).group(1)
        admin = "http://127.0.0.1:%d" % server.admin_port
        driver = browser

        # First visit: sent to the setup form, which wants the printed code.
        driver.get(admin + "/")
        assert driver.current_url == admin + "/setup"
        submit(driver, "form[action='/setup']", code="WRONG-CODE-0000", password=PASSWORD, confirm=PASSWORD)
        assert "not the setup code" in driver.find_element(By.CSS_SELECTOR, ".message").text
        submit(driver, "form[action='/setup']", code=code.lower(), password=PASSWORD, confirm=PASSWORD)
        assert driver.current_url == admin + "/"
        assert driver.find_element(By.ID, "tenant-url").text == server.url
        cookie = driver.get_cookie("scim_admin_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

        # Generate a token and read it off the page, where it is shown once.
        click_and_wait(driver, driver.find_element(By.LINK_TEXT, "Tokens"))
        assert driver.current_url == admin + "/tokens"
        submit(driver, "form[action='/tokens']", name="entra")
        token = driver.find_element(By.ID, "new-token").text
        assert token.startswith("scimapp_") and len(token) > 40
        assert driver.find_element(By.ID, "tenant-url").text == server.url
        # The copy button puts the token on the clipboard.
        driver.execute_cdp_cmd("Browser.grantPermissions", {
            "origin": admin, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
        driver.find_element(By.CSS_SELECTOR, "button[data-copy='new-token']").click()
        WebDriverWait(driver, 10).until(lambda d: d.find_element(
            By.CSS_SELECTOR, "button[data-copy='new-token']").text == "Copied")
        copied = driver.execute_async_script(
            "navigator.clipboard.readText().then(arguments[0], function (e) { arguments[0]('ERROR ' + e); });")
        assert copied == token
        screenshot(driver, "admin-tokens.png")

        # The token works for Entra's first request.
        status, _, created = server.request("POST", "/Users", {
            "schemas": [URN_USER], "userName": "browser.test@contoso.example", "active": True}, token=token)
        assert status == 201

        # ... and the activity log shows it.
        driver.get(admin + "/activity")
        rows = driver.find_elements(By.CSS_SELECTOR, "#activity tbody tr")
        assert any("browser.test@contoso.example" in row.text and "POST" in row.text and "201" in row.text
                   and "entra" in row.text and "created" in row.text for row in rows), [r.text for r in rows]
        submit(driver, "form[action='/activity']", q="browser.test")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#activity tbody tr")) == 1
        screenshot(driver, "admin-activity.png")

        # Once shown, the token is never shown again.
        driver.get(admin + "/tokens")
        assert token not in driver.page_source
        assert driver.find_elements(By.ID, "new-token") == []

        # Revoke it: the next SCIM request is refused.
        row = next(r for r in driver.find_elements(By.CSS_SELECTOR, "#tokens tbody tr")
                   if r.find_element(By.CSS_SELECTOR, "td").text == "entra")
        click_and_wait(driver, row.find_element(By.CSS_SELECTOR, "form[action='/tokens/revoke'] button"))
        assert "Revoked" in driver.find_element(By.CSS_SELECTOR, ".message").text
        assert "revoked" in driver.find_element(By.CSS_SELECTOR, "#tokens tbody").text
        status, _, error = server.request("GET", "/Users/" + created["id"], token=token)
        assert status == 401 and error["status"] == "401"

        # The refusal is in the log too, and the page never broke its own policy.
        driver.get(admin + "/activity?status=failed")
        assert "401" in driver.find_element(By.ID, "activity").text
        assert policy_violations(driver) == []

        # Log out: the protected pages send the browser back to the login form.
        submit(driver, "form[action='/logout']")
        driver.get(admin + "/tokens")
        assert driver.current_url == admin + "/login"
    finally:
        output = server.stop()
    assert token not in output   # the token is shown on the page only, never logged
