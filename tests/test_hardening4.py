"""Hardening, round 4 (#28 items 2-5, 7, 10, 13): seeds out of range, the bench's config checks,
resume after the model was replaced, the --overwrite swap, an interrupted bench, eval --out.
Each test failed before its fix (a silent alias, a traceback, a skipped check, an output lost
or replaced by less)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from synth import write_corpus

torch = pytest.importorskip("torch")

from admm_prune.gpu import cli  # noqa: E402
from admm_prune.gpu.bench import bench  # noqa: E402
from admm_prune.gpu.config import MAX_SEED, PruneConfig  # noqa: E402
from admm_prune.reference.errors import AdmmPruneError  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), seed=0)


def _refused(argv, capsys) -> str:
    """`argv` exits 2 with one line; returns it."""
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# --- seeds (items 5, 10) -------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1, 9_300_000_000_000, 2**64])
def test_a_seed_out_of_range_is_refused_in_one_line(seed, capsys):
    """Negative seeds aliased their absolute value (random.Random(-1) == Random(1)); seeds
    >= ~9.2e12 overflowed the reconstruction's generator seed (a traceback after the first block)."""
    with pytest.raises(AdmmPruneError) as info:
        PruneConfig(seed=seed)
    assert info.value.field == "seed"
    line = _refused(["prune", "--seed", str(seed), "--reconstruct-steps", "2", "--eval", "none"], capsys)
    assert "--seed" in line and str(seed) in line and "Traceback" not in line, line


def test_the_largest_seed_runs_the_reconstruction(tmp_path, corpus):
    """MAX_SEED itself is accepted and seeds the reconstruction's generator without overflow."""
    from admm_prune.gpu.checkpoint import models
    from admm_prune.gpu.engine.pipeline import prune_model

    model, _ = models.tiny_model("llama")
    ids = torch.randint(0, 200, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = PruneConfig(seed=MAX_SEED, reconstruct_steps=1, reconstruct_batch=2, nsamples=4, seqlen=32, iters=2,
                      mask_steps=1, device="cpu", progress=False, eval=None)
    records, _ = prune_model(model, ids, cfg)
    assert records


@pytest.mark.parametrize("seeds", [(1, -1), (0, MAX_SEED + 1)])
def test_bench_seeds_out_of_range_are_refused(seeds, capsys):
    with pytest.raises(AdmmPruneError) as info:
        bench.BenchConfig(seeds=seeds)
    assert info.value.field == "seeds"
    line = _refused(["bench", "--seeds", ",".join(map(str, seeds)), "--peers", ""], capsys)
    assert "--seeds" in line, line


# --- BenchConfig's checks and fields (item 7) ----------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    (dict(reconstruct_batch=0), "reconstruct_batch"), (dict(reconstruct_steps=-1), "reconstruct_steps"),
    (dict(reconstruct_lr=float("nan")), "reconstruct_lr"), (dict(nsamples=0), "nsamples"),
    (dict(seqlen=1), "seqlen"), (dict(dtype="int8"), "dtype"), (dict(iters=0), "iters"),
    (dict(matmul_precision="medium"), "matmul_precision"), (dict(targets=("(",)), "targets"),
    (dict(ignore=("[",)), "ignore"), (dict(num_blocks=0), "num_blocks"),
])
def test_bench_config_runs_every_check(kwargs, field):
    """`super(SolverOptions, self).__post_init__()` skipped the checks of the classes after it
    in the MRO: `bench --reconstruct-batch 0` computed the dense perplexity, then skipped every run."""
    with pytest.raises(AdmmPruneError) as info:
        bench.BenchConfig(**kwargs)
    assert info.value.field == field


def test_bench_refuses_reconstruct_batch_0_before_any_work(capsys, monkeypatch):
    monkeypatch.setattr(bench, "_bench", lambda *a: pytest.fail("the bench started"))
    line = _refused(["bench", "--reconstruct-batch", "0", "--reconstruct-steps", "2", "--peers", ""], capsys)
    assert "--reconstruct-batch" in line, line


def test_bench_runs_keep_the_bench_settings():
    """The field copy reset matmul_precision, targets, ignore, true_sequential and num_blocks to
    their defaults in every run of the bench."""
    cfg = bench.BenchConfig(matmul_precision="highest", targets=("mlp",), ignore=("down_proj",),
                            true_sequential=True, num_blocks=1, reconstruct_steps=3, seqlen=64, nsamples=8)
    run = cfg.run_config("admm-grad", 0.6, "unstructured", {"reconstruct_steps": None}, seed=2)
    assert (run.matmul_precision, run.targets, run.ignore, run.true_sequential, run.num_blocks) == \
        ("highest", ("mlp",), ("down_proj",), True, 1)
    assert (run.reconstruct_steps, run.seqlen, run.nsamples, run.seed) == (3, 64, 8, 2)


def test_bench_cli_passes_the_run_settings_on():
    args = cli.build_parser().parse_args(["bench", "--matmul-precision", "highest", "--targets", "mlp",
                                          "--ignore", "down_proj", "--true-sequential", "--num-blocks", "1"])
    assert (args.matmul_precision, args.targets, args.ignore, args.true_sequential, args.num_blocks) == \
        ("highest", ("mlp",), ("down_proj",), True, 1)


# --- eval --out with PREFIX.json a directory (item 13) -------------------------------------------

@pytest.mark.parametrize("command, ext", [("eval", ".json"), ("eval", ".md"), ("bench", ".json"), ("bench", ".md")])
def test_a_report_path_that_is_a_directory_is_refused_before_any_work(command, ext, tmp_path, capsys, monkeypatch):
    """`eval --out P` with P.json a directory failed after the whole evaluation."""
    from admm_prune.gpu.evaluation import evaluate

    (tmp_path / f"r{ext}").mkdir()
    monkeypatch.setattr(evaluate, "_evaluate", lambda *a, **k: pytest.fail("the evaluation started"))
    monkeypatch.setattr(bench, "_bench", lambda *a, **k: pytest.fail("the bench started"))
    extra = ["--peers", ""] if command == "bench" else []
    line = _refused([command, "--out", str(tmp_path / "r"), "--eval", "x.txt", *extra], capsys)
    assert "--out" in line and f"r{ext}" in line and "directory" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"r{ext}"]  # nothing else written


# --- an interrupted bench (item 4) ---------------------------------------------------------------

def test_an_interrupted_bench_keeps_the_earlier_complete_result(corpus, tmp_path, monkeypatch):
    """A bench interrupted after its first run replaced an earlier complete PREFIX.json/.md by a
    1-row table that did not say it was partial. Now the runs so far go to PREFIX.partial.json/.md,
    marked partial, and PREFIX.json/.md change only when a bench completes."""
    from admm_prune.gpu.checkpoint import models

    model, tok = models.tiny_model("llama")
    prefix = tmp_path / "b"
    cfg = bench.BenchConfig(calib=str(corpus / "calib.jsonl"), eval=str(corpus / "eval.txt"), nsamples=4, seqlen=32,
                            eval_seqlen=64, eval_windows=2, settings=("0.5", "0.6"), peers=(), methods=("wanda",),
                            device="cpu", progress=False, out=str(prefix))
    bench.run_bench(cfg, model=model, tokenizer=tok)
    complete = {ext: (tmp_path / f"b{ext}").read_bytes() for ext in (".json", ".md")}
    assert len(json.loads(complete[".json"])["runs"]) == 2

    real, calls = bench.perplexity, []

    def interrupted(*a, **k):  # the dense perplexity, the first run's, then Ctrl-C in the second run's
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(bench, "perplexity", interrupted)
    with pytest.raises(KeyboardInterrupt, match="partial"):
        bench.run_bench(dataclasses.replace(cfg, seeds=(1,)), model=model, tokenizer=tok)
    assert {ext: (tmp_path / f"b{ext}").read_bytes() for ext in (".json", ".md")} == complete
    partial = json.loads((tmp_path / "b.partial.json").read_text())
    assert len(partial["runs"]) == 1 and partial["partial"] == {"runs": 1, "planned": 2}
    assert (tmp_path / "b.partial.md").read_text().startswith("**Partial:** 1 of 2 runs")

    monkeypatch.setattr(bench, "perplexity", real)  # a complete bench replaces the result, drops the partial one
    bench.run_bench(dataclasses.replace(cfg, seeds=(1,)), model=model, tokenizer=tok)
    import importlib.util
    png = ["b.png"] if importlib.util.find_spec("matplotlib") else []  # the plot, where matplotlib is installed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "b.md"] + png
    result = json.loads((tmp_path / "b.json").read_text())
    assert len(result["runs"]) == 2 and "partial" not in result and result["config"]["seeds"] == [1]


# --- resume checks the model's bytes (item 2) ----------------------------------------------------

def test_resume_refuses_a_model_replaced_by_one_of_the_same_sizes(tmp_path, corpus, capsys, monkeypatch):
    """The resume fingerprint held the shards' names and sizes: another model of the same shape
    saved at the same path resumed with exit 0, giving a checkpoint that mixed both models.
    The same model written again (new mtimes, same bytes) still resumes."""
    from admm_prune.gpu.checkpoint import models, sources

    ck, out = tmp_path / "ck", tmp_path / "out"

    def save(seed):
        model, tok = models.tiny_model("llama", seed=seed)
        model.save_pretrained(ck)
        tok.save_pretrained(ck)
        return (ck / "model.safetensors").read_bytes()

    first = save(0)
    block = sources.StreamedModel.block

    def interrupted_at_block_1(self, i, tensors=None):
        if i == 1:
            raise KeyboardInterrupt
        return block(self, i, tensors)

    argv = ["prune", "--model", str(ck), "--calib", str(corpus / "calib.jsonl"), "--eval", "none", "--nsamples", "4",
            "--seqlen", "32", "--iters", "4", "--mask-steps", "2", "--device", "cpu", "--no-progress",
            "--out", str(out), "--resume"]
    monkeypatch.setattr(sources.StreamedModel, "block", interrupted_at_block_1)
    assert cli.main(argv) == 130 and (tmp_path / ".out.staging" / "block-00000.safetensors").is_file()
    monkeypatch.undo()
    capsys.readouterr()

    other = save(1)
    assert len(other) == len(first) and other != first
    capsys.readouterr()  # save_pretrained's progress bar
    line = _refused(argv, capsys)
    assert "cannot --resume" in line and "model.safetensors" in line and "content" in line, line
    assert len(line) < 400, line

    assert save(0) == first  # the same bytes again: resumed
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["resumed_blocks"] == 1


def test_a_staging_folder_without_the_content_digest_is_refused_in_a_short_line():
    from admm_prune.gpu.checkpoint.staging import _change

    new = {"path": "ck", "files": {"model.safetensors": 10}, "content": {"model.safetensors": "ab" * 32}}
    said = _change("model", {k: v for k, v in new.items() if k != "content"}, new)
    assert said == "the staged run predates the check of the model's content; rerun without resume"
