"""One training run per output folder: a lock, atomic writes, and finding complete checkpoints.

A run folder holds `checkpoint-NNNNNN/` folders, `final/`, `metrics.jsonl`, `eval.csv`,
`train_config.yaml` and, while a run is alive, `run.lock`. Folders are written under a
temporary name (`.tmp-<name>`), their files and the folder fsynced, then renamed into place,
so a reader (or `resume=auto` after a kill) sees a whole checkpoint or none. The lock is an
`flock` on `run.lock`, which names its holder (pid, host); the kernel drops it when the
holder dies, so a lock left by a killed run is taken over (with a warning).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger("mmlib")

LOCK_FILE = "run.lock"
TMP_PREFIX = ".tmp-"
CHECKPOINT_GLOB = "checkpoint-*"
RUN_OUTPUTS = ("final", "metrics.jsonl", "eval.csv")  # besides checkpoint-* folders


class RunDirBusy(RuntimeError):
    """Another live run holds the output folder's lock."""


class CheckpointError(ValueError):
    """A checkpoint file is missing or corrupt."""


# -- the lock --------------------------------------------------------------------------------
class RunLock:
    """An exclusive lock on `<folder>/run.lock`, held from `acquire()` to `release()`."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_FILE
        self._file: Any = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._file is not None

    def acquire(self) -> None:
        """Take the lock or raise `RunDirBusy` naming the holder; a dead holder's is taken over."""
        if self._file is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            f = open(self.path, "a+")  # noqa: SIM115 (held open for the whole run)
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(_read_holder(f))
                f.close()
                raise RunDirBusy(
                    f"output_dir {self.path.parent} is in use by another training run "
                    f"({holder}; lock file {self.path}): wait for it to end or stop it, or "
                    "choose another output_dir") from None
            # A releasing holder unlinks the file while still locking it: if ours is that
            # unlinked file, the lock is worthless; open the path again.
            if _inode(self.path) == os.fstat(f.fileno()).st_ino:
                break
            f.close()
        previous = _read_holder(f)
        if previous:
            logger.warning("taking over the stale lock %s of a run that ended without releasing "
                           "it (%s)", self.path, _describe(previous))
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        f.flush()
        os.fsync(f.fileno())
        self._file = f

    def release(self) -> None:
        """Remove the lock file and drop the lock (a no-op when not held)."""
        if self._file is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._file.close()
        self._file = None


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _read_holder(f: Any) -> dict[str, Any]:
    f.seek(0)
    try:
        return json.loads(f.read() or "{}")
    except json.JSONDecodeError:
        return {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "holder unknown"
    pid, host = holder.get("pid"), holder.get("host")
    mine = " (this process: close the other Trainer with .close())" \
        if pid == os.getpid() and host == socket.gethostname() else ""
    return f"pid {pid} on {host}, since {holder.get('started')}{mine}"


# -- atomic writes ---------------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
    """Make a folder's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace `path` with `text` in one step: a reader sees the old or the new file."""
    path = Path(path)
    tmp = path.with_name(TMP_PREFIX + path.name)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fresh_tmp_dir(target: str | Path) -> Path:
    """An empty temporary folder beside `target` (`.tmp-<name>`), replacing one left by a
    killed writer (the caller holds the run's lock)."""
    target = Path(target)
    tmp = target.with_name(TMP_PREFIX + target.name)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish_dir(tmp: Path, target: str | Path) -> None:
    """Make `tmp` and everything in it durable, then rename it to `target` (replacing an
    older one): a reader sees the old folder or the whole new one."""
    target = Path(target)
    for p in sorted(tmp.rglob("*"), reverse=True):  # files before their folders
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        elif p.is_dir():
            fsync_dir(p)
    fsync_dir(tmp)
    if target.exists() or target.is_symlink():
        old = target.with_name(TMP_PREFIX + "old-" + target.name)
        if old.exists():
            shutil.rmtree(old)
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old)
    else:
        os.rename(tmp, target)
    fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success make it durable and rename it to
    `target` (replacing an older one). On an exception the temporary folder is removed."""
    tmp = fresh_tmp_dir(target)
    try:
        yield tmp
        publish_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- checkpoints in a folder -----------------------------------------------------------------
def checkpoint_state(path: str | Path) -> dict[str, Any]:
    """The state.json of a checkpoint after checking that all its files are whole; raises
    `CheckpointError` naming the missing or corrupt file (the layout: mmlib/checkpoint.py)."""
    from mmlib.checkpoint import verify  # imported here: mmlib.checkpoint builds on this module

    return verify(path)


def scan_checkpoints(folder: str | Path) -> tuple[list[tuple[int, Path]], list[Path],
                                                  list[CheckpointError]]:
    """The folder's complete checkpoints as (step, path), oldest first (by the step recorded in
    state.json, not the name); incomplete ones (no state.json, or a temporary folder); and the
    errors of corrupt ones."""
    folder = Path(folder)
    good: dict[Path, tuple[int, Path]] = {}
    incomplete, corrupt = [], []
    for p in sorted(folder.glob(CHECKPOINT_GLOB)) + sorted(folder.glob(TMP_PREFIX + "*")):
        if not p.is_dir():
            continue
        if p.name.startswith(TMP_PREFIX) or not (p / "state.json").is_file():
            incomplete.append(p)
            continue
        try:
            step = int(checkpoint_state(p)["step"])
        except CheckpointError as e:
            corrupt.append(e)
            continue
        good.setdefault(p.resolve(), (step, p))  # a symlink and its target count once
    return sorted(good.values()), incomplete, corrupt


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The complete checkpoint with the highest recorded step (None when there is none);
    incomplete folders are skipped with a warning, a corrupt checkpoint is an error."""
    good, incomplete, corrupt = scan_checkpoints(folder)
    if incomplete:
        logger.warning("ignoring incomplete checkpoint folders in %s (written by a run that was "
                       "stopped; safe to delete): %s", folder, ", ".join(p.name for p in incomplete))
    if corrupt:
        raise CheckpointError(f"{corrupt[-1]}; {last_good(good)}")
    return good[-1][1] if good else None


def last_good(good: list[tuple[int, Path]]) -> str:
    """Advice naming the newest good checkpoint, for error messages."""
    if not good:
        return "there is no last good checkpoint: start afresh with overwrite=true"
    return (f"the last good checkpoint is {good[-1][1]}: resume from it with "
            f"resume={good[-1][1]}, or move the corrupt one away")


def previous_run(folder: str | Path) -> list[Path]:
    """What an earlier run left in `folder` (checkpoints, final/, metrics, evaluation)."""
    folder = Path(folder)
    found = sorted(folder.glob(CHECKPOINT_GLOB))
    return found + [folder / n for n in RUN_OUTPUTS if (folder / n).exists()]


def clear_previous_run(folder: str | Path) -> None:
    """Delete an earlier run's outputs (and unfinished temporary folders); keep other files."""
    for p in previous_run(folder) + sorted(Path(folder).glob(TMP_PREFIX + "*")):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
