"""
The data side of a run: where its data lives and what it reads (train records, the validation split), how
examples become tensors, and how a model is scored on them: commonsense beam-search accuracy, GLUE metrics of the
classifier, validation loss, the base model's cached accuracy, --eval_only on an out_dir.

One top-level file rather than one beside each data/<task>/prepare.py: both protocols share the batching by length,
the sharding of batches over ranks and the autocast, and the val loss shares the encoding with training; the
task-specific parts (prompts, answer extraction, metrics) stay in data/<task>/prepare.py and are imported here.
The examples -> tensors functions and the data loading live here too (train.py imports them), so that scoring
sees exactly the records and tokens training saw, and train.py keeps to its config and loop; nothing here imports
train.py (it imports everything).

References: the authors' commonsense evaluate.py (zhangyilang/RefLoRA, from LLM-Adapters): evaluation prompt,
beam search 4 / 32 new tokens, the response after "### Response:", the first pattern match == answer; GLUE
(Wang et al., 2019) metrics per task; HF's DataCollatorWithPadding, left padding for the last-token classifier.
"""
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from checkpoint import load_adapter, read_head, verify_checkpoint
from data.commonsense.prepare import DATASETS, eval_prompt, extract_answer, load_test, load_train, read_instructions, \
    split_response, train_prompt
from data.glue.prepare import glue_metrics, glue_path, read_glue
from model import generate, merge_lora

ROOT = Path(__file__).resolve().parent

GLUE_SEP = "\n"  # joins the two sentences of a pair

# -----------------------------------------------------------------------------
# examples -> tensors (shared with train.py)


def encode_lm(tok, record, cutoff_len):
    # the authors' tokenize(): truncate at cutoff_len; EOS only if not truncated and not already last
    ids = tok.encode(train_prompt(record), bos=True)[:cutoff_len]
    if len(ids) < cutoff_len and ids[-1] != tok.eos_id:
        ids.append(tok.eos_id)
    return ids


def encode_cls(tok, record, cutoff_len):
    # [BOS] a (SEP b); a pair too long loses tokens from the end of its longer side first (HF's "longest_first"),
    # so that RTE's hypothesis, after a long premise, survives truncation
    a = tok.encode(record["text_a"], bos=True)
    if record["text_b"] is None:
        return a[:cutoff_len]
    sep, b = tok.encode(GLUE_SEP), tok.encode(record["text_b"])
    na, nb = len(a), len(b)
    while na + nb > cutoff_len - len(sep):
        na, nb = (na - 1, nb) if na > nb else (na, nb - 1)
    return a[:na] + sep + b[:nb]


def lm_batch(seqs, pad_id):
    """Right padding; targets[:, t] = token t+1 (train_on_inputs: the whole sequence), -100 on pads."""
    T = max(map(len, seqs))
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s)
        y[i, :len(s) - 1] = torch.tensor(s[1:])
    return x, y


def cls_batch(seqs, pad_id):
    """Left padding, so position -1 is every row's last real token; mask 1 = real token."""
    T = max(map(len, seqs))
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        x[i, T - len(s):] = torch.tensor(s)
        mask[i, T - len(s):] = True
    return x, mask


def cls_loss(logits, labels):
    # one output and MSE for STS-B, cross-entropy otherwise
    if logits.shape[-1] == 1:
        return F.mse_loss(logits[:, 0], labels.float())
    return F.cross_entropy(logits, labels.long())


def dtype_of(cfg, dev):
    if cfg["dtype"] == "auto":  # a CPU without bf16 instructions emulates bf16 matmuls (~80× slower): float32
        cpu_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        bf16 = torch.cuda.is_bf16_supported() if dev.type == "cuda" else dev.type == "cpu" and cpu_bf16
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, cfg["dtype"])


def autocast(dev, cfg):  # bf16: autocast on CUDA and CPU (frozen base in bf16; LoRA factors, loss in float32)
    bf16 = dtype_of(cfg, dev) == torch.bfloat16
    return torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def hms(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def write_json(path, obj):
    Path(f"{path}.tmp").write_text(json.dumps(obj, indent=1))
    os.replace(f"{path}.tmp", path)


# -----------------------------------------------------------------------------
# data: where it lives, a run's records and validation split (the held-out examples val_loss scores), the
# checks of flags against model and data; train.py tokenizes on the fly, one permutation per epoch (group_by_len)


def resolve_data_dir(cfg):
    """data_dir, else data/<task> if prepared there, else ../shared/data/<task>."""
    if cfg["data_dir"]:
        return Path(cfg["data_dir"])
    local = ROOT / "data" / cfg["task"]
    if cfg["task"] == "commonsense":
        prepared = (local / "commonsense_170k.json").is_file() or (local / "dataset").is_dir()
    else:
        prepared = glue_path(cfg["glue_task"], "train", local).is_file()
    return local if prepared else ROOT.parent / "shared" / "data" / cfg["task"]


def group_by_len(perm, lengths, batch_size, g, mega=50):
    """A permutation whose consecutive batch_size-blocks hold examples of similar length: HF's LengthGroupedSampler
    (chunks of `mega` batches of the shuffled order, each sorted by length), then the full batches of each chunk
    shuffled, so that a run shorter than a chunk does not go from the longest examples to the shortest."""
    out = []
    for c in perm.split(mega * batch_size):
        c = c[torch.tensor([lengths[i] for i in c.tolist()]).argsort(descending=True, stable=True)]
        n = len(c) // batch_size * batch_size
        blocks = c[:n].view(-1, batch_size)  # (batches, batch_size)
        out += [blocks[torch.randperm(len(blocks), generator=g)].flatten(), c[n:]]
    return torch.cat(out)


def load_data(cfg, data_dir, log):
    """-> (train records, validation records) of the task; an unreadable file is one line naming it (or data_dir)."""
    try:
        return _load_data(cfg, data_dir, log)
    except ValueError as e:
        raise e if str(data_dir) in str(e) else ValueError(f"{data_dir}: {e}") from None


def _load_data(cfg, data_dir, log):
    if cfg["task"] == "glue":
        train = read_glue(cfg["glue_task"], "train", data_dir)
        dev = read_glue(cfg["glue_task"], "dev_matched" if cfg["glue_task"] == "mnli" else "dev", data_dir)
        log(f"data: {cfg['glue_task']} from {data_dir}: {len(train):,} train, {len(dev):,} dev")
        return train, dev[:cfg["eval_limit"] or None]
    if cfg["data_path"]:  # the commonsense prompt template; evaluation still on data_dir's test sets
        records = read_instructions(cfg["data_path"])
        log(f"data: {cfg['data_path']} ({len(records):,} records)")
    else:
        records, what = load_train(data_dir)
        log(f"data: {data_dir}: {what}")
    # the authors' val split: val_set_size examples held out with a fixed seed (42)
    perm = torch.randperm(len(records), generator=torch.Generator().manual_seed(42)).tolist()
    k = min(cfg["val_set_size"], len(records) // 2)
    return [records[i] for i in sorted(perm[k:])], [records[i] for i in sorted(perm[:k])]


def check_against(cfg, model, tok, clf, data_dir):
    """The flags that depend on the model and the data: cutoff_len, max_new_tokens, eval_sets."""
    n = model.args.max_seq_len
    if cfg["cutoff_len"] > n:
        raise ValueError(f"--cutoff_len={cfg['cutoff_len']}: more than the model's max_seq_len {n} ({cfg['init_from']})")
    if clf is None and cfg["max_new_tokens"] >= n:
        raise ValueError(f"--max_new_tokens={cfg['max_new_tokens']}: leaves no room for the prompt in the model's "
                         f"max_seq_len {n} ({cfg['init_from']})")
    if clf is not None and cfg["cutoff_len"] < len(tok.encode(GLUE_SEP)) + 3:
        raise ValueError(f"--cutoff_len={cfg['cutoff_len']}: a sentence pair needs at least "
                         f"{len(tok.encode(GLUE_SEP)) + 3} tokens (BOS, one of each sentence, the separator)")
    for name in cfg["eval_sets"] if clf is None else ():
        if not (Path(data_dir) / "dataset" / name / "test.json").is_file():
            raise FileNotFoundError(f"--eval_sets={','.join(cfg['eval_sets'])}: no test set {name} in {data_dir} "
                                    f"({Path(data_dir) / 'dataset' / name / 'test.json'})")


# -----------------------------------------------------------------------------
# batches by length, sharded over ranks


def _by_length(seqs, size):
    """Batches of indices into seqs, sorted by length (little padding); results go back by index."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    return [order[i:i + size] for i in range(0, len(order), size)]


def _sharded(fn, batches, rank, world):
    """fn(batches[rank::world]) -> one result per batch, gathered in batch order on every rank."""
    mine = fn(batches[rank::world])
    if world == 1:
        return mine
    parts = [None] * world
    torch.distributed.all_gather_object(parts, mine)
    return [parts[i % world][i // world] for i in range(len(batches))]


# -----------------------------------------------------------------------------
# the protocols


def eval_set_names(cfg, data_dir):
    """The commonsense test sets to evaluate on: cfg's eval_sets, else every dataset/<name>/test.json present."""
    return list(cfg["eval_sets"]) or [n for n in DATASETS if (Path(data_dir) / "dataset" / n / "test.json").is_file()]


@torch.no_grad()
def evaluate(model, tok, cfg, data_dir, out_dir, rank=0, world=1, log=print, base=None, what="eval"):
    """The benchmark's protocol on each commonsense test set (model already merged): beam search (num_beams; 1 =
    greedy) from the evaluation prompt, the response after "### Response:", the first pattern match == answer.
    Batched: left padding + mask + KV cache (model.generate). One progress line per batch (rank 0's share:
    examples done, accuracy so far, ETA over all sets); then the table, beside `base` ({set: accuracy}) if given.
    Writes out_dir/eval_<set>.json (out_dir None: nothing); -> {set: accuracy}."""
    names = eval_set_names(cfg, data_dir)
    if not names:
        raise FileNotFoundError(f"{data_dir}: no dataset/<name>/test.json to evaluate on")
    if len(names) < len(DATASETS) and not cfg["eval_sets"]:
        log(f"{what}: no test set for {', '.join(n for n in DATASETS if n not in names)} in {data_dir}")
    amp, results, ns = autocast(next(model.parameters()).device, cfg), {}, {}
    sets = {name: load_test(data_dir, name)[:cfg["eval_limit"] or None] for name in names}
    todo, done, t0 = sum(map(len, sets.values())), 0, time.time()  # for the ETA over all sets
    for name, records in sets.items():
        prompts = [tok.encode(eval_prompt(r["instruction"]), bos=True) for r in records]
        room = model.args.max_seq_len - cfg["max_new_tokens"]  # only the tiny preset's 256 is ever too short
        if any(len(p) > room for p in prompts):
            log(f"{what} {name}: {sum(len(p) > room for p in prompts)} prompts cut to their last {room} tokens")
            prompts = [p[-room:] for p in prompts]
        batches = _by_length(prompts, cfg["eval_batch_size"])

        def run(mine):
            nonlocal done
            out, n, right = [], 0, 0
            for b in mine:
                with amp:
                    new = generate(model, [prompts[i] for i in b], cfg["max_new_tokens"], tok.eos_id, tok.pad_id,
                                   num_beams=cfg["num_beams"])
                out.append([tok.decode(ids) for ids in new])
                n, done = n + len(b), done + len(b) * world
                right += sum(extract_answer(name, split_response(t)) == records[i]["answer"]
                             for i, t in zip(b, out[-1]))
                eta = (time.time() - t0) / done * max(todo - done, 0)
                log(f"{what} {name}: {n}/{sum(map(len, mine))} examples, acc {100 * right / n:.1f}%, "
                    f"eta {hms(eta)}" + (" (rank 0's share)" if world > 1 else ""))
            return out

        texts = [""] * len(records)
        for b, outs in zip(batches, _sharded(run, batches, rank, world)):
            for i, text in zip(b, outs):
                texts[i] = text
        # split_response of the generation alone = of prompt + generation (the prompt ends with the split string)
        preds = [extract_answer(name, split_response(t)) for t in texts]
        labels = [r["answer"] for r in records]
        results[name], ns[name] = sum(p == y for p, y in zip(preds, labels)) / max(len(records), 1), len(records)
        if rank == 0 and out_dir is not None:
            write_json(Path(out_dir) / f"eval_{name}.json", dict(dataset=name, accuracy=results[name],
                        n=len(records), predictions=preds, labels=labels, outputs=texts))
    log(table(results, ns, base))
    return results


def table(results, ns, base=None):
    """Accuracy (%) per set and their average; with `base`, the base model's column beside it."""
    cols = ([("base", base)] if base is not None else []) + [("acc" if base is None else "finetuned", results)]
    avg = lambda r: 100 * sum(r.get(n, 0.0) for n in results) / len(results)
    rows = [f"{'dataset':<14} {'n':>6}" + "".join(f" {c:>9}" for c, _ in cols)]
    rows += [f"{n:<14} {ns[n]:>6}" + "".join(f" {100 * r[n]:>9.1f}" if n in r else f" {'-':>9}" for _, r in cols)
             for n in results]
    return "\n".join(rows + [f"{'average':<14} {'':>6}" + "".join(f" {avg(r):>9.1f}" for _, r in cols)])


@torch.no_grad()
def evaluate_glue(clf, tok, cfg, records, out_dir=None, rank=0, world=1):
    """-> (dev loss, GLUE metrics) of the classifier; writes out_dir/eval_<task>.json when out_dir is given."""
    clf.eval()
    seqs, dev = [encode_cls(tok, r, cfg["cutoff_len"]) for r in records], next(clf.parameters()).device
    batches = _by_length(seqs, cfg["eval_batch_size"])

    def run(mine):
        out = []
        for b in mine:
            x, mask = cls_batch([seqs[i] for i in b], tok.pad_id)
            with autocast(dev, cfg):
                out.append(clf(x.to(dev), mask.to(dev)).cpu())
        return out

    logits = torch.empty(len(seqs), clf.head.out_features)  # (N, n_out)
    for b, out in zip(batches, _sharded(run, batches, rank, world)):
        logits[b] = out
    labels = [r["label"] for r in records]
    preds = logits[:, 0].tolist() if clf.head.out_features == 1 else logits.argmax(-1).tolist()
    metrics = glue_metrics(cfg["glue_task"], preds, labels)
    if out_dir is not None and rank == 0:
        write_json(Path(out_dir) / f"eval_{cfg['glue_task']}.json",
                    dict(task=cfg["glue_task"], n=len(labels), metrics=metrics, predictions=preds, labels=labels))
    clf.train()
    return cls_loss(logits, torch.tensor(labels)).item(), metrics


@torch.no_grad()
def val_loss(model, tok, cfg, records):
    """Token-weighted mean loss over the held-out commonsense examples."""
    model.eval()
    seqs, dev = [encode_lm(tok, r, cfg["cutoff_len"]) for r in records], next(model.parameters()).device
    total, count = torch.zeros((), device=dev), 0
    for b in _by_length(seqs, cfg["micro_batch_size"]):
        x, y = lm_batch([seqs[i] for i in b], tok.pad_id)
        n = int((y != -100).sum())
        with autocast(dev, cfg):
            total += model(x.to(dev), targets=y.to(dev))[1].float() * n
        count += n
    model.train()
    return (total / max(count, 1)).item()


# -----------------------------------------------------------------------------
# the base model's accuracy (cached in out_dir) and --eval_only


def protocol(cfg, data_dir):
    """What an accuracy depends on besides the adapter: the base eval cache is valid while this is unchanged."""
    return dict(init_from=cfg["init_from"], tokenizer=cfg["tokenizer"], data_dir=str(Path(data_dir).resolve()),
                eval_sets=eval_set_names(cfg, data_dir), **{k: cfg[k] for k in (
                    "eval_limit", "num_beams", "max_new_tokens", "dtype")})


def cached_base(cfg, data_dir, out_dir):
    f = out_dir / "eval_base.json"
    c = json.loads(f.read_text()) if f.is_file() else {}
    return c["accuracy"] if c.get("protocol") == protocol(cfg, data_dir) else None


def evaluate_out_dir(cfg, model, tok, clf, data_dir, out_dir, rank, world, log, dev_set):
    """--eval_only: the adapter (and head) in out_dir if there is one, else the base model."""
    verify_checkpoint(out_dir)
    base = None
    if (out_dir / "adapter_config.json").is_file():
        load_adapter(model, out_dir)
        base = cached_base(cfg, data_dir, out_dir)
        log(f"eval: adapter from {out_dir}")
    else:
        log(f"eval: no adapter in {out_dir}: evaluating {cfg['init_from']} as it is")
    if clf is None:
        return evaluate(merge_lora(model).eval(), tok, cfg, data_dir, out_dir, rank, world, log, base=base)
    read_head(out_dir, clf.head)
    return evaluate_glue(clf, tok, cfg, dev_set, out_dir, rank, world)[1]
