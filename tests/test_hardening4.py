"""Hardening, round 4 (#28 items 2-5, 7, 10, 13): seeds out of range, the bench's config checks,
resume after the model was replaced, the --overwrite swap, an interrupted bench, eval --out.
Each test failed before its fix (a silent alias, a traceback, a skipped check, an output lost
or replaced by less)."""

from __future__ import annotations

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
