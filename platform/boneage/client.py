"""A small Python client for the bone-age service (what ``jobs/query.py`` and the demo use).

    client = BoneAgeClient("http://127.0.0.1:8000")
    answer = client.predict("hand.png", sex="F", chronological_age_months=120)
    answer = client.explain("hand.dcm")  # sex from the DICOM header; answer["overlay_png"] holds the PNG bytes
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import requests

from boneage.artifacts import atomic_file
from boneage.config import ConfigError, QueryConfig
from boneage.errors import JobError


class ServiceError(JobError):
    """The service refused the request; ``code`` and ``detail`` come from its JSON error body."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(f"the service answered {status} {code}: {detail}")
        self.status, self.code, self.detail = status, code, detail


class BoneAgeClient:
    """Talks to ``/v1/predict``, ``/v1/explain``, ``/v1/model`` and ``/healthz`` of one service."""

    def __init__(self, url: str, timeout_s: float = 60.0):
        self.url, self.timeout_s = url.rstrip("/"), timeout_s

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
        return self._checked(requests.get(f"{self.url}/v1/model", timeout=self.timeout_s))

    def wait_until_ready(self, timeout_s: float = 300.0) -> None:
        """Poll ``/healthz`` until the model is loaded; raise :class:`ServiceError` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                    return
            except (requests.ConnectionError, requests.Timeout):
                pass  # not listening yet, or the proxy is up and the replica still loading
            time.sleep(1.0)
        raise ServiceError(503, "not_ready", f"{self.url}/healthz did not answer 200 within {timeout_s:g} s")

    def _post(self, route: str, image: str | Path, sex: str | None, age: float | None) -> dict[str, Any]:
        fields = {k: str(v) for k, v in {"sex": sex, "chronological_age_months": age}.items() if v not in (None, "")}
        path = Path(image)
        with path.open("rb") as handle:
            response = requests.post(f"{self.url}/v1/{route}", files={"file": (path.name, handle)}, data=fields,
                                     timeout=self.timeout_s)
        return self._checked(response)

    @staticmethod
    def _checked(response: requests.Response) -> dict[str, Any]:
        if response.ok:
            return response.json()
        try:
            body = response.json()
        except ValueError:
            body = {"error": "http_error", "detail": response.text[:200]}
        raise ServiceError(response.status_code, body.get("error", "http_error"), body.get("detail", ""))


def query_service(query: QueryConfig) -> dict[str, Any]:
    """``jobs/query.py``: predict, or explain and write the overlay when ``query.overlay_out`` is set."""
    if not query.file:
        raise ConfigError("query.file is empty: give the radiograph to assess, e.g. --file hand.png")
    client = BoneAgeClient(query.url, query.timeout_s)
    if query.wait_s:
        client.wait_until_ready(query.wait_s)
    if not query.overlay_out:
        return client.predict(query.file, query.sex, query.chronological_age_months)
    answer = client.explain(query.file, query.sex, query.chronological_age_months)
    with atomic_file(Path(query.overlay_out)) as tmp:
        tmp.write_bytes(answer["overlay_png"])
    return answer


def describe_answer(answer: dict[str, Any]) -> str:
    """One line for people: bone age, sex, SDS and determination when known, model version."""
    text = (f"bone age {answer['bone_age_months']:.1f} months ({answer['bone_age']}), sex {answer['sex']} "
            f"(from the {answer['sex_source']})")
    if "determination" in answer:
        sds = "n/a" if answer["sds"] is None else f"{answer['sds']:+.2f}"
        text += (f"; chronological age {answer['chronological_age_months']:g} months: SDS {sds}, "
                 f"{answer['determination']}")
    return f"{text}; model {answer['model']['name']} version {answer['model']['version']}"
