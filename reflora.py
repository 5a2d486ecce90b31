"""
RefLoRA and RefLoRA-S: refactored low-rank adaptation, as one batched optimizer.

References:
1) Zhang, Li, Giannakis, "RefLoRA: Refactored Low-Rank Adaptation for Efficient Fine-Tuning of Large Models",
   NeurIPS 2025, arXiv 2505.18877 (Lemma 1, Theorems 3, 4, 6).
2) the authors' code, github.com/zhangyilang/RefLoRA, reflora/reflora.py (on top of PEFT): our updates equal theirs.
3) KellerJordan/Muon, muon.py: pure tensor functions first, then a thin torch.optim.Optimizer.

Notation (the paper's): W = W_pt + A Bᵀ, A: (m, r) output side, B: (n, r) input side. PEFT: lora_B = A, lora_A = Bᵀ.

Lemma 1: (AP, BP⁻ᵀ) gives the same W for any invertible P; the next update depends on P only through S = PPᵀ.
RefLoRA (Thm 3) picks S̃ = argmin_S tr(S AᵀA) + tr(S⁻¹ BᵀB), which balances ÃᵀÃ = B̃ᵀB̃; RefLoRA-S (Thm 4)
restricts S = s·I. Like the authors' code, RefLoRA is applied as gradient preconditioning before the base step
and RefLoRA-S as a rescaling of the factors (and Adam's moments) after it.

Degenerate factors (a zero factor, as with the default LoRA init A = 0; rank-deficient AᵀA or BᵀB; NaN/Inf) are
a defined case: a pair whose Gram matrices are numerically singular falls back to Thm 4's scalar S = s·I, and a
pair with a zero or non-finite factor is left as it is (S = I). So `warmup=0` is safe; no NaN, no exception.
"""
import contextlib
import math

import torch
from torch.optim.adamw import adamw

# -----------------------------------------------------------------------------
# Pure tensor functions (batched over leading dims; compiled once by the optimizer)


# Float64 Grams of float32/bf16 factors are nearly exact (their products are exact in float64), so the r×r work
# sees the factors' own conditioning; on the CPU float32 Grams stand in where they are well conditioned, and a
# CholeskyQR2 pass fixes the Gram's own eps·cond(A)² for tall, ill-conditioned A.
DT = torch.float64


def _scale(a2, b2, dtype, floor_a=0.0, floor_b=0.0):
    """Thm 4: s = ‖B‖_F / ‖A‖_F from a2 = ‖A‖², b2 = ‖B‖² (float64), and which pairs are usable.

    The one guard for every use of s: a pair with a zero, non-finite or denormal-sized factor (‖A‖² ≤ floor_a) is
    not usable (s = 1, left alone); s is clamped to [1/c, c], c = √(max of the factors' dtype), so s, √s and the
    factors and moments it multiplies stay finite (a clamped pair is balanced over a few refactorings instead).
    """
    usable = (a2 > floor_a) & (b2 > floor_b) & torch.isfinite(a2) & torch.isfinite(b2)
    c = torch.finfo(dtype).max ** 0.5
    s = (torch.where(usable, b2, 1.0) / torch.where(usable, a2, 1.0)).sqrt().clamp(1 / c, c)
    return torch.where(usable, s, 1.0), usable


def optimal_s(A, B):
    """Thm 4: s = ‖B‖_F / ‖A‖_F, batched over leading dims; 1 where a factor is zero or non-finite, and clamped to
    [1/c, c], c = √(max of the factors' dtype), as every use of s is (see _scale)."""
    norm2 = lambda X: torch.linalg.vector_norm(X.to(DT), dim=(-2, -1)).square()
    return _scale(norm2(A), norm2(B), A.dtype)[0]


def _refactor(Ga, Gb, dtype, floor_a=0.0, floor_b=0.0, La=None):
    """S̃ and S̃⁻¹ (..., r, r) from the float64 Grams Ga = AᵀA, Gb = BᵀB (..., r, r); dtype: the factors' dtype.

    S̃(cA, dB) = (d/c) S̃(A, B), so S̃ = s·S̃(A/‖A‖, B/‖B‖) with s = ‖B‖/‖A‖ (Thm 4's scalar) and ‖A‖² = tr(AᵀA):
    the r×r work sees unit-trace Grams whatever the scale of the factors. floor_a, floor_b: below these ‖A‖², ‖B‖²
    the Grams are sums of denormal products (float64 factors only; e.g. tiny·numel/1024). La: AᵀA's Cholesky
    factor where one is known more exactly than the Gram (see grams), else None.
    Returns S̃, S̃⁻¹ and (k,) masks exact (S̃ of Thm 3) and usable (else S = I: zero or non-finite factor); pairs
    usable but not exact (numerically rank-deficient Grams: Cholesky fails, a pivot or μ_min ≤ r·eps of the
    largest) get Thm 4's s·I. And s; τ (inf for the others): max of tr(G)·tr(G⁻¹) ≥ cond(G) over Ga and Gb,
    which bounds how much an error of δ·tr(G) in a Gram (rounding its products, δ ~ eps) can move S̃: by about
    δ·τ; and what balance_residual needs (the unit-trace Ga, Gb, K, Kit, M's eigenvalues).
    """
    r = Ga.shape[-1]
    eye = torch.eye(r, dtype=Ga.dtype, device=Ga.device)
    a2 = Ga.diagonal(dim1=-2, dim2=-1).sum(-1)  # ‖A‖²_F
    b2 = Gb.diagonal(dim1=-2, dim2=-1).sum(-1)
    s, usable = _scale(a2, b2, dtype, floor_a, floor_b)
    u = usable[..., None, None]
    Ga = torch.where(u, Ga / torch.where(usable, a2, 1.0)[..., None, None], eye)  # unit trace
    Gb = torch.where(u, Gb / torch.where(usable, b2, 1.0)[..., None, None], eye)
    # AᵀA = La Laᵀ (Cholesky; info > 0: not positive definite), then Laᵀ BᵀB La = W M Wᵀ, similar to
    # (AᵀA)^{1/2} BᵀB (AᵀA)^{1/2} (the same eigenvalues M)
    if La is None:
        La, info = torch.linalg.cholesky_ex(Ga)
    else:
        La = torch.where(u, La / torch.where(usable, a2, 1.0).sqrt()[..., None, None], eye)
        info = (~torch.isfinite(La).all(-1).all(-1) | (La.diagonal(dim1=-2, dim2=-1) <= 0).any(-1)).int()
    d = La.diagonal(dim1=-2, dim2=-1).square()  # pivots: each ≥ λ_min(AᵀA)
    La = torch.where(((info == 0) & usable)[..., None, None], La, eye)
    mu, W = torch.linalg.eigh(La.mT @ Gb @ La)
    # numerically singular AᵀA or BᵀB (eigh's error is ~ eps·μ_max): S̃ does not exist, fall back to S = s·I
    tol = r * torch.finfo(Ga.dtype).eps
    exact = (info == 0) & (d.amin(-1) > tol * d.amax(-1)) & (mu[..., 0] > tol * mu[..., -1]) & usable
    mu = torch.where(exact[..., None], mu, 1.0)
    # Thm 3: S̃ = La⁻ᵀ W M^{1/2} Wᵀ La⁻¹ (then S̃ AᵀA S̃ = BᵀB) and S̃⁻¹ = La W M^{-1/2} Wᵀ Laᵀ
    K = torch.linalg.solve_triangular(La.mT, W, upper=True)  # La⁻ᵀ W
    Kit = La @ W
    Kh, Kith = K * mu.sqrt().unsqueeze(-2), Kit * mu.rsqrt().unsqueeze(-2)  # La⁻ᵀ W M^{1/2}, La W M^{-1/2}
    S = torch.where(exact[..., None, None], Kh @ K.mT, eye)
    Sinv = torch.where(exact[..., None, None], Kith @ Kit.mT, eye)
    # τ from the same factors (unit-trace Grams): tr(Ga⁻¹) = ‖K‖²_F (Ga⁻¹ = K Kᵀ), tr(Gb⁻¹) = ‖Kith‖²_F
    tau = torch.maximum(torch.linalg.matrix_norm(K), torch.linalg.matrix_norm(Kith)).square()
    s_ = s[..., None, None]
    return s_ * S, Sinv / s_, exact, usable, s, torch.where(exact, tau, math.inf), Ga, Gb, K, Kit, mu


def balance_residual(exact, Ga, Gb, K, Kit, mu):
    """‖ÃᵀÃ - B̃ᵀB̃‖_F / ‖ÃᵀÃ‖_F of each pair refactored by Thm 3 (0 for the others), from what _refactor returns:
    Ã = A P, B̃ = B P⁻ᵀ for P = K M^{1/4}, P⁻ᵀ = Kit M^{-1/4} (PPᵀ = S̃; any such P gives the same norm as
    P = S̃^{1/2}: they differ by an orthogonal factor). Scale-free, so from the unit-trace Grams."""
    P, Pit = K * mu.pow(0.25).unsqueeze(-2), Kit * mu.pow(-0.25).unsqueeze(-2)
    GA, GB = P.mT @ Ga @ P, Pit.mT @ Gb @ Pit
    return torch.where(exact, torch.linalg.matrix_norm(GA - GB) / torch.linalg.matrix_norm(GA), 0.0)


def _stats(exact, usable, s, resid=None):
    """(4 + k,) float64 on the device: pairs refactored exactly, by the scalar fallback, left alone; the largest
    balance residual (resid None: NaN, not computed yet); then s per pair (NaN where left alone). No host sync:
    read by RefLoRA.stats()."""
    n = lambda m: m.sum(-1, keepdim=True).to(DT)
    # NaN itself, not the max of NaNs: inductor (CUDA, torch 2.11) unrolls a reduction over k ≤ 8 pairs and fails
    # on a maximum of constant NaNs
    top = torch.full_like(n(exact), math.nan) if resid is None else resid.amax(-1, keepdim=True)
    return torch.cat([n(exact), n(usable & ~exact), n(~usable), top, torch.where(usable, s, float("nan"))])


def _gram(X):
    X = X.to(DT)  # XᵀX in float64: the products of float32/bf16 numbers are exact
    return X.mT @ X


def _cholqr2(X, L1):
    """CholeskyQR2: X = Q R with R = L1ᵀ (L1: the Cholesky factor of the Gram), then QᵀQ = L2 L2ᵀ; returns L1 L2,
    a Cholesky factor of XᵀX without the Gram's eps·cond(X)² error (X float64; NaN where a Cholesky failed)."""
    Q = torch.linalg.solve_triangular(L1.mT, X.to(DT), upper=True, left=False)  # X L1⁻ᵀ
    L2, info = torch.linalg.cholesky_ex(Q.mT @ Q)
    return torch.where((info == 0)[..., None, None], L1 @ L2, float("nan"))


def _each(f, Xs, *others, stacked=False):
    """[f(X, *o) for X, *o in zip(Xs, *others)]. stacked: as one call of f per shape of X, on stacked copies (f
    batched over a leading dim): on CUDA each op is a kernel launch, so LLaMA-7B's 160 A factors (2 shapes) take
    2 launches per op, not 160."""
    if not stacked:
        return list(map(f, Xs, *others))
    groups = {}
    for i, X in enumerate(Xs):
        groups.setdefault(tuple(X.shape), []).append(i)
    out = [None] * len(Xs)
    for ix in groups.values():
        for i, y in zip(ix, f(*(torch.stack([L[i] for i in ix]) for L in (Xs, *others))).unbind(0)):
            out[i] = y
    return out


def grams(As, Bs, la=True, fast=False, stacked=False):
    """Ga = AᵀA, Gb = BᵀB (k, r, r) float64, and La (k, r, r) with La Laᵀ = AᵀA, for lists of factors.

    Float64 Grams, every La from one CholeskyQR2 pass (no data-dependent branch: for graphs and side streams).
    la=False: no La (row shards, whose Grams are summed first), None instead. fast: the Grams of float32/bf16
    factors from float32 products, no La: refactor_from's first pass on the CPU (kept where its check passes).
    stacked: one batched op per shape of factor (see _each), for graphs and CUDA; on the CPU the copies cost
    more than the calls they save (RESULTS.md).
    """
    Xs, k = [*As, *Bs], len(As)
    if fast and As[0].dtype != DT:
        G = torch.stack([X.float().mT @ X.float() for X in Xs]).to(DT)
        return G[:k], G[k:], None
    G = torch.stack(_each(_gram, As, stacked=stacked) + _each(_gram, Bs, stacked=stacked))
    Ga, Gb = G[:k], G[k:]
    if not la:
        return Ga, Gb, None
    La, info = torch.linalg.cholesky_ex(Ga)
    La = torch.where((info == 0)[..., None, None], La, float("nan"))
    return Ga, Gb, torch.stack(_each(_cholqr2, As, list(La.unbind(0)), stacked=stacked))


def optimal_S(A, B):
    """Thm 3: S̃ = (AᵀA)^{-1/2} [(AᵀA)^{1/2} BᵀB (AᵀA)^{1/2}]^{1/2} (AᵀA)^{-1/2}, r×r, batched over leading dims.

    Returns s·I for numerically rank-deficient pairs and I for pairs with a zero or non-finite factor; the scale
    s = ‖B‖/‖A‖ in it is clamped to √(max) of the factors' dtype (see _scale).
    """
    (m, r), (n, _), batch = A.shape[-2:], B.shape[-2:], A.shape[:-2]
    floor = torch.finfo(DT).tiny / 1024  # a mean square below this: denormal products
    Ga, Gb, La = grams(list(A.reshape(-1, m, r)), list(B.reshape(-1, n, r)))
    return _refactor(Ga, Gb, A.dtype, floor * m * r, floor * n * r, La)[0].reshape(*batch, r, r)


def balance(A, B, S=None):
    """Thm 3 refactoring (Ã, B̃) = (A S̃^{1/2}, B S̃^{-1/2}), which gives ÃᵀÃ = B̃ᵀB̃ (for tests and reading)."""
    S = optimal_S(A, B) if S is None else S
    lam, V = torch.linalg.eigh(S)
    root = (V * lam.sqrt().unsqueeze(-2)) @ V.mT      # S̃^{1/2}
    iroot = (V * lam.rsqrt().unsqueeze(-2)) @ V.mT    # S̃^{-1/2}
    return (A.to(S.dtype) @ root).to(A.dtype), (B.to(S.dtype) @ iroot).to(B.dtype)


def floors(As, Bs, device=None):
    """(2, k) float64: tiny/1024 · numel of each A and B, the ‖·‖² below which a factor counts as zero (its Gram
    would be a sum of denormal products; bites float64 factors only). Numel of the whole parameter (for a DTensor,
    all its shards): the optimizer builds this once per bucket."""
    tiny = torch.finfo(DT).tiny / 1024
    return torch.tensor([[tiny * X.numel() for X in As], [tiny * X.numel() for X in Bs]], dtype=DT, device=device)


def refactor_from(As, Bs, floor=None, reduce=None, select=False, stacked=False):
    """RefLoRA's weight-only part (Thm 3): S̃, S̃⁻¹ (k, r, r) float64 for pairs of one rank r, the bucket's
    statistics (see _stats; the residual left NaN) and `parts`, from which balance_residual(*parts) gives the
    residual when it is asked for (RefLoRA.stats, once per log line). floor: `floors(As, Bs)` (built here if
    None). reduce: for row shards of the factors (FSDP), a sum over the shards (the Grams are sums over rows; La
    then from the summed Gram).
    select (eager on the CPU, where reading a mask costs no device sync): float32 Grams first, and the float64
    path only for the pairs where they may not be exact (τ > 300·r, see _refactor, or not refactored by Thm 3).
    stacked (the other paths: graphs, CUDA): the Grams and CholeskyQR2 one batched op per shape (see grams)."""
    floor = floors(As, Bs, As[0].device) if floor is None else floor
    dt, r = As[0].dtype, As[0].shape[-1]
    if select and reduce is None and dt != DT:
        # one batched r×r computation for all pairs, whatever their m and n
        out = _refactor(*grams(As, Bs, fast=True)[:2], dt, floor[0], floor[1])
        exact, tau = out[2], out[5]
        redo = (~(exact & (tau <= 300 * r))).nonzero().flatten().tolist()
        if redo:  # in place: out's tensors take the float64 results of those pairs
            Ga, Gb, La = grams([As[i] for i in redo], [Bs[i] for i in redo])
            for x, y in zip(out, _refactor(Ga, Gb, dt, floor[0, redo], floor[1, redo], La)):
                x[redo] = y
    else:
        Ga, Gb, La = grams(As, Bs, la=reduce is None, stacked=stacked)  # (k, r, r)
        if reduce is not None:  # AᵀA = Σ_shards A_iᵀA_i: one collective for the whole bucket
            Ga, Gb = reduce(torch.cat([Ga, Gb])).split(len(As))
        out = _refactor(Ga, Gb, dt, floor[0], floor[1], La)
    S, Sinv, exact, usable, s, _, *parts = out
    return S, Sinv, _stats(exact, usable, s), (exact, *parts)


def precondition_grads(gAs, gBs, S, Sinv, stacked=False):
    """Thm 3: ∇A S̃⁻¹ and ∇B S̃ (see precondition), the products in float32 (float64 for float64 gradients).
    stacked: one batched product per shape of gradient (see _each; the results are views of its output)."""
    dt = torch.float64 if gAs[0].dtype == torch.float64 else torch.float32
    S, Sinv = S.to(dt), Sinv.to(dt)
    prod = lambda g, M: (g.to(dt) @ M).to(g.dtype)
    return (_each(prod, gAs, list(Sinv.unbind(0)), stacked=stacked),
            _each(prod, gBs, list(S.unbind(0)), stacked=stacked))


def precondition(As, Bs, gAs, gBs, floor=None, reduce=None, select=False, stacked=False):
    """RefLoRA as preconditioning: the new (∇A, ∇B) lists for pairs of one rank r (Thm 3).

    Refactoring (Ã, B̃) = (A S̃^{1/2}, B S̃^{-1/2}) gives ∇Ã = ∇A S̃^{-1/2} and ∇B̃ = ∇B S̃^{1/2} (∇A = G B, ∇B = Gᵀ A),
    and a gradient step on (Ã, B̃) gives the same W as a step on (A, B) with ∇A S̃⁻¹ and ∇B S̃:
    (A S̃^½ - η∇A S̃^-½)(B S̃^-½ - η∇B S̃^½)ᵀ = (A - η∇A S̃⁻¹)(B - η∇B S̃)ᵀ. So ∇A gets S̃⁻¹ and ∇B gets S̃.
    S̃ comes from the weights only (refactor_from; floor, reduce, select, stacked: see there), then the products
    with the gradients (precondition_grads). Also returns the bucket's statistics (see _stats).
    """
    S, Sinv, st, parts = refactor_from(As, Bs, floor, reduce, select, stacked)
    st[3] = balance_residual(*parts).amax()
    return (*precondition_grads(gAs, gBs, S, Sinv, stacked), st)


def rescale(As, Bs, moments, floor=None, reduce=None):
    """RefLoRA-S after the base step (Thm 4): Ã = √s A, B̃ = B/√s, so ‖Ã‖_F = ‖B̃‖_F, in place.

    Adam's moments follow the gradients into the new coordinates: ∇Ã = ∇A/√s and ∇B̃ = √s ∇B, so the first
    moments scale like the gradients and the second moments like their squares. `moments` is
    (mA, vA, mB, vB) lists, or None for plain gradient descent. floor: `floors(As, Bs)` (built here if None).
    reduce: a sum over row shards (FSDP), or None. Returns the bucket's statistics (see _stats; every usable
    pair counts as exact).
    """
    floor = floors(As, Bs, As[0].device) if floor is None else floor
    a2, b2 = torch.stack(torch._foreach_norm([*As, *Bs], 2, dtype=DT)).square().split(len(As))
    if reduce is not None:  # ‖A‖²_F = Σ_shards ‖A_i‖²_F
        a2, b2 = reduce(torch.stack([a2, b2])).unbind(0)
    # Thm 4: s = ‖B‖_F / ‖A‖_F (clamped; 1, a no-op, where a factor is zero or non-finite)
    dt = As[0].dtype
    s, usable = _scale(a2, b2, dt, floor[0], floor[1])
    up, down = s.sqrt().to(dt).unbind(0), s.rsqrt().to(dt).unbind(0)
    torch._foreach_mul_(As, up)
    torch._foreach_mul_(Bs, down)
    if moments is not None:
        mA, vA, mB, vB = moments
        sq_up, sq_down = s.to(dt).unbind(0), s.reciprocal().to(dt).unbind(0)
        torch._foreach_mul_(mA, down)
        torch._foreach_mul_(vA, sq_down)
        torch._foreach_mul_(mB, up)
        torch._foreach_mul_(vB, sq_up)
    # balance residual | ‖Ã‖² - ‖B̃‖² | / ‖Ã‖² of the rescaled pairs (s·a2 = ‖Ã‖², b2/s = ‖B̃‖²)
    resid = torch.where(usable, (s * a2 - b2 / s).abs() / (s * a2), 0.0)
    return _stats(usable, usable, s, resid)


def adamw_folded(params, grads, exp_avgs, exp_avg_sqs, steps, cm, cv, *, lr, beta1, beta2, eps, weight_decay):
    """One torch.optim.AdamW step, op for op its multi-tensor path (cm = cv = 1: the same numbers), on moments held
    up to per-tensor factors: the true moments are cm·m and cv·v. This is how RefLoRA-S's rescaling of the moments
    (rescale: 1/√s and 1/s for A's, √s and s for B's) reaches them on the CPU, folded into the step's own passes
    instead of four more passes over the moments. cm, cv: lists of floats. Returns the new cm (cv is then 1).
    """
    torch._foreach_add_(steps, torch.tensor(1.0), alpha=1.0)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    # m ← β1 (cm m) + (1 - β1) g = K lerp(m, g, (1 - β1)/K) with K = 1 + β1 (cm - 1); v ← β2 (cv v) + (1 - β2) g²
    far = [i for i, c in enumerate(cm) if not 0.5 <= c <= 2]  # applied first, so that no m drifts off its range
    if far:
        torch._foreach_mul_([exp_avgs[i] for i in far], [cm[i] for i in far])
        cm = [c if 0.5 <= c <= 2 else 1.0 for c in cm]
    K = [1 + beta1 * (c - 1) for c in cm]
    torch._foreach_lerp_(exp_avgs, grads, [(1 - beta1) / k for k in K])
    torch._foreach_mul_(exp_avg_sqs, [beta2 * c for c in cv])
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    t = [s.item() for s in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [(1 - beta2 ** n) ** 0.5 for n in t])
    torch._foreach_add_(denom, eps)
    # p ← p - lr / (1 - β1ᵗ) · K m / (√(v / (1 - β2ᵗ)) + ε)
    torch._foreach_addcdiv_(params, exp_avgs, denom, [(lr / (1 - beta1 ** n)) * -1 * k for n, k in zip(t, K)])
    return K


def step_norm(old, new, reduce=None):
    """The step each pair took in W, without forming any m×n matrix: (‖A'B'ᵀ − ABᵀ‖_F, ‖A'B'ᵀ‖_F), (k,) float64.

    old, new: pairs before and after the step, as RefLoRA(pairs) takes them ((A, B), or (A, Bᵀ, True)).
    ‖XYᵀ‖²_F = tr((XᵀX)(YᵀY)) for any split of the step; with X = [A' − A, A], Y = [B', B' − B] (XYᵀ =
    A'B'ᵀ − ABᵀ) a small step is not the difference of two large numbers. Grams in float64 (see DT).
    reduce: a sum over row shards (FSDP), or None.
    """
    view = lambda p: (p[0], p[1].mT if len(p) > 2 and p[2] else p[1])
    G = []  # XᵀX, YᵀY of each pair, (2r, 2r)
    for (A, B), (A1, B1) in zip(map(view, old), map(view, new)):
        A, B, A1, B1 = A.to(DT), B.to(DT), A1.to(DT), B1.to(DT)
        X, Y = torch.cat([A1 - A, A], dim=-1), torch.cat([B1, B1 - B], dim=-1)  # (m, 2r), (n, 2r)
        G += [X.mT @ X, Y.mT @ Y]
    if reduce is not None:  # the Grams are sums over rows: one collective for all pairs
        flat = reduce(torch.cat([g.flatten() for g in G])).split([g.numel() for g in G])
        G = [f.view(g.shape) for f, g in zip(flat, G)]
    dw2, w2 = [], []
    for Gx, Gy in zip(G[0::2], G[1::2]):
        r = Gx.shape[-1] // 2
        Ga1 = Gx[:r, :r] + Gx[:r, r:] + Gx[r:, :r] + Gx[r:, r:]  # A'ᵀA', A' = (A' − A) + A
        # ‖ΔW‖²_F = tr(XᵀX YᵀY) = Σ (XᵀX)∘(YᵀY) (both symmetric); ‖A'B'ᵀ‖²_F = tr(A'ᵀA' B'ᵀB')
        dw2.append((Gx * Gy).sum())
        w2.append((Ga1 * Gy[:r, :r]).sum())
    dw2, w2 = torch.stack(dw2), torch.stack(w2)
    return dw2.clamp(min=0).sqrt(), w2.clamp(min=0).sqrt()


# -----------------------------------------------------------------------------
# The optimizer: base AdamW (torch's own functional, so "lora" is exactly torch.optim.AdamW; RefLoRA-S on the CPU:
# adamw_folded) or plain GD, with RefLoRA's preconditioning before the base step or RefLoRA-S's rescaling after it.

METHODS, BASES = ("lora", "reflora", "reflora-s"), ("adamw", "sgd")


def local(t):
    """The local shard of a DTensor (FSDP2 parameters, gradients and Adam moments: row shards), else t itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _shard_sum(t):
    """-> the sum over the shards of t's mesh, as a function (funcol: traceable by torch.compile), or None."""
    if not hasattr(t, "device_mesh"):
        return None
    from torch.distributed._functional_collectives import all_reduce
    group = t.device_mesh.get_group()
    return lambda x: all_reduce(x, "sum", group)


@contextlib.contextmanager
def _threads(n):
    """torch's CPU threads set to n inside (None: unchanged). RefLoRA-S's per-factor norms and scalings are too
    small to share between threads: one thread runs them faster than intra-op threading."""
    old = torch.get_num_threads()
    torch.set_num_threads(n or old)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _mat(x, t=False):
    """x as the matrix it stands for, a view (no copy): conv factors (r, in, kh, kw) -> (r, in·kh·kw), (out, r, 1, 1)
    -> (out, r); `.mT` of it for a B stored transposed (t)."""
    x = x if x.dim() == 2 else x.view(x.shape[0], -1)
    return x.mT if t else x


def _pair(x):
    """(A, B[, t]) -> (A, B, t), checked: A (m, r[, 1, 1]), B (n, r) or, with t, Bᵀ (r, n[, kh, kw])."""
    A, B, t = x[0], x[1], bool(x[2]) if len(x) > 2 else False
    if not (A.dim() >= 2 and math.prod(A.shape[2:]) == 1 and (B.dim() >= 2 if t else B.dim() == 2)
            and A.shape[1] == B.shape[0 if t else 1] and all(p.dim() == 2 or p.is_contiguous() for p in (A, B))):
        raise ValueError(f"RefLoRA: a pair must be A (m, r), B (n, r) (or Bᵀ (r, n) flagged True; conv: contiguous "
                         f"A (m, r, 1, 1), Bᵀ (r, in, kh, kw)), got {tuple(A.shape)}, {tuple(B.shape)}")
    return A, B, t


def find_pairs(module):
    """The trainable LoRA pairs of a module tree, in the form RefLoRA(pairs, ...) takes.

    This project's LoRALinear (A (out, r), B (in, r)) gives (A, B). PEFT's layers give (A, Bᵀ, True) per adapter:
    Linear and Conv1D (lora_B[k].weight (out, r) = A, lora_A[k].weight (r, in) = Bᵀ), Embedding (lora_embedding_B[k]
    (dim, r) = A, lora_embedding_A[k] (r, num_embeddings) = Bᵀ), Conv (lora_B[k].weight (out, r, 1, 1) and
    lora_A[k].weight (r, in, kh, kw): the unfolded pair). They are stepped through views (`.mT`, and _mat for conv)
    of the parameter, its gradient and its moments. A pair with a frozen factor is left out (its trainable half
    is a plain parameter: see create_reflora_optimizer). LoRA factors that make no such pair (a missing half,
    grouped conv, PEFT's per-expert blocks, a factor shared by two pairs, AdaLoRA) raise one ValueError naming all.
    """
    pairs, bad, seen = [], [], set()
    for name, mod in module.named_modules():
        A, B = getattr(mod, "A", None), getattr(mod, "B", None)  # LoRALinear
        if isinstance(A, torch.nn.Parameter) and isinstance(B, torch.nn.Parameter) and A.dim() == B.dim() == 2 \
                and A.shape[1] == B.shape[1] and A.requires_grad and B.requires_grad:
            pairs.append((A, B, False))
        for a, b, kind in (("lora_A", "lora_B", torch.nn.ModuleDict),
                           ("lora_embedding_A", "lora_embedding_B", torch.nn.ParameterDict)):
            dA, dB = getattr(mod, a, None), getattr(mod, b, None)
            if not (isinstance(dA, kind) and isinstance(dB, kind)):
                if any(p.requires_grad for d in (dA, dB) if isinstance(d, torch.nn.Module) for p in d.parameters()):
                    bad.append(f"{name}.{a} ({type(dA).__name__})")  # e.g. AdaLoRA's ParameterDicts
                continue
            get = (lambda d, k: d[k]) if kind is torch.nn.ParameterDict else lambda d, k: getattr(d[k], "weight", None)
            for k in dict.fromkeys([*dA, *dB]):
                A, Bt = (get(d, k) if k in d else None for d in (dB, dA))
                if not any(p is not None and p.requires_grad for p in (A, Bt)):
                    continue  # a frozen adapter
                try:
                    ok = getattr(mod, "num_experts", 1) == 1 and not {id(A), id(Bt)} & seen and _pair((A, Bt, True))
                except (AttributeError, ValueError):
                    ok = False
                if not ok:
                    bad.append(f"{name}.{a}.{k} " + "/".join(str(tuple(p.shape)) if p is not None else "missing"
                                                              for p in (Bt, A)))
                elif A.requires_grad and Bt.requires_grad:
                    pairs.append((A, Bt, True))
                seen |= {id(A), id(Bt)}
    if bad:
        raise ValueError("find_pairs: LoRA factors that make no pair A (m, r), Bᵀ (r, n) (unpaired, grouped, "
                         "per-expert, shared, or not PEFT's Linear/Embedding/Conv layout): " + "; ".join(bad))
    return pairs


def create_reflora_optimizer(model, method="reflora", lr=1e-3, weight_decay=0.0, **kwargs):
    """RefLoRA over a whole model, in the shape of PEFT's create_loraplus_optimizer: the LoRA pairs of find_pairs
    refactored; every other trainable parameter (DoRA magnitudes, LoRA biases, heads, modules_to_save, the
    trainable half of a half-frozen pair) stepped by the base rule, 1-D ones (biases, norms, magnitudes) without
    weight decay. kwargs: RefLoRA's (base, betas, eps, warmup, interval, compile, ahead)."""
    pairs = find_pairs(model)
    paired = {id(p) for A, B, _ in pairs for p in (A, B)}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in paired]
    groups = [{"params": [p for p in others if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in others if p.dim() < 2], "weight_decay": 0.0}]
    opt = RefLoRA(pairs, [g for g in groups if g["params"]], method=method, lr=lr, weight_decay=weight_decay, **kwargs)
    stepped = {id(p) for g in opt.param_groups for p in g["params"]}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in stepped]
    assert not missing, f"create_reflora_optimizer: trainable parameters left out: {', '.join(missing)}"
    return opt


class RefLoRA(torch.optim.Optimizer):
    """RefLoRA / RefLoRA-S on top of AdamW or gradient descent.

    pairs: iterable of LoRA (A, B) parameters, A (m, r), B (n, r), or (A, Bᵀ, True) with B stored transposed
    (PEFT's lora_A; stepped through views, no copies): see find_pairs. params: other trainable parameters (a
    head), stepped by the base rule only: tensors or param-group dicts (which may stand in `pairs` too). lora:
    pairs to take out of those groups, each keeping its group's options: Trainer's call, `RefLoRA(groups,
    lora=find_pairs(model), **kwargs)`. For a whole model: create_reflora_optimizer(model).
    Refactoring starts after `warmup` steps and happens every `interval` steps, with the authors' schedule:
    RefLoRA preconditions steps warmup+1, warmup+1+interval, ...; RefLoRA-S rescales after steps warmup,
    warmup+interval, ... (warmup=0: also before the first base step, in the first step(); neither the constructor
    nor load_state_dict touches the weights, and load_state_dict refuses another method, base, warmup, interval).

    ahead (RefLoRA; default on CUDA): S̃ depends on the weights only, so right after step t, with t+1 due, step
    t+1's S̃, S̃⁻¹ are computed from the new weights (CUDA: on a side stream, beside the next forward and backward;
    the main stream waits only before the gradient products), with ahead=False's results. They are used only if no
    factor changed since (data_ptr and `_version`, which in-place writes bump: copy_ under no_grad as in
    Module.load_state_dict, mul_), else computed at the step. Unnoticed (torch 2.13): writes through `.data`
    (p.data.mul_(3)) and by the fused AdamW kernel (checked on the CPU), which leave `_version` as it is. Not under
    FSDP2 (DTensor factors: the Grams' sum is a collective, kept in step order). Not in state_dict().

    RefLoRA-S with AdamW, eager on the CPU: the moments' rescaling is folded into the next step (adamw_folded), so
    state[p] holds exp_avg and exp_avg_sq up to the floats exp_avg_factor and exp_avg_sq_factor (saved with it, so
    a resume is bitwise; applied on any other path). moments(p): the moments as torch.optim.AdamW holds them.

    stats(): what the last refactoring did, as Python floats (the only host sync; {} before the first one):
    exact / fallback / alone = pairs refactored by Thm 3's S̃, by the scalar s·I (rank-deficient Grams), left
    as they are (a zero or non-finite factor); residual = the largest ‖ÃᵀÃ - B̃ᵀB̃‖_F / ‖ÃᵀÃ‖_F over exact pairs
    (RefLoRA-S: | ‖Ã‖² - ‖B̃‖² | / ‖Ã‖²); s_median, s_min, s_max = Thm 4's s = ‖B‖/‖A‖ over refactored pairs.
    """

    def __init__(self, pairs, params=(), *, lora=(), method="reflora", base="adamw", lr=1e-3, betas=(0.9, 0.999),
                 eps=1e-8, weight_decay=0.0, warmup=0, interval=1, compile=None, ahead=None):
        if method not in METHODS:
            raise ValueError(f"RefLoRA: method must be one of {METHODS}, got {method!r}")
        if base not in BASES:
            raise ValueError(f"RefLoRA: base must be one of {BASES}, got {base!r}")
        if warmup < 0 or interval < 1:
            raise ValueError(f"RefLoRA: need warmup >= 0 and interval >= 1, got {warmup}, {interval}")
        items = [*pairs, *params]
        given, lora = [_pair(x) for x in items if isinstance(x, (tuple, list))], [_pair(x) for x in lora]
        if method != "lora" and not given + lora:
            raise ValueError(f"RefLoRA: method={method!r} but no LoRA pairs given (pass lora=find_pairs(model) "
                             "beside the parameter groups, or use create_reflora_optimizer(model))")
        tensors = [x for x in items if isinstance(x, torch.Tensor)]
        others = [{**g, "params": list(g["params"])} for g in items if isinstance(g, dict)]
        others += [{"params": tensors}] if tensors else []
        # the `lora` pairs out of those groups, into LoRA groups with the options of the group holding their A
        home, by_home = {id(p): i for i, g in enumerate(others) for p in g["params"]}, {}
        for A, B, t in lora:
            by_home.setdefault(home.get(id(A)), []).append((A, B, t))
        taken = {id(p) for A, B, _ in lora for p in (A, B)}
        lora_groups = ([(None, given)] if given else []) + list(by_home.items())
        groups = [{**({} if i is None else others[i]), "params": [p for A, B, _ in ps for p in (A, B)], "lora": True,
                   "transposed": [t for *_, t in ps]} for i, ps in lora_groups]
        groups += [{**g, "params": [p for p in g["params"] if id(p) not in taken], "lora": False} for g in others]
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(groups, defaults)
        self.method, self.base, self.warmup, self.interval = method, base, warmup, interval
        self.steps = 0  # optimizer steps taken (saved in state_dict)
        on_cuda = any(p.is_cuda for g in self.param_groups for p in g["params"])
        self.compile, self.ahead = on_cuda if compile is None else compile, on_cuda if ahead is None else ahead
        # one graph per bucket (rank, dtype, device) and function; fullgraph: a graph break or a recompile past
        # dynamo's limit raises instead of running eager unnoticed
        fn = lambda f: torch.compile(f, fullgraph=True) if self.compile else f
        self._refactor_from, self._precondition_grads, self._rescale = map(fn, (refactor_from, precondition_grads,
                                                                                rescale))
        self._floors = {}  # per bucket: floors(As, Bs) on the device
        self._last = []  # per bucket: the last refactoring's (4 + k,) statistics (on the device), and its parts
        # (RefLoRA: for balance_residual, computed in stats()) or None
        self._ahead, self._side = {}, {}  # per bucket's _stamp: S̃, S̃⁻¹, statistics, event; per device: a stream

    # the refactoring schedule, from the number of steps taken (see the class docstring)
    def _due(self, t):
        return t >= self.warmup and (t - self.warmup) % self.interval == 0

    def _buckets(self, need_grads):
        """LoRA pairs bucketed by (rank, dtype, device): [(params, view)] per bucket, one batched (compiled) call
        each; view(t) turns a tensor shaped like the parameter (itself, its gradient, a moment) into the (n, r)
        layout (`.mT` for a transposed B)."""
        buckets = {}
        for g in self.param_groups:
            if not g["lora"]:
                continue
            # (a state_dict from before the layout flag has no "transposed": all False)
            flags = g.get("transposed") or [False] * (len(g["params"]) // 2)
            for A, B, t in zip(g["params"][0::2], g["params"][1::2], flags):
                if A.requires_grad and B.requires_grad and not (need_grads and (A.grad is None or B.grad is None)):
                    buckets.setdefault((A.shape[1], A.dtype, A.device), []).append((A, B, t))
        return list(buckets.values())

    def _floor(self, pairs):
        """floors(As, Bs) on the device, built once per bucket (numel of the whole parameter: no collective)."""
        key = tuple(id(p) for A, B, _ in pairs for p in (A, B))
        if key not in self._floors:
            self._floors[key] = floors([A for A, _, _ in pairs], [B for _, B, _ in pairs], local(pairs[0][0]).device)
        return self._floors[key]

    def _cpu(self, pairs):  # eager on the CPU: float32 Grams where exact (refactor_from's select), else stacked
        return not self.compile and pairs[0][0].device.type == "cpu"

    def _folds(self, p):
        """RefLoRA-S's moment rescaling folded into the next AdamW step (adamw_folded): eager, on the CPU, with
        plain tensors (CUDA keeps torch's fused kernel, FSDP2 its DTensors)."""
        return (self.method == "reflora-s" and self.base == "adamw" and not self.compile and p.device.type == "cpu"
                and not hasattr(p, "to_local"))

    def _flush(self, params):
        """Before torch's AdamW or the moments' rescale: the factors a folded path left (a state saved on the CPU,
        loaded on CUDA) applied, so that the moments are torch.optim.AdamW's again."""
        for p in params:
            st = self.state.get(p, {})
            for k in ("exp_avg", "exp_avg_sq"):
                if k + "_factor" in st:
                    st[k].mul_(st.pop(k + "_factor"))

    @staticmethod
    def _views(pairs, f=lambda p: p):
        """[f(A)], [f(B)] for a bucket (f: the parameter, its gradient, a moment) as (m, r), (n, r) matrices: views."""
        return [_mat(local(f(A))) for A, _, _ in pairs], [_mat(local(f(B)), t) for _, B, t in pairs]

    def _S(self, pairs, stream=None):
        """refactor_from on a bucket's factors (FSDP2: this rank's rows, with the Grams summed over the ranks)
        -> S̃, S̃⁻¹, statistics; on `stream` (CUDA), after the work queued so far on the current one."""
        floor, (As, Bs) = self._floor(pairs), self._views(pairs)
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(stream.device))  # the weights as the base step left them
        with torch.cuda.stream(stream):
            cpu = self._cpu(pairs)
            return self._refactor_from(As, Bs, floor, _shard_sum(pairs[0][0]), select=cpu, stacked=not cpu)

    @staticmethod
    def _stamp(pairs):
        # each factor's identity, storage and version counter (which in-place writes bump)
        return tuple((id(p), local(p).data_ptr(), local(p)._version) for A, B, _ in pairs for p in (A, B))

    @torch.no_grad()
    def _refactor_ahead(self):
        """After step t, with step t+1 due: its S̃, S̃⁻¹ from the new weights (CUDA: on a side stream)."""
        self._ahead = {}
        for pairs in self._buckets(need_grads=True):  # this step's pairs: most likely the next one's
            dev, ps = pairs[0][0].device, [p for A, B, _ in pairs for p in (A, B)]
            if hasattr(ps[0], "device_mesh"):
                continue  # FSDP2 (DTensor factors): the Grams' sum is a collective, kept in step order
            if dev.type != "cuda":
                self._ahead[self._stamp(pairs)] = (*self._S(pairs), None)
                continue
            main, side = torch.cuda.current_stream(dev), self._side.get(dev) or torch.cuda.Stream(dev)
            self._side[dev] = side
            out = self._S(pairs, side)
            for t, stream in [(p, side) for p in ps] + [(t, main) for t in (*out[:3], *out[3])]:  # for the allocator
                t.record_stream(stream)  # the weights are read on `side`, the results on `main`
            self._ahead[self._stamp(pairs)] = (*out, side.record_event())

    @torch.no_grad()
    def _refactor_before_step(self):
        self._last, ahead, self._ahead = [], self._ahead, {}
        for pairs in self._buckets(need_grads=True):
            # S̃ from _refactor_ahead if no factor changed since (the same _stamp), else now
            S, Sinv, st, parts, done = (ahead and ahead.pop(self._stamp(pairs), None)) or (*self._S(pairs), None)
            if done is not None:
                torch.cuda.current_stream(pairs[0][0].device).wait_event(done)
            gAs, gBs = self._views(pairs, lambda p: p.grad)
            gAs, gBs = self._precondition_grads(gAs, gBs, S, Sinv, stacked=not self._cpu(pairs))
            self._last.append((st, parts))
            for (A, B, t), gA, gB in zip(pairs, gAs, gBs):
                for p, g in ((A, gA), (B, gB.mT if t else gB)):
                    g = g.reshape(local(p.grad).shape)  # a conv factor's shape
                    if hasattr(p.grad, "to_local"):
                        p.grad.to_local().copy_(g)  # a DTensor gradient keeps its sharding
                    elif g.stride() != p.grad.stride():
                        # PEFT's Bᵀ: back from a transposed view into autograd's layout, which torch's fused AdamW
                        # needs (on CUDA it refuses other strides; its CPU kernel reads the storage in order)
                        p.grad.copy_(g)
                    else:
                        p.grad = g

    @torch.no_grad()
    def _refactor_after_step(self):
        self._last = []
        for pairs in self._buckets(need_grads=False):
            moments, fold, ps = None, self._folds(pairs[0][0]), [p for A, B, _ in pairs for p in (A, B)]
            if self.base == "adamw":
                # every pair passes its moments (zeros before its first step: scaling them is harmless), so
                # one graph per bucket
                for p in (p for p in ps if p not in self.state):
                    self.state[p] = self._init_state(p)
            if self.base == "adamw" and not fold:
                self._flush(ps)
                moment = lambda k: self._views(pairs, lambda p: self.state[p][k])
                (mA, mB), (vA, vB) = moment("exp_avg"), moment("exp_avg_sq")
                moments = (mA, vA, mB, vB)
            As, Bs = self._views(pairs)
            # FSDP2: in place on this rank's rows, norms summed over the ranks
            with _threads(1 if self._cpu(pairs) else None):
                st = self._rescale(As, Bs, moments, self._floor(pairs), _shard_sum(pairs[0][0]))
                self._last.append((st, None))
            if self.base == "adamw" and fold:  # the moments follow the gradients (∇Ã = ∇A/√s, ∇B̃ = √s ∇B)
                for (A, B, _), s in zip(pairs, st[4:].nan_to_num(1.0).tolist()):
                    for p, f in ((A, s ** -0.5), (B, s ** 0.5)):
                        st_p = self.state[p]
                        st_p["exp_avg_factor"] = st_p.get("exp_avg_factor", 1.0) * f
                        st_p["exp_avg_sq_factor"] = st_p.get("exp_avg_sq_factor", 1.0) * f * f

    def _init_state(self, p):
        # torch.optim.AdamW's state layout (step on the parameter's device for the fused kernel)
        step = torch.zeros((), dtype=torch.float32, device=p.device if self._fused(p) else "cpu")
        return dict(step=step, exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                    exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))

    def moments(self, p):
        """p's AdamW moments (exp_avg, exp_avg_sq) as torch.optim.AdamW would hold them: RefLoRA-S on the CPU keeps
        factors beside them (exp_avg_factor, exp_avg_sq_factor, see adamw_folded), applied here (new tensors)."""
        st = self.state[p]
        return tuple(st[k] * st.get(k + "_factor", 1.0) for k in ("exp_avg", "exp_avg_sq"))

    @staticmethod
    def _fused(p):
        return p.is_cuda and not hasattr(p, "to_local")

    def stats(self):
        """The last refactoring's counts, residual and s (see the class docstring): one host sync, {} if none."""
        if not self._last:
            return {}
        st = [(t if parts is None else torch.cat([t[:3], balance_residual(*parts).amax()[None], t[4:]])).cpu()
              for t, parts in self._last]
        exact, fallback, alone, resid = torch.stack([t[:4] for t in st]).T
        s = torch.cat([t[4:] for t in st])
        s = s[~s.isnan()]
        out = dict(exact=exact.sum().item(), fallback=fallback.sum().item(), alone=alone.sum().item(),
                   residual=resid.max().item())
        if len(s):
            out.update(s_median=s.median().item(), s_min=s.min().item(), s_max=s.max().item())
        return out

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.method == "reflora-s" and self.steps == 0 and self._due(0):
            # the authors' initial balance (their constructor's), here so that a restored optimizer never moves
            # the weights; the gradients, taken at (A, B), follow the factors. Thm 4: ∇Ã = ∇A/√s, ∇B̃ = √s ∇B
            self._refactor_after_step()
            for pairs, (st, _) in zip(self._buckets(need_grads=False), self._last):
                for (A, B, _), s in zip(pairs, st[4:].nan_to_num(1.0)):  # s per pair (_stats; NaN: s = 1)
                    for p, f in ((A, s.rsqrt()), (B, s.sqrt())):
                        if p.grad is not None:
                            local(p.grad).mul_(f.to(p.grad.dtype))
        # RefLoRA (Thm 3): precondition ∇A by S̃⁻¹ and ∇B by S̃, then take the base step
        if self.method == "reflora" and self._due(self.steps):
            self._refactor_before_step()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            if not params:
                continue
            if self.base == "sgd":
                # plain gradient descent: p ← p - lr (∇p + wd p)
                if group["weight_decay"]:
                    grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                torch._foreach_add_(params, grads, alpha=-group["lr"])
                continue
            for p in params:
                if p not in self.state:
                    self.state[p] = self._init_state(p)
            st = [self.state[p] for p in params]
            beta1, beta2 = group["betas"]
            if group["lora"] and all(map(self._folds, params)):
                cm = adamw_folded(params, grads, [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st],
                                  [s["step"] for s in st], [s.get("exp_avg_factor", 1.0) for s in st],
                                  [s.get("exp_avg_sq_factor", 1.0) for s in st], lr=group["lr"], beta1=beta1,
                                  beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
                for s, c in zip(st, cm):
                    s["exp_avg_factor"], s["exp_avg_sq_factor"] = c, 1.0
                continue
            self._flush(params)
            # exactly torch.optim.AdamW's update (the base the authors' code runs under): its fused kernel for
            # CUDA parameters, its foreach kernel otherwise
            fused = all(self._fused(p) for p in params)
            adamw(
                params, grads, [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st], [],
                [s["step"] for s in st], foreach=not fused, fused=fused or None, amsgrad=False, beta1=beta1,
                beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
        self.steps += 1
        if self.method == "reflora" and self.ahead and self._due(self.steps):
            self._refactor_ahead()  # the next step's S̃ from the weights just stepped
        # RefLoRA-S (Thm 4): rescale A by √s and B by 1/√s (and Adam's moments) after the base step
        if self.method == "reflora-s" and self._due(self.steps):
            self._refactor_after_step()
        return loss

    def state_dict(self):
        sd = super().state_dict()
        sd["reflora"] = dict(steps=self.steps, method=self.method, base=self.base, warmup=self.warmup,
                             interval=self.interval)
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        meta = state_dict.pop("reflora", None)
        if meta is None:
            raise ValueError("RefLoRA.load_state_dict: no 'reflora' entry (not a RefLoRA state_dict)")
        for k in ("method", "base", "warmup", "interval"):
            if k in meta and meta[k] != getattr(self, k):
                raise ValueError(f"RefLoRA.load_state_dict: the state was saved with {k}={meta[k]!r}, this "
                                 f"optimizer has {k}={getattr(self, k)!r}")
        super().load_state_dict(state_dict)
        self.steps, self._ahead = meta["steps"], {}
        # torch moves `step` to the parameter's device only in fused or capturable groups: put it where step()'s
        # kernel reads it (fused: on the device; foreach: on the CPU), as _init_state does
        for p, st in self.state.items():
            if "step" in st:
                st["step"] = st["step"].to(p.device if self._fused(p) else "cpu")
