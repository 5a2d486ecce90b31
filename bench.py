"""
Benchmarks for reflora (timing hygiene after gpt-fast: warm-up, synchronized timed regions, medians, compile time
reported apart, device and versions printed).

    python bench.py --model=smollm2-135m --device=cpu [--batch_size=8 --seq_len=256 --dtype=float32 --compile=False]
                    [--json=PATH]        # one training step: lora vs reflora vs reflora-s, interleaved
    python bench.py --generate --model=tiny                 # batched beam search vs one example at a time
    python bench.py --refactor [--pairs=160] [--rank=32]   # one refactor step, LLaMA-7B shapes
    python bench.py --toy [--png=toy.png]                  # the paper's matrix-factorization toy

References: Zhang, Li, Giannakis, RefLoRA (arXiv 2505.18877), Sec. 5 toy problem and the overhead chart of the
authors' repository; gpt-fast's benchmarks; nanoGPT's MFU estimate (PaLM appendix B).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

import model as M
import reflora
import train

# -----------------------------------------------------------------------------
# timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, warmup=3, iters=20):
    """Median wall time of fn() in ms, after warm-up, with the device synchronized around each call."""
    return interleaved({"": fn}, device, warmup, iters)[""]


def interleaved(fns, device, warmup=3, iters=20):
    """{name: median ms}: the functions take turns, so drift in clocks or machine load hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(1e3 * (time.perf_counter() - t0))
    return {name: statistics.median(t) for name, t in times.items()}


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
    # RefLoRA-S: norms and in-place rescaling of factors and both Adam moments
    moments = [[t.clone() for t in ts] for ts in (gAs, gAs, gBs, gBs)]
    fns = {name: (lambda fn=fn: fn(As, Bs, gAs, gBs)) for name, fn in rows}
    fns["RefLoRA-S rescale (batched, eager)"] = lambda: reflora.rescale(As, Bs, moments)
    results = interleaved(fns, device, warmup=2, iters=args.iters)
    base = results[rows[0][0]]
    for name, ms in results.items():
        print(f"{name:40s} {ms:9.2f} ms   {base / ms:6.1f}x vs loop")
    return results

# -----------------------------------------------------------------------------
# one training step per method, interleaved in one process

def peak_flops(device, dtype):
    """Dense bf16 peak of a known GPU (train.PEAK_FLOPS), else None (CPU, float32: no MFU)."""
    if device.type != "cuda" or dtype == torch.float32:
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in train.PEAK_FLOPS.items() if k in name), None)


def bench_train(args):
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    header(device)
    torch.manual_seed(0)
    margs = M.ModelArgs.from_name(args.model)
    with torch.device(device):
        model = M.Transformer(margs).to(dtype)
    M.add_lora(model, r=args.rank, alpha=2 * args.rank)
    model.grad_checkpoint = args.grad_checkpoint
    if args.compile:
        for layer in model.layers:
            layer.compile()
    x = torch.randint(0, margs.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
    tokens, targets = x[:, :-1], x[:, 1:]
    opts = {m: reflora.RefLoRA(model.lora_pairs(), method=m, lr=1e-5, warmup=0, compile=args.compile)
            for m in ("lora", "reflora", "reflora-s")}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and dtype != torch.float32 \
        else torch.autocast("cpu", enabled=False)
    cuda = device.type == "cuda"
    times = {m: {"step": [], "opt": [], "mem": 0} for m in opts}

    def step(opt):
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        with autocast:
            _, loss = model(tokens, targets)
        loss.backward()
        sync(device)
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        t2 = time.perf_counter()
        return 1e3 * (t2 - t0), 1e3 * (t2 - t1), torch.cuda.max_memory_allocated(device) if cuda else 0

    t0 = time.perf_counter()
    for m, opt in opts.items():  # warm-up (and compilation) of every method
        for _ in range(args.warmup):
            step(opt)
    print(f"warm-up ({args.warmup} steps per method, compile={args.compile}): {time.perf_counter() - t0:.1f} s")
    for _ in range(args.iters):  # interleaved, so drift in clocks or load hits all methods alike
        for m, opt in opts.items():
            s, o, mem = step(opt)
            times[m]["step"].append(s), times[m]["opt"].append(o)
            times[m]["mem"] = max(times[m]["mem"], mem)
    f0, f1 = train.flops_per_token(model)  # LoRA FLOPs per token: 4·N_frozen + 6·N_lora + attention
    ntok, fpt, peak = args.batch_size * args.seq_len, f0 + f1 * args.seq_len, peak_flops(device, dtype)
    res = {}
    print(f"{args.model}, batch {args.batch_size} × seq {args.seq_len}, {args.dtype}, r={args.rank}, "
          f"{args.iters} timed steps per method (medians)")
    print(f"{'method':10s} {'step ms':>9s} {'opt ms':>8s} {'tok/s':>9s} {'mfu':>6s} {'peak MB':>9s}")
    for m, t in times.items():
        step_ms, opt_ms = statistics.median(t["step"]), statistics.median(t["opt"])
        tps = ntok / step_ms * 1e3
        mfu = fpt * tps / peak if peak else None
        res[m] = dict(step_ms=step_ms, opt_ms=opt_ms, tokens_per_s=tps, mfu=mfu, peak_mem_mb=t["mem"] / 2**20 if cuda else None)
        print(f"{m:10s} {step_ms:9.1f} {opt_ms:8.2f} {tps:9.0f} {f'{100 * mfu:.1f}%' if mfu else '-':>6s} "
              f"{res[m]['peak_mem_mb'] or 0:9.0f}")
    for m in ("reflora", "reflora-s"):
        # the methods differ only in the optimizer step: its extra time is the overhead, without the noise of
        # the (identical) forward and backward
        extra = res[m]["opt_ms"] - res["lora"]["opt_ms"]
        print(f"{m} overhead over lora: step {100 * (res[m]['step_ms'] / res['lora']['step_ms'] - 1):+.2f}%, "
              f"optimizer {extra:+.2f} ms = {100 * extra / res['lora']['step_ms']:+.2f}% of a lora step")
    return res


# -----------------------------------------------------------------------------
# generation: batched beam search vs one example at a time


def bench_generate(args):
    device = torch.device(args.device)
    header(device)
    torch.manual_seed(0)
    margs = M.ModelArgs.from_name(args.model)
    with torch.device(device):
        model = M.Transformer(margs).to(getattr(torch, args.dtype)).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, margs.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(args.seq_len // 2, args.seq_len, (args.batch_size,), generator=g)]
    gen = lambda ps: M.generate(model, ps, args.new_tokens, eos_id=-1, pad_id=0, num_beams=args.beams)
    t_batch = timeit(lambda: gen(prompts), device, warmup=1, iters=3)
    t_one = timeit(lambda: [gen([p]) for p in prompts], device, warmup=0, iters=1)
    print(f"{args.model}: {len(prompts)} prompts of {args.seq_len // 2}-{args.seq_len} tokens, {args.beams} beams, "
          f"{args.new_tokens} new tokens")
    print(f"batched      {len(prompts) / t_batch * 1e3:8.2f} examples/s")
    print(f"one by one   {len(prompts) / t_one * 1e3:8.2f} examples/s   ({t_one / t_batch:.1f}x slower)")
    return dict(batched=len(prompts) / t_batch * 1e3, one_by_one=len(prompts) / t_one * 1e3)


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
    p.add_argument("--generate", action="store_true", help="batched vs one-by-one beam search")
    p.add_argument("--model", default="smollm2-135m", choices=list(M.PRESETS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                   choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--pairs", type=int, default=160)
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    boolean = lambda s: {"true": True, "false": False}[s.lower()]  # noqa: E731
    p.add_argument("--compile", type=boolean, default=torch.cuda.is_available(), help="True/False")
    p.add_argument("--grad_checkpoint", type=boolean, default=False,
                   help="True/False: recompute activations in backward")
    p.add_argument("--json", default="", help="write the results here")
    p.add_argument("--png", default="")
    args = p.parse_args(argv)
    if args.toy:
        res = bench_toy(args)
    elif args.refactor:
        res = bench_refactor(args)
    elif args.generate:
        res = bench_generate(args)
    else:
        res = {"methods": bench_train(args)}
    if args.json:
        out = dict(res, device=str(args.device), torch=torch.__version__, config=vars(args))
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=2)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
