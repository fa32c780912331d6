"""The web console in a real browser (Debian's Chromium through Selenium) against a real LocalFleet
of an NS, a task server and four agents: log in, the fleet, define a task and run it now on the four
agents watching the grid fill live, an execution's waterfall, a settings change, the runs and audit
pages, refusals without a session or with a wrong CSRF token, keyboard and narrow-window use, and
no error in the browser's log. Each page's screenshot goes to build/screenshots/.

One fleet and one browser for the module; the tests run in order, each from where the previous left.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.console.chromium import chromium, page_replaced
from tests.console.conftest import running_fleet
from tickle.messages import TIMELINE_STEPS
from tickle.testing.localfleet import AgentSpec, LocalFleet

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
AGENTS = ["web-a", "web-b", "web-c", "web-d"]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "build" / "screenshots"
# a task that runs long enough for the run page to be shown before it finishes
SLOW = "sh -c 'sleep 1.5; hostname'"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    agents = [AgentSpec(name, ["ts1"], groups=["web"]) for name in AGENTS]
    with running_fleet(tmp_path_factory.mktemp("console-fleet"), agents, 251) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def driver(fleet: LocalFleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as driver:
        yield driver


@pytest.fixture(autouse=True)
def no_browser_errors(driver: WebDriver) -> Iterator[None]:
    """Every test ends with nothing worse than information in the browser's log."""
    driver.get_log("browser")  # what an earlier test left was checked by it
    yield
    assert problems(driver) == []


def problems(driver: WebDriver) -> list[dict[str, Any]]:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def go(driver: WebDriver, fleet: LocalFleet, path: str) -> None:
    driver.get(fleet.ns_url + path)


def shot(driver: WebDriver, name: str) -> None:
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def until(driver: WebDriver, what: str, check: Any, within: float = 20) -> Any:
    return WebDriverWait(driver, within, poll_frequency=0.05).until(check, message=what)


def submit(driver: WebDriver, form_id: str) -> None:
    navigate(driver, driver.find_element(By.CSS_SELECTOR, f"#{form_id} button[type=submit]"))


def navigate(driver: WebDriver, element: Any) -> None:
    """Click `element` and wait until the next page replaced this one."""
    page = driver.find_element(By.TAG_NAME, "html")
    element.click()
    until(driver, "the next page", page_replaced(page))


def test_login_refuses_a_wrong_token_then_lets_the_admin_in(
    driver: WebDriver, fleet: LocalFleet
) -> None:
    go(driver, fleet, "/")
    assert driver.current_url == fleet.ns_url + "/console/login"  # no session: the login page
    shot(driver, "login")
    driver.find_element(By.ID, "token").send_keys("not-the-admin-token")
    navigate(driver, driver.find_element(By.CSS_SELECTOR, "main form button"))
    assert driver.find_element(By.CSS_SELECTOR, ".error").text == "unknown token"
    refused = problems(driver)  # the refusal's 401, and nothing else
    assert [(e["source"], e["message"].split(" - ")[0]) for e in refused] == [
        ("network", fleet.ns_url + "/console/login")
    ]
    assert "status of 401" in refused[0]["message"]
    assert [c["name"] for c in driver.get_cookies()] == ["tickle_login_csrf"]

    driver.find_element(By.ID, "token").send_keys(fleet.admin_token)
    navigate(driver, driver.find_element(By.CSS_SELECTOR, "main form button"))
    assert driver.current_url == fleet.ns_url + "/console/fleet"
    cookie = driver.get_cookie("tickle_session")
    assert cookie is not None
    assert (cookie["httpOnly"], cookie["secure"], cookie["sameSite"]) == (True, True, "Strict")
    assert driver.find_element(By.CSS_SELECTOR, ".who").text == "admin"


def test_fleet_shows_the_task_server_and_the_four_computers_with_counts(
    driver: WebDriver, fleet: LocalFleet
) -> None:
    rows = driver.find_elements(By.CSS_SELECTOR, "#computers tbody tr")
    assert sorted(r.find_element(By.CSS_SELECTOR, "td a").text for r in rows) == AGENTS
    ts = driver.find_element(By.CSS_SELECTOR, "#task-servers tbody tr").text
    assert ts.startswith("ts1 ")
    counts = {s: int(driver.find_element(By.ID, f"count-{s}").text) for s in
              ("reachable", "unreachable", "cem", "clock_skewed", "unknown", "nat")}  # fmt: skip
    assert sum(counts.values()) - counts["nat"] == 4
    assert driver.find_element(By.ID, "count-online").text == "4"
    versions = {r.find_elements(By.TAG_NAME, "td")[5].text
                for r in driver.find_elements(By.CSS_SELECTOR, "#computers tbody tr")}  # fmt: skip
    assert versions <= {"v1", "not reported"}, versions
    live = driver.find_element(By.ID, "fleet-counts")  # kept up to date by its event stream
    until(
        driver, "the counts' stream", lambda d: int(live.get_attribute("data-messages") or 0) >= 1
    )
    assert driver.find_element(By.ID, "count-all").text == "4"
    shot(driver, "fleet")
    Select(driver.find_element(By.NAME, "group")).select_by_visible_text("web")
    navigate(driver, driver.find_element(By.CSS_SELECTOR, "form.filters button"))
    assert len(driver.find_elements(By.CSS_SELECTOR, "#computers tbody tr a")) == 4
    navigate(driver, driver.find_element(By.LINK_TEXT, "web-a"))
    assert driver.find_element(By.TAG_NAME, "h1").text == "Computer web-a"
    assert driver.find_element(By.CSS_SELECTOR, "#history tbody tr").text == "No execution yet."
    shot(driver, "computer")


def test_run_now_on_four_agents_fills_the_grid_live_to_succeeded(
    driver: WebDriver, fleet: LocalFleet
) -> None:
    go(driver, fleet, "/console/run-now")
    driver.find_element(By.NAME, "command").send_keys(SLOW)
    driver.find_element(By.ID, "all").click()
    shot(driver, "run-now")
    submit(driver, "run-now")
    assert "/console/runs/" in driver.current_url
    driver.execute_script("window.sameDocument = true")  # gone if the page reloads
    first = [r.get_attribute("data-status") for r in rows(driver)]
    assert len(first) == 4
    assert "succeeded" not in first  # the page came before the task could finish

    until(driver, "the grid to fill to succeeded",
          lambda d: [r.get_attribute("data-status") for r in rows(d)] == ["succeeded"] * 4)  # fmt: skip
    assert driver.execute_script("return window.sameDocument") is True
    grid = driver.find_element(By.ID, "grid")
    until(driver, "the stream to end", lambda d: grid.get_attribute("data-done") == "true")
    assert driver.find_element(By.ID, "live").text == "finished"
    # each row has all nine steps filled, in ms after run-now
    for row in rows(driver):
        filled = [
            c.get_attribute("data-step") for c in row.find_elements(By.CSS_SELECTOR, "td.done")
        ]
        assert filled == list(TIMELINE_STEPS)
        assert row.find_element(By.CSS_SELECTOR, "td.via").text == "tickle"
    # batched: a message per tick carrying every row that changed, not one per status event
    messages = int(grid.get_attribute("data-messages") or 0)
    assert 1 <= messages < 4 * 6
    shot(driver, "run")


def rows(driver: WebDriver) -> list[Any]:
    return driver.find_elements(By.CSS_SELECTOR, "#grid tbody tr")


def test_an_execution_shows_its_waterfall_and_output(driver: WebDriver, fleet: LocalFleet) -> None:
    navigate(driver, rows(driver)[0].find_element(By.CSS_SELECTOR, "th a"))
    assert driver.find_element(By.TAG_NAME, "h1").text.startswith("Execution ")
    hops = driver.find_elements(By.CSS_SELECTOR, "#waterfall rect.hop")
    assert len(hops) == len(TIMELINE_STEPS)
    widths = [float(h.get_attribute("width") or 0) for h in hops]
    assert max(widths) > 100  # the task's 1.5 s dominates the waterfall
    output = driver.find_element(By.CSS_SELECTOR, "#output-step-0 pre.stdout").text
    assert output.strip() != ""  # the step's whole output (hostname's)
    assert driver.find_elements(By.ID, "cancel-execution") == []  # it has ended
    shot(driver, "execution")


def test_a_task_defined_on_the_tasks_page_is_listed(driver: WebDriver, fleet: LocalFleet) -> None:
    go(driver, fleet, "/console/tasks")
    driver.find_element(By.ID, "task-name").send_keys("uptime")
    driver.find_element(By.ID, "task-command").send_keys("uptime")
    submit(driver, "define-task")
    names = [r.find_elements(By.TAG_NAME, "td")[1].text
             for r in driver.find_elements(By.CSS_SELECTOR, "#tasks tbody tr")]  # fmt: skip
    assert "uptime" in names
    shot(driver, "tasks")


def test_changing_the_task_request_interval_moves_the_version(
    driver: WebDriver, fleet: LocalFleet
) -> None:
    go(driver, fleet, "/console/settings")
    before = int(driver.find_element(By.ID, "settings-version").text)
    reached(driver, "every agent to have the first version")
    field = driver.find_element(By.ID, "tri")
    field.clear()
    field.send_keys("600")
    submit(driver, "settings")
    assert int(driver.find_element(By.ID, "settings-version").text) == before + 1
    assert driver.find_element(By.ID, "tri").get_attribute("value") == "600"
    change = driver.find_element(By.CSS_SELECTOR, "#settings-history tbody tr").text
    assert change.endswith(f"admin {before + 1} task_request_interval_s: 1800 → 600"), change
    assert sum(reach(driver)) == 4
    # a settings tickle hands it to each agent, whose next contact reports it
    reached(driver, "every agent to have the new version")
    shot(driver, "settings")


def reach(driver: WebDriver) -> tuple[int, int]:
    """The settings page's agents with the current version, and those taking it next."""
    return (int(driver.find_element(By.ID, "reach-current").text),
            int(driver.find_element(By.ID, "reach-pending").text))  # fmt: skip


def reached(driver: WebDriver, what: str) -> None:
    """Reload the settings page until all four agents have the current version."""

    def everyone(d: WebDriver) -> bool:
        d.refresh()
        return reach(d) == (4, 0)

    WebDriverWait(driver, 30, poll_frequency=0.5).until(everyone, what)


def test_runs_page_shows_the_run_with_its_status_bar(driver: WebDriver, fleet: LocalFleet) -> None:
    go(driver, fleet, "/console/runs")
    first = driver.find_element(By.CSS_SELECTOR, "#runs tbody tr")
    assert first.find_element(By.CSS_SELECTOR, ".bar-text").text == "4 succeeded"
    assert (
        first.find_element(By.CSS_SELECTOR, "svg.bar rect.succeeded").get_attribute("width")
        == "200.0"
    )
    shot(driver, "runs")
    Select(driver.find_element(By.NAME, "status")).select_by_visible_text("failed")
    navigate(driver, driver.find_element(By.CSS_SELECTOR, "#run-filters button"))
    assert driver.find_element(By.CSS_SELECTOR, "#runs tbody tr").text == "No run matches."


def test_cancel_a_run_in_progress_and_its_cells_end_cancelled_live(
    driver: WebDriver, fleet: LocalFleet
) -> None:
    go(driver, fleet, "/console/run-now")
    driver.find_element(By.NAME, "command").send_keys("sleep 120")
    driver.find_element(By.ID, "all").click()
    driver.find_element(By.ID, "expires").send_keys("5")
    submit(driver, "run-now")
    until(driver, "the four to run",
          lambda d: [r.get_attribute("data-status") for r in rows(d)] == ["running"] * 4)  # fmt: skip
    submit(driver, "cancel-run")
    assert "/console/runs/" in driver.current_url
    driver.execute_script("window.sameDocument = true")
    # each agent stops its sleep and reports it: the cells turn cancelled without a reload
    until(driver, "the grid to end cancelled",
          lambda d: [r.get_attribute("data-status") for r in rows(d)] == ["cancelled"] * 4)  # fmt: skip
    assert driver.execute_script("return window.sameDocument") is True
    counts = driver.find_element(By.ID, "status-counts").text
    assert counts == "cancelled 4", counts
    assert not driver.find_element(By.CSS_SELECTOR, "#cancel-run button").is_enabled()
    shot(driver, "run-cancelled")


def test_the_audit_page_lists_what_this_test_did(driver: WebDriver, fleet: LocalFleet) -> None:
    go(driver, fleet, "/console/audit")
    seen = [
        tuple(td.text for td in r.find_elements(By.TAG_NAME, "td")[1:3])
        for r in driver.find_elements(By.CSS_SELECTOR, "#audit tbody tr")
    ]
    assert list(reversed(seen)) == [
        ("unknown", "login.refused"),
        ("admin", "login"),
        ("admin", "run"),  # the command of Run now: kept with the run, not defined as a task
        ("admin", "task.define"),
        ("admin", "settings"),
        ("admin", "run"),
        ("admin", "run.cancel"),
    ]
    shot(driver, "audit")


def test_the_pages_are_keyboard_reachable_and_fit_a_narrow_window(
    driver: WebDriver, fleet: LocalFleet
) -> None:
    go(driver, fleet, "/console/fleet")
    body = driver.find_element(By.TAG_NAME, "body")
    body.send_keys(Keys.TAB)
    assert driver.switch_to.active_element.text == "Skip to content"
    reached = []
    for _ in range(8):
        driver.switch_to.active_element.send_keys(Keys.TAB)
        reached.append(driver.switch_to.active_element.text)
    assert reached[:6] == ["Fleet", "Runs", "Run now", "Tasks and jobs", "Settings", "Audit"]
    try:
        driver.set_window_size(420, 900)
        for page in ("/console/fleet", "/console/runs", "/console/settings"):
            go(driver, fleet, page)
            overflow = driver.execute_script(
                "return document.documentElement.scrollWidth - window.innerWidth"
            )
            assert overflow <= 0, page
        go(driver, fleet, "/console/runs")
        shot(driver, "runs-narrow")
    finally:
        driver.set_window_size(1280, 900)


def test_requests_without_a_session_or_with_a_wrong_csrf_token_are_refused(
    driver: WebDriver, fleet: LocalFleet
) -> None:
    go(driver, fleet, "/console/settings")
    before = driver.find_element(By.ID, "settings-version").text
    forged = driver.execute_script(
        """
        const body = new URLSearchParams({csrf: "forged", task_request_interval_s: "900",
            poll_jitter_fraction: "0.1", ts_check_interval_s: "60"});
        const r = await fetch("/console/settings", {method: "POST", body});
        return [r.status, await r.text()];
        """
    )
    assert forged == [403, '{"detail":"missing or wrong CSRF token"}']
    refused = problems(driver)  # the refusal's 403, and nothing else
    assert [(e["source"], e["message"].split(" - ")[0]) for e in refused] == [
        ("network", fleet.ns_url + "/console/settings")
    ]
    assert "status of 403" in refused[0]["message"]
    driver.refresh()
    assert driver.find_element(By.ID, "settings-version").text == before

    driver.delete_all_cookies()
    for page in ("/console/fleet", "/console/audit", "/console/runs/1"):
        go(driver, fleet, page)
        assert driver.current_url == fleet.ns_url + "/console/login", page


def test_the_api_docs_page_works_offline(driver: WebDriver, fleet: LocalFleet) -> None:
    go(driver, fleet, "/docs")
    until(driver, "Swagger UI to render the operations",
          lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock"))  # fmt: skip
    resources = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert all(r.startswith(fleet.ns_url) for r in resources), resources
    shot(driver, "api-docs")
