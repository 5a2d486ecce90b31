"""
Benchmarks for reflora (timing hygiene after gpt-fast: warm-up, synchronized timed regions, medians, compile time
reported apart, device and versions printed).

    python bench.py --suite [--json=PATH]      # every GPU number the README promises, one command (< 9 min),
                    # train.py itself included (subprocesses: its loop, resume, --eval_only, torchrun DDP / FSDP2)
    python bench.py --suite --device=cpu --model=tiny --batch_size=2 --seq_len=32 --iters=2 --warmup=1 \
                    --new_tokens=4 --compile=False --dtype=float32   # the same code path on CPU (tests/test_bench.py)
    python bench.py --model=smollm2-135m --device=cpu [--batch_size=8 --seq_len=256 --dtype=float32 --compile=False]
                    [--json=PATH]        # one training step: lora vs reflora vs reflora-s, interleaved
    python bench.py --compare_dtypes ...                    # the same, float32 eager vs bfloat16, and the speed-up
    python bench.py --generate --model=tiny                 # batched beam search vs one example at a time
    python bench.py --refactor [--pairs=160] [--rank=32]   # one refactor step, LLaMA-7B shapes

The suite's correctness parts (train.py end to end, S̃ and one step against float64) are in devcheck.py; the
paper's toy problem and the AdamW step probe are experiments, not speed: experiments.py.

References: Zhang, Li, Giannakis, RefLoRA (arXiv 2505.18877), the overhead chart of the authors' repository;
gpt-fast's benchmarks; nanoGPT's MFU estimate (PaLM appendix B).
"""
import argparse
import functools
import gc
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

import devcheck
import model as M
import reflora
from runstate import atomic_write
from sample import MAX_BEAMS, generate

# -----------------------------------------------------------------------------
# timing

_T0 = time.perf_counter()


def log(msg):  # a progress line with the time since start
    print(f"[{time.perf_counter() - _T0:6.1f} s] {msg}", flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device):  # after `del`: give cached blocks back, so the next part starts from an empty GPU
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timeit(fn, device, warmup=3, iters=20):
    """Median wall time of fn() in ms, after warm-up, with the device synchronized around each call."""
    return interleaved({"": fn}, device, warmup, iters)[""]


def op_profile(fn, device, calls=2, top=8):
    """torch.profiler over `calls` calls of fn: the `top` ops by self device time (CUDA) or self CPU time, as
    [{op, ms, calls}] per call of fn."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    ops = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:top]
    return [dict(op=e.key, ms=getattr(e, key) / 1e3 / calls, calls=e.count / calls) for e in ops]


def interleaved(fns, device, warmup=3, iters=20):
    """{name: median ms}: the functions take turns, so drift in clocks or machine load hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(1e3 * (time.perf_counter() - t0))
    return {name: statistics.median(t) for name, t in times.items()}


def versions(device):
    cuda = device.type == "cuda"
    return dict(device=str(device), name=torch.cuda.get_device_name(device) if cuda else
                platform.processor() or platform.machine(), torch=torch.__version__, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if cuda else None, python=platform.python_version(),
                threads=torch.get_num_threads(),
                memory_gib=torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else None)


def header(device):
    v = versions(device)
    print(f"device {v['device']} ({v['name']}, {v['threads']} threads), torch {v['torch']}, CUDA {v['cuda']}, "
          f"python {v['python']}", flush=True)
    return v


def is_oom(e):
    s = str(e)
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in s or "CUBLAS_STATUS_ALLOC_FAILED" in s


def build(name, device, dtype, rank=None):
    """A random-weight model of preset `name` (base in dtype), with float32 LoRA on q, k, v, up, down if rank."""
    torch.manual_seed(0)
    with torch.device(device):
        model = M.Transformer(M.ModelArgs.from_name(name)).to(dtype)
    if rank:
        M.add_lora(model, r=rank, alpha=2 * rank)
    return model

# -----------------------------------------------------------------------------
# one refactor step: batched (reflora.precondition) vs a per-pair loop like the authors' Refactorer


def llama7b_pairs(n_layers=32, dim=4096, hidden=11008, r=32, device="cpu", seed=0):
    """(A, B, ∇A, ∇B) for q, k, v, up, down of LLaMA-7B: A (out, r), B (in, r); 32 × 5 = 160 pairs."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(dim, dim), (dim, dim), (dim, dim), (hidden, dim), (dim, hidden)] * n_layers  # (out, in)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device)
    return [(rnd(m, r), rnd(n, r), rnd(m, r), rnd(n, r)) for m, n in shapes]


@torch.no_grad()
def loop_precondition(As, Bs, gAs, gBs):
    """The authors' algorithm, one pair at a time: two eighs per pair (their eps regularization included)."""
    out_A, out_B = [], []
    for A, B, gA, gB in zip(As, Bs, gAs, gBs):
        eps = torch.finfo(A.dtype).eps
        lamB, VB = torch.linalg.eigh(B.mT @ B)  # BᵀB = V_B Σ_B² V_Bᵀ
        sigB = lamB.sqrt()
        M = A @ (VB * sigB)
        lamM, VM = torch.linalg.eigh(M.mT @ M)
        sigM = lamM.sqrt()
        left = (VB / (sigB + eps)) @ VM
        Sinv = (left * sigM) @ left.mT  # S̃⁻¹ = (BᵀB)^{-1/2} [(BᵀB)^{1/2} AᵀA (BᵀB)^{1/2}]^{1/2} (BᵀB)^{-1/2}
        left = (VB * sigB) @ VM
        S = (left / (sigM + eps)) @ left.mT
        out_A.append(gA @ Sinv)
        out_B.append(gB @ S)
    return out_A, out_B


def refactor_steps(pairs, device, compile, warmup=2, iters=10):
    """{name: median ms} of one refactor step over `pairs`, interleaved; compile=False leaves the compiled row out."""
    As, Bs, gAs, gBs = map(list, zip(*pairs))
    stacked = torch.no_grad()(functools.partial(reflora.precondition, stacked=True))  # the optimizer's, on CUDA
    rows = {"loop": loop_precondition, "per_factor": torch.no_grad()(reflora.precondition), "eager": stacked}
    if compile:
        compiled = torch.compile(functools.partial(reflora.precondition, stacked=True))
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled(As, Bs, gAs, gBs)
        sync(device)
        log(f"refactor: compile time {time.perf_counter() - t0:.1f} s")
        rows["compiled"] = torch.no_grad()(compiled)
    # RefLoRA-S: norms and in-place rescaling of factors and both Adam moments
    moments = [[t.clone() for t in ts] for ts in (gAs, gAs, gBs, gBs)]
    fns = {name: (lambda fn=fn: fn(As, Bs, gAs, gBs)) for name, fn in rows.items()}
    fns["rescale"] = lambda: reflora.rescale(As, Bs, moments)
    return interleaved(fns, device, warmup=warmup, iters=iters)


REFACTOR_ROWS = {"loop": "per-pair loop (authors' algorithm)", "per_factor": "batched, one op per factor, eager",
                 "eager": "batched, stacked by shape, eager", "compiled": "batched, stacked, compiled",
                 "rescale": "RefLoRA-S rescale (batched, eager)"}


def bench_refactor(args):
    device = torch.device(args.device)
    header(device)
    pairs = llama7b_pairs(n_layers=args.pairs // 5, r=args.rank, device=device)
    print(f"{len(pairs)} pairs (LLaMA-7B q,k,v,up,down), r={args.rank}, float32")
    results = refactor_steps(pairs, device, args.compile, args.warmup, args.iters)
    for name, ms in results.items():
        print(f"{REFACTOR_ROWS[name]:40s} {ms:9.2f} ms   {results['loop'] / ms:6.1f}x vs loop")
    return results

# -----------------------------------------------------------------------------
# one training step per method, interleaved in one process


def train_steps(model, tokens, targets, dtype, compile=False, warmup=3, iters=20, deadline=None):
    """Per method {step_ms, opt_ms, tokens_per_s, mfu, peak_mem_mb}, plus the overheads over lora and a
    compiled-vs-eager loss check. compile: each block compiled in place, as train.py does (model.compile_blocks),
    and the optimizer's refactoring. deadline (perf_counter time): fewer timed steps if short.
    RefLoRA's default `ahead` (CUDA: the next step's S̃ on a side stream at the end of step()): the device sync after
    opt.step() waits for that work too, so opt_ms counts it instead of letting it overlap the next forward. Each
    method steps its own copy of the LoRA factors, swapped into the model for its step: shared ones would be
    changed by the other methods between two of its steps, and RefLoRA would redo the S̃ it computed ahead."""
    device = tokens.device
    cuda, amp = device.type == "cuda", M.autocast(model)
    with torch.no_grad(), amp:
        loss_eager = model(tokens, targets)[1].item()
    fwd = M.compile_blocks(model) if compile else model
    t0 = time.perf_counter()
    with amp:
        loss = fwd(tokens, targets)[1]
    loss.backward()
    loss_fwd = loss.item()
    del loss
    model.zero_grad(set_to_none=True)
    first_s = time.perf_counter() - t0
    log(f"first forward + backward (compile={compile}): {first_s:.1f} s; loss {loss_fwd:.5f}, eager {loss_eager:.5f}")
    layers = [x for x in model.modules() if isinstance(x, M.LoRALinear)]
    own = {m: [tuple(torch.nn.Parameter(p.detach().clone()) for p in (x.A, x.B)) for x in layers]
           for m in reflora.METHODS}
    opts = {m: reflora.RefLoRA(own[m], method=m, lr=1e-5, warmup=0, compile=compile) for m in reflora.METHODS}
    times = {m: {"step": [], "opt": [], "mem": 0} for m in opts}

    def backward(opt):
        for x, (A, B) in zip(layers, own[opt.method]):
            x.A, x.B = A, B
        with amp:
            loss = fwd(tokens, targets)[1]
        loss.backward()

    def step(opt):
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        backward(opt)
        sync(device)
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        t2 = time.perf_counter()
        return 1e3 * (t2 - t0), 1e3 * (t2 - t1), torch.cuda.max_memory_allocated(device) if cuda else 0

    t0 = time.perf_counter()
    last = {}
    for m, opt in opts.items():  # warm-up (and compilation of the optimizer) of every method
        for _ in range(warmup):
            last[m] = step(opt)[0] / 1e3
    warmup_s = time.perf_counter() - t0
    log(f"warm-up ({warmup} steps per method, compile={compile}): {warmup_s:.1f} s")
    if deadline is not None and warmup:  # as many timed rounds as fit before the deadline, at least 3
        fit = int((deadline - time.perf_counter()) / sum(last.values()))
        if fit < iters:
            iters = max(3, fit)
            log(f"time budget: {iters} timed steps per method")
    for _ in range(iters):  # interleaved, so drift in clocks or load hits all methods alike
        for m, opt in opts.items():
            s, o, mem = step(opt)
            times[m]["step"].append(s), times[m]["opt"].append(o)
            times[m]["mem"] = max(times[m]["mem"], mem)
    # back to back, one sync at the end, as train.py steps: there RefLoRA's S̃ computed ahead (CUDA: on a side
    # stream) can overlap the next forward and backward, which the synchronized steps above count in full
    k = min(iters, 3)
    for m, opt in opts.items():
        sync(device)
        t0 = time.perf_counter()
        for _ in range(k):
            backward(opt)
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(device)
        times[m]["loop"] = 1e3 * (time.perf_counter() - t0) / k
    profile = {}
    for m in ("reflora", "reflora-s"):  # where the optimizer's time goes: one step's gradients, stepped twice
        backward(opts[m])
        profile[m] = op_profile(opts[m].step, device)
        opts[m].zero_grad(set_to_none=True)
    f0, f1 = M.flops_per_token(model)  # LoRA FLOPs per token: 4·N_frozen + 6·N_lora + attention
    B, T = tokens.shape
    fpt, peak = f0 + f1 * T, M.peak_flops(device) if dtype != torch.float32 else None  # float32: no MFU
    res = dict(batch_size=B, seq_len=T, dtype=str(dtype).removeprefix("torch."), compile=compile, iters=iters,
               ahead=opts["reflora"].ahead,
               first_step_s=first_s, warmup_s=warmup_s,
               loss_eager=loss_eager, loss_compiled=loss_fwd,  # compile off: the same forward twice, no check
               loss_rel_diff=abs(loss_fwd - loss_eager) / abs(loss_eager) if compile else None,
               methods={}, profile=profile, back_to_back_steps=k)
    print(f"batch {B} × seq {T}, {res['dtype']}, compile={compile}, {iters} timed steps per method (medians)")
    print(f"{'method':10s} {'step ms':>9s} {'opt ms':>8s} {'tok/s':>9s} {'mfu':>6s} {'peak MB':>9s}")
    for m, t in times.items():
        step_ms, opt_ms = statistics.median(t["step"]), statistics.median(t["opt"])
        tps = B * T / step_ms * 1e3
        mfu = fpt * tps / peak if peak else None
        r = res["methods"][m] = dict(step_ms=step_ms, opt_ms=opt_ms, tokens_per_s=tps, mfu=mfu,
                                     peak_mem_mb=t["mem"] / 2**20 if cuda else None, loop_ms=t["loop"])
        print(f"{m:10s} {step_ms:9.1f} {opt_ms:8.2f} {tps:9.0f} {f'{100 * mfu:.1f}%' if mfu else '-':>6s} "
              f"{r['peak_mem_mb'] or 0:9.0f}")
    lora = res["methods"]["lora"]
    for m in ("reflora", "reflora-s"):
        r = res["methods"][m]
        # the methods differ only in the optimizer step: its extra time is the overhead, without the noise of
        # the (identical) forward and backward
        extra = r["opt_ms"] - lora["opt_ms"]
        r["step_overhead_pct"] = 100 * (r["step_ms"] / lora["step_ms"] - 1)
        r["loop_overhead_pct"] = 100 * (r["loop_ms"] / lora["loop_ms"] - 1)
        r["opt_share_pct"] = 100 * extra / lora["step_ms"]
        r["extra_mem_pct"] = 100 * (r["peak_mem_mb"] / lora["peak_mem_mb"] - 1) if cuda else None
        print(f"{m} overhead over lora: step {r['step_overhead_pct']:+.2f}%, optimizer {extra:+.2f} ms = "
              f"{r['opt_share_pct']:+.2f}% of a lora step"
              + (f", peak memory {r['extra_mem_pct']:+.2f}%" if cuda else "")
              + f"; {k} steps back to back {r['loop_overhead_pct']:+.2f}%")
        print(f"{m} optimizer step, top ops: " + ", ".join(f"{x['op']} {x['ms']:.2f} ms" for x in profile[m][:5]))
    return res


def bench_train(args):
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    header(device)
    model = build(args.model, device, dtype, args.rank)
    model.grad_checkpoint = args.grad_checkpoint
    x = torch.randint(0, model.args.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
    print(f"{args.model}, r={args.rank}")
    return train_steps(model, x[:, :-1], x[:, 1:], dtype, args.compile, args.warmup, args.iters)


def compare_dtypes(args):
    """float32 eager against bfloat16 (compiled if --compile=True), one after the other: the speed-up per method."""
    res = {}
    for dt, comp in (("float32", False), ("bfloat16", args.compile)):
        res[dt] = bench_train(argparse.Namespace(**{**vars(args), "dtype": dt, "compile": comp}))
    for m in reflora.METHODS:
        a, b = (res[dt]["methods"][m]["step_ms"] for dt in ("float32", "bfloat16"))
        print(f"{m:10s} step: float32 eager {a:.1f} ms, bfloat16 {b:.1f} ms: speed-up {a / b:.2f}x")
    return res


# -----------------------------------------------------------------------------
# generation: batched beam search vs one example at a time


def random_prompts(n, lo, hi, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g)
    return [torch.randint(3, vocab, (int(k),), generator=g).tolist() for k in lengths]


def generate_speed(model, prompts, beams, new_tokens, device):
    """Examples/s of one batched beam search over all prompts and of one prompt at a time, and the ratio."""
    gen = lambda ps: generate(model, ps, new_tokens, eos_id=-1, pad_id=0, num_beams=beams)
    t_batch = timeit(lambda: gen(prompts), device, warmup=1, iters=3)
    t_one = timeit(lambda: [gen([p]) for p in prompts], device, warmup=0, iters=1)
    return dict(prompts=len(prompts), beams=beams, new_tokens=new_tokens, batched=len(prompts) / t_batch * 1e3,
                one_by_one=len(prompts) / t_one * 1e3, ratio=t_one / t_batch)


def bench_generate(args):
    device = torch.device(args.device)
    header(device)
    model = build(args.model, device, getattr(torch, args.dtype)).eval()
    prompts = random_prompts(args.batch_size, args.seq_len // 2, args.seq_len - 1, model.args.vocab_size)
    res = generate_speed(model, prompts, args.beams, args.new_tokens, device)
    print(f"{args.model}: {len(prompts)} prompts of {args.seq_len // 2}-{args.seq_len - 1} tokens, {args.beams} beams, "
          f"{args.new_tokens} new tokens")
    print(f"batched      {res['batched']:8.2f} examples/s")
    print(f"one by one   {res['one_by_one']:8.2f} examples/s   ({res['ratio']:.1f}x slower)")
    return res


# -----------------------------------------------------------------------------
# the suite: every GPU number the README promises, in one command, each part on its own


def suite_loop(r, device, deadline):
    """train.py's step (its log's ms: fixed-length batches of the suite's shapes, no accumulation, reflora,
    compiled where the suite compiles) beside the suite's own train_steps on the same shapes: the loop's own cost.
    Under 90 s left after train.py: its step alone (the suite's needs a compile)."""
    a, B, T, n = r.args, r.args.batch_size or 8, r.args.seq_len, 2 + max(r.args.iters, 2)
    r.straight(None)  # n log records of 5 steps; the first 2 (compilation, warm-up) left out
    flags = dict(r.flags, data_path=r.d / "fixed.jsonl", cutoff_len=T, batch_size=B, micro_batch_size=B,
                 max_iters=5 * n, log_interval=5)
    recs, wall = devcheck.trainpy(flags, r.d / "loop", deadline)
    ms = statistics.median([x["ms"] for x in recs if "ms" in x][2:])
    log(f"train.py loop: {wall:.0f} s for {5 * n} steps, {ms:.1f} ms per step after the first 10")
    res = dict(model=r.name, batch_size=B, seq_len=T, steps=5 * n, compile=a.compile, wall_s=wall, trainpy_ms=ms,
               suite_ms=None, loop_overhead_pct=None)
    if deadline - time.perf_counter() < 90:
        log("train.py loop: under 90 s left in the time budget: the suite's own step is skipped")
        return res
    x = torch.randint(0, 256, (B, T + 1), generator=torch.Generator().manual_seed(0)).to(device)
    own = train_steps(build(r.name, device, r.dtype, a.rank), x[:, :-1], x[:, 1:], r.dtype, a.compile, a.warmup,
                      a.iters, deadline)["methods"]["reflora"]["step_ms"]
    return dict(res, suite_ms=own, loop_overhead_pct=100 * (ms / own - 1))


def logged(name, res):  # a check's numbers on one progress line
    log(f"{name}: " + ", ".join(f"{k} {v:.2e}" for k, v in res.items()))
    return res


def one_line(e):
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def suite_train(args, device, dtype, batches, deadline):
    """fit_and_time, and if the compiled run fails for another reason than memory, once more in eager mode."""
    try:
        return fit_and_time(args, device, dtype, batches, deadline)
    except Exception as e:
        if not args.compile or is_oom(e) or isinstance(e, MemoryError):
            raise
        traceback.print_exc()
        err = one_line(e)
    free(device)
    torch._dynamo.reset()
    log(f"train: the compiled run failed ({err}): once more, eager")
    res = fit_and_time(argparse.Namespace(**{**vars(args), "compile": False}), device, dtype, batches, deadline)
    return dict(res, compile_error=err)


def fit_and_time(args, device, dtype, batches, deadline):
    """The largest batch that fits (descending list; out of memory: free, try the next), then train_steps; a
    smaller model when even batch 1 does not fit."""
    cuda = device.type == "cuda"
    total = torch.cuda.get_device_properties(device).total_memory if cuda else None
    names = [args.model] + (["smollm2-135m"] if args.model != "smollm2-135m" and cuda else [])
    for i, name in enumerate(names):
        model = None
        try:
            model = build(name, device, dtype, args.rank)
        except Exception as e:
            if not is_oom(e):
                raise
        if model is not None:
            g = torch.Generator().manual_seed(0)
            for b in batches:
                try:
                    x = torch.randint(0, model.args.vocab_size, (b, args.seq_len + 1), generator=g).to(device)
                    if cuda:  # eager forward + backward first: fails fast, and leaves room for compile's buffers
                        torch.cuda.reset_peak_memory_stats(device)
                        with M.autocast(model):
                            loss = model(x[:, :-1], x[:, 1:])[1]
                        loss.backward()
                        del loss
                        model.zero_grad(set_to_none=True)
                        peak = torch.cuda.max_memory_allocated(device)
                        if peak > 0.85 * total:
                            raise torch.cuda.OutOfMemoryError(f"eager peak {peak / 2**30:.1f} GiB > 85 % of "
                                                              f"{total / 2**30:.0f} GiB")
                    log(f"train: {name}, batch {b} × {args.seq_len}")
                    res = train_steps(model, x[:, :-1], x[:, 1:], dtype, args.compile, args.warmup, args.iters,
                                      deadline)
                    return dict(res, model=name, rank=args.rank)
                except Exception as e:
                    if not is_oom(e):
                        raise
                    msg = str(e).splitlines()[0][:120]
                model.zero_grad(set_to_none=True)  # outside `except`: the traceback no longer holds tensors
                free(device)
                torch._dynamo.reset()  # a fresh, static compile for the next batch size
                log(f"train: {name} batch {b}: out of memory ({msg})")
        del model
        free(device)
        if i + 1 < len(names):
            log(f"train: {name} does not fit in {total / 2**30:.0f} GiB of GPU memory: "
                f"using {names[i + 1]} shapes instead")
    raise MemoryError(f"no model of {names} fits at batch {batches[-1]}")


def suite_generate(args, device, dtype):
    name = "tiny" if args.model == "tiny" else "smollm2-135m"
    model = build(name, device, dtype).eval()
    n = 32 if device.type == "cuda" else 4
    lo, hi = args.seq_len // 4, args.seq_len // 2
    log(f"generate: {name}, {n} prompts of {lo}-{hi} tokens, {args.beams} beams, {args.new_tokens} new tokens")
    res = generate_speed(model, random_prompts(n, lo, hi, model.args.vocab_size), args.beams, args.new_tokens,
                         device)
    log(f"generate: batched {res['batched']:.2f} vs one by one {res['one_by_one']:.2f} examples/s: "
        f"{res['ratio']:.1f}x")
    return dict(res, model=name)


def suite_refactor(args, device, deadline):
    a = M.ModelArgs.from_name("tiny" if args.model == "tiny" else "llama-7b")
    pairs = llama7b_pairs(a.n_layers, a.dim, a.hidden_dim, args.rank, device)
    compile = args.compile and deadline - time.perf_counter() > 75  # a compile takes ~30-60 s
    if args.compile and not compile:
        log("refactor: under 75 s left in the time budget: the compiled row is skipped")
    err = None
    try:
        res = refactor_steps(pairs, device, compile, args.warmup, args.iters)
    except Exception as e:
        if not compile:
            raise
        traceback.print_exc()
        err = one_line(e)
    if err:
        torch._dynamo.reset()
        log(f"refactor: the compiled run failed ({err}): eager rows only")
        res = refactor_steps(pairs, device, False, args.warmup, args.iters)
    log("refactor: " + ", ".join(f"{k} {v:.2f} ms" for k, v in res.items()))
    return dict(pairs=len(pairs), rank=args.rank, ms=res, speedup={k: res["loop"] / v for k, v in res.items()},
                compile_error=err)


def verdict(value, target, at_most=True, unit=""):
    if value is None:
        return "n/a"
    gap = value - target if at_most else target - value
    return "met" if gap <= 0 else f"missed by {gap:.3g}{unit}"


def summary(out):
    """Rows (part, metric, value, target, verdict) of the markdown table, and the targets for the JSON."""
    rows, targets = [], []
    num = lambda v, f: "-" if v is None else format(v, f)

    def row(part, metric, value, fmt, target=None, at_most=True, unit=""):
        v = verdict(value, target, at_most, unit) if target is not None else ""
        tgt = "" if target is None else f"{'≤' if at_most else '≥'} {target:.2g}{unit}"
        rows.append((part, metric, num(value, fmt) + (unit if value is not None else ""), tgt, v))
        if target is not None:
            targets.append(dict(metric=f"{part}: {metric}", value=value, target=tgt, verdict=v))

    for part, res in out["parts"].items():
        if "error" in res or "skipped" in res:
            rows.append((part, "error" if "error" in res else "skipped", res.get("error") or res["skipped"], "", ""))
    for part, res in out["parts"].items():
        if res.get("compile_error"):
            rows.append((part, "compile failed, eager numbers", res["compile_error"], "", ""))
    t = out["parts"].get("train", {})
    if "methods" in t:
        p = f"train {t['model']} b{t['batch_size']}×{t['seq_len']} {'compiled' if t['compile'] else 'eager'}"
        for m, r in t["methods"].items():
            row(p, f"{m} step", r["step_ms"], ".1f", unit=" ms")
            row(p, f"{m} tokens/s", r["tokens_per_s"], ".0f")
            row(p, f"{m} peak memory", r["peak_mem_mb"], ".0f", unit=" MB")
        row(p, "lora MFU", None if t["methods"]["lora"]["mfu"] is None else 100 * t["methods"]["lora"]["mfu"], ".1f",
            55, False, " %")
        for m, tgt in (("reflora-s", 0.3), ("reflora", 1.0)):
            row(p, f"{m} optimizer share of a lora step", t["methods"][m]["opt_share_pct"], "+.2f", tgt, unit=" %")
            row(p, f"{m} step overhead", t["methods"][m]["step_overhead_pct"], "+.2f", unit=" %")
        for m in ("reflora-s", "reflora"):
            row(p, f"{m} step overhead, {t['back_to_back_steps']} steps back to back",
                t["methods"][m]["loop_overhead_pct"], "+.2f", unit=" %")
            for x in t["profile"][m][:5]:
                row(p, f"{m} optimizer step: {x['op'][:60]} ({x['calls']:.0f}×)", x["ms"], ".2f", unit=" ms")
        row(p, "reflora extra peak memory", t["methods"]["reflora"]["extra_mem_pct"], "+.2f", 0.5, unit=" %")
        row(p, "reflora-s extra peak memory", t["methods"]["reflora-s"]["extra_mem_pct"], "+.2f", unit=" %")
        row(p, "compiled vs eager loss, rel. diff", t["loss_rel_diff"], ".1e", 1e-2)
    g = out["parts"].get("generate", {})
    if "ratio" in g:
        p = f"beam search {g['model']} {g['prompts']}×{g['beams']} beams"
        row(p, "batched examples/s", g["batched"], ".2f")
        row(p, "one by one examples/s", g["one_by_one"], ".2f")
        row(p, "batched / one by one", g["ratio"], ".1f", 10, False, "×")
    lp, cuda = out["parts"].get("train.py loop", {}), out["versions"]["device"].startswith("cuda")
    if "trainpy_ms" in lp:
        p = f"train.py {lp['model']} b{lp['batch_size']}×{lp['seq_len']} reflora " \
            f"{'compiled' if lp['compile'] else 'eager'}"
        row(p, "train.py step (its log.jsonl)", lp["trainpy_ms"], ".1f", unit=" ms")
        row(p, "the suite's own step (train_steps)", lp["suite_ms"], ".1f", unit=" ms")
        row(p, "train.py's loop over the suite's step", lp["loop_overhead_pct"], "+.2f", 5, unit=" %")
    if "lora_rel_diff" in (rs := out["parts"].get("train.py resume", {})):
        p = "train.py resume at step 3 of 6 vs uninterrupted" + (" (target: 10× run-to-run)" if cuda else "")
        row(p, "adapter rel. diff", rs["lora_rel_diff"], ".1e", 10 * rs["noise_lora"])
        row(p, "loss max abs. diff, steps 4-6", rs["loss_diff"], ".1e", 10 * rs["noise_loss"])
    if "b1_agree" in (e := out["parts"].get("train.py eval_only", {})):
        p = f"train.py --eval_only {e['examples']} examples, float32"
        for b in (1, e["beams"]):
            row(p, f"{'greedy' if b == 1 else f'{b} beams'}: batched = one by one (share)", e[f"b{b}_agree"], ".2f",
                1, False)
    # one process is the reference: DDP bitwise on CPU, on CUDA within 10× its run-to-run difference; FSDP2 sums
    # float64 Grams over the shards where one CPU process uses float32 ones where well conditioned (CPU, tiny,
    # 6 steps: 4.4e-4 of the adapter), and under bf16 gathers every parameter in bf16, the float32 LoRA factors
    # too (1.4e-2)
    bf16, noise = out["config"]["dtype"] == "bfloat16", 10 * rs.get("noise_lora", 0.0)
    for name, tol in (("torchrun DDP", noise), ("torchrun FSDP2", 5e-2 if bf16 else max(noise, 1e-3))):
        if "lora_rel_diff" in (dd := out["parts"].get(name, {})):
            p = f"{name} nproc 1 vs one process, {dd['steps']} steps"
            row(p, "adapter rel. diff", dd["lora_rel_diff"], ".1e", tol)
            row(p, "loss max abs. diff", dd["loss_diff"], ".1e")
    f = out["parts"].get("refactor", {})
    if "ms" in f:
        p = f"refactor {f['pairs']} pairs r={f['rank']}"
        for k, ms in f["ms"].items():
            row(p, f"{REFACTOR_ROWS[k]} ms ({f['speedup'][k]:.1f}× vs loop)", ms, ".2f")
    c = {**out["parts"].get("S_check", {}), **out["parts"].get("step_check", {})}
    p = "checks (device float32 vs CPU float64)"
    if "S_rel_err_device" in c:
        row(p, "S̃ rel. error, device float32 vs CPU float64", c["S_rel_err_device"], ".1e",
            max(1e-5, 10 * c["S_rel_err_cpu32"]))
        row(p, "S̃ rel. error, CPU float32 vs CPU float64", c["S_rel_err_cpu32"], ".1e")
        row(p, "balance residual ‖S̃AᵀAS̃ − BᵀB‖/‖BᵀB‖, device", c["balance_residual_device"], ".1e",
            max(1e-5, 10 * c["balance_residual_cpu32"]))
        row(p, "balance residual, CPU float32 / float64",
            c["balance_residual_cpu32"], ".1e")
    for m in ("reflora", "reflora-s"):
        if f"{m}_step_rel_err" in c:
            row(p, f"one {m} step, update rel. error", c[f"{m}_step_rel_err"], ".1e", 1e-4)
    return rows, targets


def markdown(rows):
    lines = ["| part | metric | value | target | verdict |", "| --- | --- | --- | --- | --- |"]
    return "\n".join(lines + [f"| {' | '.join(map(str, r))} |" for r in rows]) + "\n"


# in this order; train.py's compiled loop last, the slowest to start (its compile): it gets what is left, and is
# rerun alone (--only) if that was not enough
PARTS = ("S_check", "step_check", "generate", "train.py resume", "train.py eval_only", "torchrun DDP",
         "torchrun FSDP2", "train", "refactor", "train.py loop")


def suite(args):
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    out = dict(versions=header(device), config=vars(args), parts={})
    deadline = _T0 + args.budget
    batches = [args.batch_size] if args.batch_size else [64, 48, 40, 32, 24, 16, 8, 4, 2, 1]
    tmp = tempfile.mkdtemp(prefix="reflora-suite-")  # train.py's checkpoint, data and out_dirs
    # cheap parts first; what the later chosen parts need is kept from the earlier ones' deadlines: ~100 s for
    # the refactor step, ~150 s for the training step (its compile and warm-up)
    chosen = [p for p in PARTS if not args.only or p in args.only]  # in the suite's order
    keep_refactor = 100 if "refactor" in chosen else 0
    keep_train = keep_refactor + (150 if "train" in chosen else 0)
    r = devcheck.Runs(args, device, dtype, Path(tmp), deadline - keep_train)
    fns = {"S_check": (deadline, lambda: logged("S check", devcheck.check_S(device))),
           "step_check": (deadline, lambda: logged("step check", devcheck.check_steps(device, args.compile))),
           "generate": (deadline, lambda: suite_generate(args, device, dtype)),
           "train.py resume": (r.deadline, lambda: devcheck.resume(r)),
           "train.py eval_only": (r.deadline, lambda: devcheck.eval_only(r)),
           "torchrun DDP": (r.deadline, lambda: devcheck.dist(r, False)),
           "torchrun FSDP2": (r.deadline, lambda: devcheck.dist(r, True)),
           "train.py loop": (deadline, lambda: suite_loop(r, device, deadline)),
           "train": (deadline, lambda: suite_train(args, device, dtype, batches, deadline - keep_refactor)),
           "refactor": (deadline, lambda: suite_refactor(args, device, deadline))}
    for name in chosen:
        part_deadline, fn = fns[name]
        if time.perf_counter() > part_deadline:
            out["parts"][name] = {"skipped": f"time budget of {args.budget:.0f} s spent"}
            log(f"--- {name}: skipped, time budget of {args.budget:.0f} s spent")
            continue
        log(f"--- {name}")
        try:
            out["parts"][name] = fn()
        except Exception as e:
            traceback.print_exc()
            out["parts"][name] = {"error": one_line(e)}
            log(f"--- {name}: failed: {out['parts'][name]['error']}")
        free(device)
        torch._dynamo.reset()  # each part compiles afresh: no shapes left over to make the next compile dynamic
        if args.json:  # what is done so far, should the machine be taken back before the end
            atomic_write(args.json, json.dumps(dict(out, elapsed_s=time.perf_counter() - _T0), indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    out["elapsed_s"] = time.perf_counter() - _T0
    rows, out["targets"] = summary(out)
    out["markdown"] = markdown(rows)
    print("\n" + out["markdown"])
    log(f"suite done in {out['elapsed_s']:.0f} s")
    return out

# -----------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", action="store_true", help="every GPU number of the README (needs CUDA, or --device)")
    p.add_argument("--refactor", action="store_true", help="micro-benchmark of one refactor step")
    p.add_argument("--generate", action="store_true", help="batched vs one-by-one beam search")
    p.add_argument("--compare_dtypes", action="store_true", help="training step: float32 eager vs bfloat16")
    p.add_argument("--model", default=None, choices=list(M.PRESETS),
                   help="default smollm2-135m; llama-7b for --suite")
    p.add_argument("--device", default=None, help="default cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default bfloat16 on CUDA and for --suite, else float32")
    p.add_argument("--batch_size", type=int, default=None, help="default 8; --suite: the largest that fits")
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--pairs", type=int, default=160)
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=None, help="default 3; 2 for --suite")
    p.add_argument("--iters", type=int, default=None, help="default 20; 10 for --suite")
    p.add_argument("--budget", type=float, default=540, help="--suite: seconds before the remaining parts are skipped")
    p.add_argument("--only", default="", help=f"--suite: these parts only, comma-separated, of {', '.join(PARTS)}")
    boolean = lambda s: {"true": True, "false": False}[s.lower()]  # noqa: E731
    p.add_argument("--compile", type=boolean, default=None, help="True/False (default: True on CUDA)")
    p.add_argument("--grad_checkpoint", type=boolean, default=False,
                   help="True/False: recompute activations in backward")
    p.add_argument("--json", default="", help="write the results here (--suite: and a markdown table beside it)")
    p.error = lambda msg: _fail(msg)  # one line, exit 2 (argparse prints its usage first)
    args = p.parse_args(argv)
    for k, lo in [("batch_size", 1), ("seq_len", 2), ("rank", 1), ("pairs", 1), ("beams", 1), ("new_tokens", 1),
                  ("warmup", 0), ("iters", 1)]:
        if getattr(args, k) is not None and getattr(args, k) < lo:
            _fail(f"--{k}={getattr(args, k)}: must be >= {lo}")
    if args.beams > MAX_BEAMS:
        _fail(f"--beams={args.beams}: at most {MAX_BEAMS}")
    if not 0 < args.budget < float("inf"):
        _fail(f"--budget={args.budget}: must be a finite number of seconds > 0")
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    if bad := [x for x in args.only if x not in PARTS]:
        _fail(f"--only={bad[0]}: not a part of the suite ({', '.join(PARTS)})")
    if args.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        _fail(f"--device={args.device}: expected cpu, cuda or cuda:N")
    if (args.device or "").startswith("cuda") and not torch.cuda.is_available():
        _fail(f"--device={args.device}: this torch ({torch.__version__}) sees no CUDA device")
    if args.json and (os.path.isdir(args.json) or not os.path.isdir(os.path.dirname(os.path.abspath(args.json)))):
        _fail(f"--json={args.json}: expected a file path in an existing directory")
    if args.suite and args.device is None and not torch.cuda.is_available():
        print("bench.py --suite: no CUDA device here, nothing to measure (a CPU dry run: --suite --device=cpu "
              "--model=tiny --batch_size=2 --seq_len=32 --iters=2 --warmup=1 --new_tokens=4 --compile=False "
              "--dtype=float32)")
        return 0
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device.startswith("cuda")
    args.model = args.model or ("llama-7b" if args.suite else "smollm2-135m")
    args.dtype = args.dtype or ("bfloat16" if args.suite or cuda else "float32")
    args.compile = cuda if args.compile is None else args.compile
    args.warmup = args.warmup if args.warmup is not None else 2 if args.suite else 3
    args.iters = args.iters or (10 if args.suite else 20)
    if not args.suite:
        args.batch_size = args.batch_size or 8
    if args.seq_len + args.new_tokens > (n := M.ModelArgs.from_name(args.model).max_seq_len):
        _fail(f"--seq_len={args.seq_len} + --new_tokens={args.new_tokens}: more than {args.model}'s max_seq_len {n}")
    if args.suite:
        res = suite(args)
    elif args.refactor:
        res = bench_refactor(args)
    elif args.generate:
        res = bench_generate(args)
    elif args.compare_dtypes:
        res = compare_dtypes(args)
    else:
        res = bench_train(args)
    if args.json:
        res = res if isinstance(res, dict) else dict(rows=res)  # --adam_step: a list of rows
        out = res if args.suite else dict(res, device=str(args.device), torch=torch.__version__, config=vars(args))
        atomic_write(args.json, json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
        if args.suite:
            md = os.path.splitext(args.json)[0] + ".md"
            atomic_write(md, res["markdown"])
            print(f"wrote {md}")
    return 0


def _fail(msg):
    print(f"bench.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())
