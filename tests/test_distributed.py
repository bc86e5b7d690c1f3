"""Two CPU ranks (gloo, launched by torchrun) against one process: the same pruned model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from synth import write_corpus

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from admm_prune.gpu.engine import distributed  # noqa: E402
from admm_prune.gpu.checkpoint import models  # noqa: E402
from admm_prune.gpu.engine import pipeline  # noqa: E402
from admm_prune.gpu.config import PruneConfig  # noqa: E402

SCRIPT = textwrap.dedent("""
    import json, sys
    from admm_prune.gpu.engine import distributed
    from admm_prune.gpu.engine import pipeline
    from admm_prune.gpu.config import PruneConfig
    ck, calib, evalf, out, method, profile = sys.argv[1:7]
    steps = int(sys.argv[7]) if len(sys.argv) > 7 else 0
    dist = distributed.init_from_env("cpu") if distributed.launched_by_torchrun() else distributed.current()
    try:
        cfg = PruneConfig(model=ck, calib=calib, eval=evalf, eval_windows=4, nsamples=6, seqlen=32,
                          iters=6, mask_steps=4, method=method, device="cpu", progress=False,
                          out=out, layer_errors=True, sparsity_profile=profile,
                          reconstruct_steps=steps, reconstruct_lr=1e-4, reconstruct_batch=2)
        report = pipeline.run_prune(cfg)
        print("REPORT", json.dumps({"rank": dist.rank, "world": report.world_size,
                                    "errors": [r["error_pruned"] for r in report.linears],
                                    "perplexity": report.perplexity, "targets": report.block_sparsity,
                                    "recon": report.block_reconstruction}))
    finally:
        distributed.finish(dist)
""")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = write_corpus(tmp_path_factory.mktemp("dist"), seed=2, min_words=40)
    model, tok = models.tiny_model("llama", num_hidden_layers=3)
    model.save_pretrained(d / "ck")
    tok.save_pretrained(d / "ck")
    (d / "run.py").write_text(SCRIPT)
    return d


def _run(d, n, out, method, profile="uniform", steps=0):
    """`n` torchrun ranks (n > 1) or one plain process, each at one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)] if n > 1 else []
    cmd = [sys.executable, *launch, str(d / "run.py"), str(d / "ck"), str(d / "calib.jsonl"), str(d / "eval.txt"),
           str(out), method, profile, str(steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line.split("REPORT ", 1)[1]) for line in proc.stdout.splitlines() if "REPORT " in line]


def _weights(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).state_dict()


@pytest.mark.parametrize("method, profile", [("admm-grad", "uniform"), ("sparsegpt", "uniform"), ("wanda", "owl")])
def test_two_ranks_prune_what_one_process_prunes(setup, tmp_path, method, profile):
    """At the same threads per process, 2 ranks give one process's checkpoint bit for bit:
    each window's forward is the same, and the Grams are float64 sums (order-free), so
    every mask, weight and layer error is the same; the perplexity sums differ in order only."""
    d = setup
    (one,) = _run(d, 1, tmp_path / "one", method, profile)
    reports = _run(d, 2, tmp_path / "two", method, profile)
    assert reports[0]["targets"] == one["targets"], "OWL's outlier ratios and targets: the same"
    assert one["world"] == 1
    assert sorted(r["rank"] for r in reports) == [0, 1] and all(r["world"] == 2 for r in reports)
    assert reports[0]["perplexity"] == reports[1]["perplexity"], "every rank reports the same numbers"
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"weights differ: {differ[:5]}"
    assert reports[0]["errors"] == one["errors"]
    for key in ("dense", "pruned"):
        assert reports[0]["perplexity"][key] == pytest.approx(one["perplexity"][key], rel=1e-6)
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["world_size"] == 2
    assert not list(tmp_path.glob(".two*")), "rank 0 alone staged, and cleaned up"


def test_two_ranks_reconstruct_with_summed_gradients(setup, tmp_path):
    """With block reconstruction each rank draws its minibatches from its own windows and the
    gradients are summed: both ranks take the same steps, so they report the same errors and
    rank 0 writes a checkpoint whose blocks are the tuned ones."""
    reports = _run(setup, 2, tmp_path / "two", "admm-grad", steps=4)
    recon = reports[0]["recon"]
    same = [{k: v for k, v in r.items() if k != "seconds"} for r in recon]
    assert len(recon) == 3 and [{k: v for k, v in r.items() if k != "seconds"} for r in reports[1]["recon"]] == same
    assert all(r["error_after"] < r["error_before"] and not r["reverted"] for r in recon), recon
    saved = json.loads((tmp_path / "two" / "report.json").read_text())["block_reconstruction"]
    assert [r["error_after"] for r in saved] == [r["error_after"] for r in recon]


def test_assignment_balances_cost():
    dist = distributed.Dist(rank=0, world=2)
    owners = dist.assign([10.0, 1.0, 9.0, 2.0])
    loads = [sum(c for c, o in zip([10.0, 1.0, 9.0, 2.0], owners) if o == r) for r in range(2)]
    assert sorted(loads) == [11.0, 11.0]
    assert distributed.Dist().assign([3.0, 1.0]) == [0, 0]


def test_too_few_windows_for_the_ranks_fails_on_every_rank(setup, tmp_path):
    d = setup
    script = tmp_path / "few.py"
    script.write_text(SCRIPT.replace("nsamples=6", "nsamples=1"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(d / "ck"), str(d / "calib.jsonl"), str(d / "eval.txt"),
                           str(tmp_path / "o"), "wanda", "uniform"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("1 calibration windows for 2 ranks") == 2
    assert not (tmp_path / "o").exists()


def test_resume_with_another_world_size_fails_on_every_rank(setup, tmp_path):
    """Blocks staged by one process are not resumed by 2 ranks: both fail with the same
    line (rank 0 alone reads the staging folder and broadcasts its verdict), nothing hangs,
    and the finished block stays for a resume with the right world size."""
    d = setup
    out = tmp_path / "o"

    def stop(block, *args):
        if block == 1:
            raise KeyboardInterrupt

    cfg = dict(model=str(d / "ck"), calib=str(d / "calib.jsonl"), eval=str(d / "eval.txt"), eval_windows=4,
               nsamples=6, seqlen=32, iters=6, mask_steps=4, method="wanda", device="cpu", progress=False,
               out=str(out), layer_errors=True)  # the script's config, at world size 1
    with pytest.raises(pipeline.RunInterrupted, match="--resume"):
        pipeline.run_prune(PruneConfig(**cfg), callback=stop)
    script = tmp_path / "resume.py"
    script.write_text(SCRIPT.replace("layer_errors=True,", "layer_errors=True, resume=True,"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(d / "ck"), str(d / "calib.jsonl"), str(d / "eval.txt"), str(out), "wanda", "uniform"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("world_size was 1, now 2") == 2, proc.stderr[-3000:]
    assert not out.exists() and (tmp_path / ".o.staging").is_dir()


def test_torchrun_cli_two_ranks(setup, tmp_path):
    """The documented command: torchrun ... -m admm_prune.gpu prune; rank 0 alone prints and writes."""
    d = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "admm_prune.gpu", "prune", "--model", str(d / "ck"), "--calib", str(d / "calib.jsonl"),
           "--nsamples", "4", "--seqlen", "32", "--eval", "none", "--method", "wanda", "--device", "cpu",
           "--no-progress", "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"mean_sparsity"') == 1, "one summary, from rank 0"
    assert json.loads((tmp_path / "o" / "report.json").read_text())["world_size"] == 2
