"""
Convergence on a real model, with seeds: LoRA vs RefLoRA vs RefLoRA-S training loss on one GLUE task (or the
commonsense language-modeling loss), the comparison of the paper's training-loss figure (RefLoRA, arXiv
2505.18877) at a CPU-sized budget; with --lrs, each method at its own best learning rate.

    python converge.py [--task=glue] [--glue_task=cola] [--seeds=0,1,2] [--methods=lora,reflora,reflora-s]
                       [--jobs=2] [--out=out-converge] [--name=value ...]  # other --name=value flags go to train.py
    python converge.py --lrs=5e-4,1e-3,2e-3,4e-3,8e-3 [--base=adamw|sgd] ...               # a learning-rate sweep
    python converge.py --task=commonsense --base=sgd --grad_clip=0 --lrs=... ...  # LM loss, plain gradient descent

Every run is one `python train.py` subprocess, all with the same recipe (RECIPE for glue, COMMONSENSE_RECIPE with
--benchmark=False for commonsense; the loss logged every step), the lr included but in a sweep; `--jobs` run at a
time, each with cores/jobs threads. A run whose log already reaches max_iters with its dev evaluation (validation
loss for commonsense) is skipped, so the command can be re-run after an interruption.

One learning rate (no --lrs): OUT/<method>-s<seed> per run, then OUT/curves.json, OUT/loss.png (plot.py's overlay)
and a markdown table of the training loss at every 10 % of the run (mean of the steps within ±5, then mean ± std
over seeds) and the final dev metrics (×100, mean ± std over seeds; std is the sample std, ddof=1).

A sweep (--lrs), the same procedure for every method, the same data order (seed), budget and flags:
  1. the first of --seeds at every lr of the grid, for every method;
  2. a method's best lr: the lowest final training loss, the mean training loss over the last 10 % of the steps;
     a run that diverges (train.py exits 1: non-finite) counts as +inf and is recorded as diverged;
  3. if any method's best lr is at an edge of the grid, the grid grows by the next log-spaced value on that side,
     for every method (one shared grid), and 1-2 repeat, at most MAX_EXTEND times (a best lr still at an edge is
     marked so); a method whose every run diverged extends the grid downwards;
  4. the other seeds (3 or more in all) at each method's best lr.
OUT/<method>-lr<lr>-s<seed> per run (finished and diverged runs are skipped on re-run: a sweep can span sessions),
then OUT/sweep.json (every run: status, final loss, loss curve, validation loss, dev metrics, the step's ‖ΔW‖ at
each log point, wall time), OUT/lr.png (final training loss against lr per method, and the dev metric or the
validation loss), OUT/curves.png (training loss at each method's best lr: mean over seeds, min-max shaded, an EMA
over the faint raw curve) and OUT/sweep.md (the tables, also printed).
"""
import contextlib
import io
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import plot
import train
from data.glue.prepare import TASKS as GLUE_TASKS
from reflora import METHODS
from runstate import verify_checkpoint, write_json
from weights import CheckpointError

ROOT = Path(__file__).resolve().parent

# -----------------------------------------------------------------------------
# defaults: converge.py's own options, then the train.py recipe every method shares
OPTIONS = dict(
    task="glue",  # glue | commonsense (the language-modeling loss: no head, only the LoRA factors train)
    glue_task="cola",
    lrs="",  # a learning-rate grid a,b,c,... (>= 2 values, log-spaced): the sweep; "" = the recipe's one lr
    seeds="0,1,2",  # >= 3 seeds per method for a mean ± std
    methods=",".join(METHODS),
    jobs=2,  # train.py processes at a time; each gets cores // jobs threads
    out="out-converge",
)
# sized for a 2-core CPU: 9 runs of SmolLM2-135M (train.py's default init_from) in about an hour with --jobs=2
RECIPE = dict(
    max_iters=250,  # optimizer steps of batch 16: 4,000 CoLA examples, 47 % of an epoch
    batch_size=16,
    micro_batch_size=16,
    cutoff_len=64,  # CoLA sentences are short: nothing is cut at 64 tokens in practice
    group_by_length=True,  # batches of similar length: ~1.9x less padding on CoLA
    lr=2e-3,  # the same for every method (5e-4 left CoLA at mcc ~0 in 60 steps, README)
    warmup_steps=10,  # 4 % of the steps, then linear decay to 0
    reflora_warmup=25,  # refactoring starts after 10 % of the steps
    log_interval=1,  # training loss at every step
    eval_interval=0,  # one dev evaluation, at the end
    eval_limit=0,  # the full dev set (1,043 for CoLA)
)
# --task=commonsense: the language-modeling loss on the commonsense training mix, validation loss at the end
COMMONSENSE_RECIPE = dict(
    max_iters=100,
    batch_size=8,
    micro_batch_size=8,
    cutoff_len=128,  # the mix's examples are 66-158 tokens (10th-99th percentile)
    group_by_length=True,
    lr=1e-3,
    warmup_steps=10,
    reflora_warmup=10,
    log_interval=1,
    eval_interval=0,  # validation loss (val_set_size held-out examples) at the end
    benchmark=False,  # no generation on the test sets: losses only
)
TABLE_POINTS = 10  # loss at every 10 % of the run
HALF_WINDOW = 5  # each point is the mean over the steps within ±5
SWEEP_POINTS = 4  # the sweep's table: loss at every 25 % of the run
FINAL_FRACTION = 0.1  # final training loss: the mean over the last 10 % of the steps
MAX_EXTEND = 3  # grid extensions at most
EMA_SPAN = 20  # curves.png: EMA over this many steps (fewer for short runs)


def _fail(msg):
    print(f"converge.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv):
    """-> (options, train.py flags {name: value string}); train.py validates its own flags."""
    task = next((a.partition("=")[2] for a in argv if a.startswith("--task=")), OPTIONS["task"])
    if task not in ("glue", "commonsense"):
        _fail(f"--task={task}: expected glue or commonsense")
    recipe = RECIPE if task == "glue" else COMMONSENSE_RECIPE
    opts, flags = dict(OPTIONS), {k: str(v) for k, v in recipe.items()}
    for a in argv:
        if a in ("-h", "--help"):
            print(__doc__ + "\noptions:\n" + "\n".join(f"  --{k}={v}" for k, v in OPTIONS.items()) +
                  f"\ntrain.py recipe for --task={task} (override with --name=value):\n" +
                  "\n".join(f"  --{k}={v}" for k, v in recipe.items()))
            sys.exit(0)
        k, eq, v = a[2:].partition("=")
        if not a.startswith("--") or not eq:
            _fail(f"{a}: expected --name=value")
        if k in ("method", "seed", "out_dir"):
            _fail(f"--{k}: set by converge.py for each run (use --methods, --seeds, --out)")
        (opts if k in OPTIONS else flags)[k] = v
    try:
        opts["jobs"] = int(opts["jobs"])
        opts["seeds"] = [int(s) for s in opts["seeds"].split(",") if s.strip()]
        n = int(flags["max_iters"])
    except ValueError as e:
        _fail(f"--jobs, --seeds and --max_iters take integers ({e})")
    opts["methods"] = [m.strip() for m in opts["methods"].split(",") if m.strip()]
    if opts["jobs"] < 1 or not opts["seeds"] or not opts["methods"]:
        _fail("--jobs must be >= 1 and --seeds, --methods non-empty")
    if bad := [m for m in opts["methods"] if m not in METHODS]:
        _fail(f"--methods: unknown {','.join(bad)} (expected {', '.join(METHODS)})")
    if task == "glue" and opts["glue_task"] not in GLUE_TASKS:
        _fail(f"--glue_task={opts['glue_task']}: expected one of {', '.join(GLUE_TASKS)}")
    if bad := [s for s in opts["seeds"] if not -2 ** 63 <= s < 2 ** 63]:
        _fail(f"--seeds: {bad[0]}: expected integers in [-2**63, 2**63)")
    for k in ("seeds", "methods"):
        if len(set(opts[k])) < len(opts[k]):
            twice = next(x for x in opts[k] if opts[k].count(x) > 1)
            _fail(f"--{k}={','.join(map(str, opts[k]))}: {k[:-1]} {twice} given twice")
    if not opts["out"].strip() or Path(opts["out"]).is_file():
        _fail(f"--out={opts['out']}: " + ("a file, not a directory" if opts["out"].strip() else
                                          "empty (name a directory)"))
    if n < 1:
        _fail(f"--max_iters={n}: converge.py compares a fixed number of steps, give one >= 1")
    if opts["lrs"]:
        try:
            lrs = sorted({float(f"{float(x):.3g}") for x in opts["lrs"].split(",") if x.strip()})
        except ValueError:
            lrs = []
        if len(lrs) < 2 or not all(0 < x < math.inf for x in lrs):
            _fail(f"--lrs={opts['lrs']}: expected 2 or more distinct positive learning rates a,b,...")
        if "lr" in flags and any(a.startswith("--lr=") for a in argv):
            _fail("--lr: set by the sweep for each run (use --lrs)")
        if len(opts["seeds"]) < 3:
            _fail(f"--seeds={','.join(map(str, opts['seeds']))}: a sweep needs 3 or more seeds (mean ± std at the "
                  "best lr)")
        opts["lrs"] = lrs
    if task == "commonsense":
        flags.pop("glue_task", None)
    check_flags(opts, flags)
    return opts, flags


def check_flags(opts, flags):
    """train.py's own checks of the flags every run gets, before any run starts: its one line, as converge.py's."""
    task = [f"--glue_task={opts['glue_task']}"] if opts["task"] == "glue" else []
    argv = [f"--task={opts['task']}", *task, f"--method={opts['methods'][0]}", f"--seed={opts['seeds'][0]}",
            f"--out_dir={run_dir(opts, opts['methods'][0], opts['seeds'][0])}",
            *(f"--{k}={v}" for k, v in flags.items())]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            train.parse_config(argv)
    except SystemExit:
        _fail(err.getvalue().strip().removeprefix("train.py: error: "))


# -----------------------------------------------------------------------------
# runs


def run_dir(opts, method, seed, lr=None):
    return Path(opts["out"]) / (f"{method}-s{seed}" if lr is None else f"{method}-lr{lr:g}-s{seed}")


def finished(out_dir, n_steps, glue_task, task="glue"):
    """True if out_dir's log reaches step n_steps with its dev evaluation and (glue) the eval JSON is there."""
    try:
        train, val = plot.read_log(Path(out_dir) / "log.jsonl")
    except (OSError, plot.RunError):
        return False
    return n_steps in train and n_steps in val and (task != "glue" or
                                                    (Path(out_dir) / f"eval_{glue_task}.json").is_file())


def launch(opts, flags, method, seed, threads, lr=None):
    """One train.py subprocess (stdout and stderr to out_dir/train.out); -> (method, seed, return code, seconds)."""
    d = run_dir(opts, method, seed, lr)
    d.mkdir(parents=True, exist_ok=True)
    has = (d / "state.pt").is_file()
    try:
        saved = verify_checkpoint(d) if has else None
    except CheckpointError:
        saved = None  # damaged: start over
    if saved is not None and saved < int(flags["max_iters"]):  # a checkpoint short of the end: continue it exactly
        extra = ["--resume=True"]
    else:  # nothing saved, or a checkpoint that cannot continue (damaged, or at the end with its log cut): anew
        (d / "log.jsonl").unlink(missing_ok=True)
        extra = ["--overwrite=True"] if has else []
    task = ["--task=glue", f"--glue_task={opts['glue_task']}"] if opts["task"] == "glue" else ["--task=commonsense"]
    flags = flags if lr is None else {**flags, "lr": f"{lr:g}"}
    cmd = [sys.executable, str(ROOT / "train.py"), *task, f"--method={method}", f"--seed={seed}", f"--out_dir={d}",
           *(f"--{k}={v}" for k, v in flags.items()), *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.time()
    with open(d / "train.out", "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    return method, seed, rc, time.time() - t0


# -----------------------------------------------------------------------------
# aggregation (pure: curves in, numbers out)


def table_steps(n_steps, points=TABLE_POINTS):
    """The steps at every 1/points of a run of n_steps (rounded, distinct, >= 1)."""
    return sorted({max(1, round(k * n_steps / points)) for k in range(1, points + 1)})


def mean_std(xs):
    xs = np.asarray(xs, dtype=float)
    return float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else 0.0


def summarize(curves, steps, dev, at, half=HALF_WINDOW):
    """curves {method: {seed: [loss at each of steps]}}, dev {method: {seed: {metric: value}}} ->
    {method: dict(loss={step: (mean, std)}, dev={metric: (mean, std)})} over seeds."""
    out = {}
    for method, by_seed in curves.items():
        wins = {s: [plot.window_mean(steps, y, s, half) for y in by_seed.values()] for s in at}
        metrics = dev.get(method, {})
        keys = sorted(set.intersection(*(set(m) for m in metrics.values()))) if metrics else []
        out[method] = dict(loss={s: mean_std(w) for s, w in wins.items()},
                           dev={k: mean_std([m[k] for m in metrics.values()]) for k in keys})
    return out


def markdown(summary, at):
    """The summary as a markdown table: loss columns (3 decimals), dev metrics ×100 (1 decimal), dev loss."""
    metrics = sorted({k for s in summary.values() for k in s["dev"]} - {"val_loss"})
    head = ["method", *(f"loss @{s}" for s in at), *(f"dev {k} ×100" for k in metrics), "dev loss"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, s in summary.items():
        cells = [method, *(f"{m:.3f} ± {d:.3f}" for m, d in (s["loss"][t] for t in at))]
        cells += [f"{100 * s['dev'][k][0]:.1f} ± {100 * s['dev'][k][1]:.1f}" if k in s["dev"] else "-"
                  for k in metrics]
        cells.append(f"{s['dev']['val_loss'][0]:.3f} ± {s['dev']['val_loss'][1]:.3f}" if "val_loss" in s["dev"]
                     else "-")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def dev_metrics(opts, d, r, n_steps):
    """{metric: value} of a finished run: the GLUE dev metrics (glue) and the validation loss at step n_steps."""
    f = d / f"eval_{opts['glue_task']}.json"
    try:
        ev = json.loads(f.read_text())["metrics"] if opts["task"] == "glue" else {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        _fail(f"{f}: cannot read ({type(e).__name__}: {e})")
    return {**ev, "val_loss": r["val"][n_steps]["val_loss"]}


def collect(opts, n_steps):
    """-> (steps, curves, dev, runs) from the finished run directories (plot.load_run for each)."""
    runs, curves, dev = [], {}, {}
    for method in opts["methods"]:
        for seed in opts["seeds"]:
            d = run_dir(opts, method, seed)
            r = plot.load_run(d)
            r["method"], r["seed"] = method, seed  # as converge.py launched it, even if no config could be read
            runs.append(r)
            dev.setdefault(method, {})[str(seed)] = dev_metrics(opts, d, r, n_steps)
    steps = plot.aggregate(runs)["steps"]  # the steps every run logged (all of them with log_interval=1)
    for r in runs:
        curves.setdefault(r["method"], {})[str(r["seed"])] = r["loss"][np.searchsorted(r["steps"], steps)].tolist()
    return steps.tolist(), curves, dev, runs


# -----------------------------------------------------------------------------
# the learning-rate sweep (--lrs): the procedure of the docstring


def final_loss(run, n_steps, fraction=FINAL_FRACTION):
    """The mean training loss over the last `fraction` of n_steps (the logged steps among them); inf if none."""
    sel = run["steps"] > n_steps - max(1, round(fraction * n_steps))
    return float(run["loss"][sel].mean()) if sel.any() else math.inf


def _mark(d):
    try:
        return json.loads((Path(d) / "sweep_run.json").read_text())
    except (OSError, ValueError):
        return {}


def run_status(opts, method, lr, seed, n_steps):
    """'done' (finished), 'diverged' (recorded so by converge.py at this budget), or None: still to run."""
    d, mark = run_dir(opts, method, seed, lr), _mark(run_dir(opts, method, seed, lr))
    if mark.get("status") == "diverged" and mark.get("max_iters") == n_steps:
        return "diverged"
    return "done" if finished(d, n_steps, opts["glue_task"], opts["task"]) else None


def run_batch(opts, flags, keys, n_steps, threads):
    """Run the (method, lr, seed) not done or diverged yet, `jobs` at a time; each one's status, return code and
    wall time go to its sweep_run.json. A run that fails otherwise ends the sweep (exit 1) after the batch."""
    todo = []
    for m, lr, seed in keys:
        st = run_status(opts, m, lr, seed, n_steps)
        if st:
            print(f"converge: {m} lr {lr:g} seed {seed}: {st} in {run_dir(opts, m, seed, lr)}, skipped")
        elif (m, lr, seed) not in todo:
            todo.append((m, lr, seed))
    print(f"converge: {len(todo)} runs of {n_steps} steps to do, {opts['jobs']} at a time, {threads} threads each",
          flush=True)

    def one(key):
        m, lr, seed = key
        rc, dt = launch(opts, flags, m, seed, threads, lr)[2:]
        d = run_dir(opts, m, seed, lr)
        out = (d / "train.out").read_text(errors="replace") if (d / "train.out").is_file() else ""
        status = ("diverged" if rc == 1 and "non-finite" in out else
                  "done" if rc == 0 and finished(d, n_steps, opts["glue_task"], opts["task"]) else "failed")
        write_json(d / "sweep_run.json", dict(method=m, lr=lr, seed=seed, max_iters=n_steps, status=status, rc=rc,
                                               wall_s=dt))
        return key, status, rc, dt

    failed = []
    with ThreadPoolExecutor(opts["jobs"]) as pool:
        for (m, lr, seed), status, rc, dt in pool.map(one, todo):
            d = run_dir(opts, m, seed, lr)
            print(f"converge: {m} lr {lr:g} seed {seed}: " + (f"{status} in {dt:.0f} s" if status != "failed" else
                  f"train.py exited {rc}: see {d / 'train.out'}"), flush=True)
            if status == "failed":
                failed.append(d)
    if failed:
        print(f"converge.py: {len(failed)} runs did not finish: {', '.join(map(str, failed))}", file=sys.stderr)
        sys.exit(1)


def best_lr(finals):
    """{lr: final loss} -> the lr of the lowest finite final loss, or None if every run diverged."""
    ok = {lr: v for lr, v in finals.items() if math.isfinite(v)}
    return min(ok, key=ok.get) if ok else None


def extend(grid, best):
    """The grid, one log-spaced value longer on each side where some method's best lr (None: all diverged, the
    low side) lies at the edge; unchanged if none does."""
    low = any(b is None or b == grid[0] for b in best.values())
    high = any(b == grid[-1] for b in best.values())
    step = lambda a, b: float(f"{b * b / a:.3g}")  # noqa: E731  (the value after b in the geometric a, b, ...)
    return ([step(grid[1], grid[0])] if low else []) + grid + ([step(grid[-2], grid[-1])] if high else [])


def record(opts, m, lr, seed, n_steps):
    """One run for sweep.json (curves as lists; None where not logged or not defined)."""
    d, st = run_dir(opts, m, seed, lr), run_status(opts, m, lr, seed, n_steps)
    rec = dict(method=m, lr=lr, seed=seed, dir=str(d), status=st or "missing", wall_s=_mark(d).get("wall_s"),
               final_loss=None, val_loss=None, dev={}, steps=[], loss=[], dw=[], dw_rel=[])
    try:
        r = plot.load_run(d)
    except (plot.RunError, OSError):
        return rec, None
    nan_none = lambda a: [None if not np.isfinite(x) else float(x) for x in a]  # noqa: E731
    rec.update(steps=r["steps"].tolist(), loss=nan_none(r["loss"]), dw=nan_none(r["dw"]), dw_rel=nan_none(r["dw_rel"]))
    if st == "done":
        dev = dev_metrics(opts, d, r, n_steps)
        rec.update(final_loss=final_loss(r, n_steps), val_loss=dev.pop("val_loss"), dev=dev)
    return rec, r


def sweep(opts, flags):
    n, out, methods, seeds = int(flags["max_iters"]), Path(opts["out"]), opts["methods"], opts["seeds"]
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // opts["jobs"])
    grid, grids = list(opts["lrs"]), [list(opts["lrs"])]
    k = max(1, round(FINAL_FRACTION * n))
    print(f"converge: sweep of {','.join(methods)} over lr {','.join(f'{x:g}' for x in grid)} (seed {seeds[0]}), "
          f"then seeds {','.join(map(str, seeds[1:]))} at each best lr; final loss = mean training loss over the "
          f"last {k} of {n} steps", flush=True)
    while True:
        run_batch(opts, flags, [(m, lr, seeds[0]) for m in methods for lr in grid], n, threads)
        finals = {m: {lr: _final(opts, m, lr, seeds[0], n) for lr in grid} for m in methods}
        best = {m: best_lr(finals[m]) for m in methods}
        wider = extend(grid, best)
        if wider == grid or len(grids) > MAX_EXTEND:
            break
        grid = wider
        grids.append(list(grid))
        print(f"converge: a best lr at the grid's edge ({', '.join(f'{m} {b}' for m, b in best.items())}): "
              f"grid extended to {','.join(f'{x:g}' for x in grid)}", flush=True)
    run_batch(opts, flags, [(m, best[m], s) for m in methods if best[m] is not None for s in seeds[1:]], n, threads)

    keys = [(m, lr, seeds[0]) for m in methods for lr in grid]
    keys += [(m, best[m], s) for m in methods if best[m] is not None for s in seeds[1:]]
    recs, runs = zip(*(record(opts, *key, n) for key in keys))
    at_edge = {m: best[m] is None or best[m] in (grid[0], grid[-1]) for m in methods}
    first = next((r for r in runs if r is not None and r["config"]), {"config": {}})
    drop = ("method", "seed", "out_dir", "resume", "lr") + (() if opts["task"] == "glue" else ("glue_task",))
    setting = {k_: v for k_, v in first["config"].items() if k_ not in drop}
    setting.update(task=opts["task"], methods=methods, seeds=seeds,
                   **({"glue_task": opts["glue_task"]} if opts["task"] == "glue" else {}))
    res = dict(setting=setting, procedure=__doc__[__doc__.index("A sweep"):].strip(),
               final_loss=f"mean training loss over the last {k} of {n} steps", grid=grid, grids=grids, best=best,
               at_edge=at_edge, runs=list(recs))
    write_json(out / "sweep.json", res)
    md = sweep_markdown(res, n)
    (out / "sweep.md").write_text(md)
    pngs = sweep_pngs(opts, res, [r for r, rec in zip(runs, recs) if r is not None and rec["status"] == "done"
                                  and rec["lr"] == best[rec["method"]]], n, out)
    print(md)
    print(f"wrote {out / 'sweep.json'}, {out / 'sweep.md'}" + "".join(f", {p}" for p in pngs if p) +
          ("" if all(pngs) else " (no pictures: matplotlib is not installed)"))
    return res


def _final(opts, m, lr, seed, n):
    if run_status(opts, m, lr, seed, n) != "done":
        return math.inf  # diverged
    return final_loss(plot.load_run(run_dir(opts, m, seed, lr)), n)


def _dev_key(res):
    """The dev metric of the tables and lr.png: the GLUE task's first metric, or None (commonsense)."""
    task = res["setting"].get("glue_task")
    return GLUE_TASKS[task]["metrics"][0] if task in GLUE_TASKS else None


def sweep_markdown(res, n_steps):
    """The result table at each method's best lr (mean ± std over seeds), then the final loss (and the dev metric
    or validation loss) of the first seed at every lr of the grid."""
    methods, key, runs = res["setting"]["methods"], _dev_key(res), res["runs"]
    at = table_steps(n_steps, SWEEP_POINTS)
    f = lambda ms: "-" if not ms else f"{ms[0]:.3f} ± {ms[1]:.3f}"  # noqa: E731
    e = lambda ms: "-" if not ms else f"{ms[0]:.2e} ± {ms[1]:.1e}"  # noqa: E731
    ms = lambda xs: mean_std(xs) if xs else None  # noqa: E731
    cfg = res["setting"]
    task, grid = cfg.get("task", "?") + ("/" + cfg["glue_task"] if "glue_task" in cfg else ""), res["grid"]
    lines = [f"{task}, base {cfg.get('base', '?')}, {n_steps} steps of batch {cfg.get('batch_size', '?')}, lr grid "
             f"{', '.join(f'{x:g}' for x in grid)} (grids tried: {len(res['grids'])}), seeds "
             f"{', '.join(map(str, cfg['seeds']))}; final loss = "
             f"{res['final_loss']}; ‖ΔW‖ = Σ over pairs of the step's ‖(α/r)ΔW‖_F, mean over the second half of the "
             "steps (then mean ± std over seeds).", "",
             "| method | best lr | " + " | ".join(f"loss @{s}" for s in at) + " | final loss | " +
             (f"dev {key} ×100 | " if key else "") + "val loss | ‖ΔW‖ | ‖ΔW‖ / ‖(α/r)ABᵀ‖ |",
             "|" + "---|" * (6 + len(at) + bool(key))]
    for m in methods:
        b = res["best"][m]
        rs = [r for r in runs if r["method"] == m and r["lr"] == b and r["status"] == "done"]
        if b is None or not rs:
            lines.append(f"| {m} | every lr diverged |" + " |" * (4 + len(at) + bool(key)))
            continue
        half = lambda r, k: [x for s, x in zip(r["steps"], r[k]) if s > n_steps / 2 and x is not None]  # noqa
        loss = [mean_std([plot.window_mean(r["steps"], [np.nan if x is None else x for x in r["loss"]], s,
                                           HALF_WINDOW) for r in rs]) for s in at]
        cells = [m, f"{b:g}" + (" (grid edge)" if res["at_edge"][m] else "") + (f" ({len(rs)} seeds)"),
                 *map(f, loss), f(ms([r["final_loss"] for r in rs]))]
        if key:
            dev = ms([100 * r["dev"][key] for r in rs if key in r["dev"]])
            cells.append("-" if not dev else f"{dev[0]:.1f} ± {dev[1]:.1f}")
        cells += [f(ms([r["val_loss"] for r in rs])), e(ms([np.mean(half(r, "dw")) for r in rs if half(r, "dw")])),
                  e(ms([np.mean(half(r, "dw_rel")) for r in rs if half(r, "dw_rel")]))]
        lines.append("| " + " | ".join(cells) + " |")
    seed0 = cfg["seeds"][0]
    for what, get in [("final training loss", lambda r: f"{r['final_loss']:.3f}"),
                      *([(f"dev {key} ×100", lambda r: f"{100 * r['dev'][key]:.1f}" if key in r["dev"] else "-")]
                        if key else []),
                      ("validation loss", lambda r: f"{r['val_loss']:.3f}")]:
        lines += ["", f"{what[0].upper() + what[1:]} at each lr (seed {seed0}; div: diverged; **best lr**):", "",
                  "| method | " + " | ".join(f"{x:g}" for x in res["grid"]) + " |", "|---|" + "---|" * len(res["grid"])]
        for m in methods:
            cells = []
            for lr in res["grid"]:
                r = next((r for r in runs if (r["method"], r["lr"], r["seed"]) == (m, lr, seed0)), None)
                c = "-" if r is None else "div" if r["status"] == "diverged" else get(r) if r["status"] == "done" \
                    else r["status"]
                cells.append(f"**{c}**" if lr == res["best"][m] else c)
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sweep_pngs(opts, res, best_runs, n_steps, out):
    """OUT/lr.png (final training loss, and the dev metric or validation loss, against lr; seed 0) and
    OUT/curves.png (training loss at each method's best lr over seeds) -> their paths (None without matplotlib)."""
    key, seed0 = _dev_key(res), res["setting"]["seeds"][0]
    points = {}
    for m in res["setting"]["methods"]:
        rs = {r["lr"]: r for r in res["runs"] if r["method"] == m and r["seed"] == seed0}
        get = lambda lr, k: None if rs.get(lr, {}).get("status") != "done" else (  # noqa: E731
            rs[lr]["dev"].get(key) if k == "dev" else rs[lr][k])
        points[m] = dict(lr=res["grid"], best=res["best"][m], **{k: [get(lr, k) for lr in res["grid"]]
                                                                for k in ("final_loss", "val_loss", "dev")})
    ylabels = {"final_loss": f"final training loss ({res['final_loss'].replace('training loss over ', 'of ')})",
               **({"dev": f"dev {key}"} if key else {"val_loss": "validation loss"})}
    title = f"{opts['task']}, base {res['setting'].get('base', '?')}, {n_steps} steps, seed {seed0}"
    lr_png = plot.lr_png(points, out / "lr.png", ylabels, title)
    span = min(EMA_SPAN, max(1, n_steps // 10))
    curves = plot.overlay_png(best_runs, out / "curves.png", smooth=span, title=title.rsplit(",", 1)[0] +
                              ", each method at its best lr", labels={m: f"lr {b:g}" for m, b in res["best"].items()
                                                                      if b is not None}) if best_runs else None
    return lr_png, curves


# -----------------------------------------------------------------------------


def main(argv=None):
    opts, flags = parse_args(sys.argv[1:] if argv is None else argv)
    if opts["lrs"]:
        return sweep(opts, flags)
    n_steps = int(flags["max_iters"])
    out = Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // opts["jobs"])
    todo = []
    for method in opts["methods"]:
        for seed in opts["seeds"]:
            if finished(run_dir(opts, method, seed), n_steps, opts["glue_task"], opts["task"]):
                print(f"converge: {method} seed {seed}: finished in {run_dir(opts, method, seed)}, skipped")
            else:
                todo.append((method, seed))
    print(f"converge: {len(todo)} runs of {n_steps} steps to do, {opts['jobs']} at a time, {threads} threads each",
          flush=True)
    failed = []
    with ThreadPoolExecutor(opts["jobs"]) as pool:
        for method, seed, rc, dt in pool.map(lambda ms: launch(opts, flags, *ms, threads), todo):
            d = run_dir(opts, method, seed)
            print(f"converge: {method} seed {seed}: " + (f"done in {dt:.0f} s" if rc == 0 else
                  f"train.py exited {rc}: see {d / 'train.out'}"), flush=True)
            if rc != 0 or not finished(d, n_steps, opts["glue_task"], opts["task"]):
                failed.append(d)
    if failed:
        print(f"converge.py: {len(failed)} runs did not finish: {', '.join(map(str, failed))}", file=sys.stderr)
        sys.exit(1)

    steps, curves, dev, runs = collect(opts, n_steps)
    # the resolved train.py config shared by all runs (from the first run's state.pt), less what varies per run
    setting = {k: v for k, v in runs[0]["config"].items() if k not in ("method", "seed", "out_dir", "resume")}
    setting.update(methods=opts["methods"], seeds=opts["seeds"], **({"glue_task": opts["glue_task"]}
                                                                    if opts["task"] == "glue" else {}))
    write_json(out / "curves.json", dict(setting=setting, steps=steps, runs=curves, dev=dev))
    png = plot.overlay_png(runs, out / "loss.png", smooth=max(1, n_steps // 25))
    at = table_steps(n_steps)
    print(markdown(summarize(curves, steps, dev, at), at))
    print(f"wrote {out / 'curves.json'}" + (f", {png}" if png else " (no loss.png: matplotlib is not installed)"))


if __name__ == "__main__":
    main()
