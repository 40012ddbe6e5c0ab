"""A training run's output directory (``--out``): one writer at a time, atomic files, run outputs.

* :class:`RunLock`: an exclusive ``fcntl.flock`` on ``OUT/.lock``, held for the whole run.  The
  kernel drops it when its process dies (even by SIGKILL), so a lock left by a dead run is simply
  taken over; a live holder's PID is named in the refusal.
* :func:`atomic_write`: every file a run writes goes through it.  The bytes go to a temporary
  file next to the target, created exclusively (``O_EXCL | O_NOFOLLOW``, so a planted file or
  symlink is never opened) under an unpredictable name, fsynced, then renamed over the target.
  Readers see the old file or the new one, never half of one; the temporary file is removed on
  every exit path that runs Python code, and :func:`open_run_dir` removes the ones a killed
  process left behind.
* :func:`write_metrics` / :func:`write_usage`: ``metrics.csv``, ``metrics.json``, ``usage_counts.pt``.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import os
import re
import secrets
import shutil
import stat
import sys
from pathlib import Path

import torch

LOCK = ".lock"
# ".<target>.<pid>.<16 hex>.tmp"; the second form is the older ".<target>.tmp<pid>" naming.
TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[0-9a-f]{16}\.tmp$")
OLD_TEMP_NAME = re.compile(r"^\.(?P<target>checkpoint\.pt|metrics\.csv|metrics\.json|usage_counts\.pt)\.tmp(?P<pid>\d+)$")


class RunDirError(RuntimeError):
    """``--out`` cannot be used: not a directory, not writable, or in use by another run."""


class DiskFullError(OSError):
    """A run file could not be written for lack of space; the previous version of it is intact."""


def free_space(directory: Path) -> str:
    try:
        return f"{shutil.disk_usage(directory).free / 2**20:.1f} MiB free"
    except OSError:
        return "free space unknown"


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")


def _create_exclusive(path: Path) -> int:
    """Open a new file for writing; fails if anything (a file, a symlink) already has the name."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (best effort: some file systems refuse fsync on a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def atomic_write(path: str | Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically (see the module docstring).

    A full disk raises :class:`DiskFullError` naming the path and the free space; ``path`` keeps
    its previous content and no temporary file stays behind.
    """
    path = Path(path)
    tmp = _temp_path(path)
    try:
        fd = _create_exclusive(tmp)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)  # renames over a symlink at `path` too; never writes through it
    except BaseException as err:  # including KeyboardInterrupt: never leave the temporary file
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(err.errno, f"no space left to write {path} ({free_space(path.parent)}); "
                                f"{path.name} keeps its previous content") from None
        raise
    _fsync_dir(path.parent)


def torch_bytes(obj: object) -> bytes:
    """``torch.save(obj)`` into memory (then written with :func:`atomic_write`)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# The run lock and leftovers of killed runs
# ---------------------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """Exclusive lock on a run directory (a context manager; :meth:`acquire` / :meth:`release`)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.path = self.directory / LOCK
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        for _ in range(100):  # retried only when a releasing holder unlinked the file we opened
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunDirError(f"{self.directory} is in use by another training run (process {holder}, lock "
                                  f"{self.path}); wait for it to end or choose another --out") from None
            if self._still_at_path(fd):
                self._record_pid(fd)
                self.fd = fd
                return self
            os.close(fd)
        raise RunDirError(f"could not lock {self.path}: it kept being replaced")

    def _open(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise RunDirError(f"{self.path} is a symbolic link; refusing to use it as the run lock") from None
            raise RunDirError(f"cannot write to --out {self.directory} ({err.strerror})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise RunDirError(f"{self.path} is not a regular file; refusing to use it as the run lock")
        return fd

    def _still_at_path(self, fd: int) -> bool:
        """The locked file is the one at ``self.path`` (a holder unlinks it when it releases)."""
        try:
            now = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)

    def _record_pid(self, fd: int) -> None:
        previous = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if previous.isdigit() and int(previous) != os.getpid():
            print(f"note: took over the lock {self.path} left by process {previous}, which no longer holds it",
                  file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still holding it: a waiter then re-checks the path
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire() if self.fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()


def remove_stale_temps(directory: Path) -> list[str]:
    """Remove temporary files that dead processes left in ``directory``; returns their names.

    Call it while holding the directory's :class:`RunLock` (no other run writes there then).
    """
    removed = []
    for entry in os.scandir(directory):
        match = TEMP_NAME.match(entry.name) or OLD_TEMP_NAME.match(entry.name)
        if not match or entry.is_dir(follow_symlinks=False):
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or not pid_alive(pid):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)  # a symlink is removed itself, its target is untouched
            removed.append(entry.name)
    return removed


def open_run_dir(out: str | Path) -> RunLock:
    """Create ``out`` if needed, lock it, check it is writable and clear leftovers of killed runs.

    Raises :class:`RunDirError` (before any training) when ``out`` is a file, cannot be created or
    written, or another run holds it.  Returns the held lock; release it when the run ends.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"cannot create --out {out} ({err.strerror})") from None
    lock = RunLock(out).acquire()
    try:
        probe = _temp_path(out / "write-probe")
        os.close(_create_exclusive(probe))
        os.unlink(probe)
    except OSError as err:
        lock.release()
        raise RunDirError(f"cannot write to --out {out} ({err.strerror})") from None
    removed = remove_stale_temps(out)
    if removed:
        print(f"note: removed {len(removed)} temporary file(s) left in {out} by killed runs", file=sys.stderr)
    return lock


# ---------------------------------------------------------------------------------------------
# Run outputs
# ---------------------------------------------------------------------------------------------

CSV_COLUMNS = ("step", "split", "loss", "aux", "acc", "lr", "value_lr", "grad_norm", "tokens_per_s",
               "mem_usage", "mem_kl", "mem_dead", "mem_score_top1", "mem_score_topm", "mem_sv_ratio")


def write_metrics(out: Path, results: dict) -> None:
    """``metrics.csv`` (one row per train step and per evaluation) and ``metrics.json`` (everything
    but the slot counts)."""
    rows = [{"split": "train", **r} for r in results["history"]["train"]]
    rows += [{"split": "val", **r} for r in results["history"]["val"]]
    rows.sort(key=lambda r: (r["step"], r["split"] == "val"))
    aux_kinds = sorted({k for r in rows for k in r if k.startswith("aux_")})
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, CSV_COLUMNS + tuple(aux_kinds), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "metrics.csv", text.getvalue().encode())
    summary = {k: v for k, v in results.items() if k != "usage_history"}
    atomic_write(out / "metrics.json", json.dumps(summary, indent=1).encode())


def write_usage(out: Path, usage_history: list) -> None:
    """``usage_counts.pt``: ``[(step, [slot counts per memory layer])]`` of every evaluation."""
    atomic_write(out / "usage_counts.pt", torch_bytes(usage_history))
