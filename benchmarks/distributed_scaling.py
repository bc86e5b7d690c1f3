"""Several ranks against one, on the same machine and the same run (issue #12).

Runs `prune` once as a single process and once under ``torchrun --standalone
--nproc-per-node N`` (gloo on a CPU, nccl on CUDA), with ``OMP_NUM_THREADS`` threads per
process, in the order 1, N, then N, 1 for each further pair (so a drift of the machine
does not favour either side). Per run it records the wall time of the whole command (end
to end: load, NaN scan, capture, the block loop, writing, and the perplexity if asked) and
the report's ``prune_seconds`` and phase totals. Then it compares the two checkpoints of
the first pair: how many pruned weight matrices differ at all (none is expected: the Grams
are float64 sums, see `GramCollector`), the fraction of weights whose zero pattern
differs, the largest relative difference of the layer errors, and the perplexities.

    python benchmarks/distributed_scaling.py --ranks 2 --threads 1 --pairs 1 \\
        --out paper_notes/distributed_scaling_cpu -- \\
        --calib ../shared/data/c4/c4_train_first1000_reserialized.jsonl --nsamples 32 \\
        --seqlen 512 --eval ../shared/data/wikitext-2-raw/wiki.valid.raw \\
        --eval-split validation --eval-seqlen 2048 --eval-windows 8 --device cpu

Everything after ``--`` goes to ``admm_prune.gpu prune`` for both runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from admm_prune.gpu.engine.report import phase_totals


def run(ranks: int, threads: int, prune_args: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "admm_prune.gpu", "prune", *prune_args, "--no-progress", "--out", str(out)]
    if ranks > 1:  # --standalone: a free rendezvous port without --master-port 0
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               *cmd[1:]]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"ranks": ranks, "threads": threads, "wall_seconds": wall,
            "prune_seconds": report["prune_seconds"], "world_size": report["world_size"],
            "phase_seconds": phase_totals(report["block_phases"]),
            "perplexity": report.get("perplexity"), "linears": report["linears"]}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    out = {}
    for f in files:
        with safe_open(str(path / f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys() if k.endswith("proj.weight")})
    return out


def compare(one: Path, many: Path, r1: dict, rn: dict) -> dict:
    a, b = tensors(one), tensors(many)
    pruned = [f"model.layers.{r['block']}.{r['name']}.weight" for r in r1["linears"]]  # not the untouched blocks
    flips = sum(int(((a[k] == 0) != (b[k] == 0)).sum()) for k in pruned)
    differ = sum(not torch.equal(a[k], b[k]) for k in pruned)
    total = sum(a[k].numel() for k in pruned)
    errors = [(x["error_pruned"], y["error_pruned"]) for x, y in zip(r1["linears"], rn["linears"])
              if x["error_pruned"] is not None]
    rel = [abs(y - x) / x for x, y in errors if x > 0]
    p1, pn = (r.get("perplexity") or {} for r in (r1, rn))
    ppl = {k: (p1[k], pn.get(k)) for k in p1 if isinstance(p1[k], (int, float))}
    return {"matrices_differing": differ, "matrices": len(pruned), "mask_flip_fraction": flips / total,
            "weights": total,
            "max_rel_layer_error_diff": max(rel) if rel else None,
            "median_rel_layer_error_diff": sorted(rel)[len(rel) // 2] if rel else None,
            "perplexity": ppl}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process")
    p.add_argument("--pairs", type=int, default=1)
    p.add_argument("--out", default=None, help="path prefix: writes OUT.json")
    args = p.parse_args(argv[:split])
    prune_args = argv[split + 1:]
    runs, compared = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            order = (1, args.ranks) if pair % 2 == 0 else (args.ranks, 1)
            done = {}
            for ranks in order:
                done[ranks] = run(ranks, args.threads, prune_args, Path(tmp) / f"p{pair}-r{ranks}")
                print(f"pair {pair}: {ranks} rank(s) x {args.threads} thread(s): "
                      f"{done[ranks]['wall_seconds']:.1f} s end to end, "
                      f"{done[ranks]['prune_seconds']:.1f} s pruning", flush=True)
            if compared is None:
                compared = compare(Path(tmp) / f"p{pair}-r1", Path(tmp) / f"p{pair}-r{args.ranks}",
                                   done[1], done[args.ranks])
            runs += [dict(pair=pair, **{k: v for k, v in done[r].items() if k != "linears"}) for r in order]
    speed = []
    for pair in range(args.pairs):
        one, many = (next(r for r in runs if r["pair"] == pair and r["ranks"] == n) for n in (1, args.ranks))
        speed.append({"pair": pair, "end_to_end": one["wall_seconds"] / many["wall_seconds"],
                      "pruning": one["prune_seconds"] / many["prune_seconds"]})
    result = {"args": vars(args), "prune_args": prune_args, "runs": runs, "speedup": speed,
              "agreement": compared}
    print(json.dumps({"speedup": speed, "agreement": compared}, indent=1))
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
