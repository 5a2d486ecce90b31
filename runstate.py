"""
A training run's state in its out_dir: state.pt (LoRA, head, optimizer, schedule, generators, config) beside the
PEFT adapter train.py exports, written crash-safe; resume from it; the rules of an out_dir (what a new run, a resume
and --eval_only may find there) and its lock; the atomic writes of the run's small files (JSON, log.jsonl); and
how a run stops: a non-finite loss (exit 1), or SIGINT / SIGTERM (one checkpoint, then exit 130 / 143).

References: nanoGPT train.py (ckpt.pt with iter_num, best_val_loss, config); HF Trainer's checkpoint folders (model,
optimizer, scheduler and RNG states beside each other); the write-to-temp, fsync, rename discipline of crash-safe
stores (a manifest written last is the commit record).
"""
import contextlib
import json
import os
import shutil
import signal
import socket
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file

from model import lora_state_dict
from reflora import local
from weights import CheckpointError, save_adapter

# -----------------------------------------------------------------------------
# training state (train.py's state.pt + PEFT adapter):
# the PEFT adapter (+ head) to export; state.pt (with its own LoRA copy) is what --resume reads


def training_state(model, clf, opt, dev, ddp, world):
    """-> (lora, head, optimizer, rngs): full tensors on the CPU (FSDP: all-gathered, so every rank calls it), so
    that state.pt is the same with or without sharding; rngs: every rank's CPU (and CUDA) generator state."""
    rngs = [None] * world
    rng = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None)
    torch.distributed.all_gather_object(rngs, rng) if ddp else rngs.__setitem__(0, rng)
    cpu = lambda sd: {k: _full(v.detach()).cpu() for k, v in sd.items()}
    lora, head = cpu(lora_state_dict(model)), None if clf is None else cpu(clf.head.state_dict())
    optim = opt.state_dict()
    optim["state"] = {i: {k: _full(t) for k, t in st.items()} for i, st in optim["state"].items()}
    return lora, head, optim, rngs


def restore_rng(st, rank, world, dev):
    """This rank's saved generator states (rank 0's when the number of processes changed)."""
    rng = st["rng"][rank] if len(st["rng"]) == world else st["rng"][0]
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and dev.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], dev)


def atomic_write(path, text):
    """path's new text, or its old one if this dies half-way: written beside it, then renamed over it."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path, obj):
    atomic_write(path, json.dumps(obj, indent=1))


# A save is crash-safe at every point: (1) out_dir/.tmp is emptied and every file is written there and fsynced,
# the manifest (checkpoint.json: iter, file sizes) last; (2) .tmp is renamed to .new: the checkpoint is committed;
# (3) its files are renamed into out_dir, the manifest last, and .new removed. recover(), run first by every save,
# resume and --eval_only, discards a .tmp (a save that died in 1: the previous checkpoint is untouched) and rolls
# a .new forward (a save that died in 3), so out_dir always ends up holding one complete checkpoint.
MANIFEST = "checkpoint.json"
FILES = ("adapter_config.json", "adapter_model.safetensors", "head.safetensors", "state.pt", MANIFEST)


def save_checkpoint(out_dir, model, lora, head, state):
    """The PEFT adapter (+ head.safetensors) and state.pt (with its own copy of the LoRA and head tensors)."""
    out = Path(out_dir)
    recover(out)
    tmp = out / ".tmp"
    tmp.mkdir()
    save_adapter(model, tmp, lora)
    if head is not None:
        save_file({k: v.contiguous() for k, v in head.items()}, tmp / "head.safetensors")
    torch.save(dict(state, lora=lora, head=head), tmp / "state.pt")
    sizes = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
    (tmp / MANIFEST).write_text(json.dumps(dict(iter=state["iter_num"], files=sizes)))
    for f in [*sizes, MANIFEST, "."]:
        _fsync(tmp / f)
    os.rename(tmp, out / ".new")  # the commit
    _fsync(out)
    recover(out)


def recover(out_dir):
    """Finish a committed save (.new) that a crash interrupted; discard an uncommitted one (.tmp)."""
    out = Path(out_dir)
    new = out / ".new"
    if (new / MANIFEST).is_file():
        for f in sorted(new.iterdir(), key=lambda f: f.name == MANIFEST):  # the manifest last
            os.replace(f, out / f.name)
        _fsync(out)
    for d in (new, out / ".tmp"):
        if d.exists():
            shutil.rmtree(d)


def verify_checkpoint(out_dir):
    """-> the manifest's iter (None without one, an older out_dir); a missing or resized file is one line."""
    out = Path(out_dir)
    if not (out / MANIFEST).is_file():
        return None
    try:
        m = json.loads((out / MANIFEST).read_text())
        it, files = int(m["iter"]), dict(m["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{out / MANIFEST}: cannot read ({type(e).__name__}: {e})") from None
    for name, size in files.items():
        f = out / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (listed in {out / MANIFEST}, checkpoint of iter {it})")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, {out / MANIFEST} says {size}: damaged")
    return it


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_state(path):
    """state.pt as a dict, or one line naming the file (damaged, truncated, empty, not ours)."""
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols on stderr
            warnings.simplefilter("ignore")
            st = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    except Exception as e:  # random bytes, a truncated zip, a refused pickle: torch raises many kinds
        if "Weights only load failed" in str(e):
            raise CheckpointError(f"{path}: refusing to unpickle it: not a plain tensor checkpoint") from None
        raise CheckpointError(f"{path}: cannot read ({type(e).__name__}: {_first(e)})") from None
    need = ("iter_num", "config", "best_val", "rng", "optimizer", "scheduler", "lora", "head")
    if not isinstance(st, dict) or any(k not in st for k in need) or not isinstance(st["config"], dict):
        raise CheckpointError(f"{path}: not a train.py checkpoint (expected a dict with {', '.join(need)})")
    return st


def _first(e):
    return (str(e).strip().splitlines() or [""])[0][:200]


@torch.no_grad()
def load_checkpoint(path, cfg, model, clf, opt, sched, may_change=()):
    """Restore LoRA (+ head), optimizer (RefLoRA state included) and scheduler from state.pt; -> (the state dict,
    the settings that changed). Settings in may_change take effect (lr and weight decay set in the optimizer, the
    schedule rebuilt at the saved step); any other saved setting that differs from cfg is refused, naming the flag."""
    st = read_state(path)
    saved = st["config"]
    for k in cfg:
        if k in saved and k not in may_change and saved[k] != cfg[k]:
            raise ValueError(f"--resume: --{k}={cfg[k]!r}, but {path} was saved with {k}={saved[k]!r}, and {k} "
                             "cannot change on resume (README: Resume rules)")
    changed = {k: (saved[k], cfg[k]) for k in cfg if k in may_change and k in saved and saved[k] != cfg[k]}
    head = {} if clf is None else clf.head.state_dict()
    ours = {**lora_state_dict(model), **{"head." + k: v for k, v in head.items()}}
    try:
        theirs = {**st["lora"], **{"head." + k: v for k, v in (st["head"] or {}).items()}}
        ok = theirs.keys() == ours.keys() and all(theirs[k].shape == v.shape for k, v in ours.items())
    except (AttributeError, TypeError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path}: its LoRA (and head) tensors do not match the model's")
    try:
        opt.load_state_dict(st["optimizer"])
        it = int(st["iter_num"])
    except Exception as e:
        raise CheckpointError(f"{path}: optimizer state does not fit ({type(e).__name__}: {_first(e)})") from None
    for k, v in ours.items():
        local(v).copy_(local(_shard_like(theirs[k], v)))
    for p, s in opt.state.items():
        if hasattr(p, "device_mesh"):  # FSDP2: the saved full Adam moments -> this rank's shards
            s.update({k: _shard_like(t, p) for k, t in s.items() if k != "step"})
    # the given lr and weight decay, and the schedule (built from the given max_iters, warmup_steps) at step it
    for g in opt.param_groups:
        g["initial_lr"], g["weight_decay"] = cfg["lr"], cfg["weight_decay"]
    sched.base_lrs, sched.last_epoch = [cfg["lr"]] * len(opt.param_groups), it
    for g, f in zip(opt.param_groups, sched.lr_lambdas):
        g["lr"] = cfg["lr"] * f(it)  # LambdaLR.get_lr
    sched._last_lr = [g["lr"] for g in opt.param_groups]
    return st, changed


def resume_checkpoint(out_dir, cfg, model, clf, opt, sched, may_change, rank, world, dev):
    """--resume: out_dir's checkpoint verified, state.pt loaded into model (+ head), optimizer and schedule (the
    settings in may_change as given now), this rank's generators restored, log.jsonl cut back to its iteration;
    -> (state, {key: (saved, now)} of the settings that changed)."""
    verify_checkpoint(out_dir)
    st, changed = load_checkpoint(out_dir / "state.pt", cfg, model, clf, opt, sched, may_change)
    restore_rng(st, rank, world, dev)
    if rank == 0:
        trim_log(out_dir / "log.jsonl", st["iter_num"])
    return st, changed


def read_head(out_dir, head):
    """out_dir/head.safetensors into the classifier head (nn.Linear), or one line naming the file."""
    f = Path(out_dir) / "head.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: not found (no trained classifier head to evaluate)")
    try:
        sd = load_file(f)
    except Exception as e:
        raise CheckpointError(f"{f}: cannot read ({type(e).__name__}: {_first(e)})") from None
    want = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    if {k: tuple(v.shape) for k, v in sd.items()} != want:
        got = {k: tuple(v.shape) for k, v in sd.items()}
        raise CheckpointError(f"{f}: tensors {got}, the head of this task needs {want} (another task's head?)")
    head.load_state_dict(sd)


def trim_log(path, it):
    """Drop the records of log.jsonl past iteration it (written after the checkpoint a resume starts from)."""
    p = Path(path)
    if not p.is_file():
        return
    keep = []
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if not (isinstance(rec, dict) and isinstance(rec.get("iter"), int) and rec["iter"] > it):
            keep.append(line)
    atomic_write(p, "".join(line + "\n" for line in keep))


# one run per out_dir: out_dir/.lock holds "host pid"; a lock whose process is gone (same host) is taken over
LOCK = ".lock"


def lock_out_dir(out_dir):
    f, me = Path(out_dir) / LOCK, f"{socket.gethostname()} {os.getpid()}"
    mine = f.with_name(f"{LOCK}.{os.getpid()}")
    mine.write_text(me)  # complete before it becomes the lock: a reader never sees a half-written one
    try:
        for _ in range(3):
            try:
                os.link(mine, f)  # atomic, fails if a lock exists
                return
            except FileExistsError:
                host, _, pid = f.read_text().strip().partition(" ") if f.is_file() else ("", "", "")
            if host == socket.gethostname() and pid.isdigit() and _alive(int(pid)):
                raise ValueError(f"--out_dir={out_dir}: in use by the run of process {pid} ({f}); use another "
                                 "--out_dir, or wait for it to end")
            if host and host != socket.gethostname():
                raise ValueError(f"--out_dir={out_dir}: in use by process {pid} on {host} ({f}); delete {f} if "
                                 "that run is gone")
            f.unlink(missing_ok=True)  # stale: its process is gone
        raise ValueError(f"--out_dir={out_dir}: cannot take {f}")
    finally:
        mine.unlink(missing_ok=True)


def unlock_out_dir(out_dir):
    f = Path(out_dir) / LOCK
    try:
        if f.read_text().strip() == f"{socket.gethostname()} {os.getpid()}":
            f.unlink()
    except OSError:
        pass


def check_out_dir(cfg, out_dir):
    """out_dir can be a directory; a new run does not replace a checkpoint unasked; resume and eval_only find what
    they read there."""
    for p in (out_dir, *out_dir.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"--out_dir={out_dir}: {p} is a file, not a directory")
            break
    pending = (out_dir / ".new" / MANIFEST).is_file()  # a committed save that recover() completes
    saved = pending or (out_dir / "state.pt").is_file()
    if cfg["resume"] and not saved:
        raise FileNotFoundError(f"--resume=True: {out_dir / 'state.pt'} does not exist")
    if not (cfg["resume"] or cfg["eval_only"] or cfg["overwrite"]) and saved:
        raise ValueError(f"--out_dir={out_dir} holds a checkpoint ({out_dir / 'state.pt'}): continue it with "
                         "--resume=True, or replace it with --overwrite=True (or use another --out_dir)")
    if cfg["eval_only"]:
        if not out_dir.is_dir():
            raise FileNotFoundError(f"--eval_only=True: --out_dir={out_dir} does not exist (it reads the adapter "
                                    "there; for the base model pass an empty directory)")
        have = [f for f in ("adapter_config.json", "adapter_model.safetensors") if (out_dir / f).is_file()]
        if len(have) == 1 and not pending:
            raise FileNotFoundError(f"--eval_only=True: {out_dir / have[0]} without "
                                    f"{({'adapter_config.json', 'adapter_model.safetensors'} - set(have)).pop()}")


def start_run(out_dir, overwrite):
    """Rank 0, out_dir locked: a save that a crash interrupted completed, or discarded; --overwrite: the old
    checkpoint and log.jsonl removed."""
    recover(out_dir)
    if overwrite:
        for f in (*FILES, "log.jsonl"):
            (out_dir / f).unlink(missing_ok=True)


@contextlib.contextmanager
def claim(out_dir, overwrite, master=True):
    """The master's hold on out_dir while a run uses it: created, locked, a crashed save finished (or discarded),
    --overwrite's old files removed; unlocked on the way out. Other ranks only wait inside."""
    if not master:
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    lock_out_dir(out_dir)
    try:
        start_run(out_dir, overwrite)
        yield
    finally:
        unlock_out_dir(out_dir)


def _alive(pid):
    if pid == os.getpid():
        return False  # ours, left by an earlier run in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _shard_like(full, p):
    """The full tensor laid out as p: a DTensor sharded as p (FSDP2), else on p's device."""
    if not hasattr(p, "device_mesh"):
        return full.to(p.device)
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full.to(local(p).device), p.device_mesh, p.placements)


def _full(t):
    """A DTensor's full value (an all-gather: every rank calls it), else t."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# -----------------------------------------------------------------------------
# how a run stops


class TrainingDiverged(RuntimeError):
    """A non-finite loss: train.main() prints it as one line and exits 1."""


class Interrupted(BaseException):
    """SIGINT / SIGTERM: train.main() prints one line and exits 128 + the signal number (130, 143). In the training
    loop the first one stops after the current step and saves a checkpoint; elsewhere it stops at once."""

    def __init__(self, signum, saved=False):
        super().__init__(signum)
        self.signum, self.saved, self.run = signum, saved, None


SIGNALS = SimpleNamespace(armed=False, got=None)  # armed: inside the training loop


def on_signal(signum, frame):
    if SIGNALS.armed and SIGNALS.got is None:
        SIGNALS.got = signum  # the loop finishes the step, saves, then raises Interrupted
    else:
        raise Interrupted(signum)


@contextlib.contextmanager
def signal_handlers():
    """SIGINT and SIGTERM go to on_signal while inside (handlers can only be set from the main thread)."""
    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
