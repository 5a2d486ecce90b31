"""
Experiments that need no real model: the paper's matrix-factorization toy (Sec. 5), reproduced and swept over the
step size, and one AdamW step's ‖ΔW‖ (why the refactorings do little under AdamW).

    python experiments.py --toy [--toy_setting=paper|normalized] [--png=toy.png] [--json=toy.json]   # the figure
    python experiments.py --toy_sweep [--toy_setting=paper|normalized] [--etas=a,b,...] [--seeds=0,1,2]
                          [--iters=N] [--out=out-toy]    # per method: iterations to 1e-3 and the largest stable η
    python experiments.py --adam_step [--json=PATH]      # one AdamW step from unbalanced factors: ‖ΔW‖ vs s

The toy sweep runs gradient descent on ½‖Y − ABᵀ‖²_F for every method (lora, scaledgd, reflora, reflora-s) at
every η of a log-spaced grid, from every seed's (Y, A₀, B₀): the same problems and starts for every method. With
--toy_base=adamw, torch's AdamW is every method's base step instead (LoRA is then AdamW on (A, B); ScaledGD, a
gradient-descent rule, is left out). A run is stable when its loss stays finite and ends no higher than it
started; it converges when it reaches the tolerance (1e-3: raw loss in the paper setting, relative loss in the
normalized one) within the budget. Per method: the stability frontier (the largest η of the grid stable for every
seed), the largest η that converges for every seed, and the η with the fewest iterations to the tolerance (mean
over seeds). Output: OUT/toy_sweep.json (every run's curve), OUT/toy_sweep.png (iterations to the tolerance and
final loss against η), OUT/toy_sweep.md (the tables).

References: Zhang, Li, Giannakis, RefLoRA (NeurIPS 2025, arXiv 2505.18877), Sec. 5 and the authors' MF-loss.png;
Tong, Ma, Chi, "Accelerating ill-conditioned low-rank matrix estimation via scaled gradient descent" (JMLR 2021).
"""
import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch

import reflora
from runstate import atomic_write

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


def toy(setting="paper", methods=TOY_METHODS, etas=None, iters=None, seed=0, dtype=torch.float64,
        stop_below=None, base="sgd"):
    """Loss curves {"<method>@<eta>": [loss at iteration 0, 1, ..., iters]} of gradient descent on ½‖Y - ABᵀ‖²_F.

    lora: plain GD. scaledgd (Tong, Ma, Chi 2021): A ← A - η ∇A (BᵀB)⁻¹, B ← B - η ∇B (AᵀA)⁻¹. reflora,
    reflora-s: reflora.RefLoRA with base="sgd" (Thm 3 preconditioning; Thm 4 rescaling, balanced before step 0).
    All start from the same (A₀, B₀). A curve stops early once its loss is non-finite, above 1e30, or below
    stop_below (default: 1e-12 in the normalized setting, never in the paper one). Settings (TOY_SETTINGS):
    "paper" mimics the authors' figure (assumed setting, see there); "normalized" (σ_max(Y) = 1, relative loss)
    is the regime where ScaledGD beats RefLoRA. base="adamw": lora, reflora and reflora-s on torch's AdamW
    (β = 0.9, 0.999, ε = 1e-8, no weight decay, constant lr = η; the authors' base).
    """
    if base not in reflora.BASES or (base != "sgd" and "scaledgd" in methods):
        raise ValueError(f"toy: base={base!r} with methods {methods} (ScaledGD is gradient descent only)")
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
    floor = stop_below if stop_below is not None else 1e-12 if cfg["relative"] else 0.0

    def run(method, eta):
        A, B = torch.nn.Parameter(A0.clone()), torch.nn.Parameter(B0.clone())
        use = method.startswith("reflora") or base == "adamw"
        opt = reflora.RefLoRA([(A, B)], method=method, base=base, lr=eta) if use else None
        losses = []
        for t in range(iters + 1):
            with torch.no_grad():
                R = A @ B.mT - Y  # G = ∂L/∂W
                losses.append((0.5 * R.square().sum() / norm).item())
                if t == iters or not losses[-1] < 1e30 or losses[-1] < floor:
                    break
                gA, gB = R @ B, R.mT @ A  # ∇A = G B, ∇B = Gᵀ A
                if opt is not None:  # RefLoRA(-S), or any method under AdamW: the optimizer itself
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
    setting_out = dict(cfg, name=setting, base=base, seed=seed, etas=list(etas), iters=iters, dtype=str(dtype),
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
    plt.title(f"½‖Y − ABᵀ‖², setting {setting['name']!r} (reflora experiments.py --toy)", fontsize=9)
    plt.legend(loc="lower left" if setting["relative"] else "lower right", fontsize=8)
    plt.tight_layout()
    tmp = path + ".tmp.png"
    plt.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    print(f"wrote {path}")
    return True


def run_toy(args):
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
# the toy over a grid of step sizes: iterations to the tolerance and the stability frontier, per method

TOY_TOL = 1e-3


def log_grid(lo, hi, per_decade=4):
    """lo, lo·10^(1/per_decade), ..., hi, each rounded to 3 significant digits."""
    n = round(math.log10(hi / lo) * per_decade)
    return [float(f"{lo * 10 ** (k / per_decade):.3g}") for k in range(n + 1)]


# per setting: the η grid of the sweep and its iteration budget (the paper's figure runs 100 iterations)
TOY_SWEEP = {"paper": dict(etas=log_grid(1e-3, 1.0), iters=1000),
             "normalized": dict(etas=log_grid(1e-2, 10.0), iters=2000)}
# under AdamW the step is about η per coordinate whatever the gradient's scale: one grid for both settings
TOY_SWEEP_ADAMW = {k: dict(v, etas=log_grid(1e-4, 1.0)) for k, v in TOY_SWEEP.items()}


def stable(curve):
    """Finite at every iteration, below the 1e30 stop, and no higher at the end than at the start."""
    return all(math.isfinite(x) for x in curve) and curve[-1] < 1e30 and curve[-1] <= curve[0]


def toy_sweep(setting="paper", methods=None, etas=None, seeds=(0, 1, 2), iters=None, tol=TOY_TOL,
              base="sgd"):
    """Every method at every η from every seed's problem and start -> dict(setting, etas, seeds, iters, tol,
    runs=[dict(method, eta, seed, iters_to, final, stable, curve)], summary=summarize_toy(...)). A curve stops
    six decades below the tolerance (staying stable that far is part of being stable). base: see toy."""
    grid = (TOY_SWEEP if base == "sgd" else TOY_SWEEP_ADAMW)[setting]
    methods = methods or (TOY_METHODS if base == "sgd" else reflora.METHODS)
    etas, iters = sorted(etas or grid["etas"]), iters or grid["iters"]
    runs, cfg = [], None
    for seed in seeds:
        cfg, curves = toy(setting, methods, etas, iters, seed, stop_below=tol * 1e-6, base=base)
        for m in methods:
            for eta in etas:
                c = curves[f"{m}@{eta:g}"]
                runs.append(dict(method=m, eta=eta, seed=seed, iters_to=iters_to(c, tol), final=c[-1],
                                 stable=stable(c), curve=c))
    cfg = {k: v for k, v in cfg.items() if k not in ("seed", "etas", "initial_loss")}
    return dict(setting=cfg, etas=etas, seeds=list(seeds), iters=iters, tol=tol, runs=runs,
                summary=summarize_toy(runs, methods, etas))


def _mean_std(xs):
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else None


def summarize_toy(runs, methods, etas):
    """{method: dict(frontier, converges_to, best_eta, best_iters, per_eta)}: frontier = the largest η stable for
    every seed; converges_to = the largest η reaching the tolerance for every seed; best_eta = the η with the
    fewest iterations to it (mean over seeds, among those η); per_eta[η] = dict(stable, reached (seeds), n,
    iters = mean ± std over seeds if every seed reached the tolerance, else None)."""
    out = {}
    for m in methods:
        per = {}
        for eta in etas:
            rs = [r for r in runs if r["method"] == m and r["eta"] == eta]
            its = [r["iters_to"] for r in rs if r["iters_to"] is not None]
            per[eta] = dict(stable=all(r["stable"] for r in rs), reached=len(its), n=len(rs),
                            iters=_mean_std(its) if len(its) == len(rs) else None)
        ok = [e for e in etas if per[e]["iters"] is not None]
        best = min(ok, key=lambda e: per[e]["iters"][0]) if ok else None
        out[m] = dict(frontier=max((e for e in etas if per[e]["stable"]), default=None),
                      converges_to=max(ok, default=None), best_eta=best,
                      best_iters=per[best]["iters"] if best is not None else None, per_eta=per)
    return out


def toy_sweep_markdown(res):
    """Two tables: per method the frontier, the largest converging η, the fastest η and its iterations; then the
    iterations to the tolerance at every η (mean ± std over seeds; div: unstable for a seed; -: stable, not
    reached within the budget; k/n: reached by k of n seeds)."""
    etas, top, tol = res["etas"], max(res["etas"]), res["tol"]
    edge = lambda e: "-" if e is None else f"{e:g}" + (" (grid top)" if e == top else "")  # noqa: E731
    n_seeds, iters = len(res["seeds"]), res["iters"]
    base = {"sgd": "gradient descent", "adamw": "AdamW"}[res["setting"].get("base", "sgd")]
    rows = [f"Setting {res['setting']['name']!r}, {base}, {n_seeds} seeds, {iters} iterations, tolerance {tol:g}.",
            "",
            f"| method | stable up to η | reaches {tol:g} up to η | fastest η | iterations to {tol:g} |",
            "|---|---|---|---|---|"]
    for m, s in res["summary"].items():
        it = "-" if s["best_iters"] is None else f"{s['best_iters'][0]:.1f} ± {s['best_iters'][1]:.1f}"
        rows.append(f"| {m} | {edge(s['frontier'])} | {edge(s['converges_to'])} | {edge(s['best_eta'])} | {it} |")
    rows += ["", f"Iterations to {tol:g} at each η (mean ± std over seeds):", "",
             "| method | " + " | ".join(f"{e:g}" for e in etas) + " |", "|---|" + "---|" * len(etas)]
    for m, s in res["summary"].items():
        cells = []
        for e in etas:
            p = s["per_eta"][e]
            cells.append("div" if not p["stable"] else f"{p['iters'][0]:.0f} ± {p['iters'][1]:.0f}" if p["iters"]
                         else "-" if not p["reached"] else f"{p['reached']}/{p['n']}")
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def toy_sweep_png(res, path):
    """Left: iterations to the tolerance against η (mean, min-max bars; × at the top: unstable for a seed);
    right: final loss against η (each seed; a run stops six decades below the tolerance, or after the budget).
    -> path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = {"lora": "LoRA", "scaledgd": "ScaledGD", "reflora": "RefLoRA", "reflora-s": "RefLoRA-S"}
    colors = {"lora": "C0", "scaledgd": "C2", "reflora": "C3", "reflora-s": "C4"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.3), dpi=120)
    for m, s in res["summary"].items():
        c, label = colors.get(m, "C7"), names.get(m, m)
        ok = [e for e in res["etas"] if s["per_eta"][e]["iters"] is not None]
        its = {e: [r["iters_to"] for r in res["runs"] if r["method"] == m and r["eta"] == e] for e in ok}
        mean = [statistics.fmean(its[e]) for e in ok]
        err = [[y - min(its[e]) for y, e in zip(mean, ok)], [max(its[e]) - y for y, e in zip(mean, ok)]]
        ax1.errorbar(ok, mean, yerr=err, color=c, marker="o", ms=4, capsize=2, label=label)
        bad = [e for e in res["etas"] if not s["per_eta"][e]["stable"]]
        ax1.plot(bad, [res["iters"]] * len(bad), "x", color=c, ms=8, mew=2)
        rs = [r for r in res["runs"] if r["method"] == m]
        fin = [min(r["final"], 1e30) if r["stable"] else 1e30 for r in rs]
        ax2.loglog([r["eta"] for r in rs], [max(f, 1e-30) for f in fin], "o", color=c, ms=3, alpha=0.6, label=label)
    ax1.set(xscale="log", yscale="log", xlabel="step size η", ylabel=f"iterations to loss {res['tol']:g}",
            title=f"× at {res['iters']}: unstable (a seed diverged)")
    ax2.set(xlabel="step size η", ylabel=f"final loss (stops at {res['tol'] * 1e-6:g}; 1e30: diverged)",
            title=f"toy {res['setting']['name']!r}, {res['setting'].get('base', 'sgd')}, {len(res['seeds'])} seeds")
    for ax in (ax1, ax2):
        ax.grid(True, which="major", alpha=0.4)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def run_toy_sweep(args):
    res = toy_sweep(args.toy_setting, args.methods, args.etas, args.seeds, args.iters, base=args.toy_base)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = toy_sweep_markdown(res)
    js = dict(res, runs=[dict(r, final=_finite(r["final"]), curve=[_finite(x) for x in r["curve"]])
                         for r in res["runs"]],
              summary={m: dict(s, per_eta={f"{e:g}": p for e, p in s["per_eta"].items()})
                       for m, s in res["summary"].items()})
    atomic_write(out / "toy_sweep.json", json.dumps(js, allow_nan=False) + "\n")
    atomic_write(out / "toy_sweep.md", md)
    png = toy_sweep_png(res, out / "toy_sweep.png")
    print(md)
    print(f"wrote {out / 'toy_sweep.json'}, {out / 'toy_sweep.md'}" +
          (f", {png}" if png else " (no PNG: matplotlib is not installed)"))
    return js


def _finite(x):
    return x if math.isfinite(x) else None


# -----------------------------------------------------------------------------
# one AdamW step: the size of the step each method takes

def adam_step(m=576, n=576, r=8, lr=1e-3, seed=0):
    """Why the refactorings change the step under AdamW (RESULTS.md, "One AdamW step from unbalanced factors"):
    one AdamW step on min ½‖Y − ABᵀ‖² from the same unbalanced (A, B), ‖ΔW‖ for lora, reflora and reflora-s,
    against s = ‖B‖/‖A‖.
    Adam's step is about ±lr per coordinate whatever the gradient's scale, so RefLoRA's preconditioned gradient
    gives about LoRA's step, and RefLoRA-S's balance shrinks ‖ΔW‖ ≈ lr(‖ΔA‖‖B‖ + ‖A‖‖ΔB‖) by up to (1 + s)/(2√s)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    Y, rows = rand(m, 4) @ rand(4, n) / 10, []
    for a in (1e-3, 1e-2, 1e-1):  # ‖A‖ / ‖B‖: LoRA's A grows from 0 while B keeps its random init
        A0, B0, dW = a * rand(m, r) / m ** 0.5, rand(n, r) / n ** 0.5, {}
        for method in reflora.METHODS:
            A, B = A0.clone().requires_grad_(), B0.clone().requires_grad_()
            opt = reflora.RefLoRA([(A, B)], method=method, lr=lr, warmup=0)  # reflora-s: balanced before the step
            (0.5 * (Y - A @ B.T).square().sum()).backward()
            opt.step()
            dW[method] = torch.linalg.norm(A.detach() @ B.detach().T - A0 @ B0.T).item()
        s = reflora.optimal_s(A0, B0).item()
        rows.append(dict(s=s, bound=(1 + s) / (2 * s ** 0.5), **dW))
        print(f"s = {s:7.1f}   (1+s)/(2√s) = {rows[-1]['bound']:5.1f}   ‖ΔW‖  lora {dW['lora']:.2e}   reflora "
              f"{dW['reflora']:.2e}   reflora-s {dW['reflora-s']:.2e}   "
              f"lora / reflora-s {dW['lora'] / dW['reflora-s']:.1f}")
    return rows



# -----------------------------------------------------------------------------
# command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints its usage first)
        _fail(message)


def _fail(msg):
    print(f"experiments.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def _list(flag, text, cast, choices=None):
    try:
        xs = [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        _fail(f"--{flag}={text}: expected comma-separated {cast.__name__}s")
    bad = [x for x in xs if (choices is not None and x not in choices) or (cast is float and not 0 < x < math.inf)]
    if bad or not xs:
        _fail(f"--{flag}={text}: " + (f"{bad[0]!r} is not one of {', '.join(choices)}" if bad and choices else
                                      "expected positive finite numbers" if bad else "empty"))
    return xs


def main(argv=None):
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", action="store_true", help="the paper's toy figure: two step sizes per method")
    p.add_argument("--toy_sweep", action="store_true", help="the toy over a grid of step sizes, several seeds")
    p.add_argument("--adam_step", action="store_true", help="one AdamW step: ‖ΔW‖ of the three methods vs s")
    p.add_argument("--toy_setting", default="paper", choices=list(TOY_SETTINGS), help="paper or normalized")
    p.add_argument("--toy_base", default="sgd", choices=list(reflora.BASES),
                   help="--toy_sweep: gradient descent (the paper's) or AdamW")
    p.add_argument("--methods", default="", help="--toy_sweep: methods (default: all; no scaledgd under adamw)")
    p.add_argument("--etas", default="", help="--toy_sweep: step sizes a,b,... (default: TOY_SWEEP's grid)")
    p.add_argument("--seeds", default="0,1,2", help="--toy_sweep: seeds of (Y, A0, B0)")
    p.add_argument("--iters", type=int, default=None, help="--toy_sweep: iterations (default: TOY_SWEEP's)")
    p.add_argument("--out", default="out-toy", help="--toy_sweep: output directory")
    p.add_argument("--json", default="", help="--toy, --adam_step: write the results here")
    p.add_argument("--png", default="", help="--toy: the figure")
    args = p.parse_args(argv)
    if args.toy + args.toy_sweep + args.adam_step != 1:
        _fail("choose one of --toy, --toy_sweep, --adam_step")
    allowed = TOY_METHODS if args.toy_base == "sgd" else reflora.METHODS
    args.methods = _list("methods", args.methods, str, allowed) if args.methods else list(allowed)
    args.etas = _list("etas", args.etas, float) if args.etas else None
    args.seeds = _list("seeds", args.seeds, int)
    if args.iters is not None and args.iters < 1:
        _fail(f"--iters={args.iters}: must be >= 1")
    if args.toy_sweep and (not args.out.strip() or os.path.isfile(args.out)):
        _fail(f"--out={args.out}: " + ("a file, not a directory" if args.out.strip() else "empty (name a directory)"))
    for k in ("json", "png"):
        f = getattr(args, k)
        if f and (os.path.isdir(f) or not os.path.isdir(os.path.dirname(os.path.abspath(f)))):
            _fail(f"--{k}={f}: expected a file path in an existing directory")
    if args.toy_sweep:
        run_toy_sweep(args)
        return 0
    res = run_toy(args) if args.toy else dict(rows=adam_step())
    if args.json:
        atomic_write(args.json, json.dumps(dict(res, torch=torch.__version__, config=vars(args)), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
