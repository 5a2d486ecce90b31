"""
How a job is laid out over torchrun's processes: the process group and each rank's device, FSDP2's sharding of
the model (each block, the head, then the rest as the root), the training forward (compiled, DDP-wrapped), and the
reductions the loop needs. DDP all-reduces gradients on the last micro-step only (train.py), so RefLoRA sees the
synchronized gradients and every rank computes the same S̃; under FSDP2 the LoRA factors are row-sharded
DTensors, RefLoRA sums its r×r Grams and norms over the shards (reflora.py), and state.pt holds full tensors, the
same file as without sharding (runstate.py).

References: nanoGPT train.py (DDP setup from torchrun's environment); PyTorch's FSDP2 `fully_shard` and
`MixedPrecisionPolicy`; gpt-fast's tp.py for keeping the layout apart from the model.
"""
import os

import torch

_HOST = None  # under torchrun: a gloo group over all ranks, for host-side flags (setup)


def setup(device, backend="", fsdp=False):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: -> (ddp, rank, world, device); device: auto | cpu | cuda[:N];
    the process group on nccl for CUDA, gloo for CPU, unless `backend` says. fsdp: sharding wanted (needs torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launched = "RANK" in os.environ  # torchrun: a process group even for one process (DDP / FSDP2 on one GPU)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device={device}: this torch ({torch.__version__}) sees no CUDA device")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ValueError(f"--device={device}: only {torch.cuda.device_count()} CUDA device(s)")
    if fsdp and not launched:
        raise ValueError("--fsdp=True shards over processes: run it under torchrun")
    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if not launched:
        return False, 0, 1, torch.device(dev)
    torch.distributed.init_process_group(backend or ("nccl" if dev.startswith("cuda") else "gloo"))
    global _HOST
    _HOST = torch.distributed.new_group(backend="gloo")  # CPU tensors, also beside NCCL (any_rank)
    if dev.startswith("cuda"):
        dev = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(dev)
    return True, int(os.environ["RANK"]), world, torch.device(dev)


def shard(net, model, clf, bf16):
    """FSDP2: each block, the head, then the rest (embeddings, norm, output) as the root; rows sharded over ranks."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # imported here: it adds ~2 s to a start
    # a block is gathered in one dtype: under bf16 the float32 LoRA factors travel (and compute) in bf16 too;
    # gradients are reduced and kept in float32
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for layer in model.layers:
        fully_shard(layer, mp_policy=mp)
    if clf is not None:
        fully_shard(clf.head)  # float32, as the head computes
    fully_shard(net, mp_policy=mp)


def wrap(net, ddp, fsdp, dev):
    """The training forward: `net` under DDP (checkpoints read `net` itself), else `net` (under FSDP the sharded
    modules are their own wrapper)."""
    if ddp and not fsdp:
        return torch.nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    return net


def any_rank(flag, ddp):
    """The largest of a host-side number over the ranks (a signal caught on any of them; 0 for none), on setup's
    gloo group: a CPU tensor, so asking after every step costs no device sync, also when training runs on NCCL."""
    t = torch.tensor(float(flag))
    if ddp:
        torch.distributed.all_reduce(t, torch.distributed.ReduceOp.MAX, group=_HOST)
    return int(t.item())


def reduced(t, ddp):
    """t summed over the ranks, in place, under torchrun; t as it is in one process."""
    if ddp:
        torch.distributed.all_reduce(t)
    return t
