"""
Talk to a model: load a base checkpoint (and the PEFT adapter train.py wrote, if out_dir is given), format the
prompt with the tokenizer's chat template, and print the answer as it is generated.

    python sample.py --prompt="What is the capital of France?"
    python sample.py --out_dir=out --template=commonsense --prompt=FILE:question.txt --num_beams=4
    python sample.py --temperature=0.8 --top_p=0.95 --seed=1

Greedy by default; --num_beams=N beam search (the best beam printed at the end); --temperature > 0 sampling with
top_k / top_p. Chat templates are recognised by family and formatted by hand (no jinja2): ChatML
(<|im_start|>role\\n...<|im_end|>, SmolLM2-Instruct) and LLaMA-3 headers.

References: karpathy/nanoGPT's sample.py (shape of the file, plain config values with --name=value overrides);
Hugging Face chat templates (tokenizer_config.json "chat_template", GGUF "tokenizer.chat_template").
"""
import contextlib
import re
import sys
from pathlib import Path

import torch

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
    return cfg


# -----------------------------------------------------------------------------
# chat templates, by family


def chat_template(path):
    """The chat template string of a checkpoint folder (tokenizer_config.json) or .gguf file, or None."""
    import json
    p = Path(path)
    if p.is_dir() and (p / "tokenizer_config.json").is_file():
        return json.loads((p / "tokenizer_config.json").read_text()).get("chat_template")
    if p.suffix == ".gguf":
        import gguf
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
            text = Path(text[5:]).read_text()
        except OSError as e:
            _fail(f"--prompt={cfg['prompt']}: {e.strerror}")
    kind = cfg["template"]
    if kind == "commonsense":
        from data.commonsense.prepare import eval_prompt
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
    from model import generate
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
    from checkpoint import CheckpointError, load_adapter, load_model, resolve_checkpoint
    from tokenizer import load_tokenizer
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    if cfg["out_dir"] and not (Path(cfg["out_dir"]) / "adapter_config.json").is_file():
        _fail(f"--out_dir={cfg['out_dir']}: no adapter_config.json there")
    try:
        ckpt = resolve_checkpoint(cfg["init_from"])
        model = load_model(cfg["init_from"], dtype=torch.float32, device=cfg["device"])
        if cfg["out_dir"]:
            with contextlib.redirect_stdout(sys.stderr):  # add_lora's summary line: stdout is for the answer
                load_adapter(model, cfg["out_dir"])
        tok = load_tokenizer(cfg["tokenizer"] or ckpt or "bytes")
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    text, bos = build_prompt(cfg, ckpt)
    ids = tok.encode(text, bos=bos)
    if cfg["num_beams"] > 1:
        print(tok.decode(complete(model, tok, ids, cfg)))
    else:
        complete(model, tok, ids, cfg, out=sys.stdout)
        print()


if __name__ == "__main__":
    main()
