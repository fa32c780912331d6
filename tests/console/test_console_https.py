"""The web console over the NS's HTTPS, as deployed (the roles serve it over TLS by default): a
real browser logs in to a TLS LocalFleet (the NS's certificate from the fleet's private CA, which
Chromium is told to accept for that key alone) and gets its Secure session cookie back."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.console.chromium import chromium, page_replaced, trusting
from tests.console.conftest import running_fleet
from tickle.testing.localfleet import AgentSpec, LocalFleet

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    root = tmp_path_factory.mktemp("console-tls-fleet")
    with running_fleet(root, [AgentSpec("tls-a", ["ts1"])], 252, tls=True) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def driver(fleet: LocalFleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    cert, _ = fleet.certs["ns"]
    with chromium(tmp_path_factory.mktemp("chromium-tls"), trusting(cert)) as driver:
        yield driver


def test_login_over_https_keeps_a_secure_session(driver: WebDriver, fleet: LocalFleet) -> None:
    assert fleet.ns_url.startswith("https://")
    driver.get(fleet.ns_url + "/console/")
    assert driver.current_url == fleet.ns_url + "/console/login"
    driver.find_element(By.ID, "token").send_keys(fleet.admin_token)
    page = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(By.CSS_SELECTOR, "main form button").click()
    WebDriverWait(driver, 20).until(page_replaced(page), message="the page after login")
    assert driver.current_url == fleet.ns_url + "/console/fleet"
    cookie = driver.get_cookie("tickle_session")
    assert cookie is not None
    assert (cookie["secure"], cookie["httpOnly"], cookie["sameSite"]) == (True, True, "Strict")
    rows = driver.find_elements(By.CSS_SELECTOR, "#computers tbody tr td a")
    assert [r.text for r in rows] == ["tls-a"]
    assert [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")] == []
