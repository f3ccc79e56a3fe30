"""The demo's Ray steps beside a user's cluster: a foreign head started from a PATH without the project's venv (its
jobs' `python` lacks boneage, torch and Ray), and the demo's own cluster (boneage.cluster) started, found again,
given a job, Serve and a query, and stopped, leaving the foreign cluster as it was."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from boneage.cluster import HeadPorts, head_processes, port_in_use, stop_head
from helpers import ROOT, free_port, make_bundle, ray_cli

pytestmark = pytest.mark.slow

VENV_BIN = str(Path(sys.executable).parent)


def user_port(default: int) -> int:
    """A user's cluster takes Ray's default ports; another may hold them on a shared machine."""
    return free_port() if port_in_use(default) else default


@pytest.fixture(scope="module")
def foreign_cluster(session_temp):
    """A user's head (2 CPUs) started with Ray's own defaults from a PATH without the venv; yields (dashboard URL,
    its env)."""
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != VENV_BIN)
    env = {**os.environ, "PATH": path, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    temp_dir, gcs, dashboard = session_temp / "foreign", user_port(6379), user_port(8265)
    head = ray_cli(env, "start", "--head", f"--port={gcs}", "--num-cpus=2", f"--dashboard-port={dashboard}",
                   f"--ray-client-server-port={user_port(10001)}",
                   f"--dashboard-agent-listen-port={user_port(52365)}", f"--temp-dir={temp_dir}",
                   "--disable-usage-stats")
    assert head.returncode == 0, head.stdout + head.stderr
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        stop_head(temp_dir, gcs)


def cluster_cli(state: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -m boneage.cluster` as the Makefile runs it."""
    return subprocess.run([sys.executable, "-m", "boneage.cluster", "--state", str(state), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def preview_entrypoint(prepared: Path, png: Path) -> list[str]:
    """The preview job: it needs what the training job needs (boneage, torch, kornia, Ray Data) in a fraction of
    its time."""
    return ["python", "jobs/preview_augment.py", "--config", "configs/demo.yaml", "--set", f"data.out={prepared}",
            "augment.preview_images=2", "--out", str(png)]


def foreign_jobs(dashboard: str) -> list[str]:
    from ray.job_submission import JobSubmissionClient

    return [job.entrypoint for job in JobSubmissionClient(dashboard).list_jobs()]


def test_job_on_a_head_started_without_the_venv(foreign_cluster, prepared_dir, tmp_path):
    dashboard, env = foreign_cluster
    preview = tmp_path / "preview.png"
    plain = ray_cli(env, "job", "submit", "--address", dashboard, "--working-dir", ".", "--",
                    *preview_entrypoint(prepared_dir, preview), timeout=300)
    assert plain.returncode != 0 and "No module named" in plain.stdout + plain.stderr  # what users met: boneage
    submitted = cluster_cli(tmp_path / "unused.json", "submit", "--address", dashboard, "--",
                            *preview_entrypoint(prepared_dir, preview))
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output
    assert f"preview: {preview}" in output and preview.is_file()


def test_demo_steps_beside_a_foreign_cluster(foreign_cluster, prepared_dir, phantom_dir, tmp_path, session_temp):
    foreign_dashboard, _ = foreign_cluster
    state, demo_temp = tmp_path / "ray-cluster.json", session_temp / "demo"
    started = cluster_cli(state, "start", "--temp-dir", str(demo_temp), "--num-cpus", "2", timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    ports = HeadPorts(**json.loads(state.read_text())["ports"])
    try:
        again = cluster_cli(state, "start", timeout=60)
        assert again.stdout == started.stdout  # found again, not started twice
        dashboard = cluster_cli(state, "address").stdout.strip()
        assert dashboard == f"http://127.0.0.1:{ports.dashboard}" != foreign_dashboard

        previewed = cluster_cli(state, "submit", "--", *preview_entrypoint(prepared_dir, tmp_path / "preview.png"))
        assert previewed.returncode == 0, previewed.stdout + previewed.stderr
        bundle = str(make_bundle(tmp_path / "bundle", size=32)[0])  # training jobs: tests/test_cluster.py

        with socket.socket() as taken:  # someone else holds the port the Serve config asks for
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            config = serve_config(tmp_path, bundle, port=taken.getsockname()[1])
            deployed = cluster_cli(state, "serve-deploy", str(config), timeout=300)
            assert deployed.returncode == 0, deployed.stdout + deployed.stderr
            url = deployed.stdout.strip().splitlines()[-1].removeprefix("service: ")
            assert url != f"http://127.0.0.1:{taken.getsockname()[1]}"
            assert cluster_cli(state, "service-url").stdout.strip() == url
        query = subprocess.run(
            [sys.executable, "jobs/query.py", "--url", url, "--set", "query.wait_s=120", "--file",
             str(next(phantom_dir.rglob("*.png"))),
             "--sex", "F"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert query.returncode == 0, query.stdout + query.stderr

        assert not any(str(tmp_path) in entrypoint for entrypoint in foreign_jobs(foreign_dashboard))
    finally:
        stopped = cluster_cli(state, "stop", timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert not head_processes(demo_temp, ports.gcs) and not state.exists()
    foreign_jobs(foreign_dashboard)  # the foreign cluster still answers


def serve_config(folder: Path, bundle: str, port: int) -> Path:
    """configs/serve.yaml serving ``bundle``, asking for ``port``."""
    spec = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    spec["http_options"]["port"] = port
    spec["applications"][0]["args"]["model_uri"] = bundle
    path = folder / "serve.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path
