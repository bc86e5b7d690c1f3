"""The model adapter: every fact about a model's shape, in one place. The rest of the engine
asks `adapter(model)` and never spells a model's attribute paths.

It finds the decoder layers (the longest ``nn.ModuleList`` of the model's
``_no_split_modules`` classes; the Llama path as fallback), the modules before them, each
block's key prefix in a checkpoint, and the logits through the model's own forward (its final
norm, head, Gemma-2's ``final_logit_softcapping``: whatever ``forward`` applies after the
blocks, with the blocks stood in for by the hidden states we computed). It answers the
tied-embedding question from what the checkpoint holds, as transformers does: a config saying
``tie_word_embeddings`` beside a stored output embedding keeps that output embedding. It maps a
block's tensors between memory and the checkpoint's own layout (transformers 5 keeps
mixture-of-experts experts packed in memory and writes Mixtral's ``experts.N.w1`` on disk),
through transformers' own conversion mapping. A block's prunable weights are
`weights.prunable_weights`'.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import weakref

import torch
from torch import nn

from .models import ModelError
from .weights import Weight, prunable_weights

log = logging.getLogger(__name__)

_FALLBACK = ("model", "layers")  # the Llama path, where _no_split_modules names no block list
_ADAPTERS: "weakref.WeakKeyDictionary[nn.Module, ModelAdapter]" = weakref.WeakKeyDictionary()


def adapter(model) -> "ModelAdapter":
    """The model's adapter, built once per model."""
    found = _ADAPTERS.get(model)
    if found is None:
        found = _ADAPTERS[model] = ModelAdapter(model)
    return found


def _passthrough(hidden_states=None, *args, **kwargs):
    """A block's stand-in: its input, unchanged."""
    return hidden_states


class ModelAdapter:
    """One causal LM's shape: `layers` (its decoder blocks), `layers_path` (their module path,
    also their checkpoint key prefix), the modules before them, its logits."""

    def __init__(self, model):
        self.model = model
        self.layers_path, self.layers = _find_layers(model)
        self.base_path = self.layers_path.rpartition(".")[0]
        self.base = model.get_submodule(self.base_path) if self.base_path else model
        self.num_blocks = len(self.layers)
        self.disk_layout = "original"  # "memory" when a checkpoint stores the in-memory names

    # --- names ---------------------------------------------------------------------------
    def block_prefix(self, i: int) -> str:
        return f"{self.layers_path}.{i}."

    def block_index(self, key: str) -> int | None:
        """The block a checkpoint key belongs to (None: outside the blocks)."""
        m = re.match(re.escape(self.layers_path) + r"\.(\d+)\.", key)
        return int(m[1]) if m else None

    def is_block_key(self, key: str) -> bool:
        return self.block_index(key) is not None

    def unused_block_keys(self, keys, where=None) -> list[str]:
        """The keys of blocks K >= num_blocks (a config that says fewer layers than the weights
        hold), logged as a warning about `where`."""
        n = self.num_blocks
        unused = sorted(k for k in keys if (b := self.block_index(k)) is not None and b >= n)
        if unused:
            blocks = len({self.block_index(k) for k in unused})
            log.warning(
                "%s: %d tensors of %d block%s (%s%d and up) are not used: the config says num_hidden_layers=%d",
                where or "checkpoint", len(unused), blocks, "s" * (blocks != 1), self.block_prefix(""), n, n)
        return unused

    # --- modules -------------------------------------------------------------------------
    def before_blocks(self) -> list[nn.Module]:
        """The modules that run before block 0 (embeddings, rotary; with them the small
        modules after the blocks in the same parent, e.g. the final norm)."""
        return [m for n, m in self.base.named_children() if m is not self.layers]

    def outside_blocks(self) -> list[nn.Module]:
        """Every module with a parameter or buffer outside the blocks (what the logits need)."""
        top = [m for n, m in self.model.named_children() if m is not self.base]
        return self.before_blocks() + top if self.base is not self.model else self.before_blocks()

    def layer_types(self) -> list:
        """``config.layer_types`` over the blocks (attention types; empty when not given)."""
        return list(getattr(self.model.config, "layer_types", None) or ())[:self.num_blocks]

    @contextlib.contextmanager
    def blocks_replaced(self, forwards: dict):
        """Blocks i of `forwards` run ``forwards[i]`` instead of their forward for the duration
        (any forward an instance had of its own, accelerate's hooks, is put back after)."""
        saved = {i: self.layers[i].__dict__.get("forward") for i in forwards}
        try:
            for i, fwd in forwards.items():
                self.layers[i].forward = fwd
            yield
        finally:
            for i, fwd in saved.items():
                if fwd is None:
                    del self.layers[i].forward
                else:
                    self.layers[i].forward = fwd

    def passing_through(self, last: int):
        """Blocks 0..last-1 pass their input through (never run: they may be on the meta device)."""
        return self.blocks_replaced({i: _passthrough for i in range(last)})

    # --- the head ------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The logits [1, seqlen, vocab] of the last block's output `hidden` for `input_ids`,
        through the model's own forward after the blocks (final norm, head, soft cap, ...):
        the blocks pass through and the last one returns `hidden`. The modules outside the
        blocks must be where `hidden` is."""
        last = self.num_blocks - 1
        forwards = {i: _passthrough for i in range(last)} | {last: lambda *a, **k: hidden}
        with self.blocks_replaced(forwards):
            out = self.model(input_ids=input_ids, use_cache=False)
        logits = getattr(out, "logits", None)
        if not isinstance(logits, torch.Tensor) or logits.shape[:2] != input_ids.shape:
            raise ModelError(f"{type(self.model).__name__}: its forward returns no logits per token; "
                             f"its head is not one this version can evaluate")
        return logits

    # --- tied embeddings -----------------------------------------------------------------
    def output_embedding_key(self) -> str | None:
        """The state-dict key of the output embedding's weight (None: no separate head)."""
        head = self.model.get_output_embeddings()
        names = {id(m): n for n, m in self.model.named_modules()}
        return f"{names[id(head)]}.weight" if head is not None and id(head) in names else None

    def tie_unless_stored(self, keys) -> bool:
        """Tie the output embedding to the input one when the config asks and the checkpoint
        (`keys`) holds no output embedding of its own, as transformers does; returns whether tied."""
        key = self.output_embedding_key()
        tie = bool(getattr(self.model.config, "tie_word_embeddings", False)) and key is not None and key not in keys
        if tie:
            self.model.get_output_embeddings().weight = self.model.get_input_embeddings().weight
        return tie

    # --- the checkpoint layout -----------------------------------------------------------
    def use_layout_of(self, keys) -> None:
        """Learn from a checkpoint's `keys` which names it stores its blocks under: transformers'
        original ones ("original", the default: what ``save_pretrained`` writes) or the in-memory
        ones ("memory": saved with ``save_original_format=False``), from the first block whose
        two sets of names differ (a dense block of Llama 4 or DeepSeek-V3 says nothing)."""
        keys = set(keys)
        for i, block in enumerate(self.layers):
            memory = {self.block_prefix(i) + k: v for k, v in block.state_dict().items()}
            self.disk_layout = "original"
            if set(self.to_disk(memory)) != set(memory):
                self.disk_layout = "memory" if set(memory) <= keys else "original"
                return

    def to_disk(self, tensors: dict) -> dict:
        """In-memory names and tensors (full keys) in the checkpoint's layout."""
        if self.disk_layout == "memory":
            return tensors
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(self.model, dict(tensors))

    def to_memory(self, tensors: dict) -> dict:
        """Tensors in the checkpoint's layout (full keys) under the in-memory names."""
        if self.disk_layout == "memory":
            return tensors
        return _convert(self.model, tensors)

    def block_state_dict(self, block, i: int) -> dict[str, torch.Tensor]:
        """Block i's tensors on the CPU, under the checkpoint's names."""
        p = self.block_prefix(i)
        return self.to_disk({p + k: v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()})

    def load_block(self, block, i: int, tensors: dict, assign: bool = False) -> None:
        """Load `tensors` (block i's, under the checkpoint's names) into `block`, strictly."""
        p = self.block_prefix(i)
        relative = {k[len(p):]: v for k, v in self.to_memory(tensors).items()}
        block.load_state_dict(relative, strict=True, assign=assign)

    # --- prunable weights ----------------------------------------------------------------
    def weights(self, block, targets=(), ignore=()) -> list[Weight]:
        return prunable_weights(block, targets, ignore)


def _find_layers(model) -> tuple[str, nn.ModuleList]:
    """(path, list) of the decoder blocks: the longest ModuleList of `_no_split_modules`
    classes inside the model's decoder (``get_decoder()``: not a vision tower's), else
    ``model.layers``."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    inside = {id(m) for m in decoder.modules()} if isinstance(decoder, nn.Module) else None
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(type(m).__name__ in classes for m in module) \
                and (inside is None or id(module) in inside):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        layers = getattr(getattr(model, _FALLBACK[0], None), _FALLBACK[1], None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            best = (".".join(_FALLBACK), layers)
    if best is None:
        raise ModelError(f"no decoder blocks found on {type(model).__name__} (no ModuleList of its "
                         f"_no_split_modules, no {'.'.join(_FALLBACK)}); expected a decoder-only causal LM "
                         f"(Llama, Mistral, Qwen2/3, Gemma-2, Phi-3, Mixtral, Qwen3-MoE, OLMoE, ...)")
    return best


def _convert(model, tensors: dict) -> dict:
    """`tensors` under their checkpoint names converted to the in-memory ones, through the
    conversion mapping transformers loads `model` with (the inverse of its
    ``revert_weight_conversion``, for a part of the state dict)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        PrefixChange, WeightConverter, WeightRenaming, dot_natural_key, rename_source_key,
    )

    transforms = [t for t in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(t, PrefixChange)]
    if not transforms:
        return tensors
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    pending: dict = {}
    for key, tensor in sorted(tensors.items(), key=lambda kv: dot_natural_key(kv[0])):
        target, pattern = rename_source_key(key, renamings, converters)
        if pattern is not None:
            mapping = pending.setdefault(target, copy.deepcopy(by_pattern[pattern]))
        else:
            mapping, pattern = pending.setdefault(target, WeightRenaming(key, target)), key
        mapping.add_tensor(target, key, pattern, tensor)
    out = {}
    for target, mapping in pending.items():
        for name, value in mapping.convert(target, model=model, config=model.config).items():
            out[name] = value[0] if isinstance(value, list) else value
    return out
