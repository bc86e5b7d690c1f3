"""The model adapter (gpu/checkpoint/adapter.py): the logits through the model's own head
(Gemma-2's soft cap), tied embeddings answered by what the checkpoint holds, the checkpoint's
own layout for packed experts, and mixture-of-experts pruning at the engine level."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
from synth import write_corpus

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from torch import nn  # noqa: E402

from admm_prune.gpu import cli  # noqa: E402
from admm_prune.gpu.checkpoint import models  # noqa: E402
from admm_prune.gpu.checkpoint.adapter import adapter  # noqa: E402
from admm_prune.gpu.checkpoint.weights import prunable_weights  # noqa: E402
from admm_prune.gpu.engine import pipeline  # noqa: E402
from admm_prune.gpu.evaluation import evaluate  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), seed=3)


def _cli(args, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(args)
    return code, out.getvalue(), capsys.readouterr().err


def _eval(corpus, model_dir, capsys) -> float:
    code, out, err = _cli(["eval", "--model", str(model_dir), "--eval", str(corpus / "eval.txt"), "--seqlen", "32",
                           "--eval-windows", "4", "--device", "cpu", "--no-progress"], capsys)
    assert code == 0, err
    return json.loads(out)["perplexity"]


def _transformers_ppl(model_dir, corpus) -> float:
    """exp(mean window loss) by transformers' own forward on the windows eval reads."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    windows = evaluate.load_eval_windows(str(corpus / "eval.txt"), "test", tok, 32, 4)
    with torch.no_grad():
        return math.exp(float(torch.stack([model(input_ids=w[None], labels=w[None]).loss for w in windows]).mean()))


def _keys(folder) -> set[str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_gemma2_perplexity_goes_through_its_soft_cap(corpus, tmp_path, capsys):
    """Logits far past final_logit_softcapping (head scaled x 2000): eval equals transformers'
    own loss; the norm + head computed by hand (no cap) gave ~1e9 times more before."""
    model, tok = models.tiny_model("gemma2", final_logit_softcapping=30.0)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(2000.0)
    model.save_pretrained(tmp_path / "g")
    tok.save_pretrained(tmp_path / "g")
    expected = _transformers_ppl(tmp_path / "g", corpus)
    assert _eval(corpus, tmp_path / "g", capsys) == pytest.approx(expected, rel=1e-3)


def test_tied_config_beside_a_stored_head_uses_the_head_and_keeps_it(corpus, tmp_path, capsys):
    """config tie_word_embeddings=true, yet the checkpoint holds its own head: as transformers,
    evaluate with that head; a pruned output keeps it."""
    model, tok = models.tiny_model("llama")
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(5))
    model.save_pretrained(tmp_path / "t")
    tok.save_pretrained(tmp_path / "t")
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    (tmp_path / "t" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    expected = _transformers_ppl(tmp_path / "t", corpus)
    assert _eval(corpus, tmp_path / "t", capsys) == pytest.approx(expected, rel=1e-5)
    code, _, err = _cli(["prune", "--model", str(tmp_path / "t"), "--calib", str(corpus / "calib.jsonl"),
                         "--nsamples", "2", "--seqlen", "32", "--iters", "2", "--mask-steps", "1", "--eval", "none",
                         "--device", "cpu", "--no-progress", "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert _keys(tmp_path / "out") == _keys(tmp_path / "t")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "t" / "model.safetensors"), "pt") as b:
        head = adapter(model).output_embedding_key()
        assert torch.equal(a.get_tensor(head), b.get_tensor(head))


def test_tied_checkpoint_without_a_head_stays_tied(corpus, tmp_path, capsys):
    model, tok = models.tiny_model("llama", tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "t")
    tok.save_pretrained(tmp_path / "t")
    assert adapter(model).output_embedding_key() not in _keys(tmp_path / "t")
    assert _eval(corpus, tmp_path / "t", capsys) == pytest.approx(_transformers_ppl(tmp_path / "t", corpus), rel=1e-5)


def test_logits_are_the_models_own():
    """The last block's output through `logits` gives the model's own logits, bit for bit."""
    model, _ = models.tiny_model("qwen3")
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    shape, last = adapter(model), []
    hook = shape.layers[-1].register_forward_hook(lambda m, a, o: last.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    hook.remove()
    assert torch.equal(shape.logits(last[0], ids), expected)


def test_layers_found_by_class_not_by_path():
    model, _ = models.tiny_model("llama")
    shape = adapter(model)
    assert shape.layers is model.get_decoder().layers and shape.block_prefix(3) == "model.layers.3."
    assert shape.block_index("model.layers.12.mlp.up_proj.weight") == 12 and not shape.is_block_key("lm_head.weight")


class _Packed(nn.Module):
    """Experts in a layout no version here knows (a bias beside the packed weights)."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(2, 8, 4))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(2, 8, 1))


def test_unknown_packed_experts_are_refused_naming_the_module():
    block = nn.Module()
    block.mlp = nn.Module()
    block.mlp.experts = _Packed()
    with pytest.raises(models.ModelError, match=r"^mlp.experts: _Packed stores gate_up_proj, gate_up_proj_bias as "
                                                r"3-D parameters \[2, 8, 4\]"):
        prunable_weights(block)


def test_mixtral_weights_routers_dense_and_experts_by_name():
    model, _ = models.tiny_model("mixtral")
    block = adapter(model).layers[0]
    names = [w.name for w in prunable_weights(block)]
    assert names[:4] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    assert names[4:] == [f"mlp.experts.{e}.{p}" for e in range(4) for p in ("gate_up_proj", "down_proj")]
    assert [w.name for w in prunable_weights(block, targets=(r"experts\.3\.",))] == [
        "mlp.experts.3.gate_up_proj", "mlp.experts.3.down_proj"]
    w = prunable_weights(block, targets=(r"experts\.2\.down",))[0]
    assert w.matrix(block).shape == (64, 128) and w.matrix(block).data_ptr() == block.mlp.experts.down_proj[2].data_ptr()


MOE = ["mixtral", "qwen3_moe", "olmoe", "llama4_text", "deepseek_v3"]


@pytest.mark.parametrize("arch, mode, packed", [(a, "routed", False) for a in MOE] + [
    ("mixtral", "all", False), ("llama4_text", "all", False), ("qwen3_moe", "weighted", False),
    ("mixtral", "routed", True), ("deepseek_v3", "routed", True)])
def test_moe_pruned_through_the_cli_in_its_own_layout(corpus, tmp_path, capsys, arch, mode, packed):
    """Saved names equal the input's (Mixtral's per-expert w1/w2/w3, Qwen3-MoE's and OLMoE's
    per-expert gate/up/down on disk, Llama 4's packed ones), every expert matrix and every
    linear 50 % zeros, routers (and everything else) untouched, reloaded by transformers and
    generating; streamed equals in memory; the report lists each expert's tokens. `packed`: a
    checkpoint saved with the in-memory names (save_original_format=False) keeps them; a dense
    first block (DeepSeek-V3) does not mislead the layout's detection."""
    model, tok = models.tiny_model(arch)
    model.save_pretrained(tmp_path / "m", save_original_format=not packed)
    tok.save_pretrained(tmp_path / "m")
    code, _, err = _cli(["prune", "--model", str(tmp_path / "m"), "--calib", str(corpus / "calib.jsonl"),
                         "--nsamples", "4", "--seqlen", "32", "--iters", "4", "--mask-steps", "2", "--eval", "none",
                         "--device", "cpu", "--no-progress", "--moe-calibration", mode, "--out",
                         str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert _keys(tmp_path / "out") == _keys(tmp_path / "m")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True)
    shape, before = adapter(reloaded), model.state_dict()
    pruned = set()
    for i, block in enumerate(shape.layers):
        for w in prunable_weights(block):
            assert float((w.matrix(block) == 0).float().mean()) == pytest.approx(0.5, abs=0.02), (i, w.name)
            pruned.add(f"{shape.block_prefix(i)}{w.module}.{w.param}")
    assert any(".experts." in k for k in pruned)
    for k, W in reloaded.state_dict().items():
        if k not in pruned:
            assert torch.equal(W, before[k]), f"{k} must be untouched"
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    experts = [r for r in report["linears"] if ".experts." in r["name"]]
    assert experts and all(r["tokens"] is not None for r in experts)
    tokens = 4 * 32
    if mode == "all":
        assert all(r["tokens"] == tokens for r in experts)
    elif arch != "llama4_text":  # top-k routing: every token reaches k experts
        k = model.config.num_experts_per_tok
        blocks = {r["block"] for r in experts}
        assert sum(r["tokens"] for r in experts if r["name"].endswith("gate_up_proj")) == k * tokens * len(blocks)
    cfg = pipeline.PruneConfig(calib=str(corpus / "calib.jsonl"), nsamples=4, seqlen=32, iters=4, mask_steps=2,
                               eval=None, device="cpu", progress=False, moe_calibration=mode)
    pipeline.run_prune(cfg, model=model, tokenizer=tok)
    after = reloaded.state_dict()
    for k, W in model.state_dict().items():
        assert torch.equal(after[k], W), f"streamed != in memory: {k}"
    with torch.no_grad():
        reloaded.generate(torch.tensor([[1, 70, 71]]), max_new_tokens=3, do_sample=False)


def test_experts_without_tokens_fall_back_and_stay_finite(corpus):
    """16 experts, top-2, 8 calibration tokens: most experts see nothing; each is still pruned
    to 50 %, finite, and its record says how many tokens it saw and which fell back."""
    model, tok = models.tiny_model("mixtral", num_local_experts=16, num_experts_per_tok=2)
    cfg = pipeline.PruneConfig(calib=str(corpus / "calib.jsonl"), nsamples=1, seqlen=8, iters=4, mask_steps=2,
                               eval=None, device="cpu", progress=False)
    report = pipeline.run_prune(cfg, model=model, tokenizer=tok)
    experts = [r for r in report.linears if ".experts." in r["name"]]
    assert len(experts) == 2 * 16 * 2
    assert any(r["tokens"] == 0 for r in experts) and all((r["fallback"] is None) == (r["tokens"] >= 1)
                                                          for r in experts)
    for block in adapter(model).layers:
        for W in (block.mlp.experts.gate_up_proj, block.mlp.experts.down_proj):
            assert torch.isfinite(W).all()
            assert torch.all((W == 0).flatten(1).float().mean(1) == 0.5)


def _moe_cfg(corpus, **kw):
    return pipeline.PruneConfig(calib=str(corpus / "calib.jsonl"), nsamples=4, seqlen=32, iters=4, mask_steps=2,
                                eval=None, device="cpu", progress=False, **kw)


def _saved(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).state_dict()


def test_moe_resume_and_reconstruction_equal_the_uninterrupted_run(corpus, tmp_path):
    """A streamed Mixtral with block reconstruction (through the routed forward, experts' masks
    fixed): interrupted in block 1 and resumed, it saves what the uninterrupted run saves."""
    model, tok = models.tiny_model("mixtral", num_hidden_layers=3)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    recon = dict(reconstruct_steps=3, reconstruct_lr=1e-4, reconstruct_batch=2)
    full = pipeline.run_prune(_moe_cfg(corpus, model=str(tmp_path / "m"), out=str(tmp_path / "full"), **recon))
    assert len(full.block_reconstruction) == 3
    assert all(math.isfinite(r["error_after"]) and r["error_after"] <= r["error_before"]
               for r in full.block_reconstruction)
    expected = _saved(tmp_path / "full")
    for k, W in expected.items():
        if ".experts." in k:
            assert float((W == 0).float().mean()) == pytest.approx(0.5, abs=0.01), k

    def stop(block, name, *args):
        if block == 1 and name.endswith("experts.2.down_proj"):
            raise KeyboardInterrupt

    with pytest.raises(pipeline.RunInterrupted):
        pipeline.run_prune(_moe_cfg(corpus, model=str(tmp_path / "m"), out=str(tmp_path / "out"), **recon),
                           callback=stop)
    resumed = pipeline.run_prune(_moe_cfg(corpus, model=str(tmp_path / "m"), out=str(tmp_path / "out"), resume=True,
                                          **recon))
    assert resumed.resumed_blocks == [0]
    got = _saved(tmp_path / "out")
    assert all(torch.equal(got[k], v) for k, v in expected.items()), "resumed == uninterrupted"


def test_reconstruction_leaves_the_experts_it_does_not_tune_as_they_were(corpus, tmp_path):
    """With --ignore naming an expert, block reconstruction tunes the other experts' slices of the
    packed parameter and leaves the ignored expert's slice exactly as it was (it used to be zeroed
    by the mask product after each Adam step)."""
    model, tok = models.tiny_model("mixtral", num_hidden_layers=2)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    report = pipeline.run_prune(_moe_cfg(corpus, model=str(tmp_path / "m"), out=str(tmp_path / "out"),
                                         ignore=(r"experts\.1\.",), reconstruct_steps=4, reconstruct_lr=1e-2,
                                         reconstruct_batch=2))
    assert any(not r["reverted"] for r in report.block_reconstruction), "some block's tuning must be kept"
    got = _saved(tmp_path / "out")
    packed = [k for k in got if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj")]
    assert packed
    for k in packed:
        assert torch.equal(got[k][1], dense[k][1]), f"{k}: the ignored expert 1 changed"
        assert float((got[k][0] == 0).float().mean()) == pytest.approx(0.5, abs=0.01), k


TORCHRUN = """
import sys
from admm_prune.gpu.engine import distributed, pipeline
from admm_prune.gpu.config import PruneConfig
ck, calib, out = sys.argv[1:4]
dist = distributed.init_from_env("cpu") if distributed.launched_by_torchrun() else distributed.current()
try:
    pipeline.run_prune(PruneConfig(model=ck, calib=calib, eval=None, nsamples=4, seqlen=32, iters=4, mask_steps=2,
                                   device="cpu", progress=False, out=out,
                                   reconstruct_steps=0))  # the Grams: a reconstruction draws per-rank windows
finally:
    distributed.finish(dist)
"""


def test_moe_two_ranks_prune_what_one_process_prunes(corpus, tmp_path):
    """torchrun, 2 gloo ranks: the experts' Grams and token counts summed over the ranks give
    one process's Mixtral bit for bit."""
    import os
    import subprocess
    import sys

    model, tok = models.tiny_model("mixtral")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "run.py").write_text(TORCHRUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for n, out in ((1, "one"), (2, "two")):
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if n > 1 else []
        proc = subprocess.run([sys.executable, *launch, str(tmp_path / "run.py"), str(tmp_path / "m"),
                               str(corpus / "calib.jsonl"), str(tmp_path / out)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _saved(tmp_path / "one"), _saved(tmp_path / "two")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    one, two = (json.loads((tmp_path / d / "report.json").read_text())["linears"] for d in ("one", "two"))
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]


def test_wanda_gets_column_norms_never_a_diagonal_matrix(corpus, monkeypatch):
    """Issue #27 item 3: a norms-only method is handed diag(XtX) as a vector (prune_norms),
    with the masks prune_shared gives on the diagonal matrix; with the finish (polish_iters)
    it gets the full Gram, not a diagonal one."""
    from admm_prune.gpu.engine import blocks
    from admm_prune.gpu.solvers.prune import prune_norms, prune_shared

    g = torch.Generator().manual_seed(0)
    Ws = [torch.randn(24, 32, generator=g), torch.randn(8, 32, generator=g)]
    norms = torch.rand(32, generator=g) + 0.1
    cfg = pipeline.PruneConfig(method="wanda", sparsity=0.5)
    for a, b in zip(prune_norms(Ws, norms, 0.5, cfg), prune_shared(Ws, torch.diag(norms), 0.5, method="wanda")):
        assert torch.equal(a.W, b.W) and torch.equal(a.mask, b.mask)
    grams, real = [], blocks.prune_shared
    monkeypatch.setattr(blocks, "prune_shared", lambda Ws, XtX, *a, **k: grams.append(XtX) or real(Ws, XtX, *a, **k))
    model, tok = models.tiny_model("llama")
    report = pipeline.run_prune(_moe_cfg(corpus, method="wanda", layer_errors=False), model=model, tokenizer=tok)
    assert grams == [] and report.summary()["mean_sparsity"] == pytest.approx(0.5, abs=0.01)
    model, tok = models.tiny_model("llama")
    pipeline.run_prune(_moe_cfg(corpus, method="wanda", layer_errors=False, polish_iters=2), model=model, tokenizer=tok)
    assert grams and all(G.ndim == 2 and torch.count_nonzero(G - torch.diag(torch.diagonal(G))) > 0 for G in grams)


def test_bench_refuses_windows_past_the_context_with_the_models_own_check(tmp_path, corpus, capsys):
    """The seqlen check lives beside the value it reads (models.check_seqlen_fits); bench,
    prune and eval all call it, each error naming the flag."""
    model, tok = models.tiny_model("llama")  # 512 positions
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    code, _, err = _cli(["bench", "--model", str(tmp_path / "m"), "--calib", str(corpus / "calib.jsonl"),
                         "--eval", str(corpus / "eval.txt"), "--seqlen", "64", "--eval-seqlen", "1024",
                         "--device", "cpu", "--no-progress"], capsys)
    assert code == 2 and err.strip().splitlines()[-1] == ("admm-prune: error: --eval-seqlen 1024 exceeds the model's "
                                                         "limit of 512 positions")
    with pytest.raises(pipeline.PipelineError, match="^seqlen 600 exceeds the model's limit of 512 positions$"):
        models.check_seqlen_fits(model, seqlen=600)


def test_experts_grams_go_to_the_host_when_they_do_not_fit(monkeypatch):
    """E x d^2 float64 sums per block: on a CUDA device with less room than they take, the
    experts' Grams are kept on the host (the attention's stay on the device); a CPU run's
    are where its device is. (The decision is tested here; no GPU in this project's CI.)"""
    from admm_prune.gpu.engine import calibration

    block = adapter(models.tiny_model("mixtral")[0]).layers[0]
    weights = prunable_weights(block)
    need = sum(w.in_features(block) ** 2 for w in weights if w.expert is not None) * 8
    cuda = torch.device("cuda")
    monkeypatch.setattr(calibration, "device_room", lambda device: need - 1)
    homes = calibration.GramCollector.homes(block, weights, cuda)
    assert {str(homes[w.name]) for w in weights if w.expert is not None} == {"cpu"}
    assert {str(homes[w.name]) for w in weights if w.expert is None} == {"cuda"}
    monkeypatch.setattr(calibration, "device_room", lambda device: need)
    assert set(map(str, calibration.GramCollector.homes(block, weights, cuda).values())) == {"cuda"}
    monkeypatch.undo()
    assert set(map(str, calibration.GramCollector.homes(block, weights, "cpu").values())) == {"cpu"}


@pytest.mark.parametrize("mode", ["routed", "weighted", "all"])
def test_experts_inputs_are_the_routed_tokens_by_hand(mode):
    """Expert e's gate_up input: the tokens routed to it (all tokens with "all"); its down_proj
    input: act(x gate^T) * (x up^T) of the same tokens; "weighted" scales both rows by
    sqrt(router weight), so the Grams are sum_t w_t x_t x_t^T."""
    from admm_prune.gpu.checkpoint.weights import experts_inputs

    model, _ = models.tiny_model("mixtral")
    moe = adapter(model).layers[0].mlp
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, top_w, top_i = moe.gate(x)
    weights = prunable_weights(adapter(model).layers[0], targets=("experts",))
    got = {w.name: t for w, t in experts_inputs(moe.experts, (x, top_i, top_w), {}, weights, mode)}
    I = model.config.intermediate_size
    for e in range(4):
        rows = (top_i == e).any(-1) if mode != "all" else torch.ones(10, dtype=torch.bool)
        xe = x[rows]
        gu = moe.experts.gate_up_proj[e].detach()
        he = torch.nn.functional.silu(xe @ gu[:I].T) * (xe @ gu[I:].T)
        if mode == "weighted":
            s = (top_w * (top_i == e)).sum(-1)[rows].sqrt()[:, None]
            xe, he = xe * s, he * s
        torch.testing.assert_close(got[f"mlp.experts.{e}.gate_up_proj"], xe)
        torch.testing.assert_close(got[f"mlp.experts.{e}.down_proj"], he)


def test_a_head_without_logits_is_refused_in_one_line(monkeypatch):
    from types import SimpleNamespace

    model, _ = models.tiny_model("llama")
    shape = adapter(model)
    monkeypatch.setattr(model, "forward", lambda **kwargs: SimpleNamespace(last_hidden_state=None))
    with pytest.raises(models.ModelError, match="^LlamaForCausalLM: its forward returns no logits per token; its head "
                                                "is not one this version can evaluate$"):
        shape.logits(torch.zeros(1, 4, 64), torch.zeros(1, 4, dtype=torch.long))
