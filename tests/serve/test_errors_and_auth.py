"""Issue 16's API guarantees: one error shape for every refusal (the framework's 400, 404 and 405 too), one request
ID per request (the client's when it sends one) in the header and the body, errors documented in the OpenAPI
document, API keys when the service is reachable from the network, and a health check that finds a broken model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import requests
import torch

from boneage.api import api_keys
from boneage.bundle import load_bundle, register, write_bundle
from boneage.client import BoneAgeClient, ServiceError
from boneage.config import ConfigError, to_dict
from boneage.inference import BoneAgePredictor, ModelBroken
from cases import APP, direct_service, post, serve_settings
from helpers import make_bundle

ERROR_FIELDS = {"error", "detail", "request_id"}
MULTIPART_WITHOUT_BOUNDARY = {"data": b"abc", "headers": {"Content-Type": "multipart/form-data"}}


def framework_refusals(url: str, upload_limit_mb: float) -> list[tuple[str, requests.Response, int, str]]:
    """(case, response, expected status, code) for refusals that FastAPI and Starlette themselves make (a 2 MB
    form field is the form parser's to refuse, unless the service's upload limit refuses the whole body first)."""
    long_field = (413, "upload_too_large") if upload_limit_mb < 2 else (400, "malformed_request")
    def send(method: str, route: str, **kwargs) -> requests.Response:
        return requests.request(method, f"{url}{route}", timeout=30, **kwargs)

    return [
        ("misspelt route", send("GET", "/v1/predcit"), 404, "not_found"),
        ("GET on an upload route", send("GET", "/v1/predict"), 405, "method_not_allowed"),
        ("POST on a read route", send("POST", "/v1/model"), 405, "method_not_allowed"),
        ("multipart without a boundary", send("POST", "/v1/predict", **MULTIPART_WITHOUT_BOUNDARY), 400,
         "malformed_request"),
        ("multipart that is garbage", send("POST", "/v1/explain", data=b"\x00\xff" * 64,
                                           headers={"Content-Type": "multipart/form-data; boundary=zz"}), 400,
         "malformed_request"),
        ("a form field over 1 MB", send("POST", "/v1/predict", files={"file": ("a.png", b"\x89PNG\r\n\x1a\n")},
                                        data={"sex": "F" * 2**21}), *long_field),
    ]


def request_ids(response: requests.Response) -> list[str]:
    """Every X-Request-ID header of the response (a header sent twice shows twice)."""
    return response.raw.headers.getlist("x-request-id")


def assert_one_error_shape(case: str, response: requests.Response, status: int, code: str) -> None:
    assert response.status_code == status, (case, response.text)
    body = response.json()
    assert set(body) == ERROR_FIELDS and body["error"] == code and body["detail"], (case, body)
    assert request_ids(response) == [body["request_id"]], case


def test_the_frameworks_refusals_answer_in_the_api_error_shape_with_their_request_id(direct_url):
    for case, response, status, code in framework_refusals(direct_url, upload_limit_mb=1):
        assert_one_error_shape(case, response, status, code)
    assert "POST /v1/predict" in requests.get(f"{direct_url}/v1/predcit", timeout=10).json()["detail"]
    refused = requests.get(f"{direct_url}/v1/predict", timeout=10)
    assert refused.headers["Allow"] == "POST" and "use POST" in refused.json()["detail"]


def test_the_frameworks_refusals_through_serve_too(service_url):
    for case, response, status, code in framework_refusals(service_url, upload_limit_mb=32):
        assert_one_error_shape(case, response, status, code)


@pytest.mark.parametrize("accept", ["application/json", "image/png"])
def test_a_clients_request_id_comes_back_once_in_the_header_and_the_body(direct_url, service_url, phantoms, accept):
    png, sex = phantoms[0]
    for url in (direct_url, service_url):
        sent = post(url, "explain", png, sex=sex, headers={"X-Request-ID": "trace-42", "Accept": accept})
        assert sent.status_code == 200 and request_ids(sent) == ["trace-42"], url
        if accept == "application/json":
            assert sent.json()["request_id"] == "trace-42"
        made = post(url, "explain", png, sex=sex, headers={"Accept": accept})
        assert len(request_ids(made)) == 1 and len(request_ids(made)[0]) >= 16, url  # made up, sent once
        refused = post(url, "predict", png, headers={"X-Request-ID": "trace-43"})  # no sex
        assert refused.status_code == 422 and request_ids(refused) == ["trace-43"] == [refused.json()["request_id"]]


def test_the_replica_logs_a_refusal_under_the_clients_request_id(service_url, phantoms, session_temp):
    from helpers import wait_until

    png, _ = phantoms[0]
    assert post(service_url, "predict", png, headers={"X-Request-ID": "find-me-in-the-log-7"}).status_code == 422
    replica_logs = list(session_temp.glob("ray/session_*/logs/serve/replica_*BoneAgeService*.log"))

    def logged() -> bool:
        return any("find-me-in-the-log-7" in path.read_text(errors="replace") for path in replica_logs)

    wait_until(logged, "the replica's log to name the request ID", timeout=30, interval=0.5)
    line = next(line for path in replica_logs for line in path.read_text(errors="replace").splitlines()
                if "find-me-in-the-log-7" in line)
    assert "missing_sex" in line and "\\x89PNG" not in line and "PNG" not in line  # the reason, never the upload


def test_the_openapi_document_lists_each_routes_errors_in_the_error_shape(direct_url):
    document = requests.get(f"{direct_url}/openapi.json", timeout=10).json()
    predict = document["paths"]["/v1/predict"]["post"]["responses"]
    explain = document["paths"]["/v1/explain"]["post"]["responses"]
    for responses in (predict, explain):
        assert {"400", "413", "415", "422", "500"} <= set(responses) and "401" not in responses  # no keys here
        assert responses["422"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    assert set(document["components"]["schemas"]["ErrorBody"]["properties"]) == ERROR_FIELDS
    assert "securitySchemes" not in document.get("components", {})


def test_with_api_keys_v1_needs_one_and_healthz_and_the_pages_stay_open(registry, phantoms, monkeypatch):
    monkeypatch.setenv("BONEAGE_API_KEY", "first-key-0123456789, second-key-0123456789")
    png, sex = phantoms[0]
    with direct_service(registry, "serve.auth=api_key") as url:
        missing = requests.get(f"{url}/v1/model", timeout=10)
        assert_one_error_shape("no key", missing, 401, "unauthorized")
        assert missing.headers["WWW-Authenticate"] == "Bearer" and "X-API-Key" in missing.json()["detail"]
        wrong = requests.get(f"{url}/v1/model", headers={"X-API-Key": "first-key-012345678"}, timeout=10)
        assert_one_error_shape("wrong key", wrong, 401, "unauthorized")
        assert requests.get(f"{url}/v1/model", headers={"X-API-Key": "first-key-0123456789"}, timeout=10).ok
        bearer = {"Authorization": "Bearer second-key-0123456789"}
        assert requests.get(f"{url}/v1/model", headers=bearer, timeout=10).json()["serving"]["api_key_required"]
        assert post(url, "predict", png, sex=sex).status_code == 401
        assert post(url, "predict", png, sex=sex, headers=bearer).status_code == 200
        for open_route in ("/healthz", "/", "/docs", "/openapi.json"):
            assert requests.get(f"{url}{open_route}", timeout=10).status_code == 200, open_route
        document = requests.get(f"{url}/openapi.json", timeout=10).json()
        assert document["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"
        assert "401" in document["paths"]["/v1/predict"]["post"]["responses"]
        with pytest.raises(ServiceError, match="401 unauthorized"):
            BoneAgeClient(url).model()
        assert BoneAgeClient(url, api_key="second-key-0123456789").model()["model"]["version"] == "1"


def test_a_client_without_a_key_is_refused_before_its_upload_is_read(registry, monkeypatch):
    import http.client

    monkeypatch.setenv("BONEAGE_API_KEY", "only-key-0123456789")
    with direct_service(registry, "serve.auth=api_key") as url:
        host, port = url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        connection.putrequest("POST", "/v1/predict")
        connection.putheader("Content-Type", "multipart/form-data; boundary=b")
        connection.putheader("Content-Length", str(10 * 2**20))  # announced, never sent: only an early answer returns
        connection.endheaders(b"--b\r\n")
        response = connection.getresponse()
        assert response.status == 401 and json.loads(response.read())["error"] == "unauthorized"
        connection.close()


@pytest.mark.parametrize("auth, host, key, outcome", [
    ("auto", "127.0.0.1", "", ()),
    ("auto", "::1", "", ()),
    ("auto", "localhost", "k-1", ()),  # a key in the environment is not needed on loopback with auto
    ("auto", "0.0.0.0", "k-1,k-2", ("k-1", "k-2")),
    ("auto", "10.1.2.3", "", "needs an API key, but $BONEAGE_API_KEY is empty"),
    ("auto", "bone-age.example.org", "", "needs an API key"),  # a host name may resolve to anything
    ("api_key", "127.0.0.1", "", "serve.auth=api_key, so it needs an API key"),
    ("api_key", "127.0.0.1", " k-1 ", ("k-1",)),
    ("none", "127.0.0.1", "", ()),
    ("none", "0.0.0.0", "k-1", "serve.auth=none on 0.0.0.0: the service would answer anyone on the network"),
])
def test_keys_are_required_off_loopback_and_never_silently_dropped(registry, monkeypatch, auth, host, key, outcome):
    monkeypatch.setenv("BONEAGE_API_KEY", key)
    settings = serve_settings(registry, f"serve.auth={auth}")
    if isinstance(outcome, tuple):
        assert api_keys(settings, host) == outcome
    else:
        with pytest.raises(ConfigError, match=outcome.replace("$", r"\$")):
            api_keys(settings, host)


def test_the_health_check_finds_a_model_whose_weights_went_bad(registry):
    predictor = BoneAgePredictor.from_settings(serve_settings(registry))
    predictor.check()  # healthy
    with torch.no_grad():
        next(predictor.members[0].parameters()).fill_(math.nan)
    with pytest.raises(ModelBroken, match="weights are damaged"):
        predictor.check()


def test_serve_refuses_to_start_a_replica_on_a_bundle_that_answers_nan(ray_session, serve_port, tmp_path):
    from ray import serve

    from boneage.service import service_app

    folder, model = make_bundle(tmp_path / "nan", seed=3, name="broken")
    state = {k: v.fill_(math.nan) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    write_bundle(folder, state, load_bundle(folder).meta)  # checksums of the NaN weights: a valid, broken bundle
    register(folder, tmp_path / "registry", "broken")
    args = to_dict(serve_settings(tmp_path / "registry", "serve.model_uri=broken:1"))
    with pytest.raises(RuntimeError, match="Deploying application boneage-broken failed"):
        serve.run(service_app(args, {"ray_actor_options": {"num_cpus": 0.25}, "num_replicas": 1}),
                  name=f"{APP}-broken", route_prefix="/broken")
    why = serve.status().applications[f"{APP}-broken"].deployments["BoneAgeService"].message
    serve.delete(f"{APP}-broken")
    assert "ModelBroken" in why and "weights are damaged" in why  # what `serve status` shows the user
    assert np.isnan(BoneAgePredictor(load_bundle(tmp_path / "registry" / "broken" / "1")).predict_raw(
        np.zeros((1, 64, 64), np.uint8), np.array([True]))).all()
