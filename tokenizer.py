"""
Tokenizers behind one small interface: encode(text, bos, eos) -> ids, decode(ids) -> str.

- sentencepiece `tokenizer.model` (LLaMA-1/2, Mistral);
- LLaMA-3 `tokenizer.model` (tiktoken ranks), special tokens and split pattern exactly as in
  Meta's llama3/llama/tokenizer.py (also the shape of gpt-fast's tokenizer.py);
- Hugging Face byte-level BPE `tokenizer.json` (SmolLM2, GPT-2 style), run on tiktoken. Strings in its vocab
  are bytes spelled with GPT-2's bytes_to_unicode table (openai/gpt-2 src/encoder.py);
- "bytes": ids 0..255 are raw bytes, 256 bos, 257 eos, 258 pad (tests and the tiny preset).
tokenizer_json_from_gguf rebuilds an HF tokenizer.json dict from GGUF metadata (llama.cpp's gguf keys).
"""
import base64
import json
from pathlib import Path

import sentencepiece
import tiktoken
from tiktoken.load import load_tiktoken_bpe

# Meta llama3: 10 named specials then reserved ones, 256 in all, ids 128000..128255
LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>",
    "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>",  # end of turn
] + [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)]
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# GPT-2's regex, as HF's ByteLevel pre-tokenizer uses it
GPT2_PAT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# HF Sequence[Digits(individual_digits), ByteLevel] as ONE regex: each digit alone, GPT-2 on the text between.
# A whitespace run right before a digit ends its segment, so it stays whole (GPT-2 alone would give
# " 1" or leave one space for the next word); \s+(?=\p{N}) must come before \s+(?!\S).
SMOL_PAT = r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"


def bytes_to_unicode():
    """GPT-2's table: byte -> printable unicode char (printable bytes map to themselves)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    rest = [b for b in range(256) if b not in bs]  # control bytes and space -> chr(256 + k)
    return dict(zip(bs + rest, map(chr, bs + [256 + k for k in range(len(rest))])))


class Tokenizer:
    """encode/decode functions plus the special ids; pad falls back to eos when the format has none."""

    def __init__(self, encode, decode, n_words, bos_id, eos_id, pad_id=None):
        self._encode, self._decode = encode, decode
        self.n_words, self.bos_id, self.eos_id = n_words, bos_id, eos_id
        self.pad_id = eos_id if pad_id is None or pad_id < 0 else pad_id

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + self._encode(text) + [self.eos_id] * eos

    def decode(self, ids):
        return self._decode([int(i) for i in ids])

# -----------------------------------------------------------------------------
# tokenizer.model: sentencepiece (LLaMA-1/2) or tiktoken ranks (LLaMA-3)


def _sentencepiece(path):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    return Tokenizer(sp.encode, sp.decode, sp.vocab_size(), sp.bos_id(), sp.eos_id(), sp.pad_id())


def _llama3(path):
    ranks = load_tiktoken_bpe(str(path))
    specials = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIALS)}
    enc = tiktoken.Encoding(path.name, pat_str=LLAMA3_PAT, mergeable_ranks=ranks, special_tokens=specials)
    # special tokens written in the text are recognised (as HF does; Meta's default encodes them as plain text)
    return Tokenizer(lambda s: enc.encode(s, allowed_special="all"), enc.decode, enc.n_vocab,
                     specials["<|begin_of_text|>"], specials["<|end_of_text|>"])

# -----------------------------------------------------------------------------
# Hugging Face byte-level BPE (tokenizer.json) on tiktoken


def _pat_str(pre):
    """The tiktoken regex that splits text as the tokenizer.json pre_tokenizer does (supported shapes only)."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [p.get("type") for p in steps]
    bl = steps[-1] if kinds and kinds[-1] == "ByteLevel" else {}
    if not bl or bl.get("add_prefix_space"):
        raise ValueError(f"unsupported pre_tokenizer {kinds} (need ByteLevel without add_prefix_space)")
    if kinds == ["ByteLevel"] and bl.get("use_regex", True):
        return GPT2_PAT
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and bl.get("use_regex", True):
        return SMOL_PAT
    if kinds == ["Split", "ByteLevel"] and steps[0].get("behavior") == "Isolated" and not bl.get("use_regex", True):
        return steps[0]["pattern"]["Regex"]
    raise ValueError(f"unsupported pre_tokenizer {kinds}")


def _hf_bpe(tj, name, bos, eos, pad):
    model = tj["model"]
    if model.get("type") != "BPE" or tj.get("normalizer") or model.get("byte_fallback"):
        raise ValueError("only byte-level BPE without normalizer is supported")
    vocab, added = model["vocab"], {a["content"]: a["id"] for a in tj.get("added_tokens", [])}
    u2b = {u: b for b, u in bytes_to_unicode().items()}
    tok_bytes = lambda s: bytes(u2b[c] for c in s)
    merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]
    # HF applies merges by list position, tiktoken by the rank of the merged token: so rank = when the token
    # is first made (single bytes first, then merge i), and tiktoken's ranks map back to vocab ids via `ids`.
    # Same result as HF when each token has one merge whose parts came earlier (as BPE training makes them;
    # true for SmolLM2, whose ids are already in merge order: merge i makes id 252 + i) and every token
    # encodes to itself (tiktoken takes a piece found in the vocab whole, like HF's ignore_merges).
    ranks, ids = {}, []
    for s in [s for s in vocab if len(s) == 1 and s in u2b] + [a + b for a, b in merges]:
        if tok_bytes(s) not in ranks:
            ranks[tok_bytes(s)] = len(ranks)
            ids.append(vocab[s])
    # bytes missing from the vocab (SmolLM2 lacks 21, e.g. \x04): HF drops them or maps them to unk;
    # tiktoken needs a rank for each, so they get one mapped to -1 (dropped) or unk
    for b in range(256):
        if bytes([b]) not in ranks:
            ranks[bytes([b])] = len(ranks)
            ids.append(vocab.get(model.get("unk_token"), -1))
    # added tokens (chat markers etc.) are matched in the text before pre-tokenization, as in HF
    specials = {t: len(ids) + k for k, t in enumerate(added)}
    ids += list(added.values())
    enc = tiktoken.Encoding(name, pat_str=_pat_str(tj.get("pre_tokenizer")), mergeable_ranks=ranks,
                            special_tokens=specials)
    table = {i: tok_bytes(s) for s, i in vocab.items() if s not in added} | {i: t.encode() for t, i in added.items()}
    find = lambda t: t if isinstance(t, int) or t is None else {**vocab, **added}[t]  # a token string -> id
    return Tokenizer(
        lambda s: [i for i in map(ids.__getitem__, enc.encode(s, allowed_special="all")) if i >= 0],
        lambda ids_: b"".join(table[i] for i in ids_).decode("utf-8", errors="replace"),
        max(table) + 1, find(bos), find(eos), find(pad))


def _special_tokens(folder):
    """bos/eos/pad from tokenizer_config.json (token strings) or config.json (ids) beside tokenizer.json."""
    out = dict.fromkeys(("bos", "eos", "pad"))
    for fname, key in (("tokenizer_config.json", "{}_token"), ("config.json", "{}_token_id")):
        cfg = json.loads((folder / fname).read_text()) if (folder / fname).is_file() else {}
        for k, v in out.items():
            v = cfg.get(key.format(k)) if v is None else v
            out[k] = v.get("content") if isinstance(v, dict) else v[0] if isinstance(v, list) else v
    return out.values()

# -----------------------------------------------------------------------------
# entry points


def _is_tiktoken(path):
    """tiktoken ranks are "base64 rank" text lines; sentencepiece is a binary protobuf."""
    with open(path, "rb") as f:
        first = f.readline().split()
    try:
        return len(first) == 2 and first[1].isdigit() and len(base64.b64decode(first[0], validate=True)) > 0
    except ValueError:
        return False


def load_tokenizer(path):
    """"bytes", a tokenizer.model / tokenizer.json / .gguf file, or a checkpoint folder holding one."""
    if str(path) == "bytes":  # ids 0..255 = utf-8 bytes, then bos, eos, pad
        dec = lambda ids: bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return Tokenizer(lambda s: list(s.encode("utf-8")), dec, 259, 256, 257, 258)
    path = Path(path)
    if path.is_dir():
        found = [path / f for f in ("tokenizer.json", "tokenizer.model") if (path / f).is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model in this folder")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tokenizer file not found")
    try:
        if path.suffix not in (".json", ".gguf"):
            return _llama3(path) if _is_tiktoken(path) else _sentencepiece(path)
        if path.suffix == ".gguf":  # bos/eos/pad ids from the GGUF metadata
            tj, (bos, eos, pad) = _from_gguf(path)
        else:
            tj, (bos, eos, pad) = json.loads(path.read_text()), _special_tokens(path.parent)
        if bos is None or eos is None:
            raise ValueError("no bos/eos ids (tokenizer.json needs tokenizer_config.json or config.json beside it)")
        return _hf_bpe(tj, path.name, bos, eos, pad)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError, OSError) as e:
        raise ValueError(f"{path}: not a usable tokenizer ({type(e).__name__}: {e})") from None


def tokenizer_json_from_gguf(path):
    """HF tokenizer.json dict (BPE vocab, merges, pre_tokenizer, added tokens) from a GGUF file's metadata."""
    try:
        return _from_gguf(Path(path))[0]
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ValueError(f"{path}: cannot rebuild tokenizer.json from GGUF ({e})") from None


def _from_gguf(path):
    import gguf  # only needed here; the reader parses the whole file header (a few seconds)
    fields = gguf.GGUFReader(str(path)).fields
    get = lambda k: fields[f"tokenizer.ggml.{k}"].contents() if f"tokenizer.ggml.{k}" in fields else None
    model, pre, tokens, types, merges = map(get, ("model", "pre", "tokens", "token_type", "merges"))
    if model != "gpt2" or None in (tokens, types, merges):
        raise ValueError(f"tokenizer.ggml.model {model!r}: need byte-level BPE (gpt2) with tokens, types, merges")
    digits = {"type": "Digits", "individual_digits": True}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    # llama.cpp pre types -> HF pre_tokenizer; "smollm" = regexes ["\p{N}", GPT-2's] = Digits + ByteLevel
    pretok = {"smollm": {"type": "Sequence", "pretokenizers": [digits, byte_level]}, "gpt-2": byte_level}
    if pre not in pretok:
        raise ValueError(f"tokenizer.ggml.pre {pre!r} not supported (known: {sorted(pretok)})")
    # token_type 3 = control (HF special added token), 4 = user defined (HF non-special added token)
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": ty == 4, "special": ty == 3}
             for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)]
    tj = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": pretok[pre],
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }
    return tj, [get(f"{k}_token_id") for k in ("bos", "eos", "padding")]
