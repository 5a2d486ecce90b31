"""The toy under AdamW after its fastest η: the worst final loss over the seeds at every η, per setting and method
(a run stops at 1e-9, six decades below the tolerance), from toy_sweep.json. Writes finals.md beside this file.

    python results/toy-adamw/finals.py
"""
import json
from pathlib import Path

HERE = Path(__file__).parent
rows = []
for setting in ("paper", "normalized"):
    d = json.loads((HERE / setting / "toy_sweep.json").read_text())
    rows += [f"Setting {setting!r}: the worst final loss over seeds {d['seeds']} after {d['iters']} iterations "
             "(inf: a seed diverged; 1e-09: every seed reached the stop).", "",
             "| method | " + " | ".join(f"{e:g}" for e in d["etas"]) + " | η where every seed reaches 1e-9 |",
             "|---|" + "---|" * (len(d["etas"]) + 1)]
    for m in d["summary"]:
        worst = [max(float("inf") if r["final"] is None else r["final"]
                     for r in d["runs"] if r["method"] == m and r["eta"] == e) for e in d["etas"]]
        n = sum(w < 1e-8 for w in worst)
        rows.append(f"| {m} | " + " | ".join(f"{w:.0e}" for w in worst) + f" | {n} of {len(worst)} |")
    rows.append("")
(HERE / "finals.md").write_text("\n".join(rows))
print("\n".join(rows))
