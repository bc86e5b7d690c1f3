"""Every bad input raises ValueError naming the argument, before any work, on every backend."""

from __future__ import annotations

import numpy as np
import pytest

from synth import outlier_layer

W, XtX, _ = outlier_layer(0, 4, 8)
NAN_W = W.copy()
NAN_W[0, 0] = np.nan
INF_G = XtX.copy()
INF_G[1, 1] = np.inf

BAD = [
    (dict(sparsity=1.0), "sparsity"),
    (dict(sparsity=-0.1), "sparsity"),
    (dict(sparsity=float("nan")), "sparsity"),
    (dict(sparsity=None), "sparsity"),
    (dict(pattern="2-4"), "pattern"),
    (dict(pattern="4:2", sparsity=None), "pattern"),
    (dict(pattern="0:4", sparsity=None), "pattern"),
    (dict(pattern="3:3", sparsity=None), "pattern"),
    (dict(pattern="2:3", sparsity=None), "divisible"),
    (dict(pattern="2:4", sparsity=0.3), "contradicts"),
    (dict(group="column"), "group"),
    (dict(method="obs"), "method"),
    (dict(W=W[:, :6]), "XtX"),
    (dict(W=W[0]), "W"),
    (dict(W=NAN_W), "W contains NaN"),
    (dict(XtX=INF_G), "XtX contains NaN"),
    (dict(XtX=-XtX), "XtX"),
    (dict(mask=np.ones((4, 6), bool)), "mask"),
    (dict(mask=np.ones((4, 8))), "mask"),
    (dict(mask=np.ones((4, 8), bool), sparsity=0.5), "mask"),
    (dict(rho=0.0), "rho"),
    (dict(damp=-1.0), "damp"),
    (dict(iters=0), "iters"),
    (dict(mask_steps=30), "mask_steps"),
    (dict(polish_iters=-1), "polish_iters"),
    (dict(polish_iters=1.5), "polish_iters"),
    (dict(method="magnitude", polish_iters=2), "polish_iters"),
    (dict(polish_iters=2, polish_damp=-0.1), "polish_damp"),
]


@pytest.mark.parametrize("kwargs,match", BAD, ids=[f"{i}-{m}" for i, (_, m) in enumerate(BAD)])
def test_prune_layer_rejects(backend, kwargs, match):
    kw = dict(W=W, XtX=XtX, sparsity=0.5)
    kw.update(kwargs)
    args = (kw.pop("W"), kw.pop("XtX"), kw.pop("sparsity"))
    with pytest.raises(ValueError, match=match):
        backend.prune_layer(*args, **kw)


def test_select_mask_rejects(backend):
    with pytest.raises(ValueError, match="sparsity"):
        backend.select_mask(np.abs(W), 0.8, "2:4")  # more than 2:4 allows
    with pytest.raises(ValueError, match="scores"):
        backend.select_mask(np.full((2, 4), np.nan), 0.5)


def test_mask_with_its_own_sparsity_is_accepted(backend):
    M = backend.prune_layer(W, XtX, 0.5, method="wanda").mask
    r = backend.prune_layer(W, XtX, 0.5, method="admm", mask=M)
    np.testing.assert_array_equal(r.mask, M)
