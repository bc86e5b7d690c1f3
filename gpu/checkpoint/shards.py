"""Reading a safetensors checkpoint folder: which file holds each tensor, reading some of
them, and the NaN/Inf scan of every stored weight before a run starts.

A checkpoint is ``model.safetensors`` alone, or shards named by
``model.safetensors.index.json``. Tensor names follow ``save_pretrained``; which of them belong
to decoder block i (a key prefix) is the model adapter's to say (`adapter.ModelAdapter`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..solvers.checks import all_finite
from .models import ModelError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SAMPLES, SAMPLE_BYTES = 64, 1 << 16  # what `content_digest` reads of each shard: 64 x 64 KiB
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


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

    def content(self) -> dict[str, str]:
        """{file: `content_digest`} of every shard: the checkpoint's content for the resume manifest."""
        return {p.name: content_digest(p) for p in self.files()}

    def keys_under(self, prefix: str) -> list[str]:
        """The keys starting with `prefix` (a block's: `adapter.ModelAdapter.block_prefix`)."""
        return [k for k in self.weight_map if k.startswith(prefix)]

    def read(self, keys, dtype) -> dict[str, torch.Tensor]:
        """The tensors `keys` (floating ones cast to `dtype`), each shard opened and closed here."""
        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.weight_map[k], []).append(k)
        out = {}
        for file, names in by_file.items():
            with open_safetensors(self.path / file) as f:
                for k in names:
                    out[k] = _cast(_get(f, self.path / file, k), dtype)
        return out

    def scan(self) -> dict:
        """Read every shard once and check every floating tensor is finite, before any work.

        Plain reads of one tensor at a time (not the memory map, whose touched pages would
        count in RSS until the shard is closed). Returns {file: bytes}, the checkpoint's
        identity for the resume manifest.
        """
        sizes, buffer = {}, torch.empty(0, dtype=torch.uint8)
        for path in self.files():
            with open_safetensors(path):
                pass  # a header safetensors itself accepts
            header, start = read_header(path)
            with open(path, "rb") as f:
                for k, info in header.items():
                    dtype = FLOAT_DTYPES.get(info.get("dtype")) if k != "__metadata__" else None
                    if dtype is None:
                        continue
                    b, e = info["data_offsets"]
                    if buffer.numel() < e - b:  # one buffer, as large as the largest tensor
                        buffer = torch.empty(e - b, dtype=torch.uint8)
                    raw = buffer[:e - b]
                    f.seek(start + b)
                    if f.readinto(memoryview(raw.numpy())) != e - b:
                        raise ModelError(f"{path}: truncated inside tensor {k}")
                    if not all_finite(raw.view(dtype)):
                        raise ModelError(f"{k} holds NaN/Inf in the stored weights ({path.name}, checked at "
                                         f"load, before any pruning); the checkpoint is damaged, pruning cannot "
                                         f"repair it")
            sizes[path.name] = path.stat().st_size
        return sizes


def content_digest(path: Path) -> str:
    """sha256 of a shard's header and of SAMPLES evenly spaced pieces of its data (SAMPLE_BYTES
    each, the last piece ending at the end of the file): what ``--resume`` compares to know the
    model it continues is the one it started on.

    Why this is enough: two models of the same architecture have the same tensor names, shapes
    and offsets, so the same header and file sizes, but different weights almost everywhere
    (another training run, a fine-tune, another seed or dtype conversion change nearly every
    value), so 64 pieces spread over the file differ. mtimes would not do: a copy that keeps
    them (``cp -p``, ``rsync -t``) passes, the same bytes written again fail. What it misses is
    an edit confined to bytes between the pieces (one tensor changed by hand); hashing every
    byte would catch that too, at the cost of reading and hashing the whole model again
    (minutes for 100+ GB) for each run. 4 MiB per shard are read here.
    """
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h.update(f.read(n))
        start = 8 + n
        span = max(size - start - SAMPLE_BYTES, 0)
        for k in range(SAMPLES):
            f.seek(start + span * k // max(SAMPLES - 1, 1))
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


@contextlib.contextmanager
def open_safetensors(path: Path):
    """`path` opened with safetensors' `safe_open` (torch tensors); an unreadable file is a `ModelError`."""
    try:
        f = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        yield f
    finally:
        del f  # safe_open has no close(); dropping it unmaps the file


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (JSON) and the byte offset where its data starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def _keys(path: Path) -> list[str]:
    with open_safetensors(path) as f:
        return list(f.keys())


def _get(f, path: Path, key: str) -> torch.Tensor:
    try:
        return f.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{path}: tensor {key} cannot be read ({e})") from None


def _cast(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() and dtype is not None else t
