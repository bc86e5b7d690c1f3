"""Disk space: what a run needs, a warning before the first block when it is short, and a
full disk or a file-size limit met while writing turned into one line.

A run with ``--out`` needs about twice the pruned checkpoint beside it: the staged blocks,
then the final copy that `output.assemble` makes of them (a shard made of one staged file is
a hard link, so fewer, larger blocks need less), until the staging folder is removed. A run
without ``--out`` stages its blocks once, in the temp dir.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
from pathlib import Path

from safetensors import SafetensorError

from admm_prune.reference.errors import AdmmPruneError

log = logging.getLogger(__name__)

#: a full disk, a full quota, a file-size limit (ulimit -f, a filesystem's largest file)
NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class WriteError(AdmmPruneError):
    """A file of the run could not be written: no room (ENOSPC, EDQUOT, EFBIG) or safetensors'
    own write error. The run's finished blocks stay staged; ``--resume`` continues. (Not a
    `PipelineError`: the CLI leaves its words alone, "No space left on device" included.)
    `too_large`: a file-size limit (EFBIG), not a full disk."""

    too_large = False


@contextlib.contextmanager
def writing(path):
    """Run the body that writes `path`; a write it cannot make for lack of room becomes a
    `WriteError` naming `path`."""
    try:
        yield
    except SafetensorError as e:  # save_file's I/O errors, with the OS message inside
        match = re.search(r"I/O error: (.*?)(?: \(os error (\d+)\))?$", str(e))
        error = WriteError(f"could not write {path}: {match[1] if match else e}")
        error.too_large = bool(match) and match[2] == str(errno.EFBIG)
        raise error from e
    except OSError as e:
        if e.errno not in NO_ROOM:
            raise
        error = WriteError(f"could not write {path}: {e.strerror or os.strerror(e.errno)}")
        error.too_large = e.errno == errno.EFBIG
        raise error from e


def checkpoint_bytes(model) -> int:
    """The bytes of `model`'s parameters as saved (blocks on the meta device count too)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def bytes_needed(model, staged: int = 0, final_copy: bool = True) -> int:
    """What the rest of the run writes: the blocks still to stage, and the final copy."""
    size = checkpoint_bytes(model)
    return max(size - staged, 0) + (size if final_copy else 0)


def free_bytes(folder: Path) -> int | None:
    with contextlib.suppress(OSError):
        return shutil.disk_usage(folder).free
    return None


def warn_if_short(folder: Path, needed: int):
    """A log warning when `folder` has less free space than `needed`."""
    free = free_bytes(folder)
    if free is not None and free < needed:
        log.warning("only %s free in %s, and this run writes about %s there (the staged blocks, then the "
                    "final copy): it will stop when the disk is full (--resume continues it then)",
                    gb(free), folder, gb(needed))


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n / 1e6:.2f} MB"


def no_room(error: WriteError, model, folder: Path | None, final_copy: bool, kept: str | None) -> str:
    """The one line of a run stopped by `error`: what could not be written, the space the run
    needs in `folder` (`model`'s checkpoint, twice with the `final_copy`), how to continue
    (`kept`: what the staging folder keeps, None: nothing)."""
    line = str(error)
    if model is not None and folder is not None:
        folder, free = Path(folder).absolute(), free_bytes(folder)
        line += (f"; this run needs about {gb(bytes_needed(model, final_copy=final_copy))} free in {folder} ("
                 + ("the staged blocks plus the final copy" if final_copy else "its staged blocks")
                 + (f"; {gb(free)} free now)" if free is not None else ")"))
    cure = ("raise the file-size limit (ulimit -f; for the final shards a smaller --max-shard-size also does)"
            if error.too_large else "free some space")
    if not final_copy:  # a run without out: a scratch staging folder in the temp dir
        return line + f"; {cure} (or point TMPDIR elsewhere, or give out) and rerun"
    if kept:  # "... kept in ...: rerun the same command with --resume to continue"
        return f"{line}; {cure}; {kept}"
    return f"{line}; {cure}, then rerun the same command with --resume to continue"
