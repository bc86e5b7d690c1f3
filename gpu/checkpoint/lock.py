"""One run per output: an exclusive lock on a lock file, held for the whole run.

`OutputLock.take(path, what)` opens (creating) the lock file `path`, takes an exclusive
``fcntl.flock`` on it without waiting, and writes this process's PID, host and start time
into it; `release` removes the file, then lets the lock go. A second run that finds the lock
held stops at once with one line naming the other run (`OutputBusy`), before it touches
anything of that run. `prune` locks ``.NAME.lock`` beside ``--out`` (and its staging folder
``.NAME.staging``); `bench` and `eval` lock ``PREFIX.lock`` while they write ``PREFIX.json``
and ``PREFIX.md``.

The kernel releases a flock when the process holding it ends, however it ends (SIGKILL, a
crash): the file a killed run leaves behind blocks nothing, and ``--resume`` takes the lock
as usual.

Network filesystems: flock is only as good as the filesystem's locking. On Linux NFS
(kernel 2.6.12 and later) flock is emulated with POSIX byte-range locks, which the NFS lock
protocol (NLM for NFSv3, built into NFSv4) shares between hosts; on older kernels flock on
NFS was local to one host, and some filesystems keep it local still (CIFS/SMB and NFS
mounted with ``nolock`` or ``local_lock=flock``, Lustre with ``localflock``, some FUSE
filesystems). There, two runs on two hosts into one output are not stopped: give each its
own ``--out``. Where the filesystem refuses locks altogether, the run goes on with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from ..config import PipelineError
from ..engine.report import missing_parents

log = logging.getLogger(__name__)


class OutputBusy(PipelineError):
    """Another run holds the output's lock."""


class OutputLock:
    """An exclusive flock on a lock file; `take` acquires it (or raises `OutputBusy`)."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self.fd = path, fd

    @classmethod
    def take(cls, path: Path, what: str) -> OutputLock:
        """Lock `path` for this process (`what`: the output it guards, for the message)."""
        path = Path(path)
        while True:
            try:  # a symlink is not followed: the lock is the file beside the output, nothing else
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
            except OSError as e:
                raise LockFileError(_cannot(path, what, e), field="out") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutputBusy(f"{what} is being written by another run ({holder or 'pid unknown'}; lock "
                                     f"file {path}); wait for it to end or choose another out", field="out") from None
                log.warning("cannot lock %s (%s): a second run on the same output would not be stopped", path, e)
                return cls(path, None)
            if _same_file(fd, path):  # not a file its last holder removed while we opened it
                break
            os.close(fd)
        lock = cls(path, fd)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode())
        except OSError as e:  # a full disk: no empty lock file left behind
            lock.release()
            raise LockFileError(_cannot(path, what, e), field="out") from None
        return lock

    def release(self):
        """Remove the lock file while still holding it, then unlock (closing the descriptor)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if _same_file(self.fd, self.path):
                self.path.unlink()
        os.close(self.fd)
        self.fd = None


class LockFileError(PipelineError):
    """The output's lock file cannot be made (full disk, a name too long, a folder in its place)."""


def _cannot(path: Path, what: str, error: OSError) -> str:
    """Why the lock file `path` of `what` cannot be made, in one line."""
    if error.errno == errno.ENAMETOOLONG:
        return (f"{what}: the name of its lock file {path.name} ({len(path.name)} characters) is too long for "
                f"the filesystem; choose a shorter out")
    if error.errno == errno.EISDIR or path.is_dir():
        return f"{what}: its lock file {path} is a folder; remove it or choose another out"
    if error.errno == errno.ELOOP or path.is_symlink():
        return f"{what}: its lock file {path} is a symlink; remove it or choose another out"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{what}: no room for its lock file {path} (disk, quota or inodes full); free some space"
    return f"{what}: cannot make its lock file {path} ({error.strerror})"


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read(fd: int) -> str:
    with contextlib.suppress(OSError):
        return os.pread(fd, 4096, 0).decode(errors="replace").strip()
    return ""


@contextlib.contextmanager
def prefix_lock(out: str | None, main: bool = True):
    """While a report run lasts: ``OUT.lock`` held (on the main rank), the missing parent
    folders made for it (removed again if they are still empty at the end)."""
    if out is None or not main:
        yield
        return
    created = missing_parents(out)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    try:
        lock = OutputLock.take(Path(out + ".lock"), f"out {out}")
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield
    finally:
        lock.release()
        _remove_empty(created)


def _remove_empty(folders: list[Path]):
    for p in reversed(folders):
        with contextlib.suppress(OSError):
            p.rmdir()
