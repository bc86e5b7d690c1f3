"""A run's output: checked before any work (`OutputPlan`), assembled from the staging folder
at the end (`assemble`, then `publish`), cleaned up after a failure (`after_failure`).

Assembly groups the staged files into shards of at most ``max_shard_size`` bytes (a shard
made of one file is a hard link; several are concatenated byte for byte, so memory stays
flat; ``shard_per_block`` makes every staged file a shard, all links) and adds the index,
config, generation config and tokenizer. Publishing adds the report and the model card
(`card.py`) and renames the folder onto ``--out``. An old ``--out`` (``--overwrite``) trades places with the new folder in one
``renameat2(RENAME_EXCHANGE)`` on Linux, then is removed: no moment without a complete
``--out``. Where that call is missing (another OS, a filesystem without it) two renames do it:
the old output moved aside to ``.NAME.old-PID``, moved back if the second rename fails, and
named by the next run's one-line refusal if a kill comes between them. SIGINT is held off
during the swap.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import errno
import json
import logging
import os
import shutil
import signal
import struct
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from ..config import PipelineError
from .card import model_card
from .diskspace import writing
from .lock import OutputLock
from ..engine.report import PruneReport, missing_parents, usual_mode
from .shards import INDEX, SINGLE, read_header
from .staging import Staging

log = logging.getLogger(__name__)


class OutputPlan:
    """Where a run's output goes, checked before any work: refuses what cannot be written,
    creates the missing parent folders (and removes those it created if the run fails).

    A symlink as `out` is written through: the checkpoint goes to its target (made if the
    link dangles), staged beside the target, and the link is left as it is. `lock` takes the
    output's lock (`lock.OutputLock`, ``.NAME.lock`` beside it) for the rest of the run."""

    def __init__(self, out: str, overwrite: bool):
        path = Path(out)
        if ".." in path.parts:  # as the kernel will see it once missing folders are made: nosuch/../x is x
            path = Path(os.path.realpath(path)) if path.name == ".." else Path(os.path.realpath(path.parent)) / path.name
        self.out, self.created, self._lock = path, [], None
        if path.is_symlink():
            try:
                path = self.out = path.resolve()
            except (OSError, RuntimeError) as e:  # a loop
                raise PipelineError(f"out {out} is a symlink that does not resolve ({e})", field="out") from None
            log.info("out %s is a symlink to %s: writing through to it%s", out, path,
                     " (replacing what is there)" if overwrite and path.exists() else "")
        if not path.exists() and (aside := moved_aside(path)):
            raise PipelineError(f"out {out} is missing: a run killed while replacing it (overwrite) left the earlier "
                                f"output in {aside[0]}; move that back to {out}, or remove it, then rerun",
                                field="out")
        if path.exists() and not overwrite:
            raise PipelineError(f"out {out} already exists; pass overwrite to replace it")
        if path.exists() and not path.is_dir():
            raise PipelineError(f"out {out} exists and is not a directory")
        if path.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
            raise PipelineError(f"out {out} is the current folder or holds it; choose a new folder")
        try:
            self.created = missing_parents(str(path))
        except ValueError as e:
            raise PipelineError(str(e)) from None
        _check_name_length(out, path)

    def make_parents(self):
        self.out.parent.mkdir(parents=True, exist_ok=True)

    def lock(self):
        """Make the parent folders and hold the output's lock until `release` (one run per output)."""
        self.make_parents()
        try:
            self._lock = OutputLock.take(self.out.parent / f".{self.out.name}.lock", f"out {self.out}")
        except PipelineError:  # busy, or no lock file can be made
            self.remove_created()
            raise

    def release(self):
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def remove_created(self):
        self.release()  # its lock file lives in the folders to remove
        for p in reversed(self.created):
            with contextlib.suppress(OSError):
                p.rmdir()


def _check_name_length(out: str, path: Path):
    """The folders and files made beside `path` (staging folder, lock, an old output moved aside)
    have names the filesystem allows; else a PipelineError naming `out`, before any work."""
    folder = next(p for p in path.absolute().parents if p.exists())
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    longest = max((f".{path.name}.staging", f".{path.name}.lock", f".{path.name}.old-{os.getpid()}"), key=len)
    if len(longest) > limit:
        raise PipelineError(f"out {out}: its name ({len(path.name)} characters) leaves no room for the names made "
                            f"beside it (such as {longest[:12]}...{longest[-12:]}, {len(longest)} characters; this "
                            f"filesystem allows {limit}); choose a shorter out", field="out")


def extras_writer(model, tokenizer) -> Callable[[Path], None]:
    """What `assemble` adds beside the weights: config (with the tensors' dtype), generation
    config, tokenizer."""
    def write(folder):
        config = copy.deepcopy(model.config)
        config.dtype = model.dtype  # what the tensors are, as save_pretrained records it
        config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    return write


def assemble(staging: Staging, max_shard_size: int, write_extras: Callable[[Path], None],
             per_block: bool = False) -> Path:
    """Shard the staged files into ``<staging>/final`` and add `write_extras(folder)`'s files;
    returns that folder (`publish` puts it in place).

    Shards hold consecutive staged files up to ``max_shard_size`` bytes (a shard of one file is
    a hard link; several are concatenated); `per_block`: every staged file is a shard of its
    own, all hard links, so the weights are not read and written a second time."""
    final = staging.path / "final"
    if final.exists():
        shutil.rmtree(final)
    final.mkdir()
    groups = _group_by_size(staging.files(), 0 if per_block else max_shard_size)
    weight_map, total = {}, 0
    for k, group in enumerate(groups):
        name = SINGLE if len(groups) == 1 else f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        header = merge_safetensors(group, final / name)
        weight_map.update({key: name for key in header if key != "__metadata__"})
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for key, v in header.items()
                     if key != "__metadata__")
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (final / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    write_extras(final)
    return final


def publish(staging: Staging, final: Path, overwrite: bool, report: PruneReport) -> bool:
    """Write report.json and the model card (README.md, `card.model_card`) into `final` (what
    `assemble` made), rename it onto ``staging.out``, then remove the staging folder.

    Returns whether a SIGINT came while the output was being swapped in (it was held
    off: the output is complete either way)."""
    out = staging.out
    (final / "report.json").write_text(json.dumps(asdict(report), indent=2, default=str))
    (final / "README.md").write_text(model_card(report))
    for path in [final, *final.iterdir()]:
        path.chmod(usual_mode(path.is_dir()))
    with _sigint_held() as caught:
        if out.exists():
            if not overwrite:
                raise PipelineError(f"out {out} appeared while pruning; not replacing it "
                                    f"(the finished checkpoint is in {final})")
            with writing(out):  # no room for the rename: a WriteError, --out as it was
                old = _swap(final, out)
            shutil.rmtree(old, ignore_errors=True)
            log.info("replaced the earlier contents of %s (overwrite)", out)
        else:
            final.rename(out)
        staging.discard()
    return bool(caught)


def _swap(new: Path, out: Path) -> Path:
    """Put the folder `new` in place of the folder `out`; returns where the old `out` is now
    (for the caller to remove). One exchange where the OS and filesystem have it, else two
    renames with the old output moved back if the second fails."""
    if _exchange(new, out):
        return new  # the old output, under the new folder's name
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    try:
        new.rename(out)
    except BaseException as error:
        try:
            old.rename(out)
        except OSError as e:
            raise PipelineError(f"could not put the new checkpoint in place ({error}) nor move the earlier output "
                                f"back ({e.strerror}): the earlier output is in {old}, the new checkpoint in "
                                f"{new}") from error
        raise
    return old


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically with Linux's ``renameat2(RENAME_EXCHANGE)``; False
    where that is not available (another OS, a libc or kernel without it, a filesystem that
    does not support it), so the caller swaps by other means. Other errors raise OSError."""
    if sys.platform != "linux":
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2  # <fcntl.h>, <linux/fs.h>
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def moved_aside(out: Path) -> list[Path]:
    """Earlier outputs of `out` that an interrupted two-rename swap left moved aside."""
    return sorted(p for p in out.parent.glob(f".{out.name}.old-*") if p.is_dir())


def after_failure(staging: Staging | None, plan: OutputPlan | None, resumable: bool = True) -> str | None:
    """Clean up after a failed or interrupted run; say what is kept on disk (None: nothing).
    `resumable`: whether rerunning with --resume can get past what stopped the run (an
    interruption, a full disk), or not (a damaged checkpoint, NaN in a block)."""
    if staging is not None and plan is not None and staging.finished:
        where = f"{plan.out} untouched" if plan.out.exists() or not moved_aside(plan.out) else \
            f"the earlier {plan.out} is in {moved_aside(plan.out)[0]}"
        kept = f"{where}; {len(staging.finished)} finished blocks kept in {staging.path}"
        return kept + (": rerun the same command with --resume to continue" if resumable else
                       "; resuming cannot get past this error (the next fresh run removes them)")
    if staging is not None:
        staging.discard()
    if plan is not None:
        plan.remove_created()
    return None


def _group_by_size(paths: list[Path], limit: int) -> list[list[Path]]:
    """Consecutive files, greedily, into groups of at most `limit` bytes (a bigger file alone;
    `limit` 0: each file alone)."""
    groups, size = [], 0
    for p in paths:
        n = p.stat().st_size
        if groups and size + n <= limit:
            groups[-1].append(p)
            size += n
        else:
            groups.append([p])
            size = n
    return groups


def merge_safetensors(parts: list[Path], dest: Path) -> dict:
    """One safetensors file holding every tensor of `parts`, copied byte for byte; returns its header.

    A single part is hard-linked (no copy). Our own because safetensors has no streaming
    writer: ``save_file`` needs every tensor in memory at once, this needs one buffer.
    """
    if len(parts) == 1:
        try:
            os.link(parts[0], dest)
        except OSError:
            shutil.copyfile(parts[0], dest)
        return read_header(dest)[0]
    header, regions, offset = {}, [], 0
    for p in parts:
        h, start = read_header(p)
        h.pop("__metadata__", None)
        size = max((v["data_offsets"][1] for v in h.values()), default=0)
        for k, v in h.items():
            b, e = v["data_offsets"]
            header[k] = {**v, "data_offsets": [b + offset, e + offset]}
        regions.append((p, start, size))
        offset += size
    header = {"__metadata__": {"format": "pt"}, **header}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    tmp = dest.with_name(dest.name + ".partial")
    with open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for p, start, size in regions:
            with open(p, "rb") as f:
                f.seek(start)
                remaining = size
                while remaining:
                    chunk = f.read(min(remaining, 1 << 24))
                    if not chunk:
                        raise OSError(f"{p} is shorter than its header says")
                    out.write(chunk)
                    remaining -= len(chunk)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, dest)
    return header


@contextlib.contextmanager
def _sigint_held():
    """Hold SIGINT off while the output is swapped into place; yields the list of those caught."""
    caught: list = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = signal.signal(signal.SIGINT, lambda *a: caught.append(a))
    try:
        yield caught
    finally:
        signal.signal(signal.SIGINT, previous)
