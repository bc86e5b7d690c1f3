"""ALPS beside ADMM-Grad, layer by layer: the undamped layer error, the mask, the time.

For each linear of SmolLM2-135M's first `--blocks` blocks (the dense weights and the Grams
each one sees, captured as in `polish_layers.py`) and each setting in ``--settings``
(sparsities and N:M patterns), it runs every variant of `VARIANTS` through
``admm_prune.gpu.prune_layer`` and records ||X (W^ - W)^T||^2 / ||X W^T||^2, the solver
time, ALPS's iteration count and the share of mask entries where ALPS and admm-grad differ.

    OMP_NUM_THREADS=1 python benchmarks/alps_layers.py --blocks 4 --nsamples 32 --seqlen 512 \\
        --calib ../shared/data/c4/c4_train_first1000_reserialized.jsonl --settings 0.7,0.5,2:4 \\
        --out paper_notes/alps_layers
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import admm_prune.gpu as G
from polish_layers import smollm2_layers

#: name -> prune_layer keyword arguments (paper_notes/alps_layers.json predates the two
#: "admm-grad damp 0.01" / "group layer" rows: they were added for the confound check)
VARIANTS = {
    "admm-grad": dict(method="admm-grad"),
    "admm-grad+polish10": dict(method="admm-grad", polish_iters=10),
    "admm-grad damp 0.01": dict(method="admm-grad", damp=0.01),
    "admm-grad group layer": dict(method="admm-grad", group="layer"),
    "alps": dict(method="alps"),
    "alps damp 0.1": dict(method="alps", damp=0.1),
    "alps group layer": dict(method="alps", group="layer"),
}


def setting(text: str):
    """(sparsity, pattern) of a ``--settings`` entry: ``0.7`` or ``2:4``."""
    return (None, text) if ":" in text else (float(text), "unstructured")


def measure(name, W, XtX, text):
    sparsity, pattern = setting(text)
    row, masks = {"layer": name, "shape": list(W.shape), "setting": text}, {}
    for label, kw in VARIANTS.items():
        t0 = time.perf_counter()
        r = G.prune_layer(W, XtX, sparsity, pattern=pattern, track_objective=False, **kw)
        row[f"seconds {label}"] = time.perf_counter() - t0
        row[f"error {label}"] = G.reconstruction_error(W, r.W, XtX)
        row[f"iters {label}"] = len(r.history)
        masks[label] = r.mask
    row["mask differs alps vs admm-grad"] = float((masks["alps"] != masks["admm-grad"]).float().mean())
    return row


def summarize(rows, text):
    out = {"setting": text, "n": len(rows)}
    base_e = np.array([r["error admm-grad"] for r in rows])
    base_t = sum(r["seconds admm-grad"] for r in rows)
    for label in VARIANTS:
        e = np.array([r[f"error {label}"] for r in rows])
        out[label] = {
            "mean_error": float(e.mean()),
            "mean_ratio_to_admm_grad": float(np.mean(e / base_e)),
            "layers_below_admm_grad": int(np.sum(e < base_e)),
            "time_vs_admm_grad": float(sum(r[f"seconds {label}"] for r in rows) / base_t),
            "mean_iters": float(np.mean([r[f"iters {label}"] for r in rows])),
        }
    out["mean_mask_differs"] = float(np.mean([r["mask differs alps vs admm-grad"] for r in rows]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib", default="../shared/data/c4/c4_train_first1000_reserialized.jsonl")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--from-block", type=int, default=0, help="measure blocks from this one on (earlier: captured only)")
    p.add_argument("--settings", default="0.7")
    p.add_argument("--out", default=None, help="path prefix: writes OUT.json")
    args = p.parse_args(argv)
    layers = [(name, W, XtX) for name, W, XtX in smollm2_layers(args.calib, args.nsamples, args.seqlen, args.blocks)
              if int(name.split()[1]) >= args.from_block]
    rows, summaries = [], []
    for text in args.settings.split(","):
        part = [measure(name, W, XtX, text) for name, W, XtX in layers]
        rows += part
        summaries.append(summarize(part, text))
        print(json.dumps(summaries[-1], indent=1), flush=True)
        if args.out:  # after every setting: a job stopped early keeps what it measured
            Path(args.out + ".json").write_text(json.dumps(
                {"args": vars(args), "torch_threads": torch.get_num_threads(), "summaries": summaries,
                 "layers": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
