"""Session fixtures: one Ray runtime, the real RSNA samples, a small phantom set."""

from __future__ import annotations

from pathlib import Path

import pytest

from boneage.config import load_config
from helpers import FULLSIZE, THUMBS, require


@pytest.fixture(scope="session")
def ray_session():
    """A small local Ray runtime for the whole session (4 logical CPUs on 2 cores leaves room for Ray Data)."""
    import ray
    from ray.data import DataContext

    refuse_other_ray_clusters()

    # The dashboard serves the State API, which Ray Train uses to clean up after stopped trials.
    context = ray.init(num_cpus=4, object_store_memory=400 * 1024 * 1024, include_dashboard=True,
                       log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    ray.test_dashboard_url = f"http://{context.dashboard_url}"  # for CLI clients such as `serve deploy`
    yield ray
    ray.shutdown()


@pytest.fixture
def thumbs() -> Path:
    return require(THUMBS)


@pytest.fixture
def fullsize() -> Path:
    return require(FULLSIZE)


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """60 phantoms at 64 px, drawn once per session."""
    from boneage.phantoms.generate import generate_phantoms

    out = tmp_path_factory.mktemp("phantoms") / "set"
    cfg = load_config(overrides=[f"phantoms.out={out}", "phantoms.n=60", "phantoms.size=64", "phantoms.workers=1"])
    return generate_phantoms(cfg)


@pytest.fixture(scope="session")
def prepared_dir(phantom_dir, ray_session, tmp_path_factory) -> Path:
    """The session's phantoms prepared at 32 px."""
    from boneage.prepare import prepare_dataset
    from helpers import data_config

    out = tmp_path_factory.mktemp("prepared") / "phantoms-32"
    return prepare_dataset(data_config(phantom_dir / "boneage-training-dataset.csv", phantom_dir, out))


def refuse_other_ray_clusters() -> None:
    """Stop the run when another Ray cluster runs on this machine (e.g. the demo's): Ray Train finds its cleanup
    helpers' cluster by auto-discovery, which fails when there are two, and stopped trials then keep their CPUs."""
    import psutil

    running = [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "gcs_server"]
    if running:
        pytest.exit(f"another Ray cluster is running on this machine (gcs_server pid {running[0]}); stop it with "
                    "`ray stop` (or `make demo`'s instructions) before running the tests", returncode=2)
