"""Time and peak device memory of the layer-by-layer engine on LLaMA-7B and LLaMA-2-70B block shapes.

Random-weight models with the real block shapes (hidden, intermediate, heads, KV heads) and
only a few blocks, calibrated with the paper's 128 x 2048 random tokens, pruned by each
method. Measures what a full model run costs per block and what a block needs on the
device: weights of one block + calibration activations + one Gram and its factor. (Random
weights make the perplexity meaningless; this is about time and memory only.)

    python benchmarks/pipeline_shapes.py --device cuda --shapes llama7b,llama2-70b --out $OUT/shapes
    python benchmarks/pipeline_shapes.py --device cpu --shapes tiny       # a smoke test
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict

import torch
import transformers

from admm_prune.gpu.engine import pipeline
from admm_prune.gpu.config import DTYPES, PruneConfig, resolve_device
from admm_prune.gpu.engine.report import mean_layer_error

SHAPES = {
    # name: (hidden, intermediate, heads, kv heads)
    "tiny": (64, 128, 4, 2),
    "smollm2": (576, 1536, 9, 3),
    "llama7b": (4096, 11008, 32, 32),
    "llama2-70b": (8192, 28672, 64, 8),
}


def random_llama(shape: str, blocks: int, dtype: torch.dtype):
    hidden, inter, heads, kv = SHAPES[shape]
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
        num_key_value_heads=kv, num_hidden_layers=blocks, max_position_embeddings=4096)
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(config).to(dtype)
    return model.eval()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="llama7b,llama2-70b")
    p.add_argument("--methods", default="wanda,sparsegpt,admm-grad")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    p.add_argument("--offload-activations", action="store_true")
    p.add_argument("--out", default=None, help="path prefix for .json and .md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = resolve_device(args.device)
    rows = []
    for shape in args.shapes.split(","):
        model = random_llama(shape, args.blocks, DTYPES[args.dtype])
        dense = {k: v.clone() for k, v in model.state_dict().items()}
        gen = torch.Generator().manual_seed(0)
        calib = torch.randint(0, 32000, (args.nsamples, args.seqlen), generator=gen)
        for method in args.methods.split(","):
            model.load_state_dict(dense)
            cfg = PruneConfig(method=method, nsamples=args.nsamples, seqlen=args.seqlen,
                              device=str(device), dtype=args.dtype, eval=None, progress=False,
                              offload_activations=args.offload_activations, reconstruct_steps=0)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            records, block_seconds = pipeline.prune_model(model, calib, cfg)
            total = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            row = {"shape": shape, "method": method, "blocks": args.blocks, "nsamples": args.nsamples,
                   "seqlen": args.seqlen, "dtype": args.dtype, "device": str(device),
                   "seconds_total": total, "seconds_per_block": block_seconds,
                   "peak_device_gib": peak, "offload_activations": args.offload_activations,
                   "mean_layer_error": mean_layer_error(r.error_pruned for r in records),
                   "sparsity": sum(r.sparsity for r in records) / len(records)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model, dense
    lines = ["| shape | method | s/block (last) | peak device GiB | mean layer error | sparsity |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        peak = "—" if r["peak_device_gib"] is None else f"{r['peak_device_gib']:.2f}"
        lines.append(f"| {r['shape']} | {r['method']} | {r['seconds_per_block'][-1]:.2f} | {peak} | "
                     f"{'—' if r['mean_layer_error'] is None else format(r['mean_layer_error'], '.4f')} | "
                     f"{r['sparsity']:.4f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump({"rows": rows, "torch": torch.__version__, "transformers": transformers.__version__,
                       "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}, f, indent=2)
        with open(args.out + ".md", "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
