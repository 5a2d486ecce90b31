"""Crashes, signals and concurrent runs (issue 12): a save killed at each of its steps, once or twice in a row, leaves
out_dir holding one complete checkpoint (old or new, never a mix) that --resume and --eval_only read; os._exit in
a real process mid-save, twice, then a resume that finishes; SIGINT / SIGTERM save and exit 130 / 143; resume
rules (lr takes effect, log.jsonl cut back); stale locks taken over; --overwrite starts over."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import runstate as C
import train as T
import weights as W
from helpers import ROOT, flags, write_commonsense
from model import add_lora, lora_state_dict

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def argv(out, data, **kw):
    return flags(**{**dict(data_dir=data, out_dir=out, max_iters=2, cutoff_len=128, eval_interval=1, eval_limit=1,
                           eval_batch_size=1, max_new_tokens=2, val_set_size=4), **kw})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    data = write_commonsense(root / "data", n_train=24, n_test=2)
    T.main(argv(root / "good", data))
    return root, data


def log_iters(out):
    recs = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    return [r["iter"] for r in recs if "loss" in r]


# -----------------------------------------------------------------------------
# a save killed at each step (in-process, injected exceptions), once and twice in a row


class Crash(Exception):
    pass


def consistent(out):
    """recover() as every run starts, then one complete checkpoint: manifest, state.pt and PEFT adapter agree."""
    C.recover(out)
    assert not (out / ".tmp").exists() and not (out / ".new").exists()
    assert C.verify_checkpoint(out) is not None
    st = C.read_state(out / "state.pt")
    model = W.load_model("tiny")
    W.load_adapter(model, out)
    for k, v in lora_state_dict(model).items():
        assert torch.equal(v, st["lora"][k]), k
    return st


def test_save_killed_at_every_step_once_and_twice(run, tmp_path, monkeypatch):
    root, data = run
    good = C.read_state(root / "good" / "state.pt")
    model = W.load_model("tiny")
    add_lora(model, 4, 8, 0.0, T.DEFAULTS["lora_targets"])
    calls, crash_at = [], [None]

    def hook(name, fn, write=False):  # the call numbered crash_at dies (a write leaves a half-written file)
        def f(*a, **k):
            calls.append(name)
            if len(calls) == crash_at[0]:
                if write:  # a path, or (torch.save) the open file
                    a[1].write(b"half-written") if hasattr(a[1], "write") else Path(a[1]).write_bytes(b"half-written")
                raise Crash(name)
            return fn(*a, **k)
        return f

    monkeypatch.setattr(C, "save_adapter", hook("save_adapter", C.save_adapter))
    monkeypatch.setattr(C, "save_file", hook("save_file", C.save_file, write=True))  # the head
    monkeypatch.setattr(W, "save_file", hook("save_file", W.save_file, write=True))  # the adapter
    monkeypatch.setattr(torch, "save", hook("torch.save", torch.save, write=True))
    monkeypatch.setattr(C, "_fsync", hook("fsync", C._fsync))
    monkeypatch.setattr(os, "rename", hook("rename", os.rename))
    monkeypatch.setattr(os, "replace", hook("replace", os.replace))

    def save(out, bump, at):  # a new checkpoint: the good one with its LoRA moved by `bump`
        lora = {k: v + bump for k, v in good["lora"].items()}
        calls.clear()
        crash_at[0] = at
        st = {k: v for k, v in good.items() if k not in ("lora", "head")}
        try:
            C.save_checkpoint(out, model, lora, None, st)
        except Crash:
            return False
        return True

    out = tmp_path / "probe"
    shutil.copytree(root / "good", out)
    assert save(out, 1.0, None)
    steps = list(calls)  # every step of one save, in order
    assert {"save_adapter", "torch.save", "fsync", "rename", "replace"} <= set(steps) and len(steps) >= 8
    for k in range(1, len(steps) + 1):
        for second in (None, 1, k, len(steps)):  # then a second save that dies too (or none)
            out = tmp_path / f"k{k}-{second}"
            shutil.copytree(root / "good", out)
            assert not save(out, 1.0, k), steps[k - 1]
            if second is not None:
                save(out, 2.0, second)
            crash_at[0] = None
            st = consistent(out)
            # the old checkpoint or a new one, whole: every LoRA tensor moved by the same bump
            bumps = {round(float((st["lora"][n] - good["lora"][n]).mean()), 4) for n in good["lora"]}
            assert len(bumps) == 1 and bumps <= {0.0, 1.0, 2.0}, (steps[k - 1], second, bumps)
            shutil.rmtree(out)
    crash_at[0] = None
    monkeypatch.undo()
    # and the run resumes from such a directory: killed at the commit, then at the first file moved in
    out = tmp_path / "resume"
    shutil.copytree(root / "good", out)
    (out / ".tmp").mkdir()
    (out / ".tmp" / "state.pt").write_bytes(b"half-written")  # an earlier crash's leftovers
    T.main(argv(out, data, resume=True, max_iters=3))
    assert C.read_state(out / "state.pt")["iter_num"] == 3 and not (out / ".tmp").exists()
    assert log_iters(out) == [1, 2, 3]


def _crashing_run(out, data, crash, *extra):
    """train.py in a fresh process whose `crash` = "<function>:<n>" call does os._exit(9) (half-writing a file)."""
    code = f"""
import os, sys, torch
import train
name, n = {crash!r}.split(":")
real, count = {{"torch.save": torch.save, "replace": os.replace}}[name], [0]
def dying(*a, **k):
    count[0] += 1
    if count[0] == int(n):
        if name == "torch.save":
            (a[1] if hasattr(a[1], "write") else open(a[1], "wb")).write(b"half")
        os._exit(9)
    return real(*a, **k)
setattr(torch if name == "torch.save" else os, name.split(".")[-1], dying)
train.main(sys.argv[1:])
"""
    return subprocess.run([sys.executable, "-c", code, *argv(out, data, max_iters=4), *extra], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)


def test_killed_process_twice_then_resume(run, tmp_path):
    root, data = run
    out = tmp_path / "out"
    # the second checkpoint dies half-way through writing state.pt (the first, iter 1, is complete)
    r = _crashing_run(out, data, "torch.save:2")
    assert r.returncode == 9 and C.read_state(out / "state.pt")["iter_num"] == 1, r.stderr[-2000:]
    # resumed, its first save (iter 2) dies after the commit, between the files moved into out_dir
    # (os.replace: trim_log's, save_adapter's 2, the first file moved in, then the second dies)
    r = _crashing_run(out, data, "replace:5", "--resume=True")
    assert r.returncode == 9 and (out / ".new").is_dir(), r.stderr[-2000:]
    r = subprocess.run([sys.executable, "train.py", *argv(out, data, max_iters=4), "--resume=True"], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout and "at iter 2" in r.stdout  # the rolled-forward checkpoint of iter 2
    assert consistent(out)["iter_num"] == 4 and log_iters(out) == [1, 2, 3, 4]


# -----------------------------------------------------------------------------
# signals


def _interrupt(out, data, sig, *extra):
    p = subprocess.Popen([sys.executable, "train.py", *argv(out, data, max_iters=1000, eval_interval=0), *extra],
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = 0
    for line in p.stdout:  # two more training steps logged, then the signal
        seen += line.startswith("iter ")
        if seen == 2:
            p.send_signal(sig)
            break
    p.stdout.read()
    return p.wait(timeout=120), p.stderr.read()


def test_sigint_and_sigterm_save_and_exit(run, tmp_path):
    root, data = run
    out = tmp_path / "out"
    rc, err = _interrupt(out, data, signal.SIGINT)
    assert rc == 130 and len(err.strip().splitlines()) == 1 and "SIGINT" in err and "--resume=True" in err, err
    first = C.read_state(out / "state.pt")["iter_num"]
    assert first >= 2 and f"iter {first} " in err and not (out / ".lock").exists()
    rc, err = _interrupt(out, data, signal.SIGTERM, "--resume=True")
    assert rc == 143 and len(err.strip().splitlines()) == 1 and "SIGTERM" in err, err
    second = consistent(out)["iter_num"]
    assert second > first and log_iters(out) == list(range(1, second + 1))


# -----------------------------------------------------------------------------
# resume rules, locks, overwrite


def test_resume_takes_new_lr_trims_log_and_takes_over_stale_lock(run, tmp_path, capsys):
    root, data = run
    out = tmp_path / "out"
    shutil.copytree(root / "good", out)
    with open(out / "log.jsonl", "a") as f:  # as if the run had gone on past its checkpoint, then been killed
        f.write(json.dumps(dict(iter=3, loss=9.0)) + "\n" + '{"iter": 4, "lo')
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / ".lock").write_text(f"{os.uname().nodename} {dead.pid}")  # a lock whose process is gone
    T.main(argv(out, data, resume=True, max_iters=3, lr=5e-3, weight_decay=0.1))
    printed = capsys.readouterr().out
    assert "at iter 2, max_iters 2 -> 3, lr 0.01 -> 0.005, weight_decay 0.0 -> 0.1" in printed, printed
    st = C.read_state(out / "state.pt")
    groups = st["optimizer"]["param_groups"]
    assert st["iter_num"] == 3 and all(g["initial_lr"] == 5e-3 and g["weight_decay"] == 0.1 for g in groups)
    assert st["scheduler"]["base_lrs"] == [5e-3] * len(groups)
    assert log_iters(out) == [1, 2, 3] and not (out / ".lock").exists()
    # --overwrite=True: a new run, its log started afresh
    T.main(argv(out, data, overwrite=True, max_iters=1))
    assert log_iters(out) == [1] and C.read_state(out / "state.pt")["iter_num"] == 1
