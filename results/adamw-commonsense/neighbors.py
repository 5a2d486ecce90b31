"""AdamW on the commonsense language-modeling loss, step 2 of 2: five seeds also at the two grid neighbours of each
method's seed-0 best, then one pick per method by a rule fixed before these runs: the lowest five-seed mean
validation loss among those three lrs where no seed fails (seeds.py's table: a failed run ends above the first
step's training loss, or diverges). Step 1 is converge.py with ARGV (seed 0 over the grid, five seeds at its best);
finished runs in out-adamw-cs are skipped. Writes seeds.md / seeds.json (every lr) and picks.md (converge.py's
sweep table at the picked lrs) here. Both commands are in RESULTS.md.

    python results/adamw-commonsense/neighbors.py
"""
import json
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE.parent / "sgd-commonsense-fine"))
import converge  # noqa: E402
from seeds import table  # noqa: E402

ARGV = ("--task=commonsense --data_dir=../shared/data/commonsense --base=adamw "
        "--lrs=4e-4,1e-3,2.5e-3,6.25e-3,1.5625e-2 --seeds=0,1,2,3,4 --jobs=2 --out=out-adamw-cs --dtype=bfloat16 "
        "--lora_r=8 --lora_alpha=8 --lora_dropout=0 --batch_size=8 --micro_batch_size=8 --cutoff_len=128 "
        "--max_iters=64 --warmup_steps=5 --reflora_warmup=5 --weight_decay=0").split()
N, SEEDS = 64, range(5)

if __name__ == "__main__":
    os.chdir(ROOT)
    opts, flags = converge.parse_args(ARGV)
    res = json.loads((Path(opts["out"]) / "sweep.json").read_text())  # step 1's grid and seed-0 bests
    grid, lrs = res["grid"], {}
    for m in opts["methods"]:
        i = grid.index(res["best"][m])
        lrs[m] = tuple(grid[j] for j in (i - 1, i, i + 1) if 0 <= j < len(grid))
    converge.run_batch(opts, flags, [(m, lr, s) for m, ls in lrs.items() for lr in ls for s in SEEDS], N,
                       max(1, (os.cpu_count() or 1) // opts["jobs"]))
    table(opts, lrs, SEEDS, N, where=HERE)
    per_run = json.loads((HERE / "seeds.json").read_text())
    pick = {}
    for m, ls in lrs.items():
        ok = [lr for lr in ls if not any(per_run[f"{m} {lr:g} s{s}"]["failed"] for s in SEEDS)]
        pick[m] = min(ok, key=lambda lr: np.mean([per_run[f"{m} {lr:g} s{s}"]["val_loss"] for s in SEEDS]),
                      default=None)
    keys = [(m, pick[m], s) for m in opts["methods"] if pick[m] is not None for s in SEEDS]
    have = {(r["method"], r["lr"], r["seed"]) for r in res["runs"]}  # step 1's: the seed-0 grid stays in the table
    res.update(best=pick, at_edge={m: pick[m] in (None, grid[0], grid[-1]) for m in pick},
               runs=res["runs"] + [converge.record(opts, *key, N)[0] for key in keys if key not in have])
    md = converge.sweep_markdown(res, N)
    (HERE / "picks.md").write_text(md)
    print(md)
