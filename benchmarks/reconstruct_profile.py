"""Where one block's reconstruction spends its time, against the block's prune (CPU or GPU).

On one decoder block of a model (default the embedded SmolLM2, block 0), on the same
calibration windows, each part timed alone (best of `--repeats`): what the prune does without
reconstruction (Grams and solve, the forward that makes the next block's inputs) and what the
reconstruction adds (the dense stream's forward, the check windows' error pass, the Adam steps;
its error pass after the tuning is the next-inputs forward). Also the full-window error pass
the check replaced, and the steps split into forward+backward and the optimizer.

    OMP_NUM_THREADS=1 python benchmarks/reconstruct_profile.py \\
        --calib ../shared/data/c4/c4_train_first1000_reserialized.jsonl --out runs/reconstruct_profile
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from admm_prune.gpu.checkpoint import models
from admm_prune.gpu.config import DTYPES, PruneConfig
from admm_prune.gpu.data import corpus as data
from admm_prune.gpu.engine.blocks import prune_block
from admm_prune.gpu.engine.calibration import capture_block_inputs, run_block
from admm_prune.gpu.engine.distributed import Dist
from admm_prune.gpu.engine.reconstruct import CHECK_WINDOWS, DenseStream, output_error, reconstruct_block
from admm_prune.gpu.engine.report import versions, write_atomic


def best(fn, repeats: int, reset=None) -> float:
    """The shortest of `repeats` timed calls of `fn` (`reset()` before each, untimed)."""
    times = []
    for _ in range(repeats):
        if reset is not None:
            reset()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--calib", required=True)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--block", type=int, default=0)
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="path prefix: writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    model, tok, _ = models.load_model(args.model, dtype=DTYPES[args.dtype])
    model.eval()
    calib, _ = data.sample_calibration(data.load_texts(args.calib, split="train"), tok, args.nsamples, args.seqlen, 0)
    inps, kwargs = capture_block_inputs(model, calib, device, device, progress=False)
    with torch.no_grad():
        for block in model.model.layers[:args.block]:
            inps = run_block(block, inps, kwargs.at(0), device)
    block, kw = model.model.layers[args.block].to(device), kwargs.at(args.block)
    dense_state = {k: v.clone() for k, v in block.state_dict().items()}
    dense = DenseStream(inps, device)
    cfg = PruneConfig(model=args.model, method="admm-grad", sparsity=args.sparsity, nsamples=args.nsamples,
                      seqlen=args.seqlen, eval=None, device=str(device), progress=False)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = {}

    def timed(name, fn, reset=None):
        rows[name] = best(lambda: (fn(), sync()), args.repeats, reset)

    timed("dense stream forward (all windows)", lambda: run_block(block, inps, kw, device))
    dense.advance(block, kw)
    timed("prune_block: Gram forward, Grams, solve", lambda: prune_block(block, args.block, inps, kw, cfg, args.sparsity, device),
          lambda: block.load_state_dict(dense_state))
    pruned = {k: v.clone() for k, v in block.state_dict().items()}
    timed("next inputs forward (all windows)", lambda: run_block(block, inps, kw, device))
    timed(f"error pass, all {inps.shape[0]} windows (before this change)",
          lambda: output_error(block, inps, dense.targets, kw, device, Dist()))
    timed(f"error pass, {CHECK_WINDOWS} check windows",
          lambda: output_error(block, inps, dense.targets, kw, device, Dist(), counted=CHECK_WINDOWS))
    out = torch.empty_like(inps)
    names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    timed(f"reconstruct_block ({args.steps} steps x {args.batch} windows, all passes)",
          lambda: reconstruct_block(block, args.block, names, inps, dense.targets, kw, device, steps=args.steps,
                                    lr=args.lr, batch=args.batch, seed=0, out=out),
          lambda: block.load_state_dict(pruned))
    base = rows["prune_block: Gram forward, Grams, solve"] + rows["next inputs forward (all windows)"]
    extra = (rows["dense stream forward (all windows)"] + rows[f"reconstruct_block ({args.steps} steps x "
                                                                   f"{args.batch} windows, all passes)"]
             - rows["next inputs forward (all windows)"])
    rows["block without reconstruction (prune + next inputs)"] = base
    rows["block with reconstruction (+ dense forward + reconstruct_block - next inputs)"] = base + extra
    lines = [f"Block {args.block} of `{args.model or 'smollm2'}` ({args.dtype}, {device}), {args.nsamples} x "
             f"{args.seqlen} calibration tokens, admm-grad {args.sparsity}; best of {args.repeats}, "
             f"{torch.get_num_threads()} thread(s).", "", "| part | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in rows.items()]
    lines += ["", f"Ratio with / without reconstruction for this block: **{(base + extra) / base:.2f}**"]
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    if args.out:
        write_atomic(Path(args.out + ".json"), json.dumps({"args": vars(args), "seconds": rows,
                                                           "versions": versions()}, indent=2))
        write_atomic(Path(args.out + ".md"), markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
