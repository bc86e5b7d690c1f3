"""OWL's per-block sparsity: the outlier ratio against a naive computation, the targets'
exact weighted mean, bounds and order, and the refusal of N:M, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, example, given, strategies as st

import admm_prune.reference as R
from synth import outlier_layer


def _block(seed: int, n_linears: int):
    """A block's weights and their inputs' norms (q/k/v-like: some share one input)."""
    Ws, norms = [], []
    for k in range(n_linears):
        W, XtX, _ = outlier_layer(seed + k // 2, 3 + 2 * k, 8 + 4 * (k // 2), outliers=3)
        Ws.append(W)
        norms.append(np.sqrt(np.diag(XtX)))
    return Ws, norms


@given(seed=st.integers(0, 2**16), n_linears=st.integers(1, 5), m=st.sampled_from([1.0, 2.0, 5.0]),
       c=st.sampled_from([1e-3, 1.0, 37.0]))
def test_outlier_ratio_is_owls_pooled_count(backend, seed, n_linears, m, c):
    """D = #{A > m mean(A)} / #A with all the block's scores pooled (OWL's torch.cat), and
    a common factor of the norms (OWL's 1/sqrt(tokens)) changes nothing."""
    Ws, norms = _block(seed, n_linears)
    A = np.concatenate([(np.abs(W) * nrm[None, :]).ravel() for W, nrm in zip(Ws, norms)])
    thr = m * A.mean()
    assume(np.min(np.abs(A - thr)) > 1e-9 * thr)  # no score on the threshold (rounding)
    D = backend.outlier_ratio(Ws, norms, m)
    assert D == np.count_nonzero(A > thr) / A.size
    assert backend.outlier_ratio(Ws, [c * x for x in norms], m) == D


@given(data=st.data(), blocks=st.integers(1, 40), s=st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.8, 0.9]),
       lam=st.sampled_from([0.0, 0.02, 0.08, 0.15, 0.3]), equal_sizes=st.booleans())
@example(data=None, blocks=4, s=0.7, lam=0.08, equal_sizes=False)
def test_owl_sparsities_average_exactly_and_fall_with_the_ratio(data, blocks, s, lam, equal_sizes):
    assume(s + lam < 1)
    if data is None:  # one outlying block: OWL's code would give it s - 2 lam (1 - mean r)
        ratios, sizes = [1.0, 1.1, 1.2, 9.0], [7, 7, 7, 3]
    else:
        ratios = data.draw(st.lists(st.floats(0, 50, allow_nan=False), min_size=blocks, max_size=blocks))
        sizes = ([12] * blocks if equal_sizes else
                 data.draw(st.lists(st.integers(1, 10**8), min_size=blocks, max_size=blocks)))
    S = R.owl_sparsities(ratios, sizes, s, lam)
    n = np.asarray(sizes, dtype=np.float64)
    assert abs(np.sum(n * S) / n.sum() - s) <= 1e-12
    assert np.all(S >= max(s - lam, 0.0) - 1e-15) and np.all(S <= s + lam + 1e-15)
    order = np.argsort(ratios, kind="stable")
    assert np.all(np.diff(S[order]) <= 1e-15), "a block with more outliers is pruned less"
    if len(set(ratios)) == 1 or lam == 0:
        np.testing.assert_array_equal(S, s)


def test_owl_sparsities_equal_owls_formula_when_nothing_clips():
    """Equal block sizes, no clipping: OWL's code, 1 - (2 lam r - mean(2 lam r) + 1 - S)."""
    D = np.array([3.0, 5.0, 4.0, 7.0, 6.0, 5.0])  # mean of r = 0.5: centred, no clipping
    s, lam = 0.7, 0.08
    r = (D - D.min()) / (D.max() - D.min())
    owl_density = 2 * lam * r - np.mean(2 * lam * r) + (1 - s)
    np.testing.assert_allclose(R.owl_sparsities(D, [100] * 6, s, lam), 1 - owl_density, atol=1e-15)


def test_owl_gpu_twin_is_the_reference_function():
    G = pytest.importorskip("admm_prune.gpu")
    assert G.owl_sparsities is R.owl_sparsities


@pytest.mark.parametrize("kwargs,match", [
    (dict(pattern="2:4"), "sparsity_profile"),
    (dict(sparsity=1.0), "sparsity"),
    (dict(lam=-0.1), "lam"),
    (dict(sparsity=0.95, lam=0.08), "lam"),
    (dict(ratios=[1.0, float("nan")]), "ratios"),
    (dict(ratios=[]), "ratios"),
    (dict(sizes=[1]), "sizes"),
    (dict(sizes=[0, 3]), "sizes"),
])
def test_owl_sparsities_rejects(kwargs, match):
    kw = dict(ratios=[1.0, 2.0], sizes=[3, 3], sparsity=0.5, lam=0.08)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        R.owl_sparsities(**kw)


def test_outlier_ratio_rejects(backend):
    Ws, norms = _block(0, 2)
    with pytest.raises(ValueError, match="col_norms"):
        backend.outlier_ratio(Ws, norms[:1])
    with pytest.raises(ValueError, match="col_norms"):
        backend.outlier_ratio(Ws, [norms[0][:-1], norms[1]])
    with pytest.raises(ValueError, match="m must"):
        backend.outlier_ratio(Ws, norms, 0.0)
