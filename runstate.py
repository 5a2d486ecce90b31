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
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import SafetensorError
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
    """path's new text, or its old one if this dies half-way: written beside it, then renamed over it. A failed
    write (a full disk, no permission) is one line naming the file, and leaves no .tmp behind."""
    tmp = Path(f"{path}.tmp")
    with deferred_signals():
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise OSError(f"{path}: cannot write it ({e.strerror or e})") from None


def write_json(path, obj):
    atomic_write(path, json.dumps(obj, indent=1))


# A save is crash-safe at every point: (1) out_dir/.tmp is emptied and every file is written there and fsynced,
# the manifest (checkpoint.json: iter, file sizes and sha256) last; (2) .tmp is renamed to .new: the checkpoint is
# committed; (3) its files are renamed into out_dir, the manifest last, and .new removed. recover(), run first by
# every save, resume and --eval_only, discards a .tmp (a save that died in 1: the previous checkpoint is untouched)
# and rolls a .new forward (a save that died in 3) once its files match its manifest (a damaged .new is discarded,
# with one line), so out_dir always ends up holding one complete checkpoint. SIGINT / SIGTERM wait for a save to end.
MANIFEST = "checkpoint.json"
FILES = ("adapter_config.json", "adapter_model.safetensors", "head.safetensors", "state.pt", MANIFEST)


# config keys the optimizer's state_dict saves (RefLoRA.load_state_dict checks them against the optimizer it
# loads into): state.pt keeps them there once, and run_config() puts them back into the config
OPTIMIZER_KEYS = dict(method="method", base="base", reflora_warmup="warmup", reflora_interval="interval")


def result_files(out_dir, glue_task=None):
    """[(what, path)] of the results a finished run leaves in out_dir that exist: the adapter, the head, the eval."""
    files = [("adapter", out_dir / "adapter_model.safetensors"), ("head", out_dir / "head.safetensors"),
             ("eval", out_dir / (f"eval_{glue_task}.json" if glue_task else "eval.json"))]
    return [(k, f) for k, f in files if f.is_file()]


def run_config(st):
    """The resolved config of a state.pt dict: its config with the optimizer's own settings (OPTIMIZER_KEYS)."""
    meta = st.get("optimizer", {}).get("reflora", {}) if isinstance(st.get("optimizer"), dict) else {}
    return {**st["config"], **{k: meta[m] for k, m in OPTIMIZER_KEYS.items() if m in meta}}


def save_checkpoint(out_dir, model, lora, head, state):
    """The PEFT adapter (+ head.safetensors) and state.pt (with its own copy of the LoRA and head tensors). A write
    that fails (a full disk, an I/O error) is one line naming the file; .tmp is removed, the last checkpoint kept."""
    out = Path(out_dir)
    with deferred_signals():
        recover(out)
        tmp, name = out / ".tmp", "."
        try:
            tmp.mkdir()
            name = "adapter_model.safetensors"
            save_adapter(model, tmp, lora)
            if head is not None:
                name = "head.safetensors"
                save_file({k: v.contiguous() for k, v in head.items()}, tmp / name)
            name = "state.pt"
            with open(tmp / name, "wb") as f:  # a file object: torch then chains the OSError of a failed write
                config = {k: v for k, v in state["config"].items() if k not in OPTIMIZER_KEYS}
                torch.save(dict(state, config=config, lora=lora, head=head), f)
            sizes = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
            digests = {n: _sha256(tmp / n) for n in sizes}
            name = MANIFEST
            (tmp / MANIFEST).write_text(json.dumps(dict(iter=state["iter_num"], files=sizes, sha256=digests)))
            for name in [*sizes, MANIFEST, "."]:
                _fsync(tmp / name)
            name = "."
            os.rename(tmp, out / ".new")  # the commit
        except (OSError, RuntimeError, SafetensorError) as e:  # what a failed write raises (torch: RuntimeError)
            shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(f"{tmp if name == '.' else tmp / name}: cannot save the checkpoint of iter "
                          f"{state['iter_num']} ({why(e)}); {out} keeps its last one ({_last(out)})") from None
        _fsync(out)
        recover(out, verified=True)


def recover(out_dir, verified=False):
    """Finish a committed save (.new) that a crash interrupted, once its files match its manifest (verified: the
    save that just wrote it); discard a damaged one (one line on stderr) and an uncommitted one (.tmp)."""
    out = Path(out_dir)
    new = out / ".new"
    with deferred_signals():
        if (new / MANIFEST).is_file():
            try:
                if not verified:
                    _verify(new, out)
            except CheckpointError as e:
                print(f"{e}: discarded, {out} keeps its last checkpoint", file=sys.stderr, flush=True)
            else:
                for f in sorted(new.iterdir(), key=lambda f: f.name == MANIFEST):  # the manifest last
                    os.replace(f, out / f.name)
                _fsync(out)
        for d in (new, out / ".tmp"):
            if d.exists():
                shutil.rmtree(d)


def verify_checkpoint(out_dir):
    """-> the manifest's iter (None without one, an older out_dir); a missing, resized or changed file is one line."""
    out = Path(out_dir)
    if not (out / MANIFEST).is_file():
        return None
    return _verify(out)


def _verify(d, moved_to=None):
    """The manifest of d against its files (sizes, and sha256 when it lists them; files a roll-forward already
    moved are looked for in moved_to) -> its iter, or one CheckpointError line naming the file."""
    try:
        m = json.loads((d / MANIFEST).read_text())
        it, files, digests = int(m["iter"]), dict(m["files"]), dict(m.get("sha256", {}))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{d / MANIFEST}: cannot read ({type(e).__name__}: {_first(e)})") from None
    for name, size in files.items():
        f = d / name if (d / name).is_file() or moved_to is None else moved_to / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (listed in {d / MANIFEST}, checkpoint of iter {it})")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, {d / MANIFEST} says {size}: damaged")
        if name in digests and _sha256(f) != digests[name]:
            raise CheckpointError(f"{f}: its sha256 is not the one {d / MANIFEST} lists: damaged")
    return it


def _last(out):  # "iter N" of out's manifest, for messages
    try:
        return f"iter {int(json.loads((out / MANIFEST).read_text())['iter'])}"
    except (OSError, ValueError, KeyError, TypeError):
        return "none" if not (out / "state.pt").is_file() else str(out / "state.pt")


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def why(e):
    """What made a write fail, in a few words: the OSError's reason (torch chains it, safetensors names its
    errno), else the exception's first line."""
    for x in (e, e.__cause__, e.__context__):
        if isinstance(x, OSError) and x.strerror:
            return x.strerror
    m = re.search(r"os error (\d+)", str(e))
    return os.strerror(int(m[1])) if m else f"{type(e).__name__}: {_first(e)}"


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
    it, best = st["iter_num"], st["best_val"]
    if type(it) is not int or it < 0:
        raise CheckpointError(f"{path}: iter_num = {it!r}, expected a whole number >= 0: damaged")
    if type(best) not in (int, float) or math.isnan(best):
        raise CheckpointError(f"{path}: best_val = {best!r}, expected a number: damaged")
    return dict(st, config=run_config(st))


def nonfinite(tensors):
    """The name of the first floating-point tensor of {name: tensor} holding a NaN or an inf, else None."""
    return next((k for k, t in tensors.items() if torch.is_tensor(t) and t.is_floating_point()
                 and not bool(torch.isfinite(t).all())), None)


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
                             "cannot change on resume (README: Checkpoints and resume)")
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
        moments = {f"optimizer state {i}.{k}": t for i, s in st["optimizer"]["state"].items() for k, t in s.items()}
        opt.load_state_dict(st["optimizer"])
        it = st["iter_num"]
    except Exception as e:
        raise CheckpointError(f"{path}: optimizer state does not fit ({type(e).__name__}: {_first(e)})") from None
    if bad := nonfinite(theirs) or nonfinite(moments):
        raise CheckpointError(f"{path}: {bad} holds NaN or inf: damaged (or saved from a diverged run)")
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


def resume_checkpoint(out_dir, cfg, model, clf, opt, sched, may_change, rank, world, dev, total, data):
    """--resume: out_dir's checkpoint verified, state.pt loaded into model (+ head), optimizer and schedule (the
    settings in may_change as given now), this rank's generators restored, log.jsonl cut back to its iteration;
    -> (state, {key: (saved, now)} of the settings that changed). Refused, before anything is written: a run with
    no step left (total, stop_iter at or below the saved iteration), a training file (data: {path: [size, sha256]})
    that changed since the checkpoint was saved."""
    verify_checkpoint(out_dir)
    path = out_dir / "state.pt"
    st, changed = load_checkpoint(path, cfg, model, clf, opt, sched, may_change)
    it, stop = st["iter_num"], cfg["stop_iter"]
    if it >= total:
        steps = f"--max_iters={cfg['max_iters']}" if cfg["max_iters"] else f"--epochs={cfg['epochs']} ({total} steps)"
        raise ValueError(f"--resume=True: {path} is at iter {it} and {steps} ends there: nothing left to train "
                         "(raise --max_iters or --epochs; --eval_only=True evaluates it)")
    if stop and stop <= it:
        raise ValueError(f"--resume=True --stop_iter={stop}: {path} is already at iter {it}: nothing left to train "
                         "(raise --stop_iter, or 0 to train to the end)")
    saved = st["data"] if isinstance(st.get("data"), dict) else data  # checkpoints before it was recorded: data
    for f in sorted({*saved, *data}):
        if saved.get(f) != data.get(f):
            now = "is gone" if f not in data else "is new" if f not in saved else "changed"
            raise ValueError(f"--resume=True: {f} {now} since {path} was saved (size and sha256 recorded there): "
                             "the run would not see its own batches; restore it, or start a new run")
    try:
        restore_rng(st, rank, world, dev)
    except Exception as e:
        raise CheckpointError(f"{path}: its generator states do not fit ({type(e).__name__}: {_first(e)})") from None
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
    if bad := nonfinite(sd):
        raise CheckpointError(f"{f}: {bad} holds NaN or inf")
    head.load_state_dict(sd)


def trim_log(path, it):
    """Drop the records of log.jsonl past iteration it (written after the checkpoint a resume starts from)."""
    p = Path(path)
    if not p.is_file():
        return
    keep = []
    for line in p.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue  # a line cut by a crash, or garbage
        if not (isinstance(rec, dict) and isinstance(rec.get("iter"), int) and rec["iter"] > it):
            keep.append(line)
    atomic_write(p, "".join(line + "\n" for line in keep))


# one run per out_dir: out_dir/.lock holds "host pid" and, while the run lives, its flock (the kernel drops it when
# the process dies, so a takeover of a stale lock happens once, by whoever holds the flock); a lock that names a
# live process of this host, or another host, is refused (that run may not flock, or not on this machine)
LOCK = ".lock"
_HELD = {}  # out_dir -> the open, flocked .lock of this process's run there


def lock_out_dir(out_dir):
    f, me = Path(out_dir) / LOCK, f"{socket.gethostname()} {os.getpid()}"
    with deferred_signals():
        for _ in range(5):
            try:
                fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise OSError(f"{f}: cannot create the lock of --out_dir={out_dir} ({e.strerror})") from None
            try:
                if _take(fd, f, out_dir, me):
                    _HELD[str(out_dir)] = fd
                    return
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the lock file was removed or replaced while we opened it: again
    raise ValueError(f"--out_dir={out_dir}: cannot take {f}")


def _take(fd, f, out_dir, me):
    """True once fd (f, opened) is flocked, checked free and holds `me`; False if f is no longer the file fd is."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        locked = True
    except BlockingIOError:
        locked = False
    except OSError:  # a filesystem without flock: the holder's pid alone decides
        locked = None
    try:
        if os.fstat(fd).st_ino != os.stat(f).st_ino:
            return False
    except FileNotFoundError:
        return False
    held = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
    host, _, pid = held.partition(" ")
    mine = host == socket.gethostname() and pid.isdigit()
    if locked is False or mine and _alive(int(pid)):
        who = f"process {pid}" if pid.isdigit() else "another process"
        raise ValueError(f"--out_dir={out_dir}: in use by the run of {who} ({f}); use another --out_dir, or wait "
                         "for it to end")
    if host and not mine and pid.isdigit():
        raise ValueError(f"--out_dir={out_dir}: in use by process {pid} on {host} ({f}); delete {f} if that run "
                         "is gone")
    try:  # free, or stale (its process is gone, or it is unreadable): ours now
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        os.fsync(fd)
    except OSError as e:
        with contextlib.suppress(OSError):
            f.unlink()
        raise OSError(f"{f}: cannot write the lock of --out_dir={out_dir} ({e.strerror})") from None
    return True


def unlock_out_dir(out_dir):
    f, fd = Path(out_dir) / LOCK, _HELD.pop(str(out_dir), None)
    with deferred_signals():
        try:
            if f.read_text().strip() == f"{socket.gethostname()} {os.getpid()}":
                f.unlink()  # still flocked: nobody takes it between the read and the unlink
        except (OSError, ValueError):
            pass
        if fd is not None:
            os.close(fd)


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
    """Rank 0, out_dir claimed, model and data loaded: --overwrite's old checkpoint and log.jsonl removed."""
    if overwrite:
        for f in (*FILES, "log.jsonl"):
            (out_dir / f).unlink(missing_ok=True)


@contextlib.contextmanager
def claim(cfg, out_dir, master=True):
    """The master's hold on out_dir while a run uses it, taken before anything slow: checked, created, locked, a
    crashed save finished (or discarded), then checked again under the lock (so two runs cannot both find it free:
    the second one finds the lock, or the first one's checkpoint); unlocked on the way out, and the folders it
    created removed again if the run wrote nothing there. Other ranks only check and wait inside."""
    check_out_dir(cfg, out_dir)  # before anything is created
    if not master:
        yield
        return
    made = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"--out_dir={out_dir}: cannot create it ({e.strerror})") from None
    try:
        lock_out_dir(out_dir)
        try:
            recover(out_dir)
            check_out_dir(cfg, out_dir)
            yield
        finally:
            unlock_out_dir(out_dir)
    finally:
        for p in made:  # deepest first; stops at the first one that holds something
            try:
                p.rmdir()
            except OSError:
                break


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


def stop_if_diverged(loss, params, reduce, it, out_dir, last_saved, what="loss"):
    """TrainingDiverged if the loss or a trainable tensor is not finite (reduce: the sum over the ranks, so that every
    rank takes the same decision). A host sync: at log and checkpoint points only."""
    bad = (~torch.isfinite(loss)).float() + sum((~torch.isfinite(local(p))).any().float() for p in params)
    if reduce(bad).item():
        good = f"{out_dir / 'state.pt'} (iter {last_saved})" if last_saved is not None else "none"
        raise TrainingDiverged(f"non-finite {what} at or before iter {it}: stopping; last good checkpoint: {good}")


class Interrupted(BaseException):
    """SIGINT / SIGTERM: train.main() prints one line and exits 128 + the signal number (130, 143). In the training
    loop the first one stops after the current step and saves a checkpoint; inside a write (deferred_signals) it
    stops once the write is done; elsewhere at once. Every later signal is ignored: nothing cuts a save short (to
    force a stop, SIGKILL: the saves are crash-safe, so it loses the steps since the last checkpoint, no file)."""

    def __init__(self, signum, saved=False):
        super().__init__(signum)
        self.signum, self.saved, self.run = signum, saved, None
        SIGNALS.got, SIGNALS.raised = SIGNALS.got or signum, True

    def line(self):
        """What the CLI prints: the signal, the step it stopped after, the checkpoint to continue from."""
        r = self.run
        what = "nothing saved" if r is None or r.last_saved is None else \
            f"checkpoint of iter {r.last_saved} in {r.out_dir}, continue with --resume=True"
        return f"{signal.Signals(self.signum).name}: stopped{f' after iter {r.it}' if r else ''}; {what}"


# armed: inside the training loop; got: the first signal; raised: Interrupted raised for it; defer: writes under way;
# exiting: the CLI process leaves after a signal (later ones are then ignored to the end, not sent to the defaults)
SIGNALS = SimpleNamespace(armed=False, got=None, raised=False, defer=0, exiting=False)


def on_signal(signum, frame):
    if SIGNALS.got is not None:
        return  # already stopping
    SIGNALS.got = signum
    if not (SIGNALS.armed or SIGNALS.defer):
        raise Interrupted(signum)
    # the loop finishes the step, saves, then raises Interrupted; a write finishes, then deferred_signals raises it


@contextlib.contextmanager
def deferred_signals():
    """A write that a signal must not cut in half: a SIGINT / SIGTERM that comes inside takes effect at its end."""
    SIGNALS.defer += 1
    try:
        yield
    finally:
        SIGNALS.defer -= 1
    if not (SIGNALS.defer or SIGNALS.armed or SIGNALS.raised) and SIGNALS.got is not None:
        raise Interrupted(SIGNALS.got)


@contextlib.contextmanager
def signal_handlers():
    """SIGINT and SIGTERM go to on_signal while inside (handlers can only be set from the main thread); on the way
    out the old handlers come back, unless SIGNALS.exiting: then later signals are ignored while the process ends."""
    main = threading.current_thread() is threading.main_thread()
    SIGNALS.__dict__.update(armed=False, got=None, raised=False, defer=0, exiting=False)
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, signal.SIG_IGN if SIGNALS.exiting else h)
