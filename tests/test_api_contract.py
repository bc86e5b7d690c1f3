"""API promises of every public function, on every backend (issue 13's API items).

No public function modifies its inputs or returns memory that aliases them (the torch
backend receives tensors that share memory with the test's numpy arrays, so an in-place
write or a returned view shows here); a result that does not fit the input's dtype is
refused with a ValueError naming W instead of coming back as Inf.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from admm_prune.reference import METHODS
from synth import outlier_layer

SHAPES = [(1, 1), (1, 2), (1, 9), (1, 40), (2, 1), (9, 1), (40, 1), (3, 8), (6, 17)]


def _arrays(x):
    """Every ndarray in a result (dataclass, tuple, list, state), recursively."""
    if isinstance(x, np.ndarray):
        return [x]
    if hasattr(x, "__dataclass_fields__"):
        return [a for f in x.__dataclass_fields__ for a in _arrays(getattr(x, f))]
    if isinstance(x, (tuple, list)):
        return [a for v in x for a in _arrays(v)]
    return []


def _assert_untouched(inputs, copies, outputs, what):
    for name, (a, c) in zip(inputs, zip(inputs.values(), copies)):
        np.testing.assert_array_equal(a, c, err_msg=f"{what} modified its input {name}")
    for out in _arrays(outputs):
        for name, a in inputs.items():
            assert not np.shares_memory(out, a), f"{what} returned memory of its input {name}"


@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**16), method=st.sampled_from(METHODS),
       given_mask=st.booleans(), polish=st.sampled_from([0, 3]))
@example(shape=(1, 40), seed=0, method="sparsegpt", given_mask=False, polish=0)  # issue 13
@example(shape=(40, 1), seed=0, method="sparsegpt", given_mask=False, polish=0)
@example(shape=(1, 40), seed=0, method="sparsegpt", given_mask=True, polish=0)
def test_prune_layer_leaves_inputs_alone(backend, shape, seed, method, given_mask, polish):
    W, XtX, _ = outlier_layer(seed, *shape)
    inputs = {"W": W, "XtX": XtX}
    kw = dict(method=method, iters=4, mask_steps=2)
    if method != "magnitude":
        kw["polish_iters"] = polish
    if given_mask:
        inputs["mask"] = np.random.default_rng(seed).random(shape) < 0.5
        kw["mask"] = inputs["mask"]
    copies = [a.copy() for a in inputs.values()]
    r = backend.prune_layer(W, XtX, None if given_mask else 0.5, **kw)
    _assert_untouched(inputs, copies, r, f"prune_layer({method})")
    rs = backend.prune_shared([W, W[::-1].copy()], XtX, None if given_mask else 0.5, **kw)
    _assert_untouched(inputs, copies, rs, f"prune_shared({method})")


@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**16))
def test_lower_level_functions_leave_inputs_alone(backend, shape, seed):
    W, XtX, _ = outlier_layer(seed, *shape)
    M = np.random.default_rng(seed).random(shape) < 0.5
    inputs = {"W": W, "XtX": XtX, "mask": M}
    copies = [a.copy() for a in inputs.values()]
    outs = [
        backend.sparsegpt(W, XtX, 0.5),
        backend.sparsegpt(W, XtX, None, mask=M),
        backend.masked_lstsq(W, XtX, M),
        backend.wanda_scores(W, XtX),
        backend.magnitude_scores(W),
        backend.select_mask(np.abs(W), 0.5),
        backend.precondition(W, XtX, 0.1),
        list(backend.admm_iterates(W, XtX, None, mask=M, iters=3)),
        list(backend.admm_iterates(W, XtX, 0.5, iters=3, mask_steps=2)),
        list(backend.polish_iterates(W, XtX, M, W, iters=3)),
    ]
    _assert_untouched(inputs, copies, outs, "a lower-level function")


def _duplicated_features(seed: int, d_out: int, half: int, scale: float):
    """Every input feature twice: pruning one of a pair moves its weight onto the other."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(8 * half, half))
    X = np.concatenate([X, X], axis=1)
    W = scale * np.sign(rng.normal(size=(d_out, half)))
    return np.concatenate([W, W], axis=1), X.T @ X


@given(seed=st.integers(0, 2**16), d_out=st.integers(1, 4), half=st.integers(1, 8),
       scale=st.sampled_from([1.0, 1e3, 2e4, 3.5e4]),
       method=st.sampled_from(["sparsegpt", "admm", "admm-grad", "wanda"]))
@example(seed=0, d_out=2, half=4, scale=3.5e4, method="sparsegpt")  # issue 13: Inf, no error
def test_float16_result_fits_or_is_refused(backend, seed, d_out, half, scale, method):
    """fp16 weights near its range: the result is finite in W's dtype, or a ValueError names W."""
    W, XtX = _duplicated_features(seed, d_out, half, scale)
    try:
        r = backend.prune_layer(W.astype(np.float16), XtX, 0.5, method=method)
    except ValueError as e:
        assert str(e).startswith("W:") and "float16" in str(e), e
        return
    assert r.W.dtype in (np.float16, np.float64)
    assert np.all(np.isfinite(r.W))


def test_float16_overflow_is_refused_on_the_torch_backend():
    torch = pytest.importorskip("torch")
    import admm_prune.gpu as G

    W, XtX = _duplicated_features(0, 2, 4, 3.5e4)
    with pytest.raises(ValueError, match="W: the pruned weights do not fit float16"):
        G.prune_layer(torch.tensor(W, dtype=torch.float16), torch.tensor(XtX), 0.5, method="sparsegpt")
    r = G.prune_layer(torch.tensor(W, dtype=torch.float32), torch.tensor(XtX), 0.5, method="sparsegpt")
    assert bool(torch.isfinite(r.W).all())  # float32 holds the same result
