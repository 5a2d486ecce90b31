"""Five seeds at one more lr per method, in rounds: the geometric midpoint between the lr that (d)'s rule picks (the
lowest five-seed mean where no seed fails) and the lowest lr above it where a seed failed, the same rule for each
method; round 2 from round 1's results. converge.py's recipe and flags (extra.py's); finished runs in out-gd2 are
skipped. Then a table per round: mid.md / mid.json, mid2.md / mid2.json here.

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

ROUNDS = {"mid": {"lora": (0.28,), "reflora": (0.45,), "reflora-s": (0.36,)},  # √(.25·.32), √(.4·.5), √(.32·.4)
          "mid2": {"lora": (0.3,), "reflora": (0.42,), "reflora-s": (0.34,)}}  # √(.28·.32), √(.4·.45), √(.32·.36)

if __name__ == "__main__":
    os.chdir(HERE.parents[1])
    opts, flags = converge.parse_args(ARGV)
    runs = [(m, lr, s) for lrs in ROUNDS.values() for m, ls in lrs.items() for lr in ls for s in range(5)]
    converge.run_batch(opts, flags, runs, 64, max(1, (os.cpu_count() or 1) // opts["jobs"]))
    for name, lrs in ROUNDS.items():
        table(opts, lrs, name=name)
