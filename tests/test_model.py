"""Tests of model.py: presets and params.json, RoPE scaling, the forward (loss masking, padding, KV cache, GQA),
and LoRA (zero start, trainables, activation checkpointing, the formula and merge). CPU, tiny, float64 where
exactness is the point."""
import math

import pytest
import torch
import torch.nn.functional as F

import model as M
from helpers import logits, rand_model, small_args

F64 = torch.float64


TOKENS = torch.tensor([[1, 5, 9, 2, 33, 7, 60, 3], [4, 4, 8, 15, 16, 23, 42, 0]])


# -----------------------------------------------------------------------------
# Config and layouts


def test_presets_and_params_json():
    # FFN widths and head dims of the released models (facts, not outputs of this code)
    for name, hidden, kv in [("llama-7b", 11008, 32), ("llama2-7b", 11008, 32), ("llama3-8b", 14336, 8),
                             ("llama3.1-8b", 14336, 8), ("smollm2-135m", 1536, 3)]:
        a = M.ModelArgs.from_name(name)
        assert (a.hidden_dim, a.n_kv_heads) == (hidden, kv)
    assert M.ModelArgs.from_name("tiny").vocab_size >= 259
    # LLaMA-2-7B's params.json as Meta ships it loads as-is
    a = M.ModelArgs(**{"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
                       "vocab_size": -1})
    assert a.hidden_dim == 11008 and a.head_dim == 128
    with pytest.raises(ValueError, match="unknown model preset 'llama-70b'"):
        M.ModelArgs.from_name("llama-70b")


def test_scaled_rope_matches_meta_loop():
    a = small_args(dim=64, n_heads=1, rope_theta=500000.0, use_scaled_rope=True, max_seq_len=4)
    freqs = 1.0 / (a.rope_theta ** (torch.arange(0, 64, 2)[:32].float() / 64))
    new = []  # Meta's llama3 apply_scaling, as a loop
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:
            new.append(f)
        elif wavelen > 8192 / 1:
            new.append(f / 8)
        else:
            s = (8192 / wavelen - 1) / (4 - 1)
            new.append((1 - s) * f / 8 + s * f)
    ang = torch.outer(torch.arange(4).float(), torch.stack(new))
    got = M.rope_tables(a)
    torch.testing.assert_close(got, torch.stack((ang.cos(), ang.sin()), -1), rtol=0, atol=0)
    assert not torch.equal(got, M.rope_tables(small_args(dim=64, n_heads=1, rope_theta=500000.0, max_seq_len=4)))


# -----------------------------------------------------------------------------
# Forward: loss, padding, KV cache


def test_loss_ignores_masked_labels():
    m = rand_model()
    targets = TOKENS.roll(-1, 1)
    targets[:, :3] = -100
    lg, loss = m(TOKENS, targets)
    manual = torch.stack([-lg[b, t].log_softmax(-1)[targets[b, t]] for b in range(2) for t in range(3, 8)]).mean()
    torch.testing.assert_close(loss, manual)
    h, none = m(TOKENS, return_hidden=True)
    assert none is None and h.shape == (2, 8, 32)
    torch.testing.assert_close(m.output(h), lg)


def test_left_padding_equals_unpadded():
    m = rand_model()
    short = TOKENS[:1, 3:]  # 5 real tokens, padded on the left to 8
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    out = m(torch.cat([padded, TOKENS[1:]]), attn_mask=torch.cat([mask, torch.ones(1, 8, dtype=torch.long)]))[0]
    assert torch.isfinite(out).all()  # padding rows too
    torch.testing.assert_close(out[0, 3:], logits(m, short)[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[1], logits(m, TOKENS[1:])[0], rtol=0, atol=1e-12)
    # without the mask the padding changes the answer (the test can fail)
    assert (logits(m, padded)[0, 3:] - logits(m, short)[0]).abs().max() > 1e-3


def test_kv_cache_equals_recompute():
    m = rand_model()
    full = logits(m, TOKENS)
    m.setup_cache(2, 8)
    with torch.no_grad():
        parts = [m(TOKENS[:, :3])[0]] + [m(TOKENS[:, t:t + 1], start_pos=t)[0] for t in range(3, 8)]
    m.clear_cache()
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-12)


def test_gqa_equals_repeated_kv_heads(monkeypatch):
    """SDPA's enable_gqa == the explicit copies (query head j reads kv head j // n_rep): prefill with and without
    a padding mask, and cached decode."""
    m = rand_model(small_args(n_heads=8, n_kv_heads=2))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])

    def run():
        m.setup_cache(2, 8)
        with torch.no_grad():
            cached = [m(TOKENS[:, :3])[0]] + [m(TOKENS[:, t:t + 1], start_pos=t)[0] for t in range(3, 8)]
            padded = m(TOKENS, attn_mask=mask)[0]
        m.clear_cache()
        return torch.cat(cached, 1), padded

    ours, sdpa, seen = run(), F.scaled_dot_product_attention, []

    def repeated(q, k, v, enable_gqa=False, **kw):
        seen.append(k.shape[1])
        n_rep = q.shape[1] // k.shape[1]
        return sdpa(q, k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1), **kw)

    monkeypatch.setattr(M.F, "scaled_dot_product_attention", repeated)
    ref = run()
    assert set(seen) == {2}  # the model passed 2 kv heads, not copies
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# -----------------------------------------------------------------------------
# LoRA


def test_lora_init_zero_start_and_trainables():
    m = rand_model()
    base = logits(m, TOKENS)
    M.add_lora(m, r=4, alpha=8)
    torch.testing.assert_close(logits(m, TOKENS), base, rtol=0, atol=0)  # A = 0
    pairs = m.lora_pairs()
    assert len(pairs) == 2 * 5
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in m.named_parameters() if n[-2:] in (".A", ".B")}
    assert "layers.0.attention.wq.weight" in m.state_dict() and "layers.0.attention.wq.A" in m.state_dict()
    assert set(M.lora_state_dict(m)) == {k for k in m.state_dict() if k[-2:] in (".A", ".B")}
    assert not isinstance(m.layers[0].attention.wo, M.LoRALinear)
    # B ~ U(±1/√in), PEFT's kaiming_uniform_(a=√5) on lora_A (r, in)
    torch.manual_seed(0)
    big = M.LoRALinear(torch.zeros(8, 1000), r=64, alpha=1)
    bound = 1 / math.sqrt(1000)
    assert big.B.abs().max() <= bound and abs(big.B.std().item() - bound / math.sqrt(3)) < 0.02 * bound
    assert big.A.abs().max() == 0
    # LoRA stays float32 on a bf16 base; gradients reach only A and B
    mb = M.add_lora(rand_model(dtype=torch.bfloat16), r=2, alpha=4)
    assert {p.dtype for p in mb.parameters() if p.requires_grad} == {torch.float32}
    with torch.no_grad():
        for A, _ in mb.lora_pairs():
            A.normal_()
    mb(TOKENS, TOKENS)[1].backward()
    assert all(A.grad is not None and B.grad is not None for A, B in mb.lora_pairs())
    assert all(p.grad is None for p in mb.parameters() if not p.requires_grad)
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        M.add_lora(rand_model(), 2, 4, targets=("wqkv",))


def test_grad_checkpoint_same_loss_and_grads():
    # recomputation in backward, dropout included (its RNG state is replayed): identical loss and LoRA gradients
    res = []
    for ckpt in (False, True):
        m = M.add_lora(rand_model(), r=3, alpha=6, dropout=0.3)
        with torch.no_grad():
            for A, _ in m.lora_pairs():
                A.normal_()
        m.grad_checkpoint = ckpt
        torch.manual_seed(5)
        loss = m(TOKENS, TOKENS)[1]
        loss.backward()
        res.append((loss, [p.grad for ab in m.lora_pairs() for p in ab]))
    assert torch.equal(res[0][0], res[1][0])
    assert all(torch.equal(a, b) for a, b in zip(res[0][1], res[1][1]))
    assert any(g.abs().max() > 0 for g in res[0][1])


def test_lora_formula_and_merge():
    m = M.add_lora(rand_model(), r=3, alpha=6, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    with torch.no_grad():
        for A, B in m.lora_pairs():
            A.normal_()
    lin, x = m.layers[1].feed_forward.w2, torch.randn(5, m.args.hidden_dim, dtype=F64)
    torch.testing.assert_close(lin(x), x @ (lin.weight + 2.0 * lin.A @ lin.B.T).T)  # W + (α/r) A Bᵀ
    unmerged = logits(m, TOKENS)
    assert (unmerged - logits(rand_model(), TOKENS)).abs().max() > 1e-3
    M.merge_lora(m)
    assert m.lora_pairs() == [] and "layers.0.attention.wq.A" not in m.state_dict()
    torch.testing.assert_close(logits(m, TOKENS), unmerged, rtol=0, atol=1e-10)
