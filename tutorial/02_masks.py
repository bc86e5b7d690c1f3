# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 2: masks
#
# Chapter 1 took the mask M as given. This chapter chooses it: which weights to score
# highest (magnitude, Wanda), how the preconditioning of the ADMM solver turns Wanda into
# plain magnitude, which weights compete with which (per row, per layer, N:M groups), and
# exactly how many are pruned and in what order when scores tie. It ends with the error of
# each choice on a layer with outlier features.

# %%
from common import FAST, np, plt, save, outlier_layer

import admm_prune.reference as R


# %% [markdown]
# A synthetic layer that looks like an LLM layer where it matters: the input features have
# log-normal scales, a few of them ("outlier features") are 20 times larger, and the inputs
# are correlated. (`outlier_layer` in `common.py`, the test suite's recipe.)

# %%
d_out, d_in = (32, 64) if FAST else (128, 256)
W, XtX, X = outlier_layer(0, d_out, d_in)
norms = np.sqrt(np.diag(XtX))
print(f"layer {d_out}x{d_in}; feature norms ||X_j||: median {np.median(norms):.0f}, "
      f"largest {norms.max():.0f}")

# %% [markdown]
# ## 2.1 Scores: magnitude and Wanda
#
# A score says how much a weight matters; the mask keeps the highest scores.
# **Magnitude**: $S_{ij} = |W_{ij}|$. **Wanda** (Sun et al. 2023):
# $S_{ij} = |W_{ij}|\,\lVert X_j\rVert$, with $\lVert X_j\rVert = \sqrt{(X^\top X)_{jj}}$ the
# norm of input feature j over the calibration tokens.
#
# Where Wanda comes from: delete a single weight $W_{ij}$ and update nothing. Then
# $\Delta = -W_{ij} e_i e_j^\top$ and the error of chapter 1 is
# $\operatorname{tr}(\Delta X^\top X \Delta^\top) = W_{ij}^2 (X^\top X)_{jj} = S_{ij}^2$.
# The Wanda score is the damage of deleting that one weight alone. Magnitude ignores that
# a weight on an outlier feature is multiplied by a much larger input.

# %%
def error_of_deleting(i, j):
    Delta = np.zeros_like(W)
    Delta[i, j] = -W[i, j]
    return np.trace(Delta @ XtX @ Delta.T)


by_hand = np.array([[error_of_deleting(i, j) for j in range(8)] for i in range(3)])
np.testing.assert_allclose(by_hand, R.wanda_scores(W, XtX)[:3, :8] ** 2, rtol=1e-12)
np.testing.assert_allclose(R.wanda_scores(W, XtX), np.abs(W) * norms, rtol=1e-12)
np.testing.assert_array_equal(R.magnitude_scores(W), np.abs(W))

# %% [markdown]
# ## 2.2 Preconditioning turns Wanda into magnitude
#
# The ADMM solver works in scaled coordinates. With $D = \operatorname{diag}(\lVert X_j\rVert)$:
#
# $$\tilde W = W D, \qquad \tilde G = D^{-1} G D^{-1}, \qquad G = X^\top X + \lambda\operatorname{diag}(X^\top X).$$
#
# Then $|\tilde W_{ij}| = |W_{ij}|\lVert X_j\rVert$ is exactly the Wanda score, so "keep the
# largest entries of $\tilde W$" *is* Wanda selection; $\tilde G$ has unit diagonal times
# (1 + λ); and the objective does not change, since
# $\tilde\Delta \tilde G \tilde\Delta^\top = \Delta D D^{-1} G D^{-1} D \Delta^\top = \Delta G \Delta^\top$.
# `precondition` returns the four pieces (scaled weights, scaled G, the scale, and which
# features are live, i.e. have a nonzero norm).

# %%
lam = 0.1
D = np.diag(norms)
G = XtX + lam * np.diag(np.diag(XtX))
Wt, Gt = W @ D, np.linalg.inv(D) @ G @ np.linalg.inv(D)  # by hand
pre = R.precondition(W, XtX, damp=lam)
np.testing.assert_allclose(pre.W, Wt, rtol=1e-12)
np.testing.assert_allclose(pre.G, Gt, rtol=1e-10, atol=1e-12)
np.testing.assert_allclose(np.abs(pre.W), R.wanda_scores(W, XtX), rtol=1e-12)
np.testing.assert_allclose(np.diag(pre.G), 1 + lam, rtol=1e-12)
Delta = W * (W > 0) - W  # any difference will do
np.testing.assert_allclose(np.trace((Delta @ D) @ Gt @ (Delta @ D).T), np.trace(Delta @ G @ Delta.T),
                           rtol=1e-10)
print("diag of G~:", np.round(np.diag(pre.G)[:6], 12), "...")

# %% [markdown]
# ## 2.3 Exact counts and ties: `select_mask`
#
# At sparsity s, a group of n weights loses exactly $k = \lfloor s\,n \rfloor$ of them
# (`prune_count`), the k lowest scores. Two details make this reproducible:
#
# * **Rounding.** `int(0.29 * 100)` is 28 in floating point (0.29·100 = 28.999999999999996);
#   `prune_count` adds a 1e-9 slack so that it is 29, as a person would count.
# * **Ties.** Scores are sorted with a *stable* sort, so among equal scores the weight with
#   the lower index is pruned first. The same inputs always give the same mask.
#
# By hand: sort each row stably, mark the first k as pruned.

# %%
print("int(0.29 * 100) =", int(0.29 * 100), "  prune_count(100, 0.29) =", R.prune_count(100, 0.29))
assert R.prune_count(100, 0.29) == 29


def mask_by_hand(scores, s):
    """Prune the floor(s n) lowest of each row, lower index first among ties."""
    k = R.prune_count(scores.shape[1], s)
    keep = np.ones(scores.shape, dtype=bool)
    for i, row in enumerate(scores):
        keep[i, np.argsort(row, kind="stable")[:k]] = False
    return keep


ties = np.array([[3.0, 1.0, 2.0, 1.0, 1.0, 5.0, 1.0, 4.0],
                 [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
M_ties = R.select_mask(ties, 0.5)
np.testing.assert_array_equal(M_ties, mask_by_hand(ties, 0.5))
print("scores:\n", ties, "\nkept at s = 0.5:\n", M_ties.astype(int))
S_w = R.wanda_scores(W, XtX)
for s in (0.3, 0.5, 0.7):
    np.testing.assert_array_equal(R.select_mask(S_w, s), mask_by_hand(S_w, s))

# %% [markdown]
# ## 2.4 Who competes with whom: row or layer groups
#
# `group="row"` (Wanda's choice, our default) ranks each output row on its own: every row
# loses exactly ⌊s·d_in⌋ weights. `group="layer"` (the official ADMM code's) ranks the
# whole matrix at once and prunes ⌊s·d_out·d_in⌋ weights in total, so some rows lose more
# than others. The table shows the spread of per-row sparsity for each.

# %%
for group in ("row", "layer"):
    M = R.select_mask(S_w, 0.5, group=group)
    per_row = 1 - M.mean(axis=1)
    n = d_in if group == "row" else W.size
    assert (~M).sum() == (d_out if group == "row" else 1) * R.prune_count(n, 0.5)
    print(f"group={group:5}: pruned {(~M).sum():5d} of {W.size}, per-row sparsity "
          f"min {per_row.min():.3f} max {per_row.max():.3f}")
M_layer_hand = np.ones(W.size, bool)
M_layer_hand[np.argsort(S_w.ravel(), kind="stable")[:R.prune_count(W.size, 0.5)]] = False
np.testing.assert_array_equal(R.select_mask(S_w, 0.5, group="layer"), M_layer_hand.reshape(W.shape))

# %% [markdown]
# ## 2.5 N:M patterns
#
# `pattern="N:M"`: in every M consecutive inputs of a row, at most N weights are nonzero
# (2:4 is what NVIDIA's sparse tensor cores accelerate). The sparsity is then 1 − N/M;
# pass `sparsity=None`. Any N < M works, and d_in must be a multiple of M. By hand: cut each
# row into groups of M, keep the N highest scores of each group (stable order again).

# %%
def nm_by_hand(scores, n, m):
    groups = scores.reshape(-1, m)
    keep = np.zeros(groups.shape, dtype=bool)
    order = np.argsort(groups, axis=1, kind="stable")
    np.put_along_axis(keep, order[:, m - n:], True, axis=1)
    return keep.reshape(scores.shape)


masks_nm = {}
for pattern in ("2:4", "4:8", "1:4", "3:8"):
    n, m = map(int, pattern.split(":"))
    masks_nm[pattern] = R.select_mask(S_w, None, pattern)
    np.testing.assert_array_equal(masks_nm[pattern], nm_by_hand(S_w, n, m))
    kept_per_group = masks_nm[pattern].reshape(-1, m).sum(axis=1)
    assert np.all(kept_per_group == n)
    print(f"{pattern}: sparsity {1 - masks_nm[pattern].mean():.3f} (1 - N/M = {1 - n / m:.3f})")

# %% [markdown]
# 2:4 and 4:8 have the same sparsity, but 4:8 is less constrained: two consecutive 2:4
# groups form a valid 4:8 group, not the other way round. So the best 4:8 mask keeps at
# least as much total score as the best 2:4 mask (checked below); whether it also gives a
# lower error is a question for the table in §2.6.
#
# ADMM-Grad (chapter 4) needs N:M masks *between* dense and the full pattern. A smaller s
# gives the **gradual N:M mask**: the N best of every group are protected, and the others
# are pruned by score, up to s. At s = 1 − N/M it is exactly N:M.

# %%
assert np.all(masks_nm["2:4"].reshape(-1, 8).sum(axis=1) <= 4)  # every 2:4 mask is 4:8-valid
assert (S_w * masks_nm["4:8"]).sum() >= (S_w * masks_nm["2:4"]).sum()
M_grad = R.select_mask(S_w, 0.3, "2:4")
protected = masks_nm["2:4"]
assert np.all(M_grad[protected])  # the 2 best of each group of 4 are never pruned
print(f"gradual 2:4 at s=0.3: pruned {(~M_grad).sum()} = floor(0.3 * {d_in}) x {d_out} rows = "
      f"{R.prune_count(d_in, 0.3) * d_out}")
assert (~M_grad).sum() == R.prune_count(d_in, 0.3) * d_out

# %% [markdown]
# ## 2.6 What the choice costs on an outlier layer
#
# For each score and pattern at 50 %: the relative error of the mask alone (W ⊙ M) and after
# the exact weight update on that mask (chapter 1's `masked_lstsq`, which ADMM approximates).
# One assert is a guarantee: the update never makes a mask worse (W ⊙ M is feasible for the
# same problem, and the damping term of chapter 1 only ever favours it). The other is an
# observation on this layer, asserted so that the sentence after the table cannot go stale:
# Wanda beats magnitude for every pattern. (Deleting one weight costs its Wanda score
# squared, but deleting many at once also involves the correlations between inputs, so
# this is not a theorem.)

# %%
rows = []
for score_name in ("magnitude", "wanda"):
    S = R.magnitude_scores(W) if score_name == "magnitude" else R.wanda_scores(W, XtX)
    for label, pattern, group in (("row", "unstructured", "row"), ("layer", "unstructured", "layer"),
                                  ("2:4", "2:4", "row"), ("4:8", "4:8", "row")):
        M = R.select_mask(S, 0.5 if pattern == "unstructured" else None, pattern, group)
        e_mask = R.reconstruction_error(W, W * M, XtX)
        e_exact = R.reconstruction_error(W, R.masked_lstsq(W, XtX, M), XtX)
        assert e_exact <= e_mask + 1e-12
        rows.append((f"{score_name} {label}", e_mask, e_exact))
errors = {name: (e0, e1) for name, e0, e1 in rows}
for label in ("row", "layer", "2:4", "4:8"):
    assert all(w < m for w, m in zip(errors[f"wanda {label}"], errors[f"magnitude {label}"]))
print(f"{'mask':>15} {'W*M':>9} {'exact update':>13}")
for name, e0, e1 in rows:
    print(f"{name:>15} {e0:>9.5f} {e1:>13.5f}")

fig, ax = plt.subplots(figsize=(6.5, 3.2))
x = np.arange(len(rows))
ax.bar(x - 0.2, [r[1] for r in rows], 0.4, label="W ⊙ M (no update)")
ax.bar(x + 0.2, [r[2] for r in rows], 0.4, label="exact update on M")
ax.set_xticks(x, [r[0] for r in rows], rotation=30, ha="right")
ax.set_yscale("log")
ax.set(ylabel="relative error (log)", title=f"Mask choices at 50 %, outlier layer {d_out}x{d_in}")
ax.legend(fontsize=8)
save(fig, "02_mask_errors.png")

# %% [markdown]
# Read the table: the gap between the magnitude rows and the Wanda rows (Wanda lower
# everywhere, as asserted) is what outlier features do to a score that ignores the inputs, and the second column is what a weight
# update buys on top of any mask. The rest of the tutorial uses Wanda scores (equivalently,
# magnitude in preconditioned coordinates) and row groups unless it says otherwise.
