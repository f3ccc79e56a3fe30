"""A real two-node local Ray cluster: `ray start --head`, a second `ray start --address` raylet with its own
resources, and the training and prediction jobs submitted with `ray job submit --working-dir .` exactly as the
README says."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from helpers import free_port, make_bundle, process_table, ray_cli, stop_processes

pytestmark = pytest.mark.slow


def node_ports() -> list[str]:
    """Ports a second raylet on the same machine must not share with the first."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"]


@pytest.fixture(scope="module")
def two_node_cluster(session_temp):
    """Start a head (2 CPUs) and a worker node (2 CPUs) from the project's venv; yield (env, dashboard URL). The
    module's jobs share it (starting one takes a minute on 2 cores).

    Every process the two ``ray start`` commands leave running (raylets, GCS, dashboard, Ray client server,
    workers) inherits the cluster's own temp dir in its environment (``BONEAGE_TEST_CLUSTER``): clean-up stops
    exactly those, even when the head failed to start, and removes the temp dir."""
    temp_dir = Path(tempfile.mkdtemp(prefix="2n-", dir=session_temp))  # short: Ray's socket paths are limited
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "BONEAGE_TEST_CLUSTER": str(temp_dir)}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = free_port(), free_port()
    try:
        head = ray_cli(env, "start", "--head", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=true",
                       f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
                       f"--temp-dir={temp_dir}", "--disable-usage-stats", *node_ports())
        assert head.returncode == 0, head.stdout + head.stderr
        worker = ray_cli(env, "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=2", '--resources={"second_node": 1}',
                         *node_ports())
        assert worker.returncode == 0, worker.stdout + worker.stderr
        yield env, f"http://127.0.0.1:{dashboard}"
    finally:
        # Exactly what the two `ray start` commands started and what those started since (workers, the job's
        # driver): all carry the marker; a pid recorded earlier could have been reused by another process by now.
        stop_processes(pid for pid, _ in process_table(str(temp_dir)))
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(env: dict, dashboard: str, *entrypoint: str, timeout: float = 600) -> str:
    """``ray job submit --working-dir . -- <entrypoint>`` as the README says; its output, after checking it passed."""
    done = ray_cli(env, "job", "submit", "--address", dashboard, "--working-dir", ".", "--", *entrypoint,
                   timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def test_job_submit_trains_on_two_nodes(two_node_cluster, prepared_dir, tmp_path):
    env, dashboard = two_node_cluster
    output = submit(
        env, dashboard, "python", "jobs/train.py", "--config", "configs/demo.yaml", "--set",
        f"data.out={prepared_dir}",
        "train.num_workers=2", "train.placement_strategy=STRICT_SPREAD", "train.epochs=1", "train.batch_size=8",
        "train.threads_per_worker=1", "model.head=[16]", f"train.storage_path={tmp_path / 'runs'}",
        f"registry.root={tmp_path / 'registry'}", timeout=900)
    assert "training on 2 worker(s) across 2 node(s)" in output
    assert "val_mae" in output and "best epoch 1: val MAE" in output
    bundle = Path(next(line for line in output.splitlines() if line.startswith("bundle: ")).split(": ", 1)[1])
    assert (bundle / "model.pt").is_file() and (bundle / "bundle.json").is_file()


def test_job_submit_predicts_on_the_cluster(two_node_cluster, phantom_dir, tmp_path):
    env, dashboard = two_node_cluster
    bundle = make_bundle(tmp_path / "bundle", size=32)[0]
    out = tmp_path / "predictions.csv"
    output = submit(
        env, dashboard, "python", "jobs/predict.py", "--config", "configs/predict.yaml", "--set",
        f"predict.bundle={bundle}",
        f"predict.labels={phantom_dir / 'boneage-training-dataset.csv'}", f"predict.images={phantom_dir}",
        f"predict.out={out}", "predict.actors=2", "predict.batch_size=16", timeout=600)
    assert "scored 60 images (60 with a true age)" in output
    assert f"predictions: {out}" in output.splitlines()
    predictions = pd.read_csv(out)
    assert len(predictions) == 60 and list(predictions.columns) == ["id", "sex", "bone_age_months", "boneage"]


def test_job_submit_evaluates_on_the_cluster(two_node_cluster, prepared_dir, tmp_path):
    env, dashboard = two_node_cluster
    bundle = make_bundle(tmp_path / "bundle", size=32)[0]
    out = tmp_path / "evaluation"
    output = submit(
        env, dashboard, "python", "jobs/evaluate.py", "--config", "configs/evaluate.yaml", "--set",
        f"eval.bundle={bundle}",
        f"eval.data={prepared_dir}", "eval.split=test", f"eval.out={out}", "eval.actors=2",
        "eval.bootstrap_resamples=100", "eval.gallery_cases=1", timeout=600)
    assert f"report: {out / 'report.html'}" in output.splitlines()
    assert (out / "metrics.json").is_file() and (out / "report.html").is_file()
