"""A random-weight LLaMA checkpoint with real block shapes, for timing the CLI end to end where
no model can be downloaded: config, a byte-level tokenizer (`models.tiny_tokenizer`), one
safetensors shard per decoder block written as it is made (host memory: one block), and a
calibration file of random-word documents (half of them longer than 2048 tokens).

    python benchmarks/random_checkpoint.py --shape llama7b --out /tmp/llama7b --device cuda
    python benchmarks/random_checkpoint.py --shape tiny --blocks 2 --out /tmp/tiny   # a smoke test

Weights: normal(0, 0.02) (the HF initializer's), norms 1, untied lm_head, vocabulary 32000.
Random weights make perplexity and layer errors meaningless; this is about time and memory.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_shapes import SHAPES  # noqa: E402

from admm_prune.gpu.checkpoint.models import tiny_tokenizer  # noqa: E402

VOCAB = 32000


def block_shapes(hidden: int, inter: int, heads: int, kv: int) -> dict[str, tuple[int, ...]]:
    kv_dim = kv * (hidden // heads)
    return {"self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (kv_dim, hidden),
            "self_attn.v_proj.weight": (kv_dim, hidden), "self_attn.o_proj.weight": (hidden, hidden),
            "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
            "mlp.down_proj.weight": (hidden, inter), "input_layernorm.weight": (hidden,),
            "post_attention_layernorm.weight": (hidden,)}


def write_checkpoint(shape: str, blocks: int, out: Path, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    hidden, inter, heads, kv = SHAPES[shape]
    out.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter,
                                      num_attention_heads=heads, num_key_value_heads=kv, num_hidden_layers=blocks,
                                      max_position_embeddings=4096, tie_word_embeddings=False)
    config.dtype = dtype
    config.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    gen = torch.Generator(device=device).manual_seed(seed)

    def tensor(shape_):
        if len(shape_) == 1:
            return torch.ones(shape_, dtype=dtype)
        return (torch.randn(shape_, generator=gen, device=device) * 0.02).to(dtype).cpu()

    shards = [("rest", {"model.embed_tokens.weight": (VOCAB, hidden), "model.norm.weight": (hidden,),
                        "lm_head.weight": (VOCAB, hidden)})]
    shards += [(f"block {i}", {f"model.layers.{i}.{k}": s for k, s in block_shapes(hidden, inter, heads, kv).items()})
               for i in range(blocks)]
    weight_map, total = {}, 0
    for n, (_, names) in enumerate(shards):
        file = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: tensor(s) for k, s in names.items()}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return {"shape": shape, "blocks": blocks, "bytes": total}


def write_calibration(path: Path, docs: int = 300, seed: int = 0):
    """`docs` documents of random words, 1,000 to 6,000 bytes (one token per byte)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(2000)]
    with open(path, "w") as f:
        for _ in range(docs):
            target, text = rng.randint(1000, 6000), []
            while sum(len(w) + 1 for w in text) < target:
                text.append(rng.choice(words))
            f.write(json.dumps({"text": " ".join(text)}) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama7b", choices=sorted(SHAPES))
    p.add_argument("--blocks", type=int, default=None, help="decoder blocks (default: the model's: 32 for llama7b)")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu", help="where the random numbers are drawn")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    a = p.parse_args(argv)
    blocks = a.blocks or {"llama7b": 32, "llama2-70b": 80}.get(a.shape, 2)
    t0 = time.perf_counter()
    info = write_checkpoint(a.shape, blocks, Path(a.out), a.device, getattr(torch, a.dtype))
    write_calibration(Path(a.out) / "calib.jsonl")
    print(json.dumps({**info, "seconds": time.perf_counter() - t0}), flush=True)


if __name__ == "__main__":
    main()
