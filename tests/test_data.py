"""
Tests for data/glue/prepare.py and data/commonsense/prepare.py: readers on the real files in ../shared
(skipped when absent), synthetic TSVs for the GLUE tasks not shipped here, metrics against hand-worked
values, the authors' prompt templates pinned byte for byte, answer extraction, and the two CLIs.
"""
import json
import math
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest

from data.commonsense import prepare as cs
from data.glue import prepare as glue
from data.glue.prepare import TASKS, glue_metrics, read_glue
from helpers import ROOT

SHARED = ROOT.parent / "shared"
GLUE, CS = SHARED / "data" / "glue", SHARED / "data" / "commonsense"

need_glue = pytest.mark.skipif(not (GLUE / "CoLA" / "train.tsv").is_file(), reason="no ../shared GLUE data")
need_cs = pytest.mark.skipif(not (CS / "dataset" / "boolq" / "test.json").is_file(), reason="no ../shared data")


def run_cli(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT)


# -----------------------------------------------------------------------------
# GLUE on the real files: official row counts and label balance (numbers from SOURCES.md / GLUE paper)

OFFICIAL = [  # task, split, rows, count of label 1 (stsb: mean score)
    ("cola", "train", 8551, 6023), ("cola", "dev", 1043, 721),
    ("sst2", "train", 67349, 37569), ("sst2", "dev", 872, 444),
    ("mrpc", "train", 3668, 2474), ("mrpc", "dev", 408, 279),
    ("stsb", "train", 5749, 2.701), ("stsb", "dev", 1500, 2.364),
    ("rte", "train", 2490, 1241), ("rte", "dev", 277, 131),  # label 1 = not_entailment
]


@need_glue
@pytest.mark.parametrize("task,split,rows,ones", OFFICIAL)
def test_glue_official_counts(task, split, rows, ones):
    recs = read_glue(task, split, GLUE)
    assert len(recs) == rows
    labels = [r["label"] for r in recs]
    if task == "stsb":
        assert all(isinstance(x, float) and 0.0 <= x <= 5.0 for x in labels)
        assert abs(np.mean(labels) - ones) < 5e-4
    else:
        assert all(type(x) is int for x in labels) and sum(labels) == ones and set(labels) == {0, 1}
    pair = task != "cola" and task != "sst2"
    assert all(isinstance(r["text_a"], str) and r["text_a"] for r in recs)
    assert all((isinstance(r["text_b"], str) and r["text_b"]) if pair else r["text_b"] is None for r in recs)
    assert not any("\ufeff" in r["text_a"] or "\ufeff" in (r["text_b"] or "") for r in recs)


@need_glue
def test_mrpc_bom_and_quotes():
    first = read_glue("mrpc", "train", GLUE)[0]
    assert first == {"text_a": 'Amrozi accused his brother , whom he called " the witness " , of deliberately '
                               'distorting his evidence .',
                     "text_b": 'Referring to him as only " the witness " , Amrozi accused his brother of '
                               'deliberately distorting his evidence .', "label": 1}
    # a text starting with a quote: csv's default quoting would swallow it
    assert read_glue("mrpc", "dev", GLUE)[0]["text_b"] == \
        '" The foodservice pie business does not fit our long-term growth strategy .'


@need_glue
@pytest.mark.parametrize("task", ["mrpc", "rte"])
def test_quotes_preserved(task):
    # every '"' of the file (none in headers, ids or labels) must survive inside the texts
    for split in ("train", "dev"):
        raw = (GLUE / TASKS[task]["dir"] / f"{split}.tsv").read_text(encoding="utf-8")
        recs = read_glue(task, split, GLUE)
        assert sum(r["text_a"].count('"') + r["text_b"].count('"') for r in recs) == raw.count('"') > 100


@need_glue
def test_cola_no_header_and_no_final_newline():
    tr = read_glue("cola", "train", GLUE)
    assert tr[0] == {"text_a": "Our friends won't buy this analysis, let alone the next one we propose.",
                     "text_b": None, "label": 1}
    dev = GLUE / "CoLA" / "dev.tsv"
    assert not dev.read_bytes().endswith(b"\n")  # the quirk is really there
    assert read_glue("cola", "dev", GLUE)[-1] == {"text_a": "John talked to Bill about himself.",
                                                  "text_b": None, "label": 1}


# -----------------------------------------------------------------------------
# GLUE layouts not shipped here (QQP, MNLI, QNLI): tiny synthetic files in the official column layouts

MNLI_TRAIN_HEAD = ("index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse "
                   "sentence2_parse sentence1 sentence2 label1 gold_label").split()
MNLI_DEV_HEAD = MNLI_TRAIN_HEAD[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]


def write_tsv(path, rows, bom=False, final_newline=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join("\t".join(r) for r in rows) + ("\n" if final_newline else "")
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")


def test_synthetic_qqp_mnli_qnli(tmp_path):
    write_tsv(tmp_path / "QQP" / "train.tsv", [
        "id qid1 qid2 question1 question2 is_duplicate".split(),
        ["0", "1", "2", 'What is "AI"?', "What's AI?", "1"],
        ["1", "3", "4", "How do I cook rice", "broken row with missing fields"],  # real QQP has such rows
        ["2", "5", "6", "Why?", "Why not?", "0"]])
    recs, skipped = glue._read("qqp", "train", tmp_path)
    assert skipped == 1 and recs == [{"text_a": 'What is "AI"?', "text_b": "What's AI?", "label": 1},
                                     {"text_a": "Why?", "text_b": "Why not?", "label": 0}]
    fill = ["(x)"] * 4
    write_tsv(tmp_path / "MNLI" / "train.tsv", [
        MNLI_TRAIN_HEAD,
        ["0", "1", "1e", "fiction", *fill, 'He said "hi".', "He spoke.", "entailment", "entailment"],
        ["1", "2", "2c", "slate", *fill, "A cat.", "A dog.", "neutral", "contradiction"]], final_newline=False)
    write_tsv(tmp_path / "MNLI" / "dev_matched.tsv", [
        MNLI_DEV_HEAD, ["0", "1", "1n", "travel", *fill, "P", "H", "neutral", "neutral", "contradiction",
                        "neutral", "neutral", "neutral"]])
    # gold_label is looked up by name: label1 differs from gold_label in row 2, layouts differ per split
    assert [r["label"] for r in read_glue("mnli", "train", tmp_path)] == [0, 2]
    assert read_glue("mnli", "train", tmp_path)[0]["text_a"] == 'He said "hi".'
    assert read_glue("mnli", "dev_matched", tmp_path) == [{"text_a": "P", "text_b": "H", "label": 1}]
    assert TASKS["mnli"]["label_names"][2] == "contradiction" and TASKS["mnli"]["num_labels"] == 3
    with pytest.raises(FileNotFoundError, match="dev_mismatched.tsv"):
        read_glue("mnli", "dev_mismatched", tmp_path)
    write_tsv(tmp_path / "QNLI" / "dev.tsv", [
        ["index", "question", "sentence", "label"],
        ["0", "Who?", "Me.", "not_entailment"], ["1", "What?", "That.", "entailment"]], bom=True)
    assert read_glue("qnli", "dev", tmp_path) == [{"text_a": "Who?", "text_b": "Me.", "label": 1},
                                                  {"text_a": "What?", "text_b": "That.", "label": 0}]


def test_glue_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        read_glue("qqp", "train", tmp_path)
    assert str(tmp_path / "QQP" / "train.tsv") in str(e.value)
    with pytest.raises(ValueError, match="unknown GLUE task"):
        read_glue("wnli", "train", tmp_path)
    with pytest.raises(ValueError, match="unknown split"):
        read_glue("rte", "test", tmp_path)
    head = ["index", "sentence1", "sentence2", "label"]
    write_tsv(tmp_path / "RTE" / "train.tsv", [head, ["0", "a", "b", "entailment"], ["1", "a", "b", "maybe"]])
    with pytest.raises(ValueError, match=r"train\.tsv:3: bad label 'maybe'"):
        read_glue("rte", "train", tmp_path)
    write_tsv(tmp_path / "RTE" / "dev.tsv", [head, ["0", "a", "b"]])  # missing field: only QQP skips
    with pytest.raises(ValueError, match=r"dev\.tsv:2: 3 fields"):
        read_glue("rte", "dev", tmp_path)
    write_tsv(tmp_path / "STS-B" / "dev.tsv", [["sentence1", "sentence2", "score"], ["a", "b", "7.5"]])
    with pytest.raises(ValueError, match=r"dev\.tsv:2: bad label '7.5'"):
        read_glue("stsb", "dev", tmp_path)
    write_tsv(tmp_path / "SST-2" / "dev.tsv", [["text", "label"], ["a", "1"]])
    with pytest.raises(ValueError, match="header lacks"):
        read_glue("sst2", "dev", tmp_path)


# -----------------------------------------------------------------------------
# metrics, against values worked out by hand from the definitions

def test_metrics_binary_by_hand():
    labels = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    preds = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]  # tp 3, fn 1, fp 2, tn 4
    mcc = (3 * 4 - 2 * 1) / math.sqrt((3 + 2) * (3 + 1) * (4 + 2) * (4 + 1))  # = 10 / sqrt(600)
    assert glue_metrics("cola", preds, labels)["mcc"] == pytest.approx(mcc, abs=1e-12)
    m = glue_metrics("mrpc", preds, labels)
    assert m["accuracy"] == pytest.approx(0.7) and m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert m["score"] == pytest.approx((0.7 + 2 / 3) / 2)
    # logits are argmaxed; swapping the classes flips the sign of MCC
    logits = np.stack([1 - np.array(preds), np.array(preds)], 1).astype(float)
    assert glue_metrics("qqp", logits, labels)["f1"] == pytest.approx(2 / 3)
    assert glue_metrics("cola", [1 - p for p in preds], labels)["mcc"] == pytest.approx(-mcc)
    assert glue_metrics("cola", [1] * 10, labels)["mcc"] == 0.0  # constant predictor: 0 by convention
    assert glue_metrics("mrpc", [0] * 10, [0] * 10)["f1"] == 0.0
    assert glue_metrics("mnli", [0, 1, 2, 2], [0, 1, 1, 2]) == {"accuracy": 0.75, "score": 0.75}
    with pytest.raises(ValueError, match="3 predictions for 4 labels"):
        glue_metrics("rte", [0, 1, 0], [0, 1, 0, 1])


def test_metrics_correlations_by_hand():
    # Pearson: x = [1,2,3], y = [1,2,4]: Σdxdy = 3, Σdx² = 2, Σdy² = 42/9 -> r = 9 / sqrt(84)
    assert glue_metrics("stsb", [1, 2, 3], [1, 2, 4])["pearson"] == pytest.approx(9 / math.sqrt(84), abs=1e-12)
    # Spearman with a tie: ranks of [1,2,2,3] are [1,2.5,2.5,4], of [1,3,2,4] are [1,3,2,4]
    # -> Σdxdy = 4.5, Σdx² = 4.5, Σdy² = 5 -> rho = 4.5 / sqrt(22.5) = sqrt(0.9)
    m = glue_metrics("stsb", [1.0, 2.0, 2.0, 3.0], [1.0, 3.0, 2.0, 4.0])
    assert m["spearman"] == pytest.approx(math.sqrt(0.9), abs=1e-12)
    # (N, 1) regression output is accepted; Spearman is invariant to a monotone map, Pearson is not
    x, y = np.array([0.3, 1.2, 0.5, 4.0, 2.2]), np.array([0.0, 1.0, 1.5, 5.0, 2.0])
    a, b = glue_metrics("stsb", x[:, None], y), glue_metrics("stsb", np.exp(x), y)
    assert a["spearman"] == pytest.approx(b["spearman"]) == pytest.approx(0.9)  # ranks [1,3,2,5,4] vs [1,2,3,5,4]
    assert a["pearson"] != pytest.approx(b["pearson"])


# -----------------------------------------------------------------------------
# GLUE CLI

@need_glue
def test_glue_cli_writes_jsonl(tmp_path):
    r = run_cli("data/glue/prepare.py", "--src", str(GLUE), "--tasks", "rte,mrpc", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "rte/train.jsonl: 2490 rows, labels entailment 1249" in r.stdout
    lines = (tmp_path / "mrpc" / "dev.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == read_glue("mrpc", "dev", GLUE)
    assert sorted(p.name for p in (tmp_path / "rte").iterdir()) == ["dev.jsonl", "train.jsonl"]  # no temp left


def test_glue_cli_qqp_skips(tmp_path):
    write_tsv(tmp_path / "src" / "QQP" / "dev.tsv", [
        "id qid1 qid2 question1 question2 is_duplicate".split(), ["0", "1", "2", "a", "b", "1"], ["1", "3"]])
    write_tsv(tmp_path / "src" / "QQP" / "train.tsv", [
        "id qid1 qid2 question1 question2 is_duplicate".split(), ["0", "1", "2", "a", "b", "0"]])
    r = run_cli("data/glue/prepare.py", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "qqp/dev.jsonl: 1 rows" in r.stdout and "skipped 1 rows" in r.stdout
    assert "not in" in r.stdout and "mnli" in r.stdout  # absent tasks are listed when no --tasks is given


@pytest.mark.parametrize("args,needle", [
    (["--bogus"], "unrecognized arguments"),
    (["--tasks", "cola,foo"], "foo"),
    (["--src", "/nonexistent/glue"], "/nonexistent/glue"),
])
def test_glue_cli_bad_flags(args, needle):
    r = run_cli("data/glue/prepare.py", *args)
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_glue_cli_missing_task_file(tmp_path):
    (tmp_path / "QNLI").mkdir()
    r = run_cli("data/glue/prepare.py", "--src", str(tmp_path), "--tasks", "qnli", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and str(tmp_path / "QNLI" / "train.tsv") in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


# -----------------------------------------------------------------------------
# commonsense: templates pinned byte for byte (RefLoRA commonsense_reasoning/finetune.py, evaluate.py)

REC = {"instruction": "Please answer the following question with true or false, question: is it?\n\n"
                      "Answer format: true/false",
       "input": "", "output": "the correct answer is true", "answer": "true"}
I16 = " " * 16  # the templates' 16-space indent, spelled out

TRAIN_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.  \n"  # two trailing spaces
    "\n"
    "                ### Instruction:\n"
    "                Please answer the following question with true or false, question: is it?\n"
    "\n"
    "Answer format: true/false\n"
    "                \n"  # blank line holding 16 spaces
    "                ### Response:\n"
    "                the correct answer is true")
TRAIN_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n"  # one trailing space
    "\n"
    "                ### Instruction:\n"
    "                Please answer the following question with true or false, question: is it?\n"
    "\n"
    "Answer format: true/false\n"
    "                \n"
    "                ### Input:\n"
    "                some context\n"
    "                \n"
    "                ### Response:\n"
    "                the correct answer is true")
EVAL_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request. \n"  # one trailing space
    "\n"
    "                ### Instruction:\n"
    "                Please answer the following question with true or false, question: is it?\n"
    "\n"
    "Answer format: true/false\n"
    "\n"  # empty blank line
    "                ### Response:\n"
    "                ")  # ends with the 16-space indent
EVAL_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n"  # no trailing space
    "\n"
    "                ### Instruction:\n"
    "                Please answer the following question with true or false, question: is it?\n"
    "\n"
    "Answer format: true/false\n"
    "\n"
    "                ### Input:\n"
    "                some context\n"
    "\n"
    "                ### Response:\n"
    "                ")


def test_templates_pinned():
    assert cs.train_prompt(REC) == TRAIN_NO_INPUT
    assert cs.train_prompt({**REC, "input": "some context"}) == TRAIN_INPUT
    assert cs.eval_prompt(REC["instruction"]) == EVAL_NO_INPUT
    assert cs.eval_prompt(REC["instruction"], "some context") == EVAL_INPUT
    assert I16 + "### Response:\n" + I16 in EVAL_NO_INPUT  # the spelled-out literals have the indent
    # the authors' quirk: the training prefix (output "") is not the evaluation prompt
    user = cs.train_prompt({**REC, "output": ""})
    assert user != cs.eval_prompt(REC["instruction"]) and user.endswith("### Response:\n" + I16)
    assert user.replace("request.  ", "request. ").replace("\n" + I16 + "\n", "\n\n") == EVAL_NO_INPUT


def test_extract_answer():
    assert cs.DATASETS == ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande",
                           "ARC-Challenge", "ARC-Easy", "openbookqa"]
    assert cs.ANSWER_PATTERNS["winogrande"] == r"option1|option2"
    assert cs.ANSWER_PATTERNS["ARC-Easy"] == r"answer1|answer2|answer3|answer4|answer5"
    cases = [
        ("boolq", "the correct answer is true", "true"),
        ("boolq", "  the correct answer is false, not true", "false"),  # first match wins
        ("boolq", "True", ""),  # case-sensitive
        ("boolq", "untrue", "true"),  # plain substring search, as in evaluate.py
        ("piqa", "the correct answer is solution2", "solution2"),
        ("social_i_qa", "the correct answer is answer3", "answer3"),
        ("openbookqa", "answer12", "answer1"),
        ("ARC-Challenge", "the correct answer is answer5.", "answer5"),
        ("ARC-Easy", "I don't know", ""),
        ("hellaswag", "ending4", "ending4"),
        ("hellaswag", "ending5", ""),
        ("winogrande", "option2 option1", "option2"),
    ]
    for name, text, want in cases:
        assert cs.extract_answer(name, text) == want, (name, text)
    assert cs.split_response(EVAL_NO_INPUT + "the correct answer is true") == "the correct answer is true"
    assert cs.split_response("x ### Response: a ### Response:  b ") == "b"  # the last one (RefLoRA's [-1])


# -----------------------------------------------------------------------------
# commonsense prepare / loaders

@need_cs
def test_commonsense_prepare_from_src(tmp_path, capsys):
    cs.main(["--src", str(CS), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "union of 4 train sets: boolq, ARC-Challenge, ARC-Easy, openbookqa (17,754 records)" in out
    for src in (CS / "dataset").glob("*/*.json"):
        assert (tmp_path / src.relative_to(CS)).read_bytes() == src.read_bytes()
    records, desc = cs.load_train(tmp_path)
    assert len(records) == 9427 + 1119 + 2251 + 4957 and desc.startswith("union of 4")
    sizes = {"boolq": 3270, "piqa": 1838, "social_i_qa": 1954, "winogrande": 1267,
             "ARC-Easy": 2376, "ARC-Challenge": 1172, "openbookqa": 500}
    for name, n in sizes.items():
        test = cs.load_test(tmp_path, name)
        assert len(test) == n and all(r["output"] == "the correct answer is " + r["answer"] for r in test)
        assert all(cs.extract_answer(name, r["output"]) == r["answer"] for r in test)
    with pytest.raises(FileNotFoundError, match="hellaswag"):
        cs.load_test(tmp_path, "hellaswag")


def test_load_train_prefers_170k(tmp_path):
    rec = dict(REC)
    (tmp_path / "dataset" / "boolq").mkdir(parents=True)
    (tmp_path / "dataset" / "boolq" / "train.json").write_text(json.dumps([rec]))
    (tmp_path / "commonsense_170k.json").write_text(json.dumps([rec, rec]))
    records, desc = cs.load_train(tmp_path)
    assert len(records) == 2 and desc == "commonsense_170k.json (2 records)"
    with pytest.raises(FileNotFoundError, match="no commonsense_170k.json"):
        cs.load_train(tmp_path / "empty")


@pytest.mark.parametrize("bad,needle", [
    ({"instruction": "q", "input": "", "output": "o"}, "record 2: key 'answer' missing"),
    ({**REC, "answer": 1}, "record 2: key 'answer' not a string"),
])
def test_commonsense_bad_record(tmp_path, capsys, bad, needle):
    src = tmp_path / "src" / "dataset" / "boolq" / "test.json"
    src.parent.mkdir(parents=True)
    src.write_text(json.dumps([REC, REC, bad]))
    with pytest.raises(SystemExit) as e:
        cs.main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and str(src) in err and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "dataset" / "boolq" / "test.json").exists()  # nothing half-written


def test_commonsense_offline_and_bad_flags(tmp_path, capsys, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit) as e:
        cs.main(["--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "cannot download https://raw.githubusercontent.com/AGI-Edgerunners/" in err
    assert len(err.strip().splitlines()) == 1 and not list(tmp_path.rglob("*.json*"))
    r = run_cli("data/commonsense/prepare.py", "--bogus")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("data/commonsense/prepare.py", "--src", str(tmp_path / "nope"), "--out", str(tmp_path))
    assert r.returncode == 2 and "nope" in r.stderr
