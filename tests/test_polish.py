"""The finish on the support (CG on the masked normal equations): its oracle and invariants.

Reference against `masked_lstsq` (K large gives the exact masked solution); the
invariants (never increases the objective, stays inside the mask, empty rows and dead
features) on every backend.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

import admm_prune.reference as R
from synth import outlier_layer

MASK_METHODS = ["wanda", "sparsegpt", "admm", "admm-grad"]


@given(seed=st.integers(0, 2**16), d_out=st.integers(1, 6), d_in=st.integers(2, 30),
       sparsity=st.sampled_from([0.25, 0.5, 0.75]), method=st.sampled_from(MASK_METHODS),
       dead=st.integers(0, 3), polish_damp=st.sampled_from([None, 0.01, 1.0]))
@example(seed=3, d_out=4, d_in=16, sparsity=0.5, method="admm-grad", dead=3, polish_damp=None)
def test_many_steps_reach_masked_lstsq(seed, d_out, d_in, sparsity, method, dead, polish_damp):
    """K >= a few times |S| CG steps = the exact masked solution, from any method's weights."""
    W, XtX, _ = outlier_layer(seed, d_out, d_in, dead=min(dead, d_in - 1))
    r = R.prune_layer(W, XtX, sparsity, method=method, polish_iters=3 * d_in + 10,
                      polish_damp=polish_damp)
    damp = polish_damp if polish_damp is not None else 0.1  # admm's default damp is 0.1 too
    exact = R.masked_lstsq(W, XtX, r.mask, damp=damp)
    assert np.linalg.norm(r.W - exact) <= 1e-8 * max(np.linalg.norm(exact), 1e-300)
    assert np.all(r.W[~r.mask] == 0)
    assert r.polish[-1].objective <= r.polish[0].objective * (1 + 1e-12)


def test_admm_gap_closed_on_an_outlier_layer():
    """After ADMM-Grad's 20 iterations the finish closes the gap to the exact solution."""
    W, XtX, _ = outlier_layer(0, 32, 64, n_tokens=512, outliers=4)
    exact_err = lambda r: R.reconstruction_error(W, R.masked_lstsq(W, XtX, r.mask), XtX)  # noqa: E731
    r0 = R.prune_layer(W, XtX, 0.6)
    r10 = R.prune_layer(W, XtX, 0.6, polish_iters=10)
    np.testing.assert_array_equal(r0.mask, r10.mask)
    e0, e10, ex = (R.reconstruction_error(W, r0.W, XtX), R.reconstruction_error(W, r10.W, XtX),
                   exact_err(r0))
    assert ex <= e10 <= e0
    assert e10 - ex <= 0.1 * (e0 - ex)


@given(seed=st.integers(0, 2**16), d_out=st.integers(1, 6), d_in=st.integers(1, 30),
       frac=st.sampled_from([0.0, 0.3, 0.8, 1.0]), damp=st.sampled_from([0.0, 0.1]),
       iters=st.integers(0, 12), dead=st.integers(0, 3), empty_row=st.booleans())
@example(seed=1, d_out=3, d_in=8, frac=0.3, damp=0.1, iters=5, dead=0, empty_row=True)
def test_steps_never_increase_the_objective(backend, seed, d_out, d_in, frac, damp, iters, dead,
                                             empty_row):
    """Each CG step lowers (or keeps) the objective; iterates stay on the mask; rows with no
    support and dead features give finite results (no 0/0)."""
    W, XtX, _ = outlier_layer(seed, d_out, d_in, n_tokens=max(1, d_in // 2) if damp == 0 else None,
                              dead=min(dead, d_in))
    rng = np.random.default_rng(seed)
    M = rng.random(W.shape) >= frac
    if empty_row:
        M[0] = False
    start = rng.normal(size=W.shape)
    states = list(backend.polish_iterates(W, XtX, M, start, damp=damp, iters=iters))
    assert [s.k for s in states] == list(range(iters + 1))
    objs = [s.objective for s in states]
    scale = abs(objs[0]) + 1.0
    for a, b in zip(objs, objs[1:]):
        assert b <= a + 1e-11 * scale, objs
    for s in states:
        assert np.all(np.isfinite(s.W)) and np.all(s.W[~M] == 0)
    live = np.diag(XtX) > 0
    kept_dead = M & ~live[None, :]
    np.testing.assert_array_equal((states[-1].W / states[-1].scale)[kept_dead], W[kept_dead])


@pytest.mark.parametrize("method", MASK_METHODS)
def test_prune_layer_records_what_the_finish_did(backend, method):
    W, XtX, _ = outlier_layer(5, 8, 24)
    r0 = backend.prune_layer(W, XtX, 0.5, method=method)
    r = backend.prune_layer(W, XtX, 0.5, method=method, polish_iters=6)
    assert r0.polish == () and len(r.polish) == 7 and [p.k for p in r.polish] == list(range(7))
    np.testing.assert_array_equal(r.mask, r0.mask)
    G = XtX + 0.1 * np.diag(np.diag(XtX))  # the finish's damping for every method here
    obj0 = float(np.sum(((r0.W - W) @ G) * (r0.W - W)))
    obj = float(np.sum(((r.W - W) @ G) * (r.W - W)))
    assert r.polish[0].objective == pytest.approx(obj0, rel=1e-9)
    assert r.polish[-1].objective == pytest.approx(obj, rel=1e-9)
    assert obj <= obj0
    if method in ("admm", "admm-grad"):  # K = 0 records nothing and changes nothing
        r00 = backend.prune_layer(W, XtX, 0.5, method=method, polish_iters=0)
        np.testing.assert_array_equal(r00.W, r0.W)


def test_polish_iterates_is_prune_layers_finish():
    W, XtX, _ = outlier_layer(7, 6, 20)
    r0 = R.prune_layer(W, XtX, 0.5, method="sparsegpt")
    r = R.prune_layer(W, XtX, 0.5, method="sparsegpt", polish_iters=4)
    last = list(R.polish_iterates(W, XtX, r0.mask, r0.W, damp=R.DEFAULT_POLISH_DAMP, iters=4))[-1]
    np.testing.assert_array_equal(last.W / last.scale, r.W)


def test_cg_step_is_one_step_of_the_textbook_method():
    """cg_step against a hand-written CG on one row's dense system G_SS x = b_S."""
    W, XtX, _ = outlier_layer(2, 1, 12)
    M = np.ones(W.shape, bool)
    M[0, ::3] = False
    pre = R.precondition(W, XtX, 0.1)
    G, S = pre.G, M & pre.live[None, :]
    B = pre.W @ G
    Wk = pre.W * M
    WG = Wk @ G
    Rk = (B - WG) * S
    P = Rk
    idx = np.flatnonzero(S[0])
    A, b = G[np.ix_(idx, idx)], B[0, idx]
    x = Wk[0, idx].copy()
    r = b - A @ x
    p = r.copy()
    for _ in range(4):
        Wk, WG, Rk, P = R.cg_step(Wk, WG, Rk, P, B, G, S)
        alpha = (r @ r) / (p @ A @ p)
        x = x + alpha * p
        r_new = r - alpha * A @ p
        p = r_new + (r_new @ r_new) / (r @ r) * p
        r = r_new
        np.testing.assert_allclose(Wk[0, idx], x, rtol=1e-10, atol=1e-12)
