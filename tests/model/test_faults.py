"""Faults (issue 16): a full disk and concurrent promotion.

A write that runs out of disk space (preparing, checkpointing, exporting a bundle, moving ``best``) ends the job
with one line that says what it was writing where, to free space and rerun, and what is untouched; and leaves what
it would have replaced (the prepared dataset, the run's checkpoints, the registry and its ``best`` alias) exactly
as it was, with no temporary folder left behind. The full disk is a real one: a small tmpfs mounted for the test
(root only: elsewhere the tests skip and say why).

Sweeps finishing at the same moment register and promote concurrently: ``best.json`` must stay valid and point at
the best version, every version complete and distinct.
"""

from __future__ import annotations

import errno
import hashlib
import multiprocessing
import os
import random
import runpy
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

# Only what the promoters need at the top: they are spawned processes that import this module, and Ray's modules
# would double their start-up on 2 cores. The Ray jobs' modules are imported by the tests that run them.
from boneage.artifacts import DiskFull
from boneage.bundle import BundleMeta, promote_if_better, read_best, read_meta, register, versions, write_bundle
from helpers import ROOT, bundle_meta, data_config, make_bundle, train_config

MB = 1 << 20


@contextmanager
def small_disk(folder: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes mounted on ``folder`` for the test; the test skips where none can be mounted."""
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command: a small disk to fill cannot be mounted here")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def leave_free(disk: Path, free: int) -> None:
    """Shrink the tmpfs ``disk`` to what it holds plus ``free`` bytes."""
    stat = os.statvfs(disk)
    used = (stat.f_blocks - stat.f_bfree) * stat.f_frsize
    subprocess.run(["mount", "-o", f"remount,size={used + free}", str(disk)], check=True)


def contents(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` (hidden ones too), a file with the SHA-256 of its bytes: equal before
    and after means nothing was changed, added or left behind."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
            for path in sorted(folder.rglob("*"))}


def disk_full_line(what: str, where: Path | str, kept: str) -> str:
    return f"disk full while writing {what} to {where}: free space there and rerun; {kept}"


def tiny_bundle(folder: Path, val_mae: float, seed: int, data: str = "manifest-a") -> Path:
    """A bundle whose ``model.pt`` is one number: the registry and ``best`` check checksums and read
    ``bundle.json``, never the weights, so registering many costs no 60 MB VGG16 each."""
    return write_bundle(folder, {"w": torch.tensor([float(seed)])}, bundle_meta(val_mae, data))


# ---------------------------------------------------------------- a full disk

@pytest.mark.usefixtures("ray_session")
def test_a_full_disk_while_preparing_keeps_the_previous_dataset(prepared_dir, phantom_dir, tmp_path, capsys):
    """jobs/prepare.py rebuilding a dataset (a new image size) on a disk with room for less than the new one: one
    line, exit 1; the previous dataset is as it was and still current for its settings."""
    from boneage.cli import run_job
    from boneage.dataset import load_split, read_manifest
    from boneage.prepare import prepare_dataset

    labels = phantom_dir / "boneage-training-dataset.csv"
    with small_disk(tmp_path / "disk", 16 * MB) as disk:
        out = disk / "prepared"
        shutil.copytree(prepared_dir, out)
        leave_free(disk, 64 << 10)  # the 60 phantoms at 64 px take over 240 kB
        before = contents(disk)
        job = runpy.run_path(str(ROOT / "jobs" / "prepare.py"), run_name="imported")
        with pytest.raises(SystemExit) as ended:
            run_job(lambda: job["main"](["--set", f"data.labels={labels}", f"data.images={phantom_dir}",
                                         f"data.out={out}", "data.image_size=64"]))
        assert ended.value.code == 1
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert errors == ["error: " + disk_full_line("the prepared dataset", out,
                                                     "the prepared dataset already there (if any) is untouched")]
        assert contents(disk) == before  # the old dataset unchanged, no temporary folder left
        assert prepare_dataset(data_config(labels, phantom_dir, out)) == out  # still current: reused as it is
        assert read_manifest(out)["image_size"] == 32
        assert load_split(out, "train")["image"].shape[1:] == (1, 32, 32)


def registry_with_best(root: Path, name: str, data: str, scratch: Path) -> Path:
    """A registry at ``root`` holding version 1 of ``name`` (val MAE 12, a 32 px model built in ``scratch``) as its
    ``best``."""
    first = make_bundle(scratch / "first", seed=1, val_mae=12.0, data=data, size=32, name=name)[0]
    assert promote_if_better(register(first, root, name), root, name).promoted
    return root


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("export", ["single", "ensemble"])
def test_a_full_disk_while_registering_a_bundle_keeps_the_registry(prepared_dir, tmp_path, export):
    """A training run's export, or the ensemble job's, with no room for the new version in the registry: one line;
    the registry's versions and best as they were, no half-copied version or staging folder left in it."""
    from boneage.dataset import read_manifest
    from boneage.ensemble import export_ensemble

    fingerprint, name = read_manifest(prepared_dir)["fingerprint"], "boneage-vgg16"
    members = [make_bundle(tmp_path / f"member-{seed}", seed, 10.0 + seed, fingerprint, 32, name)[0] for seed in (2, 3)]
    with small_disk(tmp_path / "disk", 128 * MB) as disk:
        root = registry_with_best(disk / "registry", name, fingerprint, tmp_path)
        leave_free(disk, 8 * MB)  # a 32 px VGG16 takes 59 MB
        before = contents(disk)
        with pytest.raises(DiskFull) as refused:
            if export == "single":
                export_checkpoint(members[0], train_config(prepared_dir, disk), prepared_dir)
            else:
                export_ensemble(members, str(prepared_dir), str(root), name)
        assert str(refused.value) == disk_full_line(f"a new version of {name}", root / name,
                                                    f"its versions and {name}:best are untouched")
        assert contents(disk) == before and read_best(root, name)["version"] == 1


@pytest.mark.usefixtures("ray_session")
def test_a_full_disk_while_staging_a_bundle_keeps_the_registry(prepared_dir, tmp_path, monkeypatch):
    """The temporary folder a bundle is built in before it is registered is on a full disk: one line naming it; the
    staging folder removed, the registry untouched."""
    from boneage.dataset import read_manifest

    fingerprint, name = read_manifest(prepared_dir)["fingerprint"], "boneage-vgg16"
    root = registry_with_best(tmp_path / "registry", name, fingerprint, tmp_path)
    bundle = make_bundle(tmp_path / "trained", 2, 10.0, fingerprint, 32, name)[0]
    before = contents(root)
    with small_disk(tmp_path / "disk", 8 * MB) as disk:
        monkeypatch.setattr(tempfile, "tempdir", str(disk))  # tempfile's documented default for every temp folder
        with pytest.raises(DiskFull) as refused:
            export_checkpoint(bundle, train_config(prepared_dir, tmp_path), prepared_dir)
        message = str(refused.value)
        assert message.startswith(f"disk full while writing the model bundle to {disk}/bundle-"), message
        assert message.endswith(": free space there and rerun; the registry is untouched")
        assert not list(disk.iterdir())  # the staging folder is gone
    assert contents(root) == before and read_best(root, name)["version"] == 1


def export_checkpoint(bundle: Path, cfg, prepared: Path) -> Path:
    """What a training run does with its best checkpoint (here a folder holding ``bundle``'s weights): export it
    as a bundle with its signals and register it."""
    from ray.train import Checkpoint

    from boneage.dataset import read_manifest
    from boneage.train import RunPlan, export_bundle

    checkpoint = bundle.parent / "checkpoint"
    checkpoint.mkdir()
    shutil.copy(bundle / "model.pt", checkpoint / "model.pt")
    plan = RunPlan(manifest=read_manifest(prepared), datasets={}, baseline_mae=30.0)
    return export_bundle(Checkpoint.from_directory(checkpoint), cfg, plan, {"val_mae": 11.0, "epoch": 1}, "run")


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint_to_resume_from(prepared_dir, tmp_path):
    """A run whose storage has room for one checkpoint (of a 32 px VGG16 and its optimizer, about 170 MB) but not
    a second: one line, and the registry untouched; with space freed, the same job resumes from epoch 1."""
    from boneage.dataset import read_manifest
    from boneage.train import run_training

    name, fingerprint = "boneage-vgg16", read_manifest(prepared_dir)["fingerprint"]
    root = tmp_path / "registry"
    promote_if_better(register(tiny_bundle(tmp_path / "first", 1.0, seed=1, data=fingerprint), root, name), root, name)
    before = contents(root)
    with small_disk(tmp_path / "disk", 250 * MB) as disk:
        cfg = train_config(prepared_dir, tmp_path, f"train.storage_path={disk}", "train.run_name=full",
                           "train.epochs=2", "train.max_failures=0")
        with pytest.raises(DiskFull) as refused:
            run_training(cfg)
        assert str(refused.value) == disk_full_line("a training checkpoint", disk / "full", "the run's earlier "
                                                    "checkpoints are kept, and the same job resumes from the last one")
        assert contents(root) == before
        subprocess.run(["mount", "-o", "remount,size=1g", str(disk)], check=True)  # space freed
        resumed = run_training(cfg)
    assert (resumed.final_metrics["resumed_at_epoch"], resumed.final_metrics["epoch"]) == (1, 2)


def wrapped_disk_errors() -> dict[str, tuple[BaseException, bool]]:
    """A full disk (and, as a control, a refused write) as each layer hands it on: whether it is a full disk."""
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError, WorkerGroupError

    def oserror(code: int) -> OSError:
        return OSError(code, os.strerror(code))

    def saved_by_torch(cause: OSError) -> RuntimeError:
        try:
            raise cause
        except OSError:
            try:
                raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")
            except RuntimeError as err:  # torch.save: its own error, the OSError as context
                return err

    full, refused = oserror(errno.ENOSPC), oserror(errno.EACCES)
    return {
        "quota": (oserror(errno.EDQUOT), True),
        "torch.save": (saved_by_torch(full), True),
        "a Ray task": (RayTaskError("upload", "traceback", full), True),
        "a Train worker": (WorkerGroupError("rank 0 failed", {0: full}), True),
        "the Train controller": (ControllerError(full), True),  # met a worker's upload error first (CI saw it)
        "copytree": (shutil.Error([("a", "b", os.strerror(errno.ENOSPC))]), True),
        "refused by the controller": (ControllerError(refused), False),
        "refused in a worker": (WorkerGroupError("rank 0 failed", {0: refused}), False),
    }


@pytest.mark.parametrize("layer", list(wrapped_disk_errors()))
def test_a_full_disk_is_recognised_through_every_layer_that_wraps_it(layer):
    """However Ray, Ray Train, torch or shutil wrap it, a full disk is a full disk, and nothing else is."""
    from boneage.artifacts import is_disk_full

    error, full = wrapped_disk_errors()[layer]
    assert is_disk_full(error) is full


def test_a_full_disk_while_moving_best_keeps_it(tmp_path):
    """A better version promoted on a registry disk with no byte free: one line; best.json as it was."""
    with small_disk(tmp_path / "disk", 1 * MB) as disk:
        root = disk / "registry"
        first = register(tiny_bundle(tmp_path / "a", 12.0, seed=1), root, "m")
        better = register(tiny_bundle(tmp_path / "b", 9.0, seed=2), root, "m")
        assert promote_if_better(first, root, "m").promoted
        leave_free(disk, 0)
        before = contents(disk)
        with pytest.raises(DiskFull) as full:
            promote_if_better(better, root, "m")
        assert str(full.value) == disk_full_line("the m:best alias", root / "m" / "best.json", "m:best is untouched")
        assert contents(disk) == before and read_best(root, "m")["version"] == 1


# ---------------------------------------------------------------- concurrent promotion

PROMOTERS, ROUNDS = 4, 25
BARRIER_TIMEOUT = 300  # seconds: spawning a process that imports torch takes a while on a busy 2-core machine


def promote_in_rounds(root: Path, folder: Path, index: int, maes: list[float], barrier) -> None:
    """One sweep's last step, once a round: register its bundle, then (all at once) promote it."""
    bundles = [tiny_bundle(folder / f"{index}-{r}", mae, seed=index * 1000 + r) for r, mae in enumerate(maes)]
    for bundle in bundles:
        barrier.wait(BARRIER_TIMEOUT)  # the round starts
        version = register(bundle, root, "m")
        barrier.wait(BARRIER_TIMEOUT)  # every bundle of the round is registered: promote together
        promote_if_better(version, root, "m")
        barrier.wait(BARRIER_TIMEOUT)  # the round is over: the test checks best


def read_best_until(root: Path, stop, torn) -> None:
    """A service resolving ``m:best`` meanwhile, without the promoters' lock: count the reads of ``best.json``
    that found it torn (not JSON) or pointing at a version that is not there."""
    while not stop.is_set():
        try:
            best = read_best(root, "m")
            if best is not None and not (root / "m" / str(best["version"]) / "bundle.json").is_file():
                torn.value += 1
        except ValueError:  # json.JSONDecodeError: a half-written best.json
            torn.value += 1


def lowest_mae_version(root: Path) -> tuple[int, float]:
    """The registered version with the lowest val MAE, and that MAE."""
    maes = {v: BundleMeta.load(root / "m" / str(v)).val_mae for v in versions(root, "m")}
    best = min(maes, key=maes.get)
    return best, maes[best]


def test_sweeps_promoting_at_the_same_moment_never_corrupt_best(tmp_path):
    """PROMOTERS processes, ROUNDS rounds: each round every process registers a bundle that beats the standing best
    and all promote at once, while another process keeps reading best.json. After each round best is the lowest
    val MAE registered; at the end every bundle is one complete version of its own."""
    root, spawn = tmp_path / "registry", multiprocessing.get_context("spawn")
    rng = random.Random(0)
    # each round's MAEs all beat the previous round's, in a random order: every promoter thinks it moves best
    maes = [[100.0 - r - rng.random() for r in range(ROUNDS)] for _ in range(PROMOTERS)]
    barrier, stop, torn = spawn.Barrier(PROMOTERS + 1), spawn.Event(), spawn.Value("i", 0)
    promoters = [spawn.Process(target=promote_in_rounds, args=(root, tmp_path / "bundles", i, maes[i], barrier))
                 for i in range(PROMOTERS)]
    reader = spawn.Process(target=read_best_until, args=(root, stop, torn))
    for process in (*promoters, reader):
        process.start()
    try:
        for round_ in range(ROUNDS):
            for _ in range(3):
                barrier.wait(BARRIER_TIMEOUT)
            version, mae = lowest_mae_version(root)
            best = read_best(root, "m")
            assert (best["version"], best["val_mae"]) == (version, mae), f"round {round_}: best is {best}"
    finally:
        stop.set()
        barrier.abort()  # a failed check must not leave the promoters waiting
        for process in (*promoters, reader):
            process.join(60)
    assert [p.exitcode for p in promoters] == [0] * PROMOTERS
    assert torn.value == 0, f"{torn.value} reads of best.json found it torn"
    assert versions(root, "m") == list(range(1, PROMOTERS * ROUNDS + 1))
    registered = [read_meta(root / "m" / str(v)) for v in versions(root, "m")]  # each complete: checksums match
    assert sorted(meta.val_mae for meta in registered) == sorted(mae for mine in maes for mae in mine)
    assert len({meta.weights_sha256 for meta in registered}) == PROMOTERS * ROUNDS
    assert not [p.name for p in (root / "m").iterdir() if p.name.startswith(".incoming-")]
