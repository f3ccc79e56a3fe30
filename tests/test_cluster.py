"""A real two-node local Ray cluster: `ray start --head`, a second `ray start --address` raylet with its own
resources, and the training job submitted with `ray job submit --working-dir .` exactly as the README says."""

import os
import sys
from pathlib import Path

import pytest

from boneage.cluster import stop_head
from helpers import free_port, ray_cli

pytestmark = pytest.mark.slow


def node_ports() -> list[str]:
    """Ports a second raylet on the same machine must not share with the first."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"]


@pytest.fixture
def two_node_cluster(session_temp):
    """Start a head (2 CPUs) and a worker node (2 CPUs) from the project's venv; yield (env, dashboard URL)."""
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = free_port(), free_port()
    temp_dir = session_temp / "two-node"
    head = ray_cli(env, "start", "--head", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=true",
                   f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
                   f"--temp-dir={temp_dir}", "--disable-usage-stats", *node_ports())
    assert head.returncode == 0, head.stdout + head.stderr
    try:
        worker = ray_cli(env, "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=2", '--resources={"second_node": 1}',
                         *node_ports())
        assert worker.returncode == 0, worker.stdout + worker.stderr
        yield env, f"http://127.0.0.1:{dashboard}"
    finally:
        stop_head(temp_dir, gcs)  # its processes, and its Ray client server, which names only the GCS port


def test_job_submit_trains_on_two_nodes(two_node_cluster, prepared_dir, tmp_path):
    env, dashboard = two_node_cluster
    submit = ray_cli(
        env, "job", "submit", "--address", dashboard, "--working-dir", ".", "--",
        "python", "jobs/train.py", "--config", "configs/demo.yaml", "--set", f"data.out={prepared_dir}",
        "train.num_workers=2", "train.placement_strategy=STRICT_SPREAD", "train.epochs=1", "train.batch_size=8",
        "train.threads_per_worker=1", "model.head=[16]", f"train.storage_path={tmp_path / 'runs'}",
        f"registry.root={tmp_path / 'registry'}", timeout=900)
    output = submit.stdout + submit.stderr
    assert submit.returncode == 0, output
    assert "training on 2 worker(s) across 2 node(s)" in output
    assert "val_mae" in output and "best epoch 1: val MAE" in output
    bundle = Path(next(line for line in output.splitlines() if line.startswith("bundle: ")).split(": ", 1)[1])
    assert (bundle / "model.pt").is_file() and (bundle / "bundle.json").is_file()
