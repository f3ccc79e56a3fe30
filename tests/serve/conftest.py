"""Fixtures for the service: tiny model bundles in a registry, and the API served over real HTTP on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from boneage.bundle import register
from cases import APP, SHIPPED, deploy_session_app, direct_service, serve_settings
from helpers import free_port, make_bundle, synthetic_trust


@pytest.fixture(scope="session")
def registry(tmp_path_factory) -> Path:
    """A registry with two versions of model ``tiny`` (different weights): version 1 with trust signals (a bias
    correction far from the identity, and intervals), version 2 without (as bundles written before them)."""
    root = tmp_path_factory.mktemp("registry")
    for seed in (1, 2):
        bundle, _ = make_bundle(root.parent / f"bundle-{seed}", seed, val_mae=20.0 - seed, name="tiny",
                                trust=synthetic_trust(seed) if seed == 1 else None)
        register(bundle, root, "tiny")
    return root


@pytest.fixture(scope="module")
def direct_url(registry):
    """The API on a plain uvicorn server in this process (no Ray): fast checks of every route and error."""
    with direct_service(registry, "serve.max_upload_mb=1") as url:
        yield url


@pytest.fixture(scope="session")
def serve_port(ray_session):
    """Ray Serve on the session's Ray runtime with ``configs/serve.yaml``'s HTTP options (host, request timeout)
    but a free port, as `serve deploy` of that file starts it; shut down at the end."""
    from ray import serve

    port = free_port()
    serve.start(http_options={**yaml.safe_load(SHIPPED.read_text())["http_options"], "port": port})
    yield port
    serve.shutdown()


@pytest.fixture(scope="session")
def service_url(serve_port, registry):
    """The Serve application at ``/``: one replica, batches of up to 16 that wait 50 ms to fill."""
    from ray import serve

    deploy_session_app(registry)
    yield f"http://127.0.0.1:{serve_port}"
    serve.delete(APP)


@pytest.fixture(scope="session")
def local_predictor(registry):
    """The service's model (``tiny:1``) in this process, for the answers the service must give."""
    from boneage.inference import BoneAgePredictor

    return BoneAgePredictor.from_settings(serve_settings(registry))


@pytest.fixture(scope="session")
def phantoms(phantom_dir) -> list[tuple[bytes, str]]:
    """Eight phantom PNGs, each with a sex."""
    paths = sorted(phantom_dir.rglob("*.png"))[:8]
    return [(path.read_bytes(), "F" if i % 2 else "M") for i, path in enumerate(paths)]
