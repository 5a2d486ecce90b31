"""plot.py and converge.py: reading train.py logs, the seed statistics checked by hand on synthetic logs, the CLI's
one-line errors, pictures when matplotlib is present, and converge.py end to end on the tiny model."""
import io
import json
import subprocess
import sys
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch

import converge
import plot
from helpers import ROOT

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
