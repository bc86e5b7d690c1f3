"""Block sources: a causal LM seen one decoder block at a time, whether it is in memory,
streamed from its safetensors shards, or pruned and waiting in a staging folder.

Everything that walks the blocks (the pruning loop, perplexity, the sparsity count) takes a
`BlockSource`, or a model in memory that `as_source` wraps. `StreamedModel` builds the model
skeleton on the meta device (accelerate's `init_empty_weights`: parameters allocate nothing,
buffers such as the rotary frequencies are real), loads the tensors outside the decoder
blocks once (embeddings, final norm, head; tied as the checkpoint says), and materializes
decoder block i from the shards only inside ``with source.block(i)``; on exit the block goes
back to the meta device and the shard files are closed, so host memory holds one block at a
time whatever the depth. `InMemoryModel` gives the same interface over a model already in
memory (the Python API). `StagedBlocks` reads a source's blocks from a staging folder: the
pruned model, streamed.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, ContextManager, Protocol, runtime_checkable

import torch

from ..solvers.checks import all_finite
from .adapter import adapter
from .models import ModelError, decoder_layers
from .shards import Checkpoint

if TYPE_CHECKING:
    from .staging import Staging


@runtime_checkable
class BlockSource(Protocol):
    """A causal LM whose decoder blocks are visited one at a time.

    `model` is the whole model (its blocks may be empty shells outside ``block(i)``);
    ``with block(i, tensors)`` yields decoder block i, loaded from `tensors` (a finished
    block's state under its checkpoint names) when given; `streamed`: whether the blocks
    live on disk, not in `model`; `check_finite` raises a `ModelError` on a NaN/Inf weight;
    `identity` says what the model is (for the report and the resume manifest)."""

    model: torch.nn.Module
    num_blocks: int
    streamed: bool

    def block(self, i: int, tensors: dict | None = None) -> ContextManager[torch.nn.Module]: ...

    def check_finite(self) -> None: ...

    def identity(self) -> dict: ...


def as_source(model_or_source) -> BlockSource:
    """A block source: a `BlockSource` as is, a model in memory wrapped in `InMemoryModel`."""
    return model_or_source if isinstance(model_or_source, BlockSource) else InMemoryModel(model_or_source)


def rest_state_dict(model) -> dict[str, torch.Tensor]:
    """The tensors outside the decoder blocks, as ``save_pretrained`` writes them (a tied
    output embedding is written once, under the input embedding's name)."""
    out, seen, shape = {}, set(), adapter(model)
    for k, v in model.state_dict().items():
        if shape.is_block_key(k):
            continue
        ptr = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if ptr in seen:
            continue
        seen.add(ptr)
        out[k] = v.detach().to("cpu").contiguous()
    return shape.to_disk(out)


def block_state_dict(model, block, i: int) -> dict[str, torch.Tensor]:
    """Block i of `model` (its tensors in `block`) under its checkpoint names, on the CPU."""
    return adapter(model).block_state_dict(block, i)


class InMemoryModel:
    """A model already in memory, as a block source: ``block(i)`` is its decoder block i.

    Pruning changes the model in place (what Python callers expect)."""

    streamed = False

    def __init__(self, model):
        decoder_layers(model)
        self.model = model
        self.num_blocks = adapter(model).num_blocks

    @contextlib.contextmanager
    def block(self, i: int, tensors: dict | None = None):
        shape = adapter(self.model)
        layer = shape.layers[i]
        if tensors is not None:  # a finished block of an interrupted run
            with torch.no_grad():
                shape.load_block(layer, i, tensors)
        yield layer

    def check_finite(self):
        for name, p in self.model.named_parameters():
            if p.is_floating_point() and not all_finite(p):
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
        shape = adapter(model)
        shape.unused_block_keys(self.checkpoint.weight_map, where=path)
        rest = [k for k in self.checkpoint.weight_map if not shape.is_block_key(k)]
        model.load_state_dict(shape.to_memory(self.checkpoint.read(rest, dtype)), strict=False, assign=True)
        shape.tie_unless_stored(self.checkpoint.weight_map)
        shape.use_layout_of(self.checkpoint.weight_map)
        missing = [n for n, p in model.named_parameters() if p.is_meta and not shape.is_block_key(n)]
        for i, layer in enumerate(shape.layers):  # found now, not at block i
            expected = shape.to_disk({shape.block_prefix(i) + k: v for k, v in layer.state_dict().items()})
            missing += [k for k in expected if k not in self.checkpoint.weight_map]
        if missing:
            raise ModelError(f"{path}: {len(missing)} tensors missing from the checkpoint: "
                             f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}")
        self.model = model.eval()
        self.num_blocks = shape.num_blocks

    @contextlib.contextmanager
    def block(self, i: int, tensors: dict | None = None):
        """Decoder block i, materialized from the checkpoint (or from `tensors`), released on exit."""
        shape = adapter(self.model)
        layer = shape.layers[i]
        if tensors is None:
            tensors = self.checkpoint.read(self.checkpoint.keys_under(shape.block_prefix(i)), self.dtype)
        try:
            shape.load_block(layer, i, tensors, assign=True)
        except RuntimeError as e:
            raise ModelError(f"{self.checkpoint.path}: block {i} does not match the config "
                             f"({' '.join(str(e).split())})") from None
        del tensors
        try:
            yield layer
        finally:
            layer.to("meta")

    def check_finite(self):
        self.sizes = self.checkpoint.scan()

    def identity(self) -> dict:
        """Name, path, architecture, and the shards' sizes and content digests
        (`shards.content_digest`): a resumed run checks it continues on the same bytes."""
        return {"name": self.name, "path": str(self.checkpoint.path),
                "files": getattr(self, "sizes", None) or
                {p.name: p.stat().st_size for p in self.checkpoint.files()},
                "content": self.checkpoint.content(),
                "architecture": type(self.model).__name__}


class StagedBlocks:
    """`source` with its blocks read from a staging folder: the pruned model, streamed."""

    def __init__(self, source: BlockSource, staging: Staging):
        self.source, self.staging = source, staging
        self.model, self.num_blocks, self.streamed = source.model, source.num_blocks, source.streamed

    def block(self, i: int, tensors: dict | None = None):
        return self.source.block(i, tensors=self.staging.read_block(i) if tensors is None else tensors)

    def check_finite(self):
        """The staged blocks' weights, each block read once (the rest is `source`'s)."""
        for i in sorted(self.staging.finished):
            for name, t in self.staging.read_block(i).items():
                if t.is_floating_point() and not all_finite(t):
                    raise ModelError(f"{name} holds NaN/Inf in staged block {i} ({self.staging.path})")

    def identity(self) -> dict:
        return {**self.source.identity(), "staging": str(self.staging.path)}


def open_model(name_or_path, dtype=None, cache_dir=None):
    """A checkpoint by name (see `models.resolve_model`) as a `StreamedModel`, with its tokenizer.
    `dtype`: what the model is read, run and saved in; default the checkpoint's own
    (`models.checkpoint_dtype`)."""
    from transformers import AutoTokenizer

    from .models import DEFAULT_MODEL, checkpoint_dtype, resolve_model

    path = resolve_model(name_or_path, cache_dir)
    source = StreamedModel(path, dtype or checkpoint_dtype(path), name=name_or_path or DEFAULT_MODEL)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load the tokenizer of {path}: {e}") from None
    return source, tokenizer
