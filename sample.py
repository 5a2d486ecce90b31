"""
Generation, and talking to a model with it: batched greedy, sampling and beam search over the model's KV cache
(evaluate.py's protocol runs on these too); the CLI loads a base checkpoint (and the PEFT adapter train.py wrote,
if out_dir is given), formats the prompt with the tokenizer's chat template and prints the answer as it comes.

    python sample.py --prompt="What is the capital of France?"
    python sample.py --out_dir=out --template=commonsense --prompt=FILE:question.txt --num_beams=4
    python sample.py --temperature=0.8 --top_p=0.95 --seed=1

Greedy by default; --num_beams=N beam search (the best beam printed at the end); --temperature > 0 sampling with
top_k / top_p. Chat templates are recognised by family and formatted by hand (no jinja2): ChatML
(<|im_start|>role\\n...<|im_end|>, SmolLM2-Instruct) and LLaMA-3 headers.

References: karpathy/nanoGPT's sample.py (shape of the file, plain config values with --name=value overrides);
gpt-fast's generate.py (generation beside its CLI, apart from the model); transformers' BeamSearchScorer (beam
search semantics); Hugging Face chat templates (tokenizer_config.json "chat_template", GGUF "tokenizer.chat_template").
"""
import contextlib
import json
import math
import re
import sys
from pathlib import Path

import gguf
import torch

from data.commonsense.prepare import eval_prompt
from weights import CheckpointError, load_adapter, load_base

# -----------------------------------------------------------------------------
# defaults; --name=value overrides, cast by the default's type
init_from = "smollm2-135m"  # preset name (tiny, smollm2-135m), Meta/HF checkpoint directory, or .gguf file
out_dir = ""  # folder with train.py's adapter_config.json + adapter_model.safetensors; "" = the base model
tokenizer = ""  # "" = the checkpoint's own ("bytes" for the random-init tiny preset)
prompt = "What is the capital of France?"  # or FILE:path
template = "auto"  # auto (the tokenizer's chat template, if any) | chatml | llama3 | commonsense | none (raw text)
max_new_tokens = 64
num_beams = 1  # > 1: beam search
temperature = 0.0  # 0: greedy; > 0: sampling
top_k = 0  # sampling: keep the k most likely tokens (0 = all)
top_p = 1.0  # sampling: keep the nucleus of probability top_p
seed = 1337
device = "cpu"
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (str, int, float))}
TEMPLATES = ("auto", "chatml", "llama3", "commonsense", "none")
MAX_BEAMS = 64  # beam search keeps num_beams KV-cache rows per prompt; past this it is memory, not search


def _fail(msg):
    print(f"sample.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv):
    """--name=value flags over DEFAULTS, each cast to its default's type; anything else exits 2 with one line."""
    cfg = dict(DEFAULTS)
    for arg in argv:
        key, eq, value = arg[2:].partition("=")
        if not arg.startswith("--") or not eq or key not in cfg:
            _fail(f"{arg}: expected --name=value with name one of {', '.join(cfg)}")
        try:
            cfg[key] = type(cfg[key])(value)
        except ValueError:
            _fail(f"--{key}={value}: not a valid {type(cfg[key]).__name__}")
    if cfg["template"] not in TEMPLATES:
        _fail(f"--template={cfg['template']}: expected one of {', '.join(TEMPLATES)}")
    if cfg["num_beams"] < 1 or cfg["max_new_tokens"] < 1 or cfg["temperature"] < 0 or not 0 < cfg["top_p"] <= 1:
        _fail("need --num_beams >= 1, --max_new_tokens >= 1, --temperature >= 0 and 0 < --top_p <= 1")
    for k, ok, want in [("num_beams", cfg["num_beams"] <= MAX_BEAMS, f"at most {MAX_BEAMS} beams"),
                        ("temperature", math.isfinite(cfg["temperature"]), "a finite number >= 0 (0: greedy)"),
                        ("top_k", cfg["top_k"] >= 0, "a whole number >= 0 (0: all tokens)"),
                        ("seed", -2 ** 63 <= cfg["seed"] < 2 ** 63, "an integer in [-2**63, 2**63)"),
                        ("device", re.fullmatch(r"cpu|cuda(:\d+)?", cfg["device"]), "cpu, cuda or cuda:N")]:
        if not ok:
            _fail(f"--{k}={cfg[k]}: expected {want}")
    if cfg["device"].startswith("cuda") and not torch.cuda.is_available():
        _fail(f"--device={cfg['device']}: this torch ({torch.__version__}) sees no CUDA device")
    if cfg["device"].startswith("cuda:") and int(cfg["device"][5:]) >= torch.cuda.device_count():
        _fail(f"--device={cfg['device']}: only {torch.cuda.device_count()} CUDA device(s)")
    return cfg


# -----------------------------------------------------------------------------
# Generation: batched greedy, sampling and beam search with a KV cache


@torch.no_grad()
def generate(model, prompts, max_new_tokens, eos_id, pad_id, num_beams=1, temperature=0.0, top_k=0, top_p=1.0,
             generator=None, on_token=None):
    """New tokens of each prompt (cut before EOS): greedy (temperature 0), sampling, or HF-style beam search
    (length_penalty 1.0). on_token(row, token) is called as each kept token comes (not for beam search)."""
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
        if num_beams > 1:
            return _beam_search(model, logits, mask, L, max_new_tokens, eos_id, pad_id, num_beams)
        pick = (lambda lg: lg.argmax(-1)) if temperature == 0 else \
            (lambda lg: sample_next(lg, temperature, top_k, top_p, generator))
        return _decode(model, logits, mask, L, max_new_tokens, eos_id, pick, on_token)
    finally:
        model.clear_cache()
        model.train(training)


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """One token per row of logits (B, V), drawn from softmax(logits / temperature) restricted to the top_k most
    likely (0: all) and to the nucleus, the fewest most likely tokens whose probability reaches top_p (Holtzman
    et al., arXiv 1904.09751); a torch.Generator on the logits' device makes the draw reproducible."""
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        p, idx = logits.softmax(-1).sort(-1, descending=True)
        late = p.cumsum(-1) - p >= top_p  # mass before the token already reaches top_p (the first never is late)
        logits = logits.masked_fill(late.scatter(-1, idx, late), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def _step(model, tok, mask, L, t):  # logits after feeding new token t (one per row) through the cache
    return model(tok[:, None], attn_mask=mask[:, : L + t + 1], start_pos=L + t)[0][:, -1]


def _decode(model, logits, mask, L, max_new, eos_id, pick, on_token=None):
    """pick(logits) -> next token per row (argmax: greedy); a finished row keeps decoding (batched), tokens dropped."""
    out, done = [[] for _ in range(len(logits))], [False] * len(logits)
    for t in range(max_new):
        nxt = pick(logits)
        for b, tok in enumerate(nxt.tolist()):
            done[b] = done[b] or tok == eos_id
            if not done[b]:
                out[b].append(tok)
                if on_token:
                    on_token(b, tok)
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


# -----------------------------------------------------------------------------
# chat templates, by family


def chat_template(path):
    """The chat template string of a checkpoint folder (tokenizer_config.json) or .gguf file, or None."""
    p = Path(path)
    if p.is_dir() and (p / "tokenizer_config.json").is_file():
        try:
            tpl = json.loads((p / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise CheckpointError(f"{p / 'tokenizer_config.json'}: cannot read ({type(e).__name__})") from None
        return tpl.get("chat_template") if isinstance(tpl, dict) else None
    if p.suffix == ".gguf":
        field = gguf.GGUFReader(p).fields.get("tokenizer.chat_template")
        return field.contents() if field else None
    return None


def family(tpl):
    """chatml | llama3 | None, from the markers a Jinja chat template writes."""
    return "chatml" if "<|im_start|>" in tpl else "llama3" if "<|start_header_id|>" in tpl else None


def format_chat(kind, user, tpl=""):
    """(text, add_bos) of a one-turn conversation with the assistant's turn opened (add_generation_prompt).
    A ChatML template that opens with a default system turn (SmolLM2's) gets it, as Jinja would write it."""
    if kind == "chatml":
        system = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", tpl, re.S)
        head = f"<|im_start|>system\n{system[1]}<|im_end|>\n" if system else ""
        return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n", False
    if kind == "llama3":  # <|begin_of_text|> is the bos token
        return (f"<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n"), True
    raise ValueError(f"unknown chat template family {kind!r}")


def build_prompt(cfg, ckpt):
    """The prompt text as the model should see it, and whether to prepend bos."""
    text = cfg["prompt"]
    if text.startswith("FILE:"):
        try:
            text = Path(text[5:]).read_text(encoding="utf-8")
        except OSError as e:
            _fail(f"--prompt={cfg['prompt']}: {e.strerror}")
        except UnicodeDecodeError as e:
            _fail(f"--prompt={cfg['prompt']}: not UTF-8 text ({e.reason} at byte {e.start})")
    kind = cfg["template"]
    if kind == "commonsense":
        return eval_prompt(text), True
    tpl = chat_template(ckpt) if ckpt and kind in ("auto", "chatml") else ""
    if kind == "auto":
        kind = family(tpl) if tpl else "none"
        if kind is None:
            print("sample.py: unrecognised chat template: raw text", file=sys.stderr)
            kind = "none"
    return (text, True) if kind == "none" else format_chat(kind, text, tpl or "")


# -----------------------------------------------------------------------------


def complete(model, tok, ids, cfg, out=None):
    """New token ids after `ids`; with `out` (a text stream) the decoded text is written as it comes."""
    shown, new = "", []

    def on_token(_, t):  # print the new suffix once it decodes to whole characters
        nonlocal shown
        new.append(t)
        text = tok.decode(new)
        if not text.endswith("\ufffd"):
            out.write(text[len(shown):])
            out.flush()
            shown = text
    g = torch.Generator(model.tok_embeddings.weight.device).manual_seed(cfg["seed"])
    return generate(model, [ids], cfg["max_new_tokens"], tok.eos_id, tok.pad_id, num_beams=cfg["num_beams"],
                    temperature=cfg["temperature"], top_k=cfg["top_k"], top_p=cfg["top_p"], generator=g,
                    on_token=on_token if out else None)[0]


def main(argv=None):
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    if cfg["out_dir"] and not (Path(cfg["out_dir"]) / "adapter_config.json").is_file():
        _fail(f"--out_dir={cfg['out_dir']}: no adapter_config.json there")
    try:
        model, tok, ckpt = load_base(cfg["init_from"], cfg["tokenizer"], torch.float32, cfg["device"])
        if cfg["out_dir"]:
            with contextlib.redirect_stdout(sys.stderr):  # add_lora's summary line: stdout is for the answer
                load_adapter(model, cfg["out_dir"])
        text, bos = build_prompt(cfg, ckpt)
    except (CheckpointError, OSError, ValueError) as e:
        _fail(str(e))
    ids, n = tok.encode(text, bos=bos), model.args.max_seq_len
    if not ids or len(ids) + cfg["max_new_tokens"] > n:
        _fail(f"--prompt: {len(ids)} tokens + --max_new_tokens={cfg['max_new_tokens']} do not fit the model's "
              f"max_seq_len {n} ({cfg['init_from']})" if ids else "--prompt: empty (no token to start from)")
    if cfg["num_beams"] > 1:
        print(tok.decode(complete(model, tok, ids, cfg)))
    else:
        complete(model, tok, ids, cfg, out=sys.stdout)
        print()


if __name__ == "__main__":
    main()
