"""Peak host memory of a pruning run against model depth: the streaming engine's flat line.

Random-weight Llama checkpoints of one width (hidden 1024, intermediate 2816, 16 heads, a
1024-token vocabulary so the embeddings do not dominate, the byte-level tiny tokenizer) are
built at each depth, each in its own child process, and saved as sharded safetensors
(`save_pretrained(max_shard_size=...)`: several shards at every depth). Each one is then
pruned with ADMM-Grad by `admm-prune prune` in a fresh child process, once per allocator
setting, and the child's own peak RSS is read back from its report.json
(`peak_memory.host_max_rss_gib`, VmHWM: it starts afresh at exec). The checkpoint and the
pruned output are deleted before the next depth.

Allocator settings: `default` is glibc as it comes; `mmap128k` sets
MALLOC_MMAP_THRESHOLD_=131072, which keeps every tensor over 128 KiB out of the heap. glibc's
dynamic threshold (it rises up to 32 MiB after a large block is freed) otherwise leaves
freed tensors of a block's size in the heap, where they count in RSS for a while.

Target (issue 10): the deepest run's peak within one block's weights (+10 %) of the
shallowest run's peak, while its checkpoint is depth_max / depth_min times as large.

On a shared 2-core CPU one ADMM-Grad block of this width takes 5-17 s even at one iteration
(the Gram factorizations and the reconstruction errors dominate), so the recorded run
prunes the first K blocks at every depth (`--num-blocks`) and streams the others through
unchanged (read from the shards, staged, written): the pruning working set is the same per
block, and what depth adds is exactly the streamed blocks.

    python benchmarks/streaming_memory.py \\
        --calib ../shared/data/c4/c4_train_first1000_reserialized.jsonl --iters 1 --mask-steps 1 \\
        --num-blocks 2 --workdir /tmp/streaming_bench --out paper_notes/streaming_memory_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def build(path: str, depth: int, hidden: int, intermediate: int, heads: int, vocab: int, shard: str) -> None:
    """Child process: a random-weight Llama of `depth` blocks saved as sharded safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from admm_prune.gpu.checkpoint.models import tiny_tokenizer

    tok = tiny_tokenizer()
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_attention_heads=heads, num_key_value_heads=heads, num_hidden_layers=depth,
                         max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path, max_shard_size=shard)
    tok.save_pretrained(path)


def block_bytes(hidden: int, intermediate: int, bytes_per_weight: int = 4) -> int:
    """One decoder block's weights: q, k, v, o (hidden^2 each), gate, up, down, two norms."""
    return (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden) * bytes_per_weight


def safetensors_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (the machine is shared: say how busy it was)."""
    return [round(x, 2) for x in os.getloadavg()]


# `admm-prune` itself, then the process's VmHWM at exit: the report's figure is taken before
# the checkpoint is assembled, this one covers the whole run (assembly and report included).
CLI_WITH_PEAK = ("import sys\nfrom admm_prune.gpu.cli import main\nfrom admm_prune.gpu.engine.report import peak_rss_bytes\n"
                 "rc = main(sys.argv[1:])\nprint('exit VmHWM', peak_rss_bytes(), file=sys.stderr)\nsys.exit(rc)")


def prune(ck: Path, out: Path, args, env_extra: dict) -> dict:
    """Child process: `admm-prune prune` on `ck`; returns its report's peak RSS and times."""
    cmd = [sys.executable, "-c", CLI_WITH_PEAK, "prune", "--model", str(ck), "--method", "admm-grad",
           "--calib", args.calib, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
           "--iters", str(args.iters), "--mask-steps", str(args.mask_steps), "--eval", "none",
           "--dtype", "float32", "--device", "cpu", "--out", str(out), "--no-progress", "--reconstruct-steps", "0",
           "--num-blocks", str(args.num_blocks) if args.num_blocks else "all"]
    env = {**os.environ, **env_extra}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"prune failed (rc {proc.returncode}): {proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    exit_peak = int(proc.stderr.rsplit("exit VmHWM", 1)[1].split()[0])
    return {"peak_rss_gib": report["peak_memory"]["host_max_rss_gib"], "exit_peak_rss_gib": exit_peak / 2**30,
            "prune_seconds": report["prune_seconds"],
            "total_seconds": report["total_seconds"], "wall_seconds": wall,
            "out_safetensors_bytes": safetensors_bytes(out), "out_files": sorted(p.name for p in out.iterdir()),
            "command": " ".join(cmd[:1] + ["-m", "admm_prune.gpu"] + cmd[3:])}


ALLOCATORS = {"default": {}, "mmap128k": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", default="8,16,32,64")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--input-shard-size", default="200MB", help="max_shard_size of the built checkpoints")
    p.add_argument("--calib", required=True, help="calibration file (see admm-prune prune --calib)")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--mask-steps", type=int, default=15)
    p.add_argument("--num-blocks", type=int, default=None,
                   help="prune only the first K blocks at every depth (the rest are read, staged and written "
                        "unchanged); default: all")
    p.add_argument("--allocators", default="default,mmap128k", help=f"any of {sorted(ALLOCATORS)}")
    p.add_argument("--workdir", default="/tmp/streaming_bench", help="checkpoints live here (deleted after)")
    p.add_argument("--out", default=None, help="path prefix: writes OUT.json and OUT.md")
    args = p.parse_args(argv)

    depths = [int(d) for d in args.depths.split(",")]
    allocators = [a for a in args.allocators.split(",") if a]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    blk = block_bytes(args.hidden, args.intermediate)
    import admm_prune.gpu as engine

    rows = []
    for depth in depths:
        ck, out = work / f"llama-{depth}", work / f"pruned-{depth}"
        shutil.rmtree(ck, ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--build", str(ck), str(depth), str(args.hidden),
                        str(args.intermediate), str(args.heads), str(args.vocab), args.input_shard_size],
                       check=True)
        build_s = time.perf_counter() - t0
        shards = len(list(ck.glob("*.safetensors")))
        for alloc in allocators:
            shutil.rmtree(out, ignore_errors=True)
            load_before = load_average()
            res = prune(ck, out, args, ALLOCATORS[alloc])
            row = {"depth": depth, "allocator": alloc, "checkpoint_bytes": safetensors_bytes(ck),
                   "input_shards": shards, "build_seconds": build_s, "load_before": load_before,
                   "load_after": load_average(), **res}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("command", "out_files")}), flush=True)
            shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(ck, ignore_errors=True)

    lines = [f"Random-weight Llama, hidden {args.hidden}, intermediate {args.intermediate}, {args.heads} heads, "
             f"vocab {args.vocab}, float32; one block = {blk / 2**30:.4f} GiB ({blk / 1e6:.1f} MB). "
             f"ADMM-Grad 50 % on {f'the first {args.num_blocks} blocks' if args.num_blocks else 'every block'} "
             f"(the rest streamed through unchanged), {args.iters} iterations ({args.mask_steps} mask steps), "
             f"{args.nsamples} x "
             f"{args.seqlen} calibration tokens, --eval none, cpu, default torch threads. Peak RSS = the "
             f"child's VmHWM from report.json (taken before the checkpoint is assembled); peak at exit = "
             f"its VmHWM when the process ends.", ""]
    for alloc in allocators:
        sub = [r for r in rows if r["allocator"] == alloc]
        base, base_exit = sub[0]["peak_rss_gib"], sub[0]["exit_peak_rss_gib"]
        lines += [f"Allocator `{alloc}` ({ALLOCATORS[alloc] or 'glibc defaults'}):", "",
                  "| blocks | input shards | checkpoint (GB) | peak RSS (GiB) | delta vs first (blocks) "
                  "| peak at exit (GiB) | delta (blocks) | prune (s) | child wall (s) | load avg before -> after |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in sub:
            lines.append(f"| {r['depth']} | {r['input_shards']} | {r['checkpoint_bytes'] / 1e9:.3f} | "
                         f"{r['peak_rss_gib']:.3f} | {(r['peak_rss_gib'] - base) * 2**30 / blk:+.2f} | "
                         f"{r['exit_peak_rss_gib']:.3f} | {(r['exit_peak_rss_gib'] - base_exit) * 2**30 / blk:+.2f} | "
                         f"{r['prune_seconds']:.0f} | {r['wall_seconds']:.0f} | "
                         f"{r['load_before'][0]} -> {r['load_after'][0]} |")
        lines.append("")
    markdown = "\n".join(lines)
    print(markdown)
    if args.out:
        result = {"args": vars(args), "block_bytes": blk, "engine": str(Path(engine.__path__[0])), "rows": rows}
        Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        Path(args.out).with_suffix(".md").write_text(markdown)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--build":
        a = sys.argv[2:]
        build(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]), int(a[5]), a[6])
        raise SystemExit(0)
    raise SystemExit(main())
