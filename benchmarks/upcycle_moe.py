"""An upcycled SmolLM2-MoE: the embedded SmolLM2's every MLP copied into E identical experts,
top-k routed, in the Mixtral architecture, with a router that means something: each block's
router rows are the k-means centroids of that block's MLP inputs (the post-attention RMSNorm
output) on a few C4 documents, so tokens that look alike go to the same experts.

    python benchmarks/upcycle_moe.py --out runs/smollm2-moe-8x2

Before any pruning the MoE computes what SmolLM2 computes: with identical experts and top-k
weights renormalized to sum 1 (Mixtral's router always renormalizes),
sum_k w_k MLP(x) = MLP(x). The script checks it on WikiText-2 validation windows (transformers'
forward of both models) and prints both perplexities.

Why Mixtral and not Qwen3-MoE: Qwen3-MoE's attention normalizes q and k (q_norm/k_norm), which
no weight setting turns into LLaMA's attention; Mixtral's attention is LLaMA's, key for key.
The checkpoint is written by transformers (`save_pretrained`), so it has Mixtral's own on-disk
names (``block_sparse_moe.experts.N.w1/w2/w3``), float32 like the SmolLM2 cache (~2.6 GB).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, MixtralForCausalLM

from admm_prune.gpu.checkpoint.models import resolve_model
from admm_prune.gpu.data.corpus import (load_texts, perplexity, perplexity_text, sample_calibration,
                                        tokenize_for_perplexity)

# the same attention, norms, rope and vocabulary; only the MLP becomes a mixture
_SHARED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                  "rope_parameters", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
                  "attention_dropout", "initializer_range")


@torch.no_grad()
def mlp_inputs(model, windows) -> list[torch.Tensor]:
    """Each decoder block's MLP input, [tokens, hidden] (float32), over all `windows`."""
    blocks = model.model.layers
    seen = [[] for _ in blocks]

    def keep(i):
        return lambda _, args: seen[i].append(args[0].reshape(-1, args[0].shape[-1]).float())

    hooks = [block.mlp.register_forward_pre_hook(keep(i)) for i, block in enumerate(blocks)]
    try:
        for window in windows:
            model(input_ids=window[None], use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(x) for x in seen]


def router_from_centroids(X: torch.Tensor, experts: int, seed: int, scale: float) -> tuple[torch.Tensor, np.ndarray]:
    """router W [experts, hidden]: unit k-means centroids of the unit rows of X, times
    scale / mean ||x||, so that a token's logit for expert e is scale * cos(x, c_e) * ||x|| / mean||x||
    (top-k by cosine to the centroids; the scale only sets how peaked the softmax is).
    Also returns the share of X's tokens whose top-1 expert is each e."""
    norms = X.norm(dim=1, keepdim=True)
    unit = (X / norms.clamp_min(1e-12)).numpy().astype(np.float64)
    km = KMeans(n_clusters=experts, n_init=4, random_state=seed).fit(unit)
    C = torch.from_numpy(km.cluster_centers_).float()
    W = C / C.norm(dim=1, keepdim=True) * (scale / norms.mean())
    top1 = (X @ W.T).argmax(dim=1)
    return W, np.bincount(top1.numpy(), minlength=experts) / len(top1)


def upcycle(dense, routers: list[torch.Tensor], experts: int, top_k: int) -> MixtralForCausalLM:
    """A Mixtral whose block i has `experts` copies of dense block i's MLP and router routers[i]."""
    fields = {k: getattr(dense.config, k) for k in _SHARED_FIELDS if hasattr(dense.config, k)}
    config = MixtralConfig(**fields, num_local_experts=experts, num_experts_per_tok=top_k, sliding_window=None,
                           router_jitter_noise=0.0, output_router_logits=False)
    state = {}
    for name, tensor in dense.state_dict().items():
        parts = name.split(".")
        if ".mlp." not in name:
            state[name] = tensor
        elif parts[-2] == "gate_proj":
            prefix = ".".join(parts[:4])  # model.layers.i.mlp
            mlp = dense.model.layers[int(parts[2])].mlp
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            state[f"{prefix}.experts.gate_up_proj"] = gate_up[None].repeat(experts, 1, 1)
            state[f"{prefix}.experts.down_proj"] = mlp.down_proj.weight[None].repeat(experts, 1, 1)
            state[f"{prefix}.gate.weight"] = routers[int(parts[2])].to(tensor.dtype)
    moe = MixtralForCausalLM(config)  # on the CPU: built on meta, the rotary buffers would stay there
    moe.load_state_dict(state, strict=True)
    if config.tie_word_embeddings:
        moe.tie_weights()  # one tensor again, as in SmolLM2
    return moe.eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write the checkpoint to")
    p.add_argument("--model", default=None, help="the dense LLaMA-layout source (default: the embedded SmolLM2)")
    p.add_argument("--experts", type=int, default=8, help="experts per block (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--calib", default="../shared/data/c4/c4_train_first1000_reserialized.jsonl",
                   help="documents whose MLP inputs the router centroids come from")
    p.add_argument("--router-windows", type=int, default=16, help="calibration windows for k-means (default 16)")
    p.add_argument("--router-seqlen", type=int, default=512, help="their length in tokens (default 512)")
    p.add_argument("--router-scale", type=float, default=10.0,
                   help="logit of a token at mean norm, cosine 1 (default 10)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the windows and of k-means; not one of the "
                   "pruning calibration seeds 0, 1, 2 (default 1234)")
    p.add_argument("--eval", default="../shared/data/wikitext-2-raw/wiki.valid.raw",
                   help="perplexity text (validation)")
    p.add_argument("--eval-windows", type=int, default=4, help="perplexity windows (default 4)")
    p.add_argument("--eval-seqlen", type=int, default=2048, help="their length (default 2048)")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    source = resolve_model(args.model)
    dense = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    windows, info = sample_calibration(load_texts(args.calib), tokenizer, args.router_windows, args.router_seqlen,
                                       args.seed)
    inputs = mlp_inputs(dense, windows)
    routers, loads = zip(*(router_from_centroids(X, args.experts, args.seed, args.router_scale) for X in inputs))
    del inputs
    moe = upcycle(dense, list(routers), args.experts, args.top_k)

    out = Path(args.out)
    moe.save_pretrained(out)
    tokenizer.save_pretrained(out)
    eval_windows = tokenize_for_perplexity(perplexity_text(load_texts(args.eval)), tokenizer, args.eval_seqlen)
    eval_windows = eval_windows[: args.eval_windows]
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ppl_dense = perplexity(dense, eval_windows, progress=False)
    ppl_moe = perplexity(reloaded, eval_windows, progress=False)
    record = {
        "source": source, "out": str(out), "architecture": type(reloaded).__name__, "experts": args.experts,
        "top_k": args.top_k, "router": {"calibration": info, "scale": args.router_scale, "seed": args.seed,
                                        "top1_share_per_block": [[round(x, 4) for x in s] for s in loads]},
        "eval": {"text": args.eval, "windows": len(eval_windows), "seqlen": args.eval_seqlen},
        "perplexity": {"dense": ppl_dense, "upcycled_moe": ppl_moe,
                       "relative_difference": abs(ppl_moe - ppl_dense) / ppl_dense},
        "seconds": time.perf_counter() - start,
    }
    (out / "upcycle.json").write_text(json.dumps(record, indent=1))
    print(f"dense perplexity        {ppl_dense:.6f}  ({source})")
    print(f"upcycled MoE perplexity {ppl_moe:.6f}  "
          f"({type(reloaded).__name__}, {args.experts} experts, top-{args.top_k})")
    print(f"relative difference     {record['perplexity']['relative_difference']:.2e}")
    print("top-1 share per expert (min, max over blocks):",
          f"{min(min(s) for s in loads):.3f}, {max(max(s) for s in loads):.3f}")
    if not math.isclose(ppl_moe, ppl_dense, rel_tol=1e-4):
        raise SystemExit(f"upcycled perplexity {ppl_moe} != the dense model's {ppl_dense}: "
                         "the MoE does not compute the MLP")


if __name__ == "__main__":
    main()
