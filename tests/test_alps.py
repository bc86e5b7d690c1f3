"""ALPS (`--method alps`): its schedule, its oracles, its torch twin, and the command line.

The generic invariants (exact counts, N:M groups, scale invariance, dead features, parity of
`prune_layer`) already run on ALPS through ``R.METHODS``; here is what is ALPS's own: the rho
schedule step by step, the step-through iterates against the torch twin, the PCG finish being
`polish_iterates`, the X = I and Wanda + exact-solve comparisons, and `prune`/`bench` runs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

import admm_prune.reference as R
from admm_prune.reference.alps import RHO_EVERY, RHO_MAX, RhoStep
from synth import outlier_layer, write_corpus

DAMP = R.DEFAULT_DAMP["alps"]


# ------------------------------------------------------------------ the schedule, scalar

@pytest.mark.parametrize("changed, kept, grown, expected", [
    (200, 1000, False, RhoStep(1.3, True, "grow")),     # > 10 % of the support moved
    (200, 1000, True, RhoStep(1.3, True, "grow")),
    (10, 1000, False, RhoStep(1.2, True, "grow")),      # > 0.5 %
    (3, 1000, True, RhoStep(1.1, True, "grow")),        # a few, once grown: creep
    (3, 1000, False, RhoStep(0.2, False, "restart")),   # a few, never grown: rho too large
    (0, 1000, True, RhoStep(1.0, True, "stop")),        # settled
    (0, 1000, False, RhoStep(0.2, False, "shrink")),    # frozen from the start
])
def test_rho_update_table(changed, kept, grown, expected):
    got = R.rho_update(1.0, changed, kept, grown)
    assert got.verdict == expected.verdict and got.grown == expected.grown
    assert got.rho == pytest.approx(expected.rho, rel=1e-15)


def test_rho_is_capped():
    assert R.rho_update(0.9 * RHO_MAX, 500, 1000, True).rho == RHO_MAX


def test_rescale_dual_keeps_the_unscaled_dual():
    U = np.random.default_rng(0).normal(size=(3, 4))
    np.testing.assert_allclose(2.6 * R.rescale_dual(U, 2.0, 2.6), 2.0 * U, rtol=1e-15)


# ------------------------------------------------------------------ the iterates, both backends

@given(seed=st.integers(0, 2**16), sparsity=st.sampled_from([0.5, 0.7]), group=st.sampled_from(["row", "layer"]),
       rho=st.sampled_from([0.01, 0.1, 10.0]))
def test_iterates_follow_the_schedule(backend, seed, sparsity, group, rho):
    """rho changes only at checks, as `rho_update` says; a restart goes back to the start; the
    loop ends at a stop/settled verdict or at `iters`; every Z is feasible."""
    W, XtX, _ = outlier_layer(seed, 6, 40)
    states = list(backend.alps_iterates(W, XtX, sparsity, group=group, rho=rho, iters=90))
    kept = int(states[0].M.sum())
    assert states[0].k == 1 and states[0].rho == rho
    grown = False
    for prev, s in zip(states, states[1:]):
        assert s.k == prev.k + 1 and int(s.M.sum()) == kept and np.all(s.Z[~s.M] == 0)
        if prev.k % RHO_EVERY:
            assert s.rho == prev.rho and prev.changed == -1 and prev.verdict == ""
            continue
        step = R.rho_update(prev.rho, prev.changed, kept, grown)
        assert prev.verdict == step.verdict, "stop and settled end the loop"
        assert s.rho == pytest.approx(step.rho, rel=1e-15)
        grown = step.grown
        if step.verdict == "restart":  # U restarts at 0, so after one update U = W - Z
            np.testing.assert_allclose(s.U, s.W - s.Z, rtol=0, atol=1e-12 * np.abs(s.W).max())
    assert states[-1].verdict in ("stop", "settled") or states[-1].k == 90


@given(seed=st.integers(0, 2**16), d_out=st.integers(1, 8), d_in=st.sampled_from([8, 16, 24, 40]),
       setting=st.sampled_from([0.5, 0.7, "2:4", "1:4", "4:8"]), group=st.sampled_from(["row", "layer"]),
       rho=st.sampled_from([0.1, 1.0]), damp=st.sampled_from([0.0, 0.01, 0.1]), iters=st.integers(1, 60))
@example(seed=1, d_out=16, d_in=64, setting=0.5, group="row", rho=10.0, damp=0.01, iters=90)  # a restart
def test_torch_iterates_equal_the_reference(seed, d_out, d_in, setting, group, rho, damp, iters):
    """Tier 1: float64 CPU, the same states (masks, rho, verdicts exactly; W, Z, U to 1e-9)."""
    torch = pytest.importorskip("torch")
    import admm_prune.gpu as G

    pattern, sparsity = (setting, None) if isinstance(setting, str) else ("unstructured", setting)
    W, XtX, _ = outlier_layer(seed, d_out, d_in)
    kw = dict(pattern=pattern, group=group, rho=rho, damp=damp, iters=iters)
    ref = list(R.alps_iterates(W, XtX, sparsity, **kw))
    out = list(G.alps_iterates(torch.from_numpy(W), torch.from_numpy(XtX), sparsity, **kw))
    assert [(a.k, a.rho, a.changed, a.verdict) for a in out] == [(b.k, b.rho, b.changed, b.verdict) for b in ref]
    floor = np.linalg.norm(W * R.precondition(W, XtX, damp).scale)
    for a, b in zip(out, ref):
        np.testing.assert_array_equal(a.M.numpy(), b.M)
        for name in ("W", "Z", "U"):
            x, y = getattr(a, name).numpy(), getattr(b, name)
            assert np.linalg.norm(x - y) <= 1e-9 * max(np.linalg.norm(y), floor), (a.k, name)
    if damp == 0.0:  # an undamped, singular Gram: the CG finish diverges (|W| ~ 1e25), each backend's own way
        return
    res = dict(pattern=pattern, group=group, damp=damp, alps_rho=rho, alps_iters=iters, method="alps")
    r_ref = R.prune_layer(W, XtX, sparsity, **res)
    r_out = G.prune_layer(torch.from_numpy(W), torch.from_numpy(XtX), sparsity, **res)
    np.testing.assert_array_equal(r_out.mask.numpy(), r_ref.mask)
    assert np.linalg.norm(r_out.W.numpy() - r_ref.W) <= 1e-9 * np.linalg.norm(r_ref.W)
    assert [h.k for h in r_out.history] == [h.k for h in r_ref.history] == [s.k for s in ref]


def test_a_restart_goes_back_to_the_start(backend):
    """rho = 10 freezes the support near the start; a small move before rho ever grew restarts
    from Z_0, U = 0 with rho / 5 (this layer shrinks rho at 3, restarts at 6)."""
    W, XtX, _ = outlier_layer(1, 16, 64)
    states = list(backend.alps_iterates(W, XtX, 0.5, rho=10.0, iters=90))
    i = next(j for j, s in enumerate(states) if s.verdict == "restart")
    after = states[i + 1]
    assert after.rho == pytest.approx(states[i].rho / 5, rel=1e-15)
    np.testing.assert_allclose(after.U, after.W - after.Z, rtol=0, atol=1e-12 * np.abs(after.W).max())
    first = next(backend.alps_iterates(W, XtX, 0.5, rho=after.rho, iters=1))  # the start, at the new rho
    np.testing.assert_allclose(after.W, first.W, rtol=1e-12, atol=1e-12 * np.abs(first.W).max())


# ------------------------------------------------------------------ prune_layer: oracles

def test_finish_is_polish_iterates_on_the_projected_last_iterate(backend):
    """ALPS = top |W| of its last iterate, then `alps_pcg_iters` steps of the project's CG."""
    W, XtX, _ = outlier_layer(4, 8, 32)
    r = backend.prune_layer(W, XtX, 0.6, method="alps", alps_pcg_iters=7)
    last = list(backend.alps_iterates(W, XtX, 0.6))[-1]
    M = R.select_mask(np.abs(last.W) * (np.diag(XtX) > 0), 0.6)
    np.testing.assert_array_equal(r.mask, M)
    *_, fin = backend.polish_iterates(W, XtX, M, last.W * M / last.scale, damp=DAMP, iters=7)
    np.testing.assert_allclose(r.W, fin.W / fin.scale, rtol=1e-12, atol=1e-12 * np.abs(W).max())
    assert len(r.history) == last.k


def test_given_mask_is_kept_and_finished_by_pcg(backend):
    W, XtX, _ = outlier_layer(5, 6, 24)
    M = R.prune_layer(W, XtX, 0.5, method="wanda").mask
    r = backend.prune_layer(W, XtX, None, method="alps", mask=M, alps_pcg_iters=60)
    np.testing.assert_array_equal(r.mask, M)
    exact = R.masked_lstsq(W, XtX, M, damp=DAMP)
    np.testing.assert_allclose(r.W, exact, atol=1e-8 * np.abs(exact).max())
    assert r.history == ()


@pytest.mark.parametrize("group", ["row", "layer"])
def test_identity_gram_one_iteration_is_magnitude_pruning(backend, group):
    """X = I: the optimum is magnitude pruning. One ALPS iteration keeps the magnitude mask and
    the PCG finish (G~ a multiple of I: one step) restores the dense weights on it. (Later
    iterations may move the support at small rho, before the schedule settles it: ADMM's dual
    pushes pruned entries back; paper_notes/alps.md has how far that lands from the optimum.)"""
    W = np.random.default_rng(1).normal(size=(6, 20))
    a = backend.prune_layer(W, np.eye(20), 0.5, method="alps", group=group, alps_iters=1)
    b = backend.prune_layer(W, np.eye(20), 0.5, method="magnitude", group=group)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_allclose(a.W, b.W, rtol=0, atol=1e-12)


def test_alps_beats_the_wanda_mask_solved_exactly_on_most_layers(backend):
    """The support search must pay: against the Wanda mask with its exact weights
    (`masked_lstsq`, ALPS's damping), ALPS's damped objective is lower on most of 12 layers and
    on average. (Not on every layer: a nonconvex search can end in a worse support.)"""
    ratios = []
    for seed in range(12):
        W, XtX, _ = outlier_layer(seed, 8, 48)
        r = backend.prune_layer(W, XtX, 0.7, method="alps")
        exact = R.masked_lstsq(W, XtX, R.prune_layer(W, XtX, 0.7, method="wanda").mask, damp=DAMP)
        Gd = XtX + DAMP * np.diag(np.diag(XtX))
        f = [np.sum(((V - W) @ Gd) * (V - W)) for V in (r.W, exact)]
        ratios.append(f[0] / f[1])
    assert np.mean(ratios) < 0.9 and sum(x < 1 for x in ratios) >= 10, ratios


def test_inputs_are_not_modified(backend):
    W, XtX, _ = outlier_layer(6, 5, 16)
    W0, X0 = W.copy(), XtX.copy()
    backend.prune_layer(W, XtX, None, method="alps", pattern="2:4")
    list(backend.alps_iterates(W, XtX, 0.5))
    np.testing.assert_array_equal(W, W0)
    np.testing.assert_array_equal(XtX, X0)


@pytest.mark.parametrize("kw, field", [(dict(alps_rho=0.0), "alps_rho"), (dict(alps_iters=0), "alps_iters"),
                                       (dict(alps_pcg_iters=-1), "alps_pcg_iters")])
def test_bad_alps_settings_name_their_field(kw, field):
    W, XtX, _ = outlier_layer(0, 2, 8)
    with pytest.raises(R.AdmmPruneError, match=field):
        R.prune_layer(W, XtX, 0.5, method="alps", **kw)
    with pytest.raises(R.AdmmPruneError) as info:
        R.SolverOptions(method="alps", **kw)
    assert info.value.field == field


# ------------------------------------------------------------------ command line and bench

def test_cli_prune_and_bench_with_alps(tmp_path, capsys):
    pytest.importorskip("torch")
    from admm_prune.gpu import cli
    from admm_prune.gpu.checkpoint import models

    corpus = write_corpus(tmp_path)
    model, tok = models.tiny_model("llama")
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    common = ["--model", str(tmp_path / "tiny"), "--calib", str(corpus / "calib.jsonl"), "--eval",
              str(corpus / "eval.txt"), "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--no-progress"]
    code = cli.main(["prune", *common, "--method", "alps", "--sparsity", "0.7", "--alps-iters", "30",
                     "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert 0.68 < summary["mean_sparsity"] <= 0.7  # floor(0.7 d_in) per row of the tiny model's linears
    code = cli.main(["bench", *common, "--methods", "admm-grad,alps", "--settings", "0.7,2:4", "--peers", "",
                     "--eval-seqlen", "64", "--eval-windows", "2", "--baseline-method", "admm-grad",
                     "--out", str(tmp_path / "b")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    runs = json.loads((tmp_path / "b.json").read_text())["runs"]
    assert sorted((r["method"], r["setting"]) for r in runs) == [
        ("admm-grad", "0.7"), ("admm-grad", "2:4"), ("alps", "0.7"), ("alps", "2:4")]
    assert all(np.isfinite(r["perplexity"]) for r in runs)


def test_resume_fingerprint_holds_alps_settings_only_for_alps():
    """A folder pruned by another method resumes whatever --alps-* says; an ALPS run's does not."""
    pytest.importorskip("torch")
    from admm_prune.gpu.config import PruneConfig

    other = PruneConfig(method="admm-grad", eval=None).fingerprint()
    assert not [k for k in other if k.startswith("alps_")]
    alps = PruneConfig(method="alps", eval=None).fingerprint()
    assert alps["alps_rho"] == R.DEFAULTS.alps_rho and alps["alps_iters"] == R.DEFAULTS.alps_iters
    assert PruneConfig(method="alps", eval=None, alps_iters=7).fingerprint() != alps
