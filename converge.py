"""
Convergence on a real model, with seeds: LoRA vs RefLoRA vs RefLoRA-S training loss on one GLUE task, the
comparison of the paper's training-loss figure (RefLoRA, arXiv 2505.18877) at a CPU-sized budget.

    python converge.py [--glue_task=cola] [--seeds=0,1,2] [--methods=lora,reflora,reflora-s] [--jobs=2]
                       [--out=out-converge] [--name=value ...]     # other --name=value flags go to train.py

Every (method, seed) is one `python train.py --task=glue ...` subprocess with out_dir OUT/<method>-s<seed>, all
with the same RECIPE (learning rate included) and the loss logged every step; `--jobs` run at a time, each with
cores/jobs threads. A run whose log already reaches max_iters with its dev evaluation is skipped, so the command
can be re-run after an interruption. Then: OUT/curves.json, OUT/loss.png (plot.py's overlay) and a markdown table
of the training loss at every 10 % of the run (mean of the steps within ±5, then mean ± std over seeds) and the
final dev metrics (×100, mean ± std over seeds; std is the sample std, ddof=1).
"""
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import plot

ROOT = Path(__file__).resolve().parent

# -----------------------------------------------------------------------------
# defaults: converge.py's own options, then the train.py recipe every method shares
OPTIONS = dict(
    glue_task="cola",
    seeds="0,1,2",  # >= 3 seeds per method for a mean ± std
    methods="lora,reflora,reflora-s",
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
TABLE_POINTS = 10  # loss at every 10 % of the run
HALF_WINDOW = 5  # each point is the mean over the steps within ±5


def _fail(msg):
    print(f"converge.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv):
    """-> (options, train.py flags {name: value string}); train.py validates its own flags."""
    opts, flags = dict(OPTIONS), {k: str(v) for k, v in RECIPE.items()}
    for a in argv:
        if a in ("-h", "--help"):
            print(__doc__ + "\noptions:\n" + "\n".join(f"  --{k}={v}" for k, v in OPTIONS.items()) +
                  "\ntrain.py recipe (override with --name=value):\n" +
                  "\n".join(f"  --{k}={v}" for k, v in RECIPE.items()))
            sys.exit(0)
        k, eq, v = a[2:].partition("=")
        if not a.startswith("--") or not eq:
            _fail(f"{a}: expected --name=value")
        if k in ("task", "method", "seed", "out_dir"):
            _fail(f"--{k}: set by converge.py for each run (use --glue_task, --methods, --seeds, --out)")
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
    if n < 1:
        _fail(f"--max_iters={n}: converge.py compares a fixed number of steps, give one >= 1")
    return opts, flags


# -----------------------------------------------------------------------------
# runs


def run_dir(opts, method, seed):
    return Path(opts["out"]) / f"{method}-s{seed}"


def finished(out_dir, n_steps, glue_task):
    """True if out_dir's log reaches step n_steps with its dev evaluation and the eval JSON is there."""
    try:
        train, val = plot.read_log(Path(out_dir) / "log.jsonl")
    except (OSError, plot.RunError):
        return False
    return n_steps in train and n_steps in val and (Path(out_dir) / f"eval_{glue_task}.json").is_file()


def launch(opts, flags, method, seed, threads):
    """One train.py subprocess (stdout and stderr to out_dir/train.out); -> (method, seed, return code, seconds)."""
    d = run_dir(opts, method, seed)
    d.mkdir(parents=True, exist_ok=True)
    if (d / "state.pt").is_file():  # a checkpoint short of the end: continue it exactly
        extra = ["--resume=True"]
    else:  # nothing saved: start over, without the old partial log
        (d / "log.jsonl").unlink(missing_ok=True)
        extra = []
    cmd = [sys.executable, str(ROOT / "train.py"), "--task=glue", f"--glue_task={opts['glue_task']}",
           f"--method={method}", f"--seed={seed}", f"--out_dir={d}", *(f"--{k}={v}" for k, v in flags.items()), *extra]
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


def collect(opts, n_steps):
    """-> (steps, curves, dev, runs) from the finished run directories (plot.load_run for each)."""
    runs, curves, dev = [], {}, {}
    for method in opts["methods"]:
        for seed in opts["seeds"]:
            d = run_dir(opts, method, seed)
            r = plot.load_run(d)
            r["method"], r["seed"] = method, seed  # as converge.py launched it, even if no config could be read
            runs.append(r)
            ev = json.loads((d / f"eval_{opts['glue_task']}.json").read_text())
            dev.setdefault(method, {})[str(seed)] = {**ev["metrics"], "val_loss": r["val"][n_steps]["val_loss"]}
    steps = plot.aggregate(runs)["steps"]  # the steps every run logged (all of them with log_interval=1)
    for r in runs:
        curves.setdefault(r["method"], {})[str(r["seed"])] = r["loss"][np.searchsorted(r["steps"], steps)].tolist()
    return steps.tolist(), curves, dev, runs


def _write_json(path, obj):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# -----------------------------------------------------------------------------


def main(argv=None):
    opts, flags = parse_args(sys.argv[1:] if argv is None else argv)
    n_steps = int(flags["max_iters"])
    out = Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // opts["jobs"])
    todo = []
    for method in opts["methods"]:
        for seed in opts["seeds"]:
            if finished(run_dir(opts, method, seed), n_steps, opts["glue_task"]):
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
            if rc != 0 or not finished(d, n_steps, opts["glue_task"]):
                failed.append(d)
    if failed:
        print(f"converge.py: {len(failed)} runs did not finish: {', '.join(map(str, failed))}", file=sys.stderr)
        sys.exit(1)

    steps, curves, dev, runs = collect(opts, n_steps)
    # the resolved train.py config shared by all runs (from the first run's state.pt), less what varies per run
    setting = {k: v for k, v in runs[0]["config"].items() if k not in ("method", "seed", "out_dir", "resume")}
    setting.update(glue_task=opts["glue_task"], methods=opts["methods"], seeds=opts["seeds"])
    _write_json(out / "curves.json", dict(setting=setting, steps=steps, runs=curves, dev=dev))
    png = plot.overlay_png(runs, out / "loss.png", smooth=max(1, n_steps // 50))
    at = table_steps(n_steps)
    print(markdown(summarize(curves, steps, dev, at), at))
    print(f"wrote {out / 'curves.json'}" + (f", {png}" if png else " (no loss.png: matplotlib is not installed)"))


if __name__ == "__main__":
    main()
