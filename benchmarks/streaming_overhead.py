"""What streaming costs: `run_prune` reading blocks from the shards against the same call on a
model already in memory, interleaved in one process.

A (streamed): ``run_prune(cfg)`` with ``cfg.model`` the checkpoint folder; the skeleton is
built on the meta device, each block is read from the safetensors shards, pruned, staged and
released, and the checkpoint is assembled in ``--out``. B (in memory): the model is loaded
first (`models.load_model`, timed apart as "load"), then ``run_prune(cfg, model=...)`` takes
its blocks from memory through the same loop and also writes ``--out``. The runs alternate
A B A B ... in one process on the same calibration windows (same seed: the same draw), and
the two outputs are compared tensor for tensor. One untimed warm-up opens the model both
ways first (imports, tokenizer). Torch runs on one thread so that the runs
are comparable on a shared machine; run it when the machine is otherwise quiet.

Defaults are the `bench` protocol's calibration (64 x 512 C4 tokens, seed 0) on the embedded
SmolLM2-135M in bfloat16, ADMM-Grad at 50 %, no perplexity. On a 2-core CPU at one thread a
bfloat16 block of that calibration takes about 70 s (the two forwards over 64 x 512 tokens
dominate), 35 min a run; the recorded run prunes the first 2 blocks (`--num-blocks 2`) while
both engines still read (streamed) and write (both) all 30. What streaming adds is a fixed
cost per block read, so the difference A - B is the full run's overhead.

    python benchmarks/streaming_overhead.py \\
        --calib ../shared/data/c4/c4_train_first1000_reserialized.jsonl \\
        --num-blocks 2 --workdir /tmp/streaming_bench --out paper_notes/streaming_overhead_cpu
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from admm_prune.gpu.checkpoint import models
from admm_prune.gpu.engine import pipeline
from admm_prune.gpu.config import DTYPES, PruneConfig
from admm_prune.gpu.engine.report import versions


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(p)))
    return out


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    return ta.keys() == tb.keys() and all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta)


def streaming_components(path: str, dtype, repeats: int) -> dict:
    """Seconds of what only the streamed run does (median of `repeats`): open the checkpoint,
    scan it, read every block from the shards; and of what only the in-memory run does: load."""
    from admm_prune.gpu.checkpoint.sources import open_model

    times: dict[str, list[float]] = {"open_seconds": [], "scan_seconds": [], "read_blocks_seconds": [],
                                     "load_model_seconds": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        source, _tok = open_model(path, dtype)
        t1 = time.perf_counter()
        source.check_finite()
        t2 = time.perf_counter()
        for i in range(source.num_blocks):
            with source.block(i):
                pass
        t3 = time.perf_counter()
        del source
        models.load_model(path, dtype=dtype)
        t4 = time.perf_counter()
        for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[k].append(v)
    blocks = open_model(path, dtype)[0].num_blocks
    return {"blocks": blocks, **{k: statistics.median(v) for k, v in times.items()}, "all": times}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="hub id or local dir (default: the embedded SmolLM2)")
    p.add_argument("--calib", required=True, help="calibration file (see admm-prune prune --calib)")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="admm-grad")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--num-blocks", type=int, default=None,
                   help="prune only the first K blocks (both engines still read and write every block)")
    p.add_argument("--pairs", type=int, default=2, help="A B pairs, interleaved")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the component timings")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--workdir", default="/tmp/streaming_bench", help="the runs' --out folders (deleted after)")
    p.add_argument("--out", default=None, help="path prefix: writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)

    path = str(models.resolve_model(args.model))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    def cfg(engine: str, k: int, model=None) -> PruneConfig:
        out = work / f"overhead-{engine}-{k}"
        shutil.rmtree(out, ignore_errors=True)
        return PruneConfig(model=model, method=args.method, sparsity=args.sparsity, calib=args.calib,
                           nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, eval=None,
                           dtype=args.dtype, device="cpu", out=str(out), progress=False,
                           num_blocks=args.num_blocks, reconstruct_steps=0)  # the paper's prune

    # Warm-up, untimed: the first streamed open imports accelerate, builds the tokenizer, etc.
    # (one-time costs of the process, several seconds, that would otherwise land on run 1).
    from admm_prune.gpu.checkpoint.sources import open_model

    open_model(path, DTYPES[args.dtype])
    models.load_model(path, dtype=DTYPES[args.dtype])

    components = streaming_components(path, DTYPES[args.dtype], args.repeats)
    print(json.dumps(components), flush=True)

    rows = []
    for k in range(args.pairs):
        for engine in ("streamed", "in-memory"):
            load_before = [round(x, 2) for x in os.getloadavg()]
            t0 = time.perf_counter()
            if engine == "streamed":
                c = cfg(engine, k, model=path)
                load_s = 0.0
                report = pipeline.run_prune(c)
            else:
                model, tok, _ = models.load_model(path, dtype=DTYPES[args.dtype])
                load_s = time.perf_counter() - t0
                c = cfg(engine, k)
                report = pipeline.run_prune(c, model=model, tokenizer=tok)
                del model
            wall = time.perf_counter() - t0
            rows.append({"pair": k, "engine": engine, "load_seconds": load_s, "prune_seconds": report.prune_seconds,
                         "run_prune_total_seconds": report.total_seconds, "end_to_end_seconds": wall,
                         "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
                         "out": c.out})
            print(json.dumps(rows[-1]), flush=True)
    lines = [f"What streaming adds, measured alone (median of {args.repeats}; no pruning): open the checkpoint "
             f"(meta skeleton, tensors outside the blocks, tokenizer) {components['open_seconds']:.2f} s, scan every "
             f"shard for NaN/Inf {components['scan_seconds']:.2f} s, read + cast all {components['blocks']} blocks "
             f"{components['read_blocks_seconds']:.2f} s; the in-memory engine's load instead: "
             f"{components['load_model_seconds']:.2f} s.", ""]
    if not rows:
        print("\n".join(lines))
        if args.out:
            Path(args.out).with_suffix(".json").write_text(json.dumps({"args": vars(args), "model_path": path,
                                                                        "components": components}, indent=2) + "\n")
        return 0
    identical = same_tensors(Path(rows[0]["out"]), Path(rows[1]["out"]))
    for r in rows:
        shutil.rmtree(r["out"], ignore_errors=True)

    def median(engine, key):
        return statistics.median(r[key] for r in rows if r["engine"] == engine)

    ratio_prune = median("streamed", "prune_seconds") / median("in-memory", "prune_seconds")
    ratio_e2e = median("streamed", "end_to_end_seconds") / median("in-memory", "end_to_end_seconds")
    extra_e2e = median("streamed", "end_to_end_seconds") - median("in-memory", "end_to_end_seconds")
    lines += [f"Model `{args.model or 'smollm2'}` ({args.dtype}, read from `{path}`), {args.method} at "
             f"{args.sparsity}, {args.nsamples} x {args.seqlen} calibration tokens from `{args.calib}` (seed "
             f"{args.seed}), {f'first {args.num_blocks} blocks pruned (every block read and written), ' if args.num_blocks else ''}"
             f"no perplexity, cpu, torch threads = {args.threads}; runs interleaved A B in one "
             f"process, each writing its checkpoint to --out.", "",
             "| run | engine | load (s) | prune_seconds | run_prune total (s) | end to end (s) | load avg before -> after |",
             "|---:|---|---:|---:|---:|---:|---|"]
    lines += [f"| {i + 1} | {r['engine']} | {r['load_seconds']:.1f} | {r['prune_seconds']:.1f} | "
              f"{r['run_prune_total_seconds']:.1f} | {r['end_to_end_seconds']:.1f} | "
              f"{r['load_before'][0]} -> {r['load_after'][0]} |" for i, r in enumerate(rows)]
    lines += ["", f"Median streamed / in-memory: prune_seconds {ratio_prune:.3f}, end to end {ratio_e2e:.3f}. "
              f"Streamed minus in-memory, end to end: {extra_e2e:+.1f} s. "
              f"First pair's checkpoints tensor-for-tensor identical: {identical}.", ""]
    markdown = "\n".join(lines)
    print(markdown)
    if args.out:
        result = {"args": vars(args), "model_path": path, "versions": versions(),
                  "engine": str(Path(pipeline.__file__).parent), "rows": rows, "ratio_prune_seconds": ratio_prune,
                  "ratio_end_to_end": ratio_e2e, "components": components, "extra_end_to_end_seconds": extra_e2e,
                  "identical_checkpoints": identical}
        Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        Path(args.out).with_suffix(".md").write_text(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
