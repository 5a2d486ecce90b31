"""
Finetune a LLaMA-family model with LoRA / RefLoRA / RefLoRA-S, then evaluate it.

    python train.py                                          # smollm2-135m on commonsense, CPU-sized recipe
    python train.py config/llama2_7b.py --init_from=/path/to/Llama-2-7b-hf
    torchrun --standalone --nproc_per_node=8 train.py config/llama3_8b.py --init_from=/path/to/Meta-Llama-3-8B
    python train.py --task=glue --glue_task=rte              # LoRA + a linear head on the last token
    python train.py --eval_only=True --out_dir=out           # evaluate the adapter in out_dir

Defaults are the plain values below; `config/<name>.py` files (`name = literal` lines, read without exec) and
`--name=value` flags override them, in order. The resolved config is printed and saved in every checkpoint. Under
torchrun the job is data-parallel (DDP, gradients all-reduced on the last micro-step, so every rank computes the
same S̃), or with --fsdp=True sharded by rows (FSDP2: RefLoRA sums its r×r Grams over the shards); see distributed.py.

References: nanoGPT train.py (configurator, loop, log line, DDP); the authors' commonsense recipe (zhangyilang/RefLoRA
commonsense_reasoning/finetune.py) and HF Trainer as they ran it (linear warmup and decay, grad-norm clip 1.0, loss
averaged over the accumulation steps). Its one job: the config values, then the loop; the data is dataset.py's,
scoring evaluate.py's, the saved state runstate.py's, pretrained weights weights.py's.
"""
import json
import os
import re
import resource
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

import distributed
import plot
from configurator import check, configure, fail, hms
from data.commonsense.prepare import DATASETS
from data.glue.prepare import TASKS as GLUE_TASKS
from dataset import BatchOrder, check_against, cls_batch, encode_cls, encode_lm, identity, lm_batch, load_data, \
    resolve_data_dir, steps_per_epoch, train_files
from distributed import reduced
from evaluate import base_accuracy, evaluate_out_dir, evaluate_run, validate
from model import TARGETS, Classifier, add_lora, autocast, cls_loss, compile_blocks, compute_dtype, flops_per_token, \
    peak_flops
from reflora import BASES, METHODS, RefLoRA, local, step_norm
from runstate import SIGNALS, Interrupted, TrainingDiverged, claim, result_files, resume_checkpoint, save_checkpoint, \
    signal_handlers, start_run, stop_if_diverged, training_state
from sample import MAX_BEAMS
from weights import load_base

_before = set(globals())
# -----------------------------------------------------------------------------
# defaults: the quick start, smollm2-135m on commonsense in minutes on a 2-core CPU (README); config/*.py hold
# the paper's GPU recipes and config/smollm2_cpu.py the CPU recipe with the benchmark's protocol
# model and method
init_from = "smollm2-135m"  # preset name (tiny, smollm2-135m), Meta/HF checkpoint directory, or .gguf file
tokenizer = ""  # "" = the checkpoint's own ("bytes" for the random-init tiny preset)
method = "reflora-s"  # lora | reflora | reflora-s
base = "adamw"  # adamw | sgd (plain gradient descent, the setting of Theorems 3-6): the step every method takes
lora_r = 16
lora_alpha = 32
lora_dropout = 0.05
lora_targets = ("wq", "wk", "wv", "w3", "w2")  # q, k, v, up, down (the paper's targets)
reflora_warmup = 20  # optimizer steps before refactoring starts
reflora_interval = 1
# task and data
task = "commonsense"  # commonsense | glue
glue_task = "rte"  # cola | sst2 | mrpc | stsb | qqp | mnli | qnli | rte (with task=glue)
data_dir = ""  # "" = data/<task> if prepared there, else ../shared/data/<task>
data_path = ""  # your own training data: FILE.json / .jsonl of {instruction, input, output} (replaces data_dir's)
out_dir = "out"
cutoff_len = 256  # max tokens per training example (the classifier's max length for glue)
val_set_size = 120  # commonsense examples held out for validation loss
eval_sets = ()  # commonsense test sets, e.g. boolq,piqa; () = every one present in data_dir
eval_limit = 20  # examples per eval set (0 = all)
eval_batch_size = 16
num_beams = 1  # greedy; the benchmark's protocol is 4 beams, 32 new tokens (config/*.py)
max_new_tokens = 16
eval_base = True  # evaluate the base model on the same examples first (cached in out_dir), shown beside the result
benchmark = True  # evaluate the commonsense test sets after training; False: validation loss only
# optimization
batch_size = 8  # global batch per optimizer step
micro_batch_size = 8  # per process; gradient accumulation in between
grad_checkpoint = False  # recompute each block's activations in backward: less memory, ~1/3 more compute
group_by_length = True  # batches of similar length (less padding), as HF's group_by_length; order shuffled
epochs = 2
max_iters = 60  # optimizer steps; 0 = `epochs` passes over the training set
stop_iter = 0  # stop (after a checkpoint) at this step, the schedule unchanged: time-boxed jobs; 0 = never
lr = 5e-4
weight_decay = 0.0
warmup_steps = 10  # linear warmup, then linear decay to 0
grad_clip = 1.0  # 0 = no clipping
# system and logging
log_interval = 10
eval_interval = 0  # validation loss + checkpoint every this many steps, and at the end (0 = at the end only)
resume = False  # continue the run in out_dir from its state.pt (README: Checkpoints and resume)
overwrite = False  # start a new run in an out_dir that holds a checkpoint, replacing it
eval_only = False
seed = 42
device = "auto"  # auto | cpu | cuda | cuda:N
dtype = "auto"  # auto (bfloat16 on CUDA and on CPUs with avx512_bf16 or AMX, else float32) | float32 | bfloat16
compile = torch.cuda.is_available()  # torch.compile each block for training (CPU too: inductor; at the first step)
backend = ""  # torch.distributed backend under torchrun; "" = nccl on CUDA, gloo on CPU
fsdp = False  # under torchrun: FSDP2 (fully_shard per block) instead of DDP, for models that do not fit one GPU
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if k not in _before and k != "_before"}
# --task=glue: defaults that suit a LLaMA classifier (used unless a config file or flag sets the key)
GLUE_DEFAULTS = dict(lora_r=8, lora_alpha=16, lr=1e-4, epochs=3, max_iters=0, cutoff_len=128, warmup_steps=100,
                     reflora_warmup=100, batch_size=16, micro_batch_size=16, group_by_length=False, eval_limit=0,
                     eval_interval=500)
CHOICES = dict(method=METHODS, base=BASES, task=("commonsense", "glue"), glue_task=tuple(GLUE_TASKS),
               dtype=("auto", "float32", "bfloat16"))


# -----------------------------------------------------------------------------
# configuration: configurator.py casts and merges; the checks below run before anything is written

INF = float("inf")
RULES = [((k,), lambda v, o=o: v in o, f"expected one of {', '.join(o)}") for k, o in CHOICES.items()] + [
    (("lora_r", "batch_size", "micro_batch_size", "cutoff_len", "eval_batch_size", "num_beams", "max_new_tokens",
      "log_interval", "reflora_interval"), lambda v: v >= 1, "must be >= 1"),
    (("max_iters", "stop_iter", "epochs", "eval_limit", "warmup_steps", "reflora_warmup", "eval_interval",
      "val_set_size"), lambda v: v >= 0, "must be >= 0"),
    (("lr", "lora_alpha"), lambda v: 0 < v < INF, "must be a finite number > 0"),
    (("weight_decay",), lambda v: 0 <= v < INF, "must be a finite number >= 0"),
    (("grad_clip",), lambda v: 0 <= v < INF, "must be a finite number >= 0 (0: no clipping)"),
    (("lora_dropout",), lambda v: 0 <= v < 1, "must be in [0, 1)"),
    (("device",), lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v), "expected auto, cpu, cuda or cuda:N"),
    (("num_beams",), lambda v: v <= MAX_BEAMS, f"at most {MAX_BEAMS} beams"),
    (("seed",), lambda v: -2 ** 63 <= v < 2 ** 63, "must be in [-2**63, 2**63) (a torch generator's seed)"),
    (("out_dir",), lambda v: v.strip() != "", "empty: name a directory (e.g. --out_dir=out)"),
    (("init_from",), lambda v: v.strip() != "", "empty: a preset name or a checkpoint path"),
]
# --resume=True: these may differ from the checkpoint's config and take effect (the lr schedule is rebuilt from
# them); every other saved setting (model, tokenizer, LoRA, method, batch sizes, seed, task, data) must be equal
MAY_CHANGE = {"lr", "weight_decay", "grad_clip", "max_iters", "epochs", "stop_iter", "warmup_steps", "log_interval",
              "eval_interval", "eval_sets", "eval_limit", "eval_batch_size", "num_beams", "max_new_tokens",
              "out_dir", "resume", "overwrite", "eval_only", "device", "dtype", "compile", "backend", "fsdp",
              "grad_checkpoint", "benchmark"}


def parse_config(argv):
    """Defaults, then config files (positional) and --name=value flags in order -> the resolved, checked dict."""
    cfg, given = configure(argv, DEFAULTS, __doc__)
    if cfg["task"] == "glue":
        cfg.update({k: v for k, v in GLUE_DEFAULTS.items() if k not in given})
    check(cfg, RULES)
    if cfg["batch_size"] % cfg["micro_batch_size"]:
        fail(f"--batch_size={cfg['batch_size']} is not a multiple of --micro_batch_size={cfg['micro_batch_size']}")
    for k, names in (("lora_targets", TARGETS), ("eval_sets", DATASETS)):
        if bad := [n for n in cfg[k] if n not in names] or ([] if cfg[k] or k == "eval_sets" else ["(none)"]):
            fail(f"--{k}: unknown {','.join(bad)} (expected names from {','.join(names)})")
    if cfg["resume"] and cfg["overwrite"]:
        fail("--resume=True and --overwrite=True: choose one")
    if not cfg["eval_only"] and cfg["max_iters"] == 0 and cfg["epochs"] == 0:
        fail("--max_iters=0 and --epochs=0: no training step (set one of them; --eval_only=True evaluates the model "
             "without training it)")
    return cfg


# -----------------------------------------------------------------------------
# model: LLaMA + LoRA (+ model.Classifier's float32 linear head for glue)


def build(cfg, device, dtype):
    """-> (model, tokenizer, classifier or None): pretrained weights, LoRA on the targets, everything else frozen."""
    model, tok, _ = load_base(cfg["init_from"], cfg["tokenizer"], dtype, device)
    add_lora(model, cfg["lora_r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["lora_targets"])
    model.grad_checkpoint = cfg["grad_checkpoint"]
    clf = Classifier(model, GLUE_TASKS[cfg["glue_task"]]["num_labels"]) if cfg["task"] == "glue" else None
    return model, tok, clf


# -----------------------------------------------------------------------------
# training: train() reads top to bottom; the step, the log line and the checkpoint are the helpers below it


@dataclass
class Run:
    """One training run: what train() sets up, and the step, the log line and the checkpoint share."""
    cfg: dict
    ddp: bool
    rank: int
    world: int
    dev: torch.device
    out_dir: Path
    log: Callable
    model: Any  # the LLaMA with LoRA
    tok: Any
    clf: Any  # the GLUE classifier around model, or None
    train_set: list
    val_set: list
    data_dir: Path
    steps_per_epoch: int
    base: Optional[dict]  # the base model's accuracy, the final table's first column (None: not measured)
    data: dict = field(default_factory=dict)  # the training files' {path: [size, sha256]}, saved and checked on resume
    opt: Any = None  # RefLoRA, and HF's linear schedule
    sched: Any = None
    fwd: Any = None  # the training forward (compiled, DDP)
    order: Any = None  # dataset.BatchOrder: the examples of each step
    trainable: list = field(default_factory=list)  # the parameters the optimizer steps
    logf: Any = None  # the master's out_dir/log.jsonl
    it: int = 0  # optimizer steps taken
    best_val: float = float("inf")
    last_saved: Optional[int] = None  # the iteration of the last checkpoint
    loss_sum: Any = None  # the log interval: summed loss, start time and step, real tokens, FLOPs
    t_log: float = 0.0
    it_log: int = 0
    tokens: int = 0
    flops: float = 0.0

    def __post_init__(self):
        self.net = self.model if self.clf is None else self.clf
        self.encode = encode_lm if self.clf is None else encode_cls
        self.total = self.cfg["max_iters"] or self.cfg["epochs"] * self.steps_per_epoch
        self.per_rank, self.mb = self.cfg["batch_size"] // self.world, self.cfg["micro_batch_size"]
        self.accum = self.per_rank // self.mb
        self.f0, self.f1 = flops_per_token(self.model, lm_head=self.clf is None)
        self.peak = peak_flops(self.dev)  # None on CPU: mfu is printed as -


def train(cfg):
    """Finetune (then evaluate), or with eval_only just evaluate, as cfg says; -> a dict of final numbers. out_dir is
    checked and locked in one step before anything slow, the model and data checked before anything is written."""
    ddp, rank, world, dev = distributed.setup(cfg["device"], cfg["backend"], cfg["fsdp"] and not cfg["eval_only"])
    out_dir, log = Path(cfg["out_dir"]), (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    log("config: " + json.dumps(cfg))
    with claim(cfg, out_dir, master=rank == 0):
        torch.manual_seed(cfg["seed"])  # the same LoRA / head init on every rank
        model, tok, clf = build(cfg, dev, compute_dtype(cfg["dtype"], dev))
        data_dir = resolve_data_dir(cfg)
        check_against(cfg, model, tok, clf, data_dir)
        train_set, val_set = load_data(cfg, data_dir, log) if not cfg["eval_only"] or clf is not None else ([], [])
        n_steps = steps_per_epoch(cfg, train_set, world)
        data = {} if cfg["eval_only"] else identity(train_files(cfg, data_dir))
        if ddp:
            torch.distributed.barrier()
        if cfg["eval_only"]:
            return evaluate_out_dir(cfg, model, tok, clf, data_dir, out_dir, rank, world, log, val_set)
        if rank == 0:
            start_run(out_dir, cfg["overwrite"])
        # the base model's accuracy, cached in out_dir (a resume reads it at the end: nothing scored before its check)
        base = None if clf or cfg["resume"] else base_accuracy(cfg, model, tok, data_dir, out_dir, rank, world, log)
        r = Run(cfg, ddp, rank, world, dev, out_dir, log, model, tok, clf, train_set, val_set, data_dir, n_steps,
                base, data)
        try:
            return _train(r)
        except Interrupted as e:
            e.run = r
            raise


def _train(r):
    cfg = r.cfg
    if cfg["compile"]:  # each block, dynamic shapes: one graph for every batch length (eager when evaluating)
        compile_blocks(r.model, dynamic=True)
        r.log(f"compile: each of the {len(r.model.layers)} blocks, one graph for all (compiled at the first step)")
    if cfg["fsdp"]:  # before the optimizer: fully_shard swaps in DTensor parameters
        distributed.shard(r.net, r.model, r.clf, compute_dtype(cfg["dtype"], r.dev) == torch.bfloat16)
    r.opt, r.sched = _optimizer(cfg, r.model, r.clf, r.total, r.dev)
    r.trainable = [p for p in r.net.parameters() if p.requires_grad]
    torch.manual_seed(cfg["seed"] + r.rank)  # dropout masks differ across ranks
    if cfg["resume"]:  # counters, LoRA (+ head), optimizer, schedule, this rank's generators; log.jsonl cut back
        st, changed = resume_checkpoint(r.out_dir, cfg, r.model, r.clf, r.opt, r.sched, MAY_CHANGE, r.rank, r.world,
                                        r.dev, r.total, r.data)
        r.it, r.best_val, r.last_saved = st["iter_num"], st["best_val"], st["iter_num"]
        r.log(f"resumed from {r.out_dir / 'state.pt'} at iter {r.it}" + "".join(
            f", {k} {a!r} -> {b!r}" for k, (a, b) in changed.items() if k not in ("resume", "out_dir")))
    r.fwd = distributed.wrap(r.net, r.ddp, cfg["fsdp"], r.dev)
    r.log(f"training: {len(r.train_set):,} examples, {r.total} steps of {cfg['batch_size']} ({r.world} × {r.accum} × "
          f"{r.mb}), {sum(p.numel() for p in r.trainable):,} trainable parameters, {cfg['method']} on {cfg['base']}")
    r.logf = open(r.out_dir / "log.jsonl", "a") if r.rank == 0 else None
    lengths = [len(r.encode(r.tok, e, cfg["cutoff_len"])) for e in r.train_set] if cfg["group_by_length"] else None
    r.order = BatchOrder(len(r.train_set), cfg["batch_size"], cfg["seed"], lengths)

    r.net.train()
    r.loss_sum, r.t_log, r.it_log = torch.zeros((), device=r.dev), time.time(), r.it
    SIGNALS.armed, SIGNALS.got = True, None
    try:
        while r.it < r.total and not (cfg["stop_iter"] and r.it >= cfg["stop_iter"]):
            at_log = (r.it + 1) % cfg["log_interval"] == 0 or r.it + 1 == r.total
            old = _factors(r) if at_log else None  # the factors before a step that ends at a log point
            lr = _step(r)
            r.it += 1
            if at_log:
                _log_line(r, lr, old)
            if (cfg["eval_interval"] and r.it % cfg["eval_interval"] == 0) or r.it in (r.total, cfg["stop_iter"]):
                _stop_if_diverged(r, r.loss_sum)
                _checkpoint(r)
                r.t_log = time.time()  # validation time is not training time
            _stop_on_signal(r)
    finally:
        SIGNALS.armed = False
    return _finish(r)


def _finish(r):
    """After the loop: the benchmark of a finished commonsense run, then the last line: where the results are (files
    that exist, loss.png drawn from log.jsonl), how to sample; -> dict(iter, best_val[, eval])."""
    cfg, out_dir, log, result = r.cfg, r.out_dir, r.log, dict(iter=r.it, best_val=r.best_val)
    with torch.compiler.set_stance("force_eager"):  # compiled blocks (compile=True) run eager here
        acc = evaluate_run(r.model, r.tok, cfg, r.data_dir, out_dir, r.rank, r.world, log, r.base, r.it) \
            if r.it == r.total and r.clf is None else None
    if acc is not None:
        result["eval"] = acc
    if r.logf:
        r.logf.close()
    if r.it < r.total or r.rank:
        return result
    glue = cfg["task"] == "glue"
    try:
        if (png := plot.loss_png(out_dir)) is None:
            log("loss plot: not written (needs matplotlib: pip install matplotlib)")
    except (ValueError, OSError) as e:  # a damaged log.jsonl, a full disk: the run itself is done
        png = None
        log(f"loss plot: not drawn ({e})")
    files = result_files(out_dir, cfg["glue_task"] if glue else None) + ([("loss plot", png)] if png else [])
    line = ", ".join(f"{k} {p}" for k, p in files)
    log(f"done: {line}" + ("" if glue else f"; sample from it: python sample.py --out_dir={out_dir}"))
    return result


def _optimizer(cfg, model, clf, total, dev):
    """RefLoRA on the LoRA pairs (the head, if any, by the base rule); HF's linear warmup then linear decay to 0."""
    opt = RefLoRA(model.lora_pairs(), params=[] if clf is None else list(clf.head.parameters()), method=cfg["method"],
                  base=cfg["base"], lr=cfg["lr"], weight_decay=cfg["weight_decay"], warmup=cfg["reflora_warmup"],
                  interval=cfg["reflora_interval"], compile=cfg["compile"] and dev.type == "cuda")
    w = cfg["warmup_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / max(1, w) if s < w else max(0.0, (total - s) / max(1, total - w)))
    return opt, sched


def _step(r):
    """One optimizer step: accum micro-batches forward + backward, clip, RefLoRA, schedule; -> the lr it used."""
    cfg, dev, idx = r.cfg, r.dev, r.order(r.it)[r.rank * r.per_rank:(r.rank + 1) * r.per_rank]  # this rank's share
    for m in range(r.accum):
        rs = [r.train_set[i] for i in idx[m * r.mb:(m + 1) * r.mb]]
        seqs = [r.encode(r.tok, e, cfg["cutoff_len"]) for e in rs]
        T = max(map(len, seqs))
        r.tokens, r.flops = r.tokens + sum(map(len, seqs)), r.flops + len(seqs) * T * (r.f0 + r.f1 * T)
        # DDP / FSDP reduce gradients on the last micro-step only: RefLoRA then sees the synchronized ones
        if cfg["fsdp"]:
            r.net.set_requires_gradient_sync(m == r.accum - 1)
        with r.fwd.no_sync() if r.ddp and not cfg["fsdp"] and m < r.accum - 1 else nullcontext(), autocast(r.net):
            if r.clf is None:
                x, y = lm_batch(seqs, r.tok.pad_id)
                loss = r.fwd(x.to(dev), targets=y.to(dev))[1]
            else:
                x, mask = cls_batch(seqs, r.tok.pad_id)
                loss = cls_loss(r.fwd(x.to(dev), mask.to(dev)), torch.tensor([e["label"] for e in rs], device=dev))
            # HF Trainer: each micro-batch's mean loss / the accumulation steps
            (loss / r.accum).backward()
        r.loss_sum += loss.detach().float() / r.accum
    if cfg["grad_clip"]:
        torch.nn.utils.clip_grad_norm_(r.trainable, cfg["grad_clip"])
    lr = r.opt.param_groups[0]["lr"]
    r.opt.step()
    r.sched.step()
    r.opt.zero_grad(set_to_none=True)
    return lr


def _factors(r):
    """Copies of this rank's LoRA factors (on the device), for the step norm of the next log line."""
    return [(local(A).detach().clone(), local(B).detach().clone()) for A, B in r.model.lora_pairs()]


def _log_line(r, lr, old):
    """nanoGPT's log line over the interval (a host sync): loss, lr, ms/step, tok/s, MFU, peak memory, ETA, and
    the last step in W: ‖ΔW‖_F summed over pairs (scale α/r included) and its ratio to Σ‖(α/r) A Bᵀ‖_F after it."""
    _stop_if_diverged(r, r.loss_sum)
    reduced(r.loss_sum, r.ddp)
    if r.dev.type == "cuda":
        torch.cuda.synchronize(r.dev)
    n, dt = r.it - r.it_log, time.time() - r.t_log
    mem = torch.cuda.max_memory_allocated(r.dev) if r.dev.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak RSS (KiB on Linux)
    rec = dict(iter=r.it, loss=r.loss_sum.item() / n / r.world, lr=lr, ms=1000 * dt / n,
               tok_s=r.tokens * r.world / dt, mfu=r.flops / dt / r.peak if r.peak else None, mem_gb=mem / 1e9,
               eta_s=dt / n * (r.total - r.it))
    dw, w = step_norm(old, _factors(r), (lambda t: reduced(t, True)) if r.cfg["fsdp"] else None)  # shards' Grams
    scale = r.model.lora_scale()
    rec["dw"], w = dw.sum().item() * scale, w.sum().item() * scale
    rec["dw_rel"] = rec["dw"] / w if w > 0 else None  # None while A = 0
    tps = f"{rec['tok_s'] / 1e3:.1f}k" if rec["tok_s"] >= 1e3 else f"{rec['tok_s']:.0f}"
    mfu = "-" if r.peak is None else f"{100 * rec['mfu']:.1f}%"
    rel = "-" if rec["dw_rel"] is None else f"{rec['dw_rel']:.1e}"
    # the last refactoring (RefLoRA, RefLoRA-S): pairs exact / scalar fallback / left alone, balance residual, s
    rec["refactor"] = st = r.opt.stats()
    ref = "" if not st else (f", refactor {st['exact']:.0f}/{st['fallback']:.0f}/{st['alone']:.0f} resid "
                             f"{st['residual']:.0e}")
    if "s_median" in st:
        ref += f" s {st['s_median']:.2g} [{st['s_min']:.2g}, {st['s_max']:.2g}]"
    r.log(f"iter {r.it}: loss {rec['loss']:.4f}, lr {lr:.1e}, {rec['ms']:.0f} ms, {tps} tok/s, mfu {mfu}, "
          f"mem {rec['mem_gb']:.1f} GB, eta {hms(rec['eta_s'])}, ‖ΔW‖ {rec['dw']:.2e} ({rel} × ‖(α/r)ABᵀ‖){ref}")
    _log_json(r, rec)
    r.loss_sum.zero_()
    r.t_log, r.it_log, r.tokens, r.flops = time.time(), r.it, 0, 0.0


def _log_json(r, rec):
    if r.logf:  # the master's out_dir/log.jsonl
        try:
            r.logf.write(json.dumps(rec) + "\n")
            r.logf.flush()
        except OSError as e:
            raise OSError(f"{r.out_dir / 'log.jsonl'}: cannot write it ({e.strerror})") from None


def _stop_if_diverged(r, loss, what="loss"):
    stop_if_diverged(loss, r.trainable, lambda t: reduced(t, r.ddp), r.it, r.out_dir, r.last_saved, what)


def _stop_on_signal(r):
    """After a step: if a SIGINT / SIGTERM came (on any rank), save a checkpoint (unless this step just did), stop."""
    if got := distributed.any_rank(SIGNALS.got or 0, r.ddp):
        if r.last_saved != r.it:
            _stop_if_diverged(r, r.loss_sum)
            _checkpoint(r, validation=False)
        raise Interrupted(got, saved=True)


def _checkpoint(r, validation=True):
    """Validation loss (+ GLUE metrics), then the PEFT adapter (+ head) and state.pt, written by the master."""
    cfg = r.cfg
    # (stopping on a signal: save at once)
    with torch.compiler.set_stance("force_eager"):  # compiled blocks (compile=True) run eager here
        v, metrics = validate(r.model, r.clf, r.tok, cfg, r.val_set, r.out_dir, r.rank, r.world) if validation \
            else (None, {})
    if v is not None:
        _stop_if_diverged(r, torch.tensor(v, device=r.dev), "validation loss")
        r.best_val = min(r.best_val, v)
        r.log(f"iter {r.it}: val loss {v:.4f}" + "".join(f", {k} {m:.4f}" for k, m in metrics.items()))
    lora, head, optim, rngs = training_state(r.model, r.clf, r.opt, r.dev, r.ddp, r.world)  # a collective
    if r.rank == 0:
        if v is not None:
            _log_json(r, dict(iter=r.it, val_loss=v, **metrics))
        save_checkpoint(r.out_dir, r.model, lora, head, dict(
            iter_num=r.it, epoch=r.it // r.steps_per_epoch, data_position=r.it % r.steps_per_epoch * cfg["batch_size"],
            config=cfg, best_val=r.best_val, rng=rngs, optimizer=optim, scheduler=r.sched.state_dict(), data=r.data))
    r.last_saved = r.it
    if r.ddp:
        torch.distributed.barrier()


def main(argv=None):
    """The CLI: every error is one line on stderr; exit 2 (bad input, a failed write), 1 (divergence), 130 / 143
    (SIGINT / SIGTERM: in the loop the first one finishes the step and saves; later ones are ignored)."""
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    with signal_handlers():  # the handlers stay while the error is printed: a late signal changes nothing
        try:
            train(cfg)
        except TrainingDiverged as e:
            print(f"train.py: {e}", file=sys.stderr)
            sys.exit(1)
        except (ValueError, OSError) as e:
            print(f"train.py: error: {e}", file=sys.stderr)
            sys.exit(2)
        except (Interrupted, KeyboardInterrupt) as e:
            SIGNALS.exiting = argv is None  # the process ends: later signals are ignored to its last instruction
            e = e if isinstance(e, Interrupted) else Interrupted(signal.SIGINT)
            print(f"train.py: {e.line()}", file=sys.stderr)
            sys.exit(128 + e.signum)
        finally:
            launched = torch.distributed.is_initialized()
            if launched:
                torch.distributed.destroy_process_group()
    if launched and argv is None:
        # FSDP2's and DDP's modules keep the gloo process group (and its threads) alive past
        # destroy_process_group; one of them meeting the interpreter's finalization aborts the process ('terminate
        # called without an active exception'), so a finished torchrun run leaves at once, written and flushed
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
