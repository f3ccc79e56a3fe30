"""The Ray Serve deployment: the HTTP API of :mod:`boneage.api` on autoscaling replicas, predictions batched.

``configs/serve.yaml`` names :func:`build` (through ``serve/app.py``) with the application's ``args``, which are the
``serve`` area of the config (:class:`boneage.config.ServeConfig`); replicas, autoscaling, queue limits and the
HTTP host/port are Serve's own settings in the same file. ``build`` checks the settings and the bundle (its
checksum) before any replica starts, so a bad or tampered bundle stops the deployment with one clear error.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from fastapi import FastAPI
from ray import serve
from ray.serve.metrics import Counter as MetricCounter
from ray.serve.metrics import Histogram

from boneage.api import create_api
from boneage.bundle import load_bundle, resolve
from boneage.config import ServeConfig, parse_section, to_dict
from boneage.inference import Answers, BoneAgePredictor

log = logging.getLogger(__name__)

LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


class ServeMetrics:
    """The API's metrics as Ray metrics (exported with the cluster's, e.g. to Prometheus)."""

    def __init__(self) -> None:
        self.requests = MetricCounter("boneage_requests", "HTTP requests by route and status",
                                      tag_keys=("route", "status"))
        self.rejections = MetricCounter("boneage_rejections", "requests refused, by reason", tag_keys=("reason",))
        self.latency = Histogram("boneage_request_seconds", "HTTP request latency by route",
                                 boundaries=LATENCY_BOUNDARIES_S, tag_keys=("route",))
        self.predictions = Histogram("boneage_prediction_seconds", "time from queueing to a batched prediction",
                                     boundaries=LATENCY_BOUNDARIES_S)
        self.gradcams = Histogram("boneage_gradcam_seconds", "Grad-CAM time per explanation",
                                  boundaries=LATENCY_BOUNDARIES_S)
        self.batches = Histogram("boneage_batch_size", "images per model call",
                                 boundaries=[1, 2, 4, 8, 16, 32, 64])

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.latency.observe(seconds, tags={"route": route})

    def rejection(self, reason: str) -> None:
        self.rejections.inc(tags={"reason": reason})

    def prediction(self, seconds: float) -> None:
        self.predictions.observe(seconds)

    def gradcam(self, seconds: float) -> None:
        self.gradcams.observe(seconds)

    def batch(self, size: int) -> None:
        self.batches.observe(size)


@serve.deployment(name="BoneAgeService", health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress()
class BoneAgeService:
    """One replica: the bundle loaded once, predictions batched with ``@serve.batch``."""

    echoes_request_id = False  # Serve's proxy sends the X-Request-ID header

    def __init__(self, settings: dict[str, Any]):
        self.settings: ServeConfig = parse_section(ServeConfig, settings, "serve")
        torch.set_num_threads(self.settings.torch_threads or _assigned_cpus())
        self.host = _listening_host()
        self.predictor = BoneAgePredictor.from_settings(self.settings)
        self.predictor.check()  # a bundle that answers NaN fails the deployment here, with the reason
        # Serve's handlers are the ones that reach the replica's log (with each record's request ID); the API's
        # records (refusals, errors) go there too.
        serve_log = logging.getLogger("ray.serve")
        for handler in serve_log.handlers:
            logging.getLogger("boneage").addHandler(handler)
        logging.getLogger("boneage").setLevel(logging.INFO)
        serve_log.info("BoneAgeService replica: %s", self.predictor.computes_in)
        self.metrics = ServeMetrics()
        self.batch_sizes: Counter[int] = Counter()
        self._predict_batch.set_max_batch_size(self.settings.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self, self.settings)

    async def answer(self, canvas: np.ndarray, male: bool) -> Answers:
        """One image's answers, computed in a batch with whatever else arrived within the batch wait."""
        return await self._predict_batch((canvas, male))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # both reset from the settings in __init__
    async def _predict_batch(self, items: list[tuple[np.ndarray, bool]]) -> list[Answers]:
        canvases = np.stack([canvas for canvas, _ in items])  # (B, S, S) uint8
        male = np.array([m for _, m in items])  # (B,)
        self.batch_sizes[len(items)] += 1
        self.metrics.batch(len(items))
        # In a worker thread: the replica's event loop keeps taking requests, which form the next batch.
        answers = await asyncio.to_thread(self.predictor.answer, canvases, male)
        return [answers.row(i) for i in range(len(items))]

    async def check_health(self) -> None:
        """Serve's periodic health check: raising marks this replica unhealthy, and Serve replaces it."""
        await asyncio.to_thread(self.predictor.check)

    def runtime(self) -> dict[str, Any]:
        """This replica's batching so far (``/v1/model``): how many model calls of each batch size."""
        return {"backend": "ray-serve", "replica": serve.get_replica_context().replica_id.unique_id,
                "max_batch_size": self.settings.max_batch_size,
                "batch_wait_timeout_s": self.settings.batch_wait_timeout_s,
                "batches_by_size": {str(k): v for k, v in sorted(self.batch_sizes.items())}}


def build(args: dict[str, Any]) -> serve.Application:
    """The application builder ``configs/serve.yaml`` names: Serve calls it with the application's ``args``."""
    return service_app(args)


def service_app(args: dict[str, Any], options: dict[str, Any] | None = None) -> serve.Application:
    """Check the settings and the bundle, then bind the deployment with deployment ``options`` (``num_replicas``,
    ``autoscaling_config``, ...; a Serve config file sets those under ``deployments`` instead)."""
    settings = parse_section(ServeConfig, dict(args), "serve")
    bundle = resolve(settings.model_uri, settings.registry_root)
    meta = load_bundle(bundle).meta  # fails here, before any replica: a missing, tampered or mismatched bundle
    log.info("serving %s (val MAE %.2f)", bundle, meta.val_mae)
    # Replicas may start in another working directory: hand them an absolute bundle path.
    pinned = {**to_dict(settings), "model_uri": str(Path(bundle).resolve())}
    return BoneAgeService.options(**(options or {})).bind(pinned)


def _listening_host() -> str:
    """The host Serve's HTTP proxies listen on; a non-loopback guess when it cannot be read (keys then required)."""
    try:
        from ray.serve.context import _get_global_client  # no public API gives a replica the HTTP options

        return _get_global_client().http_config.host
    except Exception:  # noqa: BLE001 - any failure: assume the network can reach us
        log.warning("could not read Serve's HTTP host: assuming a network address (serve.auth=auto needs a key)")
        return "0.0.0.0"


def _assigned_cpus() -> int:
    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
