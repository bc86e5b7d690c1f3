"""Peer implementations the bench runs on the same windows: llm-compressor's SparseGPT and Wanda
(vllm-project/llm-compressor's ``oneshot`` with ``SparseGPTModifier``/``WandaPruningModifier``).

The peer targets linears by name (`PEER_TARGETS`: the q/k/v/o and gate/up/down projections,
the output head excluded), ours by type (`models.prunable_linears`: every linear of a block). On
LLaMA-style blocks (Llama, Mistral, Qwen2/3, Gemma-2) both prune the same seven linears; on
blocks with other names they do not (Phi-3's fused ``qkv_proj`` and ``gate_up_proj``: the peer
prunes only ``o_proj`` and ``down_proj``), and the bench warns (`peer_linears`)."""

from __future__ import annotations

import re

import torch

from admm_prune.reference import parse_pattern

PEERS = ("llmcompressor",)
PEER_METHODS = ("sparsegpt", "wanda")
# llm-compressor targets (module names): LLaMA's seven projections per block, the output head excluded
PEER_TARGETS = [r"re:.*self_attn\.(q|k|v|o)_proj$", r"re:.*mlp\.(gate|up|down)_proj$"]


def peer_linears(names: list[str], prefix: str) -> list[str]:
    """Of a block's linears (`names`, relative to the block: ``self_attn.q_proj``), those the
    peer's `PEER_TARGETS` select, as it matches them against full module names (`prefix`: the
    block's own, from the model adapter)."""
    patterns = [re.compile(t.removeprefix("re:")) for t in PEER_TARGETS]
    return [n for n in names if any(p.match(f"{prefix}{n}") for p in patterns)]


def peer_available(peer: str) -> str | None:
    """None if `peer` can run here, else why not."""
    try:
        import llmcompressor  # noqa: F401
    except ImportError as e:
        return f"not installed ({e}); pip install llmcompressor (needs its own transformers pin)"
    return None


def llmcompressor_prune(model, tokenizer, calib_ids: torch.Tensor, method: str, sparsity, pattern: str):
    import datasets
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    nm = parse_pattern(pattern)
    n, seqlen = calib_ids.shape
    ds = datasets.Dataset.from_dict({"input_ids": calib_ids.tolist(), "attention_mask": [[1] * seqlen] * n})
    modifier = (SparseGPTModifier if method == "sparsegpt" else WandaPruningModifier)(
        sparsity=sparsity if nm is None else 1 - nm[0] / nm[1],
        mask_structure="0:0" if nm is None else pattern, targets=PEER_TARGETS)
    oneshot(model=model, tokenizer=tokenizer, dataset=ds, recipe=[modifier], num_calibration_samples=n,
            max_seq_length=seqlen,
            shuffle_calibration_samples=False)
