"""Debian's Chromium driven by Selenium through Debian's chromedriver (both from scripts/sysdeps.sh),
headless, with a fresh profile and nothing that reaches the network on its own: every option the
console's browser tests use is here."""

from __future__ import annotations

import base64
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WIDTH, HEIGHT = 1280, 900
OPTIONS = (
    "--headless=new",
    "--no-sandbox",  # tests may run as root in a container, where the sandbox cannot start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
    "--metrics-recording-only",
    "--disable-dev-shm-usage",
    f"--window-size={WIDTH},{HEIGHT}",
)


def missing() -> list[str]:
    """What of Chromium and its driver is not installed (`make sysdeps` installs them)."""
    return [p for p in (CHROMIUM, CHROMEDRIVER) if shutil.which(p) is None]


def trusting(cert_file: Path) -> list[str]:
    """The option that makes Chromium accept this one server certificate (by the SHA-256 of its
    public key) and no other untrusted one: for a fleet whose private CA it does not know."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    return [f"--ignore-certificate-errors-spki-list={base64.b64encode(digest.finalize()).decode()}"]


@contextmanager
def chromium(profile: Path, extra: Sequence[str] = ()) -> Iterator[webdriver.Chrome]:
    """A headless Chromium with a fresh profile in `profile` (and `extra` options), its console log
    kept for reading (`driver.get_log("browser")`); quit at the end."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for option in (*OPTIONS, *extra):
        options.add_argument(option)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(20)
        yield driver
    finally:
        driver.quit()


def page_replaced(page: WebElement) -> Callable[[WebDriver], bool]:
    """A wait's condition: the page whose `html` element is `page` has been replaced.

    Selenium's `staleness_of` takes only a stale-element error for it; asked while the next page
    is coming in, chromedriver may answer "Node with given id does not belong to the document"
    (an unknown error), which failed a clean-clone CI run's login over HTTPS."""

    def replaced(_driver: WebDriver) -> bool:
        try:
            page.is_enabled()
        except StaleElementReferenceException:
            return True
        except WebDriverException as exc:
            if "does not belong to the document" in (exc.msg or ""):
                return True
            raise
        return False

    return replaced
