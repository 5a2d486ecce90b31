"""
What the network computes: the LLaMA family (ModelArgs, presets, the Transformer with its KV cache), hand-written
LoRA, the GLUE classifier (a linear head on the last token and its loss), its precision (bf16 where the hardware
has it, autocast) and training FLOPs (and the peaks MFU is measured against). Weights get in and out through
weights.py; generation (greedy, sampling, beam search) is sample.py's.

References:
1) Touvron et al., LLaMA (arXiv 2302.13971), Llama 2 (2307.09288); Llama 3 herd (2407.21783). Meta's reference
   code (meta-llama/llama, llama3: model.py) is what the forward pass matches, module names included.
2) Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685; PEFT's LoraLayer for the
   default init.
3) karpathy/nanoGPT and pytorch-labs/gpt-fast for the shape of the file.

Notation: W = W_pt + A Bᵀ, A: (out, r), B: (in, r), y = x Wᵀ + (α/r) x B Aᵀ. PEFT: lora_B = A, lora_A = Bᵀ.
"""
import contextlib
import math
from dataclasses import dataclass
from typing import Optional

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
        # GQA: query head j reads kv head j // (n_heads / n_kv_heads); SDPA's enable_gqa does it without copies
        # (CPU: every path; CUDA: flash, not the mem-efficient kernel a mask needs, so copies there as
        # transformers' use_gqa_in_sdpa does rather than fall back to the math kernel)
        if mask is not None and q.is_cuda and (n_rep := self.n_heads // self.n_kv_heads) > 1:
            k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
        # y = softmax(q kᵀ / √hd + mask) v; on CPU in float32 (its bf16 SDPA is 3× slower: cpu-step-profile.md)
        cpu = x.device.type == "cpu"
        with torch.autocast("cpu", enabled=False) if cpu else contextlib.nullcontext():
            qkv = (_up(q), _up(k), _up(v)) if cpu else (q, k, v)
            y = F.scaled_dot_product_attention(*qkv, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        y = y.to(q.dtype)
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

    def lora_scale(self):
        """α/r of the LoRA layers (add_lora gives them all the same)."""
        return next(m.scale for m in self.modules() if isinstance(m, LoRALinear))

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
        self.r, self.alpha = r, alpha
        self.dropout = nn.Dropout(dropout)

    @property
    def scale(self):  # LoRA's α/r
        return self.alpha / self.r

    def forward(self, x):
        # y = x Wᵀ + (α/r)·drop(x) B Aᵀ, never forming A Bᵀ
        y, d = F.linear(x, self.weight), self.dropout(x)
        d = d if torch.is_autocast_enabled(d.device.type) else d.to(self.A.dtype)  # autocast: bf16, no upcast
        return y + ((d @ self.B) @ self.A.T * self.scale).to(y.dtype)

    def extra_repr(self):
        return f"in={self.B.shape[0]}, out={self.A.shape[0]}, r={self.r}, alpha={self.alpha}"


_ATTN, _FFN = ("wq", "wk", "wv", "wo"), ("w1", "w2", "w3")
TARGETS = _ATTN + _FFN  # the linear layers of a block that can carry LoRA


def add_lora(model, r, alpha, dropout=0.0, targets=("wq", "wk", "wv", "w3", "w2")):
    """Wrap the targets of every block in LoRALinear (default: the paper's q, k, v, up, down); freeze the rest."""
    if bad := sorted(set(targets) - set(TARGETS)):
        raise ValueError(f"unknown LoRA targets {bad} (choose from {TARGETS})")
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


def compile_blocks(model, dynamic=None):
    """torch.compile each transformer block in place (nn.Module.compile; parameters and state_dict keys unchanged)
    instead of the whole model: the blocks share one graph (two: the first block's input needs no gradient), so
    compiling takes about as long as for one block. Embeddings, the final norm, the output and the loss run eager.
    Before FSDP2 shards the blocks (torchtitan's order). -> model."""
    for layer in model.layers:
        layer.compile(dynamic=dynamic)
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
# The GLUE classifier, the compute precision, and the training FLOPs of a LoRA model


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


def cls_loss(logits, labels):
    # one output and MSE for STS-B, cross-entropy otherwise
    if logits.shape[-1] == 1:
        return F.mse_loss(logits[:, 0], labels.float())
    return F.cross_entropy(logits, labels.long())


def compute_dtype(name, dev):
    """--dtype: auto = bf16 on CUDA and on CPUs with bf16 instructions (elsewhere bf16 matmuls are emulated, slow)."""
    if name == "auto":
        cpu_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        bf16 = torch.cuda.is_bf16_supported() if dev.type == "cuda" else dev.type == "cpu" and cpu_bf16
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, name)


def autocast(model):
    """bf16 autocast when the frozen base is bf16 (CUDA and CPU): matmuls in bf16, LoRA factors and loss float32."""
    p = next(model.parameters())
    bf16 = p.dtype == torch.bfloat16
    return torch.autocast(p.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12,
              "4090": 165e12, "3090": 71e12, "V100": 125e12}  # dense bf16 (fp16 for V100), by device name


def peak_flops(device):
    """The dense bf16 peak FLOP/s of a known GPU (PEAK_FLOPS), else None (a CPU: no MFU)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


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
