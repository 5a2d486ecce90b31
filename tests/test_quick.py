"""Tests of the quick-start path on the random-init `tiny` preset (seconds): --data_path with your own
instruction data (good and broken files), the base model beside the finetuned one in the final table, the
evaluation's progress lines, and the final line naming files that exist."""
import json
import re
from pathlib import Path

import pytest
import torch

import evaluate as E
import helpers
import train as T
from helpers import records
from tokenizer import load_tokenizer
from weights import load_model



def write_data_dir(root, n_test=5):
    for name in ("boolq", "ARC-Easy"):
        (root / "dataset" / name).mkdir(parents=True, exist_ok=True)
        recs = records(n_test, seed=len(name))
        if name == "ARC-Easy":
            recs = [dict(r, answer="answer1") for r in recs]
        (root / "dataset" / name / "test.json").write_text(json.dumps(recs))
    return root


def flags(tmp_path, **kw):
    return helpers.flags(**{**dict(out_dir=tmp_path / "out", batch_size=4, max_iters=2, cutoff_len=64, eval_limit=5,
                                   eval_batch_size=2, max_new_tokens=4, val_set_size=4), **kw})


# -----------------------------------------------------------------------------
# --data_path


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_data_path_trains_without_preparation(tmp_path, capsys, suffix):
    f = tmp_path / f"mine{suffix}"
    recs = [{k: v for k, v in r.items() if k != "answer"} for r in records(16)]
    recs[0].pop("input")  # optional, as in Alpaca files
    f.write_text(json.dumps(recs) if suffix == ".json" else "\n".join(map(json.dumps, recs)) + "\n\n")
    empty = tmp_path / "no-data"
    empty.mkdir()
    T.main(flags(tmp_path, data_path=f, data_dir=empty))
    out = capsys.readouterr().out
    assert f"data: {f} (16 records)" in out
    assert re.search(r"^iter 2: loss \d", out, re.M)  # two optimizer steps on the file's records
    assert f"eval: no test sets in {empty}: benchmark evaluation skipped" in out
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "out" / "eval.json").exists()


GOOD = '{"instruction": "a", "input": "", "output": "b"}'
BROKEN = {  # name: (file name, content, what the error line must contain besides the file)
    "not_json": ("d.json", "[" + GOOD + ",", "not valid JSON"),
    "not_a_list": ("d.json", GOOD, "expected a JSON list"),
    "not_an_object": ("d.json", f"[{GOOD}, 3]", "record 1: expected an object"),
    "no_output": ("d.json", f'[{GOOD}, {GOOD}, {{"instruction": "a"}}]', "record 2: key 'output' missing"),
    "no_instruction": ("d.jsonl", f'{GOOD}\n\n{{"output": "b"}}\n', "record 1 (line 3): key 'instruction' missing"),
    "jsonl_not_json": ("d.jsonl", f"{GOOD}\n{{oops\n", "record 1 (line 2): not valid JSON"),
    "non_string": ("d.json", f'[{GOOD}, {{"instruction": "a", "input": 5, "output": "b"}}]',
                   "record 1: key 'input' not a string (int)"),
    "empty": ("d.json", " \n", "empty file"),
    "empty_list": ("d.json", "[]", "no records"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_data_path_bad_file_is_one_line_exit_2(tmp_path, capsys, case):
    name, content, want = BROKEN[case]
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(SystemExit) as e:
        T.main(flags(tmp_path, data_path=f, data_dir=tmp_path))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"train.py: error: {f}: ") and want in err, err


# -----------------------------------------------------------------------------
# base vs finetuned, progress lines, the final line


def test_base_beside_finetuned_progress_and_final_line(tmp_path, capsys, monkeypatch):
    data = write_data_dir(tmp_path / "data")
    train_file = tmp_path / "train.json"
    train_file.write_text(json.dumps(records(16, seed=1)))
    x, seen, real = torch.randint(0, 256, (2, 16)), {}, E.evaluate

    def spy(model, *a, what="eval", **kw):  # the model the base row is measured on, as logits on x
        seen[what] = model(x)[0].detach()
        return real(model, *a, what=what, **kw)

    monkeypatch.setattr(E, "evaluate", spy)
    T.main(flags(tmp_path, data_path=train_file, data_dir=data))
    out = capsys.readouterr().out
    lines, o = out.splitlines(), tmp_path / "out"
    # a progress line per batch of 2 (5 examples: 3 batches per set), for the base model and the finetuned one
    for what in ("eval base", "eval"):
        for name in ("boolq", "ARC-Easy"):
            prog = [ln for ln in lines if ln.startswith(f"{what} {name}: ")]
            assert [ln.split()[len(what.split()) + 1] for ln in prog] == ["2/5", "4/5", "5/5"], prog
            assert all(re.search(r"examples, acc \d+\.\d%, eta \d+m\d\ds$", ln) for ln in prog), prog
    # the base column is the base model's own accuracy (no LoRA at all), the finetuned one the saved eval files
    cfg = T.parse_config(flags(tmp_path, data_dir=data))
    torch.manual_seed(cfg["seed"])  # train.py seeds before building the model
    plain = load_model("tiny")
    assert torch.equal(seen["eval base"], plain(x)[0]) and not torch.equal(seen["eval"], plain(x)[0])
    base = E.evaluate(plain.eval(), load_tokenizer("bytes"), cfg, data, None, log=lambda *a: None)
    saved = json.loads((o / "eval.json").read_text())
    assert saved["base"] == json.loads((o / "eval_base.json").read_text())["accuracy"] == pytest.approx(base)
    fine = {n: json.loads((o / f"eval_{n}.json").read_text())["accuracy"] for n in ("boolq", "ARC-Easy")}
    assert saved["finetuned"] == fine
    # the final table: both columns, values as saved
    head = next(i for i, ln in enumerate(lines) if ln.split()[:4] == ["dataset", "n", "base", "finetuned"])
    rows = {ln.split()[0]: ln.split()[1:] for ln in lines[head + 1:head + 4]}
    for n in ("boolq", "ARC-Easy"):
        assert rows[n] == ["5", f"{100 * base[n]:.1f}", f"{100 * fine[n]:.1f}"]
    assert rows["average"] == [f"{50 * (base['boolq'] + base['ARC-Easy']):.1f}",
                               f"{50 * (fine['boolq'] + fine['ARC-Easy']):.1f}"]
    # the last line names the adapter, the eval JSON (and the plot if written) -- all existing -- and sample.py
    last = lines[-1]
    assert last.startswith("done: ") and last.endswith(f"; sample from it: python sample.py --out_dir={o}")
    named = re.findall(r"(?:^done: |, )[a-z ]+ (\S+?)(?=[,;])", last)  # "what path" pairs
    assert str(o / "adapter_model.safetensors") in named and str(o / "eval.json") in named
    assert all(Path(p).is_file() for p in named), named
    # a rerun into the same out_dir (--overwrite) reuses the base eval (same protocol), a changed protocol does not
    T.main(flags(tmp_path, data_path=train_file, data_dir=data, overwrite=True))
    out = capsys.readouterr().out
    assert f"eval base: {o / 'eval_base.json'} (cached)" in out and "eval base boolq" not in out
    T.main(flags(tmp_path, data_path=train_file, data_dir=data, eval_limit=4, overwrite=True))
    assert "eval base boolq: 4/4 examples" in capsys.readouterr().out
