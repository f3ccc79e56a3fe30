"""The versioned HTTP API (FastAPI): routes, input checks, answers and errors, whatever runs the model.

``create_api(backend, settings)`` builds the app. The Ray Serve deployment (:mod:`boneage.service`) is one backend,
batching predictions across requests; :class:`DirectBackend` runs the same model code in-process (the plain
uvicorn server the latency benchmark compares against). ``/docs`` and ``/redoc`` load Swagger UI and ReDoc from the
installed ``fastapi-offline`` package, never from a CDN, so they work on a network without internet.

Every answer other than 200, whoever gives it (a route, FastAPI's form parsing, routing's 404 and 405, a
middleware), has one shape, :class:`~boneage.schema.ErrorBody` ``{"error": <code>, "detail": <sentence>,
"request_id": <id>}``, made in one place (:func:`error_response`), and the service keeps serving. An image the
bundle's out-of-distribution detector finds unlike hand radiographs answers 422 ``not_a_hand_radiograph`` (unless
``serve.reject_ood`` is off), before any Grad-CAM is computed.

Every request has an ID: the client's ``X-Request-ID`` when it sends one, else a new one (Ray Serve's proxy makes
it); answers and errors carry it as ``request_id``, the response's ``X-Request-ID`` header is the same, sent once,
and the service's log lines about a request name it, so a request can be traced from the client through the proxy
to the replica.

API keys (``serve.auth``): with ``api_key`` every ``/v1`` request must carry one of the keys held by the
environment variable ``serve.api_key_env``, checked before its body is read; ``auto`` (the default) turns that on
when the service listens on anything but a loopback address, and ``none`` is refused there.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from importlib import resources
from typing import Any, Protocol

import numpy as np
import uvicorn
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi import Query as QueryParameter
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from fastapi_offline import FastAPIOffline
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from boneage.bundle import BundleMeta
from boneage.config import ConfigError, ServeConfig, to_dict
from boneage.imaging import REJECT_BOMB, REJECT_FORMAT, ImageRejected, check_format
from boneage.inference import Answers, BoneAgePredictor, Explanation, Radiograph, encode_png, heatmap_grid
from boneage.schema import Answer, ErrorBody, Explained
from boneage.standards import MAX_AGE_MONTHS, assess, years_and_months

log = logging.getLogger(__name__)

API_VERSION = "v1"
# Metric labels: anything else is "other", so scanners cannot blow up the label set.
ROUTES = (f"/{API_VERSION}/predict", f"/{API_VERSION}/explain", f"/{API_VERSION}/model", "/healthz", "/", "/docs",
          "/redoc", "/openapi.json")
# The pages (/, /docs, /redoc) load only from this service, so they work on a network without internet, and what
# a library reaches for elsewhere (ReDoc 2's Redocly logo, hard-coded to cdn.redoc.ly) the browser stops before
# it is requested. Inline scripts and styles: the page's own, Swagger UI's start-up, ReDoc's styled components.
PAGE_POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
               "img-src 'self' data:; worker-src 'self' blob:")
REQUEST_ID = "x-request-id"
API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False,
                       description="one of the service's API keys (or send it as Authorization: Bearer <key>)")
# The errors each kind of route may answer, for /docs and for clients generated from the OpenAPI document.
UPLOAD_ERRORS = {400: "the body is not a readable form", 401: "no valid API key (when the service requires one)",
                 413: "the body or the decoded image is too large", 415: "not multipart/form-data, or an image "
                 "format other than PNG, JPEG or DICOM", 422: "an input that cannot be assessed (the error names it)",
                 500: "the service failed (the request ID finds it in the log)"}
READ_ERRORS = {401: UPLOAD_ERRORS[401], 500: UPLOAD_ERRORS[500]}
REJECTED_STATUS = {REJECT_BOMB: 413, REJECT_FORMAT: 415}  # an image refused for any other reason: 422


class Metrics(Protocol):
    """What the API reports; the Serve backend exports it through Ray's metrics."""

    def request(self, route: str, status: int, seconds: float) -> None: ...
    def rejection(self, reason: str) -> None: ...
    def prediction(self, seconds: float) -> None: ...
    def gradcam(self, seconds: float) -> None: ...


class Backend(Protocol):
    """Runs the model for the API; says where the service listens (``host``) and whether the API itself sends
    the ``X-Request-ID`` header (``echoes_request_id``: Serve's proxy does it for its replicas)."""

    predictor: BoneAgePredictor
    metrics: Metrics
    host: str
    echoes_request_id: bool

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

    echoes_request_id = True

    def __init__(self, predictor: BoneAgePredictor, host: str):
        self.predictor, self.host = predictor, host
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
    keys = api_keys(settings, backend.host)
    app.add_middleware(BodyLimit, limit=int(settings.max_upload_mb * 1024 * 1024))
    app.add_middleware(ApiKeys, keys=keys)  # before the body is read: no upload work for a client without a key
    app.add_middleware(RequestMetrics, metrics=backend.metrics)
    app.add_middleware(LocalOnlyPages)
    app.add_middleware(RequestIds, echo=backend.echoes_request_id)  # outermost: every answer has the ID
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
    _add_assessment_routes(app, backend, settings, keys)
    _add_service_routes(app, backend, keys)
    return app


def api_keys(settings: ServeConfig, host: str) -> tuple[str, ...]:
    """The keys a ``/v1`` request must carry one of (none: open), by ``serve.auth`` and the listening ``host``.

    Refuses to serve without keys on a non-loopback address, and with ``api_key`` but no key in the environment.
    """
    loopback = _is_loopback(host)
    if settings.auth == "none" and not loopback:
        raise ConfigError(f"serve.auth=none on {host}: the service would answer anyone on the network; set "
                          f"serve.auth=api_key (or auto) with the key in ${settings.api_key_env}, or listen on "
                          "127.0.0.1 and reach it through an SSH tunnel")
    if settings.auth == "none" or (settings.auth == "auto" and loopback):
        return ()
    keys = tuple(key.strip() for key in os.environ.get(settings.api_key_env, "").split(",") if key.strip())
    if not keys:
        why = "serve.auth=api_key" if settings.auth == "api_key" else f"the service listens on {host} (not loopback)"
        raise ConfigError(f"{why}, so it needs an API key, but ${settings.api_key_env} is empty where the service "
                          f"runs: set it in the replicas' environment (runtime_env env_vars, or exported before "
                          "`ray start`), e.g. to the output of `python -c 'import secrets; print(secrets."
                          "token_urlsafe(32))'`")
    return keys


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _documented(errors: dict[int, str], keys: tuple[str, ...]) -> dict[str, Any]:
    """A route's documented errors (all in the one error shape) and, when keys are required, its security."""
    listed = {status: {"model": ErrorBody, "description": text} for status, text in errors.items()
              if keys or status != 401}
    return {"responses": listed, "dependencies": [Depends(API_KEY)] if keys else []}  # ApiKeys checks the key


def _add_assessment_routes(app: FastAPI, backend: Backend, settings: ServeConfig, keys: tuple[str, ...]) -> None:
    """``/v1/predict`` and ``/v1/explain``: a radiograph in, its bone age out."""
    given, documented = _parameters(), _documented(UPLOAD_ERRORS, keys)

    @app.post(f"/{API_VERSION}/predict", summary="Bone age of one radiograph", response_model=Answer,
              response_model_exclude_unset=True, **documented,
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
                               "description": "JSON, or the overlay PNG itself with Accept: image/png"},
                         **documented["responses"]}, dependencies=documented["dependencies"])
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
                            headers={"X-Bone-Age-Months": f"{answer['bone_age_months']}"})  # RequestIds adds the ID
        explained = Explained(**answer, overlay_png_base64=base64.b64encode(result.overlay_png).decode(),
                              heatmap=heatmap_grid(result.heatmap, settings.heatmap_cells),
                              **await _canvas_field(query, canvas))
        return JSONResponse(explained.model_dump(exclude_unset=True))


def _add_service_routes(app: FastAPI, backend: Backend, keys: tuple[str, ...]) -> None:
    """``/v1/model``, ``/healthz`` and the web page at ``/``."""

    @app.get(f"/{API_VERSION}/model", summary="The served model: bundle metadata, metrics and serving settings",
             **_documented(READ_ERRORS, keys))
    async def model() -> dict[str, Any]:
        meta = backend.predictor.bundle.meta
        return {"model": _model_id(backend), "image_size": meta.image_size, "architecture": to_dict(meta.model),
                "metrics": meta.metrics, "data": to_dict(meta.data), "created": meta.created,
                "weights_sha256": meta.weights_sha256, "code_version": meta.code_version,
                "trust": _trust(backend.predictor), "ood": _ood(backend.predictor),
                "ensemble": _ensemble(meta), "bundle_format": meta.format,
                "serving": {**backend.runtime(), "precision": backend.predictor.precision, "device": "cpu",
                            "tta": backend.predictor.tta, "api_key_required": bool(keys),
                            "computes_in": backend.predictor.computes_in}}

    @app.get("/healthz", summary="200 once the model is loaded (no API key needed: for load balancers)")
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
    """A checked request: the decoded image, the sex used (and where it came from), the chronological age, the ID."""

    def __init__(self, radiograph: Radiograph, sex: str, sex_source: str, age: float | None, request_id: str):
        self.radiograph, self.sex, self.sex_source, self.age = radiograph, sex, sex_source, age
        self.request_id = request_id


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
    form = await request.form()  # already parsed for the parameters: cached, not read again
    repeated = sorted({key for key in form.keys() if len(form.getlist(key)) > 1})
    if repeated:  # which of two files or two sexes was meant? never guess
        raise ApiError(422, "repeated_field", f"the form gives {', '.join(map(repr, repeated))} more than once: send "
                                              "each field once")
    if file is None:
        raise ApiError(422, "missing_file", "the form has no 'file' field: attach the radiograph as 'file'")
    data = await file.read()  # BodyLimit has already refused a body over the upload limit
    if not data:
        raise ApiError(400, "empty_file", "the uploaded file is empty")
    try:
        check_format(data)  # at once, from the first bytes: no decoding for what is no image
        chronological = _parse_age(age)
        radiograph = await asyncio.to_thread(backend.predictor.decode, data)
    except ImageRejected as err:
        raise ApiError(REJECTED_STATUS.get(err.code, 422), err.code, err.reason.removeprefix(f"{err.code}: ")) from None
    chosen, source = _resolve_sex(sex, radiograph.dicom_sex)
    return Query(radiograph, chosen, source, chronological, request_id_of(request.scope))


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


def request_id_of(scope: Scope) -> str:
    """The request's ID (see :class:`RequestIds`)."""
    return scope.get("state", {}).get("request_id", "")


def error_response(scope: Scope, status: int, code: str, detail: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The API's one error shape (:class:`ErrorBody`), logged with the request's ID (never the upload)."""
    request_id = request_id_of(scope)
    log.info("request %s: %d %s", request_id, status, code)
    body = ErrorBody(error=code, detail=detail, request_id=request_id)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return error_response(request.scope, err.status, err.code, err.detail)


async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    """Routing's 404 and 405 and FastAPI's 400 for a body it cannot parse, in the API's error shape."""
    if isinstance(err.__cause__, ApiError):  # BodyLimit stopped a body that grew past the limit while parsed
        return await _api_error(request, err.__cause__)
    path, status = request.url.path, err.status_code
    if status == 404:
        detail = (f"there is no {path} here: the API answers POST /{API_VERSION}/predict, POST /{API_VERSION}/explain"
                  f", GET /{API_VERSION}/model and GET /healthz (the web page is /, its documentation /docs)")
    elif status == 405:
        detail = f"{request.method} is not allowed on {path}: use {(err.headers or {}).get('Allow', 'another method')}"
    elif status == 400:
        detail = (f"the request body could not be read as a form ({err.__cause__ or err.detail}): send "
                  "multipart/form-data with a 'file' field (the radiograph) and a 'sex' field (M or F)")
    else:
        detail = str(err.detail)
    code = "malformed_request" if status == 400 else HTTPStatus(status).phrase.lower().replace(" ", "_")
    return error_response(request.scope, status, code, detail, headers=err.headers)


async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
    return error_response(request.scope, 422, "invalid_request", problems)


async def _unexpected_error(request: Request, err: Exception) -> JSONResponse:
    log.exception("request %s: unexpected error answering %s", request_id_of(request.scope), request.url.path)
    return error_response(request.scope, 500, "internal_error", f"the service failed: {type(err).__name__}; the "
                                                                "error is in its log under this request's ID")


class RequestIds:
    """Give every request its ID: the client's ``X-Request-ID``, else a new one, kept in the request's state.

    Behind Ray Serve the proxy has already put one in the request (the client's, or its own) and sends it back
    itself, so ``echo`` is off there: a second header would be a second ID.
    """

    def __init__(self, app: ASGIApp, echo: bool):
        self.app, self.echo = app, echo

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = Headers(scope=scope).get(REQUEST_ID) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def with_id(message: Message) -> None:
            if self.echo and message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID] = request_id
            await send(message)

        await self.app(scope, receive, with_id)


class ApiKeys:
    """Refuse a ``/v1`` request that carries none of ``keys`` (``X-API-Key``, or ``Authorization: Bearer``) with
    401, before its body is read; no keys: every request passes. The pages, ``/healthz`` and the docs stay open."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...]):
        self.app, self.keys = app, tuple(key.encode() for key in keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or not _route(scope).startswith(f"/{API_VERSION}/"):
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        given = (headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")).strip()
        if any(secrets.compare_digest(given.encode(), key) for key in self.keys):  # constant time: no timing oracle
            return await self.app(scope, receive, send)
        detail = ("this service needs an API key: send it as X-API-Key: <key> or Authorization: Bearer <key>"
                  if not given else "the API key is not valid")
        response = error_response(scope, 401, "unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def _route(scope: Scope) -> str:
    """The path within the app (without the Serve route prefix)."""
    return scope["path"].removeprefix(scope.get("root_path", "")) or "/"


class BodyLimit:
    """Answer 413 before reading a body whose Content-Length is over the limit; stop one that grows past it."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            response = error_response(scope, 413, "upload_too_large", f"the request body is "
                                      f"{int(declared) / 2**20:.1f} MB; the limit is {self.limit / 2**20:g} MB")
            return await response(scope, receive, send)
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
            path = _route(scope)
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


def direct_server(settings: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> uvicorn.Server:
    """The API with the model in this process, on one uvicorn server (no Ray, no batching): the benchmark's
    baseline and a quick local check. ``server.run()`` serves until ``server.should_exit`` is set."""
    predictor = BoneAgePredictor.from_settings(settings)
    log.info("serving %s: %s", predictor.bundle.path, predictor.computes_in)
    app = create_api(DirectBackend(predictor, host), settings)
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))


@contextmanager
def serving_in_thread(server: uvicorn.Server, timeout_s: float = 60.0) -> Iterator[str]:
    """Run ``server`` (a :func:`direct_server`) in a daemon thread for the block; its URL once it listens."""
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise TimeoutError(f"the plain uvicorn server did not start within {timeout_s:g} s")
        time.sleep(0.05)
    try:
        yield f"http://{server.config.host}:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
