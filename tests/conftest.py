"""Session fixtures: one isolated Ray runtime, the real RSNA samples, a small phantom set; and a session-end check
that the tests left no process behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from helpers import FULLSIZE, THUMBS, free_port, phantom_config, processes_mentioning, require, wait_until

@pytest.fixture(scope="session")
def session_temp() -> Path:
    """Where every Ray cluster the tests start keeps its files (short: Ray's socket paths must stay under 108
    characters), so the session-end check finds whatever they left running and a user's cluster is never touched."""
    return SESSION_TEMP


SESSION_TEMP = Path(tempfile.mkdtemp(prefix="bt-", dir="/tmp"))
# Every process the tests start inherits this, so the session-end check finds even those whose command line names
# no temp dir (a `ray start --head` cluster's client server names only its GCS address).
os.environ["BONEAGE_TEST_SESSION"] = str(SESSION_TEMP)
# Ray Train's controller looks at its workers every 2 s by default, so each tiny test run waited up to 2 s at every
# step (start, each report, the end) for nothing; every cluster the tests start inherits the quicker look.
os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"


@pytest.fixture(scope="session")
def ray_session(session_temp):
    """A small local Ray runtime of the session's own (4 logical CPUs on 2 cores leaves room for Ray Data).

    ``address="local"`` starts a new one even while a user's cluster runs on this machine, with its own temp dir
    and ports; RAY_ADDRESS then points Ray's auto-discovery (Ray Train's cleanup helpers, job subprocesses) here."""
    import ray
    from ray.data import DataContext

    # The dashboard serves the State API, which Ray Train uses to clean up after stopped trials.
    context = ray.init(address="local", num_cpus=4, object_store_memory=400 * 1024 * 1024, include_dashboard=True,
                       dashboard_port=free_port(), log_to_driver=False, _temp_dir=str(session_temp / "ray"))
    os.environ["RAY_ADDRESS"] = context.address_info["address"]
    DataContext.get_current().enable_progress_bars = False
    ray.test_dashboard_url = f"http://{context.dashboard_url}"  # for CLI clients such as `serve deploy`
    yield ray
    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session")
def ray_logs(session_temp) -> Path:
    """The log folder of the session's Ray runtime: what its workers, actors and Serve replicas print and log."""
    return session_temp / "ray" / "session_latest" / "logs"


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind():
    """After the last test: nothing the session started may still run (its Ray clusters, servers, jobs)."""
    yield
    with contextlib.suppress(TimeoutError):  # Ray's processes take a few seconds to exit after shutdown
        wait_until(lambda: not leftover_processes(), "the session's processes to exit", timeout=30, interval=1)
    left = leftover_processes()
    shutil.rmtree(SESSION_TEMP, ignore_errors=True)
    assert not left, f"the tests left processes running: {left}"


def leftover_processes() -> list[str]:
    """The session's processes still running, but for this interpreter's own multiprocessing resource tracker
    (it inherits the session's environment marker and exits with this process)."""
    return [line for line in processes_mentioning(str(SESSION_TEMP)) if "multiprocessing.resource_tracker" not in line]


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

    return generate_phantoms(phantom_config(tmp_path_factory.mktemp("phantoms") / "set", "phantoms.workers=1"))


@pytest.fixture(scope="session")
def prepared_dir(phantom_dir, ray_session, tmp_path_factory) -> Path:
    """The session's phantoms prepared at 32 px."""
    from boneage.prepare import prepare_dataset
    from helpers import data_config

    out = tmp_path_factory.mktemp("prepared") / "phantoms-32"
    return prepare_dataset(data_config(phantom_dir / "boneage-training-dataset.csv", phantom_dir, out))


@pytest.fixture(scope="session")
def ensemble_registry(prepared_dir, tmp_path_factory) -> Path:
    """A registry holding ``ens:1``: three random 32 px models of the session's prepared phantoms exported as one
    ensemble bundle by the ensemble job's code (signals fitted on the phantoms' validation split)."""
    from boneage.config import load_config
    from boneage.dataset import read_manifest
    from boneage.ensemble import run_ensemble
    from helpers import make_bundle

    root = tmp_path_factory.mktemp("ensemble-registry")
    fingerprint = read_manifest(prepared_dir)["fingerprint"]
    members = [make_bundle(root.parent / f"member-{seed}", seed, val_mae=10.0 + seed, data=fingerprint, size=32,
                           name="ens")[0] for seed in (1, 2, 3)]
    run_ensemble(load_config(overrides=[f"ensemble.members=[{', '.join(map(str, members))}]",
                                        f"ensemble.data={prepared_dir}", f"registry.root={root}",
                                        "registry.name=ens"]))
    return root
