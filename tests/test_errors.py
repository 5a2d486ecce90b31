"""Bad input to train.py, table-driven (issue 12): CLI flags, config files, data files, checkpoints (state.pt,
checkpoint.json), model files, PEFT adapters and GLUE heads. Every case runs train.main(argv) in-process on the tiny
preset and must end with exit 2 (1 for divergence), exactly one line on stderr naming the flag or file, no traceback,
and every file in out_dir unchanged (checksums before and after; a fresh out_dir is not even created, nothing lands
in the current directory). Issue 19 added out_dir, resume and eval consistency, damaged side files, odd models and
data files too deep or too long."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import model as M
import train as T
from helpers import TINY, argv, write_commonsense, write_glue


# -----------------------------------------------------------------------------
# fixtures: one finished tiny commonsense run and one finished GLUE (rte) run, built once


flags = argv  # the table spells out every flag of its two runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    data, glue = write_commonsense(root / "data", n_train=24, n_test=2), write_glue(root / "glue", "rte", 16, 4)
    lm = dict(TINY, data_dir=data, max_iters=2, cutoff_len=128, eval_limit=1, eval_batch_size=2, max_new_tokens=2,
              val_set_size=4)
    cls = dict(task="glue", glue_task="rte", init_from="tiny", dtype="float32", data_dir=glue, batch_size=8,
               micro_batch_size=8, max_iters=1, cutoff_len=64, warmup_steps=0, eval_limit=4, eval_batch_size=4)
    T.main(flags(**lm, out_dir=root / "lm"))
    T.main(flags(**cls, out_dir=root / "cls"))
    return dict(root=root, lm=lm, cls=cls, data=data, glue=glue)


def checksums(d):
    d = Path(d)
    if not d.exists():
        return None
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(d.rglob("*"))}


# -----------------------------------------------------------------------------
# the table: (id, argv builder, setup(case_dir, runs) or None, words stderr must contain, exit code)
# argv builders get (runs, case_dir); a case with setup works on its own copy of a finished run's out_dir


def lm(**kw):
    return lambda R, d: flags(**{**R["lm"], "out_dir": d / "out", **kw})


def cls(**kw):
    return lambda R, d: flags(**{**R["cls"], "out_dir": d / "out", **kw})


def copy(which="lm", then=None):
    def setup(d, R):
        shutil.copytree(R["root"] / which, d / "out")
        if then:
            then(d / "out", R)
    return setup


def write(name, data):  # a file of out_dir replaced by bytes, text or a torch object
    def then(out, R):
        p = out / name
        if isinstance(data, bytes):
            p.write_bytes(data)
        elif isinstance(data, str):
            p.write_text(data)
        else:
            torch.save(data(torch.load(p, weights_only=True)) if callable(data) else data, p)
    return then


def truncate(name, keep=0.5):
    def then(out, R):
        b = (out / name).read_bytes()
        (out / name).write_bytes(b[:int(len(b) * keep)])
    return then


def unlink(name):
    return lambda out, R: (out / name).unlink()


def state_with(**kw):
    return write("state.pt", lambda st: {**st, **kw})


def lora_tensor_shape():
    def f(st):
        k = next(iter(st["lora"]))
        st["lora"][k] = torch.zeros(3, 3)
        return st
    return write("state.pt", f)


def manifest_edit(edit):
    def then(out, R):
        m = json.loads((out / "checkpoint.json").read_text())
        (out / "checkpoint.json").write_text(json.dumps(edit(m)))
    return then


def adapter_cfg(**kw):
    def then(out, R):
        c = json.loads((out / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps({**c, **kw}))
    return then


def adapter_key():
    def then(out, R):
        save_file({"base_model.model.nope.lora_A.weight": torch.zeros(2, 2)}, out / "adapter_model.safetensors")
    return then


def data_file(text, name="train.json"):  # a commonsense data dir whose boolq/<name> holds `text`
    def setup(d, R):
        shutil.copytree(R["data"], d / "data")
        p = d / "data" / "dataset" / "boolq" / name
        p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text)
    return setup


def glue_file(text, split="train"):
    def setup(d, R):
        shutil.copytree(R["glue"], d / "glue")
        (d / "glue" / "RTE" / f"{split}.tsv").write_text(text)
    return setup


def model_dir(files):  # a fake checkpoint directory for --init_from
    def setup(d, R):
        (d / "m").mkdir()
        for name, text in files.items():
            (d / "m" / name).write_bytes(text) if isinstance(text, bytes) else (d / "m" / name).write_text(text)
    return setup


def config_file(text):
    def setup(d, R):
        (d / "c.py").write_bytes(text) if isinstance(text, bytes) else (d / "c.py").write_text(text)
    return setup


def with_file(name, text="x"):
    return lambda d, R: (d / name).write_text(text)


CASES = []


def case(id, argv, setup=None, words=(), code=2):
    CASES.append(pytest.param(argv, setup, (words,) if isinstance(words, str) else words, code, id=id))


# CLI flags: types, choices, ranges, combinations (parse_config)
case("unknown-key", lm(nope=1), words="nope")
case("no-equals", lambda R, d: ["--lr"], words="--lr")
for k, v in [("max_iters", "1.5"), ("lora_r", "x"), ("lr", "abc"), ("compile", "yes"), ("resume", "1"),
             ("seed", ""), ("weight_decay", "1e"), ("lora_alpha", "2.5"), ("grad_checkpoint", "true")]:
    case(f"type-{k}-{v}", lm(**{k: v}), words=k)
for k, v in [("method", "dora"), ("base", "lion"), ("base", "SGD"), ("task", "mnli"), ("glue_task", "wnli"),
             ("dtype", "float16"), ("device", "tpu"), ("device", "gpu"), ("device", "cuda:x"), ("method", "")]:
    case(f"choice-{k}-{v}", lm(**{k: v}), words=k)
if not torch.cuda.is_available():
    case("device-cuda-no-cuda", lm(device="cuda"), words="--device=cuda")
    case("device-cuda1-no-cuda", lm(device="cuda:1"), words="--device=cuda:1")
for k in ("lora_r", "batch_size", "micro_batch_size", "cutoff_len", "eval_batch_size", "num_beams", "max_new_tokens",
          "log_interval", "reflora_interval"):
    for v in (0, -1):
        case(f"range-{k}={v}", lm(**{k: v}), words=f"--{k}={v}")
for k in ("max_iters", "stop_iter", "epochs", "eval_limit", "warmup_steps", "reflora_warmup", "eval_interval",
          "val_set_size"):
    case(f"range-{k}=-1", lm(**{k: -1}), words=f"--{k}=-1")
for k, vs in [("lr", ("-1", "0", "nan", "inf", "-inf")), ("grad_clip", ("-1", "nan", "inf")),
              ("weight_decay", ("-1", "nan", "inf")), ("lora_dropout", ("-0.1", "1", "1.5", "nan")),
              ("lora_alpha", ("0", "-8"))]:
    for v in vs:
        case(f"range-{k}={v}", lm(**{k: v}), words=f"--{k}=")
case("batch-not-multiple", lm(batch_size=12, micro_batch_size=8), words="--batch_size=12")
case("targets-unknown", lm(lora_targets="wq,qkv"), words=("--lora_targets", "qkv"))
case("targets-empty", lm(lora_targets=","), words="--lora_targets")
case("eval-sets-unknown", lm(eval_sets="nonsense"), words=("--eval_sets", "nonsense"))
case("resume-and-overwrite", lm(resume=True, overwrite=True), words=("--resume", "--overwrite"))

# config files
case("config-missing", lambda R, d: [str(d / "none.py")], words="none.py")
case("config-syntax", lambda R, d: [str(d / "c.py")], config_file("lr = (\n"), words="c.py")
case("config-import", lambda R, d: [str(d / "c.py")], config_file("import os\n"), words="c.py:1")
case("config-call", lambda R, d: [str(d / "c.py")], config_file("lr = float('1')\n"), words="c.py:1")
case("config-name", lambda R, d: [str(d / "c.py")], config_file("lr = x\n"), words="c.py:1")
case("config-unknown-key", lambda R, d: [str(d / "c.py")], config_file("nope = 1\n"), words=("c.py:1", "nope"))
case("config-wrong-type", lambda R, d: [str(d / "c.py")], config_file("max_iters = 'many'\n"), words="c.py:1")
case("config-bad-value", lambda R, d: [str(d / "c.py")], config_file("lr = -1.0\n"), words="--lr=-1.0")
case("config-not-utf8", lambda R, d: [str(d / "c.py")], config_file(b"lr = 1\n\xff\xfe\n"), words="c.py")
case("config-nul", lambda R, d: [str(d / "c.py")], config_file(b"lr = 1\x00\n"), words="c.py")
case("config-augassign", lambda R, d: [str(d / "c.py")], config_file("lr += 1\n"), words="c.py:1")
case("config-tuple-of-ints", lambda R, d: [str(d / "c.py")], config_file("eval_sets = (1, 2)\n"), words="c.py:1")
case("config-dir", lambda R, d: [str(d)], words="config file")

# checked against the model and the data
case("cutoff-over-max-seq-len", lm(cutoff_len=100000), words=("--cutoff_len=100000", "max_seq_len"))
case("max-new-tokens-no-room", lm(max_new_tokens=256), words=("--max_new_tokens=256", "max_seq_len"))
case("glue-cutoff-below-pair", cls(cutoff_len=2), words="--cutoff_len=2")
case("eval-set-absent", lm(eval_sets="hellaswag"), words=("--eval_sets", "hellaswag"))
case("eval-set-one-absent", lm(eval_sets="boolq,openbookqa"), words=("--eval_sets", "openbookqa"))
case("batch-bigger-than-data", lm(batch_size=64, micro_batch_size=8), words="fewer than one batch")

# out_dir
case("out-dir-is-file", lambda R, d: flags(**{**R["lm"], "out_dir": d / "f"}), with_file("f"), words="is a file")
case("out-dir-under-file", lambda R, d: flags(**{**R["lm"], "out_dir": d / "f" / "sub"}), with_file("f"),
     words="is a file")
case("new-run-into-checkpoint", lm(), copy(), words=("holds a checkpoint", "--resume=True", "--overwrite=True"))
case("new-glue-run-into-checkpoint", cls(), copy("cls"), words="holds a checkpoint")
case("resume-nothing-there", lm(resume=True), words=("--resume=True", "state.pt"))
case("resume-empty-dir", lm(resume=True), lambda d, R: (d / "out").mkdir(), words="state.pt")
case("eval-only-typo-dir", lm(eval_only=True), words=("--eval_only", "does not exist"))
case("eval-only-no-adapter-config", lm(eval_only=True), copy(then=unlink("adapter_config.json")),
     words="adapter_config.json")
case("eval-only-no-adapter-model", lm(eval_only=True), copy(then=unlink("adapter_model.safetensors")),
     words="adapter_model.safetensors")
case("live-lock", lm(resume=True, max_iters=3), copy(then=lambda out, R: (out / ".lock").write_text(
    f"{os.uname().nodename} {os.getppid()}")), words=("in use", ".lock"))
case("lock-other-host", lm(resume=True, max_iters=3), copy(then=write(".lock", "elsewhere.example 1")),
     words=("elsewhere.example", ".lock"))

# state.pt (--resume=True)
for id, then, words in [
        ("random-bytes", write("state.pt", os.urandom(3000)), "state.pt"),
        ("zero-bytes", write("state.pt", b""), "state.pt"),
        ("truncated-half", truncate("state.pt"), "state.pt"),
        ("truncated-tail", truncate("state.pt", 0.98), "state.pt"),
        ("text", write("state.pt", "hello\n"), "state.pt"),
        ("empty-dict", write("state.pt", {}), "not a train.py checkpoint"),
        ("list", write("state.pt", [1, 2, 3]), "not a train.py checkpoint"),
        ("tensor", write("state.pt", torch.zeros(3)), "not a train.py checkpoint"),
        ("no-config", write("state.pt", lambda st: {k: v for k, v in st.items() if k != "config"}), "state.pt"),
        ("config-not-dict", state_with(config=[1]), "state.pt"),
        ("refused-pickle", write("state.pt", __import__("pickle").dumps(Path("x"))), "state.pt"),
        ("lora-shape", lora_tensor_shape(), ("state.pt", "LoRA")),
        ("lora-not-dict", state_with(lora=[1]), ("state.pt", "LoRA")),
        ("optimizer-empty", state_with(optimizer={}), ("state.pt", "optimizer")),
        ("optimizer-groups", state_with(optimizer={"state": {}, "param_groups": []}), ("state.pt", "optimizer")),
        ("iter-not-int", state_with(iter_num="x"), "state.pt"),
        ("missing", unlink("state.pt"), "state.pt")]:
    # the size recorded in checkpoint.json would catch most of these first; drop it to reach state.pt itself
    case(f"state-{id}", lm(resume=True, max_iters=3),
         copy(then=lambda out, R, t=then: (unlink("checkpoint.json")(out, R), t(out, R))), words=words)
case("state-size-vs-manifest", lm(resume=True, max_iters=3), copy(then=truncate("state.pt")),
     words=("state.pt", "checkpoint.json"))
case("manifest-garbage", lm(resume=True, max_iters=3), copy(then=write("checkpoint.json", "{")),
     words="checkpoint.json")
case("manifest-list", lm(resume=True, max_iters=3), copy(then=write("checkpoint.json", "[]")),
     words="checkpoint.json")
case("manifest-lists-missing", lm(resume=True, max_iters=3),
     copy(then=manifest_edit(lambda m: {**m, "files": {**m["files"], "gone.bin": 3}})), words="gone.bin")
case("adapter-resized-vs-manifest", lm(eval_only=True), copy(then=truncate("adapter_model.safetensors", 0.9)),
     words="adapter_model.safetensors")
for k, v in [("lora_r", 8), ("lora_alpha", 16), ("method", "lora"), ("base", "sgd"), ("seed", 1),
             ("batch_size", 4), ("micro_batch_size", 2), ("lora_dropout", 0.1), ("lora_targets", "wq,wv"),
             ("cutoff_len", 100), ("val_set_size", 6), ("reflora_warmup", 3), ("group_by_length", False),
             ("reflora_interval", 2), ("tokenizer", "bytes")]:
    case(f"resume-changes-{k}", lm(resume=True, max_iters=3, **{k: v}), copy(),
         words=(f"--{k}=", "cannot change on resume"))
case("resume-changes-data-dir", lambda R, d: flags(**{**R["lm"], "out_dir": d / "out", "resume": True,
                                                       "data_dir": d / "data"}),
     lambda d, R: (copy()(d, R), shutil.copytree(R["data"], d / "data")), words=("--data_dir=", "cannot change"))
case("resume-glue-task", cls(resume=True, max_iters=2, glue_task="stsb", data_dir="{glue2}"), lambda d, R: (
    copy("cls")(d, R), write_glue(d / "glue2", "stsb")), words="glue_task")

# PEFT adapter and GLUE head (--eval_only=True)
for id, then, words in [
        ("adapter-model-garbage", write("adapter_model.safetensors", b"\x00" * 64), "adapter_model.safetensors"),
        ("adapter-model-empty", write("adapter_model.safetensors", b""), "adapter_model.safetensors"),
        ("adapter-model-unexpected-key", adapter_key(), "adapter_model.safetensors"),
        ("adapter-config-garbage", write("adapter_config.json", "{"), "adapter_config.json"),
        ("adapter-config-dora", adapter_cfg(use_dora=True), "adapter_config.json"),
        ("adapter-config-binary", write("adapter_config.json", b"\xff\xfe\x00"), "adapter_config.json")]:
    case(f"eval-{id}", lm(eval_only=True), copy(then=lambda out, R, t=then: (unlink("checkpoint.json")(out, R),
                                                                            t(out, R))), words=words)
case("eval-adapter-other-rank", lm(eval_only=True, lora_r=8), copy(), words="shapes")
case("eval-adapter-other-targets", lm(eval_only=True, lora_targets="wq"), copy(), words="adapter covers")
case("glue-head-garbage", cls(eval_only=True), copy("cls", lambda o, R: (unlink("checkpoint.json")(o, R), write(
    "head.safetensors", os.urandom(100))(o, R))), words="head.safetensors")
case("glue-head-empty-file", cls(eval_only=True), copy("cls", lambda o, R: (unlink("checkpoint.json")(o, R), write(
    "head.safetensors", b"")(o, R))), words="head.safetensors")
case("glue-head-missing", cls(eval_only=True), copy("cls", lambda o, R: (unlink("checkpoint.json")(o, R), unlink(
    "head.safetensors")(o, R))), words="head.safetensors")
case("glue-head-other-task", cls(eval_only=True, glue_task="stsb", data_dir="{glue2}"), lambda d, R: (
    copy("cls")(d, R), write_glue(d / "glue2", "stsb")), words=("head.safetensors", "another task"))
case("glue-head-wrong-keys", cls(eval_only=True), copy("cls", lambda o, R: (unlink("checkpoint.json")(o, R), save_file(
    {"w": torch.zeros(2, 64)}, o / "head.safetensors"))), words="head.safetensors")

# model files (--init_from) and tokenizers
case("init-from-missing", lm(init_from="/nonexistent/model"), words="/nonexistent/model")
case("init-from-preset-typo", lm(init_from="tiny2"), words="tiny2")
case("init-from-no-weights-preset", lm(init_from="llama-7b"), words="llama-7b")
case("init-from-empty-dir", lambda R, d: flags(**{**R["lm"], "out_dir": d / "out", "init_from": d / "m"}),
     model_dir({}), words="m")
case("init-from-config-garbage", lambda R, d: flags(**{**R["lm"], "out_dir": d / "out", "init_from": d / "m"}),
     model_dir({"config.json": "{"}), words="config.json")
case("init-from-not-llama", lambda R, d: flags(**{**R["lm"], "out_dir": d / "out", "init_from": d / "m"}),
     model_dir({"config.json": json.dumps(dict(model_type="gpt2"))}), words="config.json")
case("init-from-params-no-weights", lambda R, d: flags(**{**R["lm"], "out_dir": d / "out", "init_from": d / "m"}),
     model_dir({"params.json": json.dumps(dict(dim=64, n_layers=1, n_heads=4, vocab_size=512))}), words="m")
case("init-from-params-garbage", lambda R, d: flags(**{**R["lm"], "out_dir": d / "out", "init_from": d / "m"}),
     model_dir({"params.json": "[", "consolidated.00.pth": b""}), words="params.json")
case("init-from-gguf-garbage", lambda R, d: flags(**{**R["lm"], "out_dir": d / "out", "init_from": d / "m.gguf"}),
     with_file("m.gguf", "not gguf"), words="m.gguf")
case("tokenizer-missing", lm(tokenizer="/nonexistent/tok.model"), words="/nonexistent/tok.model")

# data files
for id, text, words in [("not-json", "[{", "train.json"), ("a-dict", "{}", "train.json"),
                        ("record-not-object", "[1]", "record 0"), ("missing-key", '[{"instruction": "a"}]', "record 0"),
                        ("not-string", '[{"instruction": 1, "input": "", "output": "", "answer": ""}]', "record 0"),
                        ("not-utf8", b"[\xff\xfe]", "train.json"), ("empty-file", "", "train.json")]:
    case(f"data-{id}", lambda R, d: flags(**{**R["lm"], "out_dir": d / "out", "data_dir": d / "data"}),
         data_file(text), words=words)
case("data-test-not-json", lambda R, d: flags(**{**R["lm"], "out_dir": d / "out", "data_dir": d / "data",
                                                 "eval_only": True}),
     lambda d, R: (data_file("[", "test.json")(d, R), (d / "out").mkdir()), words="test.json")
case("data-dir-missing", lm(data_dir="/nonexistent/data"), words="/nonexistent/data")
case("data-dir-empty", lambda R, d: flags(**{**R["lm"], "out_dir": d / "out", "data_dir": d}), words=("train.json",))
for id, text, words in [("glue-missing-column", "index\tsentence1\n0\ta\n", "train.tsv:1"),
                        ("glue-bad-label", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n", "train.tsv:2"),
                        ("glue-short-row", "index\tsentence1\tsentence2\tlabel\n0\ta\n", "train.tsv:2")]:
    case(f"data-{id}", lambda R, d: flags(**{**R["cls"], "out_dir": d / "out", "data_dir": d / "glue"}),
         glue_file(text), words=words)
case("data-glue-dev-missing", lambda R, d: flags(**{**R["cls"], "out_dir": d / "out", "data_dir": d / "glue"}),
     lambda d, R: (glue_file("index\tsentence1\tsentence2\tlabel\n")(d, R), (d / "glue/RTE/dev.tsv").unlink()),
     words="dev.tsv")

# issue 19: out_dir, flags that gave nonsense, resume and eval consistency, damaged side files, odd models, data
# files too deep or too long
def tiny_meta(**params):  # a Meta checkpoint of the tiny preset (params.json overridden by params; NaN: one NaN)
    def setup(d, R):
        torch.manual_seed(0)
        m = M.Transformer(M.ModelArgs.from_name("tiny"))
        sd = m.state_dict()
        if params.pop("nan", False):
            sd["layers.0.attention.wq.weight"][3, 5] = float("nan")
        (d / "m").mkdir()
        (d / "m" / "params.json").write_text(json.dumps({**M.PRESETS["tiny"], **params}))
        torch.save(sd, d / "m" / "consolidated.00.pth")
    return setup


def tensor_edit(name, key, value=float("nan")):  # one element of a tensor in a safetensors file of out_dir set
    def then(out, R):
        sd = load_file(out / name)
        k = next(k for k in sd if key in k)
        sd[k].view(-1)[0] = value
        save_file(sd, out / name)
    return then


def nan_in_state(part):
    def f(st):
        t = next(iter(st["lora"].values())) if part == "lora" else \
            next(t for s in st["optimizer"]["state"].values() for k, t in s.items() if k == "exp_avg")
        t.view(-1)[0] = float("nan")
        return st
    return write("state.pt", f)


def flip_byte(name):  # the same size, one byte changed (in the tensor data, past the zip's header)
    def then(out, R):
        b = bytearray((out / name).read_bytes())
        b[len(b) // 2] ^= 0x40
        (out / name).write_bytes(bytes(b))
    return then


def no_manifest(then):
    return copy(then=lambda out, R: (unlink("checkpoint.json")(out, R), then(out, R)))


def own_data(name, text):  # --data_path=case_dir/<name> holding text
    def setup(d, R):
        (d / name).write_text(text)
    return setup


DEEP = "[" * 100_000 + "]" * 100_000
INIT_M = lambda **kw: lambda R, d: flags(**{**R["lm"], "out_dir": d / "out", "init_from": d / "m",  # noqa: E731
                                            "tokenizer": "bytes", **kw})
case("out-dir-empty", lambda R, d: flags(**{**R["lm"], "out_dir": ""}), words="--out_dir=")
case("out-dir-blank", lambda R, d: flags(**{**R["lm"], "out_dir": "  "}), words="--out_dir=")
case("init-from-empty", lm(init_from=""), words="--init_from=")
case("seed-over-torch", lm(seed=2 ** 70), words=("--seed=", "2**63"))
case("num-beams-unbounded", lm(num_beams=100000), words=("--num_beams=100000", "at most"))
case("zero-steps", lm(max_iters=0, epochs=0), words=("--max_iters=0", "--epochs=0"))
case("cutoff-len-1", lm(cutoff_len=1), words=("--cutoff_len=1", "2 tokens"))
case("resume-at-max-iters", lm(resume=True, max_iters=2), copy(), words=("iter 2", "--max_iters=2", "nothing left"))
case("resume-below-max-iters", lm(resume=True, max_iters=1), copy(), words=("iter 2", "--max_iters=1"))
case("resume-stop-iter-below", lm(resume=True, max_iters=4, stop_iter=1), copy(), words=("--stop_iter=1", "iter 2"))
case("resume-stop-iter-at", lm(resume=True, max_iters=4, stop_iter=2), copy(), words=("--stop_iter=2", "iter 2"))
case("state-negative-iter", lm(resume=True, max_iters=3), no_manifest(state_with(iter_num=-2)),
     words=("state.pt", "iter_num = -2"))
case("state-bool-iter", lm(resume=True, max_iters=3), no_manifest(state_with(iter_num=True)), words="iter_num")
case("state-nan-best-val", lm(resume=True, max_iters=3), no_manifest(state_with(best_val=float("nan"))),
     words="best_val")
case("state-nan-lora", lm(resume=True, max_iters=3), no_manifest(nan_in_state("lora")), words=("state.pt", "NaN"))
case("state-nan-moment", lm(resume=True, max_iters=3), no_manifest(nan_in_state("optimizer")),
     words=("state.pt", "exp_avg", "NaN"))
case("state-rng-damaged", lm(resume=True, max_iters=3), no_manifest(state_with(rng=[])),
     words=("state.pt", "generator"))
case("state-same-size-other-bytes", lm(resume=True, max_iters=3), copy(then=flip_byte("state.pt")),
     words=("state.pt", "sha256"))
case("eval-adapter-same-size-other-bytes", lm(eval_only=True), copy(then=flip_byte("adapter_model.safetensors")),
     words=("adapter_model.safetensors", "sha256"))
case("eval-adapter-nan", lm(eval_only=True), no_manifest(tensor_edit("adapter_model.safetensors", "lora_B")),
     words=("adapter_model.safetensors", "NaN"))
case("eval-adapter-inf", lm(eval_only=True), no_manifest(tensor_edit("adapter_model.safetensors", "lora_A",
                                                                     float("inf"))), words="adapter_model.safetensors")
case("eval-adapter-alpha-0", lm(eval_only=True), no_manifest(adapter_cfg(lora_alpha=0)),
     words=("adapter_config.json", "lora_alpha = 0"))
case("eval-adapter-alpha-nan", lm(eval_only=True), no_manifest(write("adapter_config.json", '{"r": 4, "lora_alpha": '
                                                                     'NaN}')), words="lora_alpha")
case("eval-adapter-no-r", lm(eval_only=True), no_manifest(lambda out, R: (out / "adapter_config.json").write_text(
    json.dumps({k: v for k, v in json.loads((out / "adapter_config.json").read_text()).items() if k != "r"}))),
     words=("adapter_config.json", "no r"))
case("eval-adapter-r-not-rank", lm(eval_only=True), no_manifest(adapter_cfg(r=8)),
     words=("adapter_config.json", "r = 8"))
case("eval-adapter-config-list", lm(eval_only=True), no_manifest(write("adapter_config.json", "[]")),
     words=("adapter_config.json", "not a JSON object"))
case("eval-adapter-dropout-2", lm(eval_only=True), no_manifest(adapter_cfg(lora_dropout=2)), words="lora_dropout")
case("glue-head-nan", cls(eval_only=True), copy("cls", lambda o, R: (unlink("checkpoint.json")(o, R), tensor_edit(
    "head.safetensors", "weight")(o, R))), words=("head.safetensors", "NaN"))
case("init-from-nan-weights", INIT_M(), tiny_meta(nan=True), words=("layers.0.attention.wq.weight", "NaN"))
case("init-from-huge-context", INIT_M(), tiny_meta(max_seq_len=2 ** 40), words=("params.json", "max_seq_len"))
case("init-from-negative-dim", INIT_M(), tiny_meta(dim=-64), words=("params.json", "dim = -64"))
case("init-from-heads-not-dividing", INIT_M(), tiny_meta(n_heads=5, n_kv_heads=5), words=("params.json", "n_heads = 5"))
case("init-from-zero-layers", INIT_M(), tiny_meta(n_layers=0), words=("params.json", "n_layers = 0"))
case("data-deep-json", lm(data_path="{case}/deep.json"), own_data("deep.json", DEEP), words=("deep.json", "record 0",
                                                                                             "nested"))
case("data-deep-jsonl", lm(data_path="{case}/deep.jsonl"), own_data("deep.jsonl", '{"instruction": "a", "output": "b"}'
                                                                    "\n" + DEEP), words=("deep.jsonl", "record 1"))
case("data-deep-train-set", lambda R, d: flags(**{**R["lm"], "out_dir": d / "out", "data_dir": d / "data"}),
     data_file('[{"instruction": "a", "input": "", "output": "b", "answer": "b"}, ' + DEEP + "]"),
     words=("train.json", "record 1", "nested"))
case("data-test-set-empty", lambda R, d: flags(**{**R["lm"], "out_dir": d / "out", "data_dir": d / "data"}),
     data_file("[]", "test.json"), words=("test.json", "no records"))
case("data-glue-field-too-long", lambda R, d: flags(**{**R["cls"], "out_dir": d / "out", "data_dir": d / "glue"}),
     glue_file("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\t" + "x" * 140_000 +
               "\tb\tentailment\n"), words=("train.tsv:3", "field"))
case("data-glue-not-utf8", lambda R, d: flags(**{**R["cls"], "out_dir": d / "out", "data_dir": d / "glue"}),
     lambda d, R: (glue_file("")(d, R), (d / "glue/RTE/train.tsv").write_bytes(
         b"index\tsentence1\tsentence2\tlabel\n0\t\xff\xfe\tb\tentailment\n")), words=("train.tsv:2", "UTF-8"))
case("data-glue-dev-empty", lambda R, d: flags(**{**R["cls"], "out_dir": d / "out", "data_dir": d / "glue"}),
     glue_file("index\tsentence1\tsentence2\tlabel\n", "dev"), words=("dev.tsv", "no records"))
GOOD = "".join(json.dumps(dict(text_a=f"the number {i}", text_b=f"plus {i}", label=i % 2)) + "\n" for i in range(16))
for id, line, words in [("no-label", {"text_a": "a", "text_b": "b"}, "train.jsonl:17"),
                        ("label-out-of-range", {"text_a": "a", "text_b": "b", "label": 7},
                         ("train.jsonl:17", "label 7")),
                        ("label-str", {"text_a": "a", "text_b": "b", "label": "0"}, "train.jsonl:17"),
                        ("text-b-missing", {"text_a": "a", "text_b": None, "label": 0}, "train.jsonl:17"),
                        ("text-not-str", {"text_a": 3, "text_b": "b", "label": 0}, "train.jsonl:17"),
                        ("not-json", "{", "train.jsonl:17"), ("deep", DEEP, "train.jsonl:17")]:
    # prepare.py's JSONL (data_dir/rte/train.jsonl, read instead of RTE/train.tsv): 16 good records, then a bad one
    case(f"data-glue-prepared-{id}", lambda R, d: flags(**{**R["cls"], "out_dir": d / "out", "data_dir": d / "glue"}),
         lambda d, R, line=line: (shutil.copytree(R["glue"], d / "glue"), (d / "glue" / "rte").mkdir(), (
             d / "glue" / "rte" / "train.jsonl").write_text(GOOD + (line if isinstance(line, str) else
                                                                    json.dumps(line)) + "\n")),
         words=words)

# divergence: exit 1, the last good checkpoint named (the run writes: its out_dir starts empty and is not compared)
case("diverges", lm(lr=1e30, warmup_steps=2, max_iters=4, eval_interval=1, method="lora"),
     words=("non-finite", "last good checkpoint"), code=1)


@pytest.mark.parametrize("argv, setup, words, code", CASES)
def test_bad_input(runs, tmp_path, capsys, monkeypatch, argv, setup, words, code):
    if setup:
        setup(tmp_path, runs)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # nothing may land in the current directory either
    args = [a.replace("{glue2}", str(tmp_path / "glue2")).replace("{case}", str(tmp_path))
            for a in argv(runs, tmp_path)]
    dirs = [tmp_path / "out", runs["root"] / "lm", runs["root"] / "cls"]
    before = [checksums(d) for d in dirs]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        T.main(args)
    err = capsys.readouterr().err
    assert e.value.code == code, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("train.py: "), err
    for w in words:
        assert w in err, (w, err)
    if code == 2:
        assert [checksums(d) for d in dirs] == before  # nothing written, nothing created
        assert not list((tmp_path / "cwd").iterdir())


def test_case_count():
    assert len(CASES) >= 120


# -----------------------------------------------------------------------------
# damaged side files are not errors (a cache, a lock, a log line); no number is made up


def test_damaged_side_files_do_not_stop_a_run(runs, tmp_path, capsys):
    """eval_base.json garbage (a cache: measured anew, or left out), a .lock that is not text (taken over), a
    log.jsonl whose first line is cut (the loss plot is skipped with one line; the finished run is not an error)."""
    out = tmp_path / "out"
    shutil.copytree(runs["root"] / "lm", out)
    (out / "eval_base.json").write_text("{")
    T.main(flags(**{**runs["lm"], "out_dir": out, "eval_only": True}))
    assert "finetuned" not in capsys.readouterr().out  # no base column without a base measurement
    (out / ".lock").write_bytes(b"\xff\xfe\x00 not a lock")
    T.main(flags(**{**runs["lm"], "out_dir": out, "resume": True, "max_iters": 3}))
    assert json.loads((out / "checkpoint.json").read_text())["iter"] == 3 and not (out / ".lock").exists()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "log.jsonl").write_text('{"iter": 1, "lo\n')
    T.main(flags(**{**runs["lm"], "out_dir": fresh, "eval_base": False}))
    printed = capsys.readouterr().out
    assert "done:" in printed and (plot_missing() or "loss plot: not drawn" in printed), printed


def plot_missing():
    import plot
    return plot._pyplot() is None


def test_no_validation_set_no_fake_loss(runs, tmp_path, capsys):
    """val_set_size=0: no validation loss is reported (it was 0.0000), none is logged, best_val stays unknown."""
    out = tmp_path / "out"
    T.main(flags(**{**runs["lm"], "out_dir": out, "val_set_size": 0, "eval_interval": 1, "eval_base": False}))
    assert "val loss" not in capsys.readouterr().out
    assert not any("val_loss" in json.loads(line) for line in (out / "log.jsonl").read_text().splitlines())
    assert torch.load(out / "state.pt", weights_only=True)["best_val"] == float("inf")


def test_no_accuracy_from_non_finite_weights(runs):
    """evaluate() refuses a model with a NaN weight (whatever let it through), naming the tensor."""
    from evaluate import evaluate
    from tokenizer import load_tokenizer
    m = M.Transformer(M.ModelArgs.from_name("tiny"))
    with torch.no_grad():
        m.layers[1].feed_forward.w2.weight[0, 0] = float("nan")
    cfg = T.parse_config(flags(**{**runs["lm"], "out_dir": runs["root"] / "x"}))
    with pytest.raises(ValueError, match="layers.1.feed_forward.w2.weight holds NaN or inf"):
        evaluate(m, load_tokenizer("bytes"), cfg, runs["data"], None)
