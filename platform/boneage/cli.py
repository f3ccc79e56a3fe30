"""The command line shared by every job: ``--config FILE`` plus ``--set area.key=value`` overrides."""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

from boneage.config import Config, ConfigError, describe, load_config
from boneage.errors import JobError


def parse_job_args(argv: Sequence[str] | None, *, description: str, default_config: str | None,
                   areas: Sequence[str], uses_ray: bool, aliases: dict[str, str] | None = None) -> Config:
    """Parse a job's arguments into a validated :class:`Config`; on a bad key or value, exit 2 with the reason.

    ``aliases`` maps short flags to config keys (``{"--out": "phantoms.out"}``): ``--out D`` is ``--set
    phantoms.out=D``, so there is still one config system. ``areas`` selects the keys listed in ``--help``.
    Every job says whether it ``uses_ray``: only one that does imports Ray (for its logging set-up), says so in its
    first line, before the imports that take a while, and keeps Ray Data's progress records out of its log. The
    others (the HTTP client, the phantom generator) start in a fraction of the time.
    """
    keys = [line for line in describe() if line.split(".", 1)[0] in areas]
    parser = _OneLineErrors(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="settings (override with --set KEY=VALUE):\n  " + "\n  ".join(keys))
    parser.add_argument("--config", default=default_config, help=f"YAML config file (default: {default_config})")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set data.image_size=256 train.epochs=3")
    aliases = aliases or {}
    for flag, key in aliases.items():
        parser.add_argument(flag, dest=key, default=None, metavar="VALUE", help=f"same as --set {key}=VALUE")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    overrides += [f"{key}={getattr(args, key)}" for key in aliases.values() if getattr(args, key) is not None]
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        parser.error(str(err))
    _log_to_stdout()
    if uses_ray:
        _announce_and_quiet_ray()
    return cfg


class _OneLineErrors(argparse.ArgumentParser):
    """An argument parser whose errors (bad flags, config keys or values) are one line, exit code 2: the
    message already names the key and what is allowed, so the usage text would only bury it."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a line is logged: one fixed at the first job would outlive it
    where stdout is swapped per run (pytest's capture, a notebook cell) and then write to a closed file."""

    @property
    def stream(self) -> typing.TextIO:
        return sys.stdout

    @stream.setter
    def stream(self, _ignored: typing.TextIO) -> None:
        pass  # StreamHandler sets it; the property always answers the current stdout


def _log_to_stdout() -> None:
    """The library's progress lines, plain, on stdout (the Ray job log)."""
    logger = logging.getLogger("boneage")
    if not logger.handlers:
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _announce_and_quiet_ray() -> None:
    """The job's first line, before the imports that take a minute on a busy 2-core machine; then Ray Data's
    console records down to warnings."""
    logging.getLogger("boneage").info("%s: settings read; loading Ray and PyTorch ...", Path(sys.argv[0]).name)
    # Ray Data prints every operator's progress at INFO: a wall of internals in a job log. Its console keeps
    # warnings; its full log still goes to the session's ray-data.log. Importing ray.data applies its logging
    # config, so do that first or it would undo this later.
    import ray.data  # noqa: F401

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


def run_job(main: Callable[[], None]) -> None:
    """Run a job's main; a :class:`JobError` (bad input, data or settings) ends it with one line and exit code 1."""
    try:
        main()
    except JobError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
