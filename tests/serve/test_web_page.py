"""The web page in a real headless browser (Debian's chromium driven by Playwright): upload a phantom, read the
numbers the page shows, compare them with the API's, save a screenshot; an API error shows in plain words."""

from __future__ import annotations

from pathlib import Path

import pytest

from cases import AGE_FIELD, post

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture
def page(service_url):
    if not CHROMIUM.exists():
        pytest.skip(f"no browser at {CHROMIUM}: install Debian's chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(f"{service_url}/")
        yield page
        browser.close()


def test_the_page_shows_the_api_answer_and_the_heat_map(page, service_url, phantoms, tmp_path):
    png, _ = phantoms[2]
    image = tmp_path / "hand.png"
    image.write_bytes(png)
    expected = post(service_url, "predict", png, sex="F", **{AGE_FIELD: "100"}).json()
    page.set_input_files("#file", str(image))
    page.select_option("#sex", "F")
    page.fill("#age", "100")
    page.click("#submit")
    page.wait_for_selector("#result", state="visible", timeout=60_000)
    assert page.text_content("#months") == f"{expected['bone_age_months']:.1f}"
    assert page.text_content("#text") == expected["bone_age"]
    assert page.text_content("#sds") == f"{expected['sds']:.2f}"
    assert page.text_content("#determination") == expected["determination"]
    assert page.text_content("#version") == f"tiny version {expected['model']['version']}"
    assert page.get_attribute("#overlay", "src").startswith("data:image/png;base64,")
    assert page.evaluate("document.getElementById('overlay').naturalWidth") == 128  # the overlay decoded
    shot = page.screenshot(path=str(tmp_path / "web-page.png"), full_page=True)
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "web-page.png").stat().st_size > 10_000


def test_an_api_error_is_shown_in_plain_words(page, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an x-ray")
    page.set_input_files("#file", str(text))
    page.select_option("#sex", "M")
    page.click("#submit")
    page.wait_for_selector("#error", state="visible", timeout=60_000)
    assert page.text_content("#error") == ("Could not assess this image: the file is not a PNG, JPEG or DICOM "
                                           "image")
    assert not page.is_visible("#result")
