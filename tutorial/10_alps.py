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
# # Chapter 10: ALPS, a support found by ADMM itself
#
# ADMM-Grad (chapter 4) chooses its mask with a schedule written in advance: the sparsity
# rises on a cubic ramp over 15 iterations, then the mask is frozen. ALPS (Meng, Behdin,
# Wang, Mazumder, NeurIPS 2024; `method="alps"`) puts the sparsity constraint itself into
# ADMM: Z is the projection of W + U onto "k kept per row" (or N:M) at every iteration, at
# the full target from the start, and the penalty rho grows as the support moves until it
# stops moving. Then a few conjugate-gradient steps solve for the weights on that support.
# This chapter writes one iteration by hand, reads the rho schedule, and watches both
# methods' supports move on one layer.

# %%
from common import FAST, np, plt, save, outlier_layer

import admm_prune.reference as R

d_out, d_in, s = (32, 64, 0.7) if FAST else (128, 256, 0.7)
W, XtX, _ = outlier_layer(5, d_out, d_in)
damp = R.DEFAULT_DAMP["alps"]

# %% [markdown]
# ## 10.1 One iteration by hand
#
# In the preconditioned coordinates of chapter 3 ($\tilde W_0 = W D$, $\tilde G = D^{-1} G D^{-1}$),
# starting from $Z_0 = P(\tilde W_0)$ (the Wanda mask) and $U_0 = 0$, ALPS updates W first:
#
# $$W = (\tilde W_0 \tilde G + \rho (Z - U))(\tilde G + \rho I)^{-1}, \qquad
#   Z = P(W + U) = (W + U) \odot M,\ M = \text{top}_k |W + U|, \qquad U = U + W - Z.$$
#
# The first two are chapter 3's `w_update` and `z_update`; the difference is that M is chosen
# again at every iteration, at the full sparsity.

# %%
W0, G, scale, live = R.precondition(W, XtX, damp)
rho = R.DEFAULTS.alps_rho
M0 = R.select_mask(np.abs(W0), s)
Z, U = W0 * M0, np.zeros_like(W0)
W1 = np.linalg.solve(G + rho * np.eye(d_in), (W0 @ G + rho * (Z - U)).T).T  # G symmetric
M1 = R.select_mask(np.abs(W1 + U), s)
Z1 = (W1 + U) * M1
U1 = U + W1 - Z1
first = next(R.alps_iterates(W, XtX, s))
for mine, theirs in ((W1, first.W), (Z1, first.Z), (U1, first.U)):
    np.testing.assert_allclose(mine, theirs, rtol=1e-10, atol=1e-12 * np.abs(W0).max())
assert np.array_equal(M1, first.M)
print(f"iteration 1 by hand == alps_iterates; {int((M1 != M0).sum())} mask entries moved already")

# %% [markdown]
# ## 10.2 The rho schedule
#
# The projection is not convex, so nothing makes a fixed-rho ADMM settle. Every 3 iterations
# ALPS counts the entries c that entered or left the support since the last count and, with
# k entries kept, multiplies rho by 1.3 if c/k > 10 %, by 1.2 if c/k > 0.5 %, by 1.1 if
# anything moved; when nothing moved it stops. A larger rho ties W to Z more tightly, so the
# support moves less: the growth is what ends the search. (Before rho first grows, a support
# that hardly moves means rho started too large: it is divided by 5.) `rho_update` is that
# table:

# %%
kept = int(M0.sum())
for c in (kept // 5, kept // 50, 1, 0):
    step = R.rho_update(1.0, c, kept, True)
    print(f"c/k = {c / kept:7.4f}: rho x {step.rho:.1f} ({step.verdict})")
assert [R.rho_update(1.0, c, kept, True).rho for c in (kept // 5, kept // 50, 1)] == [1.3, 1.2, 1.1]

# %% [markdown]
# ## 10.3 Two support paths on one layer
#
# For each iteration: how many mask entries changed since the previous one, and the layer
# error $\|X(\hat W - W)^T\|^2 / \|X W^T\|^2$ of the feasible iterate Z (in original
# coordinates). ADMM-Grad's Z is at the cubic ramp's sparsity until its last mask step, so
# its early errors are low because it has pruned less; ALPS's Z is at the target throughout.

# %%
def path(states):
    moved = [int((b.M != a.M).sum()) for a, b in zip(states, states[1:])]
    errors = [R.reconstruction_error(W, st.Z / st.scale[None, :], XtX) for st in states]
    return moved, errors


grad = list(R.admm_iterates(W, XtX, s))
alps = list(R.alps_iterates(W, XtX, s))
moved_g, err_g = path(grad)
moved_a, err_a = path(alps)
print(f"ADMM-Grad: {len(grad)} iterations, entries moved {sum(moved_g)}; "
      f"ALPS: {len(alps)} iterations (rho {alps[0].rho:g} -> {alps[-1].rho:.3g}), entries moved {sum(moved_a)}")
print("ALPS checks (k, c, verdict):", [(a.k, a.changed, a.verdict) for a in alps if a.verdict][:8], "...")
assert alps[-1].verdict in ("stop", "settled"), "ALPS ended because its support stopped moving"
assert alps[-1].changed < 3e-4 * kept, "no entry (or almost none) moved over its last 3 iterations"

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
ax1.plot(range(2, len(grad) + 1), moved_g, "o-", label="ADMM-Grad")
ax1.plot(range(2, len(alps) + 1), moved_a, "s-", label="ALPS")
ax1.set(xlabel="iteration", ylabel="mask entries changed", yscale="symlog")
ax2.plot(range(1, len(grad) + 1), err_g, "o-", label="ADMM-Grad (Z at the ramp's sparsity)")
ax2.plot(range(1, len(alps) + 1), err_a, "s-", label="ALPS (Z at the target)")
ax2.set(xlabel="iteration", ylabel="layer error of Z", yscale="log")
ax2.legend()
save(fig, "10_support_paths.png")

# %% [markdown]
# ## 10.4 The finish, and who wins
#
# ALPS ends by projecting its last W (M = top |W|) and running 10 steps of preconditioned CG on
# that support. That CG is exactly the project's finish, `polish_iterates` (chapter 8): on a
# constant-diagonal $\tilde G$, ALPS's PCG and our CG take the same steps. `prune_layer` runs it;
# the masks are then compared with the best weights each could have (`masked_lstsq`).

# %%
r_alps = R.prune_layer(W, XtX, s, method="alps")
last = alps[-1]
M = R.select_mask(np.abs(last.W) * live[None, :], s)
*_, fin = R.polish_iterates(W, XtX, M, last.W * M / scale[None, :], damp=damp, iters=R.DEFAULTS.alps_pcg_iters)
np.testing.assert_allclose(r_alps.W, fin.W / fin.scale[None, :], rtol=1e-12, atol=1e-12 * np.abs(W).max())
r_grad = R.prune_layer(W, XtX, s, method="admm-grad")
rows = []
for name, r in (("ADMM-Grad", r_grad), ("ALPS", r_alps)):
    exact = R.masked_lstsq(W, XtX, r.mask, damp=damp)
    rows.append((name, R.reconstruction_error(W, r.W, XtX), R.reconstruction_error(W, exact, XtX)))
    print(f"{name:10s} layer error {rows[-1][1]:.5f}   best weights on its mask {rows[-1][2]:.5f}")
print(f"masks differ on {np.mean(r_alps.mask != r_grad.mask):.1%} of the entries")
assert rows[1][1] < rows[0][1] and rows[1][2] < rows[0][2], "ALPS's support is the better one here"

# %% [markdown]
# On this layer ALPS's support is better than ADMM-Grad's even when both get their exact
# weights: the search, not the weights, makes the difference. `paper_notes/alps.md` measures
# the same on SmolLM2's linears and the perplexity of whole pruned models, where the cost
# matters too: ALPS runs tens of iterations (a new factorization each time rho changes)
# against ADMM-Grad's 20 with one.
