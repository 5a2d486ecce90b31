"""plot.py and converge.py: reading train.py logs, the seed statistics checked by hand on synthetic logs, the CLI's
one-line errors, pictures when matplotlib is present, and converge.py end to end on the tiny model."""
import importlib.util
import io
import json
import math
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

import converge
import plot
import train
from helpers import ROOT, write_commonsense

N = 40  # steps of the synthetic runs


def loss_at(t, seed, method):
    # the synthetic curve: linear in the step, so a full ±5 window mean is the value at its center
    return 3 - 0.02 * t + 0.1 * seed + (0.5 if method == "reflora" else 0.0)


def fake_run(d, method, seed, mcc, state_pt=False, glue_task="cola"):
    """An out_dir as train.py leaves it after N steps (log every step, one dev evaluation at the end)."""
    d.mkdir(parents=True)
    recs = [dict(iter=t, loss=loss_at(t, seed, method), lr=1e-3) for t in range(1, N + 1)]
    recs.append(dict(iter=N, val_loss=0.5 + seed, mcc=mcc, score=mcc))
    (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / f"eval_{glue_task}.json").write_text(json.dumps(dict(task=glue_task, metrics=dict(mcc=mcc, score=mcc))))
    cfg = dict(method=method, seed=seed, task="glue", glue_task=glue_task, lr=1e-3, max_iters=N)
    if state_pt:  # the real format: the config inside state.pt
        torch.save(dict(config=cfg, iter_num=N), d / "state.pt")
    else:
        (d / "config.json").write_text(json.dumps(cfg))


@pytest.fixture
def runs(tmp_path):
    out = tmp_path / "out"
    for method in ("lora", "reflora"):
        for seed, mcc in zip((0, 1, 2), (0.1, 0.2, 0.3)):
            fake_run(out / f"{method}-s{seed}", method, seed, mcc + (0.3 if method == "reflora" else 0),
                     state_pt=seed == 0)
    return out


# -----------------------------------------------------------------------------
# reading and statistics


def test_read_log_later_record_wins(tmp_path):
    # train.py appends: a resumed run logs iters 2-3 again; the later records are the ones kept
    p = tmp_path / "log.jsonl"
    recs = [dict(iter=1, loss=1.0), dict(iter=2, loss=2.0), dict(iter=3, loss=3.0), dict(iter=2, loss=5.0),
            dict(iter=3, loss=6.0), dict(iter=3, val_loss=0.7, mcc=0.1)]
    p.write_text("\n".join(map(json.dumps, recs)) + "\n")
    train, val = plot.read_log(p)
    assert train == {1: 1.0, 2: 5.0, 3: 6.0}
    assert val == {3: dict(val_loss=0.7, mcc=0.1)}


def test_load_run_reads_config_from_state_pt_and_json(runs):
    a, b = plot.load_run(runs / "lora-s0"), plot.load_run(runs / "reflora-s1")  # state.pt, config.json
    assert (a["method"], a["seed"], b["method"], b["seed"]) == ("lora", 0, "reflora", 1)
    assert a["steps"].tolist() == list(range(1, N + 1))
    assert b["loss"][9] == pytest.approx(3 - 0.2 + 0.1 + 0.5)


def test_group_and_aggregate_by_hand(runs):
    rs = [plot.load_run(d) for d in sorted(runs.iterdir(), reverse=True)]  # reflora first on the command line
    g = plot.group(rs)
    assert list(g) == ["lora", "reflora"] and all(len(v) == 3 for v in g.values())
    a = plot.aggregate(g["lora"])
    t = np.arange(1, N + 1)
    # seeds 0, 1, 2 add 0, 0.1, 0.2: mean +0.1, sample std 0.1, min +0, max +0.2
    assert np.allclose(a["mean"], 3 - 0.02 * t + 0.1)
    assert np.allclose(a["std"], 0.1)
    assert np.allclose(a["min"], 3 - 0.02 * t) and np.allclose(a["max"], 3 - 0.02 * t + 0.2)


def test_aggregate_keeps_common_steps():
    r = lambda s, y: dict(path="x", steps=np.array(s), loss=np.array(y, dtype=float))
    a = plot.aggregate([r([1, 2, 3, 4], [1, 2, 3, 4]), r([2, 4, 6], [10, 20, 30])])
    assert a["steps"].tolist() == [2, 4] and a["mean"].tolist() == [6, 12] and a["n"] == 2


def test_moving_average_and_window_mean():
    assert plot.moving_average([1, 2, 3, 4, 5], 3).tolist() == [1.5, 2, 3, 4, 4.5]
    assert plot.window_mean(range(1, 11), np.arange(1, 11), at=2, half=1) == 2
    assert plot.window_mean(range(1, 11), np.arange(1, 11), at=10, half=5) == 7.5  # steps 5-10 only


# -----------------------------------------------------------------------------
# converge.py's numbers from finished runs (no training: every run is skipped)


def test_converge_table_and_json_by_hand(runs, capsys, monkeypatch):
    monkeypatch.setattr(converge.subprocess, "run", lambda *a, **k: pytest.fail("a finished run was trained again"))
    converge.main([f"--out={runs}", "--methods=lora,reflora", f"--max_iters={N}"])
    printed = capsys.readouterr().out
    assert printed.count("skipped") == 6 and "0 runs" in printed
    assert converge.table_steps(N) == list(range(4, N + 1, 4))
    cur = json.loads((runs / "curves.json").read_text())
    assert cur["steps"] == list(range(1, N + 1))
    assert cur["runs"]["reflora"]["2"] == pytest.approx([loss_at(t, 2, "reflora") for t in range(1, N + 1)])
    assert cur["dev"]["lora"]["1"] == dict(mcc=0.2, score=0.2, val_loss=1.5)
    assert cur["setting"]["lr"] == 1e-3 and cur["setting"]["seeds"] == [0, 1, 2]
    cells = [[c.strip() for c in l.strip().strip("|").split("|")] for l in printed.splitlines() if l.startswith("| ")]
    rows = {r[0]: r for r in cells}
    head = rows["method"]
    col = lambda name: head.index(name)
    # step 4: window 1-9, mean step 5: 3 - 0.1 + 0.1 (mean seed offset) = 3.0, std over seeds 0.1
    assert rows["lora"][col("loss @4")] == "3.000 ± 0.100"
    # step 20: window 15-25: 3 - 0.4 + 0.1 = 2.7; reflora +0.5
    assert rows["lora"][col("loss @20")] == "2.700 ± 0.100"
    assert rows["reflora"][col("loss @20")] == "3.200 ± 0.100"
    # step 40: window 35-40, mean step 37.5: 3 - 0.75 + 0.1 = 2.35
    assert rows["lora"][col("loss @40")] == "2.350 ± 0.100"
    # dev mcc 0.1, 0.2, 0.3 (+0.3 for reflora): 20.0 ± 10.0 and 50.0 ± 10.0; dev loss 0.5, 1.5, 2.5
    assert rows["lora"][col("dev mcc ×100")] == "20.0 ± 10.0"
    assert rows["reflora"][col("dev mcc ×100")] == "50.0 ± 10.0"
    assert rows["lora"][col("dev loss")] == "1.500 ± 1.000"


def test_converge_rejects_bad_flags(capsys):
    for argv, needle in [(["--method=lora"], "--method"), (["--max_iters=0"], "--max_iters=0"), (["lr"], "lr")]:
        with pytest.raises(SystemExit) as e:
            converge.parse_args(argv)
        assert e.value.code == 2 and needle in capsys.readouterr().err


# -----------------------------------------------------------------------------
# the CLI and pictures


def test_plot_cli_errors_name_the_path(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "log.jsonl").write_text("")
    for d, needle in [(tmp_path / "nope", "no such run directory"), (tmp_path / "empty", "no training-loss")]:
        assert plot.main([str(d)]) == 2
        err = capsys.readouterr().err.strip()
        assert str(d) in err and needle in err and "\n" not in err


def test_without_matplotlib(runs, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert plot.loss_png(runs / "lora-s0") is None and not (runs / "lora-s0" / "loss.png").exists()
    assert plot.main([str(runs / "lora-s0")]) == 2
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_pngs_written(runs, tmp_path):
    pytest.importorskip("matplotlib")
    png = b"\x89PNG\r\n\x1a\n"
    assert plot.loss_png(runs / "lora-s1").read_bytes()[:8] == png
    out = tmp_path / "all.png"
    assert plot.main([*map(str, sorted(runs.iterdir())), f"--out={out}", "--smooth=3", "--spread=std"]) == 0
    assert out.read_bytes()[:8] == png and not (tmp_path / "all.png.tmp").exists()


# -----------------------------------------------------------------------------
# end to end on the tiny model: real train.py runs (in this process, to skip 4 interpreter starts)

GLUE = ROOT.parent / "shared" / "data" / "glue"


@pytest.mark.skipif(not (GLUE / "CoLA" / "train.tsv").is_file(), reason="no ../shared GLUE data")
def test_converge_tiny_end_to_end(tmp_path, monkeypatch, capsys):
    import train
    calls = []

    def run_in_process(cmd, stdout, env, **kw):
        assert cmd[1].endswith("train.py") and env["OMP_NUM_THREADS"] == "2"
        calls.append(cmd[2:])
        with redirect_stdout(io.StringIO()):
            train.main(cmd[2:])
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(converge.subprocess, "run", run_in_process)
    # --jobs=1: train.main in threads would share torch's global RNG (subprocesses, as converge.py runs them, do not)
    argv = [f"--out={tmp_path}", "--methods=lora,reflora", "--seeds=0,1", "--jobs=1", "--max_iters=3",
            "--init_from=tiny", "--lora_r=2", "--eval_limit=8", "--group_by_length=False", "--warmup_steps=1",
            "--reflora_warmup=1"]
    monkeypatch.setattr(converge.os, "cpu_count", lambda: 2)
    converge.main(argv)
    assert len(calls) == 4 and all("--log_interval=1" in c and "--lr=0.002" in c for c in calls)
    cur = json.loads((tmp_path / "curves.json").read_text())
    assert cur["steps"] == [1, 2, 3] and sorted(cur["runs"]) == ["lora", "reflora"]
    assert all(len(y) == 3 and all(np.isfinite(y)) for m in cur["runs"].values() for y in m.values())
    assert set(cur["dev"]["lora"]["0"]) >= {"mcc", "val_loss"}
    # the same data order and init for both methods, refactoring from step 2: step 1's loss is shared
    assert cur["runs"]["lora"]["0"][0] == cur["runs"]["reflora"]["0"][0]
    assert cur["runs"]["lora"]["0"][0] != cur["runs"]["lora"]["1"][0]
    capsys.readouterr()
    converge.main(argv)  # re-run: everything finished, nothing trained
    assert len(calls) == 4 and capsys.readouterr().out.count("skipped") == 4


# -----------------------------------------------------------------------------
# converge.py --lrs: the sweep procedure on fake train.py runs (a stub subprocess writes what train.py leaves)

OPT = {"lora": 1e-3, "reflora": 0.5, "reflora-s": 1e9}  # each method's (fake) ideal lr
DIVERGES = {"lora": 0.1, "reflora": 1.0, "reflora-s": math.inf}  # ... and the lr from which it diverges


def fake_loss(method, lr, seed, t):
    # falls with the step; higher the farther lr is from the method's ideal (in decades); seeds shift it
    return 1 + 0.1 * (math.log10(lr) - math.log10(OPT[method])) ** 2 + 1 / t + 0.01 * seed


def fake_train(calls, n):
    def run(cmd, stdout, env, **kw):
        a = dict(x[2:].split("=", 1) for x in cmd[2:])
        calls.append(a)
        d, m, lr, seed = Path(a["out_dir"]), a["method"], float(a["lr"]), int(a["seed"])
        last = 2 if lr >= DIVERGES[m] else n  # a diverging run logs 2 steps, then exits 1
        recs = [dict(iter=t, loss=fake_loss(m, lr, seed, t), dw=lr * t, dw_rel=0.1) for t in range(1, last + 1)]
        if last == n:
            recs.append(dict(iter=n, val_loss=fake_loss(m, lr, seed, n) + 0.5, mcc=0.3 - 0.01 * seed))
            (d / "eval_cola.json").write_text(json.dumps(dict(metrics=dict(mcc=0.3 - 0.01 * seed))))
            (d / "config.json").write_text(json.dumps(dict(method=m, seed=seed, lr=lr, base="adamw", task="glue",
                                                           batch_size=32)))
        (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        stdout.write("" if last == n else "train.py: non-finite loss at or before iter 3: stopping\n")
        return subprocess.CompletedProcess(cmd, 0 if last == n else 1)
    return run


def test_sweep_extends_the_grid_and_picks_each_best_lr(tmp_path, monkeypatch, capsys):
    n, calls = 20, []
    monkeypatch.setattr(converge.subprocess, "run", fake_train(calls, n))
    argv = [f"--out={tmp_path}", "--lrs=1e-4,1e-3,1e-2", f"--max_iters={n}", "--seeds=0,1,2"]
    res = converge.main(argv)
    # lora's best, 1e-3, is inside the grid; reflora's (0.5 ideal, diverging from 1) and reflora-s's (never) at the
    # top edge: the grid grows upwards for every method, 3 times at most
    assert res["grids"] == [[1e-4, 1e-3, 1e-2], [1e-4, 1e-3, 1e-2, 0.1], [1e-4, 1e-3, 1e-2, 0.1, 1.0],
                            [1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0]]
    assert res["best"] == {"lora": 1e-3, "reflora": 0.1, "reflora-s": 10.0}
    assert res["at_edge"] == {"lora": False, "reflora": False, "reflora-s": True}
    # every method at every lr of the final grid with seed 0, then seeds 1 and 2 at its best lr only
    got = sorted((c["method"], float(c["lr"]), int(c["seed"])) for c in calls)
    want = sorted([(m, lr, 0) for m in OPT for lr in res["grid"]] + [(m, res["best"][m], s) for m in OPT
                                                                        for s in (1, 2)])
    assert got == want and all(c["max_iters"] == str(n) and c["log_interval"] == "1" for c in calls)
    runs = {(r["method"], r["lr"], r["seed"]): r for r in res["runs"]}
    assert [lr for lr in res["grid"] if runs[("lora", lr, 0)]["status"] == "diverged"] == [0.1, 1.0, 10.0]
    assert runs[("reflora", 1.0, 0)]["status"] == "diverged" and runs[("reflora", 1.0, 0)]["final_loss"] is None
    # the final loss: the mean over the last 10 % of the 20 steps (19 and 20), by hand
    r = runs[("lora", 1e-2, 0)]
    assert r["final_loss"] == pytest.approx((fake_loss("lora", 1e-2, 0, 19) + fake_loss("lora", 1e-2, 0, 20)) / 2)
    assert r["dw"] == pytest.approx([1e-2 * t for t in range(1, n + 1)]) and r["dev"] == {"mcc": 0.3}
    assert r["val_loss"] == pytest.approx(fake_loss("lora", 1e-2, 0, n) + 0.5) and r["wall_s"] >= 0
    d = json.loads((tmp_path / "sweep.json").read_text())
    assert set(d) == {"setting", "procedure", "final_loss", "grid", "grids", "best", "at_edge", "runs"}
    assert set(d["runs"][0]) >= {"method", "lr", "seed", "status", "final_loss", "loss", "val_loss", "dev", "dw",
                                 "wall_s"}
    assert "last 2 of 20 steps" in d["final_loss"]
    # the table at the best lr: mean ± std over the 3 seeds (seed offsets 0, .01, .02: std 0.01)
    md = (tmp_path / "sweep.md").read_text()
    table = next(t for t in md.split("\n\n") if "| best lr |" in t)  # the first table
    cells = [[x.strip() for x in l.strip().strip("|").split("|")] for l in table.splitlines() if l.startswith("| ")]
    head, rows = cells[0], {c[0]: c for c in cells[1:]}
    lora = dict(zip(head, rows["lora"]))
    final = [(fake_loss("lora", 1e-3, s, 19) + fake_loss("lora", 1e-3, s, 20)) / 2 for s in (0, 1, 2)]
    assert lora["best lr"] == "0.001 (3 seeds)" and lora["final loss"] == f"{np.mean(final):.3f} ± 0.010"
    assert lora["dev mcc ×100"] == "29.0 ± 1.0"
    assert dict(zip(head, rows["reflora-s"]))["best lr"].startswith("10 (grid edge)")
    # dw over the second half (steps 11-20): lr · 15.5
    assert lora["‖ΔW‖"] == f"{1e-3 * 15.5:.2e} ± 0.0e+00"
    if importlib.util.find_spec("matplotlib"):
        for f in ("lr.png", "curves.png"):
            assert (tmp_path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f
    # re-run: every run (diverged ones included) is skipped, the same result
    calls.clear()
    assert converge.main(argv)["best"] == res["best"] and calls == []


def test_sweep_grid_extension_and_final_loss_by_hand():
    g = [1e-3, 1e-2, 1e-1]
    assert converge.extend(g, {"a": 1e-2, "b": 1e-2}) == g
    assert converge.extend(g, {"a": 1e-3, "b": 1e-2}) == [1e-4, *g]
    assert converge.extend(g, {"a": None}) == [1e-4, *g]  # every run diverged: look lower
    assert converge.extend([1e-3, 2e-3, 4e-3], {"a": 1e-3, "b": 4e-3}) == [5e-4, 1e-3, 2e-3, 4e-3, 8e-3]
    assert converge.best_lr({1e-3: 0.5, 1e-2: 0.4, 1e-1: math.inf}) == 1e-2
    assert converge.best_lr({1e-3: math.inf}) is None
    run = dict(steps=np.arange(1, 101), loss=np.arange(1, 101, dtype=float))
    assert converge.final_loss(run, 100) == 95.5  # the mean of steps 91-100
    assert converge.final_loss(dict(steps=np.arange(1, 4), loss=np.array([3.0, 2.0, 1.0])), 3) == 1.0


def test_sweep_rejects_bad_flags(capsys):
    for argv, needle in [(["--lrs=1e-3"], "--lrs"), (["--lrs=1e-3,x"], "--lrs"), (["--lrs=1e-3,-1"], "--lrs"),
                         (["--lrs=1e-3,1e-2", "--seeds=0,1"], "--seeds"), (["--lrs=1e-3,1e-2", "--lr=1"], "--lr"),
                         (["--task=mnli"], "--task")]:
        with pytest.raises(SystemExit) as e:
            converge.parse_args(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and needle in err and "\n" not in err, argv


# -----------------------------------------------------------------------------
# a real sweep on the tiny model: commonsense LM loss, plain gradient descent (synthetic data, no ../shared)


def test_sweep_tiny_commonsense_end_to_end(tmp_path, monkeypatch):
    calls = []

    def run_in_process(cmd, stdout, env, **kw):
        calls.append(cmd[2:])
        err = io.StringIO()
        with redirect_stdout(io.StringIO()), redirect_stderr(err):
            try:
                train.main(cmd[2:])
                rc = 0
            except SystemExit as e:
                rc = e.code
        stdout.write(err.getvalue())
        return subprocess.CompletedProcess(cmd, rc)

    monkeypatch.setattr(converge.subprocess, "run", run_in_process)
    data = write_commonsense(tmp_path / "data", n_train=16, n_test=1)
    argv = [f"--out={tmp_path / 'out'}", "--task=commonsense", "--methods=lora,reflora-s", "--seeds=0,1,2",
            "--jobs=1", "--lrs=0.01,0.1,1e30", "--base=sgd", "--grad_clip=0", "--init_from=tiny", f"--data_dir={data}",
            "--lora_r=2", "--batch_size=4", "--micro_batch_size=4", "--max_iters=3", "--cutoff_len=200",
            "--warmup_steps=1", "--reflora_warmup=1", "--val_set_size=4", "--dtype=float32", "--group_by_length=False"]
    res = converge.main(argv)
    assert all("--task=commonsense" in c and "--benchmark=False" in c and "--base=sgd" in c for c in calls)
    runs = {(r["method"], r["lr"], r["seed"]): r for r in res["runs"]}
    for m in ("lora", "reflora-s"):
        assert runs[(m, 1e30, 0)]["status"] == "diverged"  # lr 1e30: non-finite, recorded, not a failure
        finals = {lr: r["final_loss"] for (m_, lr, s), r in runs.items() if m_ == m and s == 0 and r["final_loss"]}
        assert res["best"][m] == min(finals, key=finals.get) and res["best"][m] != 1e30
        seeds = [r for (m_, lr, s), r in runs.items() if m_ == m and lr == res["best"][m]]
        assert sorted(r["seed"] for r in seeds) == [0, 1, 2]
        for r in seeds:
            assert r["status"] == "done" and len(r["loss"]) == 3 and r["final_loss"] == r["loss"][-1]
            assert r["val_loss"] > 0 and r["dev"] == {} and r["dw"][0] == 0 and r["dw"][-1] > 0
    assert not list((tmp_path / "out").glob("*/eval*.json"))  # --benchmark=False: losses only
    n = len(calls)
    converge.main(argv)
    assert len(calls) == n  # finished and diverged runs are skipped
