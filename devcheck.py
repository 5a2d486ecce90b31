"""
Correctness checks of the device path, run by `bench.py --suite` (which also times it): train.py end to end as
subprocesses (a checkpoint and a resume that continues exactly, --eval_only's batched greedy and beam search against
one example at a time, torchrun DDP and FSDP2 against one process), and S̃ and one optimizer step on the device
against float64 on the CPU.

References: Zhang, Li, Giannakis, RefLoRA (arXiv 2505.18877), Thm 3; torch.distributed.run (torchrun).
"""
import json
import os
import random
import re
import subprocess
import sys
import time

import torch
from safetensors.torch import save_file

import model as M
import reflora
import weights as W
from runstate import read_state

# -----------------------------------------------------------------------------
# train.py end to end, as subprocesses: a random-weight Hugging Face checkpoint and synthetic data in a temp dir


def write_inputs(d, name, dtype, seq_len, n_test):
    """d/ckpt (random weights, HF names and q/k rows), d/fixed.jsonl (every example longer than seq_len: cut to
    it), d/varied.jsonl (lengths differ: length-grouped batches), d/data/dataset/boolq/test.json."""
    torch.manual_seed(0)
    m = M.Transformer(M.ModelArgs.from_name(name))
    a, sd, rng = m.args, {}, random.Random(0)
    for k, t in m.state_dict().items():
        if not (k == "output.weight" and a.tie_word_embeddings):  # HF's q/k rows, as weights.convert_gguf
            sd[W.rename(k, W.META, W.HF)] = W._qk(k, t, a, to_hf=True).to(dtype).contiguous()
    (d / "ckpt").mkdir(parents=True)
    save_file(sd, d / "ckpt/model.safetensors")
    (d / "ckpt/config.json").write_text(json.dumps(dict(model_type="llama", **{h: getattr(a, f) for f, h, _ in
                                                                                W.CONFIG})))
    rec = lambda n: dict(instruction="".join(rng.choices("abcdefghij ", k=n)), input="",  # noqa: E731
                         output=(ans := rng.choice(("true", "false"))), answer=ans)
    for f, lo, hi in (("fixed", seq_len, seq_len), ("varied", 1, max(1, seq_len // 2))):
        (d / f"{f}.jsonl").write_text("".join(json.dumps(rec(rng.randint(lo, hi))) + "\n" for _ in range(64)))
    (d / "data/dataset/boolq").mkdir(parents=True)
    (d / "data/dataset/boolq/test.json").write_text(json.dumps([rec(rng.randint(1, 8)) for _ in range(n_test)]))


def trainpy(flags, out, deadline, nproc=0):
    """train.py (under torchrun when nproc) with --name=value flags into out_dir `out`: -> (log.jsonl records, s)."""
    run = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    cmd = [sys.executable, *run, "train.py", *(f"--{k}={v}" for k, v in {**flags, "out_dir": out}.items())]
    t0, left = time.perf_counter(), deadline - time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True,
                           timeout=max(1.0, left))
    except subprocess.TimeoutExpired as e:
        text = lambda x: x.decode(errors="replace") if isinstance(x, bytes) else x or ""  # noqa: E731
        print(text(e.stdout)[-3000:], text(e.stderr)[-3000:], sep="\n")  # where the time went
        f = out / "log.jsonl"
        lines = f.read_text().splitlines(keepends=True) if f.exists() else []  # the last may be cut off
        it = max([json.loads(x).get("iter", 0) for x in lines if x.endswith("\n")] or [0])
        raise TimeoutError(f"train.py {out.name}: over the time budget ({left:.0f} s left), "
                           f"{it} steps logged") from None
    if p.returncode:
        print(p.stdout[-3000:], p.stderr[-3000:], sep="\n")
        # the last error line (torchrun ends with its own banner after the rank's traceback)
        lines = [x for x in p.stderr.splitlines() if x.strip()] or [""]
        err = [x for x in lines if re.search(r"\w(Error|Exception)\b", x) and "ChildFailedError" not in x] or lines
        raise RuntimeError(f"train.py {out.name}: exit {p.returncode}: {err[-1].strip()}")
    f = out / "log.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else [], time.perf_counter() - t0


def diffs(a, b, after=0):
    """Two out_dirs: max over state.pt's LoRA tensors of ‖a − b‖ / ‖b‖, max |Δ loss| in log.jsonl after `after`."""
    (sa, la), (sb, lb) = ((read_state(d / "state.pt")["lora"], [x["loss"] for x in map(json.loads, (
        d / "log.jsonl").read_text().splitlines()) if "loss" in x and x["iter"] > after]) for d in (a, b))
    assert len(la) == len(lb) > 0, (la, lb)
    return dict(lora_rel_diff=max(((sa[k].double() - sb[k].double()).norm() / sb[k].double().norm()).item()
                                  for k in sb), loss_diff=max(abs(x - y) for x, y in zip(la, lb)))


class Runs:
    """The train.py parts' inputs, written once, and their reference: the uninterrupted run on varied.jsonl."""

    def __init__(self, args, device, dtype, d, deadline):
        self.args, self.cuda, self.dtype, self.d, self.deadline = args, device.type == "cuda", dtype, d, deadline
        self.name, self.n_test = "tiny" if args.model == "tiny" else "smollm2-135m", 16 if self.cuda else 4
        self.done = {}
        self.flags = dict(init_from=d / "ckpt", tokenizer="bytes", data_dir=d / "data", device=args.device,
                          dtype=str(dtype).removeprefix("torch."), compile=args.compile, lora_r=args.rank,
                          lora_alpha=2 * args.rank, lora_dropout=0.0, method="reflora", reflora_warmup=1,
                          warmup_steps=2, val_set_size=8, eval_base=False, benchmark=False)
        # the reference: dropout (generators across the resume), accumulation, length-grouped batches; eager,
        # since each compiled start of train.py compiles again: only the loop compiles
        self.ref = dict(self.flags, data_path=d / "varied.jsonl", lora_dropout=0.1, batch_size=4, micro_batch_size=2,
                        max_iters=6, log_interval=1, compile=False)

    def straight(self, out="straight"):
        """The inputs written once; the reference run into d/out once (out None: the inputs only); -> d/out."""
        for k, fn in ((None, lambda: write_inputs(self.d, self.name, self.dtype, self.args.seq_len, self.n_test)),
                      (out, lambda: trainpy(self.ref, self.d / out, self.deadline))):
            self.done[k] = self.done.get(k) or fn() or True
        return out and self.d / out


def resume(r):
    """Stop at step 3 (checkpoint), resume to 6: against the uninterrupted run. CPU: bitwise. CUDA: within 10× the
    difference of two uninterrupted runs (atomics in attention's backward make a GPU run differ from itself)."""
    r.straight(None)  # the inputs
    for extra in (dict(stop_iter=3), dict(resume=True)):
        trainpy(dict(r.ref, **extra), r.d / "half", r.deadline)
    noise = diffs(r.straight("again"), r.straight()) if r.cuda else dict(lora_rel_diff=0.0, loss_diff=0.0)
    return dict(diffs(r.d / "half", r.straight(), after=3), noise_lora=noise["lora_rel_diff"],
                noise_loss=noise["loss_diff"])


def eval_only(r):
    """--eval_only on the reference run's adapter: greedy and beam search, batched against one example at a time.
    float32: under bf16 padding changes the logits, and random weights tie often."""
    out, res = r.straight(), dict(examples=r.n_test, beams=r.args.beams)
    for beams in (1, r.args.beams):
        outs = [trainpy(dict(r.ref, eval_only=True, num_beams=beams, eval_batch_size=bs, dtype="float32", eval_limit=0,
                             max_new_tokens=r.args.new_tokens), out, r.deadline) and
                json.loads((out / "eval_boolq.json").read_text())["outputs"] for bs in (r.n_test, 1)]
        assert len(outs[0]) == len(outs[1]) == r.n_test, f"{len(outs[1])} outputs of {r.n_test} examples"
        res[f"b{beams}_agree"] = sum(x == y for x, y in zip(*outs)) / r.n_test
    return res


def dist(r, fsdp):
    """torchrun --nproc_per_node=1 (NCCL on CUDA, gloo on CPU): DDP, or FSDP2 (DTensor factors, the Grams
    all-reduced), against the uninterrupted single-process run."""
    out, ref = r.d / ("fsdp" if fsdp else "ddp"), r.straight()
    recs, wall = trainpy(dict(r.ref, fsdp=fsdp), out, r.deadline, nproc=1)
    return dict(diffs(out, ref), wall_s=wall, steps=max(x["iter"] for x in recs if "loss" in x))


# -----------------------------------------------------------------------------
# S̃ and one optimizer step on the device against float64 on the CPU


def factors(device, k, r, seed=0):
    """k random pairs shaped like LLaMA-7B's up projection (small on CPU): A (k, m, r), B (k, n, r), float32."""
    g = torch.Generator().manual_seed(seed)
    m, n = (11008, 4096) if device.type == "cuda" else (96, 64)
    cols = torch.logspace(0, -1, r, dtype=torch.float64)  # factors with condition number 10
    A = (torch.randn(k, m, r, generator=g, dtype=torch.float64) * cols).float()
    return A, (torch.randn(k, n, r, generator=g, dtype=torch.float64) * cols.flip(0)).float()


def check_S(device, r=32, k=32):
    """S̃ of k pairs of float32 factors at once on the device and on the CPU, against Thm 3's closed form in float64
    on the CPU: S̃'s relative error and the balance residual (max over pairs)."""
    A, B = factors(device, k, r)
    Ga, Gb = A.double().mT @ A.double(), B.double().mT @ B.double()
    pw = lambda G, p: (lambda lam, V: (V * lam.pow(p).unsqueeze(-2)) @ V.mT)(*torch.linalg.eigh(G))  # noqa: E731
    # Thm 3 in float64 by eigh, independently of reflora.py: S̃ = Ga^{-1/2} (Ga^{1/2} Gb Ga^{1/2})^{1/2} Ga^{-1/2}
    ref = pw(Ga, -0.5) @ pw(pw(Ga, 0.5) @ Gb @ pw(Ga, 0.5), 0.5) @ pw(Ga, -0.5)
    rel = lambda x, y: (torch.linalg.matrix_norm(x - y) / torch.linalg.matrix_norm(y)).max().item()

    def errors(S):  # Thm 3: S̃ AᵀA S̃ = BᵀB (ÃᵀÃ = B̃ᵀB̃), the residual in float64; and S̃'s error
        S = S.cpu().double()
        return rel(S, ref), rel(S @ Ga @ S, Gb)

    res = {}
    res["S_rel_err_device"], res["balance_residual_device"] = errors(reflora.optimal_S(A.to(device), B.to(device)))
    res["S_rel_err_cpu32"], res["balance_residual_cpu32"] = errors(reflora.optimal_S(A, B))
    res["balance_residual_cpu64"] = errors(ref)[1]
    return res


def check_steps(device, compile, r=32):
    """One RefLoRA and one RefLoRA-S step (AdamW base) in float32 on the device (compiled if compile) against the
    same step in float64 on the CPU: relative error of the update p_after - p_before, the sensitive measure. The
    last pair is in PEFT's layout (Bᵀ stored, flagged True), whose gradient CUDA's fused AdamW must get in the
    parameter's strides."""
    A, B = factors(device, 2, r, seed=1)
    init = [(A[0], B[0]), (B[0], B[1]), (B[1], A[1].T)]  # (m, n), (n, n) pairs; an (n, m) one as (A, Bᵀ)
    init = [(0.02 * a.contiguous(), 0.02 * b.contiguous()) for a, b in init]
    g = torch.Generator().manual_seed(2)
    grads = [(torch.randn(a.shape, generator=g), torch.randn(b.shape, generator=g)) for a, b in init]
    res = {}
    for method in ("reflora", "reflora-s"):
        new = []
        for i, (dev, dt) in enumerate(((torch.device("cpu"), torch.float64), (device, torch.float32))):
            pairs = [tuple(torch.nn.Parameter(t.to(dev, dt, copy=True)) for t in ab) for ab in init]  # init unchanged
            opt = reflora.RefLoRA([(*pairs[0], False), (*pairs[1], False), (*pairs[2], True)], method=method,
                                  lr=1e-3, warmup=0, compile=compile and i == 1)
            for ab, gab in zip(pairs, grads):
                for p, gr in zip(ab, gab):
                    p.grad = gr.to(dev, dt, copy=True)
            opt.step()
            new.append([p.detach().cpu().double() for ab in pairs for p in ab])
        old = [p.double() for ab in init for p in ab]
        res[f"{method}_step_rel_err"] = max(((d - c).norm() / (c - o).norm()).item()
                                            for c, d, o in zip(new[0], new[1], old))
    return res
