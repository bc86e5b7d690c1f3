"""Tiny random mixture-of-experts checkpoints for the MoE tests, saved the way transformers saves
them (its on-disk layout: Mixtral's per-expert ``block_sparse_moe.experts.N.w1``, Qwen3-MoE's and
OLMoE's ``mlp.experts.N.gate_proj``, Llama-4's packed ``feed_forward.experts.gate_up_proj``), and
views of a loaded model's experts, routers and attention as 2-D (out, in) matrices."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from admm_prune.gpu.checkpoint.models import tiny_tokenizer

_COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
               max_position_embeddings=512, tie_word_embeddings=False)

# model_type -> config fields; every layer MoE with 4 experts, top-2, unless said otherwise;
# expert width 96 != hidden 64, so a transposed expert matrix cannot pass for the right one
MOE = {
    "mixtral": dict(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(intermediate_size=128, moe_intermediate_size=96, num_experts=4, num_experts_per_tok=2,
                      head_dim=16, norm_topk_prob=True),  # q/k norms; renormalized top-k like Qwen3-30B-A3B
    "olmoe": dict(intermediate_size=96, num_experts=4, num_experts_per_tok=2),  # q/k norms, raw top-k weights
    # Llama-4 text: layer 0 dense (intermediate_size_mlp), layer 1 MoE (top-1, sigmoid scores on the
    # experts' input) with a shared expert; experts stored transposed, (E, in, out)
    "llama4_text": dict(intermediate_size=96, intermediate_size_mlp=128, num_local_experts=4,
                        num_experts_per_tok=1, interleave_moe_layer_step=2, head_dim=16),
    # many experts, few tokens: most experts see no calibration token at all
    "mixtral16": dict(model_type="mixtral", intermediate_size=32, num_local_experts=16, num_experts_per_tok=2),
}


def tiny_moe(arch: str, seed: int = 0, **overrides):
    """A small random-init MoE causal LM of `arch` (a key of `MOE`) and the byte-level tokenizer."""
    if arch not in MOE:
        raise ValueError(f"arch must be one of {sorted(MOE)}, got {arch!r}")
    tokenizer = tiny_tokenizer()
    fields = {**_COMMON, **MOE[arch], **overrides}
    model_type = fields.pop("model_type", arch)
    fields.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = AutoConfig.for_model(model_type, **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.eval(), tokenizer


def save_tiny_moe(folder, arch: str, seed: int = 0, **overrides):
    """`tiny_moe(arch)` saved with its tokenizer under `folder` (safetensors, transformers' own
    on-disk names); returns `folder`."""
    model, tokenizer = tiny_moe(arch, seed, **overrides)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _moe_modules(model):
    """(block index, MoE module, its experts) of every MoE block of a loaded model."""
    for i, block in enumerate(model.model.layers):
        moe = getattr(block, "feed_forward", None) or getattr(block, "mlp", None)
        experts = getattr(moe, "experts", None)
        if experts is not None and getattr(experts, "gate_up_proj", None) is not None:
            yield i, moe, experts


def expert_matrices(model) -> dict[str, torch.Tensor]:
    """Every expert's gate, up and down matrix as (out, in), named ``layers.i.experts.e.gate``."""
    out = {}
    for i, _, experts in _moe_modules(model):
        transposed = type(experts).__name__ == "Llama4TextExperts"  # (E, in, out)
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        if transposed:
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        width = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            out[f"layers.{i}.experts.{e}.gate"] = gate_up[e, :width]
            out[f"layers.{i}.experts.{e}.up"] = gate_up[e, width:]
            out[f"layers.{i}.experts.{e}.down"] = down[e]
    return out


def router_weights(model) -> dict[str, torch.Tensor]:
    """Every MoE block's router weight (E, d), named ``layers.i.router``."""
    out = {}
    for i, moe, _ in _moe_modules(model):
        router = getattr(moe, "router", None) or moe.gate  # Llama-4: an nn.Linear named router
        out[f"layers.{i}.router"] = router.weight.detach()
    assert out, f"{type(model).__name__} has no MoE block"
    return out


def dense_linears(model) -> dict[str, torch.Tensor]:
    """The nn.Linear weights inside the decoder blocks but outside the routed experts: attention,
    shared experts, dense-layer MLPs (routers excluded), named by their module path in the block."""
    out = {}
    for i, block in enumerate(model.model.layers):
        for name, module in block.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith(("router", ".gate")):
                out[f"layers.{i}.{name}"] = module.weight.detach()
    return out
