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
# # Chapter 3: ADMM on a fixed mask
#
# Chapter 1 solved the damped layer-wise problem exactly, one row at a time, and counted
# why that is too slow. This chapter derives the ADMM solver of Boža (2024): split the
# variable in two, let one copy carry the least squares and the other the mask, and make
# them agree. It factorizes one d_in × d_in matrix per layer and then only multiplies.
# We run one iteration by hand and check it against `admm_iterates` step by step, then
# watch it converge to the exact answer of `masked_lstsq`.

# %%
from common import FAST, np, plt, save, outlier_layer

import admm_prune.reference as R


# %% [markdown]
# ## 3.1 The splitting
#
# Work in the preconditioned coordinates of chapter 2 ($\tilde W_0 = W D$,
# $\tilde G = D^{-1} G D^{-1}$), where the Wanda mask is the magnitude mask and
# $\tilde G$ has diagonal 1 + λ. The damped problem on a fixed mask M is
#
# $$\min_{W}\ f(W) + g(W), \qquad f(W) = \tfrac12 \operatorname{tr}\big((W - \tilde W_0)\,\tilde G\,(W - \tilde W_0)^\top\big),
#   \qquad g(Z) = \begin{cases} 0 & Z = Z \odot M \\ \infty & \text{otherwise.}\end{cases}$$
#
# (The ½ does not move the minimizer; it makes the update below match the code.) f is an
# easy least squares *without* the mask, g is an easy projection *without* the least
# squares. ADMM gives each term its own copy of the variable and asks them to agree:
#
# $$\min_{W, Z}\ f(W) + g(Z) \quad\text{subject to}\quad W = Z .$$
#
# With a scaled dual variable U (the running sum of the disagreements W − Z) the augmented
# Lagrangian is $f(W) + g(Z) + \frac\rho2\lVert W - Z + U\rVert_F^2 - \frac\rho2\lVert U\rVert_F^2$,
# and ADMM minimizes it over Z, then updates U, then minimizes over W:
#
# | update | equation | code |
# |---|---|---|
# | Z: project onto the mask | $Z = \arg\min_Z g(Z) + \frac\rho2\lVert W - Z + U\rVert^2 = (W + U)\odot M$ | `z_update(W, U, M)` |
# | U: accumulate the violation | $U = U + W - Z$ | `u_update(U, W, Z)` |
# | W: least squares pulled toward Z − U | $(W - \tilde W_0)\tilde G + \rho(W - Z + U) = 0 \Rightarrow W = (\tilde W_0 \tilde G + \rho(Z - U))(\tilde G + \rho I)^{-1}$ | `w_update(factor, B, Z, U, rho)` |
#
# The order Z, U, W with W starting at the dense $\tilde W_0$ and U at 0 is the official
# code's; it is the textbook W, Z, U order shifted by half a step. The matrix
# $\tilde G + \rho I$ never changes, so it is **factorized once** (Cholesky,
# `factorize`), and $B = \tilde W_0 \tilde G$ is computed once; each iteration is then one
# projection, one addition, and two triangular solves with the factor.
#
# How far the iterates are from agreeing is measured by the primal residual
# $\lVert W - Z\rVert_F$, and how much Z still moves by the dual residual
# $\rho\lVert Z - Z_\text{prev}\rVert_F$; both go to zero. The objective is tracked at Z,
# which satisfies the mask exactly at every iteration.

# %%
d_out, d_in = (32, 64) if FAST else (256, 512)
W, XtX, _ = outlier_layer(1, d_out, d_in)
s, lam, rho = 0.5, 0.1, 1.0
M = R.select_mask(R.wanda_scores(W, XtX), s)  # fixed for this chapter

# %% [markdown]
# ## 3.2 Three iterations by hand, against `admm_iterates`
#
# First the setup (preconditioning, B, one factorization), then the loop. Each line of the
# loop is one equation of the table above; after each iteration we compare every piece of
# state with the iterate `admm_iterates` yields.

# %%
norms = np.sqrt(np.diag(XtX))
W0 = W * norms  # W~0 = W D
Gt = (XtX + lam * np.diag(np.diag(XtX))) / np.outer(norms, norms)  # G~ = D^-1 G D^-1
B = W0 @ Gt
A_inv = np.linalg.inv(Gt + rho * np.eye(d_in))  # by hand; the code keeps a Cholesky factor

states = R.admm_iterates(W, XtX, None, mask=M, rho=rho, damp=lam)
Wk, U, Z_prev = W0.copy(), np.zeros_like(W0), W0
for k in range(1, 4):
    Z = (Wk + U) * M  # Z-update
    U = U + Wk - Z  # U-update
    primal, dual = np.linalg.norm(Wk - Z), rho * np.linalg.norm(Z - Z_prev)
    Wk = (B + rho * (Z - U)) @ A_inv  # W-update
    obj = np.trace((Z - W0) @ Gt @ (Z - W0).T)
    st = next(states)
    assert st.k == k
    for name, mine, theirs in (("Z", Z, st.Z), ("U", U, st.U), ("W", Wk, st.W)):
        np.testing.assert_allclose(theirs, mine, rtol=1e-9, atol=1e-9 * np.abs(W0).max(), err_msg=name)
    np.testing.assert_allclose([st.primal_residual, st.dual_residual, st.objective],
                               [primal, dual, obj], rtol=1e-9)
    assert np.all(U[M] == 0)  # see 3.3
    print(f"k={k}: objective {obj:.6e}  primal {primal:.3e}  dual {dual:.3e}")
    Z_prev = Z

# %% [markdown]
# The same iteration through the reference's one-line functions, which is how
# `admm_iterates` is written:

# %%
factor = R.factorize(Gt, rho)
W1, U1 = W0.copy(), np.zeros_like(W0)
Z1 = R.z_update(W1, U1, M)
U1 = R.u_update(U1, W1, Z1)
W1 = R.w_update(factor, B, Z1, U1, rho)
st1 = next(R.admm_iterates(W, XtX, None, mask=M, rho=rho, damp=lam))
np.testing.assert_allclose(W1, st1.W, rtol=1e-10, atol=1e-10 * np.abs(W0).max())
np.testing.assert_allclose(R.objective(Z1, W0, Gt), st1.objective, rtol=1e-12)

# %% [markdown]
# `prune_layer` runs the loop for `iters` iterations (20 by default) and returns the last Z
# mapped back to original coordinates, $\hat W = Z D^{-1}$, which is exactly zero outside
# the mask. The objective is the same number in both coordinates (chapter 2), so the
# history's objective is the damped error of chapter 1 at the returned weights.

# %%
res = R.prune_layer(W, XtX, None, method="admm", mask=M, rho=rho, damp=lam, iters=20)
last = list(R.admm_iterates(W, XtX, None, mask=M, rho=rho, damp=lam, iters=20))[-1]
np.testing.assert_allclose(res.W, R.z_update(last.W, last.U, last.M) / norms, rtol=1e-12)
assert np.all(res.W[~M] == 0) and np.array_equal(res.mask, M)
G = XtX + lam * np.diag(np.diag(XtX))
np.testing.assert_allclose(res.history[-1].objective, R.objective(last.Z / norms, W, G), rtol=1e-9)
print("history of prune_layer (first 3):", *res.history[:3], sep="\n  ")

# %% [markdown]
# ## 3.3 Why the fixed point is the exact answer
#
# First, **U is zero on the mask at every iteration**: on a kept entry the Z-update
# copies $W + U$, so the U-update gives $U + W - (W + U) = 0$ there. Now suppose the
# iterates stop moving, W = Z. The W-update then says $(Z - \tilde W_0)\tilde G = -\rho U$.
# On the kept entries the right side is zero: the gradient of the objective vanishes on the
# support, which is exactly the optimality condition of chapter 1's per-row least squares.
# Off the mask, $-\rho U$ is the Lagrange multiplier of the constraint "this weight is
# zero". Check it after enough iterations:

# %%
K = 100 if FAST else 150
*_, st = R.admm_iterates(W, XtX, None, mask=M, rho=rho, damp=lam, iters=K)
grad = (st.Z - W0) @ Gt
scale = np.abs(W0 @ Gt).max()
print(f"after {K} iterations: max |U| on the mask {np.abs(st.U[M]).max():.1e}, "
      f"max |gradient + rho U| {np.abs(grad + rho * st.U).max():.1e}  (scale {scale:.1e})")
assert np.abs(st.U[M]).max() < 1e-8 * scale
assert np.abs(grad + rho * st.U).max() < 1e-8 * scale
exact = R.masked_lstsq(W, XtX, M, damp=lam)
np.testing.assert_allclose(st.Z / norms, exact, rtol=1e-6, atol=1e-8 * np.abs(exact).max())

# %% [markdown]
# ## 3.4 Convergence against the exact optimum
#
# The exact optimum's objective $f^\star$ comes from `masked_lstsq`. Every Z is feasible, so
# its objective can never be below $f^\star$ (asserted). The plot shows the relative gap
# $(f(Z_k) - f^\star)/f^\star$ for several ρ, and the two residuals for the default ρ = 1.
# ρ is in preconditioned units, where $\tilde G$ has diagonal 1.1: ρ = 1 puts the pull
# toward Z − U on the same scale as the curvature of the least squares.

# %%
f_star = R.objective(exact, W, G)
rhos = [0.1, 0.3, 1.0, 3.0, 10.0]
gaps, resid = {}, {}
for r in rhos:
    hist = list(R.admm_iterates(W, XtX, None, mask=M, rho=r, damp=lam, iters=K))
    gaps[r] = np.array([(h.objective - f_star) / f_star for h in hist])
    assert np.all(gaps[r] > -1e-9), "a feasible point cannot beat the optimum"
    if r == 1.0:
        resid = {"primal": [h.primal_residual for h in hist], "dual": [h.dual_residual for h in hist]}
print(f"{'rho':>5} {'gap at k=20':>12} {'gap at k=50':>12} {f'gap at k={K}':>12}")
for r in rhos:
    print(f"{r:>5g} {gaps[r][19]:>12.2e} {gaps[r][49]:>12.2e} {gaps[r][-1]:>12.2e}")
best = min(rhos, key=lambda r: gaps[r][19])
print(f"smallest gap after the default 20 iterations: rho = {best:g}")

fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.3))
k = np.arange(1, K + 1)
for r in rhos:
    a1.semilogy(k, np.maximum(gaps[r], 1e-16), label=f"ρ = {r:g}", lw=2 if r == 1.0 else 1)
a1.axvline(20, color="gray", ls=":", label="default T = 20")
a1.set(xlabel="iteration k", ylabel="(f(Z_k) − f*) / f*", title="objective gap (floored at 1e-16)")
a1.legend(fontsize=7)
a2.semilogy(k, resid["primal"], label="primal ‖W − Z‖")
a2.semilogy(k, resid["dual"], label="dual ρ‖Z − Z_prev‖")
a2.set(xlabel="iteration k", title="residuals, ρ = 1 (preconditioned units)")
a2.legend(fontsize=8)
fig.suptitle(f"ADMM on a fixed Wanda mask, layer {d_out}x{d_in}, s = {s}")
fig.tight_layout()
save(fig, "03_admm_convergence.png")

# %% [markdown]
# **What to remember.** On a fixed mask ADMM alternates a projection onto the mask (Z), a
# running sum of disagreements (U), and a least-squares solve with one cached
# factorization (W). Its fixed point satisfies the optimality conditions of the exact
# problem, so it converges to `masked_lstsq`'s answer; the table says how close the default
# 20 iterations get on this layer. Chapter 4 lets the mask move while it converges.
