"""Tests of train.py on the random-init `tiny` preset with the byte tokenizer and synthetic data written to tmp_path
(no ../shared needed): config parsing, bitwise resume, atomic checkpoints, batched == one-by-one evaluation,
the eval files, the GLUE head, a non-finite loss, and DDP (gloo, 2 processes) == 1 process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train as T
from data.glue.prepare import glue_metrics
from dataset import GLUE_SEP, encode_cls, encode_lm, group_by_len, lm_batch, load_data
from evaluate import evaluate
from helpers import ROOT, state, tiny_args, write_glue
from model import PRESETS, lora_state_dict, merge_lora
from tokenizer import load_tokenizer
from weights import load_adapter, load_model


# -----------------------------------------------------------------------------
# configuration


def test_config_types_files_and_errors(tmp_path, capsys):
    cfg = T.parse_config(["--lr=1e-3", "--max_iters=7", "--compile=False", "--lora_targets=wq,wv", "--method=lora"])
    assert cfg["lr"] == 1e-3 and type(cfg["lr"]) is float and cfg["max_iters"] == 7 and cfg["compile"] is False
    assert cfg["lora_targets"] == ("wq", "wv") and cfg["method"] == "lora" and cfg["seed"] == T.DEFAULTS["seed"]
    # a config file (literals only, no exec), then flags in order: the later value wins
    f = tmp_path / "c.py"
    f.write_text('"""doc"""\nlr = 5\nlora_targets = ["wq", "wk"]\nmethod = "reflora"  # comment\n')
    cfg = T.parse_config([str(f), "--method=lora"])
    assert cfg["lr"] == 5.0 and type(cfg["lr"]) is float and cfg["lora_targets"] == ("wq", "wk")
    assert cfg["method"] == "lora"
    # --task=glue brings the classifier defaults, unless set explicitly
    cfg = T.parse_config(["--task=glue", "--lr=3e-3"])
    assert cfg["lora_r"] == T.GLUE_DEFAULTS["lora_r"] and cfg["lr"] == 3e-3
    # the shipped presets parse
    for p in sorted((ROOT / "config").glob("*.py")):
        T.parse_config([str(p)])
    assert T.parse_config(["config/llama3_8b.py"])["lr"] == 1e-4
    bad = [["--nope=1"], ["--max_iters=1.5"], ["--compile=yes"], ["--method=dora"], ["--lr"], ["missing.py"],
           ["--batch_size=12", "--micro_batch_size=8"], ["--lora_targets=wq,qkv"], ["--lora_r=0"]]
    f2 = tmp_path / "bad.py"
    f2.write_text("import os\n")
    for argv in bad + [[str(f2)]]:
        with pytest.raises(SystemExit) as e:
            T.parse_config(argv)
        assert e.value.code == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("train.py: error:") and "\n" not in err, err


def test_encode_cls_truncates_longest_first():
    tok = load_tokenizer("bytes")
    short = dict(text_a="a premise", text_b="its hypothesis")
    assert encode_cls(tok, short, 64) == tok.encode("a premise" + GLUE_SEP + "its hypothesis", bos=True)
    assert encode_cls(tok, dict(text_a="one sentence " * 9, text_b=None), 20) == tok.encode("one sentence " * 9,
                                                                                             bos=True)[:20]
    # a long premise is cut, the hypothesis kept whole (a plain [:cutoff] would drop it)
    ids = encode_cls(tok, dict(text_a="p" * 300, text_b="the hypothesis"), 64)
    assert len(ids) == 64 and ids[-14:] == tok.encode("the hypothesis") and ids[0] == tok.bos_id
    # both long: both cut, to equal lengths (BOS counted with the first)
    ids = encode_cls(tok, dict(text_a="p" * 300, text_b="q" * 300), 65)
    assert len(ids) == 65 and ids.count(tok.encode("p")[0]) == 31 and ids[-32:] == tok.encode("q" * 32)


def test_group_by_length_batches():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 500, (1000,), generator=g).tolist()
    perm = torch.randperm(1000, generator=g)
    out = group_by_len(perm, lengths, 8, torch.Generator().manual_seed(1), mega=10)
    assert sorted(out.tolist()) == list(range(1000))  # a permutation
    assert torch.equal(out, group_by_len(perm, lengths, 8, torch.Generator().manual_seed(1), mega=10))
    chunk = {i: c for c, block in enumerate(perm.split(80)) for i in block.tolist()}
    spread = lambda p: sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in p.view(-1, 8).tolist())
    for b in out.view(-1, 8).tolist():
        assert len({chunk[i] for i in b}) == 1  # each batch from one chunk of the shuffled order
    assert spread(out) < spread(perm) / 5  # and of similar lengths
    # batches are shuffled within a chunk, not in descending length
    maxima = [max(lengths[i] for i in b) for b in out[:80].view(-1, 8).tolist()]
    assert maxima != sorted(maxima, reverse=True)


# -----------------------------------------------------------------------------
# checkpoints: resume is bitwise, saves are atomic


def test_resume_is_bitwise(tmp_path):
    # reflora (Thm 3) refactors from step 2 on; dropout exercises the RNG state across the resume
    common = ["--method=reflora", "--lora_dropout=0.1", "--eval_limit=1", "--group_by_length=True"]
    straight = T.parse_config(tiny_args(tmp_path / "a", max_iters=6) + common)
    T.train(straight)
    half = T.parse_config(tiny_args(tmp_path / "b", max_iters=6, stop_iter=3) + common)
    assert T.train(half)["iter"] == 3 and state(tmp_path / "b/out")["iter_num"] == 3
    T.train({**half, "stop_iter": 0, "resume": True})
    a, b = state(tmp_path / "a/out"), state(tmp_path / "b/out")
    assert a["iter_num"] == b["iter_num"] == 6
    assert a["lora"].keys() == b["lora"].keys()
    for k in a["lora"]:
        assert torch.equal(a["lora"][k], b["lora"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # the training moved the adapter, and the PEFT export holds the same tensors as state.pt
    assert any(v.abs().max() > 0 for k, v in a["lora"].items() if k.endswith(".A"))
    model = load_model("tiny")
    load_adapter(model, tmp_path / "a/out")
    for k, v in lora_state_dict(model).items():
        assert torch.equal(v, a["lora"][k]), k
    # the optimizer's own settings are in state.pt once, in its state_dict; read back, the config is whole
    raw = torch.load(tmp_path / "a/out/state.pt", weights_only=True)
    meta = raw["optimizer"]["reflora"]
    assert not {"method", "base", "reflora_warmup", "reflora_interval"} & raw["config"].keys()
    assert (meta["method"], meta["base"], meta["warmup"], meta["interval"]) == ("reflora", "adamw", 1, 1)
    assert a["config"] == straight
    # --eval_only on that out_dir reproduces the end-of-training evaluation
    before = (tmp_path / "a/out/eval_boolq.json").read_text()
    T.train({**straight, "eval_only": True})
    assert (tmp_path / "a/out/eval_boolq.json").read_text() == before


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    cfg = T.parse_config(tiny_args(tmp_path, max_iters=4, eval_interval=2))
    real_save, calls = torch.save, []

    def crashing_save(obj, f, *a, **k):  # the second checkpoint dies half-way through writing state.pt
        calls.append(f)
        if len(calls) == 2:
            f.write(b"partial") if hasattr(f, "write") else Path(f).write_bytes(b"partial")  # the open file, or a path
            raise KeyboardInterrupt
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg)
    st = state(cfg["out_dir"])
    assert st["iter_num"] == 2 and st["config"] == cfg


# -----------------------------------------------------------------------------
# evaluation


def test_eval_batched_equals_one_by_one_and_writes_json(tmp_path):
    cfg = T.parse_config(tiny_args(tmp_path, eval_limit=5, max_new_tokens=8))
    torch.manual_seed(0)
    model, tok, _ = T.build(cfg, torch.device("cpu"), torch.float32)
    with torch.no_grad():  # a non-trivial adapter, merged as the protocol says
        for A, B in model.lora_pairs():
            A.normal_(0, 0.5)
    merge_lora(model)
    outs = {}
    for bs in (1, 4):
        out = tmp_path / f"eval{bs}"
        out.mkdir()
        acc = evaluate(model, tok, {**cfg, "eval_batch_size": bs}, cfg["data_dir"], out)
        outs[bs] = {n: json.loads((out / f"eval_{n}.json").read_text()) for n in ("boolq", "piqa")}
        for n, d in outs[bs].items():
            assert len(d["predictions"]) == len(d["labels"]) == len(d["outputs"]) == 5
            labels = [r["answer"] for r in json.load(open(Path(cfg["data_dir"]) / "dataset" / n / "test.json"))]
            assert d["labels"] == labels
            assert d["accuracy"] == acc[n] == sum(p == y for p, y in zip(d["predictions"], labels)) / 5
    assert any(t for d in outs[1].values() for t in d["outputs"])  # something was generated
    for n in outs[1]:
        assert outs[1][n]["outputs"] == outs[4][n]["outputs"]
        assert outs[1][n]["predictions"] == outs[4][n]["predictions"]


# -----------------------------------------------------------------------------
# GLUE: LoRA + float32 head, metrics


@pytest.mark.parametrize("task", ["rte", "stsb"])
def test_glue_head_trains_and_writes_metrics(tmp_path, task):
    data = write_glue(tmp_path / "glue", task)
    cfg = T.parse_config(["--task=glue", f"--glue_task={task}", "--init_from=tiny", f"--data_dir={data}",
                          f"--out_dir={tmp_path / 'out'}", "--max_iters=3", "--batch_size=8", "--micro_batch_size=4",
                          "--eval_batch_size=5", "--warmup_steps=0", "--lr=1e-2", "--log_interval=1"])
    torch.manual_seed(cfg["seed"])
    _, _, clf0 = T.build(cfg, torch.device("cpu"), torch.float32)  # the head before training
    T.train(cfg)
    d = json.loads((tmp_path / "out" / f"eval_{task}.json").read_text())
    assert len(d["predictions"]) == len(d["labels"]) == 12
    assert d["metrics"] == glue_metrics(task, d["predictions"], d["labels"])
    assert set(d["metrics"]) >= ({"accuracy"} if task == "rte" else {"pearson", "spearman"})
    if task == "rte":
        assert set(d["predictions"]) <= {0, 1}
    else:
        assert all(isinstance(p, float) for p in d["predictions"])
    st = state(tmp_path / "out")
    assert st["head"]["weight"].dtype == torch.float32
    assert st["head"]["weight"].shape[0] == (1 if task == "stsb" else 2)
    assert not torch.equal(st["head"]["weight"], clf0.head.weight)  # the head is trained
    assert (tmp_path / "out" / "head.safetensors").is_file()
    # --eval_only reloads adapter + head from out_dir and gets the same dev metrics
    assert T.train({**cfg, "eval_only": True}) == d["metrics"]
    # stop after 1 step + resume == straight, the head included
    half = {**cfg, "out_dir": str(tmp_path / "half"), "stop_iter": 1}
    T.train(half)
    T.train({**half, "stop_iter": 0, "resume": True})
    h = state(tmp_path / "half")
    assert all(torch.equal(h[k][n], st[k][n]) for k in ("lora", "head") for n in st[k])


# -----------------------------------------------------------------------------
# failure: a non-finite loss stops with exit 1 and leaves the last checkpoint loadable


def test_nonfinite_loss_stops_cleanly(tmp_path, capsys):
    # step 0 runs at lr 0 (warmup), so the checkpoint at iter 1 is good; step 1 at lr 2.5e29 diverges
    argv = tiny_args(tmp_path, lr=1e30, warmup_steps=4, max_iters=6, eval_interval=1, method="lora")
    with pytest.raises(SystemExit) as e:
        T.main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "non-finite" in err and "last good checkpoint" in err and "\n" not in err
    st = state(tmp_path / "out")
    assert st["iter_num"] == 1
    assert all(torch.isfinite(v).all() for v in st["lora"].values())


# -----------------------------------------------------------------------------
# DDP: 2 processes (gloo, CPU) give the result of 1 process with the same global batch


def torchrun(argv, timeout, script="train.py"):
    """train.py (or a script that runs it) under torchrun, 2 processes of one thread each (the machine's 2 cores):
    the finished process."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), *argv], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=timeout)


def test_ddp_two_processes_match_one(tmp_path):
    # no dropout (its masks differ across ranks); reflora-s rescales from step 2 on
    flags = lambda d: tiny_args(d, lora_dropout=0.0, max_iters=3, eval_limit=2)
    T.train(T.parse_config(flags(tmp_path / "one")))
    r = torchrun(flags(tmp_path / "two"), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(2 × 1 × 4)" in r.stdout  # 2 processes, no accumulation, micro-batch 4
    one, two = state(tmp_path / "one/out"), state(tmp_path / "two/out")
    assert len(two["rng"]) == 2 and two["iter_num"] == 3
    for k in one["lora"]:
        torch.testing.assert_close(two["lora"][k], one["lora"][k], rtol=1e-5, atol=1e-7)
    assert any(v.abs().max() > 0 for k, v in one["lora"].items() if k.endswith(".A"))
    for n in ("boolq", "piqa"):
        a, b = (json.loads((tmp_path / d / "out" / f"eval_{n}.json").read_text()) for d in ("one", "two"))
        assert a["predictions"] == b["predictions"] and a["outputs"] == b["outputs"]


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """SIGTERM to rank 1 alone, after its step 2: both ranks learn it from distributed.any_rank (its gloo group,
    also beside NCCL) after that step, save one checkpoint at iter 2 and exit 143. Unheard, rank 0 would train on
    and wait for rank 1 in step 3's all-reduce until the timeout."""
    script = tmp_path / "signal_rank1.py"
    script.write_text(f"""import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import train
step = train._step
def once(r):
    lr = step(r)
    if r.rank == 1 and r.it == 1:  # r.it counts the steps done before this one
        os.kill(os.getpid(), signal.SIGTERM)
    return lr
train._step = once
train.main()
""")
    r = torchrun(tiny_args(tmp_path, lora_dropout=0.0, max_iters=50, eval_interval=0), timeout=120, script=script)
    assert r.returncode != 0 and r.stderr.count("exit code: 143") + r.stderr.count("exitcode  : 143") >= 1, \
        r.stderr[-2000:]
    assert state(tmp_path / "out")["iter_num"] == 2


# -----------------------------------------------------------------------------
# FSDP2: 2 processes (gloo, CPU), each block sharded by rows; RefLoRA's Grams and norms summed over the shards


@pytest.mark.parametrize("method", ["reflora", "reflora-s"])
def test_fsdp_two_processes_match_one_and_resume(tmp_path, method):
    flags = lambda d, **kw: tiny_args(d, lora_dropout=0.0, max_iters=4, eval_limit=1, eval_interval=2,
                                      method=method, **kw)
    T.train(T.parse_config(flags(tmp_path / "one")))
    run = lambda d, *extra: torchrun([*flags(d), "--fsdp=True", *extra], timeout=180)  # noqa: E731
    r = run(tmp_path / "two")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(tmp_path / "half", "--stop_iter=2")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(tmp_path / "half", "--resume=True")
    assert r.returncode == 0, r.stderr[-3000:]
    one, two, half = (state(tmp_path / d / "out") for d in ("one", "two", "half"))
    assert two["iter_num"] == half["iter_num"] == 4
    # the state.pt of a sharded run is the full one: same keys and shapes, same values up to reduction order
    for k in one["lora"]:
        torch.testing.assert_close(two["lora"][k], one["lora"][k], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(half["lora"][k], two["lora"][k], rtol=1e-5, atol=1e-7)
    for sa, sb in zip(one["optimizer"]["state"].values(), two["optimizer"]["state"].values()):
        assert torch.equal(sa["step"], sb["step"])
        for k in ("exp_avg", "exp_avg_sq"):  # Adam moments: normwise (elements near 0 carry the float32
            # reduction-order noise); RefLoRA-S in one CPU process keeps them up to factors (see RefLoRA)
            a, b = (st[k] * st.get(k + "_factor", 1.0) for st in (sa, sb))
            assert b.shape == a.shape and (b - a).norm() <= 1e-4 * a.norm(), k
    assert any(v.abs().max() > 0 for k, v in one["lora"].items() if k.endswith(".A"))
    # the step norm of the log: Grams summed over the shards give the whole model's ‖ΔW‖
    dw = lambda d: [json.loads(l)["dw"] for l in (tmp_path / d / "out/log.jsonl").read_text().splitlines()
                    if '"loss"' in l]  # noqa: E731
    assert len(dw("one")) == 4 and dw("two") == pytest.approx(dw("one"), rel=1e-4) and dw("one")[-1] > 0
    # the PEFT export of the sharded run holds the full tensors
    model = load_model("tiny")
    load_adapter(model, tmp_path / "two/out")
    for k, v in lora_state_dict(model).items():
        assert torch.equal(v, two["lora"][k]), k


def test_fsdp_with_compiled_blocks_matches_one_eager_process(tmp_path):
    """train.py's CUDA defaults on gloo: each block compiled (before fully_shard), FSDP2 over 2 processes, RefLoRA:
    the adapter of one eager process, up to what inductor's fusions and the shards' reduction order change."""
    flags = lambda d: tiny_args(d, lora_dropout=0.0, max_iters=3, eval_limit=1, method="reflora")
    T.train(T.parse_config(flags(tmp_path / "one")))
    r = torchrun([*flags(tmp_path / "two"), "--fsdp=True", "--compile=True"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compile: each of the 2 blocks" in r.stdout
    one, two = state(tmp_path / "one/out"), state(tmp_path / "two/out")
    assert two["iter_num"] == 3 and any(v.abs().max() > 0 for k, v in one["lora"].items() if k.endswith(".A"))
    for k in one["lora"]:
        torch.testing.assert_close(two["lora"][k], one["lora"][k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "reflora", "reflora-s"])
def test_log_records_the_refactoring(tmp_path, method):
    """log.jsonl's training records carry the last refactoring's stats (issue 10.2): every pair refactored
    exactly, a balanced result, s in its range; none for plain LoRA, none before the refactoring warmup ends."""
    T.main(tiny_args(tmp_path, method=method, max_iters=3, reflora_warmup=1, eval_limit=0, eval_base=False))
    recs = [json.loads(line) for line in (tmp_path / "out/log.jsonl").read_text().splitlines()]
    st = {r["iter"]: r["refactor"] for r in recs if "loss" in r}
    # RefLoRA preconditions step warmup+1 (the second), RefLoRA-S rescales after step warmup (the first)
    assert (st[1] == {}) == (method != "reflora-s") and (st[3] == {}) == (method == "lora")
    if method != "lora":
        n_pairs = 5 * PRESETS["tiny"]["n_layers"]  # q, k, v, up, down in every block
        assert st[3]["exact"] == n_pairs and st[3]["fallback"] == st[3]["alone"] == 0
        assert st[3]["residual"] < 1e-5 and 0 < st[3]["s_min"] <= st[3]["s_median"] <= st[3]["s_max"]


# -----------------------------------------------------------------------------
# --base=sgd (issue 21): plain gradient descent, checked against an independent loop; the step norm in the log


def test_base_sgd_is_plain_gradient_descent_and_logs_the_step(tmp_path):
    """--base=sgd --grad_clip=0 with method lora is p ← p − lr_t ∇p under HF's linear schedule, and each log
    record's dw is the step's Σ‖(α/r)(A'B'ᵀ − ABᵀ)‖_F, dw_rel its ratio to Σ‖(α/r)A'B'ᵀ‖_F (dense here)."""
    total, w, lr, bs = 4, 2, 0.5, 4
    argv = tiny_args(tmp_path, method="lora", base="sgd", grad_clip=0, lora_dropout=0.0, batch_size=bs,
                     micro_batch_size=bs, group_by_length=False, max_iters=total, warmup_steps=w, lr=lr,
                     dtype="float32", benchmark=False)
    cfg = T.parse_config(argv)
    T.main(argv)
    # the reference: same init (seed), same batches (seed's permutation of the training set), the update by hand
    torch.manual_seed(cfg["seed"])
    model, tok, _ = T.build(cfg, torch.device("cpu"), torch.float32)
    train_set, _ = load_data(cfg, cfg["data_dir"], lambda *a: None)
    perm = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg["seed"])).tolist()
    pairs, scale = model.lora_pairs(), cfg["lora_alpha"] / cfg["lora_r"]
    dws, rels = [], []
    for t in range(total):
        lr_t = lr * (t / w if t < w else (total - t) / (total - w))
        x, y = lm_batch([encode_lm(tok, train_set[i], cfg["cutoff_len"]) for i in perm[t * bs:(t + 1) * bs]],
                          tok.pad_id)
        model(x, targets=y)[1].backward()
        W0 = [A.detach().double() @ B.detach().double().T for A, B in pairs]
        with torch.no_grad():
            for A, B in pairs:
                for p in (A, B):
                    p -= lr_t * p.grad
                    p.grad = None
        W1 = [A.detach().double() @ B.detach().double().T for A, B in pairs]
        dws.append(scale * sum(torch.linalg.norm(b - a).item() for a, b in zip(W0, W1)))
        rels.append(dws[-1] / (scale * sum(torch.linalg.norm(b).item() for b in W1)) if t else None)
    st = state(tmp_path / "out")
    ref = lora_state_dict(model)
    assert st["config"]["base"] == "sgd" and ref.keys() == st["lora"].keys()
    assert any(v.abs().max() > 0 for k, v in ref.items() if k.endswith(".A"))  # the adapter moved
    for k in ref:
        torch.testing.assert_close(st["lora"][k], ref[k], rtol=1e-5, atol=1e-7)
    recs = [json.loads(line) for line in (tmp_path / "out/log.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    assert [r["iter"] for r in train] == [1, 2, 3, 4]
    # step 1 runs at lr 0 (warmup): no step, A = 0, no ratio; then the dense reference's numbers
    assert train[0]["dw"] == 0 and train[0]["dw_rel"] is None and dws[0] == 0
    for r, dw, rel in zip(train[1:], dws[1:], rels[1:]):
        assert r["dw"] == pytest.approx(dw, rel=1e-4) and r["dw_rel"] == pytest.approx(rel, rel=1e-4)
    # --benchmark=False: the validation loss at the end, no test set (nor base model) evaluated
    assert any("val_loss" in r and r["iter"] == total for r in recs)
    assert not list((tmp_path / "out").glob("eval*.json"))
