"""The staging folder: a run's finished blocks on disk as they finish, with the manifest to
resume from.

`Staging` is a folder beside ``--out`` (``.<out>.staging``). Each finished block is written
there at once as its own safetensors file (temporary name, fsync, rename), and the manifest
(written the same way) records it with the sha256 of the file. A run killed at any point
leaves a staging folder whose manifest lists only complete blocks; ``--resume`` checks the
configuration and calibration against the manifest, verifies each listed block's checksum,
and the engine replays the finished blocks instead of pruning them again. At the end
`output.assemble` turns the folder into the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


from ..config import PipelineError
from .diskspace import writing
from ..engine.distributed import Dist
from ..engine.report import usual_mode, write_atomic
from .shards import open_safetensors

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _change(key: str, old, new) -> str:
    """What differs between two fingerprint values, in a few words: the first differing entry of
    a dict (the model's files), not the whole dict."""
    if key == "model" and isinstance(old, dict) and isinstance(new, dict):
        changed = [k for k in ("path", "architecture", "files", "content") if old.get(k) != new.get(k)]
        for k in changed[:1]:
            if k == "content" and old.get(k) is None:
                return "the staged run predates the check of the model's content; rerun without resume"
            if k in ("files", "content") and isinstance(old.get(k), dict) and isinstance(new.get(k), dict):
                files = sorted(f for f in set(old[k]) | set(new[k]) if old[k].get(f) != new[k].get(f))
                what = "size" if k == "files" else "content"
                return (f"the model's {what} changed since the staged run ({', '.join(files[:3])}"
                        f"{', ...' if len(files) > 3 else ''} in {new.get('path')})")
            return f"the model's {k} was {old.get(k)!r}, now {new.get(k)!r}"
    if key == "reconstruct_steps" and old is None:
        return ("the staged blocks were pruned without block reconstruction, now on by default (the default "
                "recipe); pass reconstruct_steps=0 to continue them as they were")
    if key == "reconstruct_lr_mode":  # no flag of its own: how --reconstruct-lr was read
        return ("the staged blocks were tuned with the old absolute --reconstruct-lr (now relative to each "
                "weight's scale); rerun without resume")
    return f"{key} was {_shown(old)}, now {_shown(new)}"


def _shown(value) -> str:
    """A fingerprinted setting as a message says it: None, or absent (a setting recorded only
    where it is used, e.g. reconstruct_steps > 0), is "unset"."""
    return "unset" if value is None else repr(value)


def _save(tensors: dict, path: Path) -> None:
    """save_file to a temporary name, fsync, rename: `path` is complete or absent."""
    tmp = path.with_name(path.name + ".partial")
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk keeps no half file
        raise
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, usual_mode(False))
    os.replace(tmp, path)


class Staging:
    """The folder beside `out` where a run's finished blocks wait, with their manifest."""

    def __init__(self, out: Path, temporary: bool = False):
        self.out = Path(out)
        self.path = self.out.parent / f".{self.out.name}.staging"
        self.temporary = temporary
        self.manifest: dict = {}

    @classmethod
    def scratch(cls) -> Staging:
        """A staging folder in the temp dir for a run without `out` (removed by `discard`)."""
        return cls(Path(tempfile.mkdtemp(prefix="admm-prune-")) / "run", temporary=True)

    @classmethod
    def view(cls, path: str, manifest: dict) -> Staging:
        """Another process's staging folder, for reading its finished blocks (`shared()`)."""
        staging = cls(Path(path).parent / Path(path).name.removeprefix(".").removesuffix(".staging"))
        staging.manifest = manifest
        return staging

    def shared(self) -> tuple[str, dict]:
        """What `view` needs in another process: the folder and the manifest."""
        return str(self.path), self.manifest

    @property
    def finished(self) -> dict[int, dict]:
        return {int(i): b for i, b in self.manifest.get("blocks", {}).items()}

    def files(self) -> list[Path]:
        """The staged files in checkpoint order: the rest (embeddings, final norm, head), then each block."""
        names = [self.manifest["rest"]["file"]] + [b["file"] for _, b in sorted(self.finished.items())]
        return [self.path / name for name in names]

    def start(self, fingerprint: dict, resume: bool) -> dict[int, dict]:
        """Open the folder: reuse a verified earlier run's blocks (`resume`), else start clean.

        Returns the finished blocks {index: manifest entry}."""
        fingerprint = json.loads(json.dumps(fingerprint, default=str))
        if self.path.exists() and resume:
            self._load(fingerprint)
        else:
            if self.path.exists():
                log.info("removing %s, left by an interrupted run (--resume continues such a run)", self.path)
                shutil.rmtree(self.path)
            elif resume:
                log.info("nothing to resume at %s; starting from the first block", self.path)
            self._remove_leftovers()
            self.path.mkdir(parents=True)
            self.manifest = {"version": MANIFEST_VERSION, "fingerprint": fingerprint, "rest": None, "blocks": {}}
            self._save_manifest()
        return self.finished

    def _remove_leftovers(self):
        """Folders that killed runs of earlier versions left beside `out`: their temporary
        save (``.<out>.tmp-*``), and a moved-aside old output (``.<out>.old-*``) once `out`
        itself is complete again."""
        patterns = [f".{self.out.name}.tmp-*"] + ([f".{self.out.name}.old-*"] if self.out.is_dir() else [])
        for pattern in patterns:
            for p in self.out.parent.glob(pattern):
                log.info("removing %s, left by an interrupted run", p)
                shutil.rmtree(p, ignore_errors=True)

    def _load(self, fingerprint: dict):
        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError):
            raise PipelineError(f"cannot resume: {self.path / MANIFEST} is missing or unreadable; "
                                f"rerun without resume to start over") from None
        old = manifest.get("fingerprint", {})
        diff = [k for k in sorted(set(old) | set(fingerprint)) if old.get(k) != fingerprint.get(k)]
        if "reconstruct_steps" in diff:  # the other reconstruction fields are recorded only with steps, and
            # the steps' default follows the sparsity: they come after what was changed by hand
            diff = [k for k in diff if not k.startswith("reconstruct_")] + ["reconstruct_steps"]
        if diff:
            k = diff[0]
            raise PipelineError(f"cannot resume {self.path}: {_change(k, old.get(k), fingerprint.get(k))}"
                                + (f" (and {len(diff) - 1} more: {', '.join(diff[1:])})" if len(diff) > 1 else ""))
        blocks, kept = manifest.get("blocks", {}), {}
        for i in sorted(blocks, key=int):  # keep the verified prefix; a bad block and all after it are redone
            entry = blocks[i]
            if int(i) != len(kept) or not self._verify(entry):
                break
            kept[i] = entry
        if len(kept) < len(blocks):
            log.warning("resume: %d of %d staged blocks verified; redoing from block %d",
                        len(kept), len(blocks), len(kept))
        manifest["blocks"] = kept
        if manifest.get("rest") and not self._verify(manifest["rest"]):
            manifest["rest"] = None
        listed = {e["file"] for e in kept.values()} | ({manifest["rest"]["file"]} if manifest.get("rest") else set())
        for p in self.path.iterdir():  # partial files of the interrupted write, a half-done finish
            if p.name != MANIFEST and p.name not in listed:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        self.manifest = manifest
        self._save_manifest()
        log.info("resume: %d finished blocks verified in %s", len(kept), self.path)

    def _verify(self, entry: dict) -> bool:
        path = self.path / entry["file"]
        ok = path.is_file() and path.stat().st_size == entry["bytes"] and _sha256(path) == entry["sha256"]
        if not ok:
            log.warning("resume: %s is missing, truncated or corrupt", path)
        return ok

    def _save_manifest(self):
        with writing(self.path / MANIFEST):
            write_atomic(self.path / MANIFEST, json.dumps(self.manifest, indent=1))

    def _write(self, name: str, tensors: dict) -> dict:
        """One staged file and its manifest entry; a failed write (a full disk) is a user error."""
        path = self.path / name
        with writing(path):  # a full disk: one line naming the file
            _save(tensors, path)
        return {"file": name, "bytes": path.stat().st_size, "sha256": _sha256(path)}

    def write_rest(self, tensors: dict):
        if self.manifest.get("rest") is None:
            self.manifest["rest"] = self._write("rest.safetensors", tensors)
            self._save_manifest()

    def write_block(self, i: int, tensors: dict, info: dict):
        """Block i is done: its file, then the manifest entry (with `info`: records, seconds).
        The engine calls it on the writer's thread (`writer.BlockWriter`), the only writer of the
        manifest while the block loop runs."""
        entry = self._write(f"block-{i:05d}.safetensors", tensors)
        self.manifest["blocks"][str(i)] = {**entry, **info}
        self._save_manifest()

    def read_block(self, i: int) -> dict[str, torch.Tensor]:
        path = self.path / self.manifest["blocks"][str(i)]["file"]
        with open_safetensors(path) as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    def discard(self):
        shutil.rmtree(self.path, ignore_errors=True)
        if self.temporary:
            shutil.rmtree(self.out.parent, ignore_errors=True)


def start_staging(staging: Staging | None, fingerprint: dict, resume: bool, dist: Dist) -> list[int]:
    """Open rank 0's staging folder (resuming its finished blocks when asked); returns them.
    A refused resume (another config, another world size) raises on every rank, leaving the
    folder as it was: rank 0 alone reads it, so its verdict is broadcast."""
    verdict: list[int] | PipelineError = []
    if staging is not None:
        try:
            verdict = sorted(staging.start(fingerprint, resume))
        except PipelineError as error:
            verdict = error
    verdict = dist.broadcast_object(verdict)
    if isinstance(verdict, PipelineError):
        raise verdict
    return verdict

