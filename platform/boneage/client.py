"""A small Python client for the bone-age service (what ``jobs/query.py`` and the demo use).

    client = BoneAgeClient("http://127.0.0.1:8000")  # api_key=... for a service that requires one
    answer = client.predict("hand.png", sex="F", chronological_age_months=120)
    answer = client.explain("hand.dcm")  # sex from the DICOM header; answer["overlay_png"] holds the PNG bytes
"""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from boneage.artifacts import atomic_file
from boneage.config import ConfigError, QueryConfig
from boneage.errors import JobError


UNAVAILABLE = (502, 503, 504)  # what a proxy answers while the replicas start or are overloaded


class ServiceError(JobError):
    """The service refused the request; ``code`` and ``detail`` come from its JSON error body."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(f"the service answered {status} {code}: {detail}")
        self.status, self.code, self.detail = status, code, detail


class ServiceUnreachable(JobError, ConnectionError):
    """Nothing answered at the service's address (not started, stopped, or the wrong host or port)."""


class WrongServiceAddress(JobError, ValueError):
    """The address is not a URL, or something other than the bone-age service answers there."""


class RadiographNotFound(JobError, FileNotFoundError):
    """The radiograph file to send does not exist."""


class BoneAgeClient:
    """Talks to ``/v1/predict``, ``/v1/explain``, ``/v1/model`` and ``/healthz`` of one service."""

    def __init__(self, url: str, timeout_s: float = 60.0, api_key: str = ""):
        try:
            requests.Request("GET", url).prepare()  # requests' own checks: scheme, host, port
            valid = urlsplit(url).scheme in ("http", "https")
        except (requests.RequestException, ValueError):
            valid = False
        if not valid:
            raise WrongServiceAddress(f"{url!r} is not a service address: give one like http://127.0.0.1:8000 "
                                "(query.url, --url)")
        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        self.headers = {"X-API-Key": api_key} if api_key else {}

    def predict(self, image: str | Path, sex: str | None = None,
                chronological_age_months: float | None = None) -> dict[str, Any]:
        """The bone age (and SDS when the age is given) of one radiograph file."""
        return self._post("predict", image, sex, chronological_age_months)

    def explain(self, image: str | Path, sex: str | None = None,
                chronological_age_months: float | None = None) -> dict[str, Any]:
        """As :meth:`predict`, plus ``overlay_png`` (bytes) and ``heatmap`` (a grid of floats in [0, 1])."""
        answer = self._post("explain", image, sex, chronological_age_months)
        answer["overlay_png"] = base64.b64decode(answer.pop("overlay_png_base64"))
        return answer

    def model(self) -> dict[str, Any]:
        """The served bundle's metadata and metrics."""
        return self._request("get", "v1/model")

    def wait_until_ready(self, timeout_s: float = 300.0) -> None:
        """Poll ``/healthz`` until the model is loaded; raise :class:`ServiceError` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        last = "nothing listening"
        while time.monotonic() < deadline:
            try:
                response = requests.get(f"{self.url}/healthz", timeout=5)
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}"  # the proxy is up and the replica still loading
            except (requests.ConnectionError, requests.Timeout):
                pass  # not listening yet
            time.sleep(1.0)
        raise ServiceError(503, "not_ready", f"{self.url}/healthz did not answer 200 within {timeout_s:g} s (last: "
                                             f"{last}): check that the service was deployed at this address")

    def _post(self, route: str, image: str | Path, sex: str | None, age: float | None) -> dict[str, Any]:
        fields = {k: str(v) for k, v in {"sex": sex, "chronological_age_months": age}.items() if v not in (None, "")}
        path = Path(image)
        if not path.is_file():
            raise RadiographNotFound(f"radiograph {path} does not exist: give the path of a PNG, JPEG or DICOM file")
        with path.open("rb") as handle:
            answer = self._request("post", f"v1/{route}", files={"file": (path.name, handle)}, data=fields)
        if "bone_age_months" not in answer:
            raise WrongServiceAddress(f"{self.url}/v1/{route} answered JSON without a bone age: {self.url} is not the "
                                "bone-age service; check query.url (--url)")
        return answer

    def _request(self, method: str, route: str, **kwargs: Any) -> dict[str, Any]:
        """One request, its failures as one-line errors saying what to do; the JSON answer when it succeeded."""
        try:
            response = requests.request(method, f"{self.url}/{route}", timeout=self.timeout_s, headers=self.headers,
                                        **kwargs)
        except requests.ConnectionError:
            raise ServiceUnreachable(f"nothing answers at {self.url}: start the service (serve deploy configs/"
                                     "serve.yaml, or make demo) or give its address (query.url, --url)") from None
        except requests.Timeout:
            raise ServiceError(504, "timeout", f"{self.url} did not answer within {self.timeout_s:g} s: the service "
                                               "may be busy or starting; raise query.timeout_s") from None
        return self._checked(response)

    def _checked(self, response: requests.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code in UNAVAILABLE and not isinstance(body, dict):  # Ray Serve's proxy, not our API
            said = " ".join(response.text.split())[:120]  # one line
            raise ServiceError(response.status_code, "unavailable", f"{said}: the service is starting or "
                                                                    "overloaded; retry, or set query.wait_s")
        if not isinstance(body, dict) or (not response.ok and "error" not in body):
            what = response.headers.get("content-type", "no content type").split(";")[0]
            raise WrongServiceAddress(f"{response.url} answered {response.status_code} with {what}, not the "
                                      "bone-age service's JSON: check query.url (--url), e.g. http://127.0.0.1:8000")
        if not response.ok:
            raise ServiceError(response.status_code, body["error"], body.get("detail", ""))
        return body


def query_service(query: QueryConfig) -> dict[str, Any]:
    """``jobs/query.py``: predict, or explain and write the overlay when ``query.overlay_out`` is set."""
    if not query.file:
        raise ConfigError("query.file is empty: give the radiograph to assess, e.g. --file hand.png")
    client = BoneAgeClient(query.url, query.timeout_s, os.environ.get(query.api_key_env, ""))
    if query.wait_s:
        client.wait_until_ready(query.wait_s)
    if not query.overlay_out:
        return client.predict(query.file, query.sex, query.chronological_age_months)
    answer = client.explain(query.file, query.sex, query.chronological_age_months)
    with atomic_file(Path(query.overlay_out)) as tmp:
        tmp.write_bytes(answer["overlay_png"])
    return answer


def describe_answer(answer: dict[str, Any]) -> str:
    """One line for people: bone age with its interval (and an ensemble's spread, the out-of-distribution score
    when the model has a detector), sex, SDS and determination when known, model version."""
    text = f"bone age {answer['bone_age_months']:.1f} months ({answer['bone_age']})"
    if answer.get("interval_months"):
        low, high = answer["interval_months"]
        text += f", {answer['interval_level']:.0%} interval {low:.1f}-{high:.1f}"
    if "ensemble_spread_months" in answer:
        text += f", ensemble members' SD {answer['ensemble_spread_months']:.1f}"
    if "ood_score" in answer:
        text += f", out-of-distribution score {answer['ood_score']:.1f}"
    text += (f"{'' if answer.get('calibrated') else ' (not bias-corrected)'}, sex {answer['sex']} "
             f"(from the {answer['sex_source']})")
    if "determination" in answer:
        sds = "n/a" if answer["sds"] is None else f"{answer['sds']:+.2f}"
        text += (f"; chronological age {answer['chronological_age_months']:g} months: SDS {sds}, "
                 f"{answer['determination']}")
    return f"{text}; model {answer['model']['name']} version {answer['model']['version']}"
