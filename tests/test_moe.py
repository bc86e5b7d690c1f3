"""Mixture-of-experts through the CLI (issue #27): tiny Mixtral, Qwen3-MoE, OLMoE and Llama-4
checkpoints pruned to 50 % by ``admm-prune prune``, saved under the input's own tensor names,
every expert pruned, routers dense, reloaded by transformers and generating; 16 experts top-2
calibrated on 8 tokens (most experts see none) still pruned, finite, and reported."""

from __future__ import annotations

import contextlib
import io
import json
import re

import pytest
from synth import write_corpus

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import moe_synth  # noqa: E402
from safetensors import safe_open  # noqa: E402

import admm_prune.reference as R  # noqa: E402
from admm_prune.gpu import cli  # noqa: E402

ARCHS = ["mixtral", "qwen3_moe", "olmoe", "llama4_text"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), seed=3)


def _args(corpus, model_dir, out, *extra, nsamples=4, seqlen=32):
    return ["prune", "--model", str(model_dir), "--calib", str(corpus / "calib.jsonl"), "--nsamples", str(nsamples),
            "--seqlen", str(seqlen), "--iters", "4", "--mask-steps", "2", "--eval", "none", "--device", "cpu",
            "--no-progress", "--out", str(out), *extra]


def _cli(args, capsys) -> tuple[int, str]:
    capsys.readouterr()  # drop what came before (save_pretrained's progress bars)
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(args)
        except SystemExit as e:  # argparse's own refusals
            code = e.code
    return code, capsys.readouterr().err


def _tensor_names(folder) -> set[str]:
    """Every tensor name in the safetensors files of `folder`."""
    names = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            names |= set(f.keys())
    return names


def _load(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


def _rows_half_zero(W) -> bool:
    return bool(torch.all((W == 0).sum(dim=1) == R.prune_count(W.shape[1], 0.5)))


def _expert_tokens(report) -> dict[tuple[int, int], int]:
    """(block, expert) -> calibration tokens routed to it, from report.json's linears (an expert's
    rows, ``mlp.experts.3.gate_up_proj`` and ``mlp.experts.3.down_proj``, carry ``tokens``)."""
    out = {}
    for row in report["linears"]:
        if row.get("tokens") is not None:
            key = (row["block"], int(re.search(r"experts\.(\d+)\.", row["name"]).group(1)))
            assert out.setdefault(key, row["tokens"]) == row["tokens"], f"{row['name']}: one expert, one count"
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_moe_pruned_to_half_in_its_own_layout_routers_dense_and_generating(corpus, tmp_path, capsys, arch):
    ck = moe_synth.save_tiny_moe(tmp_path / arch, arch)
    code, err = _cli(_args(corpus, ck, tmp_path / "out", "--moe-calibration", "routed"), capsys)
    assert code == 0, err
    assert _tensor_names(tmp_path / "out") == _tensor_names(ck)  # e.g. Mixtral's experts.N.w1 on disk
    dense, pruned = _load(ck), _load(tmp_path / "out")
    assert type(pruned) is type(dense)
    experts = moe_synth.expert_matrices(pruned)
    moe_blocks = {name.split(".")[1] for name in moe_synth.router_weights(dense)}
    assert len(experts) == 3 * 4 * len(moe_blocks)
    for name, W in experts.items():  # every row of every expert's gate, up and down: half zeros
        assert torch.isfinite(W).all() and _rows_half_zero(W), name
    for name, W in moe_synth.router_weights(pruned).items():
        assert torch.equal(W, moe_synth.router_weights(dense)[name]), f"{name} must stay dense and untouched"
    linears = moe_synth.dense_linears(pruned)  # attention, shared expert, dense-layer MLP
    assert any("self_attn.q_proj" in n for n in linears)
    for name, W in linears.items():
        assert _rows_half_zero(W), name
    before = dict(dense.named_parameters())
    for name, p in pruned.named_parameters():  # embeddings, norms, lm_head: bit-equal
        if not (name.endswith("_proj.weight") and ".layers." in name) and ".experts." not in name:
            assert torch.equal(p, before[name]), f"{name} must be untouched"
    ids = torch.tensor([[1, 70, 71, 72]])
    with torch.no_grad():
        generated = pruned.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=2)
    assert generated.shape == (1, 8)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    tokens = _expert_tokens(report)
    top_k, windows = pruned.config.num_experts_per_tok, 4 * 32
    for block in {b for b, _ in tokens}:  # each token reaches top_k experts of each MoE block
        assert sum(n for (b, _), n in tokens.items() if b == block) == top_k * windows


def test_sixteen_experts_top2_on_eight_tokens_all_pruned_finite_and_reported(corpus, tmp_path, capsys):
    """8 calibration tokens, 16 experts, top-2: at most 16 (token, expert) pairs per block, so
    most experts get no token; each is still pruned to 50 % by the stated fallback, finite."""
    ck = moe_synth.save_tiny_moe(tmp_path / "m16", "mixtral16")
    code, err = _cli(_args(corpus, ck, tmp_path / "out", nsamples=1, seqlen=8), capsys)
    assert code == 0, err
    assert _tensor_names(tmp_path / "out") == _tensor_names(ck)
    pruned = _load(tmp_path / "out")
    experts = moe_synth.expert_matrices(pruned)
    assert len(experts) == 2 * 16 * 3
    for name, W in experts.items():
        assert torch.isfinite(W).all() and _rows_half_zero(W), name
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    tokens = _expert_tokens(report)
    assert set(tokens) == {(b, e) for b in range(2) for e in range(16)}  # the experts with 0 tokens too
    for block in range(2):
        assert sum(tokens[block, e] for e in range(16)) == 2 * 8
    assert min(tokens.values()) == 0
    for row in report["linears"]:  # the stated fallback, named where it was used
        if row.get("tokens") is not None:
            assert bool(row.get("fallback")) == (row["tokens"] == 0), row


def test_routed_and_all_token_grams_differ_and_report_the_tokens_each_expert_saw(corpus, tmp_path, capsys):
    ck = moe_synth.save_tiny_moe(tmp_path / "mixtral", "mixtral")
    out = {}
    for mode in ("routed", "all"):
        code, err = _cli(_args(corpus, ck, tmp_path / mode, "--moe-calibration", mode), capsys)
        assert code == 0, err
        out[mode] = moe_synth.expert_matrices(_load(tmp_path / mode))
        report = json.loads((tmp_path / mode / "report.json").read_text())
        assert report["config"]["moe_calibration"] == mode
        tokens = _expert_tokens(report)  # the tokens each expert's Gram saw
        if mode == "all":
            assert set(tokens.values()) == {4 * 32}
        else:  # each token reaches 2 experts of each block
            assert all(sum(n for (b, _), n in tokens.items() if b == block) == 2 * 4 * 32 for block in (0, 1))
    assert any(not torch.equal(out["routed"][k], out["all"][k]) for k in out["routed"])


def test_bad_moe_calibration_is_one_line_naming_the_flag(corpus, tmp_path, capsys):
    ck = moe_synth.save_tiny_moe(tmp_path / "mixtral", "mixtral")
    code, err = _cli(_args(corpus, ck, tmp_path / "out", "--moe-calibration", "sometimes"), capsys)
    assert code == 2 and err.count("\n") == 1 and "--moe-calibration" in err and "routed" in err, err
    assert not (tmp_path / "out").exists()


def test_upcycled_model_computes_what_the_dense_model_computes():
    """benchmarks/upcycle_moe.py on a tiny LLaMA: 8 identical experts, top-2 renormalized, so the
    MoE's logits are the dense model's up to rounding; the k-means router spreads the tokens."""
    pytest.importorskip("sklearn")
    from admm_prune.gpu.checkpoint import models

    upcycle = _benchmark("upcycle_moe")
    for tied in (False, True):
        dense, _ = models.tiny_model("llama", tie_word_embeddings=tied)
        ids = torch.randint(3, 259, (2, 32), generator=torch.Generator().manual_seed(0))
        routers, loads = zip(*(upcycle.router_from_centroids(X, 8, seed=0, scale=10.0)
                               for X in upcycle.mlp_inputs(dense, ids)))
        moe = upcycle.upcycle(dense, list(routers), experts=8, top_k=2)
        assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.num_local_experts == 8
        assert (moe.lm_head.weight is moe.model.embed_tokens.weight) == tied
        assert all(share.max() < 0.9 for share in loads)  # no expert takes (almost) every token
        with torch.no_grad():
            torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=0, atol=1e-5)


def _benchmark(name):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_routed_vs_all_table_pairs_runs_by_seed():
    bench = _benchmark("moe_routed_vs_all")
    runs = [dict(sparsity=0.7, mode=m, seed=s, num_blocks=0, perplexity=p, dense_perplexity=15.0, seconds=1.0)
            for m, s, p in [("routed", 0, 30.0), ("all", 0, 40.0), ("routed", 1, 36.0), ("all", 1, 40.0),
                            ("routed", 2, 10.0)]]  # seed 2 has no all-token run: left out
    runs.append(dict(runs[0], num_blocks=2, perplexity=1.0))  # a timing probe: left out
    row = bench.table({"runs": runs}).splitlines()[2]
    assert row == "| 0.7 | 33.000 ± 4.243 | 40.000 ± 0.000 | 0.825 ± 0.106 | 0, 1 |"
