"""The layer-by-layer engine on tiny random models built in the test (no download)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from admm_prune.reference.errors import AdmmPruneError
from synth import skip_without_smollm2, write_corpus

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import admm_prune.gpu as G  # noqa: E402
import admm_prune.reference as R  # noqa: E402
from admm_prune.gpu import cli  # noqa: E402
from admm_prune.gpu.engine import blocks  # noqa: E402
from admm_prune.gpu.data import corpus as data  # noqa: E402
from admm_prune.gpu.checkpoint import models  # noqa: E402
from admm_prune.gpu.engine import pipeline  # noqa: E402
from admm_prune.gpu.config import EvalConfig, PruneConfig  # noqa: E402
from admm_prune.gpu.evaluation.evaluate import load_eval_windows, perplexity  # noqa: E402

SHARED = Path(os.environ.get("ADMM_PRUNE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Small local calibration (jsonl) and evaluation (txt) files: English-like text."""
    return write_corpus(tmp_path_factory.mktemp("corpus"), seed=0)


def _cfg(corpus, **kw):
    base = dict(calib=str(corpus / "calib.jsonl"), eval=str(corpus / "eval.txt"), nsamples=4,
                seqlen=32, iters=6, mask_steps=4, device="cpu", progress=False)
    base.update(kw)
    return PruneConfig(**base)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("method", R.METHODS)
def test_every_linear_pruned_exactly(corpus, arch, method):
    model, tok = models.tiny_model(arch)
    before = _state(model)
    cfg = _cfg(corpus, method=method, eval=None)
    report = pipeline.run_prune(cfg, model=model, tokenizer=tok)
    for i, block in enumerate(model.model.layers):
        for n in LINEARS:
            W = block.get_submodule(n).weight
            per_row = (W == 0).sum(dim=1)
            assert torch.all(per_row == R.prune_count(W.shape[1], 0.5)), f"block {i} {n}"
    after = model.state_dict()
    for k, v in before.items():
        if not any(f".{n}.weight" in k for n in LINEARS):
            assert torch.equal(after[k], v), f"{k} must be untouched"
    assert len(report.linears) == 7 * len(model.model.layers)
    if method in ("magnitude", "wanda"):  # no full Gram collected: no layer error by default
        assert all(r["error_pruned"] is None for r in report.linears)
    else:
        assert all(r["error_pruned"] >= 0 for r in report.linears)


def test_magnitude_reads_no_data_and_runs_no_forward(corpus):
    """|W| needs neither calibration text nor block inputs; the masks are prune_layer's."""
    model, tok = models.tiny_model("llama")
    dense = {n: model.model.layers[0].get_submodule(n).weight.detach().clone() for n in LINEARS}
    calls = []
    for block in model.model.layers:
        block.register_forward_pre_hook(lambda *a: calls.append(1))
    cfg = _cfg(corpus, method="magnitude", eval=None, calib="/nonexistent/calib.jsonl")
    report = pipeline.run_prune(cfg, model=model, tokenizer=tok)
    assert calls == [] and report.calibration["mode"] == "none"
    assert report.summary()["mean_layer_error"] is None
    for n, W in dense.items():
        expected = G.prune_layer(W, torch.eye(W.shape[1]), 0.5, method="magnitude").W
        assert torch.equal(model.model.layers[0].get_submodule(n).weight, expected), n


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "admm-grad"])
def test_nm_pattern_on_every_linear(corpus, pattern, method):
    model, tok = models.tiny_model("llama")
    n, m = map(int, pattern.split(":"))
    pipeline.run_prune(_cfg(corpus, method=method, pattern=pattern, sparsity=None, eval=None),
                       model=model, tokenizer=tok)
    for block in model.model.layers:
        for name in LINEARS:
            W = block.get_submodule(name).weight
            kept = (W != 0).reshape(W.shape[0], -1, m).sum(dim=2)
            assert torch.all(kept <= n), name


def test_update_improves_on_mask_only_and_admm_grad_beats_wanda(corpus):
    model, tok = models.tiny_model("llama")
    report = pipeline.run_prune(_cfg(corpus, method="admm", eval=None), model=model, tokenizer=tok)
    for r in report.linears:
        assert r["error_pruned"] <= r["error_mask_only"] * (1 + 1e-5), r


def test_pipeline_does_not_change_the_math(corpus):
    """What `prune` wrote == gpu.prune_layer on the captured Gram == reference (float64) on it."""
    model, tok = models.tiny_model("llama")
    seen = {}

    def grab(block, name, W, XtX, result):
        if block == 0:
            seen[name] = (W.clone(), XtX.clone(), result)

    cfg = _cfg(corpus, method="admm-grad", eval=None, reconstruct_steps=0)  # the paper: bit for bit
    pipeline.run_prune(cfg, model=model, tokenizer=tok, callback=grab)
    assert set(seen) == set(LINEARS)
    for name, (W, XtX, _) in seen.items():
        written = model.model.layers[0].get_submodule(name).weight.detach()
        gpu = G.prune_layer(W, XtX, 0.5, iters=6, mask_steps=4)
        assert torch.equal(written, gpu.W.to(written.dtype)), name
        ref = R.prune_layer(W.double().numpy(), XtX.double().numpy(), 0.5, iters=6, mask_steps=4)
        # float32 pipeline vs float64 reference on the same Gram: masks may flip on
        # near-ties, so compare the reconstruction error rather than the weights
        e32 = R.reconstruction_error(W.double().numpy(), written.double().numpy(), XtX.double().numpy())
        e64 = R.reconstruction_error(W.double().numpy(), ref.W, XtX.double().numpy())
        assert e32 == pytest.approx(e64, rel=1e-3, abs=1e-7), name


def test_grams_are_shared_and_capture_all_tokens(corpus):
    model, tok = models.tiny_model("llama")
    seen = {}
    pipeline.run_prune(_cfg(corpus, method="admm", eval=None), model=model, tokenizer=tok,
                       callback=lambda b, n, W, XtX, r: seen.setdefault((b, n), XtX))
    for b in range(len(model.model.layers)):
        assert seen[(b, "self_attn.q_proj")] is seen[(b, "self_attn.k_proj")] is seen[(b, "self_attn.v_proj")]
        assert seen[(b, "mlp.gate_proj")] is seen[(b, "mlp.up_proj")]
    # Gram of block 0's attention input is sum over 4 x 32 tokens: its trace is positive
    assert float(torch.trace(seen[(0, "self_attn.q_proj")])) > 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_stopped_calibration_forward_gives_the_full_forwards_grams(arch):
    """`calibrate_block` with stop=True ends each forward at the last leader's input: the
    Grams and token counts equal those of full forwards, and down_proj itself never runs."""
    from admm_prune.gpu.engine.calibration import (
        GramCollector, calibrate_block, capture_block_inputs, run_block, shared_input_groups,
    )

    model, _ = models.tiny_model(arch)
    ids = torch.randint(0, model.config.vocab_size, (3, 16))
    inps, kwargs = capture_block_inputs(model, ids, torch.device("cpu"), torch.device("cpu"), progress=False)
    kwargs, block = kwargs.at(0), model.model.layers[0]
    leaders = [g[0] for g in shared_input_groups(block, LINEARS, inps[:1], kwargs, "cpu")]
    assert leaders == ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    with GramCollector(block, leaders, torch.device("cpu")) as full:
        run_block(block, inps, kwargs, "cpu")
    calls = []
    down = block.get_submodule(leaders[-1]).register_forward_hook(lambda *a: calls.append(1))
    with GramCollector(block, leaders, torch.device("cpu"), stop=True) as stopped:
        calibrate_block(block, inps, kwargs, "cpu")
    down.remove()
    assert calls == [] and stopped.tokens == full.tokens == {n: 48 for n in leaders}
    for n in leaders:
        assert torch.equal(stopped.grams[n], full.grams[n]), n


def test_blockwise_perplexity_equals_whole_model(corpus):
    """Block-by-block evaluation == the plain forward (also: no KV cache leaks between windows)."""
    model, tok = models.tiny_model("mistral")
    windows = load_eval_windows(str(corpus / "eval.txt"), "test", tok, 32, 6)
    assert windows.shape == (6, 32)
    blockwise = perplexity(model, windows, "cpu", progress=False)
    whole = data.perplexity(model, windows, progress=False)
    assert blockwise == pytest.approx(whole, rel=1e-5)


def test_true_sequential_prunes_and_differs(corpus):
    outs = []
    for ts in (False, True):
        model, tok = models.tiny_model("llama")
        pipeline.run_prune(_cfg(corpus, method="admm", eval=None, true_sequential=ts), model=model, tokenizer=tok)
        outs.append(model.model.layers[0].mlp.down_proj.weight.detach().clone())
    assert (outs[1] == 0).float().mean() == pytest.approx(0.5)
    assert not torch.equal(outs[0], outs[1])
    # q/k/v see the same (dense) inputs in both modes: identical
    # (checked implicitly: only later groups' inputs change)


def test_save_reload_and_report(corpus, tmp_path):
    model, tok = models.tiny_model("qwen2")
    out = tmp_path / "pruned"
    report = pipeline.run_prune(_cfg(corpus, out=str(out), eval_windows=3), model=model, tokenizer=tok)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"], "no temporary leftovers"
    rep = json.loads((out / "report.json").read_text())
    for key in ("config", "versions", "calibration", "linears", "block_seconds", "total_seconds",
                "peak_memory", "perplexity"):
        assert rep[key] not in (None, {}, []), key
    assert rep["perplexity"]["dense"] > 1 and rep["perplexity"]["pruned"] > 1
    assert rep["calibration"]["nsamples"] == 4
    assert any(f.suffix == ".safetensors" for f in out.iterdir())
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask, "usual permissions, not mkdtemp's 0700"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k
    assert report.perplexity["pruned"] == pytest.approx(rep["perplexity"]["pruned"])
    # an existing --out is refused, then replaced with --overwrite
    with pytest.raises(AdmmPruneError, match="already exists"):
        pipeline.run_prune(_cfg(corpus, out=str(out), eval=None), model=model, tokenizer=tok)
    pipeline.run_prune(_cfg(corpus, out=str(out), eval=None, overwrite=True), model=model, tokenizer=tok)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


def test_failure_before_any_block_finished_leaves_nothing(corpus, tmp_path):
    model, tok = models.tiny_model("llama")
    out = tmp_path / "new" / "deeper" / "pruned"

    def boom(block, *args):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        pipeline.run_prune(_cfg(corpus, out=str(out), eval=None), model=model, tokenizer=tok, callback=boom)
    assert list(tmp_path.iterdir()) == [], "no staging folder, no parent folders the run created"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_finds_every_nan_and_inf(dtype):
    from admm_prune.gpu.solvers.checks import all_finite

    t = torch.randn(1000, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert all_finite(t) and all_finite(t[:0])
    for where in (0, 517, 999):
        for bad in (float("nan"), float("inf"), -float("inf")):
            u = t.clone()
            u[where] = bad
            assert not all_finite(u), (where, bad)


def test_nan_in_weights_found_at_load_before_any_pruning(corpus):
    model, tok = models.tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    before = _state(model)
    with pytest.raises(models.ModelError, match=r"model.layers.1.mlp.up_proj.weight holds NaN.*at load"):
        pipeline.run_prune(_cfg(corpus, eval=None), model=model, tokenizer=tok)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"]), \
        "block 0 was not pruned before the NaN was found"


# ---------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "model"
    model, tok = models.tiny_model("llama")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _cli(args, capsys):
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_prune_and_eval_end_to_end(tiny_dir, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = _cli(["prune", "--model", str(tiny_dir), "--calib", str(corpus / "calib.jsonl"),
                              "--eval", str(corpus / "eval.txt"), "--nsamples", "4", "--seqlen", "32",
                              "--iters", "5", "--mask-steps", "3", "--out", str(out), "--no-progress",
                              "--device", "cpu"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["mean_sparsity"] == pytest.approx(0.5)
    report = tmp_path / "reports" / "eval"
    code, stdout, err = _cli(["eval", "--model", str(out), "--eval", str(corpus / "eval.txt"),
                              "--seqlen", "32", "--no-progress", "--device", "cpu",
                              "--baseline", str(tiny_dir), "--out", str(report)], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["linear_sparsity"] == pytest.approx(0.5)
    assert result["perplexity"] == pytest.approx(summary["perplexity"]["pruned"], rel=1e-4)
    # the baseline (the dense model) on the same windows, side by side in one report
    base = result["baseline"]
    assert base["linear_sparsity"] == 0 and base["windows"] == result["windows"]
    assert base["perplexity"] == pytest.approx(summary["perplexity"]["dense"], rel=1e-4)
    assert json.loads(report.with_suffix(".json").read_text())["baseline"] == base
    md = report.with_suffix(".md").read_text()
    assert f"{base['perplexity']:.3f}, {result['perplexity']:.3f} (baseline, model)" in md
    assert sorted(p.name for p in report.parent.iterdir()) == ["eval.json", "eval.md"]  # no temporaries
    umask = os.umask(0)
    os.umask(umask)
    assert report.with_suffix(".md").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_cli_eval_out_is_a_prefix_not_a_folder(tiny_dir, corpus, tmp_path, capsys):
    code, stdout, err = _cli(["eval", "--model", str(tiny_dir), "--eval", str(corpus / "eval.txt"),
                              "--seqlen", "32", "--no-progress", "--device", "cpu", "--out", str(tmp_path)], capsys)
    assert code == cli.EXIT_USER_ERROR and stdout == ""
    assert "--out" in err and "directory" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


BAD_CLI = [
    (["--sparsity", "1.5"], "sparsity"),
    (["--pattern", "2-4"], "pattern"),
    (["--pattern", "3:5", "--sparsity", "none"], "divisible by 5"),
    (["--pattern", "2:4", "--sparsity", "0.6"], "contradicts"),
    (["--seqlen", "100000"], "exceeds the model's limit"),
    (["--calib", "/nonexistent/calib.jsonl"], "calib.jsonl"),
    (["--calib", "EMPTY"], "empty"),
    (["--calib", "SHORT", "--seqlen", "400"], "calib"),
    (["--model", "/nonexistent/model-dir"], "model-dir"),
    (["--model", "someone/not-a-real-model"], "someone/not-a-real-model"),
    (["--model", "GPT2"], "GPT2Block holds no nn.Linear to prune"),  # found by class; Conv1D, no linear
    (["--out", "EXISTING"], "already exists"),
    (["--out", "FILE/pruned"], "is a file, not a folder"),
    (["--out", ".", "--overwrite"], "current folder"),
    (["--seqlen", "1"], "--seqlen must be an integer >= 2"),
    (["--model", "CORRUPT"], "not a readable safetensors file"),
    (["--model", "NAN"], "holds NaN/Inf in the stored weights"),
    (["--sparsity-profile", "owl", "--pattern", "2:4", "--sparsity", "none"], "unstructured"),
]


@pytest.mark.parametrize("extra,match", BAD_CLI, ids=[m for _, m in BAD_CLI])
def test_cli_user_errors_one_line_nothing_written(extra, match, tiny_dir, corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "short.jsonl").write_text(json.dumps({"text": "too short"}))
    (tmp_path / "existing").mkdir()
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)).save_pretrained(gpt2)
    models.tiny_tokenizer().save_pretrained(gpt2)
    (tmp_path / "file").write_text("a file where a folder is expected")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes((corrupt / "model.safetensors").read_bytes()[:5000])
    nan = tmp_path / "nan"
    broken, _ = models.tiny_model("llama")
    with torch.no_grad():
        broken.model.layers[1].mlp.down_proj.weight[3, 3] = float("nan")
    broken.save_pretrained(nan)
    models.tiny_tokenizer().save_pretrained(nan)
    subs = {"EMPTY": str(tmp_path / "empty.jsonl"), "SHORT": str(tmp_path / "short.jsonl"),
            "EXISTING": str(tmp_path / "existing"), "GPT2": str(gpt2), "FILE/pruned": str(tmp_path / "file" / "pruned"),
            "CORRUPT": str(corrupt), "NAN": str(nan)}
    extra = [subs.get(a, a) for a in extra]
    out = tmp_path / "out"
    args = ["prune", "--model", str(tiny_dir), "--calib", str(corpus / "calib.jsonl"), "--eval", "none",
            "--nsamples", "2", "--seqlen", "32", "--out", str(out), "--no-progress", "--device", "cpu"] + extra
    code, stdout, err = _cli(args, capsys)
    assert code == cli.EXIT_USER_ERROR
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("admm-prune: error")]
    assert len(lines) == 1 and match in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "no temporary leftovers"


def test_eval_checks_tasks_and_out_before_any_perplexity(tiny_dir, corpus, tmp_path, capsys, monkeypatch):
    from admm_prune.gpu.evaluation import evaluate

    def never(*a, **k):
        raise AssertionError("perplexity ran before the arguments were checked")

    monkeypatch.setattr(evaluate, "perplexity", never)
    base = ["eval", "--model", str(tiny_dir), "--eval", str(corpus / "eval.txt"), "--seqlen", "32",
            "--no-progress", "--device", "cpu"]
    (tmp_path / "file").write_text("x")
    for extra, match in ((["--tasks", "nope", "--task-data", str(tmp_path)], "nope"),
                         (["--tasks", "rte", "--task-data", str(tmp_path)], "rte"),
                         (["--baseline", str(tmp_path / "missing")], "missing"),
                         (["--out", str(tmp_path / "file" / "eval")], "is a file")):
        code, stdout, err = _cli(base + extra, capsys)
        assert code == cli.EXIT_USER_ERROR and match in err and len(err.strip().splitlines()) == 1, err


def test_eval_out_prefix_keeps_its_dots(tiny_dir, corpus, tmp_path, capsys):
    prefix = tmp_path / "zs-admm-grad-0.5-unstructured"
    code, _, err = _cli(["eval", "--model", str(tiny_dir), "--eval", str(corpus / "eval.txt"), "--seqlen", "32",
                         "--eval-windows", "2", "--no-progress", "--device", "cpu", "--out", str(prefix)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zs-admm-grad-0.5-unstructured.json",
                                                          "zs-admm-grad-0.5-unstructured.md"]


def test_one_window_rule_and_mask_steps_only_where_used(corpus):
    for make in (lambda: _cfg(corpus, seqlen=1), lambda: EvalConfig(seqlen=1)):
        with pytest.raises(AdmmPruneError, match="seqlen must be an integer >= 2"):
            make()
    _cfg(corpus, method="wanda", iters=5, mask_steps=15)  # wanda has no mask steps to check
    with pytest.raises(AdmmPruneError, match="mask_steps"):
        _cfg(corpus, method="admm-grad", iters=5, mask_steps=15)


def test_report_records_the_model_and_device_used(tiny_dir, corpus, tmp_path):
    pipeline.run_prune(_cfg(corpus, model=str(tiny_dir), eval=None, out=str(tmp_path / "o"), device=None))
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["model"]["path"] == str(tiny_dir) and rep["model"]["device"] == "cpu"
    assert rep["model"]["files"] == {"model.safetensors": (tiny_dir / "model.safetensors").stat().st_size}


def test_cli_module_entry_point_help():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "admm_prune.gpu", "prune", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--seqlen" in res.stdout and "--true-sequential" in res.stdout


# ---------------------------------------------------------------- the real model, small


@pytest.mark.model
def test_smollm2_two_blocks(tmp_path):
    skip_without_smollm2(SHARED)
    cfg = PruneConfig(
        model=None, method="admm-grad", calib=str(SHARED / "c4" / "c4_train_first1000_reserialized.jsonl"),
        eval=str(SHARED / "wikitext-2-raw" / "wiki.valid.raw"), nsamples=4, seqlen=128,
        eval_windows=2, num_blocks=2, device="cpu", progress=False, out=str(tmp_path / "smol"), sparsity=0.7)
    report = pipeline.run_prune(cfg)
    assert report.perplexity["dense"] < 100, report.perplexity  # a real LM, not noise
    assert math.isfinite(report.perplexity["pruned"])
    assert len(report.linears) == 14
    assert all(r["sparsity"] == pytest.approx(0.7, abs=2e-3) for r in report.linears)  # rounded per row
    recs = report.block_reconstruction  # admm-grad's default recipe ran on both blocks, never raising an error
    assert [r["block"] for r in recs] == [0, 1] and all(r["steps"] == cfg.reconstruct_steps > 0 for r in recs)
    assert all(r["error_after"] <= r["error_before"] for r in recs)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "smol", local_files_only=True)
    w = reloaded.model.layers[0].mlp.down_proj.weight
    assert float((w == 0).float().mean()) == pytest.approx(0.7, abs=2e-3)


def test_cli_eval_zero_shot_offline(tiny_dir, capsys):
    pytest.importorskip("lm_eval")
    if not (SHARED / "rte").is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    code, stdout, err = _cli(["eval", "--model", str(tiny_dir), "--eval", "none", "--tasks", "rte,arc_easy",
                              "--task-data", str(SHARED), "--limit", "4", "--no-progress", "--device", "cpu",
                              "--baseline", str(tiny_dir)], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    res = result["zeroshot"]
    assert set(res["tasks"]) == {"rte", "arc_easy"}
    assert all(t["n"] == 4 and 0 <= t["acc"] <= 1 for t in res["tasks"].values())
    # the baseline is the same model here: the same accuracies, a zero change in the table
    assert result["baseline"]["zeroshot"]["tasks"] == res["tasks"]
    rows = [line for line in result["markdown"].splitlines() if line.startswith("| ")]
    assert rows[0].split(" | ")[2:] == ["baseline acc %", "model acc %", "change |"]
    assert [r.split(" | ")[0][2:] for r in rows[1:]] == ["rte", "arc_easy", "mean"]
    assert all(r.endswith("| +0.00 |") for r in rows[1:])
    code, _, err = _cli(["eval", "--model", str(tiny_dir), "--eval", "none", "--tasks", "nope",
                         "--task-data", str(SHARED)], capsys)
    assert code == cli.EXIT_USER_ERROR and "nope" in err


def test_bench_runs_every_method_on_shared_windows(corpus, tmp_path):
    from admm_prune.gpu.bench import bench

    model, tok = models.tiny_model("llama")
    cfg = bench.BenchConfig(calib=str(corpus / "calib.jsonl"), eval=str(corpus / "eval.txt"), nsamples=4,
                            seqlen=32, eval_seqlen=64, eval_windows=4, settings=("0.6", "2:4"), peers=(),
                            iters=5, mask_steps=3, device="cpu", progress=False, out=str(tmp_path / "b"),
                            layer_errors=True)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    res = bench.run_bench(cfg, model=model, tokenizer=tok)
    assert len(res["runs"]) == 2 * 4
    # floor(0.6 * 64) / 64 = 0.59375 per row
    assert all(r["linear_sparsity"] == pytest.approx(0.59375 if r["setting"] == "0.6" else 0.5) for r in res["runs"])
    errs = {(r["setting"], r["method"]): r["mean_layer_error"] for r in res["runs"]}
    for s in ("0.6", "2:4"):
        assert errs[(s, "admm")] < errs[(s, "wanda")]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in dense.items()), "dense weights restored"
    assert (tmp_path / "b.md").read_text() == res["markdown"]
    assert "Pruning time by phase" in res["markdown"] and all(r["phase_seconds"]["solve"] > 0 for r in res["runs"])
    assert json.loads((tmp_path / "b.json").read_text())["dense_perplexity"] == pytest.approx(res["dense_perplexity"])
    with pytest.raises(AdmmPruneError, match="settings"):
        bench.BenchConfig(settings=("1.2",))


# ---------------------------------------------------------------- beyond the paper (issue 14)


def test_owl_targets_average_to_the_sparsity_and_are_reported(corpus, tmp_path):
    model, tok = models.tiny_model("mistral")  # 3 blocks
    cfg = _cfg(corpus, method="admm-grad", eval=None, sparsity=0.6, sparsity_profile="owl", owl_lambda=0.1,
               out=str(tmp_path / "o"))
    report = pipeline.run_prune(cfg, model=model, tokenizer=tok)
    prof = json.loads((tmp_path / "o" / "report.json").read_text())["block_sparsity"]
    assert prof["profile"] == "owl" and len(prof["ratios"]) == len(prof["targets"]) == 3
    targets, sizes = np.array(prof["targets"]), np.array(prof["sizes"])
    assert np.sum(targets * sizes) / np.sum(sizes) == pytest.approx(0.6, abs=1e-12)
    assert targets.max() - targets.min() > 0.05, "the blocks' outlier ratios differ: so do their targets"
    assert np.all(np.abs(targets - 0.6) <= 0.1 + 1e-12)
    assert np.argmin(targets) == np.argmax(prof["ratios"]), "the most outliers, the least pruning"
    # achieved per block = the target, up to the per-row floor
    assert np.allclose(prof["achieved"], targets, atol=1.0 / 64)
    for r in report.linears:
        assert r["sparsity"] == pytest.approx(targets[r["block"]], abs=1.0 / r["shape"][1])
    # the ratios are the dense model's: the same with any method
    wanda = blocks.block_targets(models.tiny_model("mistral")[0], _calib(tok, corpus), cfg)
    assert wanda["ratios"] == pytest.approx(prof["ratios"], rel=1e-6)


def _calib(tok, corpus):
    texts = data.load_texts(str(corpus / "calib.jsonl"), split="train")
    return data.sample_calibration(texts, tok, 4, 32, 0)[0]


@pytest.mark.parametrize("bad,match", [
    (dict(sparsity_profile="owl", pattern="2:4", sparsity=None), "unstructured"),
    (dict(sparsity_profile="owl", sparsity=0.95, owl_lambda=0.08), "owl_lambda"),
    (dict(sparsity_profile="uneven"), "sparsity_profile"),
    (dict(polish_iters=-1), "polish_iters"),
    (dict(polish_iters=3, method="magnitude"), "polish_iters"),
])
def test_bad_profile_or_finish_is_refused_in_the_config(corpus, bad, match):
    with pytest.raises(AdmmPruneError, match=match):
        _cfg(corpus, **bad)


def test_finish_lowers_the_layer_error(corpus):
    errors = {}
    for k in (0, 8):
        model, tok = models.tiny_model("llama")
        report = pipeline.run_prune(_cfg(corpus, method="admm-grad", iters=4, mask_steps=3, eval=None,
                                         polish_iters=k), model=model, tokenizer=tok)
        errors[k] = np.mean([r["error_pruned"] for r in report.linears])
    assert errors[8] < errors[0]


def test_bench_variants_beside_the_paper_method(corpus, tmp_path):
    from admm_prune.gpu.bench import bench

    model, tok = models.tiny_model("mistral")
    cfg = bench.BenchConfig(calib=str(corpus / "calib.jsonl"), eval=str(corpus / "eval.txt"), nsamples=4,
                            seqlen=32, eval_seqlen=64, eval_windows=2, settings=("0.6", "2:4"), peers=(),
                            methods=("admm-grad", "admm-grad+owl", "admm-grad+polish8+iters4"),
                            device="cpu", progress=False, out=str(tmp_path / "run-0.6"))
    res = bench.run_bench(cfg, model=model, tokenizer=tok)
    got = {(r["setting"], r["method"]) for r in res["runs"]}
    assert got == {("0.6", "admm-grad"), ("0.6", "admm-grad+owl"), ("0.6", "admm-grad+polish8+iters4"),
                   ("2:4", "admm-grad"), ("2:4", "admm-grad+polish8+iters4")}
    assert "unstructured" in res["skipped"]["admm-grad+owl 2:4"]
    assert (tmp_path / "run-0.6.json").is_file() and (tmp_path / "run-0.6.md").is_file(), "extensions appended"
    assert bench.parse_variant("admm+owl+polish5") == ("admm", {"sparsity_profile": "owl", "polish_iters": 5})
    for bad in ("admm-grad+foo", "obs", "admm+iters0"):
        with pytest.raises(AdmmPruneError, match="methods"):
            bench.BenchConfig(methods=(bad,))


def test_wanda_from_column_norms_equals_wanda_from_the_gram(corpus):
    """Wanda reads only diag(XtX): without layer errors the engine collects just that."""
    states, reports = [], []
    for errors in (False, True):
        model, tok = models.tiny_model("qwen2")
        reports.append(pipeline.run_prune(_cfg(corpus, method="wanda", eval=None, layer_errors=errors),
                                          model=model, tokenizer=tok))
        states.append(_state(model))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert all(r["error_pruned"] is None for r in reports[0].linears)
    assert all(r["error_pruned"] > 0 for r in reports[1].linears)
    phases = reports[1].summary()["phase_seconds"]
    assert {"load", "forward", "gram", "solve", "errors"} <= set(phases) and "errors" not in reports[0].summary()["phase_seconds"]
    assert all(v >= 0 for v in phases.values())
    with pytest.raises(AdmmPruneError, match="layer_errors"):
        _cfg(corpus, method="magnitude", layer_errors=True)


def test_a_callback_always_gets_the_full_gram(corpus):
    model, tok = models.tiny_model("llama")
    shapes = set()
    pipeline.run_prune(_cfg(corpus, method="wanda", eval=None), model=model, tokenizer=tok,
                       callback=lambda b, n, W, XtX, r: shapes.add(XtX.ndim))
    assert shapes == {2}
