"""
How a model is scored: commonsense accuracy (the benchmark's generation protocol, batched, beside the base model's
cached accuracy), GLUE metrics of the classifier, the validation loss, and --eval_only on an out_dir.

One top-level file rather than one beside each data/<task>/prepare.py: the protocols share the batching by length
and the sharding of batches over ranks; the task-specific parts (prompts, answer extraction, metrics) stay in
data/<task>/prepare.py, and the examples come from dataset.py, as in training.

References: the authors' commonsense evaluate.py (zhangyilang/RefLoRA, from LLM-Adapters): evaluation prompt,
beam search 4 / 32 new tokens, the response after "### Response:", the first pattern match == answer; GLUE
(Wang et al., 2019) metrics per task; HF's DataCollatorWithPadding, left padding for the last-token classifier.
"""
import json
import time
from pathlib import Path

import torch

from configurator import hms
from data.commonsense.prepare import DATASETS, eval_prompt, extract_answer, load_test, split_response
from data.glue.prepare import glue_metrics
from dataset import cls_batch, encode_cls, encode_lm, lm_batch
from model import autocast, cls_loss, merge_lora
from runstate import nonfinite, read_head, verify_checkpoint, write_json
from sample import generate
from weights import load_adapter

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
    Batched: left padding + mask + KV cache (sample.generate). One progress line per batch (rank 0's share:
    examples done, accuracy so far, ETA over all sets); then the table, beside `base` ({set: accuracy}) if given.
    Writes out_dir/eval_<set>.json (out_dir None: nothing); -> {set: accuracy}."""
    names = eval_set_names(cfg, data_dir)
    if not names:
        raise FileNotFoundError(f"{data_dir}: no dataset/<name>/test.json to evaluate on")
    check_finite(model, what)
    if len(names) < len(DATASETS) and not cfg["eval_sets"]:
        log(f"{what}: no test set for {', '.join(n for n in DATASETS if n not in names)} in {data_dir}")
    amp, results, ns = autocast(model), {}, {}
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


def check_finite(model, what):
    """No score from a model with a NaN or inf weight: one line naming the tensor (found at load, or after merging)."""
    if bad := nonfinite(dict(model.named_parameters())):
        raise ValueError(f"{what}: the model's {bad} holds NaN or inf: nothing to score")


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
    check_finite(clf, "eval")
    clf.eval()
    seqs, dev = [encode_cls(tok, r, cfg["cutoff_len"]) for r in records], next(clf.parameters()).device
    batches = _by_length(seqs, cfg["eval_batch_size"])

    def run(mine):
        out = []
        for b in mine:
            x, mask = cls_batch([seqs[i] for i in b], tok.pad_id)
            with autocast(clf):
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


def validate(model, clf, tok, cfg, records, out_dir, rank, world):
    """-> (loss, metrics) on the validation records: the LM's validation loss, or the classifier's dev loss and GLUE
    metrics (out_dir/eval_<task>.json written by rank 0; under FSDP every rank runs every batch, a forward being a
    collective)."""
    if clf is None:
        return val_loss(model, tok, cfg, records), {}
    return evaluate_glue(clf, tok, cfg, records, out_dir if rank == 0 else None, *((0, 1) if cfg["fsdp"] else
                                                                                      (rank, world)))


@torch.no_grad()
def val_loss(model, tok, cfg, records):
    """Token-weighted mean loss over the held-out commonsense examples (None without any: no validation)."""
    if not records:
        return None
    model.eval()
    seqs, dev = [encode_lm(tok, r, cfg["cutoff_len"]) for r in records], next(model.parameters()).device
    total, count = torch.zeros((), device=dev), 0
    for b in _by_length(seqs, cfg["micro_batch_size"]):
        x, y = lm_batch([seqs[i] for i in b], tok.pad_id)
        n = int((y != -100).sum())
        with autocast(model):
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
    """The cached accuracy of the base model under this protocol; None if absent, stale or damaged (measured anew)."""
    f = out_dir / "eval_base.json"
    try:
        c = json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, ValueError, RecursionError):
        return None
    acc = c.get("accuracy") if isinstance(c, dict) and c.get("protocol") == protocol(cfg, data_dir) else None
    ok = isinstance(acc, dict) and all(type(a) in (int, float) and 0 <= a <= 1 for a in acc.values())
    return acc if ok else None


def base_accuracy(cfg, model, tok, data_dir, out_dir, rank, world, log):
    """The base model's accuracy on the same examples, for the final table: with A = 0 the untrained adapter IS
    the base model. Cached in out_dir/eval_base.json under its protocol; None when off or nothing to evaluate."""
    if not cfg["eval_base"] or not cfg["benchmark"] or cfg["fsdp"] or not eval_set_names(cfg, data_dir):
        return None
    f, key, acc = out_dir / "eval_base.json", protocol(cfg, data_dir), cached_base(cfg, data_dir, out_dir)
    if acc is not None:
        log(f"eval base: {f} (cached)")
        return acc
    acc = evaluate(model.eval(), tok, cfg, data_dir, None, rank, world, log, what="eval base")
    model.train()
    if rank == 0:
        write_json(f, dict(protocol=key, accuracy=acc))
    return acc


def evaluate_run(model, tok, cfg, data_dir, out_dir, rank, world, log, base, iters):
    """A finished commonsense run: the benchmark on the merged model beside the base model's accuracy (`base`, else
    the cached one), written to out_dir/eval.json; -> {set: accuracy}, or None when there is nothing to run."""
    if cfg["fsdp"]:  # the eval wants whole models: one per rank, batches sharded
        return log(f"fsdp: evaluate with `torchrun ... train.py --eval_only=True --out_dir={out_dir}` (no --fsdp)")
    if not cfg["benchmark"]:
        return log("eval: --benchmark=False: test sets not evaluated (validation loss only)")
    if not eval_set_names(cfg, data_dir) and cfg["data_path"]:
        return log(f"eval: no test sets in {data_dir}: benchmark evaluation skipped")
    base = base if base is not None else cached_base(cfg, data_dir, out_dir)
    acc = evaluate(merge_lora(model).eval(), tok, cfg, data_dir, out_dir, rank, world, log, base=base)
    if rank == 0:
        write_json(Path(out_dir) / "eval.json", dict(protocol=protocol(cfg, data_dir), method=cfg["method"],
                                                     iters=iters, base=base, finetuned=acc))
    return acc


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
