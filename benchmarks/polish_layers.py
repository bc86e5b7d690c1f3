"""The finish on the support at the layer level: how much of ADMM-Grad's gap to the exact
masked solution K steps of CG close, and what they cost.

For each layer (W, XtX) and each ADMM iteration count T in ``--iters`` (mask steps
round(0.75 T), the paper's 15 of 20, as bench's ``+itersT``): admm-grad with
``polish_iters`` K in ``--ks`` (same mask for every K: the finish never changes it), and
`masked_lstsq` on that mask (damp 0.1, the ADMM problem's). Per (T, K) it reports the mean
over layers of the undamped layer error ||X (W^ - W)^T||^2 / ||X W^T||^2, the mean
relative gap of that error and of the damped objective (the problem both solve) to
masked_lstsq's on T's mask, and the solver time against the paper's T = 20, K = 0 (the
Pareto table of issue #14, at the layer level).
Layers come from synthetic outlier layers (`--synthetic`) and/or the real Grams of
SmolLM2-135M captured through the engine's callback (`--smollm2`, wanda run of
`prune_model`: the dense weights and the Grams each linear sees).

    OMP_NUM_THREADS=1 python benchmarks/polish_layers.py --synthetic --smollm2 --blocks 4 \\
        --calib ../shared/data/c4/c4_train_first1000_reserialized.jsonl --nsamples 16 \\
        --seqlen 512 --out paper_notes/polish_layers
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import admm_prune.gpu as G

KS = (0, 5, 10)
ITERS = (20,)


def synthetic_layers(seed: int = 0):
    """SmolLM2-135M's shapes (hidden 576, MLP 1536), outlier inputs as in tests/synth.py."""
    rng = np.random.default_rng(seed)
    for d_out, d_in in [(576, 576), (192, 576), (1536, 576), (576, 1536)]:
        A = np.eye(d_in) + rng.normal(size=(d_in, d_in)) / np.sqrt(d_in)
        scales = np.exp(0.5 * rng.normal(size=d_in))
        scales[rng.choice(d_in, max(1, d_in // 100), replace=False)] *= 20
        X = (rng.normal(size=(4 * d_in, d_in)) @ A) * scales
        yield f"synthetic ({d_out}, {d_in})", torch.tensor(rng.normal(size=(d_out, d_in)),
                                                          dtype=torch.float32), \
            torch.tensor(X.T @ X, dtype=torch.float32)


def smollm2_layers(calib: str, nsamples: int, seqlen: int, blocks: int):
    """(name, W_dense, XtX) of every linear of the first `blocks` blocks (float32)."""
    from admm_prune.gpu.data import corpus as data
    from admm_prune.gpu.checkpoint import models
    from admm_prune.gpu.engine import pipeline
    from admm_prune.gpu.config import PruneConfig

    model, tok, _ = models.load_model(None, dtype=torch.float32)
    model.eval()
    ids, _ = data.sample_calibration(data.load_texts(calib, split="train"), tok, nsamples, seqlen, 0)
    cfg = PruneConfig(method="wanda", sparsity=0.5, nsamples=nsamples, seqlen=seqlen,
                      eval=None, progress=False, num_blocks=blocks, device="cpu")
    out = []
    pipeline.prune_model(model, ids, cfg,
                         lambda i, name, W, XtX, res: out.append((f"block {i} {name}", W.detach().float().clone(),
                                                                  XtX.float().clone())))
    return out


def damped(W, W_hat, XtX, damp=0.1) -> float:
    D = (W_hat - W).double()
    Gm = XtX.double().clone()
    Gm.diagonal().mul_(1 + damp)
    return float(((D @ Gm) * D).sum())


def measure(name, W, XtX, sparsity, iters=ITERS, ks=KS):
    row = {"layer": name, "shape": list(W.shape)}
    for T in iters:
        masks = []
        for K in ks:
            t0 = time.perf_counter()
            r = G.prune_layer(W, XtX, sparsity, method="admm-grad", iters=T, mask_steps=round(0.75 * T),
                              polish_iters=K, track_objective=False)
            row[f"seconds_T{T}_K{K}"] = time.perf_counter() - t0
            row[f"error_T{T}_K{K}"] = G.reconstruction_error(W, r.W, XtX)
            row[f"objective_T{T}_K{K}"] = damped(W, r.W, XtX)
            masks.append(r.mask)
        assert all(torch.equal(m, masks[0]) for m in masks), "the finish changed the mask"
        t0 = time.perf_counter()
        exact = G.masked_lstsq(W, XtX, masks[0], damp=0.1)
        row[f"seconds_exact_T{T}"] = time.perf_counter() - t0
        row[f"error_exact_T{T}"] = G.reconstruction_error(W, exact, XtX)
        row[f"objective_exact_T{T}"] = damped(W, exact, XtX)
    return row


def summarize(rows, label, iters=ITERS, ks=KS):
    out = {"layers": label, "n": len(rows)}
    base = (20, 0) if 20 in iters and 0 in ks else (iters[0], ks[0])
    t_base = sum(r[f"seconds_T{base[0]}_K{base[1]}"] for r in rows)
    e_base = np.mean([r[f"error_T{base[0]}_K{base[1]}"] for r in rows])
    out["baseline"] = f"T{base[0]}_K{base[1]}"
    for T in iters:
        ex = np.array([r[f"error_exact_T{T}"] for r in rows])
        ox = np.array([r[f"objective_exact_T{T}"] for r in rows])
        out[f"mean_error_exact_T{T}"] = float(ex.mean())
        for K in ks:
            e = np.array([r[f"error_T{T}_K{K}"] for r in rows])
            o = np.array([r[f"objective_T{T}_K{K}"] for r in rows])
            out[f"T{T}_K{K}"] = {
                "mean_error": float(e.mean()),
                "error_vs_baseline": float(e.mean() / e_base),
                "mean_error_gap": float(e.mean() / ex.mean() - 1),         # gap of the mean layer error
                "mean_rel_gap_per_layer": float(np.mean(e / ex - 1)),
                "mean_rel_objective_gap": float(np.mean(o / ox - 1)),       # the damped problem both solve
                "time_vs_baseline": float(sum(r[f"seconds_T{T}_K{K}"] for r in rows) / t_base),
            }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--smollm2", action="store_true")
    p.add_argument("--calib", default="../shared/data/c4/c4_train_first1000_reserialized.jsonl")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--iters", default="20", help="comma-separated ADMM iteration counts T")
    p.add_argument("--ks", default="0,5,10", help="comma-separated finish steps K")
    p.add_argument("--out", default=None, help="path prefix: writes OUT.json")
    args = p.parse_args(argv)
    iters = tuple(int(v) for v in args.iters.split(","))
    ks = tuple(int(v) for v in args.ks.split(","))
    summaries, rows = [], []
    sources = []
    if args.synthetic:
        sources.append(("synthetic", list(synthetic_layers())))
    if args.smollm2:
        sources.append((f"SmolLM2-135M blocks 0-{args.blocks - 1}",
                        smollm2_layers(args.calib, args.nsamples, args.seqlen, args.blocks)))
    for label, layers in sources:
        part = [measure(name, W, XtX, args.sparsity, iters, ks) for name, W, XtX in layers]
        rows += part
        summaries.append(summarize(part, label, iters, ks))
        print(json.dumps(summaries[-1], indent=1), flush=True)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(
            {"args": vars(args), "torch_threads": torch.get_num_threads(), "summaries": summaries,
             "layers": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
