"""Requests and settings shared by the service tests."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import requests
import yaml
from PIL import Image

from boneage.config import load_config, to_dict
from helpers import ROOT, free_port
from images import gradient, write_bomb_png, write_dicom, write_truncated_png

AGE_FIELD = "chronological_age_months"
APP = "boneage"  # the Serve application most tests talk to
# How the session deploys APP (one replica, batches that wait 50 ms to fill); a test that redeploys it restores this.
APP_OPTIONS = {"num_replicas": 1, "max_ongoing_requests": 32}
APP_SETTINGS = ("serve.batch_wait_timeout_s=0.05",)
SHIPPED = ROOT / "configs" / "serve.yaml"


def serve_settings(registry: Path, *extra: str):
    """Serve settings for model ``tiny`` version 1 of the test registry, small overlays, one torch thread."""
    return load_config(overrides=["serve.model_uri=tiny:1", f"serve.registry_root={registry}",
                                  "serve.overlay_size=128", "serve.torch_threads=1", *extra]).serve


def post(url: str, route: str, data: bytes, name: str = "hand.png", headers: dict | None = None, **fields):
    """POST one file and form fields to ``/v1/<route>``."""
    return requests.post(f"{url}/v1/{route}", files={"file": (name, data)}, data=fields, headers=headers, timeout=60)


def bad_requests(tmp_path: Path, png: bytes) -> list[tuple[str, dict, int, str]]:
    """(case, requests.post keyword arguments, expected status, expected error code) for every bad input."""
    gif = io.BytesIO()
    Image.fromarray(gradient().astype(np.uint8)).save(gif, format="GIF")
    noise = np.random.default_rng(0).integers(0, 255, (1100, 1100), dtype=np.uint8)  # a PNG over 1 MB
    big_png = io.BytesIO()
    Image.fromarray(noise).save(big_png, format="PNG")
    dicom = write_dicom(tmp_path / "f.dcm").read_bytes()  # PatientSex F

    def form(data, name="x.png", **fields):
        return {"files": {"file": (name, data)}, "data": fields}

    return [
        ("not an image", form(b"hello, not an image", "x.txt", sex="F"), 422, "not_an_image"),
        ("empty file", form(b"", sex="F"), 400, "empty_file"),
        ("truncated file", form(write_truncated_png(tmp_path / "t.png").read_bytes(), sex="F"), 422,
         "truncated_image"),
        ("decompression bomb", form(write_bomb_png(tmp_path / "b.png").read_bytes(), sex="F"), 413,
         "decompression_bomb"),
        ("body over the size limit", form(big_png.getvalue(), sex="F"), 413, "upload_too_large"),
        ("unsupported image format", form(gif.getvalue(), "x.gif", sex="F"), 415, "unsupported_image_format"),
        ("missing sex", form(png), 422, "missing_sex"),
        ("invalid sex", form(png, sex="female"), 422, "invalid_sex"),
        ("sex contradicting DICOM", form(dicom, "f.dcm", sex="M"), 422, "sex_conflict"),
        ("age not a number", form(png, sex="F", **{AGE_FIELD: "ten"}), 422, "invalid_chronological_age"),
        ("age out of range", form(png, sex="F", **{AGE_FIELD: "-1"}), 422, "invalid_chronological_age"),
        ("no file field", {"files": {"other": ("x", b"1")}, "data": {"sex": "F"}}, 422, "missing_file"),
        ("JSON instead of a form", {"json": {"sex": "F"}}, 415, "unsupported_media_type"),
    ]


def deploy(registry: Path, name: str, route: str, options: dict, *settings: str) -> None:
    """Deploy the service (model ``tiny:1`` unless ``settings`` say otherwise) as Serve application ``name``."""
    from ray import serve

    from boneage.service import service_app

    args = to_dict(serve_settings(registry, *settings))
    serve.run(service_app(args, {"ray_actor_options": {"num_cpus": 0.25}, **options}), name=name, route_prefix=route)


def deploy_session_app(registry: Path) -> None:
    """(Re)deploy APP at ``/`` as the session fixture does: ``tiny:1``, :data:`APP_OPTIONS`, :data:`APP_SETTINGS`."""
    deploy(registry, APP, "/", APP_OPTIONS, *APP_SETTINGS)


def shipped_config(port: int, name: str, **args) -> dict:
    """``configs/serve.yaml`` as shipped, but for the HTTP port, the application's name and route (``/<name>``),
    a quarter CPU per replica and the ``args`` given (the test registry's model)."""
    config = yaml.safe_load(SHIPPED.read_text())
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app.update(name=name, route_prefix=f"/{name}")
    app["args"].update(args)
    app["deployments"][0]["ray_actor_options"]["num_cpus"] = 0.25
    return config


def serve_deploy(config: dict, folder: Path, dashboard_url: str) -> subprocess.CompletedProcess:
    """``serve deploy`` (Ray's CLI) of ``config`` written to a file in ``folder``, as the README says."""
    path = folder / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([str(Path(sys.executable).parent / "serve"), "deploy", str(path), "--address",
                           dashboard_url], cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "token"},
                          capture_output=True, text=True, timeout=120)


def months_in_process(predictor, data: bytes, sex: str) -> float:
    """The bone age ``predictor`` (the service's model, in this process) gives the file ``data``."""
    canvas = predictor.decode(data).canvas
    return float(predictor.predict(canvas[None], np.array([sex == "M"]))[0])


def noise_png(seed: int = 0) -> bytes:
    """A film of uniform noise: no hand, no radiograph."""
    pixels = np.random.default_rng(seed).integers(0, 256, (300, 240), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@contextmanager
def direct_service(registry, *settings: str):
    """The API on a plain uvicorn server in this process, for the duration of the block."""
    from boneage.api import direct_server, serving_in_thread

    with serving_in_thread(direct_server(serve_settings(registry, *settings), port=free_port())) as url:
        yield url
