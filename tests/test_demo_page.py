"""The demo page at ``/``: served without a key and with a strict CSP (plain HTTP), then driven in
headless Chromium against a real ``facerec-serve`` process with the shipped model.

The browser part needs Debian's ``chromium`` and ``chromium-driver`` (CI installs them; the tests
skip, saying so, when either is missing). It uploads sample photos, reads what the page shows and
compares it with ``POST /v1/verify`` on the same files over HTTP, checks the page's aligned-crop
transform against ``facerec.data.align.estimate_norm``, the error messages (401, 413, 422 no face)
and takes a screenshot: ``FACEREC_SCREENSHOT=docs/images/demo_page.png pytest tests/test_demo_page.py``
regenerates the one in the docs (without the variable it goes to a temporary folder).
"""

from __future__ import annotations

import base64
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("pydantic_settings")

from demo_helpers import (  # noqa: F401 - browser and server are fixtures of this module
    KEY,
    MAX_IMAGE_BYTES,
    browser,
    by_id,
    check_face_report,
    face_report,
    no_csp_violations,
    open_page,
    screenshot,
    server,
    wait,
)
from service.settings import DEFAULT_MODEL_DIR
from service.testing import REPO_ROOT, SAMPLES

pytestmark = pytest.mark.timeout(240)

SAME = (SAMPLES / "Adrien_Brody/Adrien_Brody_0001.jpg", SAMPLES / "Adrien_Brody/Adrien_Brody_0002.jpg")
DIFFERENT = (SAMPLES / "Adrien_Brody/Adrien_Brody_0001.jpg", SAMPLES / "Mariah_Carey/Mariah_Carey_0001.jpg")
# The trained default model (not a random-init stand-in a test may substitute) tells the samples apart.
SHIPPED_CONTRACT = json.loads((DEFAULT_MODEL_DIR / "manifest.json").read_text())["contract_id"]


def verify_over_http(client, a: Path, b: Path) -> dict:
    r = client.post("/v1/verify", headers={"X-API-Key": KEY},
                    files={"image_a": (a.name, a.read_bytes(), "image/jpeg"),
                           "image_b": (b.name, b.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------------------------- plain HTTP
class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.script_text = ""
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False if tag == "script" else self._in_script

    def handle_data(self, data):
        if self._in_script:
            self.script_text += data


def test_page_is_served_without_a_key_with_a_strict_csp(server):
    client, _ = server
    r = client.get("/")  # no X-API-Key
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    csp = {d.split()[0]: d.split()[1:] for d in r.headers["content-security-policy"].split("; ")}
    assert csp["default-src"] == ["'none'"]
    assert csp["script-src"] == ["'self'"] and csp["style-src"] == ["'self'"]
    assert csp["connect-src"] == ["'self'"] and csp["frame-ancestors"] == ["'none'"]
    assert not any("unsafe" in v for values in csp.values() for v in values)
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["x-request-id"]

    page = _Tags()
    page.feed(r.text)
    scripts = [attrs for tag, attrs in page.tags if tag == "script"]
    assert scripts and all(a.get("src", "").startswith("/demo/") for a in scripts)
    assert page.script_text.strip() == ""  # no inline script (the CSP would block it anyway)
    for tag, attrs in page.tags:
        assert "style" not in attrs, tag  # inline styles are blocked by the CSP too
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
    inputs = {a["id"]: a for tag, a in page.tags if tag in ("input", "select")}
    labelled = {a["for"] for tag, a in page.tags if tag == "label" and "for" in a}
    gallery_tab = {"gallery-select", "gallery-name", "person-name", "enroll-files", "search-file"}
    assert {"api-key", "remember-key", "file-a", "file-b"} | gallery_tab <= set(inputs) <= labelled
    assert inputs["api-key"]["type"] == "password" and inputs["api-key"].get("value") is None

    scripts_js = ("/demo/app.js", "/demo/gallery.js")
    assert {a["src"] for a in scripts} == set(scripts_js)
    assets = {**dict.fromkeys(scripts_js, "text/javascript; charset=utf-8"),
              "/demo/style.css": "text/css; charset=utf-8"}
    for path, media_type in assets.items():
        a = client.get(path)
        assert a.status_code == 200 and a.headers["content-type"] == media_type
        assert a.headers["x-content-type-options"] == "nosniff"
    js = "\n".join(client.get(path).text for path in scripts_js)
    # The page holds no key and never keeps one beyond the tab's session (and only when asked).
    for text in (r.text, js, client.get("/demo/style.css").text):
        assert KEY not in text
    assert "localStorage" not in js and "sessionStorage" in js
    # One function makes every request (this origin, the key in a header), always to this API.
    assert re.findall(r"fetch\(([^,)]*)", js) == ["path"]
    paths = re.findall(r"(?:callApi|request)\(\s*([`\"][^`\"]*[`\"])", js)
    assert {p[1:-1] for p in paths} == {"/v1/verify", "/v1/galleries", "/v1/galleries/${id}",
                                        "/v1/galleries/${g.id}/persons", "/v1/galleries/${g.id}/search"}
    assert not re.search(r"https?://", js)


def test_page_template_is_the_services_alignment_template(server):
    from facerec.data.align import ARCFACE_TEMPLATE

    client, _ = server
    js = client.get("/demo/app.js").text
    block = js[js.index("const TEMPLATE = [") : js.index("];", js.index("const TEMPLATE = ["))]
    numbers = [float(v) for v in re.findall(r"-?\d+\.\d+", block)]
    np.testing.assert_array_equal(np.array(numbers).reshape(5, 2), ARCFACE_TEMPLATE)


def test_openapi_is_unaffected(server):
    client, _ = server
    paths = client.get("/openapi.json").json()["paths"]
    assert not {"/", "/demo/app.js", "/demo/gallery.js", "/demo/style.css"} & set(paths)
    assert "/v1/verify" in paths


def test_demo_page_setting_turns_it_off(monkeypatch):
    """FACEREC_DEMO_PAGE=false: / and its assets answer 404 in the error envelope (no model needed:
    the routes read only the settings)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from service.errors import install_handlers
    from service.middleware import RequestContextMiddleware
    from service.routes import demo
    from service.settings import Settings

    monkeypatch.setenv("FACEREC_DEMO_PAGE", "false")
    settings = Settings(api_keys=[KEY])
    assert settings.demo_page is False
    app = FastAPI()
    app.state.settings = settings
    install_handlers(app)
    app.include_router(demo.router)
    app.add_middleware(RequestContextMiddleware, max_body=1 << 20)
    with TestClient(app) as client:
        for path in ("/", "/demo/app.js", "/demo/gallery.js", "/demo/style.css"):
            r = client.get(path)
            assert r.status_code == 404, path
            assert r.json()["error"]["code"] == "not_found"
            assert "FACEREC_DEMO_PAGE" in r.json()["error"]["message"]
        app.state.settings = Settings(api_keys=[KEY], demo_page=True)
        assert client.get("/").status_code == 200


# ---------------------------------------------------------------------------------- the browser
def _pick(driver, side: str, path: Path) -> None:
    """The file picker, as a user would fill it (send_keys to the <input type=file>)."""
    by_id(driver, f"file-{side}").send_keys(str(path))
    _ready(driver, side, path.name)


def _drop(driver, side: str, path: Path) -> None:
    """A real drop event carrying the file, dispatched on the drop zone."""
    driver.execute_script(
        """
        const [side, name, b64] = arguments;
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], name, { type: "image/jpeg" }));
        const zone = document.getElementById(`drop-${side}`);
        const init = { dataTransfer: data, bubbles: true, cancelable: true };
        zone.dispatchEvent(new DragEvent("dragover", init));
        zone.dispatchEvent(new DragEvent("drop", init));
        """, side, path.name, base64.b64encode(path.read_bytes()).decode())
    _ready(driver, side, path.name)


def _ready(driver, side: str, name: str) -> None:
    wait(driver, lambda d: by_id(d, f"name-{side}").text.startswith(name + " ("))
    wait(driver, lambda d: by_id(d, f"drop-{side}").get_attribute("data-state") in ("ready", "unreadable"))


def _compare(driver):
    """Click Compare once both previews are loaded; returns 'result' or 'error' when one shows."""
    wait(driver, lambda d: by_id(d, "compare").is_enabled())
    by_id(driver, "compare").click()
    return wait(driver, lambda d: ("result" if by_id(d, "result").is_displayed() else
                                    "error" if by_id(d, "error").is_displayed() else False))


def _check_result_matches_http(driver, body: dict) -> None:
    sim = by_id(driver, "similarity")
    assert sim.text == f"{body['similarity']:.4f}"  # the displayed precision
    # Same files through the same service: the page shows what the API answers (batching can move
    # the last float32 bits, hence no exact equality on the full value).
    assert float(sim.get_attribute("data-value")) == pytest.approx(body["similarity"], abs=1e-5)
    assert by_id(driver, "threshold").text == f"{body['threshold']:.4f}"
    decision = by_id(driver, "decision")
    assert decision.get_attribute("data-decision") == body["decision"]
    assert decision.text == ("Match: the same person" if body["match"] else "No match: different people")
    for side in ("a", "b"):
        check_face_report(face_report(driver, f"report-{side}"), body[f"image_{side}"])


def _check_aligned_crops(driver, body: dict) -> None:
    from facerec.data.align import estimate_norm

    for side in ("a", "b"):
        landmarks = body[f"image_{side}"]["face"]["landmarks"]
        p, q, tx, ty = driver.execute_script(
            "return window.facerecDemo.similarityTransform(arguments[0], window.facerecDemo.TEMPLATE);",
            landmarks)
        np.testing.assert_allclose([[p, -q, tx], [q, p, ty]], estimate_norm(np.array(landmarks)),
                                   rtol=0, atol=1e-9)
        # The crop was drawn: a face fills the middle of the 112x112 canvas (black = outside the photo).
        lit = driver.execute_script(
            """const c = document.getElementById(arguments[0]).getContext("2d");
               const d = c.getImageData(28, 28, 56, 56).data; let n = 0;
               for (let i = 0; i < d.length; i += 4) if (d[i] + d[i + 1] + d[i + 2] > 30) n++;
               return n / (d.length / 4);""", f"crop-{side}")
        assert lit > 0.95, (side, lit)


def test_browser_same_person_then_different_people(browser, server, tmp_path):
    client, base = server
    driver = browser
    open_page(driver, base)
    assert driver.execute_script("return typeof window.facerecDemo.similarityTransform") == "function"
    # Every control has a label and the file pickers are reachable from the keyboard.
    for element_id in ("api-key", "remember-key", "file-a", "file-b"):
        assert driver.execute_script(f"return document.getElementById('{element_id}').labels.length") >= 1
    from selenium.webdriver.common.keys import Keys

    key_box = by_id(driver, "api-key")
    key_box.click()
    key_box.send_keys(KEY)
    key_box.send_keys(Keys.TAB)
    assert driver.switch_to.active_element.get_attribute("id") == "remember-key"
    driver.switch_to.active_element.send_keys(Keys.TAB)
    assert driver.switch_to.active_element.get_attribute("id") == "file-a"

    # Same person: both photos through the file pickers.
    _pick(driver, "a", SAME[0])
    _pick(driver, "b", SAME[1])
    assert _compare(driver) == "result", by_id(driver, "error").text
    same = verify_over_http(client, *SAME)
    _check_result_matches_http(driver, same)
    _check_aligned_crops(driver, same)
    if same["contract_id"] == SHIPPED_CONTRACT:  # the trained model tells these two apart
        assert same["decision"] == "match"
    shot = Path(os.environ.get("FACEREC_SCREENSHOT") or tmp_path / "demo_page.png")
    if not shot.is_absolute():
        shot = REPO_ROOT / shot
    screenshot(driver, shot)

    # Different people: photo B replaced by drag and drop.
    _drop(driver, "b", DIFFERENT[1])
    assert not by_id(driver, "result").is_displayed()  # a new photo clears the old answer
    assert _compare(driver) == "result", by_id(driver, "error").text
    different = verify_over_http(client, *DIFFERENT)
    _check_result_matches_http(driver, different)
    if different["contract_id"] == SHIPPED_CONTRACT:
        assert different["decision"] == "no_match"

    # The key never left the page except in the header: not in the URL, not in any storage.
    assert KEY not in driver.current_url
    assert driver.execute_script("return window.localStorage.length + window.sessionStorage.length") == 0
    no_csp_violations(driver)


def test_browser_shows_readable_errors(browser, server, tmp_path):
    import cv2

    _, base = server
    driver = browser
    open_page(driver, base)
    key_box = by_id(driver, "api-key")

    # 401: a wrong key.
    key_box.send_keys("wrong-key-0000000000000000")
    _pick(driver, "a", SAME[0])
    _pick(driver, "b", SAME[1])
    assert _compare(driver) == "error"
    text = by_id(driver, "error").text
    assert "The API key was refused (401)" in text and "Request id:" in text
    assert not by_id(driver, "result").is_displayed()

    # 422: no face in photo B (a flat grey picture).
    key_box.clear()
    key_box.send_keys(KEY)
    blank = tmp_path / "grey.png"
    cv2.imwrite(str(blank), np.full((200, 200, 3), 128, np.uint8))
    _pick(driver, "b", blank)
    assert _compare(driver) == "error"
    assert "No face found in photo B (422)" in by_id(driver, "error").text

    # 413: photo A over the service's per-image limit.
    big = tmp_path / "big.jpg"
    big.write_bytes(np.random.default_rng(0).integers(0, 256, MAX_IMAGE_BYTES + 1, dtype=np.uint8).tobytes())
    _pick(driver, "a", big)
    assert _compare(driver) == "error"
    text = by_id(driver, "error").text
    assert "The upload is too large (413): photo A" in text and "256 KiB" in text

    # Remembering the key is opt-in and only for the tab's session.
    by_id(driver, "remember-key").click()
    assert driver.execute_script("return sessionStorage.getItem('facerec-demo-api-key')") == KEY
    assert driver.execute_script("return window.localStorage.length") == 0
    driver.refresh()
    wait(driver, lambda d: by_id(d, "api-key").get_attribute("value") == KEY)
    by_id(driver, "remember-key").click()
    assert driver.execute_script("return window.sessionStorage.length") == 0
    no_csp_violations(driver)
