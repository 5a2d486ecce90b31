"""
GLUE readers, metrics and a small CLI that validates a GLUE directory and writes normalized JSONL.

Reads the official TSV distribution (`download_glue_data.py` layout: glue_data/<TASK>/{train,dev}.tsv,
MNLI dev_{matched,mismatched}.tsv) as it really is: CoLA has no header, MRPC starts with a UTF-8 BOM,
CoLA dev has no final newline, and text holds bare `"` characters, so files are read with
csv.QUOTE_NONE and a tab delimiter (the official processors do the same).
Label ids follow nyu-mll/glue on the HF hub, which RefLoRA's NLU/run_glue.py trains on
(e.g. MNLI entailment 0, neutral 1, contradiction 2; RTE/QNLI entailment 0).
Metrics follow GLUE (Wang et al. 2019) / the `evaluate` "glue" metric: CoLA Matthews corr., MRPC/QQP
accuracy + F1, STS-B Pearson + Spearman, others accuracy; `score` is their mean, as GLUE reports.

    python data/glue/prepare.py --src ../shared/data/glue [--tasks cola,rte] [--out data/glue]
"""
import argparse
import contextlib
import csv
import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]  # repo root

# -----------------------------------------------------------------------------
# task table: folder, file per split, columns (header name, or index for CoLA), labels, metrics
# rows = official GLUE sizes (train/dev counts without the header line)

_BIN = {"0": 0, "1": 1}
MAX_FIELD = csv.field_size_limit()  # 131,072 characters: csv's limit for a TSV field, and ours for a prepared text
TASKS = {
    "cola": dict(dir="CoLA", files={"train": "train.tsv", "dev": "dev.tsv"}, header=False,
                 text_a=3, text_b=None, label=1, label_map=_BIN,
                 label_names=["unacceptable", "acceptable"], num_labels=2, metrics=["mcc"],
                 rows={"train": 8551, "dev": 1043}),
    "sst2": dict(dir="SST-2", files={"train": "train.tsv", "dev": "dev.tsv"}, header=True,
                 text_a="sentence", text_b=None, label="label", label_map=_BIN,
                 label_names=["negative", "positive"], num_labels=2, metrics=["accuracy"],
                 rows={"train": 67349, "dev": 872}),
    "mrpc": dict(dir="MRPC", files={"train": "train.tsv", "dev": "dev.tsv"}, header=True,
                 text_a="#1 String", text_b="#2 String", label="Quality", label_map=_BIN,
                 label_names=["not_equivalent", "equivalent"], num_labels=2, metrics=["accuracy", "f1"],
                 rows={"train": 3668, "dev": 408}),
    "stsb": dict(dir="STS-B", files={"train": "train.tsv", "dev": "dev.tsv"}, header=True,
                 text_a="sentence1", text_b="sentence2", label="score", label_map=None,
                 label_names=None, num_labels=1, metrics=["pearson", "spearman"],
                 rows={"train": 5749, "dev": 1500}),
    "qqp": dict(dir="QQP", files={"train": "train.tsv", "dev": "dev.tsv"}, header=True,
                text_a="question1", text_b="question2", label="is_duplicate", label_map=_BIN,
                label_names=["not_duplicate", "duplicate"], num_labels=2, metrics=["accuracy", "f1"],
                rows={"train": 363846, "dev": 40430}),
    "mnli": dict(dir="MNLI", files={"train": "train.tsv", "dev_matched": "dev_matched.tsv",
                                    "dev_mismatched": "dev_mismatched.tsv"}, header=True,
                 text_a="sentence1", text_b="sentence2", label="gold_label",
                 label_map={"entailment": 0, "neutral": 1, "contradiction": 2},
                 label_names=["entailment", "neutral", "contradiction"], num_labels=3, metrics=["accuracy"],
                 rows={"train": 392702, "dev_matched": 9815, "dev_mismatched": 9832}),
    "qnli": dict(dir="QNLI", files={"train": "train.tsv", "dev": "dev.tsv"}, header=True,
                 text_a="question", text_b="sentence", label="label",
                 label_map={"entailment": 0, "not_entailment": 1},
                 label_names=["entailment", "not_entailment"], num_labels=2, metrics=["accuracy"],
                 rows={"train": 104743, "dev": 5463}),
    "rte": dict(dir="RTE", files={"train": "train.tsv", "dev": "dev.tsv"}, header=True,
                text_a="sentence1", text_b="sentence2", label="label",
                label_map={"entailment": 0, "not_entailment": 1},
                label_names=["entailment", "not_entailment"], num_labels=2, metrics=["accuracy"],
                rows={"train": 2490, "dev": 277}),
}

# -----------------------------------------------------------------------------
# reading


def glue_path(task, split, data_dir):
    """Path of one split's TSV; unknown task/split is a ValueError."""
    if task not in TASKS:
        raise ValueError(f"unknown GLUE task {task!r} (expected one of {', '.join(TASKS)})")
    t = TASKS[task]
    if split not in t["files"]:
        raise ValueError(f"unknown split {split!r} for {task} (expected one of {', '.join(t['files'])})")
    return Path(data_dir) / t["dir"] / t["files"][split]


def _read(task, split, data_dir):
    """-> (records, n_skipped). Only QQP skips rows with missing fields (its real train file has a few)."""
    path, t = glue_path(task, split, data_dir), TASKS[task]
    if not path.is_file():
        raise FileNotFoundError(f"{task}/{split}: expected GLUE file {path} (not found)")
    # utf-8-sig drops MRPC's BOM; newline="" lets csv see line ends; QUOTE_NONE keeps bare quotes as text
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        cols, it = [t["text_a"], t["text_b"], t["label"]], _rows(rows, path)
        if t["header"]:
            header = next(it, [])
            missing = [c for c in cols if c is not None and c not in header]
            if missing:
                raise ValueError(f"{path}:1: header lacks column(s) {missing} (header: {header})")
            cols = [header.index(c) if c is not None else None for c in cols]
        ia, ib, il = cols
        need = max(c for c in cols if c is not None) + 1
        records, skipped = [], 0
        for row in it:
            where = f"{path}:{rows.line_num}"
            if len(row) < need or (task == "qqp" and not row[il]):
                if task == "qqp":  # broken rows of the real QQP train file: skip and count
                    skipped += 1
                    continue
                raise ValueError(f"{where}: {len(row)} fields, expected at least {need}")
            raw = row[il]
            if t["label_map"] is None:  # STS-B: similarity score in [0, 5]
                try:
                    label = float(raw)
                except ValueError:
                    label = float("nan")  # fails the range check below
                if not 0.0 <= label <= 5.0:
                    raise ValueError(f"{where}: bad label {raw!r} (expected a score in [0, 5])")
            elif raw in t["label_map"]:
                label = t["label_map"][raw]
            else:
                raise ValueError(f"{where}: bad label {raw!r} (expected one of {list(t['label_map'])})")
            records.append({"text_a": row[ia], "text_b": row[ib] if ib is not None else None, "label": label})
    return records, skipped


def _rows(reader, path):
    """The rows of a csv reader; a field over csv's size limit, or text that is not UTF-8, is one line naming
    path:line."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise ValueError(f"{path}:{reader.line_num}: {e} (a GLUE text is far shorter)") from None
        except UnicodeDecodeError as e:  # decoded by the block: find the line
            n = next(n for n, ln in enumerate(Path(path).read_bytes().split(b"\n"), 1) if not _utf8(ln))
            raise ValueError(f"{path}:{n}: not UTF-8 text ({e.reason})") from None
        yield row


def _utf8(b):
    try:
        return b.decode("utf-8") is not None
    except UnicodeDecodeError:
        return False


def glue_source(task, split, data_dir):
    """The file read_glue reads: the JSONL this script's CLI writes (`<data_dir>/<task>/<split>.jsonl`) if present,
    else the official TSV."""
    prepared = Path(data_dir) / task / f"{split}.jsonl"
    return prepared if task in TASKS and prepared.is_file() else glue_path(task, split, data_dir)


def read_glue(task, split, data_dir):
    """Records {"text_a", "text_b" (None for single-sentence tasks), "label" (int; float for stsb)}: from the
    JSONL that this script's CLI writes (`<data_dir>/<task>/<split>.jsonl`) if present, else the official TSV."""
    path = glue_source(task, split, data_dir)
    if path.suffix != ".jsonl":
        return _read(task, split, data_dir)[0]
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return [_check_record(task, f"{path}:{n}", line) for n, line in enumerate(lines, 1) if line.strip()]


def _check_record(task, where, line):
    """One prepared JSONL line as a record, or one line naming file:line and what is wrong with it."""
    t = TASKS[task]
    try:
        r = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{where}: not a JSON record ({type(e).__name__})") from None
    if not isinstance(r, dict) or set(r) != {"text_a", "text_b", "label"}:
        raise ValueError(f"{where}: expected an object with text_a, text_b, label (as prepare.py writes them)")
    pair = t["text_b"] is not None
    if not isinstance(r["text_a"], str) or not (isinstance(r["text_b"], str) if pair else r["text_b"] is None):
        raise ValueError(f"{where}: text_a must be a string, text_b " + ("a string" if pair else "null"))
    if any(len(r[k] or "") > MAX_FIELD for k in ("text_a", "text_b")):
        raise ValueError(f"{where}: a text over {MAX_FIELD:,} characters")
    y = r["label"]
    ok = (type(y) in (int, float) and 0.0 <= y <= 5.0) if t["label_map"] is None else \
        (type(y) is int and 0 <= y < t["num_labels"])
    if not ok:
        want = "a score in [0, 5]" if t["label_map"] is None else f"a class id in 0..{t['num_labels'] - 1}"
        raise ValueError(f"{where}: bad label {y!r} (expected {want})")
    return r


# -----------------------------------------------------------------------------
# metrics (fractions in [0, 1] / correlations in [-1, 1])


def _rank(x):
    # average ranks (1-based), ties share the mean of the ranks they span
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    start = np.cumsum(counts) - counts  # ranks before each distinct value
    return (start + (counts + 1) / 2.0)[inv]


def _pearson(x, y):
    x, y = x - x.mean(), y - y.mean()
    d = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / d) if d > 0 else 0.0


def glue_metrics(task, preds, labels):
    """preds: class ids (or (N, C) logits, argmaxed), or scores for stsb; labels as read_glue gives them."""
    if task not in TASKS:
        raise ValueError(f"unknown GLUE task {task!r} (expected one of {', '.join(TASKS)})")
    t = TASKS[task]
    preds, labels = np.asarray(preds), np.asarray(labels)
    if t["num_labels"] == 1:
        preds, labels = preds.reshape(-1).astype(np.float64), labels.astype(np.float64)
    else:
        preds = (preds.argmax(-1) if preds.ndim == 2 else preds).astype(np.int64)
        labels = labels.astype(np.int64)
    if preds.shape != labels.shape or labels.size == 0:
        raise ValueError(f"{task}: {preds.shape[0]} predictions for {labels.shape[0]} labels")
    out = {}
    for m in t["metrics"]:
        if m == "accuracy":
            out[m] = float((preds == labels).mean())
        elif m == "f1":
            # F1 of the positive class 1 = 2 tp / (2 tp + fp + fn)
            tp = np.sum((preds == 1) & (labels == 1))
            d = 2 * tp + np.sum((preds == 1) & (labels != 1)) + np.sum((preds != 1) & (labels == 1))
            out[m] = float(2 * tp / d) if d > 0 else 0.0
        elif m == "mcc":
            # MCC = (c s - t·p) / sqrt((s² - p·p)(s² - t·t)); c correct, s total, t/p true/pred class counts
            # (for 2 classes: (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)))
            k = int(max(preds.max(), labels.max())) + 1
            t_, p_ = np.bincount(labels, minlength=k), np.bincount(preds, minlength=k)
            c, s = float((preds == labels).sum()), float(len(labels))
            d = np.sqrt((s * s - p_ @ p_) * (s * s - t_ @ t_))
            out[m] = float((c * s - t_ @ p_) / d) if d > 0 else 0.0
        elif m == "pearson":
            out[m] = _pearson(preds, labels)
        elif m == "spearman":
            # Spearman rho = Pearson correlation of the average ranks
            out[m] = _pearson(_rank(preds), _rank(labels))
    out["score"] = float(np.mean([out[m] for m in t["metrics"]]))
    return out


# -----------------------------------------------------------------------------
# CLI: validate, then write <out>/<task>/<split>.jsonl atomically


def _write_jsonl(records, path):
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OSError(f"{path}: cannot write it ({e.strerror})") from None


def _balance(task, records):
    labels = [r["label"] for r in records]
    if TASKS[task]["num_labels"] == 1:
        return f"score mean {np.mean(labels):.3f}, min {min(labels):g}, max {max(labels):g}"
    names, n = TASKS[task]["label_names"], Counter(labels)
    return "labels " + ", ".join(f"{names[i]} {n[i]} ({n[i] / len(labels):.1%})" for i in range(len(names)))


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        print(f"prepare.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    p = _Parser(description="validate GLUE TSVs and write normalized JSONL")
    p.add_argument("--src", default=str(ROOT.parent / "shared" / "data" / "glue"), help="glue_data directory")
    p.add_argument("--tasks", default=None, help="comma list (default: every task present in --src)")
    p.add_argument("--out", default=str(ROOT / "data" / "glue"))
    a = p.parse_args(argv)
    src, out = Path(a.src), Path(a.out)
    if not a.out.strip() or out.exists() and not out.is_dir():
        p.error(f"--out {a.out!r}: expected a directory")
    if not src.is_dir():
        p.error(f"--src {src}: not a directory")
    if a.tasks is None:
        tasks = [k for k, t in TASKS.items() if (src / t["dir"]).is_dir()]
        absent = [k for k in TASKS if k not in tasks]
        if not tasks:
            p.error(f"--src {src}: no GLUE task folder found (expected e.g. {src / 'CoLA'})")
        if absent:
            print(f"not in {src}: {', '.join(absent)} (skipped)")
    else:
        tasks = [k.strip().lower() for k in a.tasks.split(",") if k.strip()]
        bad = [k for k in tasks if k not in TASKS]
        if bad or not tasks:
            p.error(f"--tasks: unknown task(s) {bad} (expected names from {', '.join(TASKS)})")
    try:
        # read everything first, so a bad file leaves nothing half-written
        done = {(k, s): _read(k, s, src) for k in tasks for s in TASKS[k]["files"]}
    except (OSError, ValueError) as e:
        p.error(str(e))
    for (k, s), (records, skipped) in done.items():
        path = out / k / f"{s}.jsonl"
        try:
            _write_jsonl(records, path)
        except OSError as e:
            p.error(str(e))
        official = TASKS[k]["rows"][s]
        note = "" if len(records) == official else f"  WARNING: official count is {official}"
        note += f"  (skipped {skipped} rows with missing fields)" if skipped else ""
        print(f"{path}: {len(records)} rows, {_balance(k, records)}{note}")


if __name__ == "__main__":
    main()
