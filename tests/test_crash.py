"""Crashes, signals and concurrent runs (issue 12): a save killed at each of its steps, once or twice in a row, leaves
out_dir holding one complete checkpoint (old or new, never a mix) that --resume and --eval_only read; os._exit in
a real process mid-save, twice, then a resume that finishes; SIGINT / SIGTERM save and exit 130 / 143; resume
rules (lr takes effect, log.jsonl cut back); stale locks taken over; --overwrite starts over. Issue 19: a second
run that comes in while the first loads, two takers of one stale lock (deterministic hooks, not timing), a damaged
.new, signals in a burst and during a save, full disks (patched writes, and RLIMIT_FSIZE for real kernel errors),
training data changed under a resume."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

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
    """train.py in a process that gets `sig` (a list: each of them at once, in a burst) after two logged steps."""
    p = subprocess.Popen([sys.executable, "train.py", *argv(out, data, max_iters=1000, eval_interval=0), *extra],
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = 0
    for line in p.stdout:  # two more training steps logged, then the signal
        seen += line.startswith("iter ")
        if seen == 2:
            for s in sig if isinstance(sig, list) else [sig]:
                p.send_signal(s)
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


# -----------------------------------------------------------------------------
# issue 19: races, a damaged .new, second signals, full disks, changed data


def test_second_run_cannot_slip_in_while_the_first_loads(run, tmp_path, monkeypatch, capsys):
    """Run B checks out_dir, then loads its model; run A (another process) goes from start to end right then. A
    must find out_dir locked by B (exit 2), and B's checkpoint and log are B's alone: out_dir is checked and locked
    in one step, before anything slow."""
    root, data = run
    out, other = tmp_path / "out", []
    real_build = T.build

    def slow_build(*a, **k):  # B's model load: the moment the other run comes in
        if not other:
            other.append(subprocess.run([sys.executable, "train.py", *argv(out, data, max_iters=1)], cwd=ROOT, env=ENV,
                                        capture_output=True, text=True, timeout=120))
        return real_build(*a, **k)

    monkeypatch.setattr(T, "build", slow_build)
    T.main(argv(out, data, max_iters=2))
    a = other[0]
    assert a.returncode == 2 and "in use" in a.stderr and len(a.stderr.strip().splitlines()) == 1, a.stderr[-2000:]
    assert log_iters(out) == [1, 2] and consistent(out)["iter_num"] == 2


def test_stale_lock_taken_over_once(tmp_path, monkeypatch):
    """Two processes find the same stale lock; the other one tries to take it while this one is deciding (a hook
    in _alive, which judges the stale lock's process gone): exactly one of them holds out_dir."""
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / ".lock").write_text(f"{os.uname().nodename} {dead.pid}")
    other, real_alive = [], C._alive
    code = ("import sys, pathlib, runstate\nrunstate.lock_out_dir(pathlib.Path(sys.argv[1]))\n"
            "print('held', flush=True)\nsys.stdin.read()")

    def alive(pid):
        if pid == dead.pid and not other:  # the other process comes in now, and keeps what it gets
            p = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=ROOT, env=ENV, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            other.append((p, p.stdout.readline()))
        return real_alive(pid)

    monkeypatch.setattr(C, "_alive", alive)
    try:
        C.lock_out_dir(out)
        mine = True
    except ValueError as e:
        mine = False
        assert "in use" in str(e)
    p, line = other[0]
    theirs = line.strip() == "held"
    err = p.communicate("", timeout=60)[1]
    assert mine + theirs == 1, (mine, theirs, err[-1000:])
    assert theirs or "in use" in err.strip().splitlines()[-1]
    if mine:
        C.unlock_out_dir(out)
        assert not (out / ".lock").exists()


@pytest.mark.parametrize("damage", ["manifest-garbage", "state-junk", "state-same-size"])
def test_damaged_new_is_discarded_not_rolled_forward(run, tmp_path, damage):
    """A .new whose files do not match its manifest (sizes, sha256) is discarded with one line; the good checkpoint
    stays and the run resumes from it."""
    root, data = run
    out = tmp_path / "out"
    shutil.copytree(root / "good", out)
    good = (out / "state.pt").read_bytes()
    new = out / ".new"
    if damage == "manifest-garbage":
        new.mkdir()
        (new / "checkpoint.json").write_text("{")
        (new / "state.pt").write_bytes(b"junk")
    else:
        shutil.copytree(out, new, ignore=shutil.ignore_patterns("log.jsonl", "eval*", "loss.png", ".new"))
        b = bytearray(good)
        b[len(b) // 2] ^= 0x40
        (new / "state.pt").write_bytes(b"junk" if damage == "state-junk" else bytes(b))
    r = subprocess.run([sys.executable, "train.py", *argv(out, data, max_iters=3), "--resume=True"], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "at iter 2" in r.stdout and "discarded" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert consistent(out)["iter_num"] == 3 and not new.exists()


def _signalled(out, data, code_before, *extra):
    """train.py (CLI) in a fresh process, with `code_before` run first (patches that send signals)."""
    code = f"import os, signal, sys, torch, train, runstate\n{code_before}\nsys.argv = ['train.py', *sys.argv[1:]]\n" \
           "train.main()\n"
    return subprocess.run([sys.executable, "-c", code, *argv(out, data, max_iters=1000, eval_interval=0), *extra],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)


def test_signals_in_a_burst_save_once_and_exit_130(run, tmp_path):
    """SIGINT and SIGINT at once, from outside (nothing saved yet: eval_interval=0): one checkpoint, exit 130."""
    root, data = run
    out = tmp_path / "out"
    rc, err = _interrupt(out, data, [signal.SIGINT, signal.SIGINT, signal.SIGTERM])
    assert rc == 130 and len(err.strip().splitlines()) == 1 and "--resume=True" in err, err
    assert consistent(out)["iter_num"] >= 2 and not (out / ".lock").exists()


def test_signals_during_the_save_do_not_cut_it_short(run, tmp_path):
    """The first SIGINT after iter 2; SIGTERM, SIGINT, SIGTERM while its checkpoint is being written (sent from
    inside torch.save): the save completes, one line, exit 130."""
    root, data = run
    out = tmp_path / "out"
    patch = """
real_log, real_save = train._log_line, torch.save
def log_line(r, *a):
    real_log(r, *a)
    if r.it == 2:
        os.kill(os.getpid(), signal.SIGINT)
def save(*a, **k):
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
        os.kill(os.getpid(), s)
    real_save(*a, **k)
    os.kill(os.getpid(), signal.SIGINT)
train._log_line, torch.save = log_line, save
"""
    r = _signalled(out, data, patch)
    assert r.returncode == 130 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "SIGINT: stopped after iter 2; checkpoint of iter 2" in r.stderr, r.stderr
    assert consistent(out)["iter_num"] == 2 and not (out / ".tmp").exists() and not (out / ".lock").exists()


def _no_leftovers(out):
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))


@pytest.mark.parametrize("where", ["state.pt", "adapter_model.safetensors"])
def test_disk_full_during_a_save(run, tmp_path, monkeypatch, capsys, where):
    """A write that fails with ENOSPC (torch.save, safetensors' save_file patched): one line naming the file and the
    error, exit 2, nothing half-written left (.tmp, .new, .lock), the previous checkpoint byte for byte."""
    root, data = run
    out = tmp_path / "out"
    shutil.copytree(root / "good", out)
    before = {f: (out / f).read_bytes() for f in C.FILES if (out / f).exists()}

    def full_save(obj, f, *a, **k):  # f: the open file (or a path)
        f.write(b"PK\x03\x04 partial") if hasattr(f, "write") else Path(f).write_bytes(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_file(tensors, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise SafetensorError(f"Error while serializing: I/O error: No space left on device (os error {errno.ENOSPC})")

    monkeypatch.setattr(*(torch, "save", full_save) if where == "state.pt" else (W, "save_file", full_file))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        T.main(argv(out, data, resume=True, max_iters=3))
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert where in err and "No space left on device" in err and "keeps its last one (iter 2)" in err, err
    assert _no_leftovers(out) == [] and {f: (out / f).read_bytes() for f in before} == before


def _limited(out, data, limit, *extra):
    """train.py in a process whose files may not grow past `limit` bytes (RLIMIT_FSIZE: writes fail with EFBIG, a
    real write error from the kernel, without root or a small filesystem)."""
    code = f"""
import resource, signal, sys, train
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
train.main(sys.argv[1:])
"""
    return subprocess.run([sys.executable, "-c", code, *argv(out, data), *extra], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)


def test_real_write_errors(run, tmp_path):
    """Files limited to 60 kB: state.pt (~100 kB) cannot be written (the adapter, ~30 kB, can); limited to 0 bytes:
    not even the lock. Each: one line naming the file and the kernel's reason, exit 2, nothing half-written left,
    the previous checkpoint intact."""
    root, data = run
    out = tmp_path / "out"
    shutil.copytree(root / "good", out)
    before = {f: (out / f).read_bytes() for f in C.FILES if (out / f).exists()}
    r = _limited(out, data, 60_000, "--resume=True", "--max_iters=3")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "state.pt" in r.stderr and "File too large" in r.stderr, r.stderr
    assert _no_leftovers(out) == [] and {f: (out / f).read_bytes() for f in before} == before
    fresh = tmp_path / "fresh"
    r = _limited(fresh, data, 0)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert ".lock" in r.stderr and "File too large" in r.stderr and not fresh.exists(), r.stderr


def test_resume_refuses_changed_data(run, tmp_path, capsys):
    """The training file's size and sha256 are saved; the same path with other contents is refused on resume."""
    root, data = run
    mine = tmp_path / "data"
    shutil.copytree(data, mine)
    out = tmp_path / "out"
    T.main(argv(out, mine, max_iters=1, eval_base=False))
    f = mine / "dataset" / "boolq" / "train.json"
    recs = json.loads(f.read_text())
    f.write_text(json.dumps(recs[::-1]))  # the same records, another order: another batch order
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        T.main(argv(out, mine, max_iters=2, eval_base=False, resume=True))
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and f"{f} changed since" in err, err
    f.write_text(json.dumps(recs))  # back as it was: the resume goes on
    T.main(argv(out, mine, max_iters=2, eval_base=False, resume=True))
    assert C.read_state(out / "state.pt")["iter_num"] == 2
