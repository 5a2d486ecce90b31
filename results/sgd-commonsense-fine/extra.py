"""Five seeds at the two grid points below each method's seed-0 best, with converge.py's recipe and flags
(the sweep itself ran five seeds at the seed-0 best only). Finished runs in out-gd2 are skipped.

    python results/sgd-commonsense-fine/extra.py
"""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import converge  # noqa: E402

ARGV = ("--task=commonsense --data_dir=../shared/data/commonsense --base=sgd --grad_clip=0 "
        "--lrs=0.1,0.125,0.16,0.2,0.25,0.32,0.4,0.5,0.64 --seeds=0,1,2,3,4 --jobs=2 --out=out-gd2 --dtype=bfloat16 "
        "--lora_r=8 --lora_alpha=8 --lora_dropout=0 --batch_size=8 --micro_batch_size=8 --cutoff_len=128 "
        "--max_iters=64 --warmup_steps=5 --reflora_warmup=5").split()
LRS = {"lora": (0.2, 0.25, 0.32), "reflora": (0.32, 0.4, 0.5), "reflora-s": (0.32, 0.4, 0.5)}  # best last

if __name__ == "__main__":
    os.chdir(ROOT)
    opts, flags = converge.parse_args(ARGV)
    runs = [(m, lr, s) for m, lrs in LRS.items() for lr in lrs[:-1] for s in (1, 2, 3, 4)]
    converge.run_batch(opts, flags, runs, 64, max(1, (os.cpu_count() or 1) // opts["jobs"]))
