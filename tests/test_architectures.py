"""Architectures beyond LLaMA: prunable linears found by type and chosen by --targets/--ignore,
grouped by the input they read in a forward, pruned through the CLI, reloaded by transformers."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
from synth import write_corpus

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import admm_prune.reference as R  # noqa: E402
from admm_prune.gpu import cli  # noqa: E402
from admm_prune.gpu.evaluation import evaluate  # noqa: E402
from admm_prune.gpu.checkpoint import models  # noqa: E402
from admm_prune.gpu.engine import pipeline  # noqa: E402
from admm_prune.reference.errors import AdmmPruneError  # noqa: E402
from admm_prune.gpu.engine.calibration import capture_block_inputs, shared_input_groups  # noqa: E402
from torch import nn  # noqa: E402

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3"]
LLAMA_GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
GROUPS = {arch: LLAMA_GROUPS for arch in ARCHS} | {
    # fused: one linear per shared input; qkv_proj is used before o_proj, defined after it
    "phi3": [["self_attn.qkv_proj"], ["self_attn.o_proj"], ["mlp.gate_up_proj"], ["mlp.down_proj"]],
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), seed=2)


def _args(corpus, model_dir, out, *extra):
    return ["prune", "--model", str(model_dir), "--calib", str(corpus / "calib.jsonl"), "--nsamples", "4",
            "--seqlen", "32", "--iters", "4", "--mask-steps", "2", "--eval", "none", "--device", "cpu",
            "--no-progress", "--out", str(out), *extra]


def _cli(args, capsys) -> tuple[int, str]:
    capsys.readouterr()  # drop what came before (save_pretrained's progress bars)
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(args)
    return code, capsys.readouterr().err


def _save(tmp_path, arch, **overrides):
    model, tok = models.tiny_model(arch, **overrides)
    path = tmp_path / arch
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _block_inputs(model, n=2, seqlen=16):
    ids = torch.randint(0, model.config.vocab_size, (n, seqlen), generator=torch.Generator().manual_seed(0))
    return capture_block_inputs(model, ids, torch.device("cpu"), torch.device("cpu"), progress=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_groups_are_found_from_the_forward(arch):
    model, _ = models.tiny_model(arch)
    inps, kwargs = _block_inputs(model)
    for i, block in enumerate(model.model.layers):
        names = models.prunable_linears(block)
        assert shared_input_groups(block, names, inps[:1], kwargs.at(i), "cpu") == GROUPS[arch]
    if arch == "llama":  # a subset keeps the order; a group may lose members
        names = models.prunable_linears(block, ignore=("k_proj", "up_proj"))
        assert shared_input_groups(block, names, inps[:1], kwargs.at(i), "cpu") == [
            ["self_attn.q_proj", "self_attn.v_proj"], ["self_attn.o_proj"], ["mlp.gate_proj"], ["mlp.down_proj"]]


class _Toy(nn.Module):
    """a, b read x; c reads a copy of x (equal values, another tensor); d reads a(x); e is unused
    unless `use_e`; f reads x and then a(x) (two calls: not grouped with a or d)."""

    def __init__(self, use_e=False):
        super().__init__()
        self.use_e = use_e
        self.d, self.c, self.b, self.a, self.e, self.f = (nn.Linear(4, 4) for _ in range(6))

    def forward(self, x):
        y = self.a(x)
        return self.b(x) + self.c(x.clone()) + self.d(y) + self.f(x) + self.f(y) + (self.e(x) if self.use_e else 0)


def test_grouping_is_by_the_very_same_tensor_in_every_call():
    toy, x = _Toy(), torch.randn(1, 3, 4)
    names = [n for n, m in toy.named_modules() if isinstance(m, nn.Linear) and n != "e"]
    assert shared_input_groups(toy, names, x, {}, "cpu") == [["b", "a"], ["c"], ["d"], ["f"]]
    with pytest.raises(models.ModelError, match="^e of _Toy received no input in a forward"):
        shared_input_groups(toy, names + ["e"], x, {}, "cpu")
    toy.use_e = True
    assert shared_input_groups(toy, names + ["e"], x, {}, "cpu") == [["b", "a", "e"], ["c"], ["d"], ["f"]]


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_through_the_cli_reloaded_and_streamed_equals_in_memory(corpus, tmp_path, capsys, arch):
    ck = _save(tmp_path, arch)
    code, err = _cli(_args(corpus, ck, tmp_path / "out"), capsys)
    assert code == 0, err
    dense, tok = models.tiny_model(arch)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True)
    assert type(reloaded) is type(dense)
    pruned = {f"model.layers.{i}.{n}.weight" for i, block in enumerate(reloaded.model.layers)
              for n in models.prunable_linears(block)}
    assert len(pruned) == sum(len(g) for g in GROUPS[arch]) * len(reloaded.model.layers)
    after, before = reloaded.state_dict(), dense.state_dict()
    for k, W in after.items():
        if k in pruned:  # every row exactly half zeros: 50 % inside the decoder layers
            assert torch.all((W == 0).sum(dim=1) == R.prune_count(W.shape[1], 0.5)), k
        else:
            assert torch.equal(W, before[k]), f"{k} must be untouched"
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {f"model.layers.{r['block']}.{r['name']}.weight" for r in report["linears"]} == pruned
    cfg = pipeline.PruneConfig(calib=str(corpus / "calib.jsonl"), nsamples=4, seqlen=32, iters=4, mask_steps=2,
                               eval=None, device="cpu", progress=False)
    pipeline.run_prune(cfg, model=dense, tokenizer=tok)
    for k, W in dense.state_dict().items():
        assert torch.equal(after[k], W), f"streamed != in memory: {k}"


def test_ignore_and_targets_leave_linears_dense(corpus, tmp_path, capsys):
    ck = _save(tmp_path, "qwen3")
    dense = models.tiny_model("qwen3")[0].state_dict()
    runs = {"ignore": (["--ignore", "o_proj,mlp.down"], ("o_proj", "down_proj")),
            "targets": (["--targets", r"self_attn\.[qk]_proj,up", "--method", "wanda"],
                        ("v_proj", "o_proj", "gate_proj", "down_proj"))}
    for name, (flags, kept) in runs.items():
        code, err = _cli(_args(corpus, ck, tmp_path / name, *flags), capsys)
        assert code == 0, err
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name, local_files_only=True)
        for k, W in reloaded.state_dict().items():
            if k.endswith("_proj.weight"):
                sparsity = float((W == 0).float().mean())
                assert sparsity == (0.0 if any(n in k for n in kept) else 0.5), k
        report = json.loads((tmp_path / name / "report.json").read_text())
        assert len(report["linears"]) == 2 * (7 - len(kept))
        assert report["config"][name] == flags[1].split(",")
        assert evaluate.linear_sparsity(reloaded) < 0.5
        assert evaluate.linear_sparsity(reloaded, ignore=kept) == pytest.approx(0.5)


def test_bad_targets_are_one_line_errors(corpus, tmp_path, capsys):
    ck = _save(tmp_path, "llama")
    for flags, message in [(["--targets", "q_proj,("], "--targets: '(' is not a regular expression"),
                           (["--ignore", "proj"], "--targets [] and --ignore ['proj'] leave no linear of block 0 "
                                                 "(LlamaDecoderLayer) to prune")]:
        code, err = _cli(_args(corpus, ck, tmp_path / "out", *flags), capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, err
        assert not (tmp_path / "out").exists()
    with pytest.raises(AdmmPruneError, match="targets must be a tuple of regular expressions"):
        pipeline.PruneConfig(targets="q_proj")
    assert pipeline.PruneConfig(ignore=["o_proj"]).ignore == ("o_proj",)


def test_resume_refuses_other_targets():
    base = pipeline.PruneConfig().fingerprint()
    assert "targets" not in base and "ignore" not in base  # unset: staging folders of older versions resume
    assert pipeline.PruneConfig(targets=("mlp",)).fingerprint() != base
    assert pipeline.PruneConfig(ignore=("mlp",)).fingerprint() != base


def test_unknown_experts_are_refused_by_prune_in_one_line_and_evaluated(corpus, tmp_path, capsys):
    """gpt-oss keeps biases beside its packed experts, a layout this version does not prune:
    prune names the module in one line before any work; eval, which prunes nothing, runs."""
    ck = _save(tmp_path, "gpt_oss")
    code, err = _cli(_args(corpus, ck, tmp_path / "out"), capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("admm-prune: error: GptOssForCausalLM: model.layers.0.mlp.experts: GptOssExperts stores "
                          "gate_up_proj, down_proj as 3-D parameters [4, 64, 128]"), err
    assert not (tmp_path / "out").exists()
    code, err = _cli(["eval", "--model", str(ck), "--eval", str(corpus / "eval.txt"), "--seqlen", "32",
                      "--eval-windows", "2", "--device", "cpu", "--no-progress"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("arch, overrides", [
    ("gemma2", dict(sliding_window=16)),  # alternating sliding and full attention
    ("qwen2", dict(use_sliding_window=True, sliding_window=16, max_window_layers=1)),  # full, then sliding
    ("mistral", dict(sliding_window=16)),  # every layer sliding: one mask
])
def test_block_by_block_forwards_match_the_model_beyond_a_sliding_window(arch, overrides, corpus):
    """Windows longer than the sliding window: where layers mix attention types, each block gets
    the mask of its own type (`BlockKwargs`), so the streamed perplexity is the model's own
    (with block 0's mask everywhere the full-attention blocks would see only 16 tokens), and a
    prune at such lengths runs."""
    model, tok = models.tiny_model(arch, **overrides)
    windows = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = torch.stack([model(input_ids=w[None], labels=w[None]).loss for w in windows]).mean()
    assert evaluate.perplexity(model, windows, "cpu", progress=False) == pytest.approx(math.exp(loss), rel=1e-5)
    cfg = pipeline.PruneConfig(calib=str(corpus / "calib.jsonl"), nsamples=2, seqlen=32, iters=2, mask_steps=1,
                               eval=None, device="cpu", progress=False)
    report = pipeline.run_prune(cfg, model=model, tokenizer=tok)
    assert report.summary()["mean_sparsity"] == pytest.approx(0.5, abs=0.01)
