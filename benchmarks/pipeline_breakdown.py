"""Where a whole-model pruning run spends its time: the solver against everything else.

For each method, on the same model and the same calibration windows (drawn once), the
dense weights are restored and the model is pruned with `prune_model`. The solver time is
the sum of the per-linear solve times the engine records (the `prune_shared` calls); the
rest is the capture of block inputs, the block forwards, the Gram accumulation (fp32), the
reconstruction-error bookkeeping and the weight copies. Run it on a quiet machine: the
methods run one after another in the same process, so their ratios are comparable.

    python benchmarks/pipeline_breakdown.py \\
        --calib ../shared/data/c4/c4_train_first1000_reserialized.jsonl --nsamples 64 --seqlen 512 \\
        --dtype bfloat16 --methods wanda,sparsegpt,admm,admm-grad --out runs/breakdown
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from admm_prune.gpu.data import corpus as data
from admm_prune.gpu.checkpoint import models
from admm_prune.gpu.engine import pipeline
from admm_prune.gpu.config import DTYPES, PruneConfig
from admm_prune.gpu.engine.report import versions, write_atomic


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="hub id or local dir (default: the embedded SmolLM2)")
    p.add_argument("--calib", required=True, help="calibration file (see admm-prune prune --calib)")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--methods", default="wanda,sparsegpt,admm,admm-grad")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="path prefix: writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    model, tok, _ = models.load_model(args.model, dtype=DTYPES[args.dtype])
    model.eval()
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calib, info = data.sample_calibration(data.load_texts(args.calib, split="train"), tok,
                                          args.nsamples, args.seqlen, args.seed)
    rows = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        model.load_state_dict(dense)
        cfg = PruneConfig(method=method, sparsity=args.sparsity, nsamples=args.nsamples,
                          seqlen=args.seqlen, dtype=args.dtype, device=args.device, eval=None,
                          progress=False, reconstruct_steps=0)  # the paper's prune
        start = time.perf_counter()
        records, _ = pipeline.prune_model(model, calib, cfg)
        total = time.perf_counter() - start
        solve = sum(r.seconds for r in records)
        rows.append({"method": method, "total_seconds": total, "solver_seconds": solve,
                     "rest_seconds": total - solve})
        logging.info("%s", rows[-1])
    lines = [f"Model `{args.model or 'smollm2'}` ({args.dtype}), {info['nsamples']} x {args.seqlen} "
             f"calibration tokens from `{args.calib}` (seed {args.seed}), sparsity {args.sparsity}.", "",
             "| method | total (s) | solver (s) | forwards, Grams, bookkeeping (s) |", "|---|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['total_seconds']:.1f} | {r['solver_seconds']:.1f} | {r['rest_seconds']:.1f} |"
              for r in rows]
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    if args.out:
        result = {"args": vars(args), "calibration": info, "versions": versions(), "rows": rows}
        write_atomic(Path(args.out + ".json"), json.dumps(result, indent=2, default=str))
        write_atomic(Path(args.out + ".md"), markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
