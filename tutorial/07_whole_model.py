# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 7: pruning a whole model
#
# Chapters 1-6 pruned one layer given its Gram matrix. A model has many layers, and the
# Gram of each comes from running calibration text through the model. The engine that does
# this is `admm_prune.gpu.engine.pipeline`; this chapter runs it, checks by hand what it computes
# for one layer, compares perplexity before and after pruning, and opens the checkpoint it
# saves.
#
# Full mode prunes the embedded SmolLM2-135M-Instruct (the package's default model) on a
# little C4 text and evaluates on WikiText-2 validation; sizes are small so that it runs in
# a few minutes on a CPU. Fast mode prunes a tiny random LLaMA built in code (byte-level
# tokenizer) on a generated corpus: the numbers mean nothing there, the code path is the
# same.

# %%
import json
import math

from common import FAST, OUT, DATA, np, plt, save

import torch
import admm_prune.reference as R
from admm_prune.gpu.data import corpus as data
from admm_prune.gpu.checkpoint import models
from admm_prune.gpu.engine import pipeline
from admm_prune.gpu.config import PruneConfig
from admm_prune.gpu.evaluation.evaluate import load_eval_windows, perplexity


# %% [markdown]
# ## 7.1 The configuration
#
# A run is one frozen `PruneConfig` (the command line `admm-prune prune` only fills one in)
# and one call, `run_prune(cfg)`. `model=None` means the embedded SmolLM2; a model object
# can also be passed in directly, as fast mode does with the tiny one.

# %%
if FAST:
    corpus = OUT / "07_tiny_corpus"
    corpus.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    words = "the of and to in a is that for it as was with be by on not he this are or his from".split()
    docs = [" ".join(rng.choice(words, size=int(rng.integers(20, 200)))) for _ in range(40)]
    (corpus / "calib.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in docs))
    (corpus / "eval.txt").write_text("\n".join(docs[:20]))
    calib, evalset = str(corpus / "calib.jsonl"), str(corpus / "eval.txt")
    sizes = dict(nsamples=4, seqlen=32, eval_windows=6)

    def fresh_model():
        return models.tiny_model("llama")  # same seed, same weights every time
else:
    calib = str(DATA / "c4" / "c4_train_first1000_reserialized.jsonl")
    evalset = str(DATA / "wikitext-2-raw" / "wiki.valid.raw")
    sizes = dict(nsamples=8, seqlen=512, eval_windows=8)

    def fresh_model():
        model, tok, _ = models.load_model(None)  # the embedded SmolLM2, converted once to a cache
        return model, tok


def config(method, out=None, evaluate=True):
    # layer_errors=True: Wanda alone needs no full Gram, but this chapter compares its errors.
    # reconstruct_steps=0: the paper's method. admm-grad's default recipe also tunes each block
    # after pruning it (chapter 9), which would move the weights away from the solver's result.
    return PruneConfig(model=None, method=method, sparsity=0.5, calib=calib,
                       eval=evalset if evaluate else None, out=out, overwrite=True,
                       device="cpu", progress=False, layer_errors=True, reconstruct_steps=0, **sizes)


print(config("admm-grad"))

# %% [markdown]
# ## 7.2 The engine, and one layer checked by hand
#
# `run_prune` (see `gpu/engine/pipeline.py`): it samples calibration windows, computes the
# dense perplexity, then walks through the decoder blocks in order:
#
# 1. the first block's inputs are captured once, with a forward pre-hook that keeps every
#    argument the block needs (position embeddings, masks) and stops the forward pass;
# 2. per block, the linears (every `nn.Linear` of the block, or those `--targets`/`--ignore`
#    choose) are grouped by the input they read, found from one sample's forward: linears
#    handed the very same tensor share a Gram. Then forward hooks accumulate $X^\top X$
#    (float32 products, a float64 sum) over every calibration token: 4 Gram matrices for
#    7 linears, because q/k/v read one input and gate/up another;
# 3. each group is pruned with `prune_shared` (one factorization per Gram), and the weights
#    are written back into the model;
# 4. the *pruned* block is run again on its inputs to make the next block's inputs, so
#    each block is calibrated on what the already-pruned blocks before it produce.
#
# Only one block and its activations are on the compute device at a time.
# `callback(block_idx, name, W_dense, XtX, result)` is called after each linear; we use it
# to keep block 0's `q_proj`.

# %%
seen = {}


def keep_q_proj(block_idx, name, W_dense, XtX, result):
    if block_idx == 0 and name == "self_attn.q_proj":
        seen.update(W=W_dense.clone(), XtX=XtX.clone(), result=result)


model, tok = fresh_model()
out_dir = OUT / ("07_pruned_tiny" if FAST else "07_pruned_smollm2")
report = pipeline.run_prune(config("admm-grad", out=str(out_dir)), model=model, tokenizer=tok,
                            callback=keep_q_proj)
print(f"pruned {len(report.linears)} linears in {len(report.block_seconds)} blocks; "
      f"calibration: {report.calibration['nsamples']} windows x {report.calibration['seqlen']} tokens "
      f"({report.calibration['mode']})")

# %% [markdown]
# Now the same Gram by hand. Draw the calibration windows again (same seed, so the same
# windows: the fingerprint must match the report's), run a fresh dense copy of the model up
# to block 0's `q_proj`, and sum $x x^\top$ over its inputs, in float64. The pipeline summed
# in float32 over thousands of tokens, hence the tolerance.

# %%
texts = data.load_texts(calib, split="train")
ids, info = data.sample_calibration(texts, tok, sizes["nsamples"], sizes["seqlen"], seed=0)
assert info["sha256"] == report.calibration["sha256"]


class Stop(Exception):
    pass


dense_model, _ = fresh_model()
q_proj = dense_model.model.layers[0].self_attn.q_proj
XtX_hand = torch.zeros(q_proj.in_features, q_proj.in_features, dtype=torch.float64)


def grab_input(module, args):
    global XtX_hand
    x = args[0].reshape(-1, args[0].shape[-1]).double()
    XtX_hand += x.T @ x
    raise Stop  # block 0's q_proj input is all we need


handle = q_proj.register_forward_pre_hook(grab_input)
with torch.no_grad():
    for i in range(ids.shape[0]):
        try:
            dense_model(input_ids=ids[i:i + 1], use_cache=False)
        except Stop:
            pass
handle.remove()
torch.testing.assert_close(seen["XtX"].double(), XtX_hand, rtol=1e-4,
                           atol=1e-4 * float(XtX_hand.diagonal().max()))
assert torch.equal(seen["W"], q_proj.weight.detach())  # the callback saw the dense weights

# What was written back is the solver's result, and the report's error is chapter 1's formula.
written = model.model.layers[0].self_attn.q_proj.weight.detach()
assert torch.equal(written, seen["result"].W.to(written.dtype))
W64, Wp64, XtX64 = seen["W"].double().numpy(), written.double().numpy(), XtX_hand.numpy()
row = next(r for r in report.linears if r["block"] == 0 and r["name"] == "self_attn.q_proj")
e_hand = float(np.sum(((Wp64 - W64) @ XtX64) * (Wp64 - W64)) / np.sum((W64 @ XtX64) * W64))
print(f"block 0 q_proj: relative error in the report {row['error_pruned']:.6f}, by hand {e_hand:.6f}")
assert math.isclose(row["error_pruned"], e_hand, rel_tol=1e-3)
del dense_model

# %% [markdown]
# ## 7.3 Perplexity before and after
#
# Perplexity is $\exp$ of the mean next-token cross-entropy over non-overlapping windows of
# the evaluation text (the GPTQ/SparseGPT/Wanda protocol; here only the first few windows,
# to keep the chapter short, so compare the numbers with each other, not with papers).
# For contrast, the same model pruned with Wanda (mask only, no weight update) at the same
# sparsity and calibration.

# %%
windows = load_eval_windows(evalset, "test", tok, sizes["seqlen"], sizes["eval_windows"])
model_w, tok_w = fresh_model()
report_w = pipeline.run_prune(config("wanda", evaluate=False), model=model_w, tokenizer=tok_w)
assert tuple(windows.shape) == (report.perplexity["windows"], report.perplexity["seqlen"])
ppl_wanda = perplexity(model_w, windows, "cpu", progress=False)  # the report's windows
del model_w
ppl = {"dense": report.perplexity["dense"], "wanda 50 %": ppl_wanda,
       "admm-grad 50 %": report.perplexity["pruned"]}
print(f"perplexity on {report.perplexity['windows']} windows x {report.perplexity['seqlen']} tokens:")
for name, value in ppl.items():
    print(f"  {name:>15}: {value:9.3f}")
print(f"seconds spent pruning: wanda {report_w.prune_seconds:.1f}, admm-grad {report.prune_seconds:.1f}")

# %% [markdown]
# Where the error goes: the relative error of every linear layer (chapter 1's measure, on
# its own calibration inputs), per block and per kind of linear, for both methods.

# %%
def by(report, key):
    groups = {}
    for r in report.linears:
        groups.setdefault(r[key], []).append(r["error_pruned"])
    return {k: float(np.mean(v)) for k, v in groups.items()}


fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.4))
for rep, name in ((report_w, "wanda"), (report, "admm-grad")):
    blocks = by(rep, "block")
    a1.semilogy(list(blocks), list(blocks.values()), "o-", ms=3, label=name)
a1.set(xlabel="decoder block", ylabel="mean relative layer error", title="per block")
a1.legend(fontsize=8)
kinds_w, kinds_a = by(report_w, "name"), by(report, "name")
x = np.arange(len(kinds_a))
a2.bar(x - 0.2, [kinds_w[k] for k in kinds_a], 0.4, label="wanda")
a2.bar(x + 0.2, list(kinds_a.values()), 0.4, label="admm-grad")
a2.set_xticks(x, [k.split(".")[-1] for k in kinds_a], rotation=30)
a2.set(yscale="log", title="per linear (mean over blocks)")
a2.legend(fontsize=8)
fig.suptitle(f"{'tiny random LLaMA' if FAST else 'SmolLM2-135M'}, 50 % unstructured")
fig.tight_layout()
save(fig, "07_layer_errors.png")

# %% [markdown]
# ## 7.4 What the saved checkpoint contains
#
# With `out=` set, the pruned model is written as a standard Hugging Face checkpoint
# (safetensors), with its tokenizer and a `report.json` holding the configuration, the
# library versions, the calibration fingerprint, one record per linear layer, timings,
# memory and perplexities. It is written to a temporary sibling directory and renamed into
# place, so a failed run leaves nothing half-written.

# %%
for f in sorted(out_dir.iterdir()):
    print(f"{f.name:>28}  {f.stat().st_size / 2**20:8.2f} MiB")
rep = json.loads((out_dir / "report.json").read_text())
print("report.json keys:", ", ".join(rep))

# %% [markdown]
# Reload it with plain `transformers` (nothing from this library) and check that the zeros
# survived: every row of every pruned linear has exactly ⌊0.5·d_in⌋ zeros, as `select_mask`
# promised, and the weights equal those of the model in memory.

# %%
from transformers import AutoModelForCausalLM

reloaded = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True, dtype=torch.float32)
linear_names = models.prunable_linears(reloaded.model.layers[0])  # every nn.Linear of a block
for b, block in enumerate(reloaded.model.layers):
    for n in linear_names:
        Wr = block.get_submodule(n).weight
        assert torch.all((Wr == 0).sum(dim=1) == R.prune_count(Wr.shape[1], 0.5)), (b, n)
        assert torch.equal(Wr, model.model.layers[b].get_submodule(n).weight)
print(f"reloaded: {len(reloaded.model.layers)} blocks x {len(linear_names)} linears, "
      f"every row exactly 50 % zeros")

# %% [markdown]
# The report's pruned perplexity, recomputed by hand on the reloaded model with a plain
# forward pass per window: $\exp\big(\tfrac{1}{n}\sum_w \operatorname{mean}_t(-\log p(x_{t+1}\mid x_{\le t}))\big)$.
# (The pipeline computes it block by block, to fit large models on small devices; the two
# must agree.)

# %%
nll = []
with torch.no_grad():
    for w in windows:
        logits = reloaded(input_ids=w[None], use_cache=False).logits[0, :-1].float()
        nll.append(float(torch.nn.functional.cross_entropy(logits, w[1:])))
ppl_hand = math.exp(sum(nll) / len(nll))
print(f"pruned perplexity: report {rep['perplexity']['pruned']:.4f}, "
      f"by hand on the reloaded model {ppl_hand:.4f}")
assert math.isclose(ppl_hand, rep["perplexity"]["pruned"], rel_tol=1e-4)

# %% [markdown]
# Finally the per-linear table from `report.json`: sparsity (fraction of exact zeros in the
# written weights) and the mean relative error with the final mask alone (`W ⊙ M`) and after
# the ADMM update, over all blocks.

# %%
table = {}
for r in rep["linears"]:
    table.setdefault(r["name"], []).append(r)
print(f"{'linear':>18} {'shape':>11} {'sparsity min..max':>18} {'error W*M':>10} {'error ADMM':>11} "
      f"{'s/linear':>9}")
for name, rs in table.items():
    sp = [r["sparsity"] for r in rs]
    shape = "x".join(map(str, rs[0]["shape"]))
    print(f"{name:>18} {shape:>11} {min(sp):>8.4f}..{max(sp):<8.4f} "
          f"{np.mean([r['error_mask_only'] for r in rs]):>10.5f} "
          f"{np.mean([r['error_pruned'] for r in rs]):>11.5f} "
          f"{np.mean([r['seconds'] for r in rs]):>9.3f}")
    assert all(r["error_pruned"] <= r["error_mask_only"] * (1 + 1e-5) for r in rs)

# %% [markdown]
# **What to remember.** The whole-model engine is chapter 1's problem solved once per linear,
# with Gram matrices accumulated by hooks, blocks pruned in order on the outputs of the
# already-pruned blocks, and the result saved as an ordinary checkpoint whose zeros survive
# reloading. The ADMM update never leaves a layer worse than its mask alone (asserted
# above for every linear); whether that shows up as perplexity is what the table in 7.3
# reports for this model and these small calibration and evaluation sets.
