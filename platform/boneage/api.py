"""The versioned HTTP API (FastAPI): routes, input checks, answers and errors, whatever runs the model.

``create_api(backend, settings)`` builds the app. The Ray Serve deployment (:mod:`boneage.service`) is one backend,
batching predictions across requests; :class:`DirectBackend` runs the same model code in-process (the plain
uvicorn server the latency benchmark compares against). ``/docs`` and ``/redoc`` load Swagger UI and ReDoc from the
installed ``fastapi-offline`` package, never from a CDN, so they work on a network without internet.

Every bad input answers a 4xx JSON body ``{"error": <code>, "detail": <sentence>}`` and the service keeps serving;
an image the bundle's out-of-distribution detector finds unlike hand radiographs answers 422
``not_a_hand_radiograph`` (unless ``serve.reject_ood`` is off), before any Grad-CAM is computed.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import time
import uuid
from importlib import resources
from typing import Any, Protocol

import numpy as np
import uvicorn
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi import Query as QueryParameter
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from PIL import Image, UnidentifiedImageError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from boneage.bundle import BundleMeta
from boneage.config import ServeConfig, to_dict
from boneage.imaging import ImageRejected, is_dicom
from boneage.inference import Answers, BoneAgePredictor, Explanation, Radiograph, encode_png, heatmap_grid
from boneage.schema import Answer, Explained
from boneage.standards import MAX_AGE_MONTHS, assess, years_and_months

log = logging.getLogger(__name__)

API_VERSION = "v1"
# Metric labels: anything else is "other", so scanners cannot blow up the label set.
ROUTES = (f"/{API_VERSION}/predict", f"/{API_VERSION}/explain", f"/{API_VERSION}/model", "/healthz", "/", "/docs",
          "/redoc", "/openapi.json")
ACCEPTED_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")  # PNG, JPEG; DICOM is checked by its preamble
# The pages (/, /docs, /redoc) load only from this service, so they work on a network without internet, and what
# a library reaches for elsewhere (ReDoc 2's Redocly logo, hard-coded to cdn.redoc.ly) the browser stops before
# it is requested. Inline scripts and styles: the page's own, Swagger UI's start-up, ReDoc's styled components.
PAGE_POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
               "img-src 'self' data:; worker-src 'self' blob:")


class Metrics(Protocol):
    """What the API reports; the Serve backend exports it through Ray's metrics."""

    def request(self, route: str, status: int, seconds: float) -> None: ...
    def rejection(self, reason: str) -> None: ...
    def prediction(self, seconds: float) -> None: ...
    def gradcam(self, seconds: float) -> None: ...


class Backend(Protocol):
    """Runs the model for the API."""

    predictor: BoneAgePredictor
    metrics: Metrics

    async def answer(self, canvas: np.ndarray, male: bool) -> Answers: ...
    def runtime(self) -> dict[str, Any]: ...


class NoMetrics:
    """Metrics that go nowhere (the plain server)."""

    def request(self, route: str, status: int, seconds: float) -> None: ...
    def rejection(self, reason: str) -> None: ...
    def prediction(self, seconds: float) -> None: ...
    def gradcam(self, seconds: float) -> None: ...


class DirectBackend:
    """One request, one forward pass, in a worker thread of this process: no batching, no Ray."""

    def __init__(self, predictor: BoneAgePredictor):
        self.predictor = predictor
        self.metrics = NoMetrics()

    async def answer(self, canvas: np.ndarray, male: bool) -> Answers:
        return await asyncio.to_thread(self.predictor.answer, canvas[None], np.array([male]))

    def runtime(self) -> dict[str, Any]:
        return {"backend": "direct"}


class ApiError(Exception):
    """An answer other than 200: HTTP status, error code and a sentence for the user."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def create_api(backend: Backend, settings: ServeConfig) -> FastAPI:
    """The FastAPI app: ``/v1/predict``, ``/v1/explain``, ``/v1/model``, ``/healthz``, ``/``, ``/docs`` and
    ``/redoc`` (their assets under the request's root path, so they work behind any Serve route prefix)."""
    app = FastAPIOffline(title="Bone age", version=API_VERSION,
                         description="Pediatric bone age from a left-hand radiograph, with Grad-CAM heat maps. "
                                     "Research use only: not a medical device.")
    app.add_middleware(BodyLimit, limit=int(settings.max_upload_mb * 1024 * 1024))
    app.add_middleware(RequestMetrics, metrics=backend.metrics)
    app.add_middleware(LocalOnlyPages)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
    _add_assessment_routes(app, backend, settings)
    _add_service_routes(app, backend)
    return app


def _add_assessment_routes(app: FastAPI, backend: Backend, settings: ServeConfig) -> None:
    """``/v1/predict`` and ``/v1/explain``: a radiograph in, its bone age out."""
    given = _parameters()

    @app.post(f"/{API_VERSION}/predict", summary="Bone age of one radiograph", response_model=Answer,
              response_model_exclude_unset=True,
              description=f"The bone age with its prediction interval, and the SDS when the chronological age is "
                          f"given. {CANVAS_DOC}")
    async def predict(request: Request, file: UploadFile | None = given["file"], sex: str | None = given["sex"],
                      chronological_age_months: str | None = given["age"],
                      canvas: bool = given["canvas"]) -> Answer:
        query = await _read_query(request, backend, file, sex, chronological_age_months)
        answers = await _answers(query, backend)
        return Answer(**_answer(answers, query, backend), **await _canvas_field(query, canvas))

    @app.post(f"/{API_VERSION}/explain", summary="Bone age with its Grad-CAM heat map",
              description="As /v1/predict, plus `overlay_png_base64` (the Grad-CAM overlay on the radiograph) and "
                          f"`heatmap` (the raw map, averaged to a grid). {CANVAS_DOC}",
              responses={200: {"model": Explained, "content": {"image/png": {}},
                               "description": "JSON, or the overlay PNG itself with Accept: image/png"}})
    async def explain(request: Request, file: UploadFile | None = given["file"], sex: str | None = given["sex"],
                      chronological_age_months: str | None = given["age"],
                      canvas: bool = given["canvas"]) -> Response:
        query = await _read_query(request, backend, file, sex, chronological_age_months)
        answers = await _answers(query, backend)  # first: an image that is not a hand gets no heat map
        started = time.perf_counter()
        result: Explanation = await asyncio.to_thread(backend.predictor.explain, query.radiograph, query.sex == "M")
        backend.metrics.gradcam(time.perf_counter() - started)
        answer = _answer(answers, query, backend)
        if "image/png" in request.headers.get("accept", ""):
            return Response(result.overlay_png, media_type="image/png",
                            headers={"X-Bone-Age-Months": f"{answer['bone_age_months']}",
                                     "X-Request-ID": answer["request_id"]})
        explained = Explained(**answer, overlay_png_base64=base64.b64encode(result.overlay_png).decode(),
                              heatmap=heatmap_grid(result.heatmap, settings.heatmap_cells),
                              **await _canvas_field(query, canvas))
        return JSONResponse(explained.model_dump(exclude_unset=True))


def _add_service_routes(app: FastAPI, backend: Backend) -> None:
    """``/v1/model``, ``/healthz`` and the web page at ``/``."""

    @app.get(f"/{API_VERSION}/model", summary="The served model: bundle metadata, metrics and serving settings")
    async def model() -> dict[str, Any]:
        meta = backend.predictor.bundle.meta
        return {"model": _model_id(backend), "image_size": meta.image_size, "architecture": to_dict(meta.model),
                "metrics": meta.metrics, "data": to_dict(meta.data), "created": meta.created,
                "weights_sha256": meta.weights_sha256, "code_version": meta.code_version,
                "trust": _trust(backend.predictor), "ood": _ood(backend.predictor),
                "ensemble": _ensemble(meta), "bundle_format": meta.format,
                "serving": {**backend.runtime(), "precision": backend.predictor.precision, "device": "cpu",
                            "tta": backend.predictor.tta,
                            "computes_in": backend.predictor.computes_in}}

    @app.get("/healthz", summary="200 once the model is loaded")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "model": _model_id(backend)["version"]}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("boneage").joinpath("resources/index.html").read_text())


def _trust(predictor: BoneAgePredictor) -> dict[str, Any]:
    """The bundle's trust signals as served, or why there are none."""
    if predictor.trust is None:
        return {"available": False, "note": "this bundle was written before trust signals (bundle format 1): its "
                                            "answers are the network's, without bias correction or intervals; "
                                            "re-export it from its training run to add them"}
    return {"available": True, **predictor.trust.summary(predictor.calibrated, predictor.interval_level)}


def _ood(predictor: BoneAgePredictor) -> dict[str, Any]:
    """The bundle's out-of-distribution detector as served, or why there is none."""
    if predictor.ood is None:
        return {"available": False, "note": "this bundle has no out-of-distribution detector (written before it "
                                            "existed): every image gets a bone age; re-export it to add one"}
    return {"available": True, "rejecting": predictor.rejects_ood, **predictor.ood.summary()}


def _ensemble(meta: BundleMeta) -> list[dict[str, Any]] | None:
    """An ensemble's members (their models and own val MAE), or None for a single model."""
    return [{"architecture": to_dict(m.model), "val_mae": m.val_mae, "run": m.run} for m in meta.members] or None


CANVAS_DOC = ("With `?canvas=true` the JSON answer also holds `canvas_png_base64`: the radiograph as the service "
              "decoded it (DICOM and 16-bit PNG windowed to 8 bits, framed on the square the model saw), as a "
              "grayscale PNG at the overlay's size, for showing uploads a browser cannot draw. Off by default: it "
              "adds a PNG encoding and, at 384 px, about 60-75 KB (some 40% of the overlay's size).")


def _parameters() -> dict[str, Any]:
    # Form fields optional at the schema level: missing ones get this API's own error body instead of FastAPI's.
    return {"file": File(None, description="the radiograph: PNG, JPEG or DICOM"),
            "sex": Form(None, description="M or F; may be omitted only for a DICOM file with PatientSex"),
            "age": Form(None, description=f"chronological age in months (0-{MAX_AGE_MONTHS:g}), for the SDS"),
            "canvas": QueryParameter(False, description="also answer `canvas_png_base64`, the decoded radiograph "
                                                        "(JSON answers only)")}


class Query:
    """A checked request: the decoded image, the sex used (and where it came from), the chronological age."""

    def __init__(self, radiograph: Radiograph, sex: str, sex_source: str, age: float | None):
        self.radiograph, self.sex, self.sex_source, self.age = radiograph, sex, sex_source, age
        self.request_id = uuid.uuid4().hex


async def _read_query(request: Request, backend: Backend, file: UploadFile | None, sex: str | None,
                      age: str | None) -> Query:
    try:
        return await _checked_query(request, backend, file, sex, age)
    except ApiError as err:
        backend.metrics.rejection(err.code)
        raise


async def _checked_query(request: Request, backend: Backend, file: UploadFile | None, sex: str | None,
                         age: str | None) -> Query:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(415, "unsupported_media_type", "send multipart/form-data with a 'file' field (the "
                                                      "radiograph) and a 'sex' field (M or F)")
    if file is None:
        raise ApiError(422, "missing_file", "the form has no 'file' field: attach the radiograph as 'file'")
    data = await file.read()  # BodyLimit has already refused a body over the upload limit
    if not data:
        raise ApiError(400, "empty_file", "the uploaded file is empty")
    _check_format(data)
    chronological = _parse_age(age)
    try:
        radiograph = await asyncio.to_thread(backend.predictor.decode, data)
    except ImageRejected as err:
        raise ApiError(413 if err.code == "decompression_bomb" else 422, err.code,
                       err.reason.removeprefix(f"{err.code}: ")) from None
    chosen, source = _resolve_sex(sex, radiograph.dicom_sex)
    return Query(radiograph, chosen, source, chronological)


def _check_format(data: bytes) -> None:
    if data.startswith(ACCEPTED_MAGIC) or is_dicom(data):
        return
    try:
        found = Image.open(io.BytesIO(data)).format
    except (UnidentifiedImageError, OSError):
        found = None
    if found:
        raise ApiError(415, "unsupported_image_format", f"{found} images are not supported: send PNG, JPEG or "
                                                        "DICOM")
    raise ApiError(422, "not_an_image", "the file is not a PNG, JPEG or DICOM image")


def _parse_age(text: str | None) -> float | None:
    if text is None or not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        raise ApiError(422, "invalid_chronological_age", f"chronological_age_months={text!r} is not a number "
                                                         "of months") from None
    if not 0 <= value <= MAX_AGE_MONTHS:
        raise ApiError(422, "invalid_chronological_age", f"chronological_age_months={value:g} is out of range: "
                                                         f"0 to {MAX_AGE_MONTHS:g} months")
    return value


def _resolve_sex(form_sex: str | None, dicom_sex: str | None) -> tuple[str, str]:
    """Sex from the form or the DICOM header; a missing, invalid or contradictory one is an error, never a guess."""
    if form_sex is None or not form_sex.strip():
        if dicom_sex is None:
            raise ApiError(422, "missing_sex", "give 'sex' as M or F (bone age norms differ by sex; it is never "
                                               "guessed)")
        return dicom_sex, "dicom"
    sex = form_sex.strip().upper()
    if sex not in ("M", "F"):
        raise ApiError(422, "invalid_sex", f"sex={form_sex!r} must be M or F")
    if dicom_sex is not None and dicom_sex != sex:
        raise ApiError(422, "sex_conflict", f"sex={sex} contradicts the DICOM header's PatientSex={dicom_sex}")
    return sex, "form"


async def _canvas_field(query: Query, wanted: bool) -> dict[str, str]:
    """``canvas_png_base64`` (the display canvas as PNG) when the client asked for it, else nothing."""
    if not wanted:
        return {}
    png = await asyncio.to_thread(encode_png, query.radiograph.display)
    return {"canvas_png_base64": base64.b64encode(png).decode()}


async def _answers(query: Query, backend: Backend) -> Answers:
    """The backend's answer for the query's image (batched with others by Serve); 422 ``not_a_hand_radiograph``
    when the bundle's out-of-distribution detector refuses it."""
    started = time.perf_counter()
    answers = await backend.answer(query.radiograph.canvas, query.sex == "M")
    backend.metrics.prediction(time.perf_counter() - started)
    if answers.unlike_hands[0]:
        backend.metrics.rejection("not_a_hand_radiograph")
        threshold = backend.predictor.ood.threshold
        raise ApiError(422, "not_a_hand_radiograph",
                       f"this image does not look like the hand radiographs the model was trained on (out-of-"
                       f"distribution score {answers.ood_scores[0]:.1f}, above its threshold {threshold:.1f}), so it "
                       "gets no bone age: send a radiograph of the left hand, posteroanterior view")
    return answers


def _answer(answers: Answers, query: Query, backend: Backend) -> dict[str, Any]:
    """The fields of an :class:`Answer` (those that apply) for one image's served ``answers``."""
    predictor, months = backend.predictor, float(answers.months[0])
    interval = _interval(predictor, months, query.sex)
    answer: dict[str, Any] = {"bone_age_months": round(months, 1), "bone_age": years_and_months(months),
                              "interval_months": interval and [round(end, 1) for end in interval],
                              "interval_level": predictor.interval_level if interval else None,
                              "calibrated": predictor.calibrated, "sex": query.sex, "sex_source": query.sex_source}
    if answers.ood_scores is not None:
        answer["ood_score"] = round(float(answers.ood_scores[0]), 2)
    if answers.spread is not None:
        answer["ensemble_spread_months"] = round(float(answers.spread[0]), 1)
    if query.age is not None:
        answer.update(_assessment(months, interval, query))
    return {**answer, "model": _model_id(backend), "request_id": query.request_id}


def _interval(predictor: BoneAgePredictor, months: float, sex: str) -> tuple[float, float] | None:
    """The answer's interval; None when the bundle has none (or too few validation images for the level)."""
    interval = predictor.interval(np.array([months]), np.array([sex == "M"]))
    if interval is None or not np.isfinite(interval[1][0]):
        return None
    return float(interval[0][0]), float(interval[1][0])


def _assessment(months: float, interval: tuple[float, float] | None, query: Query) -> dict[str, Any]:
    """SDS and determination against the reference; indeterminate when the interval spans two determinations."""
    assessment = assess(months, query.sex, query.age)
    ends = [assess(end, query.sex, query.age) for end in interval or ()]
    spans = len({end.determination for end in ends}) > 1
    return {"chronological_age_months": query.age, "sds": assessment.sds,
            "sds_interval": [end.sds for end in ends] or None,
            "determination": "indeterminate" if spans else assessment.determination,
            "reference": {"standard": "Greulich & Pyle (Brush Foundation)",
                          "mean_months": assessment.reference_mean_months,
                          "sd_months": assessment.reference_sd_months}}


def _model_id(backend: Backend) -> dict[str, Any]:
    bundle = backend.predictor.bundle
    return {"name": bundle.meta.name, "version": bundle.path.name}


async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return JSONResponse({"error": err.code, "detail": err.detail}, status_code=err.status)


async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
    return JSONResponse({"error": "invalid_request", "detail": problems}, status_code=422)


async def _unexpected_error(request: Request, err: Exception) -> JSONResponse:
    log.exception("unexpected error answering %s", request.url.path)
    return JSONResponse({"error": "internal_error", "detail": f"the service failed: {type(err).__name__}; the "
                                                               "error is in its log"}, status_code=500)


class BodyLimit:
    """Answer 413 before reading a body whose Content-Length is over the limit; stop one that grows past it."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_json(send, 413, "upload_too_large", f"the request body is "
                                    f"{int(declared) / 2**20:.1f} MB; the limit is {self.limit / 2**20:g} MB")
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, "upload_too_large", f"the request body passed the {self.limit / 2**20:g} MB "
                                                        "limit")
            return message

        await self.app(scope, counted, send)


class RequestMetrics:
    """Count every request by route and status, with its latency."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def recorded(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recorded)
        finally:
            path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
            self.metrics.request(path if path in ROUTES else "other", status, time.perf_counter() - started)


class LocalOnlyPages:
    """Send :data:`PAGE_POLICY` as the Content-Security-Policy of every answer (it matters for the HTML pages)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      (b"content-security-policy", PAGE_POLICY.encode())]
            await send(message)

        await self.app(scope, receive, with_policy)


async def _send_json(send: Send, status: int, code: str, detail: str) -> None:
    body = JSONResponse({"error": code, "detail": detail}).body
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def direct_server(settings: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> uvicorn.Server:
    """The API with the model in this process, on one uvicorn server (no Ray, no batching): the benchmark's
    baseline and a quick local check. ``server.run()`` serves until ``server.should_exit`` is set."""
    predictor = BoneAgePredictor.from_settings(settings)
    log.info("serving %s: %s", predictor.bundle.path, predictor.computes_in)
    app = create_api(DirectBackend(predictor), settings)
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
