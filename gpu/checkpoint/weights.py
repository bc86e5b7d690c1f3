"""A decoder block's prunable weights: each an ``nn.Linear`` or one expert's slice of a packed
3-D mixture-of-experts parameter, with a way to read it, write it and see its inputs.

A `Weight` is named relative to its block: ``self_attn.q_proj`` for a linear (what
``block.get_submodule`` takes), ``mlp.experts.3.gate_up_proj`` for expert 3's slice of the
packed ``mlp.experts.gate_up_proj`` (so ``--targets``/``--ignore`` can name experts:
``experts\\.3\\.``). `matrix` is always [d_out, d_in], whatever the storage (Llama 4 stores its
experts [d_in, d_out]).

Experts are found by structure: a module holding 3-D parameters ``gate_up_proj`` [E, 2I, H]
and ``down_proj`` [E, H, I] whose forward takes ``(hidden_states, top_k_index, top_k_weights)``
(transformers 5's experts interface: Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek, ...), or Llama 4's
``Llama4TextExperts`` (the same two names, stored transposed, fed tokens already routed and
scaled). Any other 3-D parameter is refused by `prunable_weights` in one line naming its
module. The linears directly under a module holding experts are its routers (Mixtral's
``gate``, Llama 4's ``router``, Qwen2-MoE's ``shared_expert_gate``): they stay dense; a shared
expert is an MLP of its own, pruned as ordinary linears.

The inputs of the experts are seen by one forward pre-hook on the experts module
(`experts_inputs`), which computes, per expert, the tokens the router sends to it ("routed"),
the same weighted by the router's weight ("weighted": Gram sum_t w_t x_t x_t^T), or every
token ("all", llm-compressor's ``moe_calibrate_all_experts``); down_proj's input is
act(x gate^T) * (x up^T) of those tokens with the expert's current weights. Llama 4 multiplies
the router's score into its experts' input: there "routed" is what each expert receives (the
score-weighted tokens, so "weighted" is the same) and "all" every token before the scaling.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import torch
from torch import nn

from .models import ModelError

MOE_CALIBRATION = ("routed", "weighted", "all")  # the --moe-calibration choices (config.py reads them here)


@dataclass(frozen=True)
class Weight:
    """One prunable matrix of a block: ``module.param`` (an nn.Linear's ``weight``, or the
    ``expert``-th slice of a packed parameter, `transposed` when stored [d_in, d_out])."""

    name: str
    module: str
    param: str = "weight"
    expert: int | None = None
    transposed: bool = False

    def stored(self, block) -> torch.Tensor:
        """The tensor as stored (contiguous; what a broadcast or a state dict moves)."""
        p = getattr(block.get_submodule(self.module), self.param)
        return p.data if self.expert is None else p.data[self.expert]

    def matrix(self, block) -> torch.Tensor:
        """The weight as [d_out, d_in], a view of the stored tensor (detached)."""
        t = self.stored(block)
        return t.T if self.transposed else t

    def write(self, block, W: torch.Tensor) -> None:
        """Copy `W` [d_out, d_in] into the stored tensor, in its dtype."""
        m = self.matrix(block)
        m.copy_(W.to(m.dtype))

    def in_features(self, block) -> int:
        return self.matrix(block).shape[1]

    def parameter(self, block) -> nn.Parameter:
        """The parameter holding it (the whole packed tensor for an expert)."""
        return getattr(block.get_submodule(self.module), self.param)


def as_weights(items) -> list[Weight]:
    """`items` as Weights: a str is the name of an nn.Linear of the block."""
    return [Weight(w, w) if isinstance(w, str) else w for w in items]


def _signature(module) -> list[str]:
    fwd = getattr(type(module).forward, "__wrapped__", type(module).forward)
    return list(inspect.signature(fwd).parameters)[1:]


def experts_kind(module) -> str | None:
    """"topk" (transformers 5's experts interface), "prerouted" (Llama 4's), None (no experts),
    or a ModelError for 3-D parameters this module does not know."""
    packed = {n: p for n, p in module.named_parameters(recurse=False) if p.ndim >= 3}
    if not packed:
        return None
    args = _signature(module)
    if set(packed) == {"gate_up_proj", "down_proj"} and hasattr(module, "act_fn"):
        if args[:3] == ["hidden_states", "top_k_index", "top_k_weights"]:
            return "topk"
        if args == ["hidden_states"] and type(module).__name__ == "Llama4TextExperts":
            return "prerouted"
    first = next(iter(packed))
    raise ModelError(f"{type(module).__name__} stores {', '.join(packed)} as {packed[first].ndim}-D parameters "
                     f"{list(packed[first].shape)} (mixture-of-experts experts) in a layout this version cannot "
                     f"prune")


def experts_modules(block) -> dict[str, str]:
    """{name: kind} of the block's experts modules (see `experts_kind`)."""
    found = {}
    for name, module in block.named_modules():
        try:
            kind = experts_kind(module)
        except ModelError as error:
            raise ModelError(f"{name}: {error}") from None
        if kind is not None:
            found[name] = kind
    return found


def _routers(block, experts: dict[str, str]) -> set[str]:
    """The linears directly under a module that holds experts: routers and gates, kept dense."""
    parents = {name.rpartition(".")[0] for name in experts}
    return {name for name, m in block.named_modules() if isinstance(m, nn.Linear)
            and name.rpartition(".")[0] in parents and name not in experts}


def prunable_weights(block, targets: tuple[str, ...] = (), ignore: tuple[str, ...] = ()) -> list[Weight]:
    """The block's weights to prune in module order: each nn.Linear (routers excepted) and each
    expert's gate_up_proj and down_proj slice, chosen by ``re.search`` of `targets` (none:
    all) and not of `ignore` in the weight's name, as llm-compressor's targets/ignore choose
    modules."""
    experts = experts_modules(block)
    routers = _routers(block, experts)
    found = []
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) and name not in routers:
            found.append(Weight(name, name))
        elif name in experts:
            for e in range(module.gate_up_proj.shape[0]):
                for param in ("gate_up_proj", "down_proj"):
                    found.append(Weight(f"{name}.{e}.{param}", name, param, e, experts[name] == "prerouted"))
    return [w for w in found if (not targets or any(re.search(t, w.name) for t in targets))
            and not any(re.search(t, w.name) for t in ignore)]


def hook_inputs(block, weights: list[Weight], feed, moe_calibration: str = "routed") -> list:
    """Forward pre-hooks calling ``feed(weight, x)`` with each input batch x [tokens, d_in] of
    each of `weights` (an expert's x may have no rows: it is still called, once per forward of
    its experts module). Returns the hook handles."""
    handles, by_module = [], {}
    for w in weights:
        by_module.setdefault(w.module, []).append(w)
    for module_name, ws in by_module.items():
        module = block.get_submodule(module_name)
        if ws[0].expert is None:
            for w in ws:
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, w=w: feed(w, args[0].reshape(-1, args[0].shape[-1]))))
        else:
            handles += _experts_hooks(block, module, ws, moe_calibration, feed)
    return handles


def _experts_hooks(block, module, weights: list[Weight], mode: str, feed) -> list:
    """The experts module's pre-hook (and, for Llama 4 with "all", one on its parent for the
    tokens before the router scales them)."""
    if mode not in MOE_CALIBRATION:
        raise ValueError(f"moe_calibration must be one of {MOE_CALIBRATION}, got {mode!r}")
    unscaled = {}
    handles = []
    if weights[0].transposed and mode == "all":
        parent = block.get_submodule(weights[0].module.rpartition(".")[0])
        handles.append(parent.register_forward_pre_hook(
            lambda m, args: unscaled.update(x=args[0].reshape(-1, args[0].shape[-1]))))

    def hook(m, args, kwargs):
        for w, x in experts_inputs(m, args, kwargs, weights, mode, unscaled.get("x")):
            feed(w, x)
    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


@torch.no_grad()
def experts_inputs(module, args, kwargs, weights: list[Weight], mode: str, unscaled=None):
    """(weight, x) for each of `weights` (slices of `module`) in one forward: x the rows the
    router sends to its expert (see the module docstring for the modes)."""
    names = ["hidden_states", "top_k_index", "top_k_weights"]
    given = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    hidden = given["hidden_states"]
    prerouted = weights[0].transposed
    if prerouted:  # Llama 4: [E * T, H], expert e's block of rows scaled by its router score
        E = module.gate_up_proj.shape[0]
        routed_in = hidden.reshape(E, -1, hidden.shape[-1])
    want = {w.expert for w in weights}
    for e in sorted(want):
        if prerouted:
            x = routed_in[e] if mode != "all" else unscaled  # "all": every token, before the router's scale
            x = x[x.ne(0).any(-1)] if mode != "all" else x
        else:
            hit = given["top_k_index"].eq(e)
            rows = hit.any(-1)
            x = hidden if mode == "all" else hidden[rows]
        gate_up = module.gate_up_proj[e]
        gate, up = (x @ gate_up if prerouted else x @ gate_up.T).chunk(2, dim=-1)
        h = module.act_fn(gate) * up
        if mode == "weighted" and not prerouted:  # sqrt(w_t) on each row: Grams sum_t w_t x_t x_t^T
            scale = (given["top_k_weights"] * hit).sum(-1)[rows].sqrt().unsqueeze(-1)
            x, h = x * scale.to(x.dtype), h * scale.to(h.dtype)
        for w in weights:
            if w.expert == e:
                yield w, (x if w.param == "gate_up_proj" else h)
