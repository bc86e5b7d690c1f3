"""Checkpoints on disk: blocks streamed in from safetensors shards, pruned blocks staged out,
a manifest to resume from, and the final checkpoint renamed into place.

Reading. `StreamedModel` builds the model skeleton on the meta device (accelerate's
`init_empty_weights`: parameters allocate nothing, buffers such as the rotary frequencies
are real), loads the tensors outside the decoder blocks once (embeddings, final norm,
lm_head; tied embeddings stay tied), and materializes decoder block i from the shards only
inside ``with source.block(i)``; on exit the block goes back to the meta device and the
shard files are closed, so host memory holds one block at a time whatever the depth.
`InMemoryModel` gives the same interface over a model already in memory (the Python API).

Writing. `Staging` is a folder beside ``--out`` (``.<out>.staging``). Each finished block is
written there at once as its own safetensors file (temporary name, fsync, rename), and the
manifest (written the same way) records it with the sha256 of the file. A run killed at any
point leaves a staging folder whose manifest lists only complete blocks; ``--resume`` checks
the configuration and calibration against the manifest, verifies each listed block's
checksum, and the engine replays the finished blocks instead of pruning them again. At the
end the block files are grouped into shards of at most ``max_shard_size`` bytes (a shard
made of one file is a hard link; several are concatenated byte for byte, so memory stays
flat), the index, config, generation config, tokenizer and report are added, and the folder
is renamed onto ``--out`` (an old ``--out`` is moved aside first and removed only after the
new one is in place; SIGINT is held off for those two renames).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import struct
import tempfile
import threading
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import PipelineError
from .models import ModelError, decoder_layers, unused_block_keys
from .report import missing_parents, usual_mode, write_atomic

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def block_prefix(i: int) -> str:
    return f"model.layers.{i}."


def is_block_key(key: str) -> bool:
    return key.startswith("model.layers.")


# ----------------------------------------------------------------------------- reading


class Checkpoint:
    """The safetensors files of a checkpoint directory and which file holds each tensor."""

    def __init__(self, path):
        self.path = Path(path)
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise ModelError(f"{index}: not a safetensors index ({e})") from None
        elif (self.path / SINGLE).is_file():
            weight_map = {k: SINGLE for k in _keys(self.path / SINGLE)}
        elif any(self.path.glob("*.bin")):
            raise ModelError(f"{self.path} holds pickle .bin weights only; convert it to safetensors "
                             f"(load it and save_pretrained(..., safe_serialization=True))")
        else:
            raise ModelError(f"{self.path}: no {SINGLE} or {INDEX}")
        self.weight_map: dict[str, str] = weight_map
        for file in sorted(set(weight_map.values())):
            if not (self.path / file).is_file():
                raise ModelError(f"{self.path}: {file} is named by the index but missing")

    def files(self) -> list[Path]:
        return [self.path / f for f in sorted(set(self.weight_map.values()))]

    def block_keys(self, i: int) -> list[str]:
        return [k for k in self.weight_map if k.startswith(block_prefix(i))]

    def read(self, keys, dtype) -> dict[str, torch.Tensor]:
        """The tensors `keys` (floating ones cast to `dtype`), each shard opened and closed here."""
        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.weight_map[k], []).append(k)
        out = {}
        for file, names in by_file.items():
            with _open(self.path / file) as f:
                for k in names:
                    out[k] = _cast(_get(f, self.path / file, k), dtype)
        return out

    def scan(self) -> dict:
        """Read every shard once and check every floating tensor is finite, before any work.

        Plain reads of one tensor at a time (not the memory map, whose touched pages would
        count in RSS until the shard is closed). Returns {file: bytes}, the checkpoint's
        identity for the resume manifest.
        """
        sizes = {}
        for path in self.files():
            with _open(path):
                pass  # a header safetensors itself accepts
            header, start = _header(path)
            with open(path, "rb") as f:
                for k, info in header.items():
                    dtype = _FLOAT_DTYPES.get(info.get("dtype")) if k != "__metadata__" else None
                    if dtype is None:
                        continue
                    b, e = info["data_offsets"]
                    f.seek(start + b)
                    raw = f.read(e - b)
                    if len(raw) != e - b:
                        raise ModelError(f"{path}: truncated inside tensor {k}")
                    t = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0)
                    if not bool(torch.isfinite(t).all()):
                        raise ModelError(f"{k} holds NaN/Inf in the stored weights ({path.name}, checked at "
                                         f"load, before any pruning); the checkpoint is damaged, pruning cannot "
                                         f"repair it")
            sizes[path.name] = path.stat().st_size
        return sizes


_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _keys(path: Path) -> list[str]:
    with _open(path) as f:
        return list(f.keys())


@contextlib.contextmanager
def _open(path: Path):
    try:
        f = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        yield f
    finally:
        del f  # safe_open has no close(); dropping it unmaps the file


def _get(f, path: Path, key: str) -> torch.Tensor:
    try:
        return f.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{path}: tensor {key} cannot be read ({e})") from None


def _cast(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() and dtype is not None else t


def rest_state_dict(model) -> dict[str, torch.Tensor]:
    """The tensors outside the decoder blocks, as ``save_pretrained`` writes them (a tied
    lm_head is written once, under the embedding's name)."""
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        if is_block_key(k):
            continue
        ptr = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if ptr in seen:
            continue
        seen.add(ptr)
        out[k] = v.detach().to("cpu").contiguous()
    return out


def block_state_dict(block, i: int) -> dict[str, torch.Tensor]:
    """Block i's tensors under their checkpoint names, on the CPU."""
    return {block_prefix(i) + k: v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()}


def _relative(tensors: dict, i: int) -> dict:
    p = block_prefix(i)
    return {k[len(p):]: v for k, v in tensors.items()}


class InMemoryModel:
    """A model already in memory, as a block source: ``block(i)`` is ``model.model.layers[i]``.

    Pruning changes the model in place (what Python callers expect)."""

    streamed = False

    def __init__(self, model):
        decoder_layers(model)
        self.model = model
        self.num_blocks = len(model.model.layers)

    @contextlib.contextmanager
    def block(self, i: int, tensors: dict | None = None):
        layer = self.model.model.layers[i]
        if tensors is not None:  # a finished block of an interrupted run
            with torch.no_grad():
                layer.load_state_dict(_relative(tensors, i))
        yield layer

    def check_finite(self):
        for name, p in self.model.named_parameters():
            if p.is_floating_point() and not bool(torch.isfinite(p).all()):
                raise ModelError(f"{name} holds NaN/Inf in the stored weights (checked at load, before any "
                                 f"pruning); the checkpoint is damaged, pruning cannot repair it")

    def identity(self) -> dict:
        return {"name": "(in memory)", "architecture": type(self.model).__name__}


class StreamedModel:
    """A causal LM whose decoder blocks stay in their shards until ``with block(i)``."""

    streamed = True

    def __init__(self, path, dtype, name=None):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.checkpoint = Checkpoint(path)
        self.dtype = dtype
        self.name = name
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            with init_empty_weights():
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except (OSError, ValueError) as e:
            raise ModelError(f"could not build a causal LM from {path}: {e}") from None
        decoder_layers(model)
        unused_block_keys(self.checkpoint.weight_map, len(model.model.layers), where=path)
        rest = [k for k in self.checkpoint.weight_map if not is_block_key(k)]
        model.load_state_dict(self.checkpoint.read(rest, dtype), strict=False, assign=True)
        if getattr(model.config, "tie_word_embeddings", False):
            model.lm_head.weight = model.model.embed_tokens.weight
        missing = [n for n, p in model.named_parameters() if p.is_meta and not is_block_key(n)]
        if missing:
            raise ModelError(f"{path}: tensors missing from the checkpoint: {missing}")
        self.model = model.eval()
        self.num_blocks = len(model.model.layers)

    @contextlib.contextmanager
    def block(self, i: int, tensors: dict | None = None):
        """Decoder block i, materialized from the checkpoint (or from `tensors`), released on exit."""
        layer = self.model.model.layers[i]
        if tensors is None:
            tensors = self.checkpoint.read(self.checkpoint.block_keys(i), self.dtype)
        try:
            layer.load_state_dict(_relative(tensors, i), strict=True, assign=True)
        except RuntimeError as e:
            raise ModelError(f"{self.checkpoint.path}: block {i} does not match the config ({e})") from None
        del tensors
        try:
            yield layer
        finally:
            layer.to("meta")

    def check_finite(self):
        self.sizes = self.checkpoint.scan()

    def identity(self) -> dict:
        return {"name": self.name, "path": str(self.checkpoint.path),
                "files": getattr(self, "sizes", None) or
                {p.name: p.stat().st_size for p in self.checkpoint.files()},
                "architecture": type(self.model).__name__}


class StagedBlocks:
    """`source` with its blocks read from a staging folder: the pruned model, streamed."""

    def __init__(self, source, staging: "Staging"):
        self.source, self.staging = source, staging
        self.model, self.num_blocks, self.streamed = source.model, source.num_blocks, source.streamed

    def block(self, i: int):
        return self.source.block(i, tensors=self.staging.read_block(i))


# ----------------------------------------------------------------------------- writing


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _save(tensors: dict, path: Path) -> None:
    """save_file to a temporary name, fsync, rename: `path` is complete or absent."""
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
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
    def scratch(cls) -> "Staging":
        """A staging folder in the temp dir for a run without `out` (removed by `discard`)."""
        return cls(Path(tempfile.mkdtemp(prefix="admm-prune-")) / "run", temporary=True)

    @classmethod
    def view(cls, path: str, manifest: dict) -> "Staging":
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
        if diff:
            k = diff[0]
            raise PipelineError(f"cannot resume {self.path}: {k} was {old.get(k)!r}, now {fingerprint.get(k)!r}"
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
        write_atomic(self.path / MANIFEST, json.dumps(self.manifest, indent=1))

    def _write(self, name: str, tensors: dict) -> dict:
        path = self.path / name
        _save(tensors, path)
        return {"file": name, "bytes": path.stat().st_size, "sha256": _sha256(path)}

    def write_rest(self, tensors: dict):
        if self.manifest.get("rest") is None:
            self.manifest["rest"] = self._write("rest.safetensors", tensors)
            self._save_manifest()

    def write_block(self, i: int, tensors: dict, info: dict):
        """Block i is done: its file, then the manifest entry (with `info`: records, seconds)."""
        entry = self._write(f"block-{i:05d}.safetensors", tensors)
        self.manifest["blocks"][str(i)] = {**entry, **info}
        self._save_manifest()

    def read_block(self, i: int) -> dict[str, torch.Tensor]:
        path = self.path / self.manifest["blocks"][str(i)]["file"]
        with _open(path) as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    def finish(self, overwrite: bool, max_shard_size: int, write_extras) -> bool:
        """Shard the staged files into ``staging/final``, add `write_extras(folder)`'s files,
        and rename the result onto `out`; then remove the staging folder.

        Returns whether a SIGINT came while the output was being swapped in (it was held
        off: `out` is complete either way)."""
        final = self.path / "final"
        if final.exists():
            shutil.rmtree(final)
        final.mkdir()
        files = [self.manifest["rest"]["file"]] + [b["file"] for _, b in sorted(self.finished.items())]
        groups = _group_by_size([self.path / f for f in files], max_shard_size)
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
        for path in [final, *final.iterdir()]:
            path.chmod(usual_mode(path.is_dir()))
        with _sigint_held() as caught:
            if self.out.exists():
                if not overwrite:
                    raise PipelineError(f"out {self.out} appeared while pruning; not replacing it "
                                        f"(the finished checkpoint is in {final})")
                old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
                self.out.rename(old)
                final.rename(self.out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                final.rename(self.out)
            self.discard()
        return bool(caught)

    def discard(self):
        shutil.rmtree(self.path, ignore_errors=True)
        if self.temporary:
            shutil.rmtree(self.out.parent, ignore_errors=True)


def _group_by_size(paths: list[Path], limit: int) -> list[list[Path]]:
    """Consecutive files, greedily, into groups of at most `limit` bytes (a bigger file alone)."""
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


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


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
        return _header(dest)[0]
    header, regions, offset = {}, [], 0
    for p in parts:
        h, start = _header(p)
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


def open_model(name_or_path, dtype, cache_dir=None):
    """A checkpoint by name (see `models.resolve_model`) as a `StreamedModel`, with its tokenizer."""
    from transformers import AutoTokenizer

    from .models import DEFAULT_MODEL, resolve_model

    path = resolve_model(name_or_path, cache_dir)
    source = StreamedModel(path, dtype, name=name_or_path or DEFAULT_MODEL)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load the tokenizer of {path}: {e}") from None
    return source, tokenizer


class OutputPlan:
    """Where a run's output goes, checked before any work: refuses what cannot be written,
    creates the missing parent folders (and removes those it created if the run fails)."""

    def __init__(self, out: str, overwrite: bool):
        path = Path(out)
        self.out, self.created = path, []
        if path.exists() and not overwrite:
            raise PipelineError(f"out {out} already exists; pass overwrite to replace it")
        if path.exists() and not path.is_dir():
            raise PipelineError(f"out {out} exists and is not a directory")
        if path.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
            raise PipelineError(f"out {out} is the current folder or holds it; choose a new folder")
        try:
            self.created = missing_parents(out)
        except ValueError as e:
            raise PipelineError(str(e)) from None

    def make_parents(self):
        self.out.parent.mkdir(parents=True, exist_ok=True)

    def remove_created(self):
        for p in reversed(self.created):
            with contextlib.suppress(OSError):
                p.rmdir()
