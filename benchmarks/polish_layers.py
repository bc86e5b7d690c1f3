"""The finish on the support at the layer level: how much of ADMM-Grad's gap to the exact
masked solution K steps of CG close, and what they cost.

For each layer (W, XtX): admm-grad with ``polish_iters`` K in 0, 5, 10 (same mask: the
finish never changes it), and `masked_lstsq` on that mask (damp 0.1, the ADMM problem's).
Per K it reports the mean over layers of the undamped layer error
||X (W^ - W)^T||^2 / ||X W^T||^2, the mean relative gap of that error and of the damped
objective (the problem both solve) to masked_lstsq's, and the solver time against K = 0.
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
    from admm_prune.gpu import data, models, pipeline

    model, tok, _ = models.load_model(None, dtype=torch.float32)
    model.eval()
    ids, _ = data.sample_calibration(data.load_texts(calib, split="train"), tok, nsamples, seqlen, 0)
    cfg = pipeline.PruneConfig(method="wanda", sparsity=0.5, nsamples=nsamples, seqlen=seqlen,
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


def measure(name, W, XtX, sparsity):
    row = {"layer": name, "shape": list(W.shape)}
    masks = []
    for K in KS:
        t0 = time.perf_counter()
        r = G.prune_layer(W, XtX, sparsity, method="admm-grad", polish_iters=K, track_objective=False)
        row[f"seconds_K{K}"] = time.perf_counter() - t0
        row[f"error_K{K}"] = G.reconstruction_error(W, r.W, XtX)
        row[f"objective_K{K}"] = damped(W, r.W, XtX)
        masks.append(r.mask)
    assert all(torch.equal(m, masks[0]) for m in masks), "the finish changed the mask"
    t0 = time.perf_counter()
    exact = G.masked_lstsq(W, XtX, masks[0], damp=0.1)
    row["seconds_exact"] = time.perf_counter() - t0
    row["error_exact"] = G.reconstruction_error(W, exact, XtX)
    row["objective_exact"] = damped(W, exact, XtX)
    return row


def summarize(rows, label):
    out = {"layers": label, "n": len(rows)}
    ex = np.array([r["error_exact"] for r in rows])
    ox = np.array([r["objective_exact"] for r in rows])
    t0 = sum(r["seconds_K0"] for r in rows)
    out["mean_error_exact"] = float(ex.mean())
    for K in KS:
        e = np.array([r[f"error_K{K}"] for r in rows])
        o = np.array([r[f"objective_K{K}"] for r in rows])
        out[f"K{K}"] = {
            "mean_error": float(e.mean()),
            "mean_error_gap": float(e.mean() / ex.mean() - 1),         # gap of the mean layer error
            "mean_rel_gap_per_layer": float(np.mean(e / ex - 1)),
            "mean_rel_objective_gap": float(np.mean(o / ox - 1)),       # the damped problem both solve
            "extra_time": float(sum(r[f"seconds_K{K}"] for r in rows) / t0 - 1),
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
    p.add_argument("--out", default=None, help="path prefix: writes OUT.json")
    args = p.parse_args(argv)
    summaries, rows = [], []
    sources = []
    if args.synthetic:
        sources.append(("synthetic", list(synthetic_layers())))
    if args.smollm2:
        sources.append((f"SmolLM2-135M blocks 0-{args.blocks - 1}",
                        smollm2_layers(args.calib, args.nsamples, args.seqlen, args.blocks)))
    for label, layers in sources:
        part = [measure(name, W, XtX, args.sparsity) for name, W, XtX in layers]
        rows += part
        summaries.append(summarize(part, label))
        print(json.dumps(summaries[-1], indent=1), flush=True)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(
            {"args": vars(args), "torch_threads": torch.get_num_threads(), "summaries": summaries,
             "layers": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
