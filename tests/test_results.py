"""Results people can look at (issue 29, item 6): the bench's picture (PREFIX.png: perplexity
against sparsity, one line per method, the seeds' spread as error bars) and the pruned
checkpoint's model card (README.md in the model hub's convention)."""

from __future__ import annotations

import logging
import shlex
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
yaml = pytest.importorskip("yaml")
from synth import write_corpus  # noqa: E402

from admm_prune.gpu import cli  # noqa: E402
from admm_prune.gpu.bench import bench, plot  # noqa: E402
from admm_prune.gpu.checkpoint import card, models  # noqa: E402
from admm_prune.gpu.config import PruneConfig  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), seed=3)


def _bench(corpus, out, methods=("magnitude", "wanda")):
    model, tok = models.tiny_model("llama")
    cfg = bench.BenchConfig(calib=str(corpus / "calib.jsonl"), eval=str(corpus / "eval.txt"), nsamples=4, seqlen=32,
                            eval_seqlen=64, eval_windows=2, settings=("0.5", "0.8", "2:4"), seeds=(0, 1), peers=(),
                            methods=methods, device="cpu", progress=False, out=str(out))
    return bench.run_bench(cfg, model=model, tokenizer=tok)


def test_bench_writes_a_png_of_perplexity_against_sparsity(corpus, tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    result = _bench(corpus, tmp_path / "b")
    png = tmp_path / "b.png"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (700, 450)
        image.verify()
    lines = plot.bench_points(result["summary"])
    assert set(lines) == {"magnitude", "wanda", "magnitude (2:4)", "wanda (2:4)"}  # N:M apart from the curve
    assert [x for x, *_ in lines["wanda"]] == [0.5, 0.8] and [x for x, *_ in lines["wanda (2:4)"]] == [0.5]
    row = next(r for r in result["summary"] if r["method"] == "wanda" and r["setting"] == "0.8")
    assert lines["wanda"][1][1:3] == (row["perplexity_mean"], row["perplexity_std"]) and row["perplexity_std"] > 0
    assert plot.log_scale([15.0, 300.0]) and not plot.log_scale([15.0, 40.0])


def test_without_matplotlib_the_bench_writes_its_tables_and_warns(corpus, tmp_path, monkeypatch, caplog):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails
    monkeypatch.setattr(plot, "_warned", [])  # the warning is given once per process
    with caplog.at_level(logging.WARNING):
        _bench(corpus, tmp_path / "b", methods=("magnitude",))
    assert (tmp_path / "b.json").is_file() and (tmp_path / "b.md").is_file() and not (tmp_path / "b.png").exists()
    assert sum("matplotlib is not installed" in r.getMessage() for r in caplog.records) == 1


def test_a_plot_that_fails_costs_the_bench_nothing_but_its_png(corpus, tmp_path, monkeypatch, caplog):
    pytest.importorskip("matplotlib")

    def broken(*args):
        raise ValueError("no such colormap")

    monkeypatch.setattr(plot, "_draw", broken)
    with caplog.at_level(logging.WARNING):
        result = _bench(corpus, tmp_path / "b", methods=("magnitude",))
    assert result["runs"] and (tmp_path / "b.json").is_file() and not (tmp_path / "b.png").exists()
    assert any("plotting failed (no such colormap)" in r.getMessage() for r in caplog.records)


def test_prune_writes_a_model_card(corpus, tmp_path):
    model, tok = models.tiny_model("llama")
    model.save_pretrained(tmp_path / "ck")
    tok.save_pretrained(tmp_path / "ck")
    (tmp_path / "ck" / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    argv = ["prune", "--model", str(tmp_path / "ck"), "--method", "wanda", "--sparsity", "0.6",
            "--calib", str(corpus / "calib.jsonl"), "--nsamples", "4", "--seqlen", "32", "--eval",
            str(corpus / "eval.txt"), "--eval-windows", "2", "--out", str(tmp_path / "out"), "--device", "cpu",
            "--no-progress"]
    assert cli.main(argv) == 0
    text = (tmp_path / "out" / "README.md").read_text()
    front = card.front_matter(text)
    assert front["tags"] == ["pruned", "sparse", "admm-prune", "wanda"] and front["pipeline_tag"] == "text-generation"
    assert front["license"] == "mit" and "base_model" not in front  # a local folder names no hub model
    report = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True)
    assert report.model.layers[0].mlp.up_proj.weight.eq(0).float().mean().item() == pytest.approx(0.6, abs=0.01)
    import json

    ppl = json.loads((tmp_path / "out" / "report.json").read_text())["perplexity"]
    assert f"pruned **{ppl['pruned']:.3f}**" in text and f"dense {ppl['dense']:.3f}" in text
    assert "60 %" in text and "4 windows x 32 tokens" in text
    command = text.split("```\n")[1].splitlines()[0]  # the command that made it gives the same config
    again = vars(cli.build_parser().parse_args(shlex.split(command)[1:]))
    again.pop("command"), again.pop("verbose")
    original = vars(cli.build_parser().parse_args(argv))
    original.pop("command"), original.pop("verbose")
    assert PruneConfig(**again) == PruneConfig(**original)


def test_base_model_is_named_where_it_is_known(tmp_path):
    assert card.base_model({"name": "smollm2"}) == card.EMBEDDED_BASE
    snap = "/root/.cache/huggingface/hub/models--meta-llama--Llama-2-7b-hf/snapshots/abc123"
    assert card.base_model({"name": "/some/link", "path": snap}) == "meta-llama/Llama-2-7b-hf"
    assert card.base_model({"name": "meta-llama/Llama-2-7b-hf", "path": snap}) == "meta-llama/Llama-2-7b-hf"
    (tmp_path / "a").mkdir()
    assert card.base_model({"name": str(tmp_path / "a"), "path": str(tmp_path / "a")}) is None
    assert card.base_model({"name": "(in memory)"}) is None
    assert card.front_matter("# no front matter\n") == {} and card.front_matter("---\n: [\n---\n") == {}
