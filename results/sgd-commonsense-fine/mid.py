"""Five seeds at one more lr per method: the geometric midpoint between the lr that (d)'s rule picked (the lowest
five-seed mean where no seed fails) and the grid point above it (where seeds fail), the same rule for each method.
converge.py's recipe and flags (extra.py's); finished runs in out-gd2 are skipped. Then the table: mid.md, mid.json
here.

    python results/sgd-commonsense-fine/mid.py
"""
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))
import converge  # noqa: E402
from extra import ARGV  # noqa: E402
from seeds import table  # noqa: E402

MID = {"lora": (0.28,), "reflora": (0.45,), "reflora-s": (0.36,)}  # √(0.25·0.32), √(0.4·0.5), √(0.32·0.4)

if __name__ == "__main__":
    os.chdir(HERE.parents[1])
    opts, flags = converge.parse_args(ARGV)
    runs = [(m, lr, s) for m, lrs in MID.items() for lr in lrs for s in range(5)]
    converge.run_batch(opts, flags, runs, 64, max(1, (os.cpu_count() or 1) // opts["jobs"]))
    table(opts, MID, name="mid")
