"""The torch backend against the reference: same math, checked in two tiers.

Tier 1 (always; CPU float64): hypothesis draws layers, sparsities, patterns, groups,
methods and solver settings; the torch backend must reproduce the reference to relative
1e-9 (norm-wise) with identical masks and histories. Inputs come from `outlier_layer`
(tie-free scores), so identical masks are a fair demand; mask selection with ties is
checked separately (both backends prune the lower index first).

Tier 2 (``@pytest.mark.gpu``; skipped without CUDA): float32 on CUDA against the float64
reference at measured tolerances, a full-size LLaMA-7B down_proj, bf16 weights, TF32.
`benchmarks/gpu_check.sh` runs it. The float32 tests are parametrized over the device: the
CPU variant runs in tier 1 too, so the tolerances are exercised on every run.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

torch = pytest.importorskip("torch")

import admm_prune.gpu as G  # noqa: E402
import admm_prune.reference as R  # noqa: E402
from synth import outlier_layer  # noqa: E402

PATTERNS = ["unstructured", "1:2", "2:4", "1:4", "3:4", "4:8", "2:3"]
RTOL = 1e-9  # tier 1: float64 against float64, only summation order differs


def t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


def n(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


def rel_err(a, b, floor: float = 0.0) -> float:
    """||a - b|| / max(||b||, floor), Frobenius; `floor` for quantities that may be ~0."""
    a, b = np.asarray(n(a), dtype=np.float64), np.asarray(n(b), dtype=np.float64)
    den = max(np.linalg.norm(b), floor)
    diff = np.linalg.norm(a - b)
    return 0.0 if diff == 0.0 else diff / den


def assert_same_history(h_gpu, h_ref, res_scale: float, obj_scale: float):
    """k and sparsity exactly; objective and residuals to RTOL of the value plus a floor.

    The floors (||W0~|| for residuals, tr(W0~ G~ W0~^T) for the objective) matter only
    where the exact value is 0 (sparsity 0, or a converged fixed-mask run): there both
    backends return rounding noise of size eps * scale, which has no relative precision.
    """
    assert len(h_gpu) == len(h_ref)
    for a, b in zip(h_gpu, h_ref):
        assert a.k == b.k and a.sparsity == b.sparsity, (a, b)
        for field, scale in (("primal_residual", res_scale), ("dual_residual", res_scale),
                             ("objective", obj_scale)):
            x, y = getattr(a, field), getattr(b, field)
            if math.isnan(y):
                assert math.isnan(x), (field, a, b)
            else:
                assert abs(x - y) <= RTOL * (abs(y) + scale), (field, a, b)


def scales(W, XtX, damp):
    pre = R.precondition(W, XtX, damp)
    return float(np.linalg.norm(pre.W)), R.objective(np.zeros_like(pre.W), pre.W, pre.G)


@st.composite
def layers(draw):
    """(pattern, W, XtX): small layers, sometimes d_in in 130..260 (several SparseGPT
    blocks, not a multiple of 128), d_out = 1, fewer tokens than features."""
    pattern = draw(st.sampled_from(PATTERNS))
    big = draw(st.integers(0, 5)) == 0
    m = 1 if pattern == "unstructured" else int(pattern.split(":")[1])
    lo, hi = (130, 260) if big else (2, 40)
    d_in = draw(st.integers(max(1, -(-lo // m)), hi // m)) * m
    d_out = draw(st.sampled_from([1, 2, 3, 5, 8]))
    few_tokens = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    W, XtX, _ = outlier_layer(seed, d_out, d_in, n_tokens=max(1, d_in // 2) if few_tokens else None)
    return pattern, W, XtX


def _sparsity(draw_value, pattern):
    return draw_value if pattern == "unstructured" else None


# ---------------------------------------------------------------------------------------
# tier 1: CPU float64, torch == reference


@given(layer=layers(), sparsity=st.sampled_from([0.0, 0.25, 0.5, 0.7]),
       method=st.sampled_from(R.METHODS), group=st.sampled_from(["row", "layer"]),
       iters=st.integers(1, 8), mask_steps=st.integers(0, 8), track=st.booleans())
@example(layer=("unstructured", *outlier_layer(11, 3, 200)[:2]), sparsity=0.5,
         method="sparsegpt", group="layer", iters=4, mask_steps=3, track=True)
@example(layer=("2:3", *outlier_layer(12, 2, 258)[:2]), sparsity=None,
         method="sparsegpt", group="row", iters=4, mask_steps=3, track=True)
@example(layer=("4:8", *outlier_layer(13, 4, 136, n_tokens=40)[:2]), sparsity=None,
         method="admm-grad", group="layer", iters=8, mask_steps=6, track=False)
@example(layer=("unstructured", *outlier_layer(14, 1, 150, n_tokens=30)[:2]), sparsity=0.7,
         method="admm-grad", group="row", iters=8, mask_steps=8, track=True)
def test_prune_layer_matches_reference(layer, sparsity, method, group, iters, mask_steps, track):
    pattern, W, XtX = layer
    s = _sparsity(sparsity, pattern)
    mask_steps = min(mask_steps, iters)
    kw = dict(method=method, pattern=pattern, group=group, iters=iters, mask_steps=mask_steps,
              track_objective=track)
    ref = R.prune_layer(W, XtX, s, **kw)
    out = G.prune_layer(t(W), t(XtX), s, **kw)
    assert out.W.dtype == torch.float64 and out.mask.dtype == torch.bool
    np.testing.assert_array_equal(n(out.mask), ref.mask)
    assert rel_err(out.W, ref.W) < RTOL
    assert np.all(n(out.W)[~ref.mask] == 0)
    assert_same_history(out.history, ref.history, *scales(W, XtX, R.DEFAULT_DAMP.get(method, 0.1)))


@given(layer=layers(), sparsity=st.sampled_from([0.0, 0.3, 0.6]),
       group=st.sampled_from(["row", "layer"]), iters=st.integers(1, 7),
       mask_steps=st.integers(0, 7), fixed_mask=st.booleans(),
       rho=st.sampled_from([0.3, 1.0, 3.0]), damp=st.sampled_from([0.0, 0.1, 1.0]))
def test_admm_iterates_step_by_step(layer, sparsity, group, iters, mask_steps, fixed_mask, rho, damp):
    pattern, W, XtX = layer
    s = _sparsity(sparsity, pattern)
    mask = R.prune_layer(W, XtX, s, method="wanda", pattern=pattern, group=group).mask if fixed_mask else None
    kw = dict(pattern=pattern, group=group, rho=rho, damp=damp, iters=iters,
              mask_steps=min(mask_steps, iters), mask=mask)
    ref = list(R.admm_iterates(W, XtX, None if fixed_mask else s, **kw))
    kw["mask"] = None if mask is None else t(mask)
    out = list(G.admm_iterates(t(W), t(XtX), None if fixed_mask else s, **kw))
    res_scale, obj_scale = scales(W, XtX, damp)
    assert len(out) == len(ref) == iters
    for a, b in zip(out, ref):
        np.testing.assert_array_equal(n(a.M), b.M)
        for name in ("W", "Z", "U"):
            assert rel_err(getattr(a, name), getattr(b, name), floor=res_scale) < RTOL, (a.k, name)
        np.testing.assert_allclose(n(a.scale), b.scale, rtol=1e-15)  # torch's sqrt: <= 1 ulp off
    assert_same_history(out, ref, res_scale, obj_scale)


@given(seed=st.integers(0, 2**16), d_out=st.integers(1, 6), d_in=st.integers(2, 30),
       rho=st.sampled_from([0.5, 1.0, 2.0]), damp=st.sampled_from([0.0, 0.1]))
def test_equations_one_by_one(seed, d_out, d_in, rho, damp):
    """precondition, factorize + w_update, z/u_update, objective, mask_update, wanda_scores."""
    W, XtX, _ = outlier_layer(seed, d_out, d_in)
    pre_r = R.precondition(W, XtX, damp)
    pre_g = G.precondition(t(W), t(XtX), damp)
    for a, b in zip(pre_g, pre_r):
        np.testing.assert_allclose(n(a), b, rtol=1e-14, atol=0)
    rng = np.random.default_rng(seed)
    Z, U = rng.normal(size=W.shape), rng.normal(size=W.shape)
    M = rng.random(W.shape) < 0.5
    B = pre_r.W @ pre_r.G
    W_r = R.w_update(R.factorize(pre_r.G, rho), B, Z, U, rho)
    W_g = G.w_update(G.factorize(t(pre_r.G), rho), t(B), t(Z), t(U), rho)
    assert rel_err(W_g, W_r) < RTOL
    np.testing.assert_array_equal(n(G.z_update(t(W), t(U), t(M))), R.z_update(W, U, M))
    np.testing.assert_array_equal(n(G.u_update(t(U), t(W), t(Z))), R.u_update(U, W, Z))
    assert G.objective(t(Z), t(W), t(pre_r.G)) == pytest.approx(R.objective(Z, W, pre_r.G), rel=RTOL)
    live = pre_r.live
    np.testing.assert_array_equal(n(G.mask_update(t(W), t(U), t(live), 0.5, "unstructured", "row")),
                                  R.mask_update(W, U, live, 0.5, "unstructured", "row"))
    np.testing.assert_allclose(n(G.wanda_scores(t(W), t(XtX))), R.wanda_scores(W, XtX), rtol=1e-15)
    np.testing.assert_array_equal(n(G.magnitude_scores(t(W))), R.magnitude_scores(W))


@given(seed=st.integers(0, 2**16), d_out=st.integers(1, 7), groups=st.integers(1, 20),
       pattern=st.sampled_from(PATTERNS), group=st.sampled_from(["row", "layer"]),
       frac=st.sampled_from([0.0, 0.3, 0.7, 1.0]), levels=st.sampled_from([2, 5, 0]))
@example(seed=0, d_out=3, groups=20, pattern="unstructured", group="row", frac=0.7, levels=2)
def test_select_mask_same_tie_break(seed, d_out, groups, pattern, group, frac, levels):
    """Masks are identical even with ties (`levels` distinct score values; 0 = continuous),
    on both selection paths (stable argsort for N:M groups, topk threshold for rows > 64)."""
    m = 8 if pattern == "unstructured" else int(pattern.split(":")[1])
    rng = np.random.default_rng(seed)
    shape = (d_out, groups * m)
    scores = rng.integers(0, levels, size=shape).astype(float) if levels else rng.random(shape)
    if pattern == "unstructured":
        s = 0.9 * frac
    else:
        nn_, mm = map(int, pattern.split(":"))
        s = None if frac == 1.0 else frac * (1 - nn_ / mm)
    np.testing.assert_array_equal(n(G.select_mask(t(scores), s, pattern, group)),
                                  R.select_mask(scores, s, pattern, group))


@given(seed=st.integers(0, 2**16), d_in=st.integers(65, 300), frac=st.floats(0.0, 1.0),
       levels=st.sampled_from([2, 5, 0]), special=st.sampled_from(["none", "+0", "-0", "inf"]))
def test_select_mask_float32_rows_same_as_reference(seed, d_in, frac, levels, special):
    """Rows of float32 scores (the solver's dtype) take the CPU's int32-bits threshold path
    when no sign bit is set; with -0.0 (which equals +0.0 but not as bits) the float path:
    either way the reference's mask, ties included."""
    rng = np.random.default_rng(seed)
    scores = (rng.integers(0, levels, size=(5, d_in)) if levels else rng.random((5, d_in))).astype(np.float32)
    cells = rng.random(scores.shape) < 0.3
    if special != "none":
        scores[cells] = {"+0": 0.0, "-0": -0.0, "inf": np.inf}[special]
    k = int(frac * d_in)  # the row rule behind select_mask (+inf: gradual N:M's protected scores)
    from admm_prune.gpu.solvers.masks import prune_lowest as gpu_rule
    from admm_prune.reference.masks import prune_lowest as ref_rule
    np.testing.assert_array_equal(n(gpu_rule(torch.from_numpy(scores), k)), ref_rule(scores, k))


@given(seed=st.integers(0, 2**16), d_out=st.integers(1, 6), d_in=st.integers(2, 30),
       sparsity=st.sampled_from([0.25, 0.5, 0.75]), damp=st.sampled_from([0.0, 0.1, 1.0]),
       dead=st.integers(0, 2))
def test_oracles(seed, d_out, d_in, sparsity, damp, dead):
    """masked_lstsq and reconstruction_error (enough tokens: G_SS nonsingular at damp 0)."""
    W, XtX, _ = outlier_layer(seed, d_out, d_in, n_tokens=8 * d_in, dead=min(dead, d_in - 1))
    M = R.prune_layer(W, XtX, sparsity, method="magnitude").mask
    exact_r = R.masked_lstsq(W, XtX, M, damp=damp)
    exact_g = G.masked_lstsq(t(W), t(XtX), t(M), damp=damp)
    assert rel_err(exact_g, exact_r) < RTOL
    assert np.all(n(exact_g)[~M] == 0)
    assert G.reconstruction_error(t(W), exact_g, t(XtX)) == pytest.approx(
        R.reconstruction_error(W, exact_r, XtX), rel=RTOL)


def test_masked_lstsq_singular_rows_get_minimum_norm():
    """Duplicated features, no damping: G_SS singular, the reference falls back to lstsq."""
    W, XtX, X = outlier_layer(5, 4, 12)
    X = np.concatenate([X, X[:, :4]], axis=1)
    W = np.concatenate([W, W[:, :4]], axis=1)
    XtX = X.T @ X
    M = np.ones(W.shape, bool)
    M[:, 1::3] = False
    ref = R.masked_lstsq(W, XtX, M, damp=0.0)
    out = n(G.masked_lstsq(t(W), t(XtX), t(M), damp=0.0))
    # both solve a singular system: compare what is determined, the error it reaches
    assert R.reconstruction_error(W, out, XtX) == pytest.approx(
        R.reconstruction_error(W, ref, XtX), rel=1e-6, abs=1e-12)


@given(layer=layers(), sparsity=st.sampled_from([0.3, 0.6]), group=st.sampled_from(["row", "layer"]),
       damp=st.sampled_from([0.01, 0.1]), blocksize=st.sampled_from([4, 16, 128]))
def test_sparsegpt_with_and_without_mask(layer, sparsity, group, damp, blocksize):
    pattern, W, XtX = layer
    s = _sparsity(sparsity, pattern)
    W_r, M_r = R.sparsegpt(W, XtX, s, pattern, group, damp=damp, blocksize=blocksize)
    W_g, M_g = G.sparsegpt(t(W), t(XtX), s, pattern, group, damp=damp, blocksize=blocksize)
    np.testing.assert_array_equal(n(M_g), M_r)
    assert rel_err(W_g, W_r) < RTOL
    M = M_r[::-1] if W.shape[0] > 1 else ~M_r  # some other mask: the update alone
    W_r, _ = R.sparsegpt(W, XtX, None, "unstructured", group, damp=damp, blocksize=blocksize, mask=M)
    W_g, _ = G.sparsegpt(t(W), t(XtX), None, "unstructured", group, damp=damp, blocksize=blocksize,
                         mask=t(M.copy()))
    assert rel_err(W_g, W_r) < RTOL


@pytest.mark.parametrize("method", ["admm", "admm-grad", "sparsegpt", "wanda"])
def test_prune_shared_shares_and_equals_separate(method, monkeypatch):
    """One factorization for three weights sharing a Gram, bit-identical to three calls."""
    import admm_prune.gpu.methods.admm as A
    import admm_prune.gpu.methods.sparsegpt as S

    W1, XtX, _ = outlier_layer(1, 8, 32)
    Ws = [t(W1), t(np.random.default_rng(2).normal(size=(12, 32))), t(W1[:3] * 2)]
    calls = []
    for module, name in ((A, "factorize"), (S, "inverse_hessian_factor")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    shared = G.prune_shared(Ws, t(XtX), 0.5, method=method, track_objective=False)
    assert len(calls) == (0 if method == "wanda" else 1)
    for W, r in zip(Ws, shared):
        alone = G.prune_layer(W, t(XtX), 0.5, method=method)
        assert torch.equal(r.mask, alone.mask) and torch.equal(r.W, alone.W)
        assert [(h.k, h.sparsity, h.primal_residual) for h in r.history] == \
               [(h.k, h.sparsity, h.primal_residual) for h in alone.history]


@given(layer=layers(), sparsity=st.sampled_from([0.0, 0.3, 0.6]),
       method=st.sampled_from(["wanda", "sparsegpt", "admm", "admm-grad"]),
       group=st.sampled_from(["row", "layer"]), polish_iters=st.integers(1, 8),
       polish_damp=st.sampled_from([None, 0.0, 1.0]))
def test_finish_matches_reference(layer, sparsity, method, group, polish_iters, polish_damp):
    """prune_layer(..., polish_iters=K): same weights and the same records of the finish."""
    pattern, W, XtX = layer
    kw = dict(method=method, pattern=pattern, group=group, iters=4, mask_steps=3,
              polish_iters=polish_iters, polish_damp=polish_damp)
    s = _sparsity(sparsity, pattern)
    ref = R.prune_layer(W, XtX, s, **kw)
    out = G.prune_layer(t(W), t(XtX), s, **kw)
    np.testing.assert_array_equal(n(out.mask), ref.mask)
    assert rel_err(out.W, ref.W) < RTOL
    res_scale, obj_scale = scales(W, XtX, 0.1 if polish_damp is None else polish_damp)
    assert len(out.polish) == len(ref.polish) == polish_iters + 1
    for a, b in zip(out.polish, ref.polish):
        assert a.k == b.k
        assert abs(a.objective - b.objective) <= RTOL * (abs(b.objective) + obj_scale), (a, b)
        assert abs(a.residual - b.residual) <= RTOL * (abs(b.residual) + res_scale), (a, b)


@given(seed=st.integers(0, 2**16), d_out=st.integers(1, 6), d_in=st.integers(1, 30),
       damp=st.sampled_from([0.0, 0.1]), iters=st.integers(0, 10), dead=st.integers(0, 2))
def test_polish_iterates_and_cg_step(seed, d_out, d_in, damp, iters, dead):
    W, XtX, _ = outlier_layer(seed, d_out, d_in, dead=min(dead, d_in))
    rng = np.random.default_rng(seed)
    M, start = rng.random(W.shape) < 0.6, rng.normal(size=W.shape)
    ref = list(R.polish_iterates(W, XtX, M, start, damp=damp, iters=iters))
    out = list(G.polish_iterates(t(W), t(XtX), t(M), t(start), damp=damp, iters=iters))
    floor = float(np.linalg.norm(start * M)) + float(np.linalg.norm(W))
    for a, b in zip(out, ref):
        assert rel_err(a.W, b.W, floor=floor) < RTOL, a.k
        assert a.objective == pytest.approx(b.objective, rel=RTOL, abs=RTOL * (abs(ref[0].objective) + 1))
    pre = R.precondition(W, XtX, damp)
    S = M & pre.live[None, :]
    B = pre.W @ pre.G
    args = [pre.W * M, (pre.W * M) @ pre.G, (B - (pre.W * M) @ pre.G) * S, start * S, B, pre.G, S]
    for a, b in zip(G.cg_step(*map(t, args)), R.cg_step(*args)):
        assert rel_err(a, b, floor=floor) < RTOL


def test_finish_loop_is_the_public_cg_step_composed():
    """prune_layer's finish (buffers reused, cg_step(out=...)) == polish_iterates, bit for bit."""
    W, XtX, _ = outlier_layer(9, 5, 24, dead=2)
    for method in ("wanda", "admm-grad"):
        r0 = G.prune_layer(t(W), t(XtX), 0.5, method=method)
        r = G.prune_layer(t(W), t(XtX), 0.5, method=method, polish_iters=5)
        last = list(G.polish_iterates(t(W), t(XtX), r0.mask, r0.W, damp=0.1, iters=5))[-1]
        assert torch.equal(last.W / last.scale, r.W)


def test_prune_shared_with_finish_equals_separate():
    W1, XtX, _ = outlier_layer(1, 8, 32)
    Ws = [t(W1), t(np.random.default_rng(2).normal(size=(12, 32)))]
    for kw in (dict(method="admm-grad", polish_iters=4), dict(method="sparsegpt", polish_iters=3),
               dict(method="admm", polish_iters=2, polish_damp=0.5)):
        for W, r in zip(Ws, G.prune_shared(Ws, t(XtX), 0.5, **kw)):
            alone = G.prune_layer(W, t(XtX), 0.5, **kw)
            assert torch.equal(r.mask, alone.mask) and torch.equal(r.W, alone.W)
            assert r.polish == alone.polish


def test_cholesky_failure_adds_damping_and_warns(caplog):
    """A singular G~ + rho I (rho far below rounding) and a singular Hessian (damp 0, fewer
    tokens than features) still factorize: more damping, and a logged warning."""
    G_sing = torch.ones(4, 4, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="admm_prune.gpu"):
        factor = G.factorize(G_sing, 1e-30)
    assert torch.isfinite(factor.inverse).all()
    assert any("Cholesky of G~ + rho I failed" in r.message for r in caplog.records)
    caplog.clear()
    W, XtX, _ = outlier_layer(3, 4, 16, n_tokens=4)
    with caplog.at_level(logging.WARNING, logger="admm_prune.gpu"):
        W_p, M = G.sparsegpt(t(W), t(XtX), 0.5, damp=0.0)
    assert torch.isfinite(W_p).all() and caplog.records


def test_no_global_torch_flags_touched_on_cpu():
    m = torch.backends.cuda.matmul
    before = m.fp32_precision if hasattr(m, "fp32_precision") else m.allow_tf32
    W, XtX, _ = outlier_layer(0, 4, 16)
    G.prune_layer(t(W), t(XtX), 0.5, allow_tf32=True)
    after = m.fp32_precision if hasattr(m, "fp32_precision") else m.allow_tf32
    assert before == after


# ---------------------------------------------------------------------------------------
# float32 (and bf16) against the float64 reference: tier 2 on CUDA, a CPU variant always

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]

# Tolerances, float32 vs the float64 reference. Measured on the CPU (torch float32; no GPU
# was available when they were set): layers (64, 256) and (192, 512), seeds 0-3, sparsity
# 0.5/0.7 and 2:4, both groups: masks identical for magnitude, wanda, sparsegpt and admm,
# relative difference of the reconstruction error <= 8e-8; admm-grad re-selects its mask
# from float32 iterates, so near-ties flip a few entries (agreement >= 99.52 %) and the
# error moves by up to 1.8e-3. At full depth, (512, 4096) and (256, 11008) with the
# outlier Gram of `_outlier_gram`, float32 vs float64: sparsegpt and admm 2e-9, masks
# identical; admm-grad 4.9e-6, agreement >= 99.95 %. CUDA sums in another order with the
# same rounding. The bounds leave >= 100x (fixed-mask methods) and ~10x (admm-grad) of
# margin; each test records what it measured (junit properties) for tightening on a GPU.
# Measured on an H200 (2026-11-28, benchmarks/device_run.sh): fixed-mask methods <= 3.4e-8
# with identical masks; admm-grad <= 1.3e-3, agreement >= 99.84 %; LLaMA-7B down_proj
# (4096, 11008) admm-grad 1.9e-6 (99.87 %), sparsegpt 9.0e-7. The bounds stand.
TOL32 = {  # method: (max relative difference of the error, min mask agreement)
    "magnitude": (1e-5, 0.999), "wanda": (1e-5, 0.999), "sparsegpt": (1e-5, 0.999),
    "admm": (1e-5, 0.999), "admm-grad": (2e-2, 0.98),
}


def _compare32(record_property, tag, W, XtX, out, ref_W, ref_mask, method):
    e32 = R.reconstruction_error(W, n(out.W).astype(np.float64), XtX)
    e64 = R.reconstruction_error(W, ref_W, XtX)
    agree = float((n(out.mask) == ref_mask).mean())
    record_property(f"{tag} rel_error_diff", abs(e32 - e64) / e64)
    record_property(f"{tag} mask_agreement", agree)
    max_diff, min_agree = TOL32[method]
    assert abs(e32 - e64) <= max_diff * e64, (tag, e32, e64)
    assert agree >= min_agree, (tag, agree)
    assert np.all(n(out.W)[~n(out.mask)] == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_matches_reference(device, record_property):
    shapes = [(64, 256)] if device == "cpu" else [(64, 256), (384, 1024)]
    methods = ["admm-grad", "sparsegpt"] if device == "cpu" else list(R.METHODS)
    configs = [("unstructured", 0.6, "row"), ("2:4", None, "layer")]
    if device == "cuda":
        configs += [("unstructured", 0.5, "layer"), ("4:8", None, "row")]
    for shape in shapes:
        W, XtX, _ = outlier_layer(0, *shape, outliers=4)
        for method in methods:
            for pattern, s, group in configs:
                kw = dict(method=method, pattern=pattern, group=group)
                ref = R.prune_layer(W, XtX, s, **kw)
                out = G.prune_layer(t(W).float().to(device), t(XtX).float().to(device), s, **kw)
                assert out.W.dtype == torch.float32 and out.W.device.type == device
                _compare32(record_property, f"{shape} {method} {pattern} {group}", W, XtX, out,
                           ref.W, ref.mask, method)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["admm-grad", "sparsegpt", "wanda"])
def test_bf16_weights_computed_in_float32(device, method):
    """bf16 in, bf16 out, and exactly the float32 computation on the bf16 values."""
    W, XtX, _ = outlier_layer(4, 32, 128)
    W16 = t(W).to(torch.bfloat16).to(device)
    XtX32 = t(XtX).float().to(device)
    out = G.prune_layer(W16, XtX32, 0.5, method=method)
    f32 = G.prune_layer(W16.float(), XtX32, 0.5, method=method)
    assert out.W.dtype == torch.bfloat16 and out.W.device.type == device
    assert torch.equal(out.mask, f32.mask)
    assert torch.equal(out.W, f32.W.to(torch.bfloat16))
    assert out.history == f32.history


# ---------------------------------------------------------------------------------------
# tier 2 only


def _outlier_gram(d_in: int, device, dtype, seed: int = 0, rank: int = 512):
    """A well-conditioned LLM-like Gram without forming X: D (C C^T / r + I) D with
    log-normal feature scales D and 1 % of the features x20 (as `outlier_layer`)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    C = torch.randn(d_in, rank, generator=g, dtype=torch.float64).to(device)
    scale = torch.exp(0.5 * torch.randn(d_in, generator=g, dtype=torch.float64))
    scale[torch.randperm(d_in, generator=g)[: max(1, d_in // 100)]] *= 20
    scale = scale.to(device)
    XtX = (C @ C.T).div_(rank)
    XtX.diagonal().add_(1.0)
    return (XtX * scale[:, None] * scale[None, :]).to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["admm-grad", "sparsegpt"])
def test_llama7b_down_proj_float32(method, record_property):
    """The largest LLaMA-7B MLP shape, W (4096, 11008): CUDA float32 vs CUDA float64.

    The float64 torch path equals the reference to 1e-9 (tier 1); running the numpy
    reference itself at this size would take minutes on the host, so it is the float64
    run on the GPU that stands in for it. What this checks at full size: float32 rounding
    over d_in = 11008 (Cholesky, 20 GEMMs of depth 11008) stays at the level measured on
    small layers, and ADMM beats SparseGPT.
    """
    dev = torch.device("cuda")
    XtX64 = _outlier_gram(11008, dev, torch.float64)
    W64 = torch.randn(4096, 11008, generator=torch.Generator(device="cpu").manual_seed(1),
                      dtype=torch.float64).to(dev)
    out32 = G.prune_layer(W64.float(), XtX64.float(), 0.5, method=method)
    out64 = G.prune_layer(W64, XtX64, 0.5, method=method)
    e32 = G.reconstruction_error(W64, out32.W.double(), XtX64)
    e64 = G.reconstruction_error(W64, out64.W, XtX64)
    agree = float((out32.mask == out64.mask).double().mean())
    record_property("rel_error_diff", abs(e32 - e64) / e64)
    record_property("mask_agreement", agree)
    record_property("error_float64", e64)
    max_diff, min_agree = TOL32[method]
    assert abs(e32 - e64) <= max_diff * e64 and agree >= min_agree, (e32, e64, agree)
    if method == "admm-grad":
        sgpt = G.prune_layer(W64, XtX64, 0.5, method="sparsegpt")
        assert e64 < G.reconstruction_error(W64, sgpt.W, XtX64)


@pytest.mark.gpu
def test_tf32_is_opt_in_and_flags_are_restored(record_property):
    m = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(m, "fp32_precision") else "allow_tf32"
    before = getattr(m, name)
    W, XtX, _ = outlier_layer(2, 256, 512, outliers=4)
    Wc, Xc = t(W).float().cuda(), t(XtX).float().cuda()
    ieee = G.prune_layer(Wc, Xc, 0.5, method="admm")
    assert getattr(m, name) == before
    tf32 = G.prune_layer(Wc, Xc, 0.5, method="admm", allow_tf32=True)
    assert getattr(m, name) == before
    e_ieee = R.reconstruction_error(W, n(ieee.W).astype(float), XtX)
    e_tf32 = R.reconstruction_error(W, n(tf32.W).astype(float), XtX)
    record_property("tf32_rel_error_diff", abs(e_tf32 - e_ieee) / e_ieee)
    # TF32 keeps 10 mantissa bits: ~1e-3 per product; the fixed-mask solve stays close
    assert abs(e_tf32 - e_ieee) <= 5e-2 * e_ieee


@pytest.mark.gpu
def test_prune_shared_on_cuda_equals_separate():
    W1, XtX, _ = outlier_layer(1, 64, 256)
    Ws = [t(W1).float().cuda(), torch.randn(96, 256, device="cuda")]
    Xc = t(XtX).float().cuda()
    for kw in (dict(method="admm-grad"), dict(method="sparsegpt", pattern="2:4")):
        s = None if "pattern" in kw else 0.5
        for W, r in zip(Ws, G.prune_shared(Ws, Xc, s, **kw)):
            alone = G.prune_layer(W, Xc, s, **kw)
            assert torch.equal(r.mask, alone.mask)
            torch.testing.assert_close(r.W, alone.W, rtol=1e-6, atol=1e-7)


def test_iterates_are_the_public_updates_composed():
    """admm_iterates' loop (written out for buffer reuse) == z_update, u_update, w_update."""
    W, XtX, _ = outlier_layer(9, 4, 16)
    states = list(G.admm_iterates(t(W), t(XtX), 0.5, iters=8, mask_steps=5))
    pre = G.precondition(t(W), t(XtX), 0.1)
    f = G.factorize(pre.G, 1.0)
    for a, b in zip(states, states[1:]):
        Z = G.z_update(a.W, a.U, b.M)
        U = G.u_update(a.U, a.W, Z)
        assert torch.equal(b.Z, Z) and torch.equal(b.U, U)
        assert torch.equal(b.W, G.w_update(f, pre.W @ pre.G, Z, U, 1.0))
        if b.k <= 5:  # mask steps: the public mask_update at the cubic schedule
            assert torch.equal(b.M, G.mask_update(a.W, a.U, pre.live, G.cubic_sparsity(b.k, 5, 0.5),
                                                  "unstructured", "row"))
    last = states[-1]
    r = G.prune_layer(t(W), t(XtX), 0.5, iters=8, mask_steps=5)
    assert torch.equal(G.z_update(last.W, last.U, last.M) / last.scale, r.W)


def test_parameters_with_grad_are_pruned_without_autograd():
    """nn.Parameter weights (requires_grad) go through no_grad: no graph, plain tensors out."""
    W, XtX, _ = outlier_layer(6, 4, 16)
    Wp = torch.nn.Parameter(t(W))
    for method in ("admm-grad", "sparsegpt", "wanda"):
        r = G.prune_layer(Wp, t(XtX), 0.5, method=method, iters=3, mask_steps=2)
        assert not r.W.requires_grad and r.W.grad_fn is None
    states = list(G.admm_iterates(Wp, t(XtX), 0.5, iters=3, mask_steps=2))
    assert torch.is_grad_enabled() and not any(s.W.requires_grad for s in states)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d_in", [100, 576, 1000])
def test_gram_collector_equals_xtx(d_in, dtype, device):
    """X^T X of the inputs the linear sees, summed in float64: the CPU's blocked upper
    triangle (mirrored on exit), CUDA's half-precision GEMM with float32 output."""
    from admm_prune.gpu.engine.calibration import GramCollector

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    block = torch.nn.Sequential(torch.nn.Linear(d_in, 3)).to(device, dtype)
    x = torch.randn(5, 40, d_in, device=device).to(dtype)
    with torch.no_grad(), GramCollector(block, ["0"], torch.device(device)) as c:
        for i in range(len(x)):
            block(x[i])
    X = x.reshape(-1, d_in).double()
    got = c.grams["0"]
    assert got.dtype == torch.float64 and c.tokens["0"] == 200
    assert torch.equal(got, got.T) or device == "cuda"
    torch.testing.assert_close(got, X.T @ X, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_gram_does_not_depend_on_how_the_samples_are_split(device):
    """The float32 Gram the solvers read is the same bits whether one collector sees every
    sample or two see alternate ones and their sums are added (two ranks, `Dist.sum_`):
    the float64 sum makes the order invisible. (A float32 sum fails this.)"""
    from admm_prune.gpu.engine.calibration import GramCollector, NormCollector

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(576, 3)).to(device)
    x = torch.randn(8, 64, 576, device=device) * torch.rand(576, device=device) * 10
    for collect in (GramCollector, NormCollector):
        parts = []
        for share in (range(8), range(0, 8, 2), range(1, 8, 2)):
            with torch.no_grad(), collect(block, ["0"], torch.device(device)) as c:
                for i in share:
                    block(x[i])
            parts.append(c.grams["0"])
        assert torch.equal(parts[0].float(), (parts[1] + parts[2]).float()), collect.__name__


@pytest.mark.parametrize("method", ["admm", "admm-grad"])
def test_untracked_residuals_change_nothing_but_the_records(method):
    """track_residuals=False (the engine's setting) skips the residual norms only: the same
    weights and mask bit for bit, NaN residuals, the same sparsity records."""
    W, XtX, _ = outlier_layer(3, 12, 40, n_tokens=200)
    W, XtX = t(W).float(), t(XtX).float()
    on = G.prune_layer(W, XtX, 0.6, method=method, track_objective=False)
    off = G.prune_layer(W, XtX, 0.6, method=method, track_objective=False, track_residuals=False)
    assert torch.equal(on.W, off.W) and torch.equal(on.mask, off.mask)
    assert all(math.isnan(r.primal_residual) and math.isnan(r.dual_residual) for r in off.history)
    assert [r.sparsity for r in on.history] == [r.sparsity for r in off.history]
    assert all(r.primal_residual >= 0 for r in on.history)
