"""LoKr: HF PEFT interop both ways (every key layout), dropout as PEFT draws it, GPT-2's Conv1D against the
formula, merge / unmerge, counts, bad input. The section-4 properties on every cell run in tests/test_properties.py."""
from __future__ import annotations

import peft
import pytest
import torch
import transformers as T
from peft.tuners.lokr.layer import factorization as peft_factorization
from safetensors.torch import load_file

import families as F
from peft_interop import assert_both_ways
from adapter_checks import assert_merge_round_trip, randomize, run
from unipeft import ConfigError, LoHaConfig, LoKrConfig, PeftModel, TargetError, get_peft_model
from unipeft.methods.lokr import factorization

CELLS = [("bert", "SEQ_CLS"), ("t5", "SEQ_2_SEQ_LM"), ("llama", "CAUSAL_LM")]  # PEFT's LoKr adapts nn.Linear, not Conv1D
W1, W1AB, W2, W2AB = {"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"}, {"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"}
# Tiny models: hidden 32 splits as 4 x 8, llama's v_proj (32 -> 16) as (4 x 4) x (4 x 8).
LAYOUTS = {  # name: (config kwargs, the parts they create)
    "w1-full-w2-low-rank": (dict(r=2, alpha=4), W1 | W2AB),
    "both-low-rank": (dict(r=1, alpha=3, decompose_both=True, rank_pattern={"v|value|v_proj": 2},  # v: w1 full (2 !< 4/2)
                           alpha_pattern={"q|query|q_proj": 5}), W1 | W1AB | W2AB),
    "both-full": (dict(r=8, alpha=4, decompose_factor=4), W1 | W2),
}


def config(task, layout, lib=None, **kwargs):
    lib = lib or __import__("unipeft")
    return lib.LoKrConfig(task_type=task, **{"init_weights": False, **LAYOUTS[layout][0], **kwargs})


def parts_in(model) -> set[str]:
    return {n.split(".")[-2] for n, _ in model.named_parameters() if ".lokr_" in n}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family,task", CELLS)
def test_both_ways_with_peft(family, task, layout, tmp_path):
    ours, loaded = assert_both_ways(family, task, lambda lib: config(task, layout, lib), tmp_path)
    assert parts_in(ours) == parts_in(loaded) == LAYOUTS[layout][1]


@pytest.mark.parametrize("init", [True, "lycoris", False])
def test_init_zeroes_the_same_tensors_as_peft(init, tmp_path):
    """Same saved keys and shapes as PEFT, and the same of them zero: w1 / w1_a (True), w2 / w2_b ("lycoris")."""
    family, task = "llama", "CAUSAL_LM"
    for lib, folder in ((__import__("unipeft"), "o"), (peft, "t")):
        cfg = config(task, "both-low-rank", lib, init_weights=init)
        lib.get_peft_model(F.make_model(family, task), cfg).save_pretrained(tmp_path / folder)
    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in "ot")
    summary = [{k: (tuple(v.shape), bool((v == 0).all())) for k, v in sd.items()} for sd in (ours, theirs)]
    assert summary[0] == summary[1]
    assert any(zero for _, zero in summary[0].values()) == (init is not False)
    batch = F.make_batch(family, task)
    loaded = PeftModel.from_pretrained(F.make_model(family, task), tmp_path / "o")
    base = run(F.make_model(family, task), batch)
    assert torch.allclose(run(loaded, batch), base, atol=1e-6) == (init is not False)


@pytest.mark.parametrize("method", ["lokr", "loha"])
def test_dropout_in_training_draws_as_peft_and_is_off_in_eval(method, tmp_path):
    family, task = "llama", "CAUSAL_LM"  # no dropout of its own, so only the adapter's draws differ
    batch = {k: v for k, v in F.make_batch(family, task).items() if k != "labels"}
    dropouts = dict(rank_dropout=0.5, module_dropout=0.3)
    cfg = (config(task, "w1-full-w2-low-rank", rank_dropout_scale=True, **dropouts) if method == "lokr"
           else LoHaConfig(task_type=task, r=4, alpha=8, init_weights=False, **dropouts))
    ours = randomize(get_peft_model(F.make_model(family, task), cfg))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(F.make_model(family, task), tmp_path)
    evaluated = run(ours.eval(), batch)
    torch.testing.assert_close(run(theirs.eval(), batch), evaluated, rtol=1e-5, atol=1e-5)
    ours.train(), theirs.train()
    for seed in range(3):
        outs = []
        for model in (ours, theirs):
            torch.manual_seed(seed)
            outs.append(run(model, batch))
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(outs[0], evaluated, atol=1e-4)


def test_factorization_is_peft_s():
    assert all(factorization(d) == peft_factorization(d) for d in range(1, 3000))
    assert all(factorization(d, f) == peft_factorization(d, f) for d in range(1, 300) for f in range(1, d + 1) if d % f == 0)
    assert [factorization(d) for d in (32, 96, 127, 768, 2304)] == [(4, 8), (8, 12), (1, 127), (24, 32), (48, 48)]


def test_gpt2_conv1d_equals_the_base_with_the_formed_weight():
    cfg = LoKrConfig(task_type="CAUSAL_LM", r=2, alpha=6, decompose_both=True, init_weights=False)
    peft_model = randomize(get_peft_model(F.make_model("gpt2", "CAUSAL_LM"), cfg))
    assert parts_in(peft_model) == W1AB | W2AB  # c_attn 32 -> 96: W1 [8, 4], W2 [12, 8]
    edited = F.make_model("gpt2", "CAUSAL_LM")
    with torch.no_grad():
        for name, module in peft_model.get_base_model().named_modules():
            if hasattr(module, "lokr_w1_a"):
                w1 = module.lokr_w1_a["default"] @ module.lokr_w1_b["default"]
                w2 = module.lokr_w2_a["default"] @ module.lokr_w2_b["default"]
                delta = 3.0 * torch.einsum("ik,jl->ijkl", w1, w2).reshape(96, 32)  # ΔW[i·12+j, k·8+l] = s·W1[i,k]·W2[j,l]
                edited.get_submodule(name).weight.add_(delta.t())  # Conv1D is [in, out]
    batch = F.make_batch("gpt2", "CAUSAL_LM")
    torch.testing.assert_close(run(peft_model, batch), run(edited, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,task", CELLS + [("gpt2", "CAUSAL_LM")])
def test_merge_unmerge_and_unload(family, task):
    peft_model = randomize(get_peft_model(F.make_model(family, task), config(task, "both-low-rank")))
    assert_merge_round_trip(peft_model, F.make_batch(family, task))


# bert-base: query, value 768 -> 768, 768 = 24 x 32: W1 [24, 24], W2 [32, 32].
# gpt2: c_attn 768 -> 2304, 2304 = 48 x 48: W1 [48, 24], W2 [48, 32]. Low rank where r < max(rows, cols) / 2.
@pytest.mark.parametrize("name,make,kwargs,per_layer", [
    ("bert-base", T.BertConfig, dict(r=8), 2 * (24 * 24 + (32 * 8 + 8 * 32))),
    ("bert-base", T.BertConfig, dict(r=8, decompose_both=True), 2 * ((24 * 8 + 8 * 24) + (32 * 8 + 8 * 32))),
    ("gpt2", T.GPT2Config, dict(r=8), 48 * 24 + (48 * 8 + 8 * 32)),
    ("gpt2", T.GPT2Config, dict(r=24), 48 * 24 + 48 * 32),
])
def test_count_follows_the_factorisation(name, make, kwargs, per_layer):
    c = make()
    with torch.device("meta"):
        model = T.AutoModel.from_config(c)
        base = sum(p.numel() for p in model.parameters())
        counted = get_peft_model(model, LoKrConfig(**kwargs)).get_nb_trainable_parameters()
    assert counted == (c.num_hidden_layers * per_layer, base + c.num_hidden_layers * per_layer)


@pytest.mark.parametrize("kwargs,message", [
    (dict(r=0), "r must be a positive"), (dict(rank_pattern={"q": 0}), "r must be a positive"),
    (dict(decompose_factor=0), "decompose_factor must be -1"), (dict(decompose_factor=-2), "decompose_factor must be -1"),
    (dict(rank_dropout=1.5), r"rank_dropout must be in \[0, 1\]"), (dict(module_dropout=-0.1), "module_dropout must be"),
    (dict(layers_pattern="layer"), "only applies together with layers_to_transform"),
    (dict(init_weights="gaussian"), "init_weights must be"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoKrConfig(**kwargs)


@pytest.mark.parametrize("family,factor,message", [
    ("bert", 5, r"decompose_factor=5 does not divide bert\.encoder\.layer\.0\.attention\.self\.query\.out_features=32"),
    ("gpt2", 3, r"decompose_factor=3 does not divide transformer\.h\.0\.attn\.c_attn\.in_features=32"),  # 96 divides
])
def test_factor_that_does_not_divide_is_refused_before_the_model_changes(family, factor, message):
    model = F.make_model(family, "SEQ_CLS")
    before = [(n, type(m)) for n, m in model.named_modules()]
    weights = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(TargetError, match=message + r".*use decompose_factor=-1"):
        get_peft_model(model, LoKrConfig(task_type="SEQ_CLS", decompose_factor=factor))
    assert [(n, type(m)) for n, m in model.named_modules()] == before
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(weights[n], p) for n, p in model.state_dict().items()) and len(weights) == len(model.state_dict())
    get_peft_model(model, LoKrConfig(task_type="SEQ_CLS", decompose_factor=4))  # a divisor of 32 and 96 works


def test_kronecker_product_and_its_gradients_equal_the_formed_matrix():
    """The forward never forms W1 ⊗ W2 and the backward recomputes X W2ᵀ: both checked against torch.kron
    and by finite differences."""
    from unipeft.methods.lokr import _KroneckerApply

    torch.manual_seed(0)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(_KroneckerApply.apply(x, w1, w2), x @ torch.kron(w1, w2).t())
    assert torch.autograd.gradcheck(_KroneckerApply.apply, (x, w1, w2))


def test_lokr_trains_under_bf16_autocast_with_gradients_close_to_float32():
    """Under torch.autocast the Kronecker product's backward gets bf16 gradients and float32 factors: it must
    compute in one dtype and hand float32 gradients back (found by the bf16 engine of tests/test_distributed.py).
    One adapted layer and a squared error, so the only bf16 rounding is this layer's (~0.4% a product)."""
    import unipeft

    class OneLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 16)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    model = unipeft.get_peft_model(OneLayer(), unipeft.LoKrConfig(r=4, target_modules=["proj"]))
    for name, p in model.named_parameters():
        if "lokr_" in name:
            torch.nn.init.normal_(p, std=0.5)  # off the zero start (W1 = 0), so every factor gets a gradient
    x, target = torch.randn(8, 16), torch.randn(8, 16)

    def gradients(autocast: bool) -> torch.Tensor:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = ((model(x).float() - target) ** 2).mean()
        loss.backward()
        grads = [p.grad for name, p in model.named_parameters() if "lokr_" in name]
        assert all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)
        return torch.cat([g.flatten() for g in grads])

    full, mixed = gradients(False), gradients(True)
    assert (mixed - full).norm() <= 0.02 * full.norm()  # a few bf16 roundings; a wrong path is off by far more
