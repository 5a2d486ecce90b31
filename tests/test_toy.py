"""The matrix-factorization toy (bench.py --toy): the paper's ranking in its setting, and the JSON's shape."""
import json
import math

import bench


def test_toy_paper_setting_ranking():
    # RefLoRA@0.03 reaches 1e-3 first; 20 iterations are enough to see it (and LoRA@0.03 blow up)
    setting, curves = bench.toy("paper", iters=20)
    assert set(curves) == {f"{m}@{e:g}" for m in bench.TOY_METHODS for e in (0.01, 0.03)}
    first = bench.iters_to(curves["reflora@0.03"], 1e-3)
    assert first is not None
    for k, c in curves.items():
        if k not in ("reflora@0.03", "reflora-s@0.03"):  # RefLoRA-S is not in the paper's figure
            it = bench.iters_to(c, 1e-3)
            assert it is None or it > first, (k, it, first)
    lora = curves["lora@0.03"]
    assert not math.isfinite(lora[-1]) or lora[-1] > lora[0] or len(lora) < 21  # diverges (stopped above 1e30)
    assert max(lora) > 10 * lora[0]
    assert 1.5e3 <= setting["initial_loss"] <= 2.5e3  # the figure's initial loss, about 1.5-2e3


def test_toy_json_shape(tmp_path):
    setting, curves = bench.toy("paper", methods=("lora", "reflora"), iters=8)
    out = tmp_path / "toy.json"
    out.write_text(json.dumps(bench.toy_json(setting, curves), allow_nan=False))  # valid JSON: no NaN/Infinity
    d = json.loads(out.read_text())
    assert set(d) == {"setting", "curves"} and d["setting"]["name"] == "paper"
    assert set(d["curves"]) == {"lora@0.01", "lora@0.03", "reflora@0.01", "reflora@0.03"}
    assert len(d["curves"]["reflora@0.01"]) == 9  # loss at iterations 0..8
    assert all(x is None or isinstance(x, float) for c in d["curves"].values() for x in c)
    nonfinite = bench.toy_json(setting, {"x@1": [1.0, float("inf"), float("nan")]})["curves"]["x@1"]
    assert nonfinite == [1.0, None, None]


def test_toy_normalized_setting_scaledgd_wins():
    # the other regime (σ_max(Y) = 1): ScaledGD's step does not scale with the factors, RefLoRA's does
    _, curves = bench.toy("normalized", methods=("scaledgd", "reflora"), iters=60)
    assert bench.iters_to(curves["scaledgd@0.25"], 1e-3) is not None
    assert bench.iters_to(curves["reflora@0.25"], 1e-3) is None


def test_adam_step_explains_the_glue_result():
    """Under AdamW one step's ‖ΔW‖ is about LoRA's for RefLoRA (Adam normalizes the preconditioned gradient per
    coordinate) and smaller for RefLoRA-S by about (1 + s)/(2√s) once it balances unbalanced factors."""
    rows = bench.adam_step(m=128, n=96)
    for row in rows:
        assert abs(row["reflora"] / row["lora"] - 1) < 0.05
        assert row["bound"] / 3 < row["lora"] / row["reflora-s"] < 3 * row["bound"]
    assert rows[0]["lora"] / rows[0]["reflora-s"] > 5  # s ~ 1e3: the balanced step is several times smaller
