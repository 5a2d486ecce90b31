"""
Loss curves from train.py's out_dir/log.jsonl: one run's loss.png, or several runs overlaid, grouped by method, in
the style of the paper's training-loss figure (RefLoRA, Zhang, Li, Giannakis, NeurIPS 2025, arXiv 2505.18877:
training loss on GLUE, LoRA vs RefLoRA vs RefLoRA-S).

    python plot.py out-lora out-reflora out-reflora-s [--out=loss.png] [--smooth=N] [--spread=minmax|std]

Runs of one method (several seeds) are drawn as the mean over seeds with the min-max (or ±1 std) band shaded;
with --smooth=N > 1 the curves are an exponential moving average over N steps (α = 2/(N + 1)) drawn over the
faint raw mean, the window stated in the legend.
The x axis is optimizer steps: log.jsonl does not record the training-set size, so epochs are not derivable.
The statistics below need numpy only; matplotlib is imported when a picture is drawn, and when it is missing
loss_png returns None and the CLI exits 2 with one line.
"""
import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from runstate import run_config

METHODS = {"lora": ("LoRA", "C0"), "reflora": ("RefLoRA", "C3"), "reflora-s": ("RefLoRA-S", "C4")}  # paper's colors


class RunError(ValueError):
    """A run directory that cannot be read: the message names the path."""


# -----------------------------------------------------------------------------
# reading runs (no matplotlib)


def read_log(path):
    """log.jsonl -> (train {iter: loss}, val {iter: record without iter}). train.py appends, so a resumed or
    re-run job repeats iters: the later record of an iter wins."""
    train, val = {}, {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            it = int(rec["iter"])
            loss = float(rec["loss"]) if "loss" in rec else None
            vloss = float(rec["val_loss"]) if "val_loss" in rec else None
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
            raise RunError(f"{path}:{n}: not a train.py log record") from None
        if loss is not None:
            train[it] = loss
        if vloss is not None:
            val[it] = {**{k: v for k, v in rec.items() if k != "iter"}, "val_loss": vloss}
    return train, val


def read_series(path, key):
    """{iter: rec[key]} of log.jsonl's training records that carry key (the later record of an iter wins)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "loss" in rec and key in rec:
            out[int(rec["iter"])] = rec[key]
    return out


def read_config(out_dir):
    """The run's resolved config: out_dir/config.json if there is one, else the one saved in state.pt; {} if none."""
    out_dir = Path(out_dir)
    f = out_dir / "config.json" if (out_dir / "config.json").is_file() else out_dir / "state.pt"
    if not f.is_file():
        return {}
    try:
        if f.suffix == ".json":
            cfg = json.loads(f.read_text())
        else:
            cfg = run_config(torch.load(f, map_location="cpu", weights_only=True))
        if not isinstance(cfg, dict):
            raise TypeError("not a dict")
    except Exception as e:  # damaged JSON, a truncated zip, a refused pickle: many kinds
        first = (str(e).strip().splitlines() or [""])[0][:120]
        raise RunError(f"{f}: cannot read the run's config ({type(e).__name__}: {first})") from None
    return dict(cfg)


def load_run(out_dir):
    """-> dict(path, method, seed, config, steps, loss, val, dw, dw_rel): the training loss at each logged step
    (sorted), the validation records, the step's ‖ΔW‖ and its ratio to ‖(α/r)ABᵀ‖ at each step (NaN where not
    logged); RunError naming the path if it is not a run with training records."""
    out_dir = Path(out_dir)
    log = out_dir / "log.jsonl"
    if not out_dir.is_dir():
        raise RunError(f"{out_dir}: no such run directory")
    if not log.is_file():
        raise RunError(f"{log}: no such file (not a train.py out_dir?)")
    train, val = read_log(log)
    if not train:
        raise RunError(f"{log}: no training-loss records")
    cfg = read_config(out_dir)
    steps = sorted(train)
    dw, rel = read_series(log, "dw"), read_series(log, "dw_rel")
    col = lambda d: np.array([np.nan if d.get(s) is None else float(d[s]) for s in steps])  # noqa: E731
    return dict(path=str(out_dir), method=cfg.get("method", out_dir.name), seed=cfg.get("seed"), config=cfg,
                steps=np.array(steps), loss=np.array([train[s] for s in steps]), val=val, dw=col(dw), dw_rel=col(rel))


def group(runs):
    """{method: [runs]}: known methods in the paper's order (lora, reflora, reflora-s), then others as given."""
    out = {}
    for r in sorted(runs, key=lambda r: list(METHODS).index(r["method"]) if r["method"] in METHODS else len(METHODS)):
        out.setdefault(r["method"], []).append(r)
    return out


def aggregate(runs):
    """Curves of several seeds on the steps all of them logged -> dict(steps, mean, std, min, max, n).
    std is the sample standard deviation over seeds (ddof=1; 0 for a single run)."""
    steps = sorted(set.intersection(*(set(r["steps"].tolist()) for r in runs)))
    if not steps:
        raise RunError(f"{', '.join(r['path'] for r in runs)}: no logged step in common")
    Y = np.stack([r["loss"][np.searchsorted(r["steps"], steps)] for r in runs])  # (seeds, steps)
    return dict(steps=np.array(steps), mean=Y.mean(0), std=Y.std(0, ddof=1) if len(Y) > 1 else np.zeros(len(steps)),
                min=Y.min(0), max=Y.max(0), n=len(Y))


def moving_average(y, n):
    """Centered mean over a window of n points (shorter at the edges); n <= 1 returns y."""
    y = np.asarray(y, dtype=float)
    if n <= 1 or len(y) == 0:
        return y
    c = np.concatenate([[0.0], np.cumsum(y)])
    i = np.arange(len(y))
    lo, hi = np.maximum(i - (n - 1) // 2, 0), np.minimum(i + n // 2 + 1, len(y))
    return (c[hi] - c[lo]) / (hi - lo)


def ema(y, n):
    """Exponential moving average over a window of n points, α = 2/(n + 1), started at y[0]; n <= 1 returns y."""
    y = np.asarray(y, dtype=float)
    if n <= 1 or len(y) == 0:
        return y
    a, out = 2 / (n + 1), np.empty(len(y))
    out[0] = y[0]
    for i in range(1, len(y)):
        out[i] = (1 - a) * out[i - 1] + a * y[i]
    return out


def window_mean(steps, y, at, half=5):
    """Mean of y over the logged steps within [at - half, at + half] (NaN if none)."""
    steps, y = np.asarray(steps), np.asarray(y, dtype=float)
    sel = (steps >= at - half) & (steps <= at + half)
    return float(y[sel].mean()) if sel.any() else float("nan")


# -----------------------------------------------------------------------------
# pictures (matplotlib, optional)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _axes(plt):
    style = "seaborn-v0_8-darkgrid"  # the paper's figure: grey background, white grid
    with plt.style.context(style if style in plt.style.available else "default"):
        fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=150)
    ax.set_facecolor("#eaeaf2")
    ax.grid(True, color="white")
    ax.set_axisbelow(True)
    for s in ax.spines.values():
        s.set_visible(False)
    return fig, ax


def _save(fig, plt, path):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.tight_layout()
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OSError(f"{path}: cannot write it ({e.strerror})") from None
    finally:
        plt.close(fig)
    return path


def loss_png(out_dir, path=None):
    """out_dir/loss.png: training loss at every logged step (with a moving average when logged every step) and
    validation loss, against step. -> the path, or None when matplotlib is not installed."""
    plt = _pyplot()
    if plt is None:
        return None
    run = load_run(out_dir)
    fig, ax = _axes(plt)
    s, y = run["steps"], run["loss"]
    every_step = len(s) > 1 and bool((np.diff(s) == 1).all())
    ax.plot(s, y, color="C0", lw=1, alpha=0.35 if every_step and len(s) >= 20 else 1, label="train loss")
    if every_step and len(s) >= 20:
        n = max(5, len(s) // 20)
        ax.plot(s, ema(y, n), color="C0", lw=1.8, label=f"train loss, EMA over {n} steps")
    if run["val"]:
        v = sorted(run["val"])
        ax.plot(v, [run["val"][i]["val_loss"] for i in v], "o-", color="C3", ms=4, label="validation loss")
    ax.set(xlabel="Step", ylabel="Loss", title=f"{run['method']} ({Path(out_dir).name})")
    ax.legend(frameon=False)
    return _save(fig, plt, path or Path(out_dir) / "loss.png")


def overlay_png(runs, path, smooth=1, spread="minmax", labels=None, title=None):
    """Several runs on one axes, grouped by method: mean over seeds, min-max or ±std band; smooth > 1: an EMA over
    that many steps drawn over the faint raw mean. labels: {method: text after its name}. -> the path or None."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = _axes(plt)
    for k, (method, rs) in enumerate(group(runs).items()):
        a = aggregate(rs)
        label, color = METHODS.get(method, (method, f"C{5 + k}"))
        label += (f" {labels[method]}" if labels and method in labels else "") + \
            (f" ({a['n']} seeds)" if a["n"] > 1 else "") + (f", EMA over {smooth} steps" if smooth > 1 else "")
        lo, hi = (a["min"], a["max"]) if spread == "minmax" else (a["mean"] - a["std"], a["mean"] + a["std"])
        if smooth > 1:
            ax.plot(a["steps"], a["mean"], color=color, lw=0.8, alpha=0.3)
        ax.plot(a["steps"], ema(a["mean"], smooth), color=color, lw=1.8, label=label)
        if a["n"] > 1:
            ax.fill_between(a["steps"], ema(lo, smooth), ema(hi, smooth), color=color, alpha=0.2, lw=0)
    ax.set(xlabel="Step", ylabel="Loss", title=title)
    ax.set_xlim(left=0)
    ax.legend(frameon=False)
    return _save(fig, plt, path)


def lr_png(points, path, ylabels, title=None):
    """The learning-rate sensitivity plot: one panel per entry of ylabels (key: y label), y against lr (log x)
    per method. points {method: {"lr": [...], key: [...] (None: diverged, drawn as × at the top), "best": lr}}.
    -> the path or None."""
    plt = _pyplot()
    if plt is None:
        return None
    keys = [k for k in ylabels if any(any(v is not None for v in p.get(k, [])) for p in points.values())]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5.6 * len(keys), 4.4), dpi=150, squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.set_facecolor("#eaeaf2")
        ax.grid(True, color="white")
        ys = [v for p in points.values() for v in p.get(key, []) if v is not None]
        top = max(ys) if ys else 1.0
        for k, (method, p) in enumerate(sorted(points.items(), key=lambda mp: list(METHODS).index(mp[0])
                                               if mp[0] in METHODS else len(METHODS))):
            label, color = METHODS.get(method, (method, f"C{5 + k}"))
            lr, y = np.array(p["lr"]), p.get(key, [])
            ok = np.array([v is not None for v in y], dtype=bool)
            ax.plot(lr[ok], [v for v in y if v is not None], "o-", color=color, ms=4, label=label)
            ax.plot(lr[~ok], [top] * int((~ok).sum()), "x", color=color, ms=8, mew=2)
            if p.get("best") in p["lr"] and y[p["lr"].index(p["best"])] is not None:
                ax.plot([p["best"]], [y[p["lr"].index(p["best"])]], "*", color=color, ms=13)
        ax.set(xscale="log", xlabel="learning rate", ylabel=ylabels[key])
        ax.legend(frameon=False, fontsize=8, title="★ best lr, × diverged", title_fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, plt, path)


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    opts, dirs = dict(out="loss.png", smooth="1", spread="minmax"), []
    for a in argv:
        if a in ("-h", "--help"):
            print(__doc__)
            return 0
        if a.startswith("--"):
            k, eq, v = a[2:].partition("=")
            if k not in opts or not eq:
                return _fail(f"{a}: expected one of --out=PATH.png, --smooth=N, --spread=minmax|std")
            opts[k] = v
        else:
            dirs.append(a)
    if not dirs:
        return _fail("no run directories given (usage: python plot.py OUT_DIR [OUT_DIR ...] [--out=loss.png])")
    if not opts["smooth"].isdigit() or int(opts["smooth"]) < 1:
        return _fail(f"--smooth={opts['smooth']}: expected a whole number >= 1")
    if opts["spread"] not in ("minmax", "std"):
        return _fail(f"--spread={opts['spread']}: expected minmax or std")
    out = Path(opts["out"])
    if not opts["out"].strip() or out.is_dir() or not out.parent.is_dir():
        return _fail(f"--out={opts['out']}: expected a file path in an existing directory")
    try:
        runs = [load_run(d) for d in dirs]
        if _pyplot() is None:
            return _fail("matplotlib is not installed: pip install matplotlib to draw pictures")
        print(overlay_png(runs, out, int(opts["smooth"]), opts["spread"]))
    except (RunError, OSError) as e:
        return _fail(str(e))
    return 0


def _fail(msg):
    print(f"plot.py: error: {msg}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
