"""`admm-prune bench --seeds`: every method and setting once per calibration seed, mean and std
over the seeds, ratios to a baseline method paired per seed; what does not depend on the seed
(tokenization, the dense perplexity) computed once."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("torch")
from synth import write_corpus  # noqa: E402

from admm_prune.gpu.bench import bench  # noqa: E402
from admm_prune.gpu.data import corpus as data  # noqa: E402
from admm_prune.gpu.evaluation import evaluate  # noqa: E402
from admm_prune.gpu.checkpoint import models  # noqa: E402
from admm_prune.reference.errors import AdmmPruneError  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def test_seeds_give_mean_std_and_paired_ratios(corpus, tmp_path, monkeypatch):
    model, tok = models.tiny_model("llama")
    calls = {"ppl": 0, "sample": 0}
    real_ppl, real_sample = bench.perplexity, data.sample_calibration

    def ppl(*a, **k):
        calls["ppl"] += 1
        return real_ppl(*a, **k)

    def sample(*a, **k):
        calls["sample"] += 1
        return real_sample(*a, **k)

    monkeypatch.setattr(bench, "perplexity", ppl)
    monkeypatch.setattr(data, "sample_calibration", sample)
    cfg = bench.BenchConfig(calib=str(corpus / "calib.jsonl"), eval=str(corpus / "eval.txt"), nsamples=4,
                            seqlen=32, eval_seqlen=64, eval_windows=4, settings=("0.6",), peers=(),
                            methods=("wanda", "admm-grad"), seeds=(0, 1, 2), baseline_method="wanda",
                            iters=4, mask_steps=2, device="cpu", progress=False, out=str(tmp_path / "b"))
    res = bench.run_bench(cfg, model=model, tokenizer=tok)
    assert len(res["runs"]) == 3 * 2 and sorted({r["seed"] for r in res["runs"]}) == [0, 1, 2]
    assert calls == {"ppl": 1 + 6, "sample": 3}  # the dense perplexity once, one calibration per seed
    shas = {info["sha256"] for info in res["calibration"].values()}
    assert len(shas) == 3, "each seed draws its own windows"
    by = {(r["method"], r["seed"]): r["perplexity"] for r in res["runs"]}
    for row in res["summary"]:
        ppl_ = [by[(row["method"], s)] for s in (0, 1, 2)]
        mean = sum(ppl_) / 3
        assert row["perplexity_mean"] == pytest.approx(mean)
        assert row["perplexity_std"] == pytest.approx(math.sqrt(sum((p - mean) ** 2 for p in ppl_) / 2))
        ratios = [by[(row["method"], s)] / by[("wanda", s)] for s in (0, 1, 2)]
        assert row["ratios"] == pytest.approx(ratios)  # paired per seed, not a ratio of means
        assert row["ratio_mean"] == pytest.approx(sum(ratios) / 3)
        secs = {(r["method"], r["seed"]): r["prune_seconds"] for r in res["runs"]}
        assert row["time_ratios"] == pytest.approx([secs[(row["method"], s)] / secs[("wanda", s)] for s in (0, 1, 2)])
    wanda = next(r for r in res["summary"] if r["method"] == "wanda")
    assert wanda["ratio_mean"] == 1.0 and wanda["ratio_std"] == 0.0
    md = (tmp_path / "b.md").read_text()
    assert "Mean ± std over 3 calibration seeds" in md and "| 0.6 | admm-prune | admm-grad |" in md
    assert json.loads((tmp_path / "b.json").read_text())["summary"] == json.loads(json.dumps(res["summary"]))


def test_one_token_cache_gives_the_windows_of_a_fresh_one(corpus):
    _, tok = models.tiny_model("llama")
    texts = data.load_texts(str(corpus / "calib.jsonl"), split="train")
    cache = data.TokenCache(texts, tok, 32)
    for seed in (0, 5):
        shared, _ = data.sample_calibration(texts, tok, 4, 32, seed, cache)
        fresh, _ = data.sample_calibration(texts, tok, 4, 32, seed)
        assert shared.equal(fresh)


@pytest.mark.parametrize("kwargs, field", [
    (dict(seeds=()), "seeds"), (dict(seeds=(1, 1)), "seeds"), (dict(seed=3), "seed"),
    (dict(baseline_method="sparsegpt", methods=("wanda",)), "baseline_method"),
])
def test_bad_seeds_and_baseline_are_refused(kwargs, field):
    with pytest.raises(AdmmPruneError) as info:
        bench.BenchConfig(**kwargs)
    assert info.value.field == field


def test_cli_parses_seeds():
    from admm_prune.gpu import cli

    args = cli.build_parser().parse_args(["bench", "--seeds", "0,1,2", "--baseline-method", "admm-grad"])
    assert args.seeds == (0, 1, 2) and args.baseline_method == "admm-grad"
