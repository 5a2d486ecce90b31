"""RefLoRA where PEFT users are, with PEFT's layouts built by hand (no peft or transformers import): every trainable
tensor stepped, conv and embedding pairs equal to their project-layout counterparts, the optimizer called the way
Trainer calls it, no silent state changes, and the wheel."""
import copy
import functools
import io
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import ROOT
from reflora import RefLoRA, create_reflora_optimizer, find_pairs

F64 = torch.float64


def rel(x, y):
    return ((x - y).norm() / y.norm()).item()

# -----------------------------------------------------------------------------
# PEFT's LoRA layers (peft/tuners/lora/layer.py), their parameter names and forwards


class Magnitude(nn.Module):
    """DoRA's magnitude m (out,), as PEFT's DoraLinearLayer holds it."""

    def __init__(self, m):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(m, dtype=F64))


class Linear(nn.Module):
    """lora.Linear: lora_A[k] = Linear(in, r) (weight Bᵀ), lora_B[k] = Linear(r, out) (weight A; a bias with
    lora_bias=True); DoRA: lora_magnitude_vector[k].weight m (out,), W' = m ⊙ (W0 + A Bᵀ) / ‖W0 + A Bᵀ‖ by row."""

    def __init__(self, n, m, r, names=("default",), bias=False, dora=False):
        super().__init__()
        self.base_layer = nn.Linear(n, m, dtype=F64).requires_grad_(False)
        self.lora_A = nn.ModuleDict({k: nn.Linear(n, r, bias=False, dtype=F64) for k in names})
        self.lora_B = nn.ModuleDict({k: nn.Linear(r, m, bias=bias, dtype=F64) for k in names})
        self.lora_magnitude_vector = nn.ModuleDict({k: Magnitude(m) for k in names} if dora else {})
        self.lora_embedding_A, self.lora_embedding_B = nn.ParameterDict(), nn.ParameterDict()  # PEFT's, empty

    def forward(self, x):
        y = self.base_layer(x)
        for k in self.lora_A:
            d = self.lora_B[k](self.lora_A[k](x))
            if k in self.lora_magnitude_vector:  # the norm detached, as PEFT's DoRA
                W = self.base_layer.weight + self.lora_B[k].weight @ self.lora_A[k].weight
                g = self.lora_magnitude_vector[k].weight / W.norm(dim=1).detach()
                d = (g - 1) * F.linear(x, self.base_layer.weight) + g * d
            y = y + d
        return y


class Embedding(nn.Module):
    """lora.Embedding: lora_embedding_A[k] (r, num) = Bᵀ, lora_embedding_B[k] (dim, r) = A; PEFT's forward
    base(x) + embedding(x, lora_embedding_A[k].T) @ lora_embedding_B[k].T."""

    def __init__(self, num, dim, r, names=("default",)):
        super().__init__()
        self.base_layer = nn.Embedding(num, dim, dtype=F64).requires_grad_(False)
        self.lora_embedding_A = nn.ParameterDict({k: nn.Parameter(torch.zeros(r, num, dtype=F64)) for k in names})
        self.lora_embedding_B = nn.ParameterDict({k: nn.Parameter(torch.zeros(dim, r, dtype=F64)) for k in names})
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()

    def forward(self, x):
        return self.base_layer(x) + sum(F.embedding(x, self.lora_embedding_A[k].T) @ self.lora_embedding_B[k].T
                                        for k in self.lora_embedding_A)


class Conv2d(nn.Module):
    """lora.Conv2d: lora_A[k] = Conv2d(in, r, kernel) (weight (r, in, kh, kw): Bᵀ unfolded), lora_B[k] =
    Conv2d(r, out, 1) (weight (out, r, 1, 1): A)."""

    def __init__(self, cin, cout, r, names=("default",), bias=False, groups=1):
        super().__init__()
        self.base_layer = nn.Conv2d(cin, cout, 3, padding=1, dtype=F64).requires_grad_(False)
        self.lora_A = nn.ModuleDict({k: nn.Conv2d(cin, r, 3, padding=1, bias=False, dtype=F64) for k in names})
        self.lora_B = nn.ModuleDict({k: nn.Conv2d(r, cout, 1, bias=bias, groups=groups, dtype=F64) for k in names})

    def forward(self, x):
        return self.base_layer(x) + sum(self.lora_B[k](self.lora_A[k](x)) for k in self.lora_A)


class ModulesToSave(nn.Module):
    """PEFT's ModulesToSaveWrapper: the original module frozen, a trained copy per adapter."""

    def __init__(self, mod):
        super().__init__()
        self.original_module = mod.requires_grad_(False)
        self.modules_to_save = nn.ModuleDict({"default": copy.deepcopy(mod).requires_grad_(True)})

    def forward(self, x):
        return self.modules_to_save["default"](x)


def randomize(model, seed):
    """Every parameter random (LoRA's zero init of A would leave the pairs unrefactored at first)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) / 2)
    return model


class LM(nn.Module):
    """Embedding LoRA (2 adapters), DoRA (2 adapters), lora_bias with a frozen adapter and a half-frozen pair
    (lora_A frozen, lora_B trained), a modules_to_save head: 5 trainable pairs."""

    def __init__(self, seed=0):
        super().__init__()
        self.embed = Embedding(11, 8, 2, ("default", "other"))
        self.q = Linear(8, 8, 3, ("default", "other"), dora=True)
        self.o = Linear(8, 6, 2, ("default", "frozen", "one_side"), bias=True)
        self.head = ModulesToSave(nn.Linear(6, 2, dtype=F64))
        randomize(self, seed)
        self.o.lora_A["frozen"].requires_grad_(False)
        self.o.lora_B["frozen"].requires_grad_(False)
        self.o.lora_A["one_side"].requires_grad_(False)
        self.x = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(seed + 1))

    def forward(self, x):
        return self.head(torch.tanh(self.o(torch.tanh(self.q(self.embed(x))))))


class CNN(nn.Module):
    """Conv2d LoRA (3×3 kernels, one layer with lora_bias) and a trained head: 2 pairs."""

    def __init__(self, seed=0):
        super().__init__()
        self.c1, self.c2 = Conv2d(3, 4, 2), Conv2d(4, 5, 3, bias=True)
        self.head = nn.Linear(5, 2, dtype=F64)
        randomize(self, seed)
        self.x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)

    def forward(self, x):
        return self.head(torch.tanh(self.c2(torch.tanh(self.c1(x)))).mean((-2, -1)))


MODELS = {"lm": (LM, 5), "cnn": (CNN, 2)}  # (model, its trainable pairs)


def loss_fn(y):
    return torch.sin(3 * y).square().sum()


def train(opt, fwd, x, steps, sched=None):
    for _ in range(steps):
        loss = loss_fn(fwd(x))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 10.0)  # as Trainer
        opt.step()
        if sched is not None:
            sched.step()

# -----------------------------------------------------------------------------
# create_reflora_optimizer: every trainable tensor stepped, the pairs refactored


@pytest.mark.parametrize("method", ["lora", "reflora", "reflora-s"])
@pytest.mark.parametrize("name", list(MODELS))
def test_every_trainable_tensor_is_stepped(name, method):
    cls, n_pairs = MODELS[name]
    m, m0 = cls(), cls()
    assert len(find_pairs(m)) == n_pairs
    opt = create_reflora_optimizer(m, method=method, lr=1e-2, weight_decay=0.1, warmup=0, interval=2)
    train(opt, m, m.x, 3)
    for (n, p), p0 in zip(m.named_parameters(), m0.parameters()):
        assert torch.equal(p, p0) != p.requires_grad, n  # trained tensors moved, frozen ones did not
    if method != "lora":
        assert opt.stats()["exact"] == n_pairs
    # 1-D parameters (biases, DoRA magnitudes) without weight decay, the rest with it
    for g in opt.param_groups:
        assert {p.dim() >= 2 for p in g["params"]} <= {g["weight_decay"] > 0}


class Pair(nn.Module):
    """The project's layout: A (m, r), B (n, r), as LoRALinear holds them."""

    def __init__(self, A, B):
        super().__init__()
        self.A, self.B = nn.Parameter(A), nn.Parameter(B)


def project_twin(model):
    """The model's trainable tensors in the project's layout (each PEFT pair unfolded: A = lora_B as (out, r),
    B = lora_A as (r, in·kh·kw), transposed; the rest copied) and the model's forward with them swapped in."""
    names = {id(p): n for n, p in model.named_parameters()}
    twin, swap = nn.Module(), []
    twin.pairs, twin.rest = nn.ModuleList(), nn.ParameterList()
    pairs = find_pairs(model)
    for A, Bt, t in pairs:
        assert t
        P = Pair(A.detach().reshape(A.shape[0], -1).clone(), Bt.detach().reshape(Bt.shape[0], -1).T.clone())
        twin.pairs.append(P)
        swap += [(names[id(A)], lambda P=P, s=A.shape: P.A.reshape(s)),
                 (names[id(Bt)], lambda P=P, s=Bt.shape: P.B.T.reshape(s))]
    paired = {id(p) for A, B, _ in pairs for p in (A, B)}
    for n, p in model.named_parameters():
        if p.requires_grad and id(p) not in paired:
            twin.rest.append(nn.Parameter(p.detach().clone()))
            swap.append((n, lambda q=twin.rest[-1]: q))
    return twin, lambda x: torch.func.functional_call(model, {n: f() for n, f in swap}, (x,))


@pytest.mark.parametrize("base", ["adamw", "sgd"])
@pytest.mark.parametrize("method", ["lora", "reflora", "reflora-s"])
@pytest.mark.parametrize("name", list(MODELS))
def test_embedding_and_conv_pairs_equal_the_project_layout(name, method, base):
    cls, n_pairs = MODELS[name]
    m = cls()
    twin, twin_fwd = project_twin(m)
    assert len(find_pairs(twin)) == n_pairs and all(not t for *_, t in find_pairs(twin))
    kw = dict(method=method, base=base, lr=1e-2, weight_decay=0.1, warmup=0, interval=2)
    opt, topt = create_reflora_optimizer(m, **kw), create_reflora_optimizer(twin, **kw)
    for o, f in ((opt, m), (topt, twin_fwd)):
        train(o, f, m.x, 5, torch.optim.lr_scheduler.LambdaLR(o, lambda t: 0.9 ** t))
    for (A, Bt, _), P in zip(find_pairs(m), twin.pairs):
        assert rel(A.reshape(P.A.shape), P.A) < 1e-12 and rel(Bt.reshape(P.B.T.shape), P.B.T) < 1e-12
        if base == "adamw":  # the moments too, stepped through views of PEFT's tensors
            assert rel(opt.state[A]["exp_avg_sq"].reshape(P.A.shape), topt.state[P.A]["exp_avg_sq"]) < 1e-12
            assert rel(opt.state[Bt]["exp_avg_sq"].reshape(P.B.T.shape), topt.state[P.B]["exp_avg_sq"].T) < 1e-12
    rest = [p for p in m.parameters() if p.requires_grad and all(p is not x for ab in find_pairs(m) for x in ab[:2])]
    for p, q in zip(rest, twin.rest):
        assert rel(p, q) < 1e-12
    # and the refactoring changed the trajectory (against plain LoRA from the same start): this can fail
    if method != "lora":
        m2 = cls()
        train(create_reflora_optimizer(m2, **{**kw, "method": "lora"}), m2, m2.x, 5)
        assert rel(find_pairs(m)[0][0], find_pairs(m2)[0][0]) > 1e-6

# -----------------------------------------------------------------------------
# find_pairs: whatever looks like LoRA and cannot be paired is named


def test_find_pairs_names_what_it_cannot_pair():
    class Experts(Linear):  # PEFT's ParamWrapper on an MoE weight: r·num_experts rows, one block per expert
        num_experts = 2

    class AdaLoRA(nn.Module):
        def __init__(self):
            super().__init__()
            self.lora_A = nn.ParameterDict({"default": nn.Parameter(torch.ones(2, 4))})
            self.lora_B = nn.ParameterDict({"default": nn.Parameter(torch.ones(4, 2))})
    m = nn.ModuleDict(dict(ok=Linear(4, 4, 2), grouped=Conv2d(4, 4, 2, groups=2), experts=Experts(4, 4, 4),
                           ada=AdaLoRA(), unpaired=Linear(4, 4, 2), tied=Linear(4, 4, 2),
                           frozen=Conv2d(4, 4, 2, groups=2)))
    del m["unpaired"].lora_B["default"]  # a lora_A without its lora_B
    m["tied"].lora_A["default"] = m["ok"].lora_A["default"]  # one factor in two pairs
    m["frozen"].requires_grad_(False)  # frozen: nothing to step, not an error
    with pytest.raises(ValueError) as e:
        find_pairs(m)
    msg = str(e.value)
    assert "\n" not in msg
    for bad in ("grouped.lora_A.default", "experts.lora_A.default", "ada.lora_A", "unpaired.lora_A.default",
                "tied.lora_A.default"):
        assert bad in msg
    assert "ok." not in msg and "frozen" not in msg
    del m["grouped"], m["experts"], m["ada"], m["unpaired"], m["tied"]
    assert [A is m["ok"].lora_B["default"].weight for A, _, _ in find_pairs(m)] == [True]

# -----------------------------------------------------------------------------
# Hugging Face Trainer: optimizer_cls_and_kwargs and functools.partial, called as create_optimizer calls them


def trainer_groups(model, weight_decay):
    """transformers' Trainer.create_optimizer (trainer.py, 4.57 and 5.24): `optimizer_cls(groups, **kwargs)` with
    two groups of the requires_grad parameters, weight decay on all but biases and norms; the lr only from kwargs."""
    decay = lambda n: "bias" not in n and "norm" not in n
    ps = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in ps if decay(n)], "weight_decay": weight_decay},
            {"params": [p for n, p in ps if not decay(n)], "weight_decay": 0.0}]


@pytest.mark.parametrize("method", ["reflora", "reflora-s"])
def test_trainer_optimizer_cls_and_kwargs_and_partial(method):
    def reference(m):  # the pairs, and Trainer's groups without them, given apart
        pairs = find_pairs(m)
        paired = {id(p) for ab in pairs for p in ab[:2]}
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in paired]} for g in trainer_groups(m, 0.1)]
        return RefLoRA(pairs, groups, method=method, lr=5e-3, weight_decay=0.1, warmup=0, interval=2)

    def trainer(m):  # optimizer_cls_and_kwargs=(RefLoRA, {...})
        cls, kwargs = RefLoRA, {"lora": find_pairs(m), "method": method, "lr": 5e-3, "warmup": 0, "interval": 2}
        return cls(trainer_groups(m, 0.1), **kwargs)

    def partial(m):  # functools.partial(RefLoRA, ...), called with Trainer's groups and lr
        return functools.partial(RefLoRA, lora=find_pairs(m), method=method, warmup=0, interval=2)(
            trainer_groups(m, 0.1), lr=5e-3)
    runs = []
    for make in (reference, trainer, partial):
        m = LM()
        opt = make(m)
        train(opt, m, m.x, 4, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / 8))  # as get_scheduler
        assert opt.stats()["exact"] == 5
        runs.append([p.detach().clone() for p in m.parameters()])
        # pairs out of the groups, with the weight decay of theirs; the head's bias with none
        assert sum(g["lora"] for g in opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.1
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))
    # Trainer's groups without lora=: refused, not run as plain AdamW
    with pytest.raises(ValueError, match="lora=find_pairs"):
        RefLoRA(trainer_groups(LM(), 0.1), method=method, lr=5e-3)

# -----------------------------------------------------------------------------
# no silent state changes (RefLoRA(find_pairs(model), ...): the API these tests share with older reflora.py)


def peft_linear_model(seed=0):
    m = nn.Sequential(Linear(8, 8, 3, ("default", "other")), nn.Tanh(), Linear(8, 6, 2), nn.Tanh(),
                      nn.Linear(6, 2, dtype=F64))
    m.x = torch.randn(10, 8, generator=torch.Generator().manual_seed(7), dtype=F64)
    return randomize(m, seed)


def make_opt(m, **kw):
    return RefLoRA(find_pairs(m), [m[4].weight, m[4].bias], **{**dict(lr=1e-2, warmup=0, interval=3), **kw})


def test_load_state_dict_refuses_another_method_base_warmup_or_interval():
    m = peft_linear_model()
    opt = make_opt(m, method="reflora")
    train(opt, m, m.x, 2)
    sd = opt.state_dict()
    for k, v in (("method", "reflora-s"), ("base", "sgd"), ("warmup", 5), ("interval", 1)):
        with pytest.raises(ValueError) as e:
            make_opt(m, **{"method": "reflora", k: v}).load_state_dict(sd)
        saved = sd["reflora"][k]
        assert f"{k}={saved!r}" in str(e.value) and f"{k}={v!r}" in str(e.value) and "\n" not in str(e.value)
    make_opt(m, method="reflora").load_state_dict(sd)  # the same settings load


@pytest.mark.parametrize("method", ["lora", "reflora", "reflora-s"])
def test_restoring_never_touches_the_weights_and_resumes_bitwise(method):
    """RefLoRA-S with warmup=0 balances at the first step of a fresh optimizer, not in the constructor: building an
    optimizer over trained weights and loading its state leaves them as they are."""
    m = peft_linear_model()
    train(make_opt(m, method=method), m, m.x, 10)
    straight = [p.detach().clone() for p in m.parameters()]

    m = peft_linear_model()
    opt = make_opt(m, method=method)
    train(opt, m, m.x, 4)  # interval 3: the factors are off balance after step 4
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "model": m.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m = peft_linear_model(seed=1)
    m.load_state_dict(ck["model"])
    saved = [p.detach().clone() for p in m.parameters()]
    opt = make_opt(m, method=method)
    opt.load_state_dict(ck["opt"])
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), saved))
    train(opt, m, m.x, 6)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), straight))


@pytest.mark.parametrize("method", ["reflora", "reflora-s"])
@pytest.mark.parametrize("name", ["linear", *MODELS])
def test_gradients_keep_their_parameters_layout_for_the_fused_kernel(monkeypatch, name, method):
    """PEFT stores Bᵀ (lora_A, r×in; Embedding's and Conv's too): the gradients RefLoRA hands the base step must
    keep the parameter's layout, not come back as transposed views. torch's fused AdamW (CUDA's base step) needs
    it: on CUDA its kernel refuses strides that differ from the parameter's, and on the CPU (forced here) it reads
    the gradient's storage in order, stepping the wrong entries. The fused run must equal the foreach run."""
    make = (lambda: peft_linear_model()) if name == "linear" else MODELS[name][0]
    kw = dict(method=method, lr=1e-2, weight_decay=0.1, warmup=0, interval=1)  # every step refactored
    ref, m = make(), make()
    train(create_reflora_optimizer(ref, **kw), ref, ref.x, 3)
    monkeypatch.setattr(RefLoRA, "_fused", staticmethod(lambda p: True))
    opt = create_reflora_optimizer(m, **kw)
    train(opt, m, m.x, 3)
    assert all(p.grad.stride() == p.stride() for g in opt.param_groups for p in g["params"])
    assert all(torch.allclose(p, q, rtol=1e-12, atol=1e-14) for p, q in zip(m.parameters(), ref.parameters()))


def test_step_tensors_land_where_the_kernel_reads_them(monkeypatch):
    """torch's load_state_dict moves `step` to the parameter's device only in groups flagged fused or capturable,
    so a state saved on one device (Trainer loads optimizer.pt with map_location="cpu") kept its step tensors
    where they were. Here a CPU state is loaded for parameters on "meta", standing in for CUDA, where step()
    uses the fused kernel (which reads `step` on the device): the predicate patched to say so."""
    m = peft_linear_model()
    opt = make_opt(m)
    train(opt, m, m.x, 2)
    sd = opt.state_dict()
    assert all(st["step"].device.type == "cpu" for st in sd["state"].values())
    meta = copy.deepcopy(m).to("meta")
    monkeypatch.setattr(RefLoRA, "_fused", staticmethod(lambda p: True))
    o = make_opt(meta)
    o.load_state_dict(sd)
    assert len(o.state) == 8 and all(st["step"].device == p.device == torch.device("meta") for p, st in o.state.items())
    assert all(st["exp_avg"].device == p.device for p, st in o.state.items())
    monkeypatch.undo()  # the foreach kernel: `step` on the CPU
    o = make_opt(meta)
    o.load_state_dict(sd)
    assert all(st["step"].device.type == "cpu" for st in o.state.values())

# -----------------------------------------------------------------------------
# installs like a library: the wheel holds reflora.py alone


def test_wheel_installs_reflora_alone(tmp_path):
    ls = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                        capture_output=True, text=True)
    if ls.returncode:
        pytest.skip("not a git checkout")
    src = tmp_path / "src"  # a copy of the checkout: the build writes build/ and *.egg-info beside pyproject
    for f in ls.stdout.split("\n"):
        if f and (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            (src / f).write_bytes((ROOT / f).read_bytes())
    run = lambda *a, **kw: subprocess.run([sys.executable, "-m", "pip", *a], capture_output=True, text=True, **kw)
    r = run("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src))
    if r.returncode and re.search(r"No module named '?(pip|setuptools|wheel)|invalid command 'bdist_wheel'",
                                  r.stdout + r.stderr):
        pytest.skip("no pip, setuptools or wheel here to build with")
    assert r.returncode == 0, r.stdout + r.stderr
    whl, = (tmp_path / "dist").glob("reflora-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert [n for n in names if ".dist-info/" not in n] == ["reflora.py"]
    meta = zipfile.ZipFile(whl).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert [ln for ln in meta.splitlines() if ln.startswith("Requires-Dist")] == ["Requires-Dist: torch>=2.4"]
    r = run("install", "-q", "--no-deps", "--no-index", "--target", str(tmp_path / "site"), str(whl))
    assert r.returncode == 0, r.stdout + r.stderr
    clean = tmp_path / "clean"
    clean.mkdir()
    code = ("import reflora, torch; print(reflora.__file__); "
            "reflora.create_reflora_optimizer(torch.nn.Linear(2, 2), method='lora')")
    r = subprocess.run([sys.executable, "-c", code], cwd=clean, capture_output=True, text=True,
                       env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).parent == tmp_path / "site"
