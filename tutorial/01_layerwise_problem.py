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
# # Chapter 1: the layer-wise problem
#
# One-shot pruning of an LLM (SparseGPT, Wanda, and the ADMM method of Boža 2024,
# arXiv 2401.02938) never trains the model again. It walks through the decoder blocks in
# order, and for each `nn.Linear` it solves a small, self-contained problem: *keep the
# layer's output on calibration data as close as possible to the dense output, using only
# the weights the mask allows*. This chapter states that problem, takes it apart, and
# solves it exactly by hand. Later chapters solve it fast.
#
# Every chapter follows the same rhythm: an equation, a naive computation of it in a few
# lines of NumPy, an `assert` that the naive computation equals the function in
# `admm_prune.reference`, and a table or plot of what it means.
#
# Symbols (see `paper_notes/notation.md`): a linear layer computes `y = W x` with
# W of shape (d_out, d_in) (PyTorch's `nn.Linear` layout, one row per output neuron).
# The calibration inputs of the layer are the rows of X, shape (N, d_in), one per token.
# A mask M has W's shape; True means kept.

# %%
import time

from common import FAST, np, plt, save

import admm_prune.reference as R


# %% [markdown]
# ## 1.1 The problem
#
# Given the dense weights W and a mask M, find pruned weights Ŵ:
#
# $$\min_{\hat W}\ \lVert X W^\top - X \hat W^\top \rVert_F^2
#   \quad\text{subject to}\quad \hat W = \hat W \odot M .$$
#
# $X W^\top$ is the layer's dense output on the calibration tokens (N × d_out); the pruned
# layer should reproduce it. Our toy layer has a few *outlier features*: input coordinates
# whose activations are much larger than the others, as in real LLMs. Chapter 2 shows why
# they matter for the mask; here they only make the numbers less bland.

# %%
rng = np.random.default_rng(0)
d_out, d_in, N = 4, 8, 64
scales = np.exp(0.5 * rng.normal(size=d_in))
scales[[2, 5]] *= 20  # two outlier features
X = rng.normal(size=(N, d_in)) @ (np.eye(d_in) + rng.normal(size=(d_in, d_in)) / 3) * scales
W = rng.normal(size=(d_out, d_in))
M = R.select_mask(R.magnitude_scores(W), 0.5)  # keep the larger half of |W| per row (chapter 2)
print(M.astype(int))

# %% [markdown]
# ## 1.2 The rows are independent
#
# Write $\hat w_i$ and $w_i$ for row i of Ŵ and W (the weights of output neuron i). Column i
# of $X(\hat W - W)^\top$ is $X(\hat w_i - w_i)$, so the squared Frobenius norm is a sum
# over output neurons:
#
# $$\lVert X (\hat W - W)^\top\rVert_F^2 = \sum_{i=1}^{d_\text{out}} \lVert X(\hat w_i - w_i)\rVert^2 .$$
#
# Row i's term involves only row i's weights, and the constraint $\hat W = \hat W \odot M$
# is also row by row. So the problem splits into **d_out independent least-squares
# problems**, one per output neuron, each over the weights its own row of M keeps.
# Check it on the plainest candidate, Ŵ = W ⊙ M (prune without updating):

# %%
What = W * M
total = np.linalg.norm(X @ W.T - X @ What.T) ** 2
per_row = [np.linalg.norm(X @ (What[i] - W[i])) ** 2 for i in range(d_out)]
np.testing.assert_allclose(total, sum(per_row), rtol=1e-12)
print("error per row:", np.round(per_row, 1), " total:", round(total, 1))

# %% [markdown]
# ## 1.3 Only the Gram matrix XᵀX is needed
#
# Each row's term is a quadratic form, $\lVert X\delta\rVert^2 = \delta^\top X^\top X \delta$
# with $\delta = \hat w_i - w_i$. Stacking the rows, with $\Delta = \hat W - W$:
#
# $$\lVert X \Delta^\top\rVert_F^2 = \operatorname{tr}(\Delta\, X^\top X\, \Delta^\top).$$
#
# So the solver never needs X (N × d_in, with N in the hundreds of thousands of tokens), only
# `XtX` = $X^\top X$ (d_in × d_in). It is a sum over tokens, $\sum_t x_t x_t^\top$, so a
# forward hook can accumulate it batch by batch and throw the activations away.
# `reconstruction_error` reports the error relative to the dense output's energy,
# $\operatorname{tr}(\Delta X^\top X \Delta^\top) / \operatorname{tr}(W X^\top X W^\top)$.

# %%
XtX = sum(Xb.T @ Xb for Xb in np.array_split(X, 4))  # accumulated in 4 batches of tokens
np.testing.assert_allclose(XtX, X.T @ X, rtol=1e-12)
Delta = What - W
np.testing.assert_allclose(np.trace(Delta @ XtX @ Delta.T), total, rtol=1e-12)
np.testing.assert_allclose(
    R.reconstruction_error(W, What, XtX), total / np.linalg.norm(X @ W.T) ** 2, rtol=1e-12
)
print(f"relative error of W*M (no update): {R.reconstruction_error(W, What, XtX):.4f}")

# A LLaMA-7B MLP down_proj, calibrated on 128 windows of 2048 tokens: X vs XtX, in floats.
tokens, d = 128 * 2048, 11008
print(f"down_proj: X has {tokens * d:.2e} entries, XtX {d * d:.2e} ({tokens / d:.0f}x smaller)")

# %% [markdown]
# ## 1.4 One row, solved exactly
#
# Fix a row $w$ (drop the index i), and split its inputs into the kept support S and the
# pruned set P. The pruned weights are fixed at zero, $\hat w_P = 0$, so
# $\delta_P = -w_P$; only $\hat w_S$ is free. With $H = X^\top X$,
#
# $$\delta^\top H \delta = \delta_S^\top H_{SS}\delta_S + 2\,\delta_S^\top H_{SP}\,\delta_P + \delta_P^\top H_{PP}\delta_P ,$$
#
# and setting the gradient in $\delta_S$ to zero gives the normal equations
#
# $$H_{SS}\,\delta_S = H_{SP}\, w_P, \qquad \hat w_S = w_S + H_{SS}^{-1} H_{SP}\, w_P .$$
#
# The kept weights absorb what the pruned ones used to contribute, through the
# correlations $H_{SP}$ between kept and pruned inputs. The same answer, without H: the
# ordinary least-squares fit of the dense output $Xw$ by the kept columns $X_S$.
# `masked_lstsq` does this row by row; with `damp=0` it is exactly this problem.

# %%
i = 0
S, P = M[i], ~M[i]
w = W[i]
w_hat_S = w[S] + np.linalg.solve(XtX[np.ix_(S, S)], XtX[np.ix_(S, P)] @ w[P])  # normal equations
w_lsq_S = np.linalg.lstsq(X[:, S], X @ w, rcond=None)[0]  # least squares on X itself
np.testing.assert_allclose(w_hat_S, w_lsq_S, rtol=1e-9)

exact0 = R.masked_lstsq(W, XtX, M, damp=0.0)
np.testing.assert_allclose(exact0[i, S], w_hat_S, rtol=1e-9)
assert np.all(exact0[~M] == 0)
# optimality: the gradient 2 (w_hat - w) H vanishes on the kept support
grad = (exact0[i] - w) @ XtX
assert np.abs(grad[S]).max() < 1e-9 * np.abs(w @ XtX).max()
print("row 0, dense :", np.round(w, 3))
print("row 0, exact :", np.round(exact0[i], 3))
print(f"relative error: W*M {R.reconstruction_error(W, W * M, XtX):.4f}, "
      f"exact update {R.reconstruction_error(W, exact0, XtX):.4f}")

# %% [markdown]
# ## 1.5 The damped objective the official code solves
#
# The official ADMM code (and this project, `damp` = λ = 0.1 by default) does not solve
# the plain problem. It solves
#
# $$\min_{\hat W}\ \operatorname{tr}\big((\hat W - W)\, G\, (\hat W - W)^\top\big),
#   \qquad G = X^\top X + \lambda \operatorname{diag}(X^\top X).$$
#
# Expanding the diagonal term shows what it is:
#
# $$\operatorname{tr}(\Delta G \Delta^\top) = \lVert X\Delta^\top\rVert_F^2
#   + \lambda \sum_j \lVert X_j\rVert^2\, \lVert \Delta_{:,j}\rVert^2 ,$$
#
# where $\lVert X_j\rVert^2 = (X^\top X)_{jj}$ is the energy of input feature j. Two readings:
#
# * **Proximal.** On pruned weights $\Delta$ is fixed ($-W$), so the extra term only acts on
#   the kept weights: it pulls them toward their dense values, per input feature, with a
#   strength proportional to that feature's energy. λ → 0 is the plain least squares of
#   §1.4; λ → ∞ freezes the kept weights (Ŵ → W ⊙ M, no update).
# * **Extra data.** $G = \tilde X^\top \tilde X$ for the augmented inputs
#   $\tilde X = [X;\ \sqrt\lambda\, \operatorname{diag}(\lVert X_j\rVert)]$: one fake token per
#   input feature, whose target is the dense output. So the damped problem is still a
#   least-squares problem, and H + λ·diag(H) is positive definite whenever no feature is
#   dead, even with fewer tokens than features.

# %%
lam = 0.1
G = XtX + lam * np.diag(np.diag(XtX))
np.testing.assert_allclose(
    np.trace(Delta @ G @ Delta.T),
    np.linalg.norm(X @ Delta.T) ** 2 + lam * np.sum(np.diag(XtX) * np.sum(Delta**2, axis=0)),
    rtol=1e-12,
)
X_aug = np.vstack([X, np.sqrt(lam) * np.diag(np.linalg.norm(X, axis=0))])
np.testing.assert_allclose(X_aug.T @ X_aug, G, rtol=1e-12)

# row 0 of the damped problem, by hand, as least squares on the augmented data
w_damp_S = np.linalg.lstsq(X_aug[:, S], X_aug @ w, rcond=None)[0]
exact = R.masked_lstsq(W, XtX, M, damp=lam)
np.testing.assert_allclose(exact[i, S], w_damp_S, rtol=1e-9)

# fewer tokens than features: X^T X is singular, G is not
Xs = X[:5]
print("smallest eigenvalue with N=5 < d_in=8: XtX %.1e, G %.1e" % (
    np.linalg.eigvalsh(Xs.T @ Xs)[0], np.linalg.eigvalsh(Xs.T @ Xs + lam * np.diag(np.diag(Xs.T @ Xs)))[0]))

# %% [markdown]
# The damping path: as λ grows, the undamped error of the solution can only grow and its
# weighted distance to W ⊙ M can only shrink (the usual trade-off of a regularization
# path; the asserts check it). The table is what λ costs on this layer.

# %%
lams = [0.0, 0.01, 0.1, 1.0, 10.0, 100.0, 1e4]
def weighted_sq(A):
    """sum_j ||X_j||^2 ||A_{:,j}||^2, the damping term's norm."""
    return np.sum(np.diag(XtX) * np.sum(A**2, axis=0))


rows = []
for lam_ in lams:
    Wl = R.masked_lstsq(W, XtX, M, damp=lam_)
    rows.append((lam_, R.reconstruction_error(W, Wl, XtX), weighted_sq(Wl - W * M) / weighted_sq(W * M)))
err_path, pull_path = np.array([r[1] for r in rows]), np.array([r[2] for r in rows])
assert np.all(np.diff(err_path) >= -1e-12) and np.all(np.diff(pull_path) <= 1e-12)
print(f"{'lambda':>8} {'rel. error':>11} {'moved from W*M':>15}")
for lam_, e, p in rows:
    print(f"{lam_:>8g} {e:>11.4f} {p:>15.4f}")
print(f"{'W*M':>8} {R.reconstruction_error(W, W * M, XtX):>11.4f} {0.0:>15.4f}")

fig, ax = plt.subplots(figsize=(5, 3.2))
ax.semilogx([max(l, 1e-3) for l in lams], err_path, "o-", label="relative error ‖XΔᵀ‖²/‖XWᵀ‖²")
ax.axhline(R.reconstruction_error(W, W * M, XtX), color="gray", ls="--", label="W ⊙ M (no update)")
ax.axhline(err_path[0], color="k", ls=":", label="undamped optimum (λ = 0)")
ax.set(xlabel="damping λ (λ = 0 drawn at 1e-3)", ylabel="undamped relative error",
       title="The damped solution trades error for staying near W")
ax.legend(fontsize=8)
save(fig, "01_damping_path.png")

# %% [markdown]
# ## 1.6 What the exact solve costs on LLaMA-7B
#
# §1.4 is exact, so why not use it? Count the work. At sparsity s, each row keeps
# k = (1 − s)·d_in weights and needs its own k × k Cholesky factorization, because every row
# has a different support: about $d_\text{out}\, k^3/3$ flops per linear layer, and all of it
# again whenever the mask changes.
#
# ADMM (chapter 3) factorizes one d_in × d_in matrix per layer ($d_\text{in}^3/3$ flops) and
# then does T = 20 updates, each one d_out × d_in by d_in × d_in product (two triangular
# solves with the factor cost the same $2 d_\text{out} d_\text{in}^2$ flops), plus one more
# product for the right-hand side. The ratio of the two is about
# $(1-s)^3 d_\text{in} / (6(T+1))$, so exact solving loses by more the wider the layer.
# LLaMA-7B has 32 blocks of 7 linears:

# %%
T, s = 20, 0.5
hidden, inter, blocks = 4096, 11008, 32
linears = [("q_proj", hidden, hidden), ("k_proj", hidden, hidden), ("v_proj", hidden, hidden),
           ("o_proj", hidden, hidden), ("gate_proj", inter, hidden), ("up_proj", inter, hidden),
           ("down_proj", hidden, inter)]


def exact_flops(d_out, d_in, s):
    k = (1 - s) * d_in
    return d_out * k**3 / 3


def admm_flops(d_out, d_in, T):
    return d_in**3 / 3 + (T + 1) * 2 * d_out * d_in**2


print(f"{'linear':>10} {'d_out x d_in':>13} {'exact flops':>12} {'ADMM flops':>11} {'ratio':>6} "
      f"{'exact, all row factors':>23}")
tot_exact = tot_admm = 0.0
for name, do, di in linears:
    fe, fa = exact_flops(do, di, s), admm_flops(do, di, T)
    tot_exact, tot_admm = tot_exact + blocks * fe, tot_admm + blocks * fa
    gib = do * ((1 - s) * di) ** 2 * 4 / 2**30  # float32, if the rows were batched
    print(f"{name:>10} {f'{do}x{di}':>13} {fe:>12.2e} {fa:>11.2e} {fe / fa:>6.1f} {gib:>19.0f} GiB")
print(f"{'model':>10} {f'{blocks} blocks':>13} {tot_exact:>12.2e} {tot_admm:>11.2e} "
      f"{tot_exact / tot_admm:>6.1f}")
# the ratio formula above (which drops ADMM's one factorization), checked on the down_proj
np.testing.assert_allclose(exact_flops(hidden, inter, s) / admm_flops(hidden, inter, T),
                           (1 - s) ** 3 * inter / (6 * (T + 1)), rtol=0.05)
crossover = 6 * (T + 1) / (1 - s) ** 3
print(f"exact solving costs fewer flops only for d_in < 6 (T+1) / (1-s)^3 = {crossover:.0f}")

# %% [markdown]
# Flops are only half the story. ADMM's work is a handful of large, dense matrix products,
# the operation accelerators run closest to peak; the exact solve is d_out separate
# factorizations of different sub-matrices, which either run one by one or need the memory
# in the last column to batch. And ADMM-Grad (chapter 4) changes the mask 15 times per
# layer, which the exact solve would pay for 15 times.
#
# Side by side on this CPU, on a small square layer (its width is printed next to the
# crossover width above): the exact per-row solve against 20 iterations of ADMM on the same
# mask. The seconds are whatever this machine measures; only their ratio means anything.

# %%
d = 96 if FAST else 1024
Xb = rng.normal(size=(4 * d, d)) * np.exp(0.5 * rng.normal(size=d))
Wb, XtXb = rng.normal(size=(d, d)), Xb.T @ Xb
Mb = R.select_mask(R.wanda_scores(Wb, XtXb), s)
t0 = time.perf_counter()
Wx = R.masked_lstsq(Wb, XtXb, Mb)
t1 = time.perf_counter()
Wa = R.prune_layer(Wb, XtXb, None, method="admm", mask=Mb, track_objective=False).W
t2 = time.perf_counter()
print(f"{d}x{d} layer: exact {t1 - t0:.3f} s, ADMM (20 iterations) {t2 - t1:.3f} s, "
      f"ratio exact/ADMM {(t1 - t0) / (t2 - t1):.1f}")
print(f"relative error: exact {R.reconstruction_error(Wb, Wx, XtXb):.5f}, "
      f"ADMM {R.reconstruction_error(Wb, Wa, XtXb):.5f}")

# %% [markdown]
# Plot the flop counts against the layer width, with LLaMA-7B's two input widths marked:

# %%
widths = np.logspace(2, 4.3, 40)
fig, ax = plt.subplots(figsize=(5, 3.2))
ax.loglog(widths, [exact_flops(x, x, s) for x in widths], label=f"exact, d_out rows (s = {s})")
ax.loglog(widths, [admm_flops(x, x, T) for x in widths], label=f"ADMM, T = {T}")
for x, lbl in ((hidden, "LLaMA-7B widths"), (inter, None)):
    ax.axvline(x, color="gray", ls=":", label=lbl)
ax.axvline(crossover, color="r", ls="--", lw=0.8, label="crossover")
ax.set(xlabel="d_in = d_out", ylabel="flops per layer", title="Cost of one layer")
ax.legend(fontsize=8)
save(fig, "01_cost.png")

# %% [markdown]
# **What to remember.** The layer-wise problem is d_out independent least-squares problems
# that need only the d_in × d_in Gram matrix. The project solves its damped form, which is a
# least-squares problem with one extra "token" per input feature, or equivalently a
# proximal pull toward the dense weights. Solving it exactly is easy to write and too slow
# at LLM width; chapter 3 solves it with one factorization per layer.
