"""Paths and small builders shared by the tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import pytest

from boneage.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()
THUMBS = SHARED_DATA / "rsna-thumbs"
FULLSIZE = SHARED_DATA / "rsna-fullsize"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(ready, what: str, timeout: float = 300, interval: float = 0.2):
    """Poll ``ready()`` until it returns something truthy, and return that; TimeoutError naming ``what`` after
    ``timeout`` seconds. The one polling helper of the suite: a slow 2-core machine waits, a stuck one fails."""
    deadline = time.monotonic() + timeout
    while True:
        answer = ready()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def process_table(marker: str) -> list[tuple[int, str]]:
    """``(pid, command line)`` of every running process but this one whose command line or environment contains
    ``marker`` (a temp dir), oldest pid first. The environment catches processes whose command line names no temp
    dir, such as Ray's client server and Ray Train's workers: they inherit the test session's marker (conftest).
    The suite's one reader of /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue  # exited meanwhile, or not ours to read
        if marker.encode() in cmdline or marker.encode() in environ:
            found.append((int(entry.name), cmdline.replace(b"\0", b" ").decode(errors="replace").strip()))
    return sorted(found)


def processes_mentioning(marker: str) -> list[str]:
    """``pid: command line`` of each process :func:`process_table` finds, for messages."""
    return [f"{pid}: {command[:200]}" for pid, command in process_table(marker)]


def stop_processes(pids: Iterable[int], timeout: float = 15) -> None:
    """SIGTERM exactly these processes, then SIGKILL those still alive after ``timeout`` seconds."""
    pids = set(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                continue  # already gone
        try:
            wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), "processes to exit", timeout)
            return
        except TimeoutError:
            continue


def session_env(ray_session) -> dict[str, str]:
    """The environment for a subprocess (a job, a CLI) that joins the session's Ray cluster."""
    return {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}


def ray_cli(env: dict, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run Ray's CLI of the project's venv from the project root."""
    ray = str(Path(sys.executable).parent / "ray")
    return subprocess.run([ray, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def require(path: Path) -> Path:
    """Skip the test, saying why, when the real RSNA samples beside the project are absent."""
    if not path.exists():
        pytest.skip(f"real RSNA samples not found at {path} (they sit beside the project in CI)")
    return path


def phantom_config(out, *extra: str) -> Config:
    """The session's phantom set (conftest ``phantom_dir``): 60 phantoms at 64 px in ``out``. One place for its
    settings: a test that asks for the same set with other settings would redraw it under every other test."""
    return load_config(overrides=[f"phantoms.out={out}", "phantoms.n=60", "phantoms.size=64", *extra])


def data_config(labels, images, out, *extra: str) -> Config:
    """A config reading ``labels``/``images`` into ``out`` at 32 px (tiny: fast on 2 cores)."""
    return load_config(overrides=[f"data.labels={labels}", f"data.images={images}", f"data.out={out}",
                                  "data.image_size=32", *extra])


def train_overrides(prepared: Path, work: Path, *extra: str) -> list[str]:
    """The ``--set`` overrides of :func:`train_config`, for a job's command line."""
    return [f"data.out={prepared}", "model.head=[16]", "model.dropout=0", "model.sex_embedding=4",
            "train.batch_size=8", "train.epochs=1", "train.num_workers=1", "train.threads_per_worker=1",
            "train.shuffle_buffer=16", f"train.storage_path={work / 'runs'}", f"registry.root={work / 'registry'}",
            *extra]


def train_config(prepared: Path, work: Path, *extra: str) -> Config:
    """A tiny, quick training config on a prepared dataset, writing runs and bundles under ``work``."""
    return load_config(overrides=train_overrides(prepared, work, *extra))


def make_bundle(folder: Path, seed: int = 0, val_mae: float = 9.5, data: str = "manifest-a", size: int = 64,
                name: str = "m", trust=None):
    """A randomly initialised model written as a bundle (serving and the registry need weights, not training),
    with the trust signals ``trust`` (none by default); returns the folder and the model."""
    import torch

    from boneage.bundle import write_bundle
    from boneage.model import build_model

    torch.manual_seed(seed)
    meta = bundle_meta(val_mae, data, size, name, trust)
    model = build_model(meta.model, size).eval()
    return write_bundle(folder, model.state_dict(), meta), model


def bundle_meta(val_mae: float = 9.5, data: str = "manifest-a", size: int = 64, name: str = "m", trust=None):
    """The ``bundle.json`` of a small test model: tiny head, target 120 +- 40 months, validated on ``data``."""
    from boneage.bundle import BundleMeta, DataSource, TargetScale

    cfg = load_config(overrides=["model.head=[16]", "model.dropout=0", "model.sex_embedding=4"]).model
    return BundleMeta(name=name, model=cfg, image_size=size, target=TargetScale(mean=120.0, std=40.0),
                      data=DataSource(manifest_fingerprint=data), metrics={"val_mae": val_mae}, trust=trust)


# Residual SD by true age band: infants are read far more precisely than teenagers, as in the RSNA data.
NOISE_BY_BAND = {"0-2 y": 3.0, "2-6 y": 6.0, "6-10 y": 9.0, "10-14 y": 12.0, "14-19 y": 15.0}


def regressed_to_the_mean(rng, count: int):
    """Synthetic validation answers (predicted, true, male): pulled 30% toward the mean age, with noise by band."""
    import numpy as np

    from boneage.metrics import age_band

    true = rng.uniform(0, 228, count)
    noise = np.array([NOISE_BY_BAND[band] for band in age_band(true)])
    predicted = 120 + 0.7 * (true - 120) + rng.normal(0, 1, count) * noise * 0.7
    return predicted, true, rng.random(count) < 0.5


def synthetic_trust(seed: int = 0, count: int = 600):
    """Trust signals fitted on :func:`regressed_to_the_mean` answers that also read 10 months young: a correction
    far from the identity near the mean age, where a random model answers."""
    import numpy as np

    from boneage.trust import TrustSignals

    predicted, true, male = regressed_to_the_mean(np.random.default_rng(seed), count)
    return TrustSignals.fit(predicted - 10, true, male)


def read_curves(run_folder: Path) -> dict[str, dict[int, float]]:
    """The TensorBoard scalars of one run folder, as TensorBoard reads them: {tag: {step: value}}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_folder)).Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def as_logged(value: float) -> float:
    """A metric as a TensorBoard scalar stores it (float32)."""
    import numpy as np

    return float(np.float32(value))


CHROMIUM = Path("/usr/bin/chromium")
# Headless chromium without its own background traffic (updates, field trials, first-run pages).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]


@contextmanager
def headless_chromium():
    """Debian's chromium driven by Playwright (the test skips when it is not installed)."""
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.skip(f"no browser at {CHROMIUM}: install Debian's chromium (.ci/run does)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
