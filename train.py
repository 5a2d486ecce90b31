"""
Finetune a LLaMA-family model with LoRA / RefLoRA / RefLoRA-S, then evaluate it.

    python train.py                                          # smollm2-135m on commonsense, CPU-sized recipe
    python train.py config/llama2_7b.py --init_from=/path/to/Llama-2-7b-hf
    torchrun --standalone --nproc_per_node=8 train.py config/llama3_8b.py --init_from=/path/to/Meta-Llama-3-8B
    python train.py --task=glue --glue_task=rte              # LoRA + a linear head on the last token
    python train.py --eval_only=True --out_dir=out           # evaluate the adapter in out_dir

Defaults are the plain values below; `config/<name>.py` files (simple `name = literal` lines, read without exec)
and `--name=value` flags override them, in order. The resolved config is printed and saved in every checkpoint.
Under torchrun the job is data-parallel (DDP): gradients are all-reduced on the last micro-step only, so RefLoRA
sees the synchronized gradients and every rank computes the same S̃. With --fsdp=True each block is sharded by
rows instead (FSDP2 fully_shard): RefLoRA sums its r×r Grams and norms over the shards (one all-reduce per step),
checkpoints hold full tensors (the same state.pt as without sharding), and evaluation runs afterwards with
--eval_only=True, one whole model per rank.

References: nanoGPT train.py (configurator, loop, log line, DDP); the authors' commonsense recipe
(zhangyilang/RefLoRA commonsense_reasoning/finetune.py + evaluate.py, from LLM-Adapters): prompts, tokenize()
with EOS and cutoff_len, 120 held-out examples, beam search 4 / 32 new tokens; HF Trainer as they ran it:
get_linear_schedule_with_warmup, grad-norm clip 1.0, loss averaged over the accumulation steps.
"""
import ast
import json
import os
import resource
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent

_before = set(globals())
# -----------------------------------------------------------------------------
# defaults: a CPU-sized commonsense run of smollm2-135m (config/*.py hold the paper's GPU recipes)
# model and method
init_from = "smollm2-135m"  # preset name (tiny, smollm2-135m), Meta/HF checkpoint directory, or .gguf file
tokenizer = ""  # "" = the checkpoint's own ("bytes" for the random-init tiny preset)
method = "reflora-s"  # lora | reflora | reflora-s
lora_r = 16
lora_alpha = 32
lora_dropout = 0.05
lora_targets = ("wq", "wk", "wv", "w3", "w2")  # q, k, v, up, down (the paper's targets)
reflora_warmup = 20  # optimizer steps before refactoring starts
reflora_interval = 1
# task and data
task = "commonsense"  # commonsense | glue
glue_task = "rte"  # cola | sst2 | mrpc | stsb | qqp | mnli | qnli | rte (with task=glue)
data_dir = ""  # "" = data/<task> if prepared there, else ../shared/data/<task>
out_dir = "out"
cutoff_len = 256  # max tokens per training example (the classifier's max length for glue)
val_set_size = 120  # commonsense examples held out for validation loss
eval_sets = ()  # commonsense test sets, e.g. boolq,piqa; () = every one present in data_dir
eval_limit = 50  # examples per eval set (0 = all)
eval_batch_size = 16
num_beams = 4
max_new_tokens = 32
# optimization
batch_size = 16  # global batch per optimizer step
micro_batch_size = 8  # per process; gradient accumulation in between
grad_checkpoint = False  # recompute each block's activations in backward: less memory, ~1/3 more compute
group_by_length = False  # batches of similar length (less padding), as HF's group_by_length; order shuffled
epochs = 2
max_iters = 100  # optimizer steps; 0 = `epochs` passes over the training set
stop_iter = 0  # stop (after a checkpoint) at this step, the schedule unchanged: time-boxed jobs; 0 = never
lr = 5e-4
weight_decay = 0.0
warmup_steps = 10  # linear warmup, then linear decay to 0
grad_clip = 1.0
# system and logging
log_interval = 10
eval_interval = 50  # validation loss + checkpoint every this many steps (and at the end)
resume = False
eval_only = False
seed = 42
device = "auto"  # auto | cpu | cuda | cuda:N
dtype = "auto"  # auto (bfloat16 on CUDA and on CPUs with avx512_bf16 or AMX, else float32) | float32 | bfloat16
compile = torch.cuda.is_available()  # torch.compile the training forward (CPU too: inductor, minutes to compile)
backend = ""  # torch.distributed backend under torchrun; "" = nccl on CUDA, gloo on CPU
fsdp = False  # under torchrun: FSDP2 (fully_shard per block) instead of DDP, for models that do not fit one GPU
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if k not in _before and k != "_before"}
# --task=glue: defaults that suit a LLaMA classifier (used unless a config file or flag sets the key)
GLUE_DEFAULTS = dict(lora_r=8, lora_alpha=16, lr=1e-4, epochs=3, max_iters=0, cutoff_len=128, warmup_steps=100,
                     reflora_warmup=100, micro_batch_size=16, eval_limit=0, eval_interval=500)
CHOICES = dict(method=("lora", "reflora", "reflora-s"), task=("commonsense", "glue"),
               glue_task=("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"),
               dtype=("auto", "float32", "bfloat16"))
TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
GLUE_SEP = "\n"  # joins the two sentences of a pair


class TrainingDiverged(RuntimeError):
    """A non-finite loss: main() prints it as one line and exits 1."""


# -----------------------------------------------------------------------------
# configuration


def _fail(msg):
    print(f"train.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def _cast(key, value, where):
    """A CLI string (or a config-file literal) as the type of the key's default."""
    if key not in DEFAULTS:
        _fail(f"{where}: unknown config key {key!r}")
    want = type(DEFAULTS[key])
    try:
        if isinstance(value, str) and want is not str:
            if want is bool:
                if value not in ("True", "False"):
                    raise ValueError
                value = value == "True"
            elif want is tuple:
                value = tuple(s.strip() for s in value.split(",") if s.strip())
            else:
                value = want(value)
        if want is float and type(value) is int:
            value = float(value)
        if want is tuple and isinstance(value, list):
            value = tuple(value)
        if type(value) is not want or (want is tuple and not all(isinstance(s, str) for s in value)):
            raise ValueError
    except ValueError:
        _fail(f"{where}: {key}={value!r} is not a valid {want.__name__}")
    return value


def _read_config_file(path):
    """`name = literal` assignments (and a docstring) of a config/*.py file, without executing it."""
    p = Path(path) if Path(path).exists() else ROOT / path
    if not p.is_file():
        _fail(f"config file {path} not found")
    try:
        tree = ast.parse(p.read_text(), filename=str(p))
    except SyntaxError as e:
        _fail(f"{p}:{e.lineno}: {e.msg}")
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            _fail(f"{p}:{node.lineno}: only `name = literal` assignments are allowed")
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            _fail(f"{p}:{node.lineno}: the value of {node.targets[0].id} is not a literal")
        out[node.targets[0].id] = _cast(node.targets[0].id, value, f"{p}:{node.lineno}")
    return out


def parse_config(argv):
    """Defaults, then config files (positional) and --name=value flags in order -> the resolved dict."""
    given = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__ + "\nconfig keys and defaults:\n" + "\n".join(f"  --{k}={v!r}" for k, v in DEFAULTS.items()))
            sys.exit(0)
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                _fail(f"{arg}: expected --name=value")
            given[key] = _cast(key, value, f"--{key}")
        else:
            given.update(_read_config_file(arg))
    cfg = {**DEFAULTS, **given}
    if cfg["task"] == "glue":
        cfg.update({k: v for k, v in GLUE_DEFAULTS.items() if k not in given})
    for k, options in CHOICES.items():
        if cfg[k] not in options:
            _fail(f"--{k}={cfg[k]}: expected one of {', '.join(options)}")
    for k in ("lora_r", "batch_size", "micro_batch_size", "cutoff_len", "eval_batch_size", "num_beams",
              "log_interval", "reflora_interval"):
        if cfg[k] < 1:
            _fail(f"--{k}={cfg[k]}: must be >= 1")
    for k in ("max_iters", "stop_iter", "epochs", "eval_limit", "warmup_steps", "reflora_warmup", "eval_interval"):
        if cfg[k] < 0:
            _fail(f"--{k}={cfg[k]}: must be >= 0")
    if cfg["batch_size"] % cfg["micro_batch_size"]:
        _fail(f"--batch_size={cfg['batch_size']} is not a multiple of --micro_batch_size={cfg['micro_batch_size']}")
    bad = [t for t in cfg["lora_targets"] if t not in TARGETS] or ([] if cfg["lora_targets"] else ["(none)"])
    if bad:
        _fail(f"--lora_targets: unknown {','.join(bad)} (expected names from {','.join(TARGETS)})")
    return cfg


# -----------------------------------------------------------------------------
# data: commonsense (LLM-Adapters JSON) and GLUE; tokenized on the fly, one deterministic permutation per epoch

from data.commonsense.prepare import DATASETS, eval_prompt, extract_answer, load_test, load_train, \
    split_response, train_prompt  # noqa: E402
from data.glue.prepare import TASKS as GLUE_TASKS, glue_metrics, glue_path, read_glue  # noqa: E402


def resolve_data_dir(cfg):
    if cfg["data_dir"]:
        return Path(cfg["data_dir"])
    local = ROOT / "data" / cfg["task"]
    if cfg["task"] == "commonsense":
        prepared = (local / "commonsense_170k.json").is_file() or (local / "dataset").is_dir()
    else:
        prepared = glue_path(cfg["glue_task"], "train", local).is_file()
    return local if prepared else ROOT.parent / "shared" / "data" / cfg["task"]


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


def load_data(cfg, data_dir, log):
    """-> (train records, validation records) of the task."""
    if cfg["task"] == "glue":
        train = read_glue(cfg["glue_task"], "train", data_dir)
        dev = read_glue(cfg["glue_task"], "dev_matched" if cfg["glue_task"] == "mnli" else "dev", data_dir)
        log(f"data: {cfg['glue_task']} from {data_dir}: {len(train):,} train, {len(dev):,} dev")
        return train, dev[:cfg["eval_limit"] or None]
    records, what = load_train(data_dir)
    log(f"data: {data_dir}: {what}")
    # the authors' val split: val_set_size examples held out with a fixed seed (42)
    perm = torch.randperm(len(records), generator=torch.Generator().manual_seed(42)).tolist()
    k = min(cfg["val_set_size"], len(records) // 2)
    return [records[i] for i in sorted(perm[k:])], [records[i] for i in sorted(perm[:k])]


# -----------------------------------------------------------------------------
# model: LLaMA + LoRA (+ a float32 linear head for glue)

from model import add_lora, generate, load_adapter, load_model, lora_state_dict, merge_lora, \
    resolve_checkpoint, save_adapter  # noqa: E402
from reflora import RefLoRA, local  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


class Classifier(nn.Module):
    """The LLaMA body (LoRA) and a trainable float32 linear head on the last real token's hidden state."""

    def __init__(self, llm, n_out):
        super().__init__()
        self.llm = llm
        self.head = nn.Linear(llm.args.dim, n_out, device=llm.tok_embeddings.weight.device)

    def forward(self, x, mask):
        h, _ = self.llm(x, attn_mask=mask, return_hidden=True)  # (B, T, dim)
        with torch.autocast(x.device.type, enabled=False):
            return self.head(h[:, -1].float())  # (B, n_out); left padding: -1 is the last real token


def build(cfg, device, dtype):
    """-> (model, tokenizer, classifier or None): pretrained weights, LoRA on the targets, everything else frozen."""
    ckpt = resolve_checkpoint(cfg["init_from"])
    model = load_model(ckpt or cfg["init_from"], dtype=dtype, device=device)
    tok_path = cfg["tokenizer"] or ("bytes" if ckpt is None else ckpt)
    tok = load_tokenizer(str(tok_path))  # a .gguf file carries its tokenizer in its metadata
    if tok.n_words > model.args.vocab_size:
        raise ValueError(f"tokenizer {tok_path}: {tok.n_words} ids > the model's vocab_size {model.args.vocab_size}")
    add_lora(model, cfg["lora_r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["lora_targets"])
    model.grad_checkpoint = cfg["grad_checkpoint"]
    clf = Classifier(model, GLUE_TASKS[cfg["glue_task"]]["num_labels"]) if cfg["task"] == "glue" else None
    return model, tok, clf


def flops_per_token(model, lm_head=True):
    """(f0, f1): training FLOPs per token = f0 + f1·T at sequence length T. LoRA: frozen weights get no weight
    gradient, so 2N forward + 2N input-gradient for every matmul weight, + 2N weight-gradient for trainable ones;
    attention's QKᵀ and AV add 12·n_layers·dim·T (forward + backward, causal mask not discounted, as nanoGPT).
    The embedding lookup is free; a tied embedding counts once, as the LM head."""
    a, emb = model.args, model.tok_embeddings.weight.numel()
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    n_frozen -= (0 if a.tie_word_embeddings else emb) + (0 if lm_head else emb)
    return 4 * n_frozen + 6 * n_lora, 12 * a.n_layers * a.dim


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12,
              "4090": 165e12, "3090": 71e12, "V100": 125e12}  # dense bf16 (fp16 for V100)


# -----------------------------------------------------------------------------
# evaluation


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


@torch.no_grad()
def evaluate(model, tok, cfg, data_dir, out_dir, rank=0, world=1, log=print):
    """The benchmark's protocol on each commonsense test set (model already merged): beam search from the
    evaluation prompt, the response after "### Response:", the dataset's first pattern match == answer.
    Batched: left padding + mask + KV cache (model.generate). Writes out_dir/eval_<set>.json; -> {set: accuracy}."""
    names = list(cfg["eval_sets"]) or [n for n in DATASETS if (Path(data_dir) / "dataset" / n / "test.json").is_file()]
    if not names:
        raise FileNotFoundError(f"{data_dir}: no dataset/<name>/test.json to evaluate on")
    if len(names) < len(DATASETS) and not cfg["eval_sets"]:
        log(f"eval: no test set for {', '.join(n for n in DATASETS if n not in names)} in {data_dir}")
    amp, results, rows = _autocast(next(model.parameters()).device, cfg), {}, []
    for name in names:
        records = load_test(data_dir, name)[:cfg["eval_limit"] or None]
        prompts = [tok.encode(eval_prompt(r["instruction"]), bos=True) for r in records]
        room = model.args.max_seq_len - cfg["max_new_tokens"]  # only the tiny preset's 256 is ever too short
        if any(len(p) > room for p in prompts):
            log(f"eval {name}: {sum(len(p) > room for p in prompts)} prompts cut to their last {room} tokens")
            prompts = [p[-room:] for p in prompts]
        batches, t0 = _by_length(prompts, cfg["eval_batch_size"]), time.time()

        def run(mine):
            out = []
            for k, b in enumerate(mine):
                with amp:
                    new = generate(model, [prompts[i] for i in b], cfg["max_new_tokens"], tok.eos_id, tok.pad_id,
                                   num_beams=cfg["num_beams"])
                out.append([tok.decode(ids) for ids in new])
                if rank == 0 and sys.stdout.isatty():  # progress bar with ETA, on a terminal only
                    eta = (time.time() - t0) / (k + 1) * (len(mine) - k - 1)
                    print(f"\reval {name}: {k + 1}/{len(mine)} batches, eta {_hms(eta)}  ", end="", flush=True)
            return out

        texts = [""] * len(records)
        for b, outs in zip(batches, _sharded(run, batches, rank, world)):
            for i, text in zip(b, outs):
                texts[i] = text
        if rank == 0 and sys.stdout.isatty():
            print()
        # split_response of the generation alone = of prompt + generation (the prompt ends with the split string)
        preds = [extract_answer(name, split_response(t)) for t in texts]
        labels = [r["answer"] for r in records]
        results[name] = sum(p == y for p, y in zip(preds, labels)) / max(len(records), 1)
        rows.append(f"{name:<14} {len(records):>6} {100 * results[name]:>6.1f}")
        if rank == 0:
            _write_json(Path(out_dir) / f"eval_{name}.json", dict(dataset=name, accuracy=results[name],
                        n=len(records), predictions=preds, labels=labels, outputs=texts))
    avg = 100 * sum(results.values()) / len(results)
    log("\n".join([f"{'dataset':<14} {'n':>6} {'acc':>6}", *rows, f"{'average':<14} {'':>6} {avg:>6.1f}"]))
    return results


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
            with _autocast(dev, cfg):
                out.append(clf(x.to(dev), mask.to(dev)).cpu())
        return out

    logits = torch.empty(len(seqs), clf.head.out_features)  # (N, n_out)
    for b, out in zip(batches, _sharded(run, batches, rank, world)):
        logits[b] = out
    labels = [r["label"] for r in records]
    preds = logits[:, 0].tolist() if clf.head.out_features == 1 else logits.argmax(-1).tolist()
    metrics = glue_metrics(cfg["glue_task"], preds, labels)
    if out_dir is not None and rank == 0:
        _write_json(Path(out_dir) / f"eval_{cfg['glue_task']}.json",
                    dict(task=cfg["glue_task"], n=len(labels), metrics=metrics, predictions=preds, labels=labels))
    clf.train()
    return _cls_loss(logits, torch.tensor(labels)).item(), metrics


@torch.no_grad()
def val_loss(model, tok, cfg, records):
    """Token-weighted mean loss over the held-out commonsense examples."""
    model.eval()
    seqs, dev = [encode_lm(tok, r, cfg["cutoff_len"]) for r in records], next(model.parameters()).device
    total, count = torch.zeros((), device=dev), 0
    for b in _by_length(seqs, cfg["micro_batch_size"]):
        x, y = lm_batch([seqs[i] for i in b], tok.pad_id)
        n = int((y != -100).sum())
        with _autocast(dev, cfg):
            total += model(x.to(dev), targets=y.to(dev))[1].float() * n
        count += n
    model.train()
    return (total / max(count, 1)).item()


def _cls_loss(logits, labels):
    # one output and MSE for STS-B, cross-entropy otherwise
    if logits.shape[-1] == 1:
        return F.mse_loss(logits[:, 0], labels.float())
    return F.cross_entropy(logits, labels.long())


# -----------------------------------------------------------------------------
# checkpoints: the PEFT adapter (+ head) to export; state.pt (with its own LoRA copy) is what --resume reads


def _write_json(path, obj):
    Path(f"{path}.tmp").write_text(json.dumps(obj, indent=1))
    os.replace(f"{path}.tmp", path)


def save_checkpoint(out_dir, model, lora, head, state):
    """Each file is written to out_dir/.tmp, then os.replace'd; state.pt goes last and holds its own copy of
    the LoRA (and head) tensors, so a crash at any point leaves a consistent, loadable checkpoint."""
    out, tmp = Path(out_dir), Path(out_dir) / ".tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    save_adapter(model, tmp, lora)
    if head is not None:
        save_file({k: v.contiguous() for k, v in head.items()}, tmp / "head.safetensors")
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    torch.save(dict(state, lora=lora, head=head), tmp / "state.pt")
    os.replace(tmp / "state.pt", out / "state.pt")
    tmp.rmdir()


@torch.no_grad()
def load_checkpoint(path, cfg, model, clf, opt, sched):
    """Restore LoRA (+ head), optimizer (RefLoRA state included) and scheduler from state.pt; -> the state dict."""
    st = torch.load(path, map_location="cpu", weights_only=True)
    for k in ("task", "glue_task", "init_from", "method", "lora_r", "lora_alpha", "lora_targets", "batch_size", "seed"):
        if st["config"][k] != cfg[k]:
            raise ValueError(f"--resume: {k}={cfg[k]!r}, but {path} was trained with {st['config'][k]!r}")
    head = {} if clf is None else clf.head.state_dict()
    ours = {**lora_state_dict(model), **{"head." + k: v for k, v in head.items()}}
    theirs = {**st["lora"], **{"head." + k: v for k, v in (st["head"] or {}).items()}}
    if theirs.keys() != ours.keys() or any(theirs[k].shape != v.shape for k, v in ours.items()):
        raise ValueError(f"{path}: its LoRA (and head) tensors do not match the model's")
    for k, v in ours.items():
        local(v).copy_(local(_shard_like(theirs[k], v)))
    opt.load_state_dict(st["optimizer"])
    for p, s in opt.state.items():
        if hasattr(p, "device_mesh"):  # FSDP2: the saved full Adam moments -> this rank's shards
            s.update({k: _shard_like(t, p) for k, t in s.items() if k != "step"})
    sched.load_state_dict(st["scheduler"])
    return st


def _shard_like(full, p):
    """The full tensor laid out as p: a DTensor sharded as p (FSDP2), else on p's device."""
    if not hasattr(p, "device_mesh"):
        return full.to(p.device)
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full.to(local(p).device), p.device_mesh, p.placements)


def _full(t):
    """A DTensor's full value (an all-gather: every rank calls it), else t."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _fully_shard(net, model, clf, bf16):
    """FSDP2: each block, the head, then the rest (embeddings, norm, output) as the root; rows sharded over ranks."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # a block is gathered in one dtype: under bf16 the float32 LoRA factors travel (and compute) in bf16 too;
    # gradients are reduced and kept in float32
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for layer in model.layers:
        fully_shard(layer, mp_policy=mp)
    if clf is not None:
        fully_shard(clf.head)  # float32, as the head computes
    fully_shard(net, mp_policy=mp)


# -----------------------------------------------------------------------------
# training


def _dtype(cfg, dev):
    if cfg["dtype"] == "auto":  # a CPU without bf16 instructions emulates bf16 matmuls (~80× slower): float32
        cpu_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        bf16 = torch.cuda.is_bf16_supported() if dev.type == "cuda" else dev.type == "cpu" and cpu_bf16
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, cfg["dtype"])


def _autocast(dev, cfg):  # bf16: autocast on CUDA and CPU (frozen base in bf16; LoRA factors, loss in float32)
    bf16 = _dtype(cfg, dev) == torch.bfloat16
    return torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def _hms(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _setup(cfg):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: -> (ddp, rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = cfg["device"] if cfg["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if world == 1:
        return False, 0, 1, torch.device(dev)
    torch.distributed.init_process_group(cfg["backend"] or ("nccl" if dev.startswith("cuda") else "gloo"))
    if dev.startswith("cuda"):
        dev = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(dev)
    return True, int(os.environ["RANK"]), world, torch.device(dev)


def train(cfg):
    """Finetune (then evaluate), or with eval_only just evaluate, as cfg says; -> a dict of final numbers."""
    ddp, rank, world, dev = _setup(cfg)
    master, out_dir = rank == 0, Path(cfg["out_dir"])
    log = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)
    out_dir.mkdir(parents=True, exist_ok=True)
    log("config: " + json.dumps(cfg))
    if cfg["fsdp"] and not ddp and not cfg["eval_only"]:
        raise ValueError("--fsdp=True shards over processes: run it under torchrun (WORLD_SIZE > 1)")
    if cfg["resume"] and not (out_dir / "state.pt").is_file():
        raise FileNotFoundError(f"--resume=True but {out_dir / 'state.pt'} does not exist")
    torch.manual_seed(cfg["seed"])  # the same LoRA / head init on every rank
    model, tok, clf = build(cfg, dev, _dtype(cfg, dev))
    data_dir = resolve_data_dir(cfg)
    if cfg["eval_only"]:
        return _eval_only(cfg, model, tok, clf, data_dir, out_dir, rank, world, log)

    train_set, val_set = load_data(cfg, data_dir, log)
    if cfg["batch_size"] % (cfg["micro_batch_size"] * world):
        raise ValueError(f"--batch_size={cfg['batch_size']} is not a multiple of --micro_batch_size × processes "
                         f"= {cfg['micro_batch_size']} × {world}")
    per_rank, mb = cfg["batch_size"] // world, cfg["micro_batch_size"]
    accum = per_rank // mb
    steps_per_epoch = len(train_set) // cfg["batch_size"]  # an epoch's last partial batch is dropped
    if steps_per_epoch == 0:
        raise ValueError(f"{data_dir}: {len(train_set)} training examples, fewer than one batch of {cfg['batch_size']}")
    total = cfg["max_iters"] or cfg["epochs"] * steps_per_epoch

    net = model if clf is None else clf  # the module trained
    if cfg["fsdp"]:  # before the optimizer: fully_shard swaps in DTensor parameters
        _fully_shard(net, model, clf, _dtype(cfg, dev) == torch.bfloat16)
    # RefLoRA on the LoRA pairs (the head, if any, by the base rule); HF's linear warmup then linear decay to 0
    opt = RefLoRA(model.lora_pairs(), params=[] if clf is None else list(clf.head.parameters()), method=cfg["method"],
                  base="adamw", lr=cfg["lr"], weight_decay=cfg["weight_decay"], warmup=cfg["reflora_warmup"],
                  interval=cfg["reflora_interval"], compile=cfg["compile"] and dev.type == "cuda")
    w = cfg["warmup_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / max(1, w) if s < w else max(0.0, (total - s) / max(1, total - w)))
    trainable = [p for p in net.parameters() if p.requires_grad]
    torch.manual_seed(cfg["seed"] + rank)  # dropout masks differ across ranks
    it, best_val, last_saved = 0, float("inf"), None
    if cfg["resume"]:
        st = load_checkpoint(out_dir / "state.pt", cfg, model, clf, opt, sched)
        it, best_val, last_saved = st["iter_num"], st["best_val"], st["iter_num"]
        rng = st["rng"][rank] if len(st["rng"]) == world else st["rng"][0]
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and dev.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], dev)
        log(f"resumed from {out_dir / 'state.pt'} at iter {it}")

    # the training forward: compiled (a wrapper sharing the parameters; checkpoints read `model` itself), then DDP
    # dynamic shapes: one graph for every batch length; on CPU (SmolLM2 shapes, lengths 97-181) 13 % faster per
    # step than padding each batch to a multiple of 64 with static graphs, and one compile instead of up to four
    fwd = torch.compile(net, dynamic=True) if cfg["compile"] else net
    if ddp and not cfg["fsdp"]:
        fwd = torch.nn.parallel.DistributedDataParallel(fwd, device_ids=[dev.index] if dev.type == "cuda" else None)
    encode = encode_lm if clf is None else encode_cls
    f0, f1 = flops_per_token(model, lm_head=clf is None)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else ""
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)  # None on CPU: mfu is printed as -
    log(f"training: {len(train_set):,} examples, {total} steps of {cfg['batch_size']} ({world} × {accum} × {mb}), "
        f"{sum(p.numel() for p in trainable):,} trainable parameters, {cfg['method']}")
    logf = open(out_dir / "log.jsonl", "a") if master else None
    lengths = [len(encode(tok, r, cfg["cutoff_len"])) for r in train_set] if cfg["group_by_length"] else None
    perms = {}

    def batch_at(step):
        # the examples of optimizer step `step`: a function of (seed, step) alone, so resuming is exact
        ep, k = divmod(step, steps_per_epoch)
        if ep not in perms:
            g = torch.Generator().manual_seed(cfg["seed"] + ep)
            perms[ep] = torch.randperm(len(train_set), generator=g)
            if lengths is not None:
                perms[ep] = group_by_len(perms[ep], lengths, cfg["batch_size"], g)
        idx = perms[ep][k * cfg["batch_size"]:(k + 1) * cfg["batch_size"]].tolist()
        return idx[rank * per_rank:(rank + 1) * per_rank]  # this rank's share of the global batch

    def stop_if_diverged(loss_sum, what="loss"):
        # a host sync: at log and checkpoint points only; every rank takes the same decision
        bad = (~torch.isfinite(loss_sum)).float() + sum((~torch.isfinite(local(p))).any().float() for p in trainable)
        if ddp:
            torch.distributed.all_reduce(bad)
        if bad.item():
            good = f"{out_dir / 'state.pt'} (iter {last_saved})" if last_saved is not None else "none"
            raise TrainingDiverged(f"non-finite {what} at or before iter {it}: stopping; last good checkpoint: {good}")

    def checkpoint():
        nonlocal best_val, last_saved
        if clf is None:
            v, metrics = val_loss(model, tok, cfg, val_set), {}
        else:
            # FSDP: every rank runs every batch (a forward is a collective), the master writes
            v, metrics = evaluate_glue(clf, tok, cfg, val_set, out_dir if master else None,
                                       *((0, 1) if cfg["fsdp"] else (rank, world)))
        stop_if_diverged(torch.tensor(v, device=dev), "validation loss")
        best_val = min(best_val, v)
        log(f"iter {it}: val loss {v:.4f}" + "".join(f", {k} {m:.4f}" for k, m in metrics.items()))
        rngs = [None] * world
        rng = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None)
        torch.distributed.all_gather_object(rngs, rng) if ddp else rngs.__setitem__(0, rng)
        # full tensors (FSDP: gathered by every rank), so that state.pt is the same with or without sharding
        cpu = lambda sd: {k: _full(v.detach()).cpu() for k, v in sd.items()}
        lora, head = cpu(lora_state_dict(model)), None if clf is None else cpu(clf.head.state_dict())
        optim = opt.state_dict()
        optim["state"] = {i: {k: _full(t) for k, t in st.items()} for i, st in optim["state"].items()}
        if master:
            logf.write(json.dumps(dict(iter=it, val_loss=v, **metrics)) + "\n")
            logf.flush()
            save_checkpoint(out_dir, model, lora, head, dict(
                iter_num=it, epoch=it // steps_per_epoch, data_position=it % steps_per_epoch * cfg["batch_size"],
                config=cfg, best_val=best_val, rng=rngs, optimizer=optim, scheduler=sched.state_dict()))
        last_saved = it
        if ddp:
            torch.distributed.barrier()

    net.train()
    loss_sum = torch.zeros((), device=dev)
    t_log, it_log, tokens, flops = time.time(), it, 0, 0.0
    while it < total and not (cfg["stop_iter"] and it >= cfg["stop_iter"]):
        idx = batch_at(it)
        for m in range(accum):
            rs = [train_set[i] for i in idx[m * mb:(m + 1) * mb]]
            seqs = [encode(tok, r, cfg["cutoff_len"]) for r in rs]
            T = max(map(len, seqs))
            tokens, flops = tokens + sum(map(len, seqs)), flops + len(seqs) * T * (f0 + f1 * T)
            # DDP / FSDP reduce gradients on the last micro-step only: RefLoRA then sees the synchronized ones
            if cfg["fsdp"]:
                net.set_requires_gradient_sync(m == accum - 1)
            with fwd.no_sync() if ddp and not cfg["fsdp"] and m < accum - 1 else nullcontext(), _autocast(dev, cfg):
                if clf is None:
                    x, y = lm_batch(seqs, tok.pad_id)
                    loss = fwd(x.to(dev), targets=y.to(dev))[1]
                else:
                    x, mask = cls_batch(seqs, tok.pad_id)
                    loss = _cls_loss(fwd(x.to(dev), mask.to(dev)), torch.tensor([r["label"] for r in rs], device=dev))
                # HF Trainer: each micro-batch's mean loss / the accumulation steps
                (loss / accum).backward()
            loss_sum += loss.detach().float() / accum
        torch.nn.utils.clip_grad_norm_(trainable, cfg["grad_clip"])
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        it += 1

        if it % cfg["log_interval"] == 0 or it == total:
            stop_if_diverged(loss_sum)
            if ddp:
                torch.distributed.all_reduce(loss_sum)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            n, dt = it - it_log, time.time() - t_log
            mem = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else \
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak RSS (KiB on Linux)
            rec = dict(iter=it, loss=loss_sum.item() / n / world, lr=lr, ms=1000 * dt / n, tok_s=tokens * world / dt,
                       mfu=flops / dt / peak if peak else None, mem_gb=mem / 1e9, eta_s=dt / n * (total - it))
            tps = f"{rec['tok_s'] / 1e3:.1f}k" if rec["tok_s"] >= 1e3 else f"{rec['tok_s']:.0f}"
            mfu = "-" if peak is None else f"{100 * rec['mfu']:.1f}%"
            log(f"iter {it}: loss {rec['loss']:.4f}, lr {lr:.1e}, {rec['ms']:.0f} ms, {tps} tok/s, mfu {mfu}, "
                f"mem {rec['mem_gb']:.1f} GB, eta {_hms(rec['eta_s'])}")
            if master:
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
            loss_sum.zero_()
            t_log, it_log, tokens, flops = time.time(), it, 0, 0.0
        if (cfg["eval_interval"] and it % cfg["eval_interval"] == 0) or it in (total, cfg["stop_iter"]):
            stop_if_diverged(loss_sum)
            checkpoint()
            t_log = time.time()  # validation time is not training time

    result = dict(iter=it, best_val=best_val)
    if it == total and clf is None and cfg["fsdp"]:  # the eval wants whole models: one per rank, batches sharded
        log(f"fsdp: evaluate with `torchrun ... train.py --eval_only=True --out_dir={out_dir}` (no --fsdp)")
    elif it == total and clf is None:  # finished: the benchmark, on the merged model
        merge_lora(model)
        result["eval"] = evaluate(model.eval(), tok, cfg, data_dir, out_dir, rank, world, log)
    if logf:
        logf.close()
    return result


def _eval_only(cfg, model, tok, clf, data_dir, out_dir, rank, world, log):
    """--eval_only: the adapter (and head) in out_dir if there is one, else the base model."""
    if (out_dir / "adapter_config.json").is_file():
        load_adapter(model, out_dir)
        log(f"eval: adapter from {out_dir}")
    else:
        log(f"eval: no adapter in {out_dir}: evaluating {cfg['init_from']} as it is")
    if clf is None:
        return evaluate(merge_lora(model).eval(), tok, cfg, data_dir, out_dir, rank, world, log)
    if not (out_dir / "head.safetensors").is_file():
        raise FileNotFoundError(f"{out_dir / 'head.safetensors'}: no trained classifier head to evaluate")
    clf.head.load_state_dict(load_file(out_dir / "head.safetensors"))
    return evaluate_glue(clf, tok, cfg, load_data(cfg, data_dir, log)[1], out_dir, rank, world)[1]


def main(argv=None):
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    try:
        train(cfg)
    except TrainingDiverged as e:
        print(f"train.py: {e}", file=sys.stderr)
        sys.exit(1)
    except (ValueError, FileNotFoundError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
