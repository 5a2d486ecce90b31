"""
Benchmarks for reflora (timing hygiene after gpt-fast: warm-up, synchronized timed regions, medians, compile time
reported apart, device and versions printed).

    python bench.py --model=smollm2-135m --device=cpu [--batch_size=8 --seq_len=256 --dtype=float32 --compile=False]
                    [--json=PATH]        # one training step: lora vs reflora vs reflora-s, interleaved
    python bench.py --generate --model=tiny                 # batched beam search vs one example at a time
    python bench.py --refactor [--pairs=160] [--rank=32]   # one refactor step, LLaMA-7B shapes
    python bench.py --toy [--toy_setting=paper|normalized] [--png=toy.png] [--json=toy.json]   # the toy

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
# the paper's toy: min_{A,B} ½‖Y - ABᵀ‖²_F, gradient descent, LoRA vs ScaledGD vs RefLoRA(-S)

TOY_METHODS = ("lora", "scaledgd", "reflora", "reflora-s")
TOY_SETTINGS = {
    # the paper's figure (authors' MF-loss.png); its exact setting is not published, these are our assumptions:
    # Y = σ X₁X₂ᵀ/√(mn), X entries N(0, 1), so σ_i(Y) ≈ σ = 25 (22.9-28.3 for seed 0) and ½‖Y‖² ≈ rσ²/2;
    # an unbalanced LoRA-like init, A₀ ~ N(0, 0.05²) small, B₀ ~ N(0, 0.5²) with σ_max(B₀)² ≈ 150, between
    # 2/0.03 and 2/0.01 (GD on A is stable at η = 0.01 and not at 0.03); initial loss 2.1e3; raw loss
    "paper": dict(m=500, n=500, r=5, sigma=25.0, cond=1.0, a0=0.05, b0=0.5, etas=(0.01, 0.03), iters=100,
                  relative=False),
    # the earlier setting: σ_max(Y) = 1, σ_min = 1/20 (log-spaced), A₀, B₀ ~ N(0, 0.1²); loss / ½‖Y‖²
    "normalized": dict(m=60, n=40, r=4, sigma=1.0, cond=20.0, a0=0.1, b0=0.1, etas=(0.25,), iters=2000,
                       relative=True),
}


def toy(setting="paper", methods=TOY_METHODS, etas=None, iters=None, seed=0, dtype=torch.float64):
    """Loss curves {"<method>@<eta>": [loss at iteration 0, 1, ..., iters]} of gradient descent on ½‖Y - ABᵀ‖²_F.

    lora: plain GD. scaledgd (Tong, Ma, Chi 2021): A ← A - η ∇A (BᵀB)⁻¹, B ← B - η ∇B (AᵀA)⁻¹. reflora,
    reflora-s: reflora.RefLoRA with base="sgd" (Thm 3 preconditioning; Thm 4 rescaling, balanced before step 0).
    All start from the same (A₀, B₀). A curve stops early once its loss is non-finite, above 1e30, or, in the
    normalized setting, below 1e-12. Settings (TOY_SETTINGS): "paper" mimics the authors' figure (assumed
    setting, see there); "normalized" (σ_max(Y) = 1, relative loss) is the regime where ScaledGD beats RefLoRA.
    """
    cfg = TOY_SETTINGS[setting]
    m, n, r = cfg["m"], cfg["n"], cfg["r"]
    etas, iters = etas or cfg["etas"], iters or cfg["iters"]
    g = torch.Generator().manual_seed(seed)
    if cfg["cond"] == 1.0:  # Gaussian low rank: Y = σ X₁X₂ᵀ / √(mn)
        Y = cfg["sigma"] * torch.randn(m, r, generator=g, dtype=dtype) @ torch.randn(n, r, generator=g, dtype=dtype).mT
        Y = Y / (m * n) ** 0.5
    else:  # Y = U diag(σ) Vᵀ, σ log-spaced from sigma down to sigma/cond
        U, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=dtype))
        V, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=dtype))
        Y = (U * torch.logspace(0, -torch.log10(torch.tensor(cfg["cond"])).item(), r, dtype=dtype)) @ V.mT
        Y = cfg["sigma"] * Y
    A0 = cfg["a0"] * torch.randn(m, r, generator=g, dtype=dtype)
    B0 = cfg["b0"] * torch.randn(n, r, generator=g, dtype=dtype)
    norm = 0.5 * Y.square().sum() if cfg["relative"] else 1.0

    def run(method, eta):
        A, B = torch.nn.Parameter(A0.clone()), torch.nn.Parameter(B0.clone())
        opt = reflora.RefLoRA([(A, B)], method=method, base="sgd", lr=eta) if method.startswith("reflora") else None
        losses = []
        for t in range(iters + 1):
            with torch.no_grad():
                R = A @ B.mT - Y  # G = ∂L/∂W
                losses.append((0.5 * R.square().sum() / norm).item())
                if t == iters or not losses[-1] < 1e30 or (cfg["relative"] and losses[-1] < 1e-12):
                    break
                gA, gB = R @ B, R.mT @ A  # ∇A = G B, ∇B = Gᵀ A
                if opt is not None:  # RefLoRA(-S) under gradient descent: the optimizer itself
                    A.grad, B.grad = gA, gB
                    opt.step()
                elif method == "scaledgd":  # Tong, Ma, Chi 2021: both from the old (A, B)
                    dA, dB = gA @ torch.linalg.inv(B.mT @ B), gB @ torch.linalg.inv(A.mT @ A)
                    A -= eta * dA
                    B -= eta * dB
                else:
                    A -= eta * gA
                    B -= eta * gB
        return losses

    curves = {f"{m_}@{eta:g}": run(m_, eta) for m_ in methods for eta in etas}
    setting_out = dict(cfg, name=setting, seed=seed, etas=list(etas), iters=iters, dtype=str(dtype),
                       initial_loss=curves[next(iter(curves))][0])
    return setting_out, curves


def iters_to(losses, tol):
    """First iteration whose loss is below tol, or None."""
    return next((i for i, l in enumerate(losses) if l < tol), None)


# the paper figure's curves, read off MF-loss.png (../shared/paper/README.md): iterations to 1e-3, final loss
PAPER_TOY = {"lora@0.01": (None, "~3e2"), "lora@0.03": (None, "diverges"), "scaledgd@0.01": (None, "~1e2"),
             "scaledgd@0.03": (None, "~2"), "reflora@0.01": (38, "<1e-3"), "reflora@0.03": (11, "<1e-3")}
# paper layout: one colour per curve as in MF-loss.png (MATLAB's), solid for the smaller η, dash-dot for the larger
TOY_STYLE = {"lora": ("black", "tab:blue"), "scaledgd": ("tab:purple", "tab:green"),
             "reflora": ("tab:orange", "tab:red"), "reflora-s": ("tab:cyan", "tab:brown")}


def toy_json(setting, curves):
    """JSON-safe: non-finite losses as null."""
    fin = lambda x: x if x == x and abs(x) != float("inf") else None  # noqa: E731
    return {"setting": setting, "curves": {k: [fin(x) for x in c] for k, c in curves.items()}}


def toy_png(setting, curves, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG written")
        return False
    etas = setting["etas"]
    plt.figure(figsize=(6.4, 4.8))
    for k, c in curves.items():
        method, eta = k.split("@")
        i = etas.index(float(eta)) if float(eta) in etas else 0
        cs = [x if x == x and abs(x) != float("inf") else float("nan") for x in c]
        label = {"lora": "LoRA", "scaledgd": "ScaledGD", "reflora": "RefLoRA", "reflora-s": "RefLoRA-S"}[method]
        plt.semilogy(cs, color=TOY_STYLE[method][min(i, 1)], ls="-" if i == 0 else "-.",
                     lw=1.2 if method == "reflora-s" else 2.5,  # thin: it lies on RefLoRA's curve
                     label=f"{label} (η={eta})")
    plt.xlim(0, setting["iters"])
    plt.ylim(1e-3 if not setting["relative"] else 1e-12, 1e6 if not setting["relative"] else 10)
    plt.xlabel("iteration t")
    plt.ylabel("relative loss" if setting["relative"] else "loss ℓ")
    plt.title(f"½‖Y − ABᵀ‖², setting {setting['name']!r} (reflora bench.py --toy)", fontsize=9)
    plt.legend(loc="lower left" if setting["relative"] else "lower right", fontsize=8)
    plt.tight_layout()
    tmp = path + ".tmp.png"
    plt.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    print(f"wrote {path}")
    return True


def bench_toy(args):
    setting, curves = toy(args.toy_setting)
    print(f"setting {args.toy_setting}: " + ", ".join(f"{k}={v}" for k, v in setting.items() if k != "name"))
    tol = 1e-3
    print(f"{'curve':16s} {'loss@0':>9s} {'loss@10':>9s} {'final':>9s} {'iters to 1e-3':>14s} {'tail rate':>10s}"
          + ("   paper: iters to 1e-3, final" if args.toy_setting == "paper" else ""))
    for k, c in curves.items():
        at = lambda i: f"{c[min(i, len(c) - 1)]:9.2e}"  # noqa: E731
        # per-iteration loss ratio over the last 10 iterations above 1e-9 (the asymptotic rate), if finite
        tail = [x for x in c if 1e-9 < x < 1e30][-11:]
        rate = f"{(tail[-1] / tail[0]) ** (1 / 10):10.3f}" if len(tail) == 11 else f"{'-':>10s}"
        paper = PAPER_TOY.get(k, ("", "(not in the figure)")) if args.toy_setting == "paper" else None
        print(f"{k:16s} {at(0)} {at(10)} {at(len(c) - 1)} {str(iters_to(c, tol)):>14s} {rate}"
              + (f"   {str(paper[0]):>5s}, {paper[1]}" if paper else ""))
    if args.png:
        toy_png(setting, curves, args.png)
    return toy_json(setting, curves)

# -----------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--refactor", action="store_true", help="micro-benchmark of one refactor step")
    p.add_argument("--toy", action="store_true", help="the paper's matrix-factorization toy")
    p.add_argument("--toy_setting", default="paper", choices=list(TOY_SETTINGS), help="paper or normalized")
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
