"""The HTTP API on a plain uvicorn server (no Ray): every route, and every bad input answered 4xx JSON, after which
the service still answers a good request."""

from __future__ import annotations

import base64
import http.client
import io
import json
import re

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from boneage.precision import resolve_precision
from boneage.metrics import AGE_BANDS
from boneage.standards import assess
from cases import AGE_FIELD, bad_requests, direct_service, months_in_process, post
from boneage.imaging import decode_grayscale, fit_to_square
from images import write_dicom, write_jpeg, write_png16


def phantom_png(phantom_dir) -> bytes:
    return sorted(phantom_dir.rglob("*.png"))[0].read_bytes()


def test_predict_answers_bone_age_sds_and_model(direct_url, phantom_dir, local_predictor):
    answer = post(direct_url, "predict", phantom_png(phantom_dir), sex="F", **{AGE_FIELD: "120"}).json()
    expected = months_in_process(local_predictor, phantom_png(phantom_dir), "F")  # the same model in this process
    assert answer["bone_age_months"] == pytest.approx(expected, abs=0.06) and answer["bone_age"].endswith("months")
    assert answer["sex"] == "F" and answer["sex_source"] == "form"
    assert answer["chronological_age_months"] == 120.0
    assert answer["determination"] in ("delayed", "normal", "advanced", "indeterminate")  # see the interval tests
    expected_sds = (answer["bone_age_months"] - 125.66) / 11.73  # girls at 120 months: mean 125.66, SD 11.73
    assert answer["sds"] == pytest.approx(expected_sds, abs=0.02)
    assert answer["model"] == {"name": "tiny", "version": "1"} and len(answer["request_id"]) == 32


def test_predict_without_age_has_no_sds(direct_url, phantom_dir):
    answer = post(direct_url, "predict", phantom_png(phantom_dir), sex="m").json()
    assert answer["sex"] == "M" and "sds" not in answer and "determination" not in answer


def test_age_outside_the_reference_is_indeterminate(direct_url, phantom_dir):
    answer = post(direct_url, "predict", phantom_png(phantom_dir), sex="F", **{AGE_FIELD: "230"}).json()
    assert answer["determination"] == "indeterminate" and answer["sds"] is None


def test_explain_gives_the_same_age_with_an_overlay_and_a_heat_map_grid(direct_url, phantom_dir):
    png = phantom_png(phantom_dir)
    predicted = post(direct_url, "predict", png, sex="F").json()["bone_age_months"]
    answer = post(direct_url, "explain", png, sex="F").json()
    assert answer["bone_age_months"] == pytest.approx(predicted, abs=0.05)
    overlay = Image.open(io.BytesIO(base64.b64decode(answer["overlay_png_base64"])))
    assert overlay.format == "PNG" and overlay.size == (128, 128) and overlay.mode == "RGB"
    grid = np.array(answer["heatmap"])
    assert grid.shape == (16, 16) and grid.min() >= 0 and grid.max() <= 1 and grid.max() > 0


def test_explain_returns_the_png_itself_when_asked(direct_url, phantom_dir):
    response = post(direct_url, "explain", phantom_png(phantom_dir), headers={"Accept": "image/png"}, sex="M")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (128, 128)
    assert float(response.headers["X-Bone-Age-Months"]) > 0


def test_jpeg_and_dicom_are_read_and_dicom_supplies_the_sex(direct_url, tmp_path):
    jpeg = post(direct_url, "predict", write_jpeg(tmp_path / "a.jpg").read_bytes(), "a.jpg", sex="F")
    assert jpeg.status_code == 200
    dicom = post(direct_url, "predict", write_dicom(tmp_path / "a.dcm").read_bytes(), "a.dcm")  # PatientSex F
    assert dicom.status_code == 200 and dicom.json()["sex"] == "F" and dicom.json()["sex_source"] == "dicom"


def test_model_health_page_and_docs(direct_url):
    model = requests.get(f"{direct_url}/v1/model", timeout=10).json()
    assert model["model"]["version"] == "1" and model["image_size"] == 64 and len(model["weights_sha256"]) == 64
    assert model["metrics"]["val_mae"] == 19.0
    chosen = resolve_precision("auto", torch.device("cpu"), "predict")  # what the service computes in, said so
    assert model["serving"]["precision"] == chosen and model["serving"]["computes_in"].startswith(f"precision {chosen}")
    assert requests.get(f"{direct_url}/healthz", timeout=10).json()["status"] == "ok"
    page = requests.get(direct_url, timeout=10)
    assert page.headers["content-type"].startswith("text/html") and 'id="query"' in page.text
    schema = requests.get(f"{direct_url}/openapi.json", timeout=10).json()
    assert {"/v1/predict", "/v1/explain", "/v1/model", "/healthz"} <= set(schema["paths"])


def test_the_page_and_everything_it_links_stay_on_this_service(direct_url):
    page = requests.get(direct_url, timeout=10).text
    assert not re.findall(r"\b(?:https?|wss?|ftp):|[\s\"'(=]//\w", page)  # no absolute or protocol-relative URL
    links = LINKS.findall(page)  # scripts, styles, images, icons, forms, fetch and import targets, CSS url()
    assert any(link.startswith("v1/") for link in links), links  # the page's own API calls are found
    paths = requests.get(f"{direct_url}/openapi.json", timeout=10).json()["paths"]
    for link in links:
        if link.startswith("data:"):
            continue  # inline, nothing to fetch
        path = "/" + link.split("?")[0].removeprefix("./").lstrip("/")
        assert path in paths or requests.get(f"{direct_url}{path}", timeout=10).status_code == 200, link


LINKS = re.compile(r"""(?:\b(?:src|href|action|srcset|poster)\s*=\s*["']|\b(?:fetch|import)\(\s*["'`]|url\(\s*["']?)"""
                   r"""([^"'`)\s]+)""")


@pytest.mark.parametrize("route", ["docs", "redoc"])
def test_the_docs_load_their_assets_from_this_service(direct_url, route):
    page = requests.get(f"{direct_url}/{route}", timeout=10)
    assert page.status_code == 200
    assets = re.findall(r'(?:src|href|spec-url)="([^"]+)"', page.text) + re.findall(r"url: '([^']+)'", page.text)
    assert any(asset.endswith(".js") for asset in assets), page.text
    for asset in assets:
        assert asset.startswith("/"), f"{asset} is not on this service"
        assert requests.get(f"{direct_url}{asset}", timeout=10).status_code == 200, asset


@pytest.mark.parametrize("kind", ["dicom", "png16"])
@pytest.mark.parametrize("route", ["predict", "explain"])
def test_the_canvas_is_the_radiograph_as_decoded_and_only_when_asked(direct_url, tmp_path, kind, route):
    path = write_dicom(tmp_path / "a.dcm") if kind == "dicom" else write_png16(tmp_path / "a.png")
    data = path.read_bytes()
    assert "canvas_png_base64" not in post(direct_url, route, data, path.name, sex="F").json()
    answer = post(direct_url, f"{route}?canvas=true", data, path.name, sex="F").json()
    canvas = Image.open(io.BytesIO(base64.b64decode(answer["canvas_png_base64"])))
    assert canvas.format == "PNG" and canvas.mode == "L" and canvas.size == (128, 128)  # serve.overlay_size
    expected = fit_to_square(decode_grayscale(data), 128)  # windowed to 8 bits, framed as the model sees it
    assert np.array_equal(np.asarray(canvas), expected) and expected.max() == 255


def test_a_canvas_option_that_is_not_a_yes_or_no_is_refused(direct_url, phantom_dir):
    response = post(direct_url, "explain?canvas=perhaps", phantom_png(phantom_dir), sex="F")
    assert response.status_code == 422 and response.json()["error"] == "invalid_request"
    assert "canvas" in response.json()["detail"]


@pytest.mark.parametrize("route", ["predict", "explain"])
def test_every_bad_input_answers_4xx_json_and_the_service_keeps_serving(direct_url, phantom_dir, tmp_path, route):
    png = phantom_png(phantom_dir)
    for case, kwargs, status, code in bad_requests(tmp_path, png):
        response = requests.post(f"{direct_url}/v1/{route}", timeout=60, **kwargs)
        assert response.status_code == status, (case, response.text)
        body = response.json()
        assert body["error"] == code and body["detail"], case
        assert post(direct_url, route, png, sex="F").status_code == 200, f"after {case}"


def test_a_declared_body_over_the_limit_is_refused_before_it_is_read(direct_url):
    host, port = direct_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.putrequest("POST", "/v1/predict")
    connection.putheader("Content-Type", "multipart/form-data; boundary=b")
    connection.putheader("Content-Length", str(50 * 2**20))  # announced, never sent
    connection.endheaders(b"--b\r\n")
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"] == "upload_too_large"
    connection.close()


def test_every_answer_carries_its_interval_and_says_it_is_bias_corrected(direct_url, phantom_dir, local_predictor):
    png = phantom_png(phantom_dir)
    answer = post(direct_url, "predict", png, sex="F").json()
    months = months_in_process(local_predictor, png, "F")  # bias-corrected: tiny:1 has trust signals
    raw = float(local_predictor.predict_raw(local_predictor.decode(png).canvas[None], np.array([False]))[0])
    assert answer["calibrated"] is True and answer["bone_age_months"] == pytest.approx(months, abs=0.06)
    assert abs(months - raw) > 5  # the correction changed the answer: it is far from the identity
    low, high = local_predictor.interval(np.array([months]), np.array([False]))
    assert answer["interval_months"] == pytest.approx([low[0], high[0]], abs=0.06) and answer["interval_level"] == 0.9
    assert answer["interval_months"][0] < answer["bone_age_months"] < answer["interval_months"][1]
    explained = post(direct_url, "explain", png, sex="F").json()
    assert explained["interval_months"] == answer["interval_months"] and explained["calibrated"] is True


def test_a_determination_the_interval_spans_is_indeterminate(direct_url, phantom_dir):
    png = phantom_png(phantom_dir)
    low, high = post(direct_url, "predict", png, sex="F").json()["interval_months"]

    def determinations(age: int, margin: float) -> set[str]:  # margin: the answer's ends are rounded to 0.1
        return {assess(end, "F", age).determination for end in (low + margin, high - margin)}

    spanned = [age for age in range(0, 229) if len(determinations(age, 0.1)) > 1]
    settled = [age for age in range(0, 229) if determinations(age, -0.1) in ({"normal"}, {"advanced"}, {"delayed"})]
    assert spanned and settled, "the interval should span a determination at some ages and not at others"
    answer = post(direct_url, "predict", png, sex="F", **{AGE_FIELD: str(spanned[0])}).json()
    assert answer["determination"] == "indeterminate" and isinstance(answer["sds"], float)
    sds_low, sds_high = answer["sds_interval"]
    assert sds_low < answer["sds"] < sds_high
    answer = post(direct_url, "predict", png, sex="F", **{AGE_FIELD: str(settled[0])}).json()
    assert {answer["determination"]} == determinations(settled[0], -0.1)


def test_the_model_route_shows_the_trust_signals_and_the_docs_every_answer_field(direct_url):
    trust = requests.get(f"{direct_url}/v1/model", timeout=10).json()["trust"]
    assert trust["available"] and trust["applied"] and trust["interval_level"] == 0.9
    assert trust["calibration"]["slope"] > 1.2  # synthetic_trust's answers were pulled 30% toward the mean
    assert set(trust["interval_half_width_months"]) == {f"{band.name} {sex}" for band in AGE_BANDS for sex in "MF"}
    assert trust["val_calibrated"]["overall"]["mae"] < trust["val_raw"]["overall"]["mae"]
    schema = requests.get(f"{direct_url}/openapi.json", timeout=10).json()
    answer = schema["components"]["schemas"]["Answer"]["properties"]
    assert {"bone_age_months", "interval_months", "interval_level", "calibrated", "sds", "sds_interval",
            "determination", "model", "request_id"} <= set(answer)
    assert all(field.get("description") for name, field in answer.items() if name != "model"), answer
    explained = schema["paths"]["/v1/explain"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert explained["$ref"].endswith("/Explained")


def test_a_bundle_without_trust_signals_answers_raw_and_says_why(registry, phantom_dir):
    with direct_service(registry, "serve.model_uri=tiny:2") as url:
        answer = post(url, "predict", phantom_png(phantom_dir), sex="F").json()
        assert answer["calibrated"] is False and answer["interval_months"] is None
        trust = requests.get(f"{url}/v1/model", timeout=10).json()["trust"]
        assert not trust["available"] and "before trust signals" in trust["note"]
