"""
Commonsense-reasoning data (LLM-Adapters format) and the prompt/answer conventions the paper's code uses.

Data: AGI-Edgerunners/LLM-Adapters (Hu et al. 2023): ft-training_set/commonsense_170k.json and
dataset/<name>/test.json, each a JSON list of {"instruction", "input", "output", "answer"}.
Prompts and answer extraction: zhangyilang/RefLoRA commonsense_reasoning/finetune.py and evaluate.py
(`generate_prompt`, `extract_answer`), which come from LLM-Adapters' finetune.py / commonsense_evaluate.py.
The training and evaluation templates differ in whitespace; both are kept byte for byte.

    python data/commonsense/prepare.py                # download from GitHub (needs internet)
    python data/commonsense/prepare.py --src ../shared/data/commonsense [--out data/commonsense]
"""
import argparse
import json
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent  # default output: data/commonsense/
REF = "816657208af4db747803f87ba40a4c71383fed7a"  # LLM-Adapters commit the shared copy was taken from
RAW = f"https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/{REF}/"
TRAIN_170K = "commonsense_170k.json"  # upstream: ft-training_set/commonsense_170k.json
KEYS = ("instruction", "input", "output", "answer")

# -----------------------------------------------------------------------------
# the 8 test sets (evaluation order of the authors' scripts) and evaluate.py's extract_answer regexes

DATASETS = ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Challenge", "ARC-Easy", "openbookqa"]
ANSWER_PATTERNS = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": r"answer1|answer2|answer3|answer4|answer5",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
    "ARC-Challenge": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Easy": r"answer1|answer2|answer3|answer4|answer5",
    "openbookqa": r"answer1|answer2|answer3|answer4|answer5",
}


def split_response(decoded):
    """evaluate.py: the response is what follows the LAST "### Response:" of the decoded prompt + generation
    (RefLoRA uses [-1]; LLM-Adapters' commonsense_evaluate.py uses [1]), stripped."""
    return decoded.split("### Response:")[-1].strip()


def extract_answer(dataset, text):
    """evaluate.py extract_answer: first match of the dataset's pattern in text.strip(), "" if none.
    Case-sensitive substring match ("untrue" -> "true"); the text is split_response's output."""
    m = re.findall(ANSWER_PATTERNS[dataset], text.strip())
    return m[0] if m else ""


# -----------------------------------------------------------------------------
# prompt templates, copied verbatim (whitespace is data: 16-space indents, trailing spaces)

# finetune.py generate_prompt: "request. " (1 space) with input, "request.  " (2 spaces) without;
# blank lines inside are 16 spaces; the output follows the last indent, no EOS here
_TRAIN_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n\n"
    "                ### Instruction:\n                {instruction}\n                \n"
    "                ### Input:\n                {input}\n                \n"
    "                ### Response:\n                {output}"
)
_TRAIN_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.  \n\n"
    "                ### Instruction:\n                {instruction}\n                \n"
    "                ### Response:\n                {output}"
)
# evaluate.py generate_prompt: "request." (no space) with input, "request. " (1 space) without;
# blank lines are empty; ends with the 16-space indent after "### Response:\n"
_EVAL_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "                ### Instruction:\n                {instruction}\n\n"
    "                ### Input:\n                {input}\n\n"
    "                ### Response:\n                "
)
_EVAL_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request. \n\n"
    "                ### Instruction:\n                {instruction}\n\n"
    "                ### Response:\n                "
)


def train_prompt(record):
    """Full training text (prompt + output) of one record, as finetune.py's generate_prompt builds it.
    With train_on_inputs=False the masked prefix is train_prompt({**record, "output": ""})."""
    t = _TRAIN_INPUT if record["input"] else _TRAIN_NO_INPUT
    return t.format(instruction=record["instruction"], input=record["input"], output=record["output"])


def eval_prompt(instruction, input=None):
    """Generation prompt of evaluate.py's generate_prompt (the authors always call it with input=None)."""
    return _EVAL_INPUT.format(instruction=instruction, input=input) if input else \
        _EVAL_NO_INPUT.format(instruction=instruction)


# -----------------------------------------------------------------------------
# loading and validation


def _loads(text, where):
    """json.loads(text); a document nested too deeply for Python's parser is one line naming the record."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{where}: {_deep_record(text)}nested too deeply to read") from None


def _deep_record(text, limit=200):
    """ "record i: " for the first element of a top-level JSON list nested deeper than limit ("" if none)."""
    depth, i, in_str, esc = 0, 0, False, False
    for c in text:
        if in_str:
            in_str, esc = esc or c != '"', not esc and c == "\\"
        elif c == '"':
            in_str = True
        elif c in "[{":
            depth += 1
            if depth > limit:
                return f"record {i}: "
        elif c in "]}":
            depth -= 1
        elif c == "," and depth == 1:
            i += 1
    return ""


def read_records(path, name=None):
    """A JSON list of records with str instruction/input/output/answer.
    Errors name the file (or `name`, e.g. the URL it came from) and the record index."""
    where = name or path
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        data = _loads(text, where)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{where}: expected a JSON list of records, got {type(data).__name__}")
    for i, r in enumerate(data):
        if not isinstance(r, dict):
            raise ValueError(f"{where}: record {i}: expected an object, got {type(r).__name__}")
        for k in KEYS:
            if not isinstance(r.get(k), str):
                what = "missing" if k not in r else f"not a string ({type(r[k]).__name__})"
                raise ValueError(f"{where}: record {i}: key {k!r} {what}")
    return data


def read_instructions(path):
    """Your own training data: a JSON list (.json) or JSON Lines (.jsonl) of {"instruction", "input", "output"}
    records (Alpaca / LLM-Adapters format; "input" optional, other keys ignored) -> [{instruction, input, output}].
    Every error is one line naming the file and the record (0-based; JSONL also gives the line)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise ValueError(f"{path}: empty file (expected a JSON list or JSON Lines of instruction/output records)")
    if str(path).endswith(".jsonl"):
        lines = [(n, ln) for n, ln in enumerate(text.splitlines(), 1) if ln.strip()]
        data = []
        for i, (n, ln) in enumerate(lines):
            try:
                data.append(json.loads(ln))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: record {i} (line {n}): not valid JSON ({e.msg})") from None
            except RecursionError:
                raise ValueError(f"{path}: record {i} (line {n}): nested too deeply to read") from None
        where = lambda i: f"record {i} (line {lines[i][0]})"
    else:
        try:
            data = _loads(text, path)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); JSON Lines files must end in .jsonl") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        where = lambda i: f"record {i}"
    if not data:
        raise ValueError(f"{path}: no records")
    out = []
    for i, r in enumerate(data):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: {where(i)}: expected an object, got {type(r).__name__}")
        for k in ("instruction", "input", "output"):
            if k not in r and k != "input":
                raise ValueError(f"{path}: {where(i)}: key {k!r} missing")
            if not isinstance(r.get(k, ""), str):
                raise ValueError(f"{path}: {where(i)}: key {k!r} not a string ({type(r[k]).__name__})")
        out.append(dict(instruction=r["instruction"], input=r.get("input", ""), output=r["output"]))
    return out


def _train_170k(data_dir):
    d = Path(data_dir)
    return next((p for p in (d / TRAIN_170K, d / "ft-training_set" / TRAIN_170K) if p.is_file()), None)


def load_train(data_dir):
    """-> (records, description): commonsense_170k.json if present, else the union of dataset/*/train.json."""
    p = _train_170k(data_dir)
    if p is not None:
        records = read_records(p)
        return records, f"{p.name} ({len(records):,} records)"
    names = [n for n in DATASETS if (Path(data_dir) / "dataset" / n / "train.json").is_file()]
    if not names:
        raise FileNotFoundError(f"{data_dir}: no {TRAIN_170K} and no dataset/<name>/train.json "
                                "(run data/commonsense/prepare.py)")
    records = [r for n in names for r in read_records(Path(data_dir) / "dataset" / n / "train.json")]
    return records, f"union of {len(names)} train sets: {', '.join(names)} ({len(records):,} records)"


def load_test(data_dir, name):
    if name not in DATASETS:
        raise ValueError(f"unknown commonsense test set {name!r} (expected one of {', '.join(DATASETS)})")
    p = Path(data_dir) / "dataset" / name / "test.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: not found (run data/commonsense/prepare.py)")
    return read_records(p)


# -----------------------------------------------------------------------------
# fetching: local copy or GitHub raw file, validated, then moved into place (temp + os.replace)


def _fetch(src, dst):
    """Copy (src a Path) or download (src a path relative to the repo at REF) one file; -> record count."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    try:
        if isinstance(src, Path):
            n = len(read_records(src))
            shutil.copyfile(src, tmp)
        else:
            url = RAW + src
            try:
                with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                    shutil.copyfileobj(r, f)
            except (urllib.error.URLError, OSError) as e:
                raise ConnectionError(f"cannot download {url}: {getattr(e, 'reason', e)} "
                                      "(offline? use --src DIR with a local copy)") from None
            n = len(read_records(tmp, name=url))
        os.replace(tmp, dst)
        return n
    finally:
        tmp.unlink(missing_ok=True)


def prepare(src, out):
    """Bring the training set(s) and test sets into out/; -> lines to print. src None: download."""
    out = Path(out)
    if src is None:  # upstream layout: ft-training_set/commonsense_170k.json, dataset/<name>/test.json
        jobs = [("ft-training_set/" + TRAIN_170K, out / TRAIN_170K)]
        jobs += [(f"dataset/{n}/test.json", out / "dataset" / n / "test.json") for n in DATASETS]
    else:  # every known file the local copy has
        src = Path(src)
        if not src.is_dir():
            raise FileNotFoundError(f"--src {src}: not a directory")
        jobs = [(_train_170k(src), out / TRAIN_170K)] if _train_170k(src) else []
        jobs += [(src / "dataset" / n / f, out / "dataset" / n / f) for n in DATASETS
                 for f in ("train.json", "test.json") if (src / "dataset" / n / f).is_file()]
        if not jobs:
            raise FileNotFoundError(f"--src {src}: no {TRAIN_170K} and no dataset/<name>/{{train,test}}.json")
    lines = [f"{dst}: {_fetch(s, dst):,} records" for s, dst in jobs]
    missing = [n for n in DATASETS if not (out / "dataset" / n / "test.json").is_file()]
    if missing:
        lines.append(f"test sets not available: {', '.join(missing)}")
    lines.append("training data: " + load_train(out)[1])
    return lines


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        print(f"prepare.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    p = _Parser(description="fetch and validate LLM-Adapters commonsense data")
    p.add_argument("--src", default=None, help="local copy (default: download from GitHub)")
    p.add_argument("--out", default=str(HERE))
    a = p.parse_args(argv)
    if not a.out.strip() or a.src is not None and not a.src.strip():
        p.error(f"--{'out' if not a.out.strip() else 'src'}: empty (expected a directory)")
    try:
        for line in prepare(a.src, a.out):
            print(line)
    except (OSError, ValueError) as e:  # ConnectionError, FileNotFoundError are OSErrors
        p.error(str(e))


if __name__ == "__main__":
    main()
