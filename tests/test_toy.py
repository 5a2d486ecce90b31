"""experiments.py: the matrix-factorization toy (--toy): the paper's ranking in its setting, the JSON's shape; its
η sweep (--toy_sweep): the stability frontier and iterations checked against the curves; one AdamW step
(--adam_step)."""
import importlib.util
import json
import math

import pytest

import experiments as E


def test_toy_paper_setting_ranking():
    # RefLoRA@0.03 reaches 1e-3 first; 20 iterations are enough to see it (and LoRA@0.03 blow up)
    setting, curves = E.toy("paper", iters=20)
    assert set(curves) == {f"{m}@{e:g}" for m in E.TOY_METHODS for e in (0.01, 0.03)}
    first = E.iters_to(curves["reflora@0.03"], 1e-3)
    assert first is not None
    for k, c in curves.items():
        if k not in ("reflora@0.03", "reflora-s@0.03"):  # RefLoRA-S is not in the paper's figure
            it = E.iters_to(c, 1e-3)
            assert it is None or it > first, (k, it, first)
    lora = curves["lora@0.03"]
    assert not math.isfinite(lora[-1]) or lora[-1] > lora[0] or len(lora) < 21  # diverges (stopped above 1e30)
    assert max(lora) > 10 * lora[0]
    assert 1.5e3 <= setting["initial_loss"] <= 2.5e3  # the figure's initial loss, about 1.5-2e3


def test_toy_json_shape(tmp_path):
    setting, curves = E.toy("paper", methods=("lora", "reflora"), iters=8)
    out = tmp_path / "toy.json"
    out.write_text(json.dumps(E.toy_json(setting, curves), allow_nan=False))  # valid JSON: no NaN/Infinity
    d = json.loads(out.read_text())
    assert set(d) == {"setting", "curves"} and d["setting"]["name"] == "paper"
    assert set(d["curves"]) == {"lora@0.01", "lora@0.03", "reflora@0.01", "reflora@0.03"}
    assert len(d["curves"]["reflora@0.01"]) == 9  # loss at iterations 0..8
    assert all(x is None or isinstance(x, float) for c in d["curves"].values() for x in c)
    nonfinite = E.toy_json(setting, {"x@1": [1.0, float("inf"), float("nan")]})["curves"]["x@1"]
    assert nonfinite == [1.0, None, None]


def test_toy_normalized_setting_scaledgd_wins():
    # the other regime (σ_max(Y) = 1): ScaledGD's step does not scale with the factors, RefLoRA's does
    _, curves = E.toy("normalized", methods=("scaledgd", "reflora"), iters=60)
    assert E.iters_to(curves["scaledgd@0.25"], 1e-3) is not None
    assert E.iters_to(curves["reflora@0.25"], 1e-3) is None


def test_adam_step_explains_the_glue_result():
    """Under AdamW one step's ‖ΔW‖ is about LoRA's for RefLoRA (Adam normalizes the preconditioned gradient per
    coordinate) and smaller for RefLoRA-S by about (1 + s)/(2√s) once it balances unbalanced factors."""
    rows = E.adam_step(m=128, n=96)
    for row in rows:
        assert abs(row["reflora"] / row["lora"] - 1) < 0.05
        assert row["bound"] / 3 < row["lora"] / row["reflora-s"] < 3 * row["bound"]
    assert rows[0]["lora"] / rows[0]["reflora-s"] > 5  # s ~ 1e3: the balanced step is several times smaller


def test_toy_sweep_frontier_and_iterations(tmp_path, capsys):
    """The sweep's summary read off its own curves, and the paper's ranking at the frontier: LoRA is stable at
    η = 0.01 and diverges at 0.03, where RefLoRA and RefLoRA-S converge; ScaledGD is stable at every η here."""
    etas, seeds = [0.01, 0.03, 0.1], [0, 1]
    res = E.toy_sweep("paper", etas=etas, seeds=seeds, iters=30)
    assert len(res["runs"]) == len(E.TOY_METHODS) * len(etas) * len(seeds)
    s = res["summary"]
    assert s["lora"]["frontier"] == 0.01 and s["reflora"]["frontier"] == s["reflora-s"]["frontier"] == 0.03
    assert s["scaledgd"]["frontier"] == 0.1
    assert s["reflora"]["converges_to"] == 0.03 and s["reflora"]["best_eta"] == 0.03
    for m in E.TOY_METHODS:  # every number of the summary, from the curves
        for eta in etas:
            rs = [r for r in res["runs"] if r["method"] == m and r["eta"] == eta]
            p = s[m]["per_eta"][eta]
            ok = [all(map(math.isfinite, r["curve"])) and r["curve"][-1] < 1e30 and r["curve"][-1] <= r["curve"][0]
                  for r in rs]  # stable: finite, under the 1e30 stop, no higher at the end than at the start
            assert p["stable"] == all(ok)
            its = [next((i for i, x in enumerate(r["curve"]) if x < 1e-3), None) for r in rs]
            assert [r["iters_to"] for r in rs] == its
            if None not in its:
                assert p["iters"][0] == pytest.approx(sum(its) / len(its))
    lora = [r for r in res["runs"] if r["method"] == "lora" and r["eta"] == 0.03]
    assert all(not r["stable"] and r["curve"][-1] > r["curve"][0] for r in lora)
    # the CLI writes the JSON (strict: no NaN), the tables and the picture
    assert E.main(["--toy_sweep", "--etas=0.01,0.03", "--seeds=0", "--iters=30", "--methods=lora,reflora",
                   f"--out={tmp_path}"]) == 0
    d = json.loads((tmp_path / "toy_sweep.json").read_text())
    assert set(d) >= {"setting", "etas", "seeds", "iters", "tol", "runs", "summary"}
    assert d["summary"]["lora"]["frontier"] == 0.01 and set(d["summary"]["lora"]["per_eta"]) == {"0.01", "0.03"}
    md = (tmp_path / "toy_sweep.md").read_text()
    assert "| lora | 0.01 |" in md and "| reflora | 0.03 (grid top) |" in md and md in capsys.readouterr().out
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "toy_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, needle", [(["--toy_sweep", "--etas=0.1,x"], "--etas"),
                                          (["--toy_sweep", "--etas=0"], "--etas"),
                                          (["--toy_sweep", "--methods=lora,dora"], "dora"),
                                          (["--toy_sweep", "--iters=0"], "--iters"), ([], "choose one"),
                                          (["--toy_sweep", "--toy_base=adamw", "--methods=scaledgd"], "scaledgd"),
                                          (["--toy", "--nope"], "--nope")])
def test_cli_errors_are_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        E.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and needle in err and "\n" not in err and err.startswith("experiments.py: error:")


def test_summarize_toy_by_hand():
    # fake runs, 2 seeds: η 0.1 fastest (10, 12 iterations); η 0.2 converges slower (30, 40: oscillating);
    # η 0.4 stable for one seed only; η 0.05 stable, one seed short of the tolerance
    run = lambda eta, seed, it, stable: dict(method="m", eta=eta, seed=seed, iters_to=it, stable=stable)  # noqa
    runs = [run(0.05, 0, 80, True), run(0.05, 1, None, True), run(0.1, 0, 10, True), run(0.1, 1, 12, True),
            run(0.2, 0, 30, True), run(0.2, 1, 40, True), run(0.4, 0, None, False), run(0.4, 1, 50, True)]
    s = E.summarize_toy(runs, ["m"], [0.05, 0.1, 0.2, 0.4])["m"]
    assert (s["frontier"], s["converges_to"], s["best_eta"]) == (0.2, 0.2, 0.1)
    assert s["best_iters"] == pytest.approx((11.0, math.sqrt(2)))
    assert s["per_eta"][0.05] == dict(stable=True, reached=1, n=2, iters=None)
    assert s["per_eta"][0.4]["stable"] is False and s["per_eta"][0.4]["reached"] == 1


def test_toy_under_adamw_is_torch_adamw():
    """--toy_base=adamw: LoRA's curve is torch.optim.AdamW's on the same (Y, A₀, B₀), written out here; RefLoRA-S
    (balanced before its first step) starts from the same loss and takes another path; no ScaledGD by default."""
    import torch
    res = E.toy_sweep("paper", etas=[0.01], seeds=[0], iters=12, base="adamw")
    assert {r["method"] for r in res["runs"]} == {"lora", "reflora", "reflora-s"} and res["setting"]["base"] == "adamw"
    assert "AdamW" in E.toy_sweep_markdown(res)
    cfg = E.TOY_SETTINGS["paper"]
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731 (toy()'s draws, in order)
    Y = cfg["sigma"] * rand(cfg["m"], cfg["r"]) @ rand(cfg["n"], cfg["r"]).mT / (cfg["m"] * cfg["n"]) ** 0.5
    A = torch.nn.Parameter(cfg["a0"] * rand(cfg["m"], cfg["r"]))
    B = torch.nn.Parameter(cfg["b0"] * rand(cfg["n"], cfg["r"]))
    opt, ref = torch.optim.AdamW([A, B], lr=0.01, weight_decay=0.0), []
    for t in range(13):
        loss = 0.5 * (Y - A @ B.mT).square().sum()
        ref.append(loss.item())
        if t < 12:
            opt.zero_grad()
            loss.backward()
            opt.step()
    curve = {r["method"]: r["curve"] for r in res["runs"]}
    assert curve["lora"] == pytest.approx(ref, rel=1e-12)
    assert curve["reflora-s"][0] == pytest.approx(ref[0], rel=1e-12)
    assert curve["reflora-s"][-1] != pytest.approx(ref[-1])
    with pytest.raises(ValueError, match="ScaledGD"):
        E.toy("paper", methods=("lora", "scaledgd"), iters=1, base="adamw")
