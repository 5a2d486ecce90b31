"""The paper's statements, checked numerically through reflora.py (float64 where exactness is claimed)."""
import io
import math

import pytest
import torch
from torch.optim.adamw import adamw

import reflora
from reflora import RefLoRA, optimal_S, optimal_s

F64 = torch.float64


def rand_pair(m=12, n=9, r=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g, dtype=dtype), torch.randn(n, r, generator=g, dtype=dtype)


def rand_P(r, seed=1, cond=4.0):
    """A random invertible r×r matrix with condition number `cond`."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=F64))
    return (U * torch.logspace(0, math.log10(cond), r, dtype=F64)) @ V.T


def rand_spd(r, g):
    X = torch.randn(r, r, generator=g, dtype=F64)
    return X @ X.T + 0.1 * torch.eye(r, dtype=F64)


def rel(x, y):
    return ((x - y).norm() / y.norm()).item()

# -----------------------------------------------------------------------------
# Lemma 1, Theorems 3 and 4: the refactoring itself


def test_lemma1_equivalent_factors_give_the_same_W_and_S_transforms_covariantly():
    A, B = rand_pair()
    P = rand_P(3)
    AP, BP = A @ P, B @ torch.linalg.inv(P).T
    assert rel(AP @ BP.T, A @ B.T) < 1e-13
    # S̃(AP, BP⁻ᵀ) = P⁻¹ S̃(A, B) P⁻ᵀ: the refactored pair (and so the update) does not depend on P
    Pi = torch.linalg.inv(P)
    assert rel(optimal_S(AP, BP), Pi @ optimal_S(A, B) @ Pi.T) < 1e-10


def test_theorem3_balances_and_minimizes():
    A, B = rand_pair(m=20, n=15, r=4)
    S = optimal_S(A, B)
    # S̃ is symmetric positive definite and solves the Riccati equation S̃ AᵀA S̃ = BᵀB
    assert torch.allclose(S, S.T, atol=1e-12) and torch.linalg.eigvalsh(S).min() > 0
    assert rel(S @ A.T @ A @ S, B.T @ B) < 1e-10
    At, Bt = reflora.balance(A, B)
    assert rel(At.T @ At, Bt.T @ Bt) < 1e-10  # ÃᵀÃ = B̃ᵀB̃
    assert rel(At @ Bt.T, A @ B.T) < 1e-12  # same W
    # the objective ‖A S^{1/2}‖² + ‖B S^{-1/2}‖² = tr(S AᵀA) + tr(S⁻¹ BᵀB) is lowest at S̃
    f = lambda S: (torch.trace(S @ A.T @ A) + torch.trace(torch.linalg.inv(S) @ B.T @ B)).item()
    g = torch.Generator().manual_seed(3)
    best = f(S)
    for _ in range(200):
        assert f(rand_spd(4, g)) > best
        sym = (lambda X: X + X.T)(torch.randn(4, 4, generator=g, dtype=F64))
        assert f(S + 1e-3 * sym) > best  # a local minimum too
    # batched over leading dims: the same as one at a time
    pairs = [rand_pair(seed=i) for i in range(5)]
    As, Bs = torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
    assert torch.allclose(optimal_S(As, Bs), torch.stack([optimal_S(a, b) for a, b in zip(As, Bs)]), atol=1e-12)


def test_theorem4_scalar_balances_and_minimizes():
    A, B = rand_pair()
    B = 7 * B
    s = optimal_s(A, B)
    assert abs(s.item() - (B.norm() / A.norm()).item()) < 1e-12
    At, Bt = s.sqrt() * A, B / s.sqrt()
    assert abs(At.norm() - Bt.norm()) < 1e-12
    f = lambda c: c * A.norm() ** 2 + B.norm() ** 2 / c  # tr(S AᵀA) + tr(S⁻¹BᵀB) at S = c·I
    for c in torch.logspace(-3, 3, 601, dtype=F64):
        assert f(c) >= f(s) - 1e-12
    # the optimizer's RefLoRA-S balances the norms of each pair in place
    A, B = torch.nn.Parameter(A.clone()), torch.nn.Parameter(B.clone())
    A0 = A.detach().clone()
    opt = RefLoRA([(A, B)], method="reflora-s", base="sgd", interval=1000)  # warmup=0: balanced at the first step
    assert torch.equal(A, A0)  # not by the constructor
    opt.step()  # (no gradients: the base step moves nothing)
    assert abs(A.norm() - B.norm()) < 1e-12

# -----------------------------------------------------------------------------
# Theorem 6 through the optimizer: with gradient descent, equivalent factorizations give the same ΔW


def sgd_trajectory(A, B, method, steps=5, lr=0.02, seed=0):
    """W after `steps` GD steps on L = ½‖X W - Y‖² + ¼‖W‖⁴ (not a quadratic in W), through RefLoRA."""
    g = torch.Generator().manual_seed(seed)
    X, Y = torch.randn(30, A.shape[0], generator=g, dtype=F64), torch.randn(30, B.shape[0], generator=g, dtype=F64)
    A, B = torch.nn.Parameter(A.clone()), torch.nn.Parameter(B.clone())
    opt = RefLoRA([(A, B)], method=method, base="sgd", lr=lr)
    W0 = (A @ B.T).detach()
    for _ in range(steps):
        W = A @ B.T
        loss = 0.5 * (X @ W - Y).square().sum() / 30 + 0.25 * W.square().sum() ** 2 / 1e4
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (A @ B.T).detach() - W0


@pytest.mark.parametrize("steps", [1, 5])
def test_theorem6_reflora_update_is_invariant_to_the_factorization(steps):
    A, B = rand_pair(m=12, n=9, r=3)
    P = rand_P(3, cond=5.0)
    AP, BP = A @ P, B @ torch.linalg.inv(P).T
    dW, dWP = sgd_trajectory(A, B, "reflora", steps), sgd_trajectory(AP, BP, "reflora", steps)
    assert rel(dWP, dW) < 1e-10
    # the same test with plain LoRA shows a clear difference: this test can fail
    dW, dWP = sgd_trajectory(A, B, "lora", steps), sgd_trajectory(AP, BP, "lora", steps)
    assert rel(dWP, dW) > 1e-2


def test_theorem6_reflora_s_is_invariant_to_scaling():
    A, B = rand_pair()
    for c in (1e-3, 0.2, 30.0):
        assert rel(sgd_trajectory(c * A, B / c, "reflora-s"), sgd_trajectory(A, B, "reflora-s")) < 1e-10
    # plain LoRA depends on the scale (at c = 1e-3 it diverges): this test can fail
    assert rel(sgd_trajectory(0.5 * A, B / 0.5, "lora"), sgd_trajectory(A, B, "lora")) > 1e-2


def test_preconditioning_equals_refactor_then_step():
    """For GD, ∇A S̃⁻¹, ∇B S̃ on (A, B) gives the W of a plain step on (A S̃^{1/2}, B S̃^{-1/2}) (docstring claim)."""
    A, B = rand_pair()
    G = torch.randn(12, 9, generator=torch.Generator().manual_seed(5), dtype=F64)  # ∂L/∂W
    At, Bt = reflora.balance(A, B)
    lr = 0.1
    W_refactored = (At - lr * G @ Bt) @ (Bt - lr * G.T @ At).T
    gA, gB, _ = reflora.precondition([A], [B], [G @ B], [G.T @ A])
    W_precond = (A - lr * gA[0]) @ (B - lr * gB[0]).T
    assert rel(W_precond, W_refactored) < 1e-12

# -----------------------------------------------------------------------------
# the same updates as the authors' code (PEFT layout, hooks on torch.optim.AdamW)


class AuthorsRefactorer:
    """The authors' Refactorer (zhangyilang/RefLoRA, reflora/reflora.py) re-derived from its description, on
    PEFT-layout tensors: lora_A = Bᵀ (r, n), lora_B = A (m, r); hooks on a stock torch.optim.AdamW; a skip counter
    that starts at `warmup`; RefLoRA as a pre-step gradient preconditioner, RefLoRA-S as a post-step rescale with
    one initial call. Written independently of reflora.py (S from BᵀB's eigendecomposition, not AᵀA's)."""

    def __init__(self, pairs, opt, warmup, interval, scalar):
        self.pairs, self.opt, self.interval, self.scalar, self.skip = pairs, opt, interval, scalar, warmup
        if scalar:
            opt.register_step_post_hook(lambda *a: self.tick(self.rescale))
            self.tick(self.rescale)
        else:
            opt.register_step_pre_hook(lambda *a: self.tick(self.precondition))

    def tick(self, fn):
        if self.skip > 0:
            self.skip -= 1
            return
        self.skip = self.interval - 1
        with torch.no_grad():
            for lA, lB in self.pairs:
                fn(lA, lB)

    def precondition(self, lA, lB):
        lam, V = torch.linalg.eigh(lA @ lA.T)  # BᵀB
        rt = (V * lam.sqrt()) @ V.T  # (BᵀB)^{1/2}
        irt = (V * lam.rsqrt()) @ V.T
        mu, U = torch.linalg.eigh(rt @ lB.T @ lB @ rt)  # (BᵀB)^{1/2} AᵀA (BᵀB)^{1/2}
        Sinv = irt @ (U * mu.sqrt()) @ U.T @ irt  # the geometric mean of (BᵀB)⁻¹ and AᵀA is S̃⁻¹
        S = torch.linalg.inv(Sinv)
        lA.grad = S @ lA.grad  # (∇B S̃)ᵀ
        lB.grad = lB.grad @ Sinv  # ∇A S̃⁻¹

    def rescale(self, lA, lB):
        S = lB.norm() / lA.norm()  # ‖A‖ / ‖B‖ = 1/s
        P = S.sqrt()
        lA.mul_(P), lB.mul_(1 / P)
        if self.opt.state:
            st = self.opt.state
            st[lA]["exp_avg"].mul_(1 / P), st[lA]["exp_avg_sq"].mul_(1 / S)
            st[lB]["exp_avg"].mul_(P), st[lB]["exp_avg_sq"].mul_(S)


@pytest.mark.parametrize("method,warmup,interval", [("reflora", 0, 1), ("reflora", 3, 2), ("reflora-s", 0, 1),
                                                    ("reflora-s", 4, 3)])
def test_same_updates_as_the_authors_code(method, warmup, interval):
    g = torch.Generator().manual_seed(0)
    shapes = [(10, 8), (10, 8), (14, 8)]  # (m, n)
    ours = [tuple(torch.nn.Parameter(torch.randn(s, 3, generator=g, dtype=F64)) for s in sh) for sh in shapes]
    theirs = [(torch.nn.Parameter(B.detach().T.clone()), torch.nn.Parameter(A.detach().clone())) for A, B in ours]
    plain = [tuple(torch.nn.Parameter(p.detach().clone()) for p in ab) for ab in ours]
    Xs = [torch.randn(6, n, generator=g, dtype=F64) for _, n in shapes]
    Ys = [torch.randn(6, m, generator=g, dtype=F64) for m, _ in shapes]
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    opt = RefLoRA(ours, method=method, warmup=warmup, interval=interval, **kw)
    ref_opt = torch.optim.AdamW([p for pair in theirs for p in pair], **kw)
    AuthorsRefactorer(theirs, ref_opt, warmup, interval, scalar=method == "reflora-s")
    plain_opt = torch.optim.AdamW([p for pair in plain for p in pair], **kw)
    ours_W, theirs_W = (lambda a, b: a @ b.T), (lambda lA, lB: lB @ lA)
    for _ in range(25):
        for o, pairs, W in ((opt, ours, ours_W), (ref_opt, theirs, theirs_W), (plain_opt, plain, ours_W)):
            loss = sum(torch.sin(X @ W(*p).T - Y).square().sum() for p, X, Y in zip(pairs, Xs, Ys))
            o.zero_grad()
            loss.backward()
            o.step()
    for (A, B), (lA, lB) in zip(ours, theirs):
        assert rel(A, lB) < 1e-9 and rel(B, lA.T) < 1e-9
    # and the refactoring did change the trajectory (against plain AdamW from the same start): this can fail
    for (A, B), (pA, pB) in zip(ours, plain):
        assert rel(A @ B.T, pA @ pB.T) > 1e-3

# -----------------------------------------------------------------------------
# the optimizer as a torch.optim.Optimizer


def train(opt_fn, pairs, head, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(16, pairs[0][1].shape[0], generator=g, dtype=head.dtype)
    opt = opt_fn()
    for _ in range(steps):
        h = X
        for A, B in pairs:
            h = torch.tanh(h @ B @ A.T)
        loss = (h @ head).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def make_model(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    pairs = [tuple(torch.nn.Parameter(torch.randn(8, 3, generator=g, dtype=dtype)) for _ in range(2))
             for _ in range(3)]
    return pairs, torch.nn.Parameter(torch.randn(8, 2, generator=g, dtype=dtype))


@pytest.mark.parametrize("method", ["lora", "reflora", "reflora-s"])
def test_state_dict_round_trip_resumes_bitwise(method):
    kw = dict(method=method, lr=1e-2, warmup=2, interval=2, weight_decay=0.1)
    pairs, head = make_model()
    train(lambda: RefLoRA(pairs, [head], **kw), pairs, head, 10)
    straight = [p.detach().clone() for ab in pairs for p in ab] + [head.detach().clone()]

    pairs, head = make_model()
    opt = train(lambda: RefLoRA(pairs, [head], **kw), pairs, head, 5)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for ab in pairs for p in ab] + [head.detach()]}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    pairs, head = make_model(seed=1)  # different values, overwritten from the checkpoint
    with torch.no_grad():
        for p, v in zip([p for ab in pairs for p in ab] + [head], ck["params"]):
            p.copy_(v)

    def resumed():
        o = RefLoRA(pairs, [head], **kw)
        o.load_state_dict(ck["opt"])
        return o
    train(resumed, pairs, head, 5)
    for a, b in zip([p for ab in pairs for p in ab] + [head], straight):
        assert torch.equal(a, b)


def test_lora_method_is_torch_adamw_and_head_params_use_the_base_rule():
    pairs, head = make_model()
    train(lambda: RefLoRA(pairs, [head], method="lora", lr=1e-2, weight_decay=0.1), pairs, head, 6)
    ref_pairs, ref_head = make_model()
    params = [p for ab in ref_pairs for p in ab] + [ref_head]
    train(lambda: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1), ref_pairs, ref_head, 6)
    for a, b in zip([p for ab in pairs for p in ab] + [head], params):
        assert torch.equal(a, b)


def test_lr_scheduler_drives_the_lr():
    pairs, head = make_model()
    opt = RefLoRA(pairs, [head], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** t)
    for _ in range(3):
        opt.step()
        sched.step()
    assert all(g["lr"] == 0.125 for g in opt.param_groups)


def test_adam_moments_follow_reflora_s_rescaling():
    """After the first rescale (after step 3), state = an un-rescaled twin's, moved into the new coordinates."""
    pairs, head = make_model()
    opt = train(lambda: RefLoRA(pairs, method="reflora-s", lr=1e-2, warmup=3), pairs, head, 3)
    twin, thead = make_model()
    topt = train(lambda: RefLoRA(twin, method="reflora-s", lr=1e-2, warmup=1000), twin, thead, 3)
    for (A, B), (tA, tB) in zip(pairs, twin):
        s = tB.norm() / tA.norm()  # Thm 4, on the twin's factors
        assert rel(A, s.sqrt() * tA) < 1e-12 and rel(B, tB / s.sqrt()) < 1e-12
        assert abs(A.norm() - B.norm()) < 1e-12
        # ∇Ã = ∇A/√s and ∇B̃ = √s ∇B: first moments scale like the gradients, second like their squares
        for p, tp, f in ((A, tA, 1 / s.sqrt()), (B, tB, s.sqrt())):
            (m, v), (tm, tv) = opt.moments(p), topt.moments(tp)
            assert rel(m, f * tm) < 1e-12 and rel(v, f ** 2 * tv) < 1e-12


def test_adamw_folded_is_torch_adamw_on_the_true_moments():
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=g) for s in ((7, 3), (5, 3), (4,))]
    mine, ref = [p.clone() for p in ps], [torch.nn.Parameter(p.clone()) for p in ps]
    ms, vs, steps = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps], [torch.zeros(()) for _ in ps]
    topt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, foreach=True)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in ps]
        cm = reflora.adamw_folded(mine, grads, ms, vs, steps, [1.0] * 3, [1.0] * 3, lr=1e-2, beta1=0.8, beta2=0.99,
                                  eps=1e-6, weight_decay=0.1)
        assert cm == [1.0] * 3
        for p, gr in zip(ref, grads):
            p.grad = gr
        topt.step()
    for p, q, m, v in zip(mine, ref, ms, vs):
        st = topt.state[q]
        assert torch.equal(p, q) and torch.equal(m, st["exp_avg"]) and torch.equal(v, st["exp_avg_sq"])
    # factors far from 1 (a long run of large s): the step is torch's on the true moments cm·m, cv·v, and the factors
    # it returns stay near 1 (within β1's reach of [1/2, 2]), so the stored moments keep torch's own range
    cm, cv = [1e-6, 3.0, 1e6], [1e-3, 2.0, 1e3]
    tm, tv = [c * m for c, m in zip(cm, ms)], [c * v for c, v in zip(cv, vs)]
    grads = [torch.randn(p.shape, generator=g) for p in ps]
    cm = reflora.adamw_folded(mine, grads, ms, vs, steps, cm, cv, lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6,
                              weight_decay=0.1)
    with torch.no_grad():
        adamw(ref, grads, tm, tv, [], [torch.zeros(()) + 5 for _ in ps], foreach=True, amsgrad=False, beta1=0.8,
              beta2=0.99, lr=1e-2, weight_decay=0.1, eps=1e-6, maximize=False)
    assert all(0.6 <= c <= 1.8 for c in cm)
    for p, q, c, m, v, m1, v1 in zip(mine, ref, cm, ms, vs, tm, tv):
        assert rel(p, q) < 1e-6 and rel(c * m, m1) < 1e-6 and rel(v, v1) < 1e-6


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_reflora_s_folded_moments_match_the_rescaled_moments(dtype):
    """RefLoRA-S on the CPU folds the moments' rescaling into the next AdamW step (adamw_folded); the reference path
    (torch's AdamW, then rescale of weights and moments: CUDA's) gives the same run. Unbalanced factors (s ~ 1e4)
    take the factors far from 1 at the first balance; a state saved on the folded path resumes on the other."""
    def make():
        pairs, head = make_model(dtype=dtype)
        with torch.no_grad():
            for A, B in pairs:
                A.mul_(1e-2), B.mul_(1e2)
        return pairs, head
    kw = dict(method="reflora-s", lr=1e-2, warmup=0, weight_decay=0.1)
    reference = lambda o: setattr(o, "_folds", lambda p: False) or o
    pairs, head = make()
    opt = train(lambda: RefLoRA(pairs, **kw), pairs, head, 6)
    assert any(opt.state[A]["exp_avg_factor"] != 1.0 for A, _ in pairs)
    twin, thead = make()
    topt = train(lambda: reference(RefLoRA(twin, **kw)), twin, thead, 6)
    assert all("exp_avg_factor" not in s for s in topt.state.values())
    tol = 1e-13 if dtype == F64 else 1e-5
    for (A, B), (tA, tB) in zip(pairs, twin):
        for p, tp in ((A, tA), (B, tB)):
            assert rel(p, tp) < tol
            for m, tm in zip(opt.moments(p), topt.moments(tp)):
                assert rel(m, tm) < tol
    # the folded state, resumed on the reference path (its factors applied first), then 3 more steps of both
    sd = opt.state_dict()
    resumed = lambda: (o := reference(RefLoRA(pairs, **kw))).load_state_dict(sd) or o
    train(resumed, pairs, head, 3, seed=1)
    train(lambda: reference(topt), twin, thead, 3, seed=1)
    for (A, B), (tA, tB) in zip(pairs, twin):
        assert rel(A, tA) < tol and rel(B, tB) < tol


def test_schedule_matches_warmup_and_interval():
    """reflora preconditions steps warmup+1, warmup+1+k, ...; reflora-s rescales after steps warmup, warmup+k, ..."""
    for method, warmup, interval in (("reflora", 3, 2), ("reflora-s", 3, 2), ("reflora-s", 0, 3)):
        A, B = (torch.nn.Parameter(t) for t in rand_pair())
        opt = RefLoRA([(A, B)], method=method, base="sgd", lr=0.0, warmup=warmup, interval=interval)
        calls = []
        name = "_refactor_before_step" if method == "reflora" else "_refactor_after_step"
        orig = getattr(opt, name)
        setattr(opt, name, lambda: (calls.append(opt.steps), orig()))
        for _ in range(10):
            A.grad, B.grad = torch.ones_like(A), torch.ones_like(B)
            opt.step()
        if method == "reflora":  # counted before the step: steps taken so far
            assert calls == [t for t in range(10) if t >= warmup and (t - warmup) % interval == 0]
        else:  # counted after the step (and with warmup=0 the initial balance, at the first step, before it)
            assert calls == [t for t in range(11) if t >= warmup and (t - warmup) % interval == 0]


def ahead_run(ahead, dtype=F64, steps=6, warmup=0, interval=1, edit=None, at=3, device="cpu"):
    """RefLoRA (AdamW) on make_model: per step the raw and the preconditioned gradients and the weights after it,
    and the number of S̃ computations; edit(params) under no_grad before step `at`."""
    pairs, head = make_model(dtype=dtype)
    to = lambda p: torch.nn.Parameter(p.detach().to(device))  # noqa: E731
    pairs, head = [tuple(map(to, ab)) for ab in pairs], to(head)
    ps = [p for ab in pairs for p in ab]
    opt = RefLoRA(pairs, [head], lr=1e-2, warmup=warmup, interval=interval, ahead=ahead, compile=False)
    calls, orig = [], opt._refactor_from
    opt._refactor_from = lambda *a, **k: (calls.append(opt.steps), orig(*a, **k))[1]
    X = torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)
    out = []
    for t in range(steps):
        if edit is not None and t == at:
            with torch.no_grad():
                edit(ps + [head])
        h = X
        for A, B in pairs:
            h = torch.tanh(h @ B @ A.T)
        opt.zero_grad()
        (h @ head).square().mean().backward()
        raw = [p.grad.clone() for p in ps]
        opt.step()
        out.append((raw, [p.grad.clone() for p in ps], [p.detach().clone() for p in ps + [head]]))
    return out, len(calls), opt


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA"))])
def test_ahead_equals_computing_at_the_step_bitwise(device):
    """ahead=True (S̃ of step t+1 computed right after step t; CUDA: on a side stream) gives bitwise the weights and
    preconditioned gradients of ahead=False, float32 and float64, with and without warmup and interval; each due
    step's S̃ is computed once, ahead of it (step 0 has no step before it), and the state_dict is the same."""
    for dtype in (torch.float32, F64):
        for warmup, interval in ((0, 1), (1, 2)):
            (now, n_now, o_now), (ahead, n_ahead, o_ahead) = (ahead_run(a, dtype, 7, warmup, interval, device=device)
                                                              for a in (False, True))
            for x, y in zip(now, ahead):
                assert all(torch.equal(a, b) for a, b in zip(x[1] + x[2], y[1] + y[2]))
            due = [t >= warmup and (t - warmup) % interval == 0 for t in range(8)]
            assert n_now == sum(due[:7]) and n_ahead == due[0] + sum(due[1:])
            sd_now, sd_ahead = o_now.state_dict(), o_ahead.state_dict()
            assert sd_now["param_groups"] == sd_ahead["param_groups"] and sd_now["reflora"] == sd_ahead["reflora"]
            torch.testing.assert_close(sd_now["state"], sd_ahead["state"], rtol=0, atol=0)


def stale_edits():
    """Changes of the weights between steps: a manual in-place edit, Module.load_state_dict (copy_: other weights),
    and a new tensor assigned to .data (the same version counter, another storage)."""
    other = [p.detach() for ab in make_model(seed=1)[0] for p in ab] + [make_model(seed=1)[1].detach()]
    return {"A.mul_(3)": lambda ps: ps[0].mul_(3),
            "load_state_dict": lambda ps: torch.nn.ParameterList(ps).load_state_dict(
                {str(i): v for i, v in enumerate(other)}),
            "A.data = 3 A": lambda ps: setattr(ps[0], "data", 3 * ps[0].data)}


@pytest.mark.parametrize("edit", stale_edits())
def test_ahead_notices_weights_changed_between_steps(edit):
    """A weight changed in place after step t (under no_grad) makes the S̃ computed ahead from step t's weights
    stale: step t+1 recomputes it, and equals ahead=False bitwise; the stale S̃ would have given other gradients."""
    (now, _, _), (ahead, _, _) = (ahead_run(a, edit=stale_edits()[edit], at=3) for a in (False, True))
    for x, y in zip(now, ahead):
        assert all(torch.equal(a, b) for a, b in zip(x[1] + x[2], y[1] + y[2]))
    raw, got, w = ahead[3][0], ahead[3][1], ahead[2][2]  # step 3's gradients, the weights it was computed ahead from
    stale = reflora.precondition(w[0:6:2], w[1:6:2], raw[0::2], raw[1::2], select=True)[:2]
    assert not torch.allclose(stale[0][0], got[0], rtol=1e-3)


def test_bad_arguments_raise():
    A, B = (torch.nn.Parameter(t) for t in rand_pair())
    for kw in (dict(method="refl0ra"), dict(base="adam"), dict(interval=0), dict(warmup=-1)):
        with pytest.raises(ValueError):
            RefLoRA([(A, B)], **kw)
    with pytest.raises(ValueError):
        RefLoRA([(A, torch.nn.Parameter(torch.randn(9, 4, dtype=F64)))])

# -----------------------------------------------------------------------------
# degenerate factors: defined, never NaN/Inf, never an exception


def degenerate_pairs():
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)
    rank1 = lambda m: (rnd(m, 1) @ rnd(1, 4))
    zeros = lambda *s: torch.zeros(*s, dtype=F64)
    return [(zeros(12, 4), rnd(9, 4)),  # the default LoRA init: A = 0
            (rnd(12, 4), zeros(9, 4)),
            (zeros(12, 4), zeros(9, 4)),
            (rank1(12), rnd(9, 4)), (rank1(12), rank1(9)),
            (1e-20 * rnd(12, 4), rnd(9, 4)), (1e-20 * rnd(12, 4), 1e-20 * rnd(9, 4)),
            (1e-30 * rnd(12, 4), 30 * rnd(9, 4)),
            (rnd(12, 4), rnd(9, 4))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["reflora", "reflora-s"])
def test_degenerate_factors_never_give_nan(dtype, method):
    pairs = degenerate_pairs()
    params = [tuple(torch.nn.Parameter(t.to(dtype, copy=True)) for t in ab) for ab in pairs]
    # (torch's own AdamW turns fp16 parameters into NaN by itself: eps = 1e-8 underflows; so GD there)
    opt = RefLoRA(params, method=method, base="sgd" if dtype == torch.float16 else "adamw", lr=1e-2, warmup=0)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        for A, B in params:
            G = torch.randn(A.shape[0], B.shape[0], generator=g, dtype=F64).to(dtype)
            A.grad, B.grad = G @ B.detach(), G.T @ A.detach()
        opt.step()
        for p in (p for ab in params for p in ab):
            assert torch.isfinite(p).all()
            for v in opt.state[p].values():  # (RefLoRA-S on the CPU: also the moments' float factors)
                assert torch.isfinite(torch.as_tensor(v)).all()
    # optimal_S itself: finite, and s·I for a rank-deficient pair
    for A, B in pairs:
        assert torch.isfinite(optimal_S(A.to(dtype), B.to(dtype))).all()
    A, B = pairs[3]
    S = optimal_S(A, B)
    assert torch.allclose(S, optimal_s(A, B) * torch.eye(4, dtype=F64))


def test_zero_factor_is_left_alone_and_then_refactored():
    """With A = 0 (default init) the first step is plain AdamW; once A ≠ 0, refactoring kicks in."""
    A = torch.nn.Parameter(torch.zeros(12, 3, dtype=F64))
    B = torch.nn.Parameter(rand_pair()[1])
    B0 = B.detach().clone()
    opt = RefLoRA([(A, B)], method="reflora-s", lr=1e-2)
    assert torch.equal(B, B0)  # the initial balance left the pair alone
    G = torch.randn(12, 9, generator=torch.Generator().manual_seed(2), dtype=F64)
    A.grad, B.grad = G @ B.detach(), G.T @ A.detach()
    opt.step()
    assert abs(A.norm() - B.norm()) < 1e-12 and A.norm() > 0

# -----------------------------------------------------------------------------
# compiled == eager (the toy problem: tests/test_toy.py)


def test_compiled_equals_eager_with_one_graph_per_bucket():
    """3 buckets (r = 2, 3, 4), both methods: each compiled function (reflora: refactor_from, precondition_grads,
    the first also ahead of the step; reflora-s: rescale, which always gets the moments) traces at most one graph
    per bucket, and the compiled updates equal the eager ones."""
    pytest.importorskip("torch._inductor")
    from torch._dynamo.utils import counters

    def model(dtype=torch.float32):
        g = torch.Generator().manual_seed(0)
        # the r = 3 bucket holds two shapes of A: the compiled path's stacked products keep the pairs' order
        return [(torch.nn.Parameter(torch.randn(m, r, generator=g, dtype=dtype)),
                 torch.nn.Parameter(torch.randn(6, r, generator=g, dtype=dtype)))
                for m, r in ((6, 2), (7, 3), (6, 4), (5, 3), (7, 3))]

    def run(pairs, method, compile):
        opt = RefLoRA(pairs, method=method, lr=1e-2, compile=compile, ahead=compile)
        X = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            loss = sum(torch.tanh(X @ B @ A.T).square().sum() for A, B in pairs)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return opt
    for method in ("reflora", "reflora-s"):
        eager, comp = model(), model()
        run(eager, method, False)
        torch._dynamo.reset()
        counters.clear()
        opt = run(comp, method, True)
        assert 1 <= counters["stats"]["unique_graphs"] <= 3 * (2 if method == "reflora" else 1)  # 3 buckets
        assert opt.stats()["exact"] == 5
        for a, b in zip((p for ab in comp for p in ab), (p for ab in eager for p in ab)):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# S̃ for low-precision, ill-conditioned factors: exact wherever it exists (against a float64 closed form)


def conditioned(m, r, cond, seed, dtype):
    """A = U diag(σ) Vᵀ with σ from 1 down to 1/cond (log-spaced), rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=F64))
    return ((U * torch.logspace(0, -math.log10(cond), r, dtype=F64)) @ V.T).to(dtype)


def closed_form_S(A, B):
    """Float64 S̃ without Grams: A = Qa Ra, B = Qb Rb (Householder), Rb Raᵀ = U Σ Wᵀ, S̃ = Ra⁻¹ W Σ Wᵀ Ra⁻ᵀ."""
    Ra, Rb = torch.linalg.qr(A.to(F64), mode="r")[1], torch.linalg.qr(B.to(F64), mode="r")[1]
    _, sig, Wt = torch.linalg.svd(Rb @ Ra.T)
    K = torch.linalg.solve_triangular(Ra, Wt.T * sig.sqrt(), upper=True)
    return K @ K.T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r,cond_a,cond_b", [(32, 600, 1.5), (32, 100, 100), (4, 2000, 1),  # today's reports
                                             (4, 1e3, 1e3), (32, 1e3, 1e3), (64, 1e4, 100), (64, 100, 1e4),
                                             (4, 1e6, 1), (32, 1e6, 1), (4, 1, 1e6)])  # cond(A)·cond(B) = 1e6
def test_S_is_exact_for_ill_conditioned_low_precision_factors(dtype, r, cond_a, cond_b, m=300):
    A, B = conditioned(m, r, cond_a, 1, dtype), 5 * conditioned(400, r, cond_b, 2, dtype)
    ref = closed_form_S(A, B)
    assert rel(optimal_S(A, B), ref) < 1e-4
    # and through the optimizer's own paths (select: the CPU's float32 Grams where well conditioned): the
    # preconditioned gradients equal ∇A S̃⁻¹, ∇B S̃, and S̃ itself is exact
    gA, gB = torch.ones(m, r, dtype=dtype), torch.ones(400, r, dtype=dtype)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4  # the result is rounded to the gradients' dtype
    for kw in (dict(), dict(select=True), dict(stacked=True)):
        pA, pB, _ = reflora.precondition([A], [B], [gA], [gB], **kw)
        assert rel(pB[0].to(F64), gB.to(F64) @ ref) < tol
        assert rel(reflora.refactor_from([A], [B], **kw)[0][0], ref) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_S_is_exact_for_a_tall_factor_of_cond_1e6(dtype):
    """A 576×4 with cond(A) = 1e6 (README's corner) and 1e7: the float64 Gram's own eps·cond(A)² error is removed
    by CholeskyQR2. Without that pass the check fails at 1e7; at 1e6 the Gram alone passes or fails by the machine's
    float64 matmul kernel (RESULTS.md), so 1e6 cannot be the negative control."""
    test_S_is_exact_for_ill_conditioned_low_precision_factors(dtype, 4, 1e6, 1, m=576)
    if dtype == torch.bfloat16:
        return  # rounded to bf16, A is no longer that ill-conditioned
    for seed in (1, 2, 3):
        A, B = conditioned(576, 4, 1e7, seed, dtype), 5 * conditioned(400, 4, 1, seed + 10, dtype)
        ref = closed_form_S(A, B)
        for kw in (dict(), dict(select=True), dict(stacked=True)):
            assert rel(reflora.refactor_from([A], [B], **kw)[0][0], ref) < 1e-4
        Ga, Gb, _ = reflora.grams([A], [B], la=False)
        assert rel(reflora._refactor(Ga, Gb, dtype)[0][0], ref) > 1e-4  # the Gram alone: not exact


def test_stacked_paths_keep_each_pair_and_its_place():
    """stacked=True (graphs, CUDA: one batched op per shape) on a bucket whose shapes alternate, with B as the
    transposed views the optimizer passes: the Grams and La against float64 references per factor, S̃ against the
    closed form, the preconditioned gradients against float64 products, each in its pair's place."""
    g = torch.Generator().manual_seed(0)
    ms, ns = (40, 24, 40, 56, 24, 40), (30, 30, 56, 30, 56, 30)
    As = [torch.randn(m, 4, generator=g) for m in ms]
    Bs = [torch.randn(4, n, generator=g).mT for n in ns]  # Bᵀ stored, as PEFT's lora_A
    gAs, gBs = [torch.randn_like(A) for A in As], [torch.randn(n, 4, generator=g) for n in ns]
    Ga, Gb, La = reflora.grams(As, Bs, stacked=True)
    for i, (A, B) in enumerate(zip(As, Bs)):
        assert rel(Ga[i], A.to(F64).T @ A.to(F64)) < 1e-15 and rel(Gb[i], B.to(F64).T @ B.to(F64)) < 1e-15
        assert rel(La[i] @ La[i].T, Ga[i]) < 1e-14 and torch.equal(La[i], La[i].tril())
    pA, pB, _ = reflora.precondition(As, Bs, gAs, gBs, stacked=True)
    for A, B, gA, gB, qA, qB in zip(As, Bs, gAs, gBs, pA, pB):
        ref = closed_form_S(A, B)
        assert rel(qA.to(F64), gA.to(F64) @ torch.linalg.inv(ref)) < 1e-5
        assert rel(qB.to(F64), gB.to(F64) @ ref) < 1e-5


def test_select_keeps_float32_grams_only_where_they_are_exact():
    """refactor_from(select=True), the CPU's path: the float32 Grams' S̃ is kept for a well-conditioned pair, and
    a pair whose float32 Grams would miss the 1e-4 bar (cond(A) = cond(B) = 300) is recomputed from float64 ones."""
    As = [conditioned(300, 8, c, 1 + i, torch.float32) for i, c in enumerate((2, 300))]
    Bs = [conditioned(400, 8, c, 3 + i, torch.float32) for i, c in enumerate((2, 300))]
    fast = reflora._refactor(*reflora.grams(As, Bs, fast=True)[:2], torch.float32)[0]
    S = reflora.refactor_from(As, Bs, select=True)[0]
    ref = [closed_form_S(A, B) for A, B in zip(As, Bs)]
    assert torch.equal(S[0], fast[0]) and rel(S[0], ref[0]) < 1e-4  # kept
    assert rel(fast[1], ref[1]) > 1e-4 and rel(S[1], ref[1]) < 1e-4  # recomputed


def test_rank_deficient_pair_falls_back_to_scalar_and_tiny_pair_is_left_alone():
    g = torch.Generator().manual_seed(0)
    # exactly rank-deficient float32 factor (a repeated column): S̃ does not exist, Thm 4's s·I instead
    A, B = torch.randn(50, 4, generator=g), torch.randn(40, 4, generator=g)
    A[:, 3] = A[:, 0]
    S = optimal_S(A, B)
    assert torch.isfinite(S).all() and torch.allclose(S, optimal_s(A, B).to(F64) * torch.eye(4, dtype=F64))
    # rank 3 of 4 in float64, a batch of 16: rounding leaves λ_min(AᵀA) ~ ±eps·λ_max, of either sign
    A = torch.randn(16, 50, 3, generator=g, dtype=F64) @ torch.randn(16, 3, 4, generator=g, dtype=F64)
    B = torch.randn(16, 40, 4, generator=g, dtype=F64)
    S = optimal_S(A, B)
    assert torch.allclose(S, optimal_s(A, B)[:, None, None] * torch.eye(4, dtype=F64))
    # a well-conditioned float32 pair of very different scales (s = 1e16) is refactored exactly (no fallback)
    A, B = 1e-8 * torch.randn(50, 4, generator=g), 1e8 * torch.randn(40, 4, generator=g)
    assert rel(optimal_S(A, B), closed_form_S(A, B)) < 1e-8
    # float64 factors so small that their Gram is a sum of denormal products: left alone (S = I)
    A, B = 1e-160 * torch.randn(50, 4, generator=g, dtype=F64), torch.randn(40, 4, generator=g, dtype=F64)
    assert torch.equal(optimal_S(A, B), torch.eye(4, dtype=F64))


@pytest.mark.parametrize("case", ["fp32 s > 3.4e38", "fp16 s ~ 2.9e8 rescale", "fp16 sgd preconditioned"])
def test_extreme_scale_ratios_stay_finite(case):
    g = torch.Generator().manual_seed(0)
    if case == "fp32 s > 3.4e38":  # s = ‖B‖/‖A‖ overflows float32
        dtype, a, b, method, base = torch.float32, 1e-30, 1e10, "reflora-s", "adamw"
    elif case == "fp16 s ~ 2.9e8 rescale":  # s (the second moments' factor) overflows float16
        dtype, a, b, method, base = torch.float16, 1e-5, 3e3, "reflora-s", "sgd"
    else:  # ∇B S̃ overflows float16
        dtype, a, b, method, base = torch.float16, 1e-3, 3e2, "reflora", "sgd"
    A0, B0 = (a * torch.randn(12, 4, generator=g)).to(dtype), (b * torch.randn(9, 4, generator=g)).to(dtype)
    fresh = lambda: (torch.nn.Parameter(X.clone()) for X in (A0, B0))  # the same factors, twice
    A, B = fresh()
    opt = RefLoRA([(A, B)], method=method, base=base, lr=1e-4, warmup=0)
    for _ in range(5):
        A.grad, B.grad = torch.ones_like(A), torch.ones_like(B)
        opt.step()
        for t in (A, B, *opt.state[A].values(), *opt.state[B].values()):
            assert torch.isfinite(torch.as_tensor(t)).all()
    if method != "reflora-s":
        return
    # the rescaling itself, with lr = 0 so that only it moves s: each rescale divides s = ‖B‖/‖A‖ (measured in
    # float64, unclamped) by s clamped to [1/c, c], c = √(max of the dtype) (_scale), so s reaches 1 in a few
    # steps; the first step() rescales twice (the initial balance, then after the base step). rel: the rounding
    # of √s and 1/√s to the dtype
    A, B = fresh()
    opt = RefLoRA([(A, B)], method=method, base=base, lr=0.0, warmup=0)
    ratio = lambda: (B.detach().double().norm() / A.detach().double().norm()).item()
    c, s, rel = torch.finfo(dtype).max ** 0.5, ratio(), 1e-6 if dtype == torch.float32 else 3e-3
    assert s > c**2  # two clamped rescales first
    for k in (2, 1, 1, 1):
        A.grad, B.grad = torch.ones_like(A), torch.ones_like(B)
        opt.step()
        for _ in range(k):
            s /= min(max(s, 1 / c), c)
        assert ratio() == pytest.approx(s, rel=rel)
    assert s == 1.0 and opt.stats()["residual"] <= 4 * rel  # balanced: ‖Ã‖ = ‖B̃‖


# -----------------------------------------------------------------------------
# opt.stats(): what the refactoring did, read without a host sync in step()


def test_stats_count_pairs_residual_and_s():
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)
    good = [(rnd(12, 3), rnd(9, 3)), (rnd(20, 3), 3 * rnd(7, 3))]
    rank1 = (rnd(12, 1) @ rnd(1, 3), rnd(9, 3))
    zero = (torch.zeros(12, 3, dtype=F64), rnd(9, 3))
    for method in ("reflora", "reflora-s"):
        pairs = [tuple(torch.nn.Parameter(t.clone()) for t in ab) for ab in good + [rank1, zero]]
        s_ref = [optimal_s(A, B).item() for A, B in pairs[:3]]  # the refactored pairs, before any step
        # lr = 0: the factors stay as they are (A = 0 stays zero) between the refactorings
        opt = RefLoRA(pairs, method=method, lr=0.0, warmup=1 if method == "reflora" else 0, interval=2)
        assert opt.stats() == {}  # nothing refactored yet
        if method == "reflora-s":
            opt.step()  # the initial balance, at the first step
        else:
            for A, B in pairs:
                A.grad, B.grad = torch.ones_like(A), torch.ones_like(B)
            opt.step()  # step 0: warmup, no refactoring
            assert opt.stats() == {}
            for A, B in pairs:
                A.grad, B.grad = torch.ones_like(A), torch.ones_like(B)
            opt.step()
        # kept as device tensors until stats() is called (no .item() in step())
        assert opt._last and all(isinstance(t, torch.Tensor) for t, _ in opt._last)
        st = opt.stats()
        assert all(isinstance(v, float) for v in st.values())
        assert st["exact"] + st["fallback"] + st["alone"] == len(pairs)
        assert st["alone"] == 1  # the zero factor
        assert (st["exact"], st["fallback"]) == ((2, 1) if method == "reflora" else (3, 0))
        assert st["residual"] <= 1e-6
        assert st["s_min"] == pytest.approx(min(s_ref), rel=1e-9)
        assert st["s_max"] == pytest.approx(max(s_ref), rel=1e-9)
        assert st["s_median"] == pytest.approx(sorted(s_ref)[1], rel=1e-9)
    # RefLoRA-S's residual is measured, not assumed: the rescaled pairs are balanced
    for A, B in pairs[:3]:
        assert abs(A.norm() ** 2 - B.norm() ** 2) / A.norm() ** 2 <= 1e-6


def test_residual_measures_the_balance():
    """balance_residual is ‖ÃᵀÃ - B̃ᵀB̃‖/‖ÃᵀÃ‖ of the refactored pair: near 0 for S̃, not for a wrong S."""
    A, B = rand_pair(m=20, n=15, r=4)
    Ga, Gb = (A.T @ A)[None], (B.T @ B)[None]
    out = reflora._refactor(Ga, Gb, F64)
    resid = reflora.balance_residual(out[2], *out[6:])
    assert resid.item() < 1e-12
    At, Bt = reflora.balance(A, B)
    assert rel(At.T @ At, Bt.T @ Bt) < 1e-10  # what the residual stands for
    # a pair refactored by s·I only (the fallback's balance) is far from balanced: the measure can fail
    s = optimal_s(A, B)
    assert rel(s * A.T @ A, B.T @ B / s) > 1e-2
    # and so can balance_residual: S̃'s parts for (A, B) applied to B D, D = diag(1, 2, 1, 1), are not balanced
    d = torch.tensor([1.0, 2.0, 1.0, 1.0], dtype=F64)
    Gb2 = Gb * d[:, None] * d  # (B D)ᵀ(B D)
    assert reflora.balance_residual(out[2], out[6], Gb2 / Gb2[0].trace(), *out[8:]).item() > 1e-2

# -----------------------------------------------------------------------------
# RefLoRA on a PEFT-style module tree (no peft import: the layout is built here)


class PeftLinear(torch.nn.Module):
    """PEFT's LoRA layer layout: base_layer, lora_A[name] = Linear(in, r) (weight (r, in) = Bᵀ),
    lora_B[name] = Linear(r, out) (weight (out, r) = A), one pair per adapter name."""

    def __init__(self, n_in, n_out, r, names, g):
        super().__init__()
        self.base_layer = torch.nn.Linear(n_in, n_out, bias=False, dtype=F64).requires_grad_(False)
        self.lora_A = torch.nn.ModuleDict({k: torch.nn.Linear(n_in, r, bias=False, dtype=F64) for k in names})
        self.lora_B = torch.nn.ModuleDict({k: torch.nn.Linear(r, n_out, bias=False, dtype=F64) for k in names})
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64) / 3)

    def forward(self, x):
        return self.base_layer(x) + sum(self.lora_B[k](self.lora_A[k](x)) for k in self.lora_A)


def peft_model(seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(PeftLinear(8, 8, 3, ["default", "other"], g), torch.nn.Tanh(),
                            PeftLinear(8, 6, 2, ["default", "frozen"], g), torch.nn.Tanh(),
                            torch.nn.Linear(6, 2, dtype=F64))
    m[2].lora_A["frozen"].requires_grad_(False)
    m[2].lora_B["frozen"].requires_grad_(False)
    return m


@pytest.mark.parametrize("base", ["adamw", "sgd"])
@pytest.mark.parametrize("method", ["lora", "reflora", "reflora-s"])
def test_peft_layout_steps_like_the_project_layout(method, base):
    m = peft_model()
    pairs = reflora.find_pairs(m)
    assert len(pairs) == 3 and all(t for *_, t in pairs)  # the frozen adapter is left out
    assert all(B.shape[0] < B.shape[1] for _, B, _ in pairs)  # PEFT's Bᵀ (r, in), not copied
    # the same factors in the project's layout (A (out, r), B (in, r)), and the same function
    twin = [(torch.nn.Parameter(A.detach().clone()), torch.nn.Parameter(B.detach().T.clone())) for A, B, _ in pairs]
    head, thead = m[4], torch.nn.Linear(6, 2, dtype=F64)
    thead.load_state_dict(head.state_dict())
    frozen = [(m[0].base_layer.weight, []),
              (m[2].base_layer.weight, [m[2].lora_B["frozen"].weight @ m[2].lora_A["frozen"].weight])]

    def twin_forward(x):
        h = x
        for (W, extra), ab in zip(frozen, (twin[:2], twin[2:])):
            h = torch.tanh(h @ (W + sum(extra)).T + sum(h @ B @ A.T for A, B in ab))
        return thead(h)
    kw = dict(method=method, base=base, lr=1e-2, warmup=1, interval=2, weight_decay=0.01)
    opt = RefLoRA(pairs, [head.weight, head.bias], **kw)
    topt = RefLoRA(twin, list(thead.parameters()), **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.9 ** t)  # as HF Trainer drives it
    tsched = torch.optim.lr_scheduler.LambdaLR(topt, lambda t: 0.9 ** t)
    X = torch.randn(10, 8, generator=torch.Generator().manual_seed(3), dtype=F64)
    for _ in range(6):
        for o, f, sc in ((opt, m, sched), (topt, twin_forward, tsched)):
            loss = torch.sin(3 * f(X)).square().sum()
            o.zero_grad()
            loss.backward()
            o.step()
            sc.step()
    for (A, Bt, _), (tA, tB) in zip(pairs, twin):
        assert rel(A, tA) < 1e-12 and rel(Bt.T, tB) < 1e-12
        assert Bt.is_contiguous() and (Bt.grad is None or Bt.grad.shape == Bt.shape)
    assert rel(head.weight, thead.weight) < 1e-12
    if base == "adamw":
        for (A, Bt, _), (tA, tB) in zip(pairs, twin):
            assert rel(opt.moments(Bt)[1].T, topt.moments(tB)[1]) < 1e-12
    # and it moved (the frozen adapter did not)
    assert rel(pairs[0][0], peft_model()[0].lora_B["default"].weight) > 1e-3
    assert torch.equal(m[2].lora_A["frozen"].weight, peft_model()[2].lora_A["frozen"].weight)
    # a state_dict round trip into a fresh optimizer over the same parameters
    opt2 = RefLoRA(reflora.find_pairs(m), [head.weight, head.bias], **kw)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.steps == opt.steps and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for p in opt.state:
        for k, v in opt.state[p].items():
            assert torch.equal(opt2.state[p][k], v) if torch.is_tensor(v) else opt2.state[p][k] == v


def test_find_pairs_on_the_project_lora_linear():
    import model as M
    m = torch.nn.Sequential(M.LoRALinear(torch.randn(6, 5), 2, 4), M.LoRALinear(torch.randn(4, 6), 3, 6))
    m[1].A.requires_grad_(False)
    assert [(A is m[0].A, B is m[0].B, t) for A, B, t in reflora.find_pairs(m)] == [(True, True, False)]


# -----------------------------------------------------------------------------
# step_norm: the step in W from r×r Grams, against the dense m×n computation


def test_step_norm_equals_the_dense_norm_in_both_layouts():
    g = torch.Generator().manual_seed(0)
    shapes = [(12, 9, 3), (7, 15, 1), (20, 20, 6), (5, 30, 4)]  # (m, n, r): tall, wide, square, r ≈ m
    old = [(torch.randn(m, r, generator=g, dtype=F64), torch.randn(n, r, generator=g, dtype=F64)) for m, n, r in shapes]
    # new factors: a step plus a rescale (RefLoRA-S's √s A, B/√s), so A' − A is not small
    new = [(1.7 * A + 0.3 * torch.randn(A.shape, generator=g, dtype=F64),
            B / 1.7 - 0.2 * torch.randn(B.shape, generator=g, dtype=F64)) for A, B in old]
    dense_dw = torch.stack([torch.linalg.norm(A1 @ B1.T - A @ B.T) for (A, B), (A1, B1) in zip(old, new)])
    dense_w = torch.stack([torch.linalg.norm(A1 @ B1.T) for A1, B1 in new])
    for layout in ("project", "peft"):
        t = lambda ps: ps if layout == "project" else [(A, B.T.contiguous(), True) for A, B in ps]  # noqa: E731
        dw, w = reflora.step_norm(t(old), t(new))
        assert dw.dtype == w.dtype == F64 and dw.shape == w.shape == (len(shapes),)
        assert rel(dw, dense_dw) < 1e-12 and rel(w, dense_w) < 1e-12, layout
        assert torch.allclose(dw, dense_dw, rtol=1e-12, atol=0) and torch.allclose(w, dense_w, rtol=1e-12, atol=0)
    # row shards (FSDP): each shard's Grams, summed by `reduce`, give the whole pair's norms
    half = lambda ps, k: [(A[k::2], B[k::2]) for A, B in ps]  # noqa: E731
    got = {}
    reflora.step_norm(half(old, 1), half(new, 1), reduce=lambda x: got.setdefault("other", x))
    dw, w = reflora.step_norm(half(old, 0), half(new, 0), reduce=lambda x: x + got["other"])
    assert rel(dw, dense_dw) < 1e-12 and rel(w, dense_w) < 1e-12


def test_step_norm_of_a_tiny_float32_step_is_accurate():
    # a step of a few float32 ulps: ‖ΔW‖/‖W‖ ~ 1e-6; products of float32 numbers are exact in float64, so the
    # dense float64 difference is accurate to ~1e-10 here; tr((XᵀX)(YᵀY)) with X = [A', A] would lose ~1e-4
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(64, 4, generator=g), torch.randn(48, 4, generator=g)
    A1, B1 = A * (1 + 2e-6 * torch.randn(A.shape, generator=g)), B * (1 - 1e-6 * torch.randn(B.shape, generator=g))
    dense = torch.linalg.norm(A1.double() @ B1.double().T - A.double() @ B.double().T)
    assert dense / torch.linalg.norm(A1.double() @ B1.double().T) < 1e-5
    dw, _ = reflora.step_norm([(A, B)], [(A1, B1)])
    assert abs(dw[0] / dense - 1) < 1e-8
