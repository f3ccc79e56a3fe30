"""A real two-node local Ray cluster: `ray start --head`, a second `ray start --address` raylet with its own
resources, and the training and prediction jobs submitted with `ray job submit --working-dir .` exactly as the
README says."""

import os
import re
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from helpers import free_port, make_bundle, process_table, ray_cli, stop_processes, wait_until

pytestmark = pytest.mark.slow


def node_ports() -> list[str]:
    """Ports a second raylet on the same machine must not share with the first."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"]


@dataclass
class TwoNodes:
    """A running local cluster: ``env`` runs Ray's CLI against it. The second node's processes (raylet, agents,
    workers) inherit ``second_node`` in their environment, which finds them as the cluster's marker finds all."""

    env: dict
    dashboard_port: int
    gcs: int
    second_node: str = ""

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def add_second_node(self) -> None:
        """``ray start --address`` a worker node of 2 CPUs with a ``second_node`` resource."""
        self.second_node = f"second-node-{uuid.uuid4().hex}"
        worker = ray_cli({**self.env, "BONEAGE_SECOND_NODE": self.second_node}, "start",
                         f"--address=127.0.0.1:{self.gcs}", "--num-cpus=2", '--resources={"second_node": 1}',
                         *node_ports())
        assert worker.returncode == 0, worker.stdout + worker.stderr

    def stop_second_node(self) -> None:
        """What ``ray stop`` on the second machine does, and to nothing else on this one: SIGTERM the second node's
        raylet and every process it started (its workers and agents)."""
        processes = process_table(self.second_node)
        assert any("raylet" in command for _, command in processes), f"the second node's raylet: {processes}"
        stop_processes(pid for pid, _ in processes)


@pytest.fixture(scope="module")
def two_node_cluster(session_temp):
    """Start a head (2 CPUs) and a worker node (2 CPUs) from the project's venv; yield them as :class:`TwoNodes`.
    The module's jobs share it (starting one takes a minute on 2 cores).

    Every process the two ``ray start`` commands leave running (raylets, GCS, dashboard, Ray client server,
    workers) inherits the cluster's own temp dir in its environment (``BONEAGE_TEST_CLUSTER``): clean-up stops
    exactly those, even when the head failed to start, and removes the temp dir."""
    temp_dir = Path(tempfile.mkdtemp(prefix="2n-", dir=session_temp))  # short: Ray's socket paths are limited
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "BONEAGE_TEST_CLUSTER": str(temp_dir)}
    env.pop("RAY_ADDRESS", None)
    cluster = TwoNodes(env, dashboard_port=free_port(), gcs=free_port())
    try:
        head = ray_cli(env, "start", "--head", f"--port={cluster.gcs}", "--num-cpus=2", "--include-dashboard=true",
                       f"--dashboard-port={cluster.dashboard_port}",
                       f"--ray-client-server-port={free_port()}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
                       *node_ports())
        assert head.returncode == 0, head.stdout + head.stderr
        cluster.add_second_node()
        yield cluster
    finally:
        # Exactly what the two `ray start` commands started and what those started since (workers, the job's
        # driver): all carry the marker; a pid recorded earlier could have been reused by another process by now.
        stop_processes(pid for pid, _ in process_table(str(temp_dir)))
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(env: dict, dashboard: str, *entrypoint: str, timeout: float = 600, options: tuple = ()) -> str:
    """``ray job submit --working-dir . -- <entrypoint>`` as the README says; its output, after checking it passed.
    ``options`` go before the entrypoint (``--no-wait``: return once it is submitted)."""
    done = ray_cli(env, "job", "submit", "--address", dashboard, "--working-dir", ".", *options, "--",
                   *entrypoint, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def test_job_submit_predicts_on_the_cluster(two_node_cluster, phantom_dir, tmp_path):
    env, dashboard = two_node_cluster.env, two_node_cluster.dashboard
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
    env, dashboard = two_node_cluster.env, two_node_cluster.dashboard
    bundle = make_bundle(tmp_path / "bundle", size=32)[0]
    out = tmp_path / "evaluation"
    output = submit(
        env, dashboard, "python", "jobs/evaluate.py", "--config", "configs/evaluate.yaml", "--set",
        f"eval.bundle={bundle}",
        f"eval.data={prepared_dir}", "eval.split=test", f"eval.out={out}", "eval.actors=2",
        "eval.bootstrap_resamples=100", "eval.gallery_cases=1", timeout=600)
    assert f"report: {out / 'report.html'}" in output.splitlines()
    assert (out / "metrics.json").is_file() and (out / "report.html").is_file()


EPOCHS = 5  # the node goes after the first checkpoint: a quiet machine may train a few more epochs meanwhile


def test_job_submit_trains_on_two_nodes_and_goes_on_without_the_second(two_node_cluster, prepared_dir, tmp_path):
    """Training submitted as the README says spreads its two workers over both nodes. ``ray stop`` on the second
    node mid-training: Ray Train restarts both workers on what is left (the head) from the last checkpoint and the
    job succeeds; its bundle comes from a whole checkpoint. Last in the module: the second node it adds back is
    new."""
    from boneage.bundle import load_bundle, read_best
    from boneage.train import FinishedRun

    cluster, runs, job = two_node_cluster, tmp_path / "runs", "lose-a-node"
    submit(cluster.env, cluster.dashboard, "python", "jobs/train.py", "--config", "configs/demo.yaml", "--set",
           f"data.out={prepared_dir}", "train.num_workers=2", "train.placement_strategy=SPREAD",
           "train.cpus_per_worker=0.5", f"train.epochs={EPOCHS}", "train.batch_size=8", "train.threads_per_worker=1",
           "train.max_failures=1", "train.run_name=lost", "model.head=[16]", f"train.storage_path={runs}",
           f"registry.root={tmp_path / 'registry'}", options=("--no-wait", f"--submission-id={job}"))
    try:
        wait_until(lambda: (runs / "lost" / "checkpoint_manager_snapshot.json").is_file(),
                   "the run's first checkpoint", timeout=600)
        cluster.stop_second_node()
        logs = ray_cli(cluster.env, "job", "logs", "--address", cluster.dashboard, "--follow", job, timeout=900).stdout
        status = ray_cli(cluster.env, "job", "status", "--address", cluster.dashboard, job).stdout
    finally:
        cluster.add_second_node()  # for the module's other tests (in a shuffled order, some run after this one)
    assert f"Job '{job}' succeeded" in status, logs
    assert "training on 2 worker(s) across 2 node(s), from epoch 1" in logs, logs
    # Restarted on the head alone from a checkpoint (an epoch takes seconds here: the first one, or a later one)
    # with epochs still to go, where it ended.
    restarts = set(re.findall(r"training on 2 worker\(s\) across 1 node\(s\), from epoch (\d+)", logs))
    assert len(restarts) == 1 and 2 <= int(min(restarts)) <= EPOCHS, logs  # (the job log repeats worker lines)
    finished = FinishedRun.load(str(runs), "lost")
    assert finished.final_metrics["epoch"] == EPOCHS
    assert finished.final_metrics["resumed_at_epoch"] == int(min(restarts)) - 1
    bundle = Path(finished.bundle)
    assert [version.name for version in bundle.parent.iterdir() if version.is_dir()] == [bundle.name], logs
    assert load_bundle(bundle).meta.val_mae == finished.metrics["val_mae"]  # whole: its checksum verified
    assert read_best(tmp_path / "registry", "boneage-vgg16")["version"] == int(bundle.name)
    assert f"bundle: {bundle}" in logs.splitlines(), logs  # the job's own last line
