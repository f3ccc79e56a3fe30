"""TensorBoard curves: one point per epoch, a resumed run drawn once, and the README's `tensorboard --logdir`
serving them."""

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from boneage.curves import CURVES, TensorBoardCurves
from helpers import as_logged, free_port, read_curves, wait_until


def epoch_metrics(epoch: int, offset: float = 0.0) -> dict[str, float]:
    """What every worker reports for an epoch (the values differ by curve and epoch)."""
    return {"epoch": epoch, "train_loss": 1.0 / epoch + offset, "val_mae": 30.0 / epoch + offset,
            "val_rmse": 40.0 / epoch + offset, "lr": 1e-3 * epoch, "images_per_s_per_worker": 50.0}


def report(curves: TensorBoardCurves, epochs: range, offset: float = 0.0) -> None:
    for epoch in epochs:  # two workers: the callback draws rank 0's metrics
        curves.after_report(None, [epoch_metrics(epoch, offset), epoch_metrics(epoch, offset + 100)], None)


def test_each_epoch_is_drawn_once_even_after_a_resume(tmp_path):
    run = tmp_path / "run"
    report(TensorBoardCurves(str(run)), range(1, 4))  # epochs 1-3, then the driver dies
    report(TensorBoardCurves(str(run)), range(3, 5), offset=0.5)  # resumed from the epoch-2 checkpoint
    curves = read_curves(run)
    assert set(curves) == set(CURVES)
    for tag in CURVES:
        expected = {1: epoch_metrics(1)[tag], 2: epoch_metrics(2)[tag], 3: epoch_metrics(3, 0.5)[tag],
                    4: epoch_metrics(4, 0.5)[tag]}
        assert curves[tag] == {epoch: as_logged(value) for epoch, value in expected.items()}


def test_tensorboard_serves_the_curves_of_every_run(session_temp):
    logdir = session_temp / "tensorboard"  # under the session's temp dir: the session-end check finds a leftover
    for name in ("boneage-run", "sweep-trial-1"):
        report(TensorBoardCurves(str(logdir / name)), range(1, 3))
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "tensorboard"), "--logdir", str(logdir),
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        every_run = {"boneage-run": set(CURVES), "sweep-trial-1": set(CURVES)}
        tags = wait_for_json(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", server,
                             lambda answer: len(answer) == len(every_run))  # it loads runs in the background
        assert {run: set(run_tags) for run, run_tags in tags.items()} == every_run
        points = wait_for_json(f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=boneage-run&tag=val_mae",
                               server)
        assert [(step, value) for _, step, value in points] == [(1, as_logged(30.0)), (2, as_logged(15.0))]
    finally:
        server.terminate()
        server.wait(timeout=30)


def wait_for_json(url: str, server: subprocess.Popen, ready=bool, timeout: float = 60):
    """The JSON at ``url`` once the server's answer is ``ready`` (and truthy)."""

    def ready_answer():
        assert server.poll() is None, f"tensorboard exited: {server.stderr.read()[-2000:]}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                answer = json.load(response)
        except OSError:
            return None  # not listening yet
        return answer if ready(answer) else None

    return wait_until(ready_answer, f"tensorboard to answer {url}", timeout, interval=0.5)
