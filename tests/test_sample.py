"""Tests of sample.py and model.sample_next: greedy == model.generate, seeded sampling, top_k=1 == greedy, top_p,
the ChatML / LLaMA-3 formats, and one-line CLI errors. Tiny random model on the CPU; the real SmolLM2 check skips
when the model is not cached."""
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import model as M  # noqa: E402
import sample as S  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

torch.set_num_threads(1)
PROMPT = [256, 72, 105, 33, 32]  # bos "Hi! "


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = M.Transformer(M.ModelArgs.from_name("tiny"))
    with torch.no_grad():
        for p in m.parameters():  # peaked logits: different seeds give visibly different samples
            p.mul_(8)
    return m, load_tokenizer("bytes")


def cfg(**kw):
    return {**S.DEFAULTS, "max_new_tokens": 12, **kw}


def test_greedy_deterministic_equals_generate_and_streams(tiny):
    m, tok = tiny
    out = io.StringIO()
    a = S.complete(m, tok, PROMPT, cfg(), out=out)
    assert a == S.complete(m, tok, PROMPT, cfg()) == M.generate(m, [PROMPT], 12, tok.eos_id, tok.pad_id)[0]
    assert len(a) > 0 and out.getvalue() == tok.decode(a)  # what was streamed is the whole answer


def test_sampling_seeded_and_top_k_1_is_greedy(tiny):
    m, tok = tiny
    s1 = S.complete(m, tok, PROMPT, cfg(temperature=1.0, seed=1))
    assert s1 == S.complete(m, tok, PROMPT, cfg(temperature=1.0, seed=1))
    assert s1 != S.complete(m, tok, PROMPT, cfg(temperature=1.0, seed=2))
    greedy = S.complete(m, tok, PROMPT, cfg())
    assert s1 != greedy
    for seed in (1, 2):
        assert S.complete(m, tok, PROMPT, cfg(temperature=1.0, top_k=1, seed=seed)) == greedy


def test_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    seen = set(M.sample_next(logits, top_p=0.7, generator=g).tolist())
    assert seen == {0, 1}  # 0.5 < 0.7 needs the second token; 0.8 >= 0.7 stops there
    assert set(M.sample_next(logits, top_p=0.5, generator=g).tolist()) == {0}
    assert set(M.sample_next(logits, generator=g).tolist()) == {0, 1, 2, 3}


def test_chat_formats():
    tpl = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are SmolLM<|im_end|>\n' }}{% endif %}"
           "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}")
    assert S.family(tpl) == "chatml" and S.family("{{ '<|start_header_id|>' }}") == "llama3"
    assert S.family("{{ messages }}") is None
    assert S.format_chat("chatml", "Hi?") == ("<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n", False)
    assert S.format_chat("chatml", "Hi?", tpl)[0] == \
        "<|im_start|>system\nYou are SmolLM<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    assert S.format_chat("llama3", "Hi?") == ("<|start_header_id|>user<|end_header_id|>\n\nHi?<|eot_id|>"
                                              "<|start_header_id|>assistant<|end_header_id|>\n\n", True)


@pytest.mark.parametrize("args", [("--num_beams=x",), ("prompt",), ("--template=jinja",), ("--top_p=0",),
                                  ("--init_from=tiny", "--out_dir=/nonexistent/out")])
def test_bad_flags_exit_2_one_line(args, capsys):
    with pytest.raises(SystemExit) as e:
        S.main(list(args))
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("sample.py: error: ")
    assert args[-1].split("=")[0] in err


def test_cli_bad_flag_and_tiny_run():
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "sample.py"), *a], capture_output=True,  # noqa: E731
                                    text=True, timeout=120, cwd=ROOT)
    r = run("--bogus=1")
    assert r.returncode == 2 and r.stdout == "" and r.stderr.strip().splitlines() == \
        [f"sample.py: error: --bogus=1: expected --name=value with name one of {', '.join(S.DEFAULTS)}"]
    r = run("--init_from=tiny", "--prompt=Hi", "--max_new_tokens=4", "--num_beams=2")
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_smollm2_says_paris(capsys):
    cache = Path(os.environ.get("REFLORA_CACHE", "~/.cache/reflora")).expanduser() / "smollm2-135m"
    if not (cache / "tokenizer_config.json").exists():
        pytest.skip(f"smollm2-135m not cached with its chat template in {cache}")
    S.main(["--prompt=What is the capital of France?", "--max_new_tokens=8"])
    assert "Paris" in capsys.readouterr().out
