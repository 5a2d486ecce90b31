"""Bad input to the other commands (issue 19), table-driven like test_errors.py: sample.py, plot.py, bench.py's
arguments and data/*/prepare.py. Each case runs the command's main(argv) in-process and must end with exit 2 and
exactly one line on stderr, `<prog>: error: ...`, naming the flag, file or record, and no traceback; a case that
writes checks that nothing half-written is left."""
import json
import math

import pytest
import torch

import bench
import converge
import experiments
import model as M
import plot
import sample as S
import weights as W
from data.commonsense import prepare as cs
from data.glue import prepare as glue
from helpers import write_hf

# -----------------------------------------------------------------------------
# the table: (id, prog, main, argv(case_dir), setup(case_dir) or None, words stderr must contain)

CASES = []


def case(id, prog, main, argv, setup=None, words=(), need=None):
    marks = [pytest.mark.skipif(need(), reason="needs what this machine lacks")] if need else []
    CASES.append(pytest.param(prog, main, argv, setup, (words,) if isinstance(words, str) else words, id=id,
                              marks=marks))


def write(name, data):  # case_dir/<name> holding text or bytes (parents created)
    def setup(d):
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data) if isinstance(data, bytes) else (d / name).write_text(data)
    return setup


def tiny_hf(d):  # a Hugging Face checkpoint folder of a small random model (vocab 512: the bytes tokenizer fits)
    torch.manual_seed(0)
    write_hf(d / "hf", M.Transformer(M.ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=512,
                                                 multiple_of=16, max_seq_len=64)))


def tiny_adapter(**cfg):  # case_dir/out: a PEFT adapter of the tiny preset, adapter_config.json edited by cfg
    def setup(d):
        m = M.Transformer(M.ModelArgs.from_name("tiny"))
        M.add_lora(m, 4, 8, 0.0, ("wq", "wv"))
        W.save_adapter(m, d / "out")
        c = json.loads((d / "out" / "adapter_config.json").read_text())
        (d / "out" / "adapter_config.json").write_text(json.dumps({**c, **cfg}))
    return setup


# sample.py: flags, the prompt against the model's context, files it reads
def sm(*a):
    return lambda d: ["--init_from=tiny", *[x.replace("{d}", str(d)) for x in a]]


case("sample-prompt-past-context", "sample.py", S.main, sm("--prompt=" + "x" * 300), words=("--prompt", "max_seq_len"))
case("sample-new-tokens-past-context", "sample.py", S.main, sm("--max_new_tokens=300"),
     words=("--max_new_tokens=300", "max_seq_len 256"))
case("sample-prompt-file-not-utf8", "sample.py", S.main, sm("--prompt=FILE:{d}/p.txt"), write("p.txt", b"\xff\xfeq"),
     words=("p.txt", "not UTF-8"))
for v in ("nan", "inf", "-inf"):
    case(f"sample-temperature-{v}", "sample.py", S.main, sm(f"--temperature={v}"), words="--temperature")
case("sample-top-k-negative", "sample.py", S.main, sm("--top_k=-5"), words="--top_k=-5")
case("sample-device-unknown", "sample.py", S.main, sm("--device=tpu"), words="--device=tpu")
case("sample-device-no-cuda", "sample.py", S.main, sm("--device=cuda"), words="--device=cuda",
     need=torch.cuda.is_available)
case("sample-seed-over-torch", "sample.py", S.main, sm(f"--seed={2 ** 70}"), words="--seed=")
case("sample-beams-unbounded", "sample.py", S.main, sm("--num_beams=100000"), words=("--num_beams=100000", "at most"))
case("sample-tokenizer-config-damaged", "sample.py", S.main,
     lambda d: [f"--init_from={d / 'hf'}", "--tokenizer=bytes", "--max_new_tokens=2"],
     lambda d: (tiny_hf(d), (d / "hf" / "tokenizer_config.json").write_text("{")), words="tokenizer_config.json")
case("sample-adapter-alpha-0", "sample.py", S.main, sm("--out_dir={d}/out", "--max_new_tokens=2"),
     tiny_adapter(lora_alpha=0), words=("adapter_config.json", "lora_alpha = 0"))
case("sample-adapter-no-r", "sample.py", S.main, sm("--out_dir={d}/out", "--max_new_tokens=2"),
     lambda d: (tiny_adapter()(d), (d / "out" / "adapter_config.json").write_text('{"lora_alpha": 8}')),
     words=("adapter_config.json", "no r"))


# plot.py: damaged logs and configs, --out that cannot be written
def run_dir(log='{"iter": 1, "loss": 1.0}\n', **files):
    def setup(d):
        write("run/log.jsonl", log)(d)
        for name, text in files.items():
            write(f"run/{name.replace('_', '.')}", text)(d)
    return setup


def pl(*a):
    return lambda d: [str(d / "run"), f"--out={d / 'x.png'}", *[x.replace("{d}", str(d)) for x in a]]


def no_matplotlib():
    return plot._pyplot() is None


case("plot-loss-not-a-number", "plot.py", plot.main, pl(), run_dir('{"iter": 1, "loss": "x"}\n'),
     words="log.jsonl:1")
case("plot-iter-overflow", "plot.py", plot.main, pl(), run_dir('{"iter": 1e400, "loss": 1}\n'), words="log.jsonl:1")
case("plot-val-loss-not-a-number", "plot.py", plot.main, pl(),
     run_dir('{"iter": 1, "loss": 1}\n{"iter": 1, "val_loss": "y"}\n'), words="log.jsonl:2")
case("plot-log-too-deep", "plot.py", plot.main, pl(), run_dir("[" * 100_000 + "]" * 100_000 + "\n"),
     words="log.jsonl:1")
case("plot-config-json-damaged", "plot.py", plot.main, pl(), run_dir(config_json="{"), words="config.json")
case("plot-state-pt-damaged", "plot.py", plot.main, pl(), run_dir(state_pt=b"junk"), words="state.pt")
case("plot-out-in-missing-dir", "plot.py", plot.main, pl("--out={d}/nope/x.png"), run_dir(), words="--out=")
case("plot-out-is-a-dir", "plot.py", plot.main, pl("--out={d}"), run_dir(), words="--out=")
case("plot-no-step-in-common", "plot.py", plot.main, lambda d: [str(d / "run"), str(d / "b"), f"--out={d / 'x.png'}"],
     lambda d: (run_dir(config_json='{"method": "lora"}')(d), write("b/log.jsonl", '{"iter": 2, "loss": 1.0}\n')(d),
                write("b/config.json", '{"method": "lora"}')(d)), words="no logged step in common",
     need=no_matplotlib)


# bench.py: its arguments, before anything is measured
def bn(*a):
    return lambda d: [x.replace("{d}", str(d)) for x in a]


for flag in ("--batch_size=0", "--batch_size=-3", "--seq_len=1", "--seq_len=-1", "--rank=0", "--pairs=0", "--beams=0",
             "--new_tokens=0", "--warmup=-1", "--iters=0", "--iters=-5"):
    case(f"bench-{flag[2:]}", "bench.py", bench.main, bn(flag), words=flag)
for flag, words in [("--beams=1000", "at most"), ("--budget=nan", "--budget"), ("--budget=0", "--budget"),
                    ("--device=tpu", "--device=tpu"), ("--json={d}/nope/r.json", "--json="), ("--png=x.png", "--png"),
                    ("--bogus", "--bogus"), ("--model=llama-99b", "--model"), ("--rank=x", "--rank"),
                    ("--seq_len=9000", "max_seq_len"), ("--only=step_check,trian", "--only=trian")]:
    case(f"bench-{flag[2:].replace('{d}', 'D')}", "bench.py", bench.main, bn(flag), words=words)
case("bench-device-no-cuda", "bench.py", bench.main, bn("--device=cuda"), words="--device=cuda",
     need=torch.cuda.is_available)


# data/*/prepare.py: flags, and files too long, too deep or not UTF-8
def gl(*a):
    return lambda d: ["--src", str(d / "src"), "--out", str(d / "out"), *[x.replace("{d}", str(d)) for x in a]]


RTE = "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n"
RTE_DIR = lambda d: (write("src/RTE/train.tsv", RTE)(d), write("src/RTE/dev.tsv", RTE)(d))  # noqa: E731
case("glue-out-empty", "prepare.py", glue.main, lambda d: ["--src", str(d / "src"), "--out", ""], RTE_DIR,
     words="--out")
case("glue-out-is-a-file", "prepare.py", glue.main, lambda d: ["--src", str(d / "src"), "--out", str(d / "f")],
     lambda d: (RTE_DIR(d), write("f", "x")(d)), words="--out")
case("glue-out-under-a-file", "prepare.py", glue.main, lambda d: ["--src", str(d / "src"), "--out", str(d / "f/o"),
                                                                  "--tasks", "rte"],
     lambda d: (write("src/RTE/train.tsv", RTE)(d), write("src/RTE/dev.tsv", RTE)(d), write("f", "x")(d)),
     words=("train.jsonl", "cannot write"))
case("glue-field-too-long", "prepare.py", glue.main, gl("--tasks", "rte"),
     lambda d: (write("src/RTE/train.tsv", RTE + "1\t" + "x" * 140_000 + "\tb\tentailment\n")(d),
                write("src/RTE/dev.tsv", RTE)(d)), words=("train.tsv:3", "field"))
case("glue-not-utf8", "prepare.py", glue.main, gl("--tasks", "rte"),
     lambda d: (write("src/RTE/train.tsv", RTE.encode() + b"1\t\xff\tb\tentailment\n")(d),
                write("src/RTE/dev.tsv", RTE)(d)), words=("train.tsv:3", "UTF-8"))
DEEP = "[" * 100_000 + "]" * 100_000
REC = {"instruction": "q", "input": "", "output": "o", "answer": "o"}
case("commonsense-too-deep", "prepare.py", cs.main, gl(), write("src/dataset/boolq/test.json",
                                                                 f"[{json.dumps(REC)}, {DEEP}]"),
     words=("test.json", "record 1", "nested"))
case("commonsense-out-empty", "prepare.py", cs.main, lambda d: ["--src", str(d / "src"), "--out", ""],
     write("src/dataset/boolq/test.json", json.dumps([REC])), words="--out")
case("commonsense-src-empty", "prepare.py", cs.main, lambda d: ["--src", "", "--out", str(d / "out")], words="--src")


# converge.py: its own options, and train.py's checks of the flags every run gets, before any run starts
def cv(*a):
    return lambda d: [f"--out={d / 'out'}", *[x.replace("{d}", str(d)) for x in a]]


for flag, words in [("--methods=dora", ("--methods", "dora")), ("--glue_task=wnli", "--glue_task=wnli"),
                    (f"--seeds={2 ** 70}", "--seeds"), ("--seeds=0,0", ("--seeds=0,0", "twice")),
                    ("--methods=lora,lora", "twice"), ("--bogus=1", "bogus"), ("--lr=nan", "--lr=nan"),
                    ("--lora_r=0", "--lora_r=0"), ("--base=lion", "--base=lion")]:
    case(f"converge-{flag[2:]}", "converge.py", converge.main, cv(flag), words=words)
case("converge-out-empty", "converge.py", converge.main, lambda d: ["--out="], words=("--out=", "empty"))
case("converge-out-is-file", "converge.py", converge.main, lambda d: [f"--out={d / 'f'}"], write("f", "x"),
     words="a file")


def finished_run(d):  # out/lora-s0 as a finished 2-step CoLA run leaves it, but its eval_cola.json cut short
    run = d / "out" / "lora-s0"
    run.mkdir(parents=True)
    recs = [dict(iter=1, loss=0.7, lr=1e-3), dict(iter=2, loss=0.6, lr=1e-3), dict(iter=2, val_loss=0.6, mcc=0.1)]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (run / "eval_cola.json").write_text("{")


case("converge-eval-json-damaged", "converge.py", converge.main,
     cv("--methods=lora", "--seeds=0", "--max_iters=2"), finished_run, words="eval_cola.json")

# experiments.py
for flag, words in [("--toy_sweep --out=", ("--out=", "empty")), ("--toy --json={d}/nope/t.json", "--json="),
                    ("--toy --png={d}", "--png="), ("--toy_sweep --seeds=a", "--seeds")]:
    case(f"experiments-{flag[2:].replace(' ', '-').replace('{d}', 'D')}", "experiments.py", experiments.main,
         lambda d, f=flag: [x.replace("{d}", str(d)) for x in f.split()], words=words)


@pytest.mark.parametrize("prog, main, argv, setup, words", CASES)
def test_bad_input(tmp_path, capsys, monkeypatch, prog, main, argv, setup, words):
    if setup:
        setup(tmp_path)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # nothing may land in the current directory either
    capsys.readouterr()
    try:
        code = main(argv(tmp_path))
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"{prog}: error: "), err
    for w in words:
        assert w in err, (w, err)
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]  # nothing half-written
    assert not list((tmp_path / "cwd").iterdir())


def test_case_count():
    assert len(CASES) >= 50


def test_adam_step_json(tmp_path, capsys):
    """--adam_step --json=PATH writes its rows (a list, not a dict: it crashed in bench.py, where it was)."""
    assert experiments.main(["--adam_step", f"--json={tmp_path / 'r.json'}"]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert len(res["rows"]) == 3 and all(math.isfinite(r["lora"]) for r in res["rows"]) and res["torch"]
    assert not list(tmp_path.glob("*.tmp"))
