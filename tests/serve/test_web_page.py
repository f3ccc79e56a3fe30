"""The web page and the API docs in a real headless browser (Debian's chromium driven by Playwright) with the
network off: every request that is not to 127.0.0.1 is blocked and recorded, and a test fails if one was tried.
Upload a phantom, a DICOM file and a 16-bit PNG, read what the page shows, compare it with the API's answer, save
a screenshot; an API error shows in plain words; the header always says which model answers, or why it cannot."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests
from playwright.sync_api import ConsoleMessage, Page, expect

from cases import AGE_FIELD, direct_service, noise_png, post
from helpers import headless_chromium
from images import write_dicom, write_png16

REDOCLY_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"  # hard-coded in ReDoc 2; the service's policy refuses it


@dataclass
class Visit:
    """A browser page with the network off, and what went wrong on it."""

    page: Page
    blocked: list[str] = field(default_factory=list)  # requests that tried to leave 127.0.0.1
    refused: list[str] = field(default_factory=list)  # URLs the service's Content-Security-Policy kept unrequested
    problems: list[str] = field(default_factory=list)  # console errors, uncaught exceptions, HTTP answers >= 400

    def console(self, message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        # "Loading the image '<url>' violates the following Content Security Policy directive: ..." (older
        # chromium: "Refused to load the image '<url>' because it violates ...").
        refusal = re.match(r"(?:Loading|Refused to load) the \w+ '([^']+)'.* Content Security Policy", message.text)
        (self.refused if refusal else self.problems).append(refusal.group(1) if refusal else message.text)

    def assert_clean(self, refused: tuple[str, ...] = ()) -> None:
        """No request tried to leave 127.0.0.1, nothing failed, and the browser refused only ``refused``."""
        assert self.blocked == [], f"tried to reach the network: {self.blocked}"
        assert self.refused == list(refused)
        assert self.problems == [], self.problems


@pytest.fixture(scope="module")
def browser():
    with headless_chromium() as browser:
        yield browser


@pytest.fixture
def visit(browser):
    """A fresh page whose requests off 127.0.0.1 are blocked and recorded, its console errors collected."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    seen = Visit(page)

    def local_only(route):
        if urlparse(route.request.url).hostname == "127.0.0.1":
            return route.continue_()
        seen.blocked.append(route.request.url)
        return route.abort("internetdisconnected")

    context.route("**/*", local_only)
    page.on("console", seen.console)
    page.on("pageerror", lambda error: seen.problems.append(f"uncaught: {error}"))
    page.on("response", lambda response: response.status >= 400 and seen.problems.append(
        f"{response.status} {response.url}"))
    yield seen
    context.close()


@pytest.fixture
def home(visit, service_url):
    """The web page, its header resolved."""
    visit.page.goto(f"{service_url}/")
    header_resolved(visit.page)
    return visit


def header_resolved(page) -> None:
    """Wait until the header no longer says it is asking the service (Playwright's waits work under the page's
    Content-Security-Policy, which forbids evaluating strings)."""
    expect(page.locator("#model")).not_to_contain_text("asking", timeout=30_000)


def assess(page, image: Path, sex: str = "", age: str = "") -> None:
    page.set_input_files("#file", str(image))
    page.select_option("#sex", sex)
    page.fill("#age", age)
    page.click("#submit")
    page.wait_for_selector("#result", state="visible", timeout=60_000)
    expect(page.locator("#original")).to_have_js_property("complete", True)


def shown_png(page, selector: str) -> bytes:
    src = page.get_attribute(selector, "src")
    assert src.startswith("data:image/png;base64,"), src[:40]
    return base64.b64decode(src.removeprefix("data:image/png;base64,"))


def test_the_page_shows_the_api_answer_and_the_heat_map(home, service_url, phantoms, tmp_path):
    page = home.page
    png, _ = phantoms[2]
    image = tmp_path / "hand.png"
    image.write_bytes(png)
    expected = post(service_url, "predict", png, sex="F", **{AGE_FIELD: "100"}).json()
    assess(page, image, "F", "100")
    assert page.text_content("#months") == f"{expected['bone_age_months']:.1f}"
    assert page.text_content("#text") == expected["bone_age"]
    assert page.text_content("#sds") == f"{expected['sds']:.2f}"
    assert page.text_content("#determination") == expected["determination"]
    low, high = expected["interval_months"]  # tiny:1 carries trust signals
    assert page.text_content("#interval") == f"{low:.1f} to {high:.1f}" and page.text_content("#level") == "90"
    assert page.text_content("#calibrated") == "bias-corrected" and page.is_visible("#interval-row")
    assert not page.is_visible("#spread-row") and not page.is_visible("#ood-row")  # tiny:1: one model, no detector
    assert page.text_content("#version") == f"tiny version {expected['model']['version']}"
    shown_png(page, "#overlay")
    assert page.evaluate("document.getElementById('overlay').naturalWidth") == 128  # the overlay decoded
    shot = page.screenshot(path=str(tmp_path / "web-page.png"), full_page=True)
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "web-page.png").stat().st_size > 10_000
    home.assert_clean()


@pytest.mark.parametrize("kind", ["dicom", "png16"])
def test_the_radiograph_pane_shows_what_the_service_decoded(home, service_url, tmp_path, kind):
    """Browsers cannot draw DICOM, and draw a 16-bit PNG unwindowed: the pane shows the service's canvas."""
    image = write_dicom(tmp_path / "hand.dcm") if kind == "dicom" else write_png16(tmp_path / "hand.png")
    sex = "" if kind == "dicom" else "F"  # the DICOM file's PatientSex is F
    assess(home.page, image, sex)
    assert home.page.evaluate("document.getElementById('original').naturalWidth") == 128  # drawn, not broken
    expected = post(service_url, "predict?canvas=true", image.read_bytes(), image.name, sex=sex).json()
    assert shown_png(home.page, "#original") == base64.b64decode(expected["canvas_png_base64"])
    assert home.page.text_content("#sex-used") == ("female (dicom)" if kind == "dicom" else "female (form)")
    home.assert_clean()


def test_the_page_has_an_icon_and_its_header_names_the_model(home, service_url):
    served = requests.get(f"{service_url}/v1/model", timeout=30).json()["model"]  # other tests swap versions
    assert home.page.text_content("#model") == f"model: {served['name']} version {served['version']}"
    icon = home.page.get_attribute("link[rel=icon]", "href")
    assert icon.startswith("data:image/svg+xml")  # inline: no request, no 404
    width = home.page.evaluate("""(src) => new Promise((done) => {
        const image = new Image(); image.onload = () => done(image.naturalWidth); image.onerror = () => done(0);
        image.src = src; })""", icon)
    assert width > 0
    home.assert_clean()


@pytest.mark.parametrize("failure, shown", [
    ("refused", "model: unavailable (Failed to fetch)"),
    ("503", "model: unavailable (the model is not loaded yet)"),
])
def test_the_header_says_why_the_model_is_unknown(visit, service_url, failure, shown):
    def fail(route):
        if failure == "refused":
            return route.abort("connectionrefused")
        return route.fulfill(status=503, json={"error": "not_ready", "detail": "the model is not loaded yet"})

    visit.page.route("**/v1/model", fail)
    visit.page.goto(f"{service_url}/")
    header_resolved(visit.page)
    assert visit.page.text_content("#model") == shown


def test_an_api_error_is_shown_in_plain_words(home, tmp_path):
    page = home.page
    text = tmp_path / "notes.txt"
    text.write_text("not an x-ray")
    page.set_input_files("#file", str(text))
    page.select_option("#sex", "M")
    page.click("#submit")
    page.wait_for_selector("#error", state="visible", timeout=60_000)
    assert page.text_content("#error") == ("Could not assess this image: the file is not a PNG, JPEG or DICOM "
                                           "image")
    assert not page.is_visible("#result")
    assert home.blocked == []


@pytest.mark.parametrize("server", ["service_url", "direct_url"])
@pytest.mark.parametrize("docs", ["docs", "redoc"])
def test_the_api_docs_render_offline(visit, request, server, docs):
    """Swagger UI and ReDoc from the installed package, under Ray Serve and the plain uvicorn server: the rendered
    page lists the operations."""
    visit.page.goto(f"{request.getfixturevalue(server)}/{docs}")
    for path in ("/v1/predict", "/v1/explain", "/v1/model"):
        visit.page.get_by_text(path).first.wait_for(timeout=60_000)
    visit.assert_clean(refused=(REDOCLY_LOGO,) if docs == "redoc" else ())


def test_the_page_shows_an_ensembles_spread_and_refuses_what_is_not_a_hand(visit, ensemble_registry, phantoms,
                                                                             tmp_path):
    page = visit.page
    with direct_service(ensemble_registry, "serve.model_uri=ens:1") as url:
        page.goto(f"{url}/")
        header_resolved(page)
        png, sex = phantoms[0]
        (tmp_path / "hand.png").write_bytes(png)
        expected = post(url, "predict", png, sex=sex).json()
        assess(page, tmp_path / "hand.png", sex)
        assert page.text_content("#spread") == f"{expected['ensemble_spread_months']:.1f}"
        assert page.text_content("#ood") == f"{expected['ood_score']:.1f}" and page.is_visible("#ood-row")
        (tmp_path / "noise.png").write_bytes(noise_png())
        page.set_input_files("#file", str(tmp_path / "noise.png"))
        page.click("#submit")
        expect(page.locator("#error")).to_contain_text("does not look like the hand radiographs", timeout=30_000)
    assert visit.blocked == []



def test_the_page_asks_for_the_api_key_when_the_service_wants_one_and_then_answers(visit, registry, phantoms,
                                                                                  tmp_path, monkeypatch):
    monkeypatch.setenv("BONEAGE_API_KEY", "page-key-0123456789")
    page = visit.page
    with direct_service(registry) as url:  # on loopback, keys are off by default: no key field
        page.goto(f"{url}/")
        header_resolved(page)
        assert not page.is_visible("#key-row")
    with direct_service(registry, "serve.auth=api_key") as url:
        page.goto(f"{url}/")
        expect(page.locator("#model")).to_contain_text("needs an API key", timeout=30_000)  # /v1/model: 401
        assert page.is_visible("#key-row")
        page.fill("#key", "page-key-0123456789")
        page.dispatch_event("#key", "change")
        expect(page.locator("#model")).to_contain_text("tiny version 1", timeout=30_000)
        png, sex = phantoms[0]
        (tmp_path / "hand.png").write_bytes(png)
        assess(page, tmp_path / "hand.png", sex)  # the upload carries the key
        answer = post(url, "predict", png, sex=sex, headers={"X-API-Key": "page-key-0123456789"}).json()
        assert page.text_content("#months") == f"{answer['bone_age_months']:.1f}"
    assert visit.blocked == []
