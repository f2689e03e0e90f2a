"""What the demo page's tests share (tests/test_demo_page.py: the compare tab, tests/test_demo_gallery.py:
the gallery tab): a real ``python -m service`` process on a free port with the shipped model, headless
Chromium through Selenium, and the waits and checks both tabs use.

The browser fixture needs Debian's ``chromium`` and ``chromium-driver`` and skips, saying so, where
either is missing. Import the fixtures into a test module by name (``from demo_helpers import browser,
server``); each module then gets its own server and browser.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")

from service.settings import DEFAULT_MODEL_DIR
from service.testing import service_process

KEY = "demo-page-key-0123456789abcdef"
MAX_IMAGE_BYTES = 256 * 1024  # small, so the 413 case needs only a small file


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real ``python -m service`` on a free port, with the shipped model (or FACEREC_MODEL) and its
    own gallery file; yields an httpx client for it and its base URL."""
    model = os.environ.get("FACEREC_MODEL") or str(DEFAULT_MODEL_DIR)
    if not Path(model).exists():
        pytest.skip(f"no model at {model}")
    folder = tmp_path_factory.mktemp("demo_serve")
    env = {"FACEREC_API_KEYS": KEY, "FACEREC_DEVICE": "cpu", "FACEREC_MODEL": model,
           "FACEREC_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES), "FACEREC_DEMO_PAGE": "true",
           "FACEREC_GALLERY_PATH": str(folder / "galleries.sqlite3")}
    with service_process(env, folder / "serve.log", ready_timeout_s=120) as (_, client, base):
        yield client, base


def chromium_paths() -> tuple[str, str]:
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("headless browser test needs Debian's chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver); not installed here")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    binary, driver_path = chromium_paths()
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--lang=en-US", "--force-device-scale-factor=1",
                "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, condition, timeout=90):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def by_id(driver, element_id):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def open_page(driver, base: str) -> None:
    driver.get(base + "/")
    wait(driver, lambda d: d.execute_script("return document.readyState") == "complete")


def face_report(driver, dl_id: str) -> dict[str, str]:
    """The rows of a face report on the page (``<dl>`` with ``data-field`` on each value)."""
    from selenium.webdriver.common.by import By

    dl = by_id(driver, dl_id)
    return {dd.get_attribute("data-field"): dd.text for dd in dl.find_elements(By.TAG_NAME, "dd")}


def check_face_report(shown: dict[str, str], image: dict) -> None:
    """A shown face report says what the API's ``ImageReport`` says, at the displayed precision."""
    assert shown["faces"].split(" ")[0] == str(image["faces_found"])
    assert shown["detection"] == f"{image['face']['score']:.3f}"
    assert shown["quality"].startswith(f"{image['quality']['score']:.1f} / 100")
    ood = image["ood"]
    assert shown["ood"].startswith("flagged" if ood["flagged"] else "passed")
    assert f"{ood['score']:.3f}" in shown["ood"]


def no_csp_violations(driver) -> None:
    entries = driver.get_log("browser")
    bad = [e for e in entries if "Content Security Policy" in e["message"] or "Uncaught" in e["message"]]
    assert not bad, bad


def screenshot(driver, path: Path) -> None:
    # The whole page, without a scroll bar: the window is the page's height plus the browser's frame.
    height, frame = driver.execute_script("return [document.documentElement.scrollHeight, "
                                          "window.outerHeight - window.innerHeight];")
    driver.set_window_size(1280, min(int(height) + int(frame) + 16, 2400))
    path.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(path))
    import cv2

    image = cv2.imread(str(path))
    assert image is not None and image.shape[1] >= 1000 and image.std() > 20


