"""The table of five seeds at each lr of extra.py (and, through table(), of mid.py's rounds): validation loss per
seed, and which runs end below the first step's training loss (a run either ends near 1.2-1.55 or above 7), from
out-gd2's run directories with converge.py's own readers. Writes seeds.md and seeds.json here.

    python results/sgd-commonsense-fine/seeds.py
"""
import json
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))
import converge  # noqa: E402
import plot  # noqa: E402
from extra import ARGV, LRS  # noqa: E402


def table(opts, lrs, seeds=range(5), n=64, name="seeds", where=HERE):
    """Validation loss per seed at each method's lrs, and which runs fail (end above the first step's training
    loss, or diverge to non-finite values); printed, and written to name.md / name.json in `where` (name=None:
    not)."""
    ms = lambda x: f"{np.mean(x):.3f} ± {np.std(x, ddof=1):.3f}" if len(x) > 1 else "-"  # noqa: E731
    rows, out = [], {}
    for m, ls in lrs.items():
        for lr in ls:
            val, ok, spikes = [], [], 0
            for s in seeds:
                d, st = converge.run_dir(opts, m, s, lr), converge.run_status(opts, m, lr, s, n)
                assert st in ("done", "diverged"), d
                if st == "diverged":  # train.py stopped at a non-finite loss
                    out[f"{m} {lr:g} s{s}"] = dict(final_loss=None, val_loss=None, failed=True, spike=True)
                    val.append(float("inf"))
                    continue
                r = plot.load_run(d)
                v, loss = converge.dev_metrics(opts, d, r, n)["val_loss"], np.asarray(r["loss"], float)
                failed = bool(v > loss[0])  # the validation loss ends above the first step's training loss
                spike = bool(np.nanmax(loss[10:]) > loss[0])  # a spike above it after step 10
                out[f"{m} {lr:g} s{s}"] = dict(final_loss=converge.final_loss(r, n), val_loss=v, failed=failed,
                                               spike=spike)
                val.append(v)
                ok += [] if failed else [v]
                spikes += spike and not failed
            rows.append(f"| {m} | {lr:g} | {len(ok)}/{len(val)} | {spikes} | {ms(val)} | {ms(ok)} | "
                        + " / ".join(f"{v:.3f}" for v in val) + " |")
    md = ["| method | lr | seeds ending below the initial loss | of those, spiked above it | val loss, "
          f"{len(seeds)} seeds | val loss, those seeds | per seed " + " / ".join(map(str, seeds)) + " |",
          "|---|---|---|---|---|---|---|", *rows]
    print("\n".join(md))
    if name:
        (where / f"{name}.md").write_text("\n".join(md) + "\n")
        (where / f"{name}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    os.chdir(HERE.parents[1])
    table(converge.parse_args(ARGV)[0], LRS)
