"""(placeholder: the lead merges this section into checkpoint.py's docstring and imports)"""
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from model import lora_state_dict, save_adapter
from reflora import local

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


def save_checkpoint(out_dir, model, lora, head, state):
    """Each file is written to out_dir/.tmp, then os.replace'd; state.pt goes last and holds its own copy of
    the LoRA (and head) tensors, so a crash at any point leaves a consistent, loadable checkpoint."""
    out, tmp = Path(out_dir), Path(out_dir) / ".tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    save_adapter(model, tmp, lora)
    if head is not None:
        save_file({k: v.contiguous() for k, v in head.items()}, tmp / "head.safetensors")
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    torch.save(dict(state, lora=lora, head=head), tmp / "state.pt")
    os.replace(tmp / "state.pt", out / "state.pt")
    tmp.rmdir()


@torch.no_grad()
def load_checkpoint(path, cfg, model, clf, opt, sched):
    """Restore LoRA (+ head), optimizer (RefLoRA state included) and scheduler from state.pt; -> the state dict."""
    st = torch.load(path, map_location="cpu", weights_only=True)
    for k in ("task", "glue_task", "init_from", "method", "lora_r", "lora_alpha", "lora_targets", "batch_size", "seed"):
        if st["config"][k] != cfg[k]:
            raise ValueError(f"--resume: {k}={cfg[k]!r}, but {path} was trained with {st['config'][k]!r}")
    head = {} if clf is None else clf.head.state_dict()
    ours = {**lora_state_dict(model), **{"head." + k: v for k, v in head.items()}}
    theirs = {**st["lora"], **{"head." + k: v for k, v in (st["head"] or {}).items()}}
    if theirs.keys() != ours.keys() or any(theirs[k].shape != v.shape for k, v in ours.items()):
        raise ValueError(f"{path}: its LoRA (and head) tensors do not match the model's")
    for k, v in ours.items():
        local(v).copy_(local(_shard_like(theirs[k], v)))
    opt.load_state_dict(st["optimizer"])
    for p, s in opt.state.items():
        if hasattr(p, "device_mesh"):  # FSDP2: the saved full Adam moments -> this rank's shards
            s.update({k: _shard_like(t, p) for k, t in s.items() if k != "step"})
    sched.load_state_dict(st["scheduler"])
    return st


def _shard_like(full, p):
    """The full tensor laid out as p: a DTensor sharded as p (FSDP2), else on p's device."""
    if not hasattr(p, "device_mesh"):
        return full.to(p.device)
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full.to(local(p).device), p.device_mesh, p.placements)


def _full(t):
    """A DTensor's full value (an all-gather: every rank calls it), else t."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
