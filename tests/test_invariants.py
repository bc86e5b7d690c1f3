"""Invariants every backend must satisfy, written once, run on each through `backend`."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from admm_prune.reference import METHODS, cubic_sparsity, prune_count
from synth import outlier_layer

PATTERNS_NM = ["1:2", "2:4", "1:4", "3:4", "4:8", "2:3"]


def _layer(seed, d_out, d_in, **kw):
    W, XtX, _ = outlier_layer(seed, d_out, d_in, **kw)
    return W, XtX


@given(seed=st.integers(0, 2**16), d_out=st.integers(1, 9), d_in=st.integers(2, 40),
       sparsity=st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.6, 0.9]),
       method=st.sampled_from(METHODS), group=st.sampled_from(["row", "layer"]))
@example(seed=0, d_out=1, d_in=7, sparsity=0.5, method="admm-grad", group="row")
def test_exact_counts_unstructured(backend, seed, d_out, d_in, sparsity, method, group):
    W, XtX = _layer(seed, d_out, d_in, n_tokens=3 * d_in)
    r = backend.prune_layer(W, XtX, sparsity, method=method, group=group, iters=6, mask_steps=4)
    pruned = ~r.mask
    if group == "row":
        assert np.all(pruned.sum(axis=1) == prune_count(d_in, sparsity))
    else:
        assert pruned.sum() == prune_count(W.size, sparsity)
    assert np.all(r.W[pruned] == 0), "support of the result must lie inside the mask"
    assert np.all(np.isfinite(r.W))


@given(seed=st.integers(0, 2**16), d_out=st.integers(1, 6), groups=st.integers(1, 6),
       pattern=st.sampled_from(PATTERNS_NM), method=st.sampled_from(METHODS),
       group=st.sampled_from(["row", "layer"]))
def test_nm_groups_valid(backend, seed, d_out, groups, pattern, method, group):
    n, m = map(int, pattern.split(":"))
    W, XtX = _layer(seed, d_out, groups * m)
    r = backend.prune_layer(W, XtX, None, method=method, pattern=pattern, group=group,
                            iters=6, mask_steps=4)
    kept = r.mask.reshape(d_out, groups, m).sum(axis=2)
    assert np.all(kept == n), "exactly N kept in every group of M"
    assert np.all(r.W[~r.mask] == 0)


@given(seed=st.integers(0, 2**16), sparsity=st.sampled_from([0.5, 0.6, 0.7, 0.8]),
       mask_steps=st.integers(1, 15), group=st.sampled_from(["row", "layer"]))
def test_admm_grad_follows_cubic_schedule(backend, seed, sparsity, mask_steps, group):
    """The official code computes the cubic sparsity, then selects at the full target."""
    d_out, d_in = 6, 40
    W, XtX = _layer(seed, d_out, d_in)
    r = backend.prune_layer(W, XtX, sparsity, method="admm-grad", group=group,
                            iters=mask_steps + 3, mask_steps=mask_steps)
    n = d_in if group == "row" else d_out * d_in
    for t, rec in enumerate(r.history):
        s_t = cubic_sparsity(min(t + 1, mask_steps), mask_steps, sparsity)
        assert rec.sparsity == pytest.approx(prune_count(n, s_t) / n, abs=1e-12), f"mask step {t}"


@given(seed=st.integers(0, 2**16), mask_steps=st.integers(1, 10))
def test_admm_grad_nm_ramps_to_exact_pattern(backend, seed, mask_steps):
    W, XtX = _layer(seed, 4, 16)
    r = backend.prune_layer(W, XtX, None, method="admm-grad", pattern="4:8",
                            iters=mask_steps + 2, mask_steps=mask_steps)
    sp = [rec.sparsity for rec in r.history]
    assert sp == sorted(sp)
    assert all(v == 0.5 for v in sp[mask_steps - 1:]), "exact 4:8 from the last mask step on"
    if mask_steps > 1:
        assert sp[0] < 0.5, "the first mask step is below the target"



@given(seed=st.integers(0, 2**16), c=st.sampled_from([1e-3, 0.5, 7.0, 1e3]),
       method=st.sampled_from(METHODS), group=st.sampled_from(["row", "layer"]))
def test_scale_invariance(backend, seed, c, method, group):
    """X -> cX scales XtX by c^2 and changes nothing (rho and damping are in normalized units)."""
    W, XtX = _layer(seed, 5, 24)
    a = backend.prune_layer(W, XtX, 0.5, method=method, group=group)
    b = backend.prune_layer(W, XtX * c**2, 0.5, method=method, group=group)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_allclose(b.W, a.W, rtol=1e-8, atol=1e-10 * np.abs(W).max())


@given(seed=st.integers(0, 2**16), method=st.sampled_from(["magnitude", "wanda", "admm", "admm-grad"]),
       group=st.sampled_from(["row", "layer"]))
def test_permutation_equivariance(backend, seed, method, group):
    """Permuting input features permutes the result (SparseGPT's sweep is order-dependent: excluded)."""
    W, XtX = _layer(seed, 5, 24)
    p = np.random.default_rng(seed).permutation(24)
    a = backend.prune_layer(W, XtX, 0.5, method=method, group=group)
    b = backend.prune_layer(W[:, p], XtX[np.ix_(p, p)], 0.5, method=method, group=group)
    np.testing.assert_array_equal(b.mask, a.mask[:, p])
    np.testing.assert_allclose(b.W, a.W[:, p], rtol=1e-9, atol=1e-12)


@given(seed=st.integers(0, 2**16), sparsity=st.sampled_from([0.3, 0.5, 0.8]),
       group=st.sampled_from(["row", "layer"]))
def test_identity_gram_wanda_is_magnitude(backend, seed, sparsity, group):
    W = np.random.default_rng(seed).normal(size=(6, 20))
    XtX = np.eye(20)
    a = backend.prune_layer(W, XtX, sparsity, method="wanda", group=group)
    b = backend.prune_layer(W, XtX, sparsity, method="magnitude", group=group)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(a.W, b.W)


@pytest.mark.parametrize("method", METHODS)
def test_dead_features_no_nan_and_pruned_first(backend, method):
    W, XtX, _ = outlier_layer(3, 8, 32, dead=4)
    dead = np.diag(XtX) == 0
    r = backend.prune_layer(W, XtX, 0.5, method=method)
    assert np.all(np.isfinite(r.W))
    if method != "magnitude":
        assert not r.mask[:, dead].any(), "dead features have Wanda score 0: pruned first"
    low = backend.prune_layer(W, XtX, 0.0625, method=method)  # 2 of 32 per row: dead ones kept
    if method in ("admm", "admm-grad", "wanda", "magnitude"):
        kept_dead = low.mask & dead[None, :]
        np.testing.assert_array_equal(low.W[kept_dead], W[kept_dead])


def test_fixed_mask_admm_equals_exact_solution(backend):
    W, XtX, _ = outlier_layer(7, 6, 24)
    M = backend.prune_layer(W, XtX, 0.5, method="wanda").mask
    r = backend.prune_layer(W, XtX, None, method="admm", mask=M, iters=400)
    exact = backend.masked_lstsq(W, XtX, M, damp=0.1)
    np.testing.assert_allclose(r.W, exact, rtol=0, atol=1e-8 * np.abs(exact).max())


def test_prune_shared_equals_separate(backend):
    W1, XtX, _ = outlier_layer(1, 8, 32)
    W2 = np.random.default_rng(2).normal(size=(12, 32))
    for kw in (dict(method="admm-grad"), dict(method="sparsegpt", pattern="2:4"),
               dict(method="admm", group="layer")):
        shared = backend.prune_shared([W1, W2], XtX, 0.5 if "pattern" not in kw else None, **kw)
        for W, r in zip((W1, W2), shared):
            alone = backend.prune_layer(W, XtX, 0.5 if "pattern" not in kw else None, **kw)
            np.testing.assert_array_equal(r.mask, alone.mask)
            np.testing.assert_allclose(r.W, alone.W, rtol=1e-10, atol=1e-12)
