"""The demo page's gallery tab, driven in headless Chromium against a real ``facerec-serve`` process
with the shipped model (the compare tab is tests/test_demo_page.py; the server, browser and checks
both use are in tests/demo_helpers.py).

It creates a gallery, enrolls photos through the page and compares what the page shows with what the
API answers for the same files: the enrollment gate's verdict and reasons for every photo (one
accepted, one without a face, one with two people), a request none of whose photos passes (422
``enrollment_refused``), then searches (the decision, similarity, threshold, candidates and face
report of ``POST /v1/galleries/{id}/search`` on the same file), and the error sentences.
``FACEREC_GALLERY_SCREENSHOT=docs/images/demo_gallery.png pytest tests/test_demo_gallery.py``
regenerates the screenshot in the docs (without the variable it goes to a temporary folder).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("pydantic_settings")
cv2 = pytest.importorskip("cv2")

from demo_helpers import (  # noqa: F401 - browser and server are fixtures of this module
    KEY,
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

pytestmark = pytest.mark.timeout(300)

H = {"X-API-Key": KEY}
SHIPPED_CONTRACT = json.loads((DEFAULT_MODEL_DIR / "manifest.json").read_text())["contract_id"]


def photo(name: str, i: int) -> Path:
    return SAMPLES / name / f"{name}_{i:04d}.jpg"


@pytest.fixture(scope="module")
def refused_photos(tmp_path_factory) -> dict[str, Path]:
    """A flat grey picture (no face) and two people side by side, faces of the same size."""
    folder = tmp_path_factory.mktemp("gallery_photos")
    grey, two = folder / "grey.png", folder / "two_people.jpg"
    cv2.imwrite(str(grey), np.full((200, 200, 3), 128, np.uint8))
    pair = [cv2.imread(str(photo(n, 1))) for n in ("Al_Sharpton", "David_Beckham")]
    cv2.imwrite(str(two), np.concatenate(pair, axis=1), [cv2.IMWRITE_JPEG_QUALITY, 90])
    return {"grey": grey, "two": two}


def _files(paths: list[Path], field: str) -> list:
    return [(field, (p.name, p.read_bytes(), "image/png" if p.suffix == ".png" else "image/jpeg")) for p in paths]


def _enroll_over_http(client, name: str, paths: list[Path]) -> dict:
    """The same photos enrolled through the API into a gallery of its own (the page's gallery is left
    as the page made it): the gate's answer to compare the page with."""
    r = client.post("/v1/galleries", json={"name": f"http check {name}"}, headers=H)
    assert r.status_code == 201, r.text
    r = client.post(f"/v1/galleries/{r.json()['id']}/persons", data={"name": name},
                    files=_files(paths, "images"), headers=H)
    assert r.status_code in (201, 422), r.text
    return r.json() if r.status_code == 201 else {"person": None, **r.json()["error"]["details"]}


def _chosen(driver) -> str:
    """The text of the chosen gallery option, read in one step (the list is rebuilt when it loads)."""
    return driver.execute_script("const s = document.getElementById('gallery-select');"
                                 "return s.selectedIndex < 0 ? '' : s.options[s.selectedIndex].text;")


def _settled(driver, answer_id: str) -> str:
    """Waits for the answer box or the error box; returns which one shows."""
    return wait(driver, lambda d: ("answer" if by_id(d, answer_id).is_displayed() else
                                   "error" if by_id(d, "gallery-error").is_displayed() else False))


def _enroll(driver, name: str, paths: list[Path]) -> str:
    from selenium.webdriver.common.by import By

    box = by_id(driver, "person-name")
    box.clear()
    box.send_keys(name)
    files = by_id(driver, "enroll-files")
    files.clear()
    files.send_keys("\n".join(str(p) for p in paths))
    assert driver.execute_script("return document.getElementById('enroll-files').files.length") == len(paths)
    wait(driver, lambda d: by_id(d, "enroll").is_enabled())
    by_id(driver, "enroll").click()
    shown = _settled(driver, "enroll-result")
    if shown == "answer":
        items = by_id(driver, "enroll-outcomes").find_elements(By.CSS_SELECTOR, ":scope > li")
        assert len(items) == len(paths)
    return shown


def _check_outcomes_match_http(driver, expected: dict, paths: list[Path]) -> None:
    """Every photo's line on the page says what the API's per-image result says."""
    from selenium.webdriver.common.by import By

    items = by_id(driver, "enroll-outcomes").find_elements(By.CSS_SELECTOR, ":scope > li")
    for item, result, path in zip(items, expected["results"], paths, strict=True):
        assert item.get_attribute("data-status") == result["status"]
        assert item.find_element(By.TAG_NAME, "span").text == f"{path.name}: {result['status']}"
        reasons = item.find_elements(By.CSS_SELECTOR, "ul > li")
        assert [r.get_attribute("data-code") for r in reasons] == [x["code"] for x in result["reasons"]]
        for shown, reason in zip(reasons, result["reasons"]):
            # The message carries measurements of this photo (faces counted, sizes): the same photo
            # gives the same text through the page and through the API.
            assert shown.text == f"{reason['message']} ({reason['code']})"


def _search(driver, path: Path) -> str:
    by_id(driver, "search-file").send_keys(str(path))
    wait(driver, lambda d: by_id(d, "search").is_enabled())
    by_id(driver, "search").click()
    return _settled(driver, "search-result")


def _check_search_matches_http(driver, client, gid: str, path: Path) -> dict:
    from selenium.webdriver.common.by import By

    r = client.post(f"/v1/galleries/{gid}/search", files=_files([path], "image"), headers=H)
    assert r.status_code == 200, r.text
    body = r.json()
    decision = by_id(driver, "search-decision")
    assert decision.get_attribute("data-decision") == body["decision"]
    if body["decision"] == "match":
        assert decision.text == f"Match: {body['person']['name']}"
    else:
        assert decision.text == "Unknown: nobody in the gallery reaches the threshold"
    sim = by_id(driver, "search-similarity")
    assert sim.text == f"{body['similarity']:.4f}"
    assert float(sim.get_attribute("data-value")) == pytest.approx(body["similarity"], abs=1e-5)
    assert by_id(driver, "search-threshold").text == f"{body['threshold']:.4f}"
    point = by_id(driver, "search-operating-point").text
    op = body["operating_point"]
    assert point.startswith(f"false-positive identification rate {op['fpir']} at a gallery of "
                            f"{op['calibrated_gallery_size']} samples (this one: {op['gallery_size']})")
    rows = by_id(driver, "candidates").find_elements(By.CSS_SELECTOR, "tbody tr")
    shown = [[td.text for td in row.find_elements(By.TAG_NAME, "td")] for row in rows]
    assert shown == [[str(i + 1), c["name"], f"{c['similarity']:.4f}", c["person_id"]]
                     for i, c in enumerate(body["candidates"])]
    matched = [row.get_attribute("data-person-id") for row in rows if row.get_attribute("class") == "matched"]
    assert matched == ([body["person"]["id"]] if body["person"] else [])
    check_face_report(face_report(driver, "search-report"), body["image"])
    return body


def test_gallery_tab_create_enroll_search(browser, server, refused_photos, tmp_path):
    from selenium.webdriver.common.keys import Keys

    client, base = server
    driver = browser
    open_page(driver, base)
    by_id(driver, "api-key").send_keys(KEY)

    # The tabs: compare shows first; the arrow key moves to the gallery tab (WAI-ARIA tabs).
    assert by_id(driver, "panel-compare").is_displayed() and not by_id(driver, "panel-gallery").is_displayed()
    by_id(driver, "tab-compare").send_keys(Keys.ARROW_RIGHT)
    assert driver.switch_to.active_element.get_attribute("id") == "tab-gallery"
    assert by_id(driver, "panel-gallery").is_displayed() and not by_id(driver, "panel-compare").is_displayed()
    assert by_id(driver, "tab-gallery").get_attribute("aria-selected") == "true"
    # With a key typed, opening the tab loads the list (none yet on this fresh service).
    wait(driver, lambda d: _chosen(d) == "(no gallery yet: create one)")
    assert not by_id(driver, "enroll").is_enabled() and not by_id(driver, "search").is_enabled()

    # Create a gallery: it is chosen, and its size and threshold are shown as the API reports them.
    by_id(driver, "gallery-name").send_keys("front desk")
    by_id(driver, "gallery-create").click()
    wait(driver, lambda d: by_id(d, "gallery-info").get_attribute("data-gallery-id"))
    gid = by_id(driver, "gallery-info").get_attribute("data-gallery-id")
    gallery = client.get(f"/v1/galleries/{gid}", headers=H).json()
    assert gallery["name"] == "front desk" and _chosen(driver) == "front desk (0 persons)"
    info = by_id(driver, "gallery-info").text
    assert info.startswith("0 persons, 0 samples. Match threshold "
                           f"{gallery['operating_point']['threshold']:.4f}: false-positive identification rate")

    assert _enroll(driver, "Adrien Brody", [photo("Adrien_Brody", 1)]) == "answer", by_id(driver, "gallery-error").text
    wait(driver, lambda d: by_id(d, "gallery-info").text.startswith("1 person, 1 sample."))
    assert by_id(driver, "person-name").get_attribute("value") == ""  # ready for the next person

    # No photo passes: the API's 422 enrollment_refused, shown as the per-photo reasons, not as an error.
    assert _enroll(driver, "Nobody", [refused_photos["grey"]]) == "answer"
    _check_outcomes_match_http(driver, _enroll_over_http(client, "Nobody", [refused_photos["grey"]]),
                               [refused_photos["grey"]])
    assert by_id(driver, "enroll-summary").get_attribute("data-outcome") == "refused"
    assert by_id(driver, "enroll-summary").text == "Nobody was enrolled: no photo passed the gallery's enrollment gate."
    assert client.get(f"/v1/galleries/{gid}", headers=H).json()["persons"] == 1

    # One good photo, one without a face and one of two people: the gate's verdict for each photo.
    al = [photo("Al_Sharpton", 1), refused_photos["grey"], refused_photos["two"]]
    assert _enroll(driver, "Al Sharpton", al) == "answer", by_id(driver, "gallery-error").text
    expected = _enroll_over_http(client, "Al Sharpton", al)
    assert [r["status"] for r in expected["results"]] == ["enrolled", "refused", "refused"]
    assert [[x["code"] for x in r["reasons"]] for r in expected["results"]] == [[], ["no_face"], ["multiple_faces"]]
    _check_outcomes_match_http(driver, expected, al)
    persons = client.get(f"/v1/galleries/{gid}/persons", headers=H).json()["persons"]
    assert sorted((p["name"], p["samples"]) for p in persons) == [("Adrien Brody", 1), ("Al Sharpton", 1)]
    summary = by_id(driver, "enroll-summary")
    assert summary.get_attribute("data-outcome") == "enrolled"
    al_id = next(p["id"] for p in persons if p["name"] == "Al Sharpton")
    assert summary.text == f"Enrolled Al Sharpton with 1 of 3 photos (person id {al_id})."
    wait(driver, lambda d: by_id(d, "gallery-info").text.startswith("2 persons, 2 samples."))

    # Search: an enrolled person's other photo, then someone never enrolled.
    assert _search(driver, photo("Adrien_Brody", 4)) == "answer", by_id(driver, "gallery-error").text
    hit = _check_search_matches_http(driver, client, gid, photo("Adrien_Brody", 4))
    if hit["contract_id"] == SHIPPED_CONTRACT:  # the trained model knows these two photos are one person
        assert hit["decision"] == "match" and hit["person"]["name"] == "Adrien Brody"
    shot = Path(os.environ.get("FACEREC_GALLERY_SCREENSHOT") or tmp_path / "demo_gallery.png")
    screenshot(driver, shot if shot.is_absolute() else REPO_ROOT / shot)

    assert _search(driver, photo("Bob_Hope", 3)) == "answer"
    miss = _check_search_matches_http(driver, client, gid, photo("Bob_Hope", 3))
    if miss["contract_id"] == SHIPPED_CONTRACT:
        assert miss["decision"] == "unknown"
    no_csp_violations(driver)


def test_gallery_tab_errors_are_sentences(browser, server, refused_photos):
    from selenium.webdriver.support.ui import Select

    client, base = server
    driver = browser
    gid = client.post("/v1/galleries", json={"name": "errors"}, headers=H).json()["id"]
    open_page(driver, base)
    by_id(driver, "tab-gallery").click()
    # No key typed: nothing is requested, the page says what to do.
    by_id(driver, "gallery-load").click()
    assert by_id(driver, "gallery-error").text == "Type the API key first (ask the service's operator for one)."
    assert driver.switch_to.active_element.get_attribute("id") == "api-key"

    # A wrong key: 401, with the request id to quote.
    by_id(driver, "api-key").send_keys("wrong-key-0000000000000000")
    by_id(driver, "gallery-load").click()
    wait(driver, lambda d: "(401)" in by_id(d, "gallery-error").text)
    assert "Request id:" in by_id(driver, "gallery-error").text

    # The right key: the list loads; a search of a photo without a face is a 422 no_face sentence.
    by_id(driver, "api-key").clear()
    by_id(driver, "api-key").send_keys(KEY)
    by_id(driver, "gallery-load").click()
    has = "return [...document.getElementById('gallery-select').options].some((o) => o.value === arguments[0]);"
    wait(driver, lambda d: d.execute_script(has, gid))
    Select(by_id(driver, "gallery-select")).select_by_value(gid)
    assert _search(driver, refused_photos["grey"]) == "error"
    assert by_id(driver, "gallery-error").text.startswith("No face found in the photo (422).")

    # The gallery is deleted behind the page's back: 404, said as such.
    assert client.delete(f"/v1/galleries/{gid}", headers=H).status_code == 204
    assert _search(driver, photo("Bob_Hope", 3)) == "error"
    assert by_id(driver, "gallery-error").text.startswith("Not found (404)")
    no_csp_violations(driver)
