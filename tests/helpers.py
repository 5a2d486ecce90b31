"""What several test files share: the repo root, the flags of a tiny training run, and synthetic data in the real
layouts (short texts: the tiny preset's max_seq_len is 256 and a byte is a token). Imported as `helpers` (pytest
puts tests/ on the path; pyproject.toml puts the repo root there too); conftest.py wraps them in fixtures."""
import json
import random
from pathlib import Path

import torch
from safetensors.torch import save_file

import model as M
from runstate import read_state

ROOT = Path(__file__).resolve().parents[1]

# a small, fast run of train.py on the random-init tiny preset (float32: the numerics the tests pin)
TINY = dict(init_from="tiny", dtype="float32", lora_r=4, lora_alpha=8, batch_size=8, micro_batch_size=4, max_iters=4,
            cutoff_len=200, warmup_steps=1, reflora_warmup=1, log_interval=1, eval_interval=0, eval_limit=3,
            eval_batch_size=3, max_new_tokens=6, val_set_size=8, lr=1e-2)


def argv(**kw):
    """--name=value flags (a value None: left out)."""
    return [f"--{k}={v}" for k, v in kw.items() if v is not None]


def flags(**kw):
    """argv() of TINY updated by kw."""
    return argv(**{**TINY, **kw})


def tiny_args(root, **kw):
    """flags() of a commonsense run on synthetic data written under root/data, out_dir root/out."""
    return flags(data_dir=write_commonsense(Path(root) / "data"), out_dir=Path(root) / "out", **kw)


def state(out_dir):
    """out_dir/state.pt as runstate reads it (the config with the optimizer's own settings back in)."""
    return read_state(Path(out_dir) / "state.pt")


def records(n, seed=0):
    """n commonsense records "a+b even?", answer true or false."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        ans = ("true", "false")[(a + b) % 2]
        out.append(dict(instruction=f"{a}+{b} even?", input="", output=ans, answer=ans))
    return out


def write_commonsense(root, n_train=48, n_test=5, seed=0):
    """data_dir/dataset/{boolq,piqa}/{train,test}.json."""
    rng = random.Random(seed)
    for name, answers in (("boolq", ("true", "false")), ("piqa", ("solution1", "solution2"))):
        for split, n in (("train", n_train), ("test", n_test)):
            recs = []
            for _ in range(n):
                a, b = rng.randint(0, 9), rng.randint(0, 9)
                ans = answers[(a + b) % 2]
                recs.append(dict(instruction=f"{a}+{b} even?", input="", output=ans, answer=ans))
            (root / "dataset" / name).mkdir(parents=True, exist_ok=True)
            (root / "dataset" / name / f"{split}.json").write_text(json.dumps(recs))
    return root


def write_glue(root, task, n_train=40, n_dev=12, seed=0):
    """data_dir/RTE or STS-B/{train,dev}.tsv."""
    rng = random.Random(seed)
    folder, header = {"rte": ("RTE", "index\tsentence1\tsentence2\tlabel"),
                      "stsb": ("STS-B", "index\tsentence1\tsentence2\tscore")}[task]
    (root / folder).mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = [header]
        for i in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            label = ("entailment", "not_entailment")[(a + b) % 2] if task == "rte" else f"{(a + b) / 3.6:.2f}"
            rows.append(f"{i}\tthe number {a}\tplus {b}\t{label}")
        (root / folder / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root


# -----------------------------------------------------------------------------
# tiny random models (float64 where exactness is the point)


def small_args(**kw):
    return M.ModelArgs(**{**dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16,
                                 max_seq_len=64), **kw})


def rand_model(args=None, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m = M.Transformer(args or small_args()).to(dtype)
    with torch.no_grad():
        for n, p in m.named_parameters():  # big enough weights that every layer matters
            p.copy_(1 + 0.1 * torch.randn_like(p) if n.endswith("norm.weight") else 0.3 * torch.randn_like(p))
    return m


# our Meta names -> transformers' names, written out here independently of model.KEYS


def logits(m, tokens):
    with torch.no_grad():
        return m(tokens)[0]


# -----------------------------------------------------------------------------
# checkpoints written the way transformers writes them (names and q/k rows independently of weights.py)


HF_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head",
            "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
            "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
            "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm"}


def hf_permute(w, n_heads):  # transformers' convert_llama_weights_to_hf.py, verbatim
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def to_hf(sd, args):
    out = {}
    for k, t in sd.items():
        mod = k[: -len(".weight")]
        if mod.startswith("layers."):
            _, i, rest = mod.split(".", 2)
            name = f"model.layers.{i}.{HF_NAMES[rest]}"
        else:
            name = HF_NAMES[mod]
        if k.endswith(("wq.weight", "wk.weight")):
            t = hf_permute(t, args.n_heads if "wq" in k else args.n_kv_heads)
        out[name + ".weight"] = t.contiguous()
    return out


def hf_config(args, tie=False):
    return dict(model_type="llama", hidden_size=args.dim, intermediate_size=args.hidden_dim,
                num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
                vocab_size=args.vocab_size, rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
                max_position_embeddings=args.max_seq_len, tie_word_embeddings=tie)


def write_hf(d, m, shards=1, fmt="safetensors", tie=False):
    d.mkdir(parents=True, exist_ok=True)
    sd = to_hf({k: v.clone() for k, v in m.state_dict().items()}, m.args)
    if tie:
        del sd["lm_head.weight"]
    (d / "config.json").write_text(json.dumps(hf_config(m.args, tie)))
    keys, weight_map = sorted(sd), {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else f"model.{fmt}"
        part = {k: sd[k] for k in keys[s::shards]}
        if fmt == "bin":
            name = "pytorch_model.bin"
            torch.save(part, d / name)
        else:
            save_file(part, d / name)
        weight_map.update({k: name for k in part})
    if shards > 1:
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d
