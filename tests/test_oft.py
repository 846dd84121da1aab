"""OFT: HF PEFT interop both ways, the base model with rotated weights as oracle (GPT-2's Conv1D too),
merge / unmerge, counts, multiplicative dropout, bad input. The section-4 properties run in tests/test_properties.py."""
from __future__ import annotations

import peft
import pytest
import torch
import transformers as T

import families as F
from peft_interop import assert_both_ways
from adapter_checks import assert_merge_round_trip, randomize, run
from unipeft import ConfigError, OFTConfig, get_peft_model
from unipeft.engine.targeting import TargetError

CELLS = [("bert", "TOKEN_CLS"), ("t5", "SEQ_2_SEQ_LM"), ("llama", "CAUSAL_LM")]  # PEFT's OFT adapts nn.Linear, not Conv1D
VARIANTS = {  # every hidden size is 32: blocks of 8 = r of 4
    "neumann": dict(oft_block_size=8, bias="oft_only"),  # the adapted layers' biases train and are saved too
    "r-given": dict(r=4, oft_block_size=0, num_cayley_neumann_terms=3),
    "cayley": dict(oft_block_size=8, use_cayley_neumann=False),
    "coft": dict(oft_block_size=8, use_cayley_neumann=False, coft=True, eps=0.5),  # radius 0.25: projection bites
    "share": dict(r=4, oft_block_size=0, block_share=True),
}


def config(task, variant, lib=None):
    return (lib or __import__("unipeft")).OFTConfig(task_type=task, init_weights=False, **VARIANTS[variant])


def test_fields_and_defaults_are_peft_s():
    theirs = {k: v for k, v in peft.OFTConfig().to_dict().items() if k != "peft_version"}
    assert {**theirs, "peft_type": theirs["peft_type"].value} == OFTConfig().to_dict()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family,task", CELLS)
def test_both_ways_with_peft(family, task, variant, tmp_path):  # with oft_only the saved keys hold the biases too
    assert_both_ways(family, task, lambda lib: config(task, variant, lib), tmp_path)


def expected_blocks(weight, b, variant):
    """M of x ↦ xM from the stored upper triangles, by the textbook formulas PEFT uses."""
    q, (rows, cols) = torch.zeros(len(weight), b, b, dtype=torch.float64), torch.triu_indices(b, b, 1)
    q[:, rows, cols] = weight.double()
    q, eye = q - q.transpose(1, 2), torch.eye(b, dtype=torch.float64)
    if VARIANTS[variant].get("coft"):  # radius eps / √blocks in the Frobenius norm
        radius = VARIANTS[variant]["eps"] / len(q) ** 0.5
        q = q * (radius / torch.linalg.matrix_norm(q)).clamp(max=1)[:, None, None]
    if VARIANTS[variant].get("use_cayley_neumann", True):  # 5 terms: the series of (I + Q)(I − Q)⁻¹
        return eye + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q, q
    return (eye - q) @ torch.linalg.inv(eye + q), q


@pytest.mark.parametrize("variant", ["neumann", "cayley", "coft", "share"])
@pytest.mark.parametrize("family,task", [("gpt2", "CAUSAL_LM"), ("llama", "CAUSAL_LM")])
def test_equals_the_base_with_rotated_weights(family, task, variant):
    peft_model = get_peft_model(F.make_model(family, task), config(task, variant))
    edited = F.make_model(family, task)
    done = 0
    with torch.no_grad():
        for name, module in peft_model.get_base_model().named_modules():
            if hasattr(module, "oft_R"):
                b = module.hparams["default"].block
                blocks, q = expected_blocks(module.oft_R["default"].weight, b, variant)
                m = torch.block_diag(*blocks.expand(module.hparams["default"].r, -1, -1))
                if not VARIANTS[variant].get("use_cayley_neumann", True):
                    torch.testing.assert_close(m.t() @ m, torch.eye(len(m), dtype=m.dtype), rtol=0, atol=1e-5)
                target = edited.get_submodule(name)  # y = (xM)Wᵀ: Linear W ← W Mᵀ, Conv1D ([in, out]) W ← M W
                new = m @ target.weight.double() if family == "gpt2" else target.weight.double() @ m.t()
                target.weight.copy_(new.float())
                done += 1
    assert done == (2 if family == "gpt2" else 4)  # c_attn, or q and v, in 2 layers
    batch = F.make_batch(family, task)
    torch.testing.assert_close(run(peft_model, batch), run(edited, batch), rtol=1e-5, atol=1e-5)
    if variant == "coft":  # the forward projected the stored parameter in place, as PEFT does
        for module in peft_model.modules():
            if hasattr(module, "oft_R"):
                w = module.oft_R["default"].weight
                assert (w.norm(dim=1) * 2 ** 0.5 <= 0.5 / len(w) ** 0.5 + 1e-6).all()


@pytest.mark.parametrize("variant", ["neumann", "coft", "share"])
@pytest.mark.parametrize("family,task", CELLS + [("gpt2", "CAUSAL_LM")])
def test_merge_unmerge_and_unload(family, task, variant):
    peft_model = randomize(get_peft_model(F.make_model(family, task), config(task, variant)))
    assert_merge_round_trip(peft_model, F.make_batch(family, task))


@pytest.mark.parametrize("name,make", [("bert-base", T.BertConfig), ("gpt2", T.GPT2Config)])
@pytest.mark.parametrize("kwargs,blocks,b", [(dict(), 24, 32), (dict(r=8, oft_block_size=0), 8, 96),
                                              (dict(block_share=True), 1, 32)])
def test_count_is_blocks_times_upper_triangle(name, make, kwargs, blocks, b):
    c = make()
    with torch.device("meta"):
        model = T.AutoModel.from_config(c)
        base = sum(p.numel() for p in model.parameters())
        counted = get_peft_model(model, OFTConfig(**kwargs)).get_nb_trainable_parameters()
    per_layer = (2 if name == "bert-base" else 1) * blocks * b * (b - 1) // 2  # query, value / c_attn: in = 768
    assert counted == (c.num_hidden_layers * per_layer, base + c.num_hidden_layers * per_layer)


def test_module_dropout_sets_blocks_to_identity_in_training_only():
    peft_model = randomize(get_peft_model(F.make_model("llama", "CAUSAL_LM"), OFTConfig(oft_block_size=8, module_dropout=0.5)))
    layer = peft_model.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(5, 32)
    peft_model.train()
    dropped = [torch.allclose(b, torch.eye(8)) for b in layer.blocks("default")]
    assert sum(dropped) == 2  # int(0.5 * 4) of 4 blocks
    peft_model.eval()
    assert not any(torch.allclose(b, torch.eye(8)) for b in layer.blocks("default"))
    assert not torch.allclose(layer(x), layer.base_layer(x), atol=1e-3)


@pytest.mark.parametrize("kwargs,message", [
    (dict(r=4), "exactly one of r"), (dict(r=0, oft_block_size=0), "exactly one of r"),
    (dict(r=-4, oft_block_size=0), "exactly one of r"),
    (dict(module_dropout=1.5), "module_dropout"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        OFTConfig(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(oft_block_size=5), r"oft_block_size=5 does not divide the in_features=32 of .*query.*oft_block_size=4"),
    (dict(r=3, oft_block_size=0), r"r=3 does not divide the in_features=32 of .*query.*r=2"),
    (dict(oft_block_size=64), r"oft_block_size=64 does not divide the in_features=32 .*oft_block_size=32"),
])
def test_block_that_does_not_divide_is_refused_before_the_model_changes(kwargs, message):
    model = F.make_model("bert", "SEQ_CLS")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    with pytest.raises(TargetError, match=message):
        get_peft_model(model, OFTConfig(**kwargs))
    assert [type(m) for m in model.modules()] == modules and model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
