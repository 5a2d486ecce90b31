"""
A run's data: where it lives and what a run reads (the training records, the validation split), how an example
becomes token ids and a padded batch, the order of the training batches, and the checks of flags against the
data. The task-specific parts (prompts, readers, metrics) are data/<task>/prepare.py's; training (train.py) and
scoring (evaluate.py) both take their examples from here, so scoring sees exactly the records and tokens training saw.

References: the authors' commonsense finetune.py (zhangyilang/RefLoRA, from LLM-Adapters): tokenize() with EOS and
cutoff_len, 120 held-out examples; HF's DataCollatorWithPadding (left padding for the last-token classifier), its
"longest_first" truncation of sentence pairs and LengthGroupedSampler.
"""
import hashlib
from pathlib import Path

import torch

from data.commonsense.prepare import DATASETS, _train_170k, load_test, load_train, read_instructions, train_prompt
from data.glue.prepare import glue_path, glue_source, read_glue

ROOT = Path(__file__).resolve().parent

GLUE_SEP = "\n"  # joins the two sentences of a pair

# -----------------------------------------------------------------------------
# examples -> token ids -> batches


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


# -----------------------------------------------------------------------------
# where the data lives, a run's records and validation split (the held-out examples val_loss scores), the
# checks of flags against model and data


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


def load_data(cfg, data_dir, log):
    """-> (train records, validation records) of the task; an unreadable file is one line naming it (or data_dir)."""
    try:
        return _load_data(cfg, data_dir, log)
    except ValueError as e:
        named = str(data_dir) in str(e) or cfg["data_path"] and cfg["data_path"] in str(e)
        raise e if named else ValueError(f"{data_dir}: {e}") from None


def _load_data(cfg, data_dir, log):
    if cfg["task"] == "glue":
        train = read_glue(cfg["glue_task"], "train", data_dir)
        split = "dev_matched" if cfg["glue_task"] == "mnli" else "dev"
        dev = read_glue(cfg["glue_task"], split, data_dir)
        if not dev:  # no dev set: no dev loss or metrics to report
            raise ValueError(f"{glue_source(cfg['glue_task'], split, data_dir)}: no records (the dev set is scored)")
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


def train_files(cfg, data_dir):
    """The files the training records come from (what load_data reads for them)."""
    if cfg["task"] == "glue":
        return [glue_source(cfg["glue_task"], "train", data_dir)]
    if cfg["data_path"]:
        return [Path(cfg["data_path"])]
    if (p := _train_170k(data_dir)) is not None:
        return [p]
    return [p for n in DATASETS if (p := Path(data_dir) / "dataset" / n / "train.json").is_file()]


def identity(files):
    """{path: [size, sha256]} of each file: what a resume checks its data against (a path alone says too little)."""
    out = {}
    for f in files:
        with open(f, "rb") as fh:
            out[str(f)] = [Path(f).stat().st_size, hashlib.file_digest(fh, "sha256").hexdigest()]
    return out


def steps_per_epoch(cfg, train_set, world):
    """Optimizer steps in an epoch (its last partial batch dropped), or one line if the batches do not fit."""
    if cfg["batch_size"] % (cfg["micro_batch_size"] * world):
        raise ValueError(f"--batch_size={cfg['batch_size']} is not a multiple of --micro_batch_size × processes "
                         f"= {cfg['micro_batch_size']} × {world}")
    if len(train_set) < cfg["batch_size"] and not cfg["eval_only"]:
        raise ValueError(f"{cfg['data_path'] or resolve_data_dir(cfg)}: {len(train_set)} training examples, fewer "
                         f"than one batch of {cfg['batch_size']}")
    return len(train_set) // cfg["batch_size"]


def check_against(cfg, model, tok, clf, data_dir):
    """The flags that depend on the model and the data: cutoff_len, max_new_tokens, eval_sets."""
    n = model.args.max_seq_len
    if cfg["cutoff_len"] > n:
        raise ValueError(f"--cutoff_len={cfg['cutoff_len']}: more than the model's max_seq_len {n} "
                         f"({cfg['init_from']})")
    if clf is None and cfg["cutoff_len"] < 2:
        raise ValueError(f"--cutoff_len={cfg['cutoff_len']}: a training example needs at least 2 tokens (the loss "
                         "predicts each token from the ones before it)")
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
    names = cfg["eval_sets"] or [n for n in DATASETS if (Path(data_dir) / "dataset" / n / "test.json").is_file()]
    for name in names if clf is None else ():  # read now: a broken or empty test set is an error before training
        if not load_test(data_dir, name):
            raise ValueError(f"{Path(data_dir) / 'dataset' / name / 'test.json'}: no records (an empty test set has "
                             "no accuracy)")

# -----------------------------------------------------------------------------
# the order of the training batches: one permutation per epoch, a function of (seed, epoch) alone


class BatchOrder:
    """The examples of each optimizer step: epoch e is a random permutation seeded by seed + e (grouped by length
    into batches of similar length when lengths are given), so the batch of a step depends on (seed, step) alone
    and resuming is exact; an epoch's last partial batch is dropped."""

    def __init__(self, n, batch_size, seed, lengths=None):
        self.n, self.batch_size, self.seed, self.lengths, self.perms = n, batch_size, seed, lengths, {}

    def __call__(self, step):
        ep, k = divmod(step, self.n // self.batch_size)
        if ep not in self.perms:
            g = torch.Generator().manual_seed(self.seed + ep)
            perm = torch.randperm(self.n, generator=g)
            self.perms[ep] = perm if self.lengths is None else group_by_len(perm, self.lengths, self.batch_size, g)
        return self.perms[ep][k * self.batch_size:(k + 1) * self.batch_size].tolist()


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
