"""Provenance and safe writing for everything the platform produces: hashes, code version, atomic folders."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boneage
from boneage.errors import JobError

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(value: Any) -> str:
    """Hex SHA-256 of a JSON-serialisable value (keys sorted, so equal values hash equally)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def file_listing(paths: Iterable[str | Path]) -> list[tuple[str, int, int]]:
    """``(path, size, mtime_ns)`` of each file, sorted by path: what changes when a file is replaced, without
    reading it (hashing every image of a large set would take minutes)."""
    listing = []
    for path in sorted(str(p) for p in paths):
        stat = os.stat(path)
        listing.append((path, stat.st_size, stat.st_mtime_ns))
    return listing


def code_version() -> dict[str, Any]:
    """The package version and, when run from a git checkout, the commit and whether it had local changes."""
    version: dict[str, Any] = {"package": boneage.__version__, "git_commit": None, "git_dirty": None}
    repo = Path(boneage.__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return version  # not a git checkout (an installed wheel, a Ray job's working dir copy)
    version.update(git_commit=commit, git_dirty=bool(status.strip()))
    return version


@contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success it replaces ``final``, on error it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, value: Any) -> Path:
    """Write ``value`` as indented JSON, replacing ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2, default=str) + "\n")
    return Path(path)


@contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; on success it replaces ``final``, on error it vanishes.

    Readers see either the old complete folder or the new complete one, never a half-written one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with temporary_sibling(final.parent, f".{final.name}.tmp-") as tmp:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)


@contextmanager
def temporary_sibling(parent: Path, prefix: str) -> Iterator[Path]:
    """Yield a new empty folder in ``parent`` named ``<prefix><random>``, for a write that ends by renaming it into
    place; if the write fails, the folder and whatever it holds are removed."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_torch(value: Any, path: str | Path) -> None:
    """``torch.save`` through a Python file object: on a full disk its error then carries ``OSError(ENOSPC)`` (as
    its context), which :func:`disk_full_reported` recognises; saving to a file name gives only torch's
    "unexpected pos" RuntimeError."""
    import torch  # not at the top: the data jobs import this module without needing torch

    with open(path, "wb") as out:
        torch.save(value, out)


class DiskFull(JobError, OSError):
    """A write ran out of disk space; what it would have replaced is untouched."""


# Out of space, or out of the user's quota: either way nothing more can be written there.
_FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXTS = tuple(os.strerror(code) for code in _FULL)


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` or any error it wraps is a full disk. Ray hands on a task's error as ``cause``, Ray Train a
    worker's in ``worker_failures`` and its controller's (which may be a worker's error it met first) in
    ``controller_failure``, torch.save its OSError as the context of its own RuntimeError, and
    ``shutil.copytree`` its files' errors as text."""
    pending, seen = [error], set()
    while pending:
        err = pending.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _FULL:
            return True
        if isinstance(err, shutil.Error) and any(text in str(err) for text in _FULL_TEXTS):
            return True
        pending += [err.__cause__, err.__context__, getattr(err, "cause", None),
                    getattr(err, "controller_failure", None), *getattr(err, "worker_failures", {}).values()]
    return False


@contextmanager
def disk_full_reported(what: str, where: str | Path, kept: str) -> Iterator[None]:
    """Turn a full disk while writing ``what`` to ``where`` into one :class:`DiskFull` line that says to free space
    and rerun, and what was ``kept`` (a clause, e.g. "the previous dataset there is untouched"). The one place
    that words this error; writers leave what they replace untouched (:func:`atomic_directory`,
    :func:`atomic_file`), so the callers can say so."""
    try:
        yield
    except DiskFull:
        raise  # reported already, by a writer nested inside this one
    except Exception as err:
        if not is_disk_full(err):
            raise
        raise DiskFull(f"disk full while writing {what} to {where}: free space there and rerun; {kept}") from err
