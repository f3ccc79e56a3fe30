"""The config system: YAML + --set overrides, typed, validated before any work starts."""

import dataclasses
import runpy
import subprocess
import sys
import typing

import pytest
import yaml

from boneage.config import (DECIDED_ROLES, Config, ConfigError, Role, derived_name, keys_with, load_config,
                            save_config)
from helpers import ROOT


def test_defaults_load_and_every_shipped_config_is_valid():
    assert isinstance(load_config(), Config)
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        if "applications" in yaml.safe_load(path.read_text()):
            continue  # Ray Serve's own config format
        load_config(path)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  image_size: 64\n  labels: a.csv\ntrain:\n  epochs: 2\n")
    cfg = load_config(path, ["data.image_size=96", "model.head=[256, 64]", "train.lr=1e-3", "model.weights=none"])
    assert cfg.data.image_size == 96  # the override wins
    assert cfg.data.labels == "a.csv"  # the file is kept where not overridden
    assert cfg.train.epochs == 2
    assert cfg.model.head == [256, 64]
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.model.weights == "none"
    assert cfg.data.val_fraction == 0.15  # a default


def test_optional_values_accept_null():
    assert load_config(overrides=["data.test_labels=null"]).data.test_labels is None
    assert load_config(overrides=["data.test_labels=t.csv"]).data.test_labels == "t.csv"


@pytest.mark.parametrize("override, words", [
    ("data.image_sise=64", ["data.image_sise", "image_size", "labels"]),
    ("dat.image_size=64", ["dat", "valid keys in config", "data"]),
    ("data.image_size=big", ["data.image_size", "integer", "'big'"]),
    ("data.image_size=8", ["data.image_size=8", "out of range", "32..2048"]),
    ("data.image_size=100", ["data.image_size=100", "multiple of 32", "use 96 or 128"]),
    ("data.val_fraction=1.5", ["data.val_fraction", "0..0.9"]),
    ("data.val_fraction=0.85", ["val_fraction + data.test_fraction", "below 1"]),
    ("model.pooling=mean", ["model.pooling", "flatten", "avg", "max"]),
    ("model.head=512", ["model.head", "list"]),
    ("model.head=[512, 0]", ["model.head", "out of range"]),
    ("train.use_gpu=maybe", ["train.use_gpu", "auto", "True", "False"]),
    ("augment.horizontal_flip=2", ["augment.horizontal_flip", "true/false"]),
    ("augment.brightness_range=[1.2, 0.8]", ["augment.brightness_range", "low <= high"]),
    ("train.epochs=2.5", ["train.epochs", "integer"]),
    ("data.image_size", ["area.key=value"]),
])
def test_bad_keys_and_values_name_the_key_and_what_is_allowed(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    for word in words:
        assert word in str(err.value)


def test_a_weight_average_without_batchnorm_recalibration_is_rejected():
    with pytest.raises(ConfigError, match="train.ema_epochs needs train.bn_recalibration_batches > 0"):
        load_config(overrides=["train.ema_epochs=0.5", "train.bn_recalibration_batches=0"])


def test_bad_yaml_files_are_reported(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_saved_config_reloads_to_the_same_config(tmp_path):
    cfg = load_config(overrides=["data.image_size=96", "model.head=[8]"])
    path = save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(path) == cfg


def test_job_rejects_bad_settings_before_doing_any_work(tmp_path):
    out = subprocess.run([sys.executable, "jobs/prepare.py", "--set", f"data.out={tmp_path}/o",
                          "data.image_size=-3"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "data.image_size=-3 is out of range" in out.stderr
    assert not (tmp_path / "o").exists()


def undecided_fields(cls: type = Config) -> list[str]:
    """``area.key`` of every field, in the areas of DECIDED_ROLES, whose setting() gives no roles."""
    hints = typing.get_type_hints(cls)
    return [f"{area}.{f.name}" for area in DECIDED_ROLES for f in dataclasses.fields(hints[area])
            if f.metadata.get("roles") is None]


def test_every_setting_of_the_named_areas_decides_its_roles():
    """A new data/model/augment/train/tune field must say whether it is fingerprinted or names runs and sweeps
    (roles=Role.NONE when neither): left out, it would silently join or miss the names that let jobs resume."""
    assert undecided_fields() == []

    @dataclasses.dataclass
    class NewTrain(type(Config().train)):
        new_knob: int = dataclasses.field(default=1)  # a field added without roles

    @dataclasses.dataclass
    class NewConfig(Config):
        train: NewTrain = dataclasses.field(default_factory=NewTrain)

    assert undecided_fields(NewConfig) == ["train.new_knob"]


def test_roles_are_read_from_the_fields():
    searchable = keys_with(Role.SEARCHABLE)
    assert {"train.lr", "model.head", "augment.zoom_range"} <= set(searchable)
    assert set(searchable) <= set(keys_with(Role.RUN_NAME))  # a searched setting changes what a trial learns
    assert all(key.split(".")[0] in ("model", "augment", "train") for key in searchable)  # what a trial trains with
    assert "train.num_workers" not in keys_with(Role.RUN_NAME)
    fingerprinted = keys_with(Role.FINGERPRINT)
    assert {"data.image_size", "data.labels"} <= set(fingerprinted) and "data.out" not in fingerprinted
    assert {key.split(".")[0] for key in fingerprinted} == {"data"}


def test_derived_names_follow_what_is_learned_and_stay_stable():
    cfg = load_config()
    # Pinned: a resubmitted job must find the run it started before (these are the names the code gave then).
    assert derived_name(cfg, "data-a") == "boneage-vgg16-dcda25b0a4"
    executes = load_config(overrides=["train.num_workers=4", "train.storage_path=/elsewhere", "tune.data_cpus=2"])
    assert derived_name(executes, "data-a") == derived_name(cfg, "data-a")
    assert derived_name(executes, "data-a", sweep=True) == derived_name(cfg, "data-a", sweep=True)
    assert derived_name(load_config(overrides=["train.lr=0.01"]), "data-a") != derived_name(cfg, "data-a")
    assert derived_name(cfg, "data-b") != derived_name(cfg, "data-a")
    sweep = derived_name(cfg, "data-a", sweep=True)
    assert sweep.startswith("sweep-boneage-vgg16-") and sweep != "sweep-" + derived_name(cfg, "data-a")
    assert derived_name(load_config(overrides=["tune.num_samples=3"]), "data-a", sweep=True) != sweep
    assert derived_name(load_config(overrides=["tune.num_samples=3"]), "data-a") == derived_name(cfg, "data-a")


def test_a_config_file_builds_on_the_file_it_includes(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "train.yaml").write_text(
        "model:\n  head: [64]\n  dropout: 0.2\ntrain:\n  epochs: 3\ntune:\n  search_space: {train.lr: "
        "{choice: [0.1]}}\n")
    (tmp_path / "sweep.yaml").write_text(
        "include: base/train.yaml\nmodel:\n  dropout: 0.4\ntune:\n  search_space: {model.head: {choice: [[8]]}}\n")
    cfg = load_config(tmp_path / "sweep.yaml", ["train.epochs=5"])
    assert cfg.model.head == [64] and cfg.model.dropout == 0.4  # kept from the base, replaced key by key
    assert cfg.tune.search_space == {"model.head": {"choice": [[8]]}}  # a key's value is replaced whole
    assert cfg.train.epochs == 5  # --set still wins


def test_the_tune_config_builds_on_the_training_config():
    tune, train = load_config(ROOT / "configs" / "tune.yaml"), load_config(ROOT / "configs" / "train.yaml")
    for area in ("data", "model", "augment", "registry"):
        assert getattr(tune, area) == getattr(train, area)
    assert tune.train == train.train
    assert tune.tune.search_space and not train.tune.search_space


@pytest.mark.parametrize("files, words", [
    ({"a.yaml": "include: missing.yaml\n"}, ["missing.yaml", "included by", "a.yaml", "does not exist"]),
    ({"a.yaml": "include: b.yaml\n", "b.yaml": "include: a.yaml\n"}, ["a.yaml -> b.yaml -> a.yaml", "cycle"]),
    ({"a.yaml": "include: a.yaml\n"}, ["a.yaml -> a.yaml", "cycle"]),
    ({"a.yaml": "include: [b.yaml]\n"}, ["a.yaml", "include must name one file"]),
])
def test_bad_includes_fail_naming_the_file(tmp_path, files, words):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "a.yaml")
    assert "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("job, areas", [
    ("make_phantoms", ["phantoms"]), ("prepare", ["data"]), ("preview_augment", ["data", "augment"]),
    ("train", ["data", "model", "augment", "train", "registry"]),
    ("tune", ["data", "model", "augment", "train", "tune", "registry"]), ("query", ["query"]),
    ("predict", ["predict", "registry"]), ("evaluate", ["eval", "registry"])])
def test_job_help_lists_every_setting_of_its_areas(job, areas, capsys):
    """``--help`` lists each key of the areas the job reads, with its documentation, one line each."""
    main = runpy.run_path(str(ROOT / "jobs" / f"{job}.py"), run_name="imported")["main"]
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    listed = {line.strip().split(" (", 1)[0]: line for line in lines if line.startswith("  ") and " (" in line}
    for area in areas:
        for field in dataclasses.fields(type(getattr(Config(), area))):
            key = f"{area}.{field.name}"
            assert key in listed, f"{job} --help does not list {key}"
            assert listed[key].rstrip().endswith(field.metadata.get("doc", "")), listed[key]


def test_progress_lines_go_to_the_stdout_of_the_moment(monkeypatch):
    """A job run in-process twice (tests, a notebook) logs to the second run's stdout, not to the first one's,
    which is closed by then ("I/O operation on closed file" in every later line)."""
    import io
    import logging

    from boneage.cli import parse_job_args

    first, second = io.StringIO(), io.StringIO()
    for stdout in (first, second):
        monkeypatch.setattr(sys, "stdout", stdout)
        parse_job_args([], description="a job", default_config=None, areas=["data"], uses_ray=False)
        logging.getLogger("boneage").info("settings read")
        first.close()
    assert second.getvalue() == "settings read\n"
