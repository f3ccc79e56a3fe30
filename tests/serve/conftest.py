"""Fixtures for the service: tiny model bundles in a registry, and the API served over real HTTP on 127.0.0.1."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from boneage.bundle import register
from cases import APP, deploy, serve_settings
from helpers import free_port, make_bundle


@pytest.fixture(scope="session")
def registry(tmp_path_factory) -> Path:
    """A registry with two versions of model ``tiny`` (different weights)."""
    root = tmp_path_factory.mktemp("registry")
    for seed in (1, 2):
        register(make_bundle(root.parent / f"bundle-{seed}", seed, val_mae=20.0 - seed, name="tiny")[0], root, "tiny")
    return root


@pytest.fixture(scope="module")
def direct_url(registry):
    """The API on a plain uvicorn server in this process (no Ray): fast checks of every route and error."""
    from boneage.api import direct_server

    server = direct_server(serve_settings(registry, "serve.max_upload_mb=1"), port=free_port())
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="session")
def serve_port(ray_session):
    """Ray Serve on the session's Ray runtime, HTTP on a free local port; shut down at the end."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


@pytest.fixture(scope="session")
def service_url(serve_port, registry):
    """The Serve application at ``/``: one replica, batches of up to 8 that wait 50 ms to fill."""
    from ray import serve

    deploy(registry, APP, "/", {"num_replicas": 1, "max_ongoing_requests": 32}, "serve.batch_wait_timeout_s=0.05")
    yield f"http://127.0.0.1:{serve_port}"
    serve.delete(APP)


@pytest.fixture(scope="session")
def phantoms(phantom_dir) -> list[tuple[bytes, str]]:
    """Eight phantom PNGs, each with a sex."""
    paths = sorted(phantom_dir.rglob("*.png"))[:8]
    return [(path.read_bytes(), "F" if i % 2 else "M") for i, path in enumerate(paths)]
