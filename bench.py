"""
Benchmarks for reflora (timing hygiene after gpt-fast: warm-up, synchronized timed regions, medians, compile time
reported apart, device and versions printed).

    python bench.py --refactor [--device=cpu] [--pairs=160] [--rank=32]  # one refactor step, LLaMA-7B shapes
    python bench.py --toy [--png=toy.png]                                  # the paper's matrix-factorization toy

References: Zhang, Li, Giannakis, RefLoRA (arXiv 2505.18877), Sec. 5 toy problem; gpt-fast's benchmarks.
"""
import argparse
import platform
import statistics
import sys
import time

import torch

import reflora

# -----------------------------------------------------------------------------
# timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, warmup=3, iters=20):
    """Median wall time of fn() in ms, after warm-up, with the device synchronized around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def header(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device {device} ({name}, {torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"python {platform.python_version()}")

# -----------------------------------------------------------------------------
# one refactor step: batched (reflora.precondition) vs a per-pair loop like the authors' Refactorer


def llama7b_pairs(n_layers=32, dim=4096, hidden=11008, r=32, device="cpu", seed=0):
    """(A, B, ∇A, ∇B) for q, k, v, up, down of LLaMA-7B: A (out, r), B (in, r); 32 × 5 = 160 pairs."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(dim, dim), (dim, dim), (dim, dim), (hidden, dim), (dim, hidden)] * n_layers  # (out, in)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device)
    return [(rnd(m, r), rnd(n, r), rnd(m, r), rnd(n, r)) for m, n in shapes]


@torch.no_grad()
def loop_precondition(As, Bs, gAs, gBs):
    """The authors' algorithm, one pair at a time: two eighs per pair (their eps regularization included)."""
    out_A, out_B = [], []
    for A, B, gA, gB in zip(As, Bs, gAs, gBs):
        eps = torch.finfo(A.dtype).eps
        lamB, VB = torch.linalg.eigh(B.mT @ B)  # BᵀB = V_B Σ_B² V_Bᵀ
        sigB = lamB.sqrt()
        M = A @ (VB * sigB)
        lamM, VM = torch.linalg.eigh(M.mT @ M)
        sigM = lamM.sqrt()
        left = (VB / (sigB + eps)) @ VM
        Sinv = (left * sigM) @ left.mT  # S̃⁻¹ = (BᵀB)^{-1/2} [(BᵀB)^{1/2} AᵀA (BᵀB)^{1/2}]^{1/2} (BᵀB)^{-1/2}
        left = (VB * sigB) @ VM
        S = (left / (sigM + eps)) @ left.mT
        out_A.append(gA @ Sinv)
        out_B.append(gB @ S)
    return out_A, out_B


def bench_refactor(args):
    device = torch.device(args.device)
    header(device)
    pairs = llama7b_pairs(n_layers=args.pairs // 5, r=args.rank, device=device)
    As, Bs, gAs, gBs = map(list, zip(*pairs))
    print(f"{len(pairs)} pairs (LLaMA-7B q,k,v,up,down), r={args.rank}, float32")
    rows = [("per-pair loop (authors' algorithm)", loop_precondition),
            ("batched, eager", reflora.precondition)]
    if args.compile:
        compiled = torch.compile(reflora.precondition)
        t0 = time.perf_counter()
        compiled(As, Bs, gAs, gBs)
        sync(device)
        print(f"compile time {time.perf_counter() - t0:.1f} s")
        rows.append(("batched, compiled", compiled))
    # refactor-S: norms and in-place rescaling of factors and both Adam moments
    moments = [[t.clone() for t in ts] for ts in (gAs, gAs, gBs, gBs)]
    results = {}
    for name, fn in rows:
        results[name] = timeit(lambda: fn(As, Bs, gAs, gBs), device, iters=args.iters)
    results["RefLoRA-S rescale (batched, eager)"] = timeit(lambda: reflora.rescale(As, Bs, moments), device,
                                                           iters=args.iters)
    base = results[rows[0][0]]
    for name, ms in results.items():
        print(f"{name:40s} {ms:9.2f} ms   {base / ms:6.1f}x vs loop")
    return results

# -----------------------------------------------------------------------------
# the paper's toy: min_{A,B} ½‖Y - ABᵀ‖²_F with a low-rank, ill-conditioned Y


def toy(m=60, n=40, r=4, cond=20.0, iters=2000, lr=0.25, tol=1e-6, seed=0, dtype=torch.float64):
    """Loss curves of LoRA (GD), ScaledGD and RefLoRA (GD + Thm 3 refactoring) from one init and step size.

    Returns {method: [loss per iteration]}; loss is relative, ½‖Y - ABᵀ‖² / ½‖Y‖². lr is in units of 1/σ_max(Y).
    """
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=dtype))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=dtype))
    sig = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), r, dtype=dtype)  # σ_max = 1, σ_min = 1/cond
    Y = (U * sig) @ V.mT
    A0 = 0.1 * torch.randn(m, r, generator=g, dtype=dtype)
    B0 = 0.1 * torch.randn(n, r, generator=g, dtype=dtype)
    norm = 0.5 * Y.square().sum()

    def run(step_fn):
        A, B, losses = A0.clone(), B0.clone(), []
        for _ in range(iters):
            R = A @ B.mT - Y  # ∂L/∂W
            losses.append((0.5 * R.square().sum() / norm).item())
            if losses[-1] < tol:
                break
            A, B = step_fn(A, B, R @ B, R.mT @ A)  # ∇A = G B, ∇B = Gᵀ A
        return losses

    def gd(A, B, gA, gB):
        return A - lr * gA, B - lr * gB

    def scaled_gd(A, B, gA, gB):  # Tong, Ma, Chi 2021: ∇A (BᵀB)⁻¹, ∇B (AᵀA)⁻¹
        return A - lr * gA @ torch.linalg.inv(B.mT @ B), B - lr * gB @ torch.linalg.inv(A.mT @ A)

    def refactored_gd(A, B, gA, gB):  # RefLoRA through the optimizer itself, base = gradient descent
        A, B = torch.nn.Parameter(A), torch.nn.Parameter(B)
        A.grad, B.grad = gA, gB
        reflora.RefLoRA([(A, B)], method="reflora", base="sgd", lr=lr).step()
        return A.detach(), B.detach()

    return {"LoRA": run(gd), "ScaledGD": run(scaled_gd), "RefLoRA": run(refactored_gd)}


def iters_to(losses, tol):
    return next((i for i, l in enumerate(losses) if l < tol), None)


def bench_toy(args):
    curves = toy()
    print(f"{'method':10s} {'loss@10':>10s} {'loss@100':>10s} {'loss@1000':>10s} {'iters to 1e-3':>14s} "
          f"{'iters to 1e-6':>14s}")
    for name, c in curves.items():
        at = lambda i: f"{c[min(i, len(c) - 1)]:10.2e}"
        it3, it6 = iters_to(c, 1e-3), iters_to(c, 1e-6)
        print(f"{name:10s} {at(10)} {at(100)} {at(1000)} {str(it3):>14s} {str(it6):>14s}")
    if args.png:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no PNG written")
            return curves
        plt.figure(figsize=(5, 3.5))
        for name, c in curves.items():
            plt.semilogy(c, label=name)
        plt.xlabel("iteration")
        plt.ylabel("relative loss")
        plt.legend()
        plt.tight_layout()
        plt.savefig(args.png, dpi=120)
        print(f"wrote {args.png}")
    return curves

# -----------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--refactor", action="store_true", help="micro-benchmark of one refactor step")
    p.add_argument("--toy", action="store_true", help="the paper's matrix-factorization toy")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--pairs", type=int, default=160)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--png", default="")
    args = p.parse_args(argv)
    if not (args.refactor or args.toy):
        p.error("nothing to do: pass --refactor and/or --toy")
    if args.toy:
        bench_toy(args)
    if args.refactor:
        bench_refactor(args)


if __name__ == "__main__":
    sys.exit(main())
