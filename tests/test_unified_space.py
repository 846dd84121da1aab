"""Every valid point of UnifiedConfig's design space works on every family; the cross-attention prefix forms
compute what He et al. (2022) define, checked against the models' own attention."""
from __future__ import annotations

import itertools

import pytest
import torch

import families as F
from adapter_checks import is_adapter_param, randomize, run
from adapter_checks import NO_CACHE
from unipeft import ConfigError, PeftModel, PrefixTuningConfig, get_peft_model
from unipeft.methods.unified import UnifiedConfig

ATTN = [("none", None, "add"), ("lora", None, "add"), ("adapter", "parallel", "add"), ("adapter", "sequential", "add"),
        ("prompt_tuning", None, "add"), ("bitfit", None, "add")] + [
    (mode, option, composition) for mode in ("prefix", "prefix_nomlp")
    for option, composition in (("concat", "add"), ("concat", "gate_add"), ("cross_attn", "add"),
                                ("cross_attn_noln", "add"), ("cross_attn_noln", "gate_add"), ("cross_attn_relu", "add"))]
FFN = [("none", None), ("adapter", "parallel"), ("adapter", "sequential"), ("adapter", "pfeiffer"), ("lora", None)]
POINTS = [(a, f) for a, f in itertools.product(ATTN, FFN) if not (a[0] == "none" and f[0] == "none")]
NO_BIAS = {"t5", "llama", "mistral"}  # BitFit has nothing to train there


def point(task, attn, ffn) -> UnifiedConfig:
    (attn_mode, attn_option, composition), (ffn_mode, ffn_option) = attn, ffn
    return UnifiedConfig(task_type=task, attn_mode=attn_mode, attn_option=attn_option, attn_composition=composition,
                         attn_bn=3, mid_dim=8, ffn_mode=ffn_mode, ffn_option=ffn_option, ffn_bn=4,
                         ffn_adapter_layernorm_option="in", ffn_adapter_scalar="learnable_scalar")


def expected_error(family, attn) -> str | None:
    concat = attn[0] in ("prefix", "prefix_nomlp") and (attn[1] == "concat" or attn[2] == "gate_add")
    if concat and family in NO_CACHE:
        return "reads a key/value cache"
    if attn[0] == "bitfit" and family in NO_BIAS:
        return "no module with a bias"
    return None


@pytest.mark.parametrize("attn,ffn", POINTS, ids=lambda p: "-".join(str(v) for v in p))
@pytest.mark.parametrize("family", F.FAMILIES)
def test_every_valid_point_trains_on_every_family(family, attn, ffn):
    task = F.tasks_of(family)[-1]
    model = F.make_model(family, task)
    error = expected_error(family, attn)
    if error:
        before = {n: type(m) for n, m in model.named_modules()}
        with pytest.raises(ConfigError, match=error):
            get_peft_model(model, point(task, attn, ffn))
        assert {n: type(m) for n, m in model.named_modules()} == before
        return
    peft = get_peft_model(model, point(task, attn, ffn))
    trainable = [(n, p) for n, p in peft.named_parameters() if p.requires_grad]
    assert trainable and all(is_adapter_param(n) for n, _ in trainable)
    batch = F.make_batch(family, task)
    out = peft(**batch) if task != "FEATURE_EXTRACTION" else peft(**{k: v for k, v in batch.items() if k != "labels"})
    if task == "FEATURE_EXTRACTION":  # every output, so that every trained tensor (the pooler's bias too) is reached
        loss = sum(t.pow(2).mean() for t in (out.last_hidden_state, getattr(out, "pooler_output", None)) if t is not None)
    else:
        loss = out.loss
    loss.backward()
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert torch.isfinite(loss) and not missing, missing[:3]


@pytest.mark.parametrize("attn", [a for a in ATTN if a[0] != "none"], ids=lambda a: "-".join(str(v) for v in a))
@pytest.mark.parametrize("family", ("gpt2", "bart"))
def test_every_attention_form_saves_and_loads(family, attn, tmp_path):
    task = F.tasks_of(family)[-1]
    peft = randomize(get_peft_model(F.make_model(family, task), point(task, attn, ("adapter", "parallel"))))
    batch = F.make_batch(family, task)
    expected = run(peft, batch)
    peft.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(F.make_model(family, task), tmp_path)
    assert isinstance(loaded.peft_config["default"], UnifiedConfig)
    if attn[0].startswith("prefix") and (attn[1] == "concat" or attn[2] == "gate_add"):
        expected_sites = ("decoder_self", "encoder_self", "cross") if family == "bart" else ("decoder_self",)
        assert loaded.base_model.prompt_encoder["default"].sites == expected_sites  # Li & Liang's three sites
    torch.testing.assert_close(run(loaded, batch), expected, rtol=0, atol=1e-6)
    with loaded.disable_adapter():
        torch.testing.assert_close(run(loaded, batch), run(F.make_model(family, task), batch), rtol=0, atol=0)


def _first(store: dict, key: str, value) -> None:
    store.setdefault(key, value)  # the first call: the first block


# ---- the cross-attention forms -------------------------------------------------------------------------
@pytest.mark.parametrize("family", ("gpt2", "opt", "bert", "roberta"))
def test_cross_attn_noln_equals_the_models_own_attention_over_the_prefix_alone(family):
    """Oracle: prefix tuning (concat) with every real token masked out makes the model's own attention attend to
    the prefix alone, giving W_o softmax(q P_kᵀ/√d) P_v + b_o: the output projection's bias plus our branch."""
    task = F.tasks_of(family)[-1]
    branch = randomize(get_peft_model(F.make_model(family, task), UnifiedConfig(
        task_type=task, attn_mode="prefix_nomlp", attn_option="cross_attn_noln", attn_bn=3)))
    concat = get_peft_model(F.make_model(family, task), PrefixTuningConfig(task_type=task, num_virtual_tokens=3))
    with torch.no_grad():  # the same keys and values: both store PEFT's flat layout, layer i in pair i
        concat.base_model.prompt_encoder["default"].embedding.weight.copy_(
            branch.base_model.prompt_encoder["default"].embedding.weight)
    named = dict(branch.get_base_model().named_modules())
    for name, wrapped in named.items():
        if type(wrapped).__name__ != "CrossPrefixLayer":
            continue
        seen = {}
        model = concat.get_base_model()
        hooks = [model.get_submodule(wrapped.hparams["default"].capture).register_forward_pre_hook(
                     lambda m, args, kwargs: _first(seen, "x", args[0] if args else kwargs["hidden_states"]),
                     with_kwargs=True),
                 model.get_submodule(name).register_forward_hook(lambda m, a, out: _first(seen, "o", out))]
        batch = {k: v for k, v in F.make_batch(family, task).items() if k != "labels"}
        batch["attention_mask"] = torch.zeros_like(batch["attention_mask"])  # only the prefix stays visible
        with torch.no_grad():
            concat(**batch)
            ours = wrapped.delta("default", seen["x"])
        for hook in hooks:
            hook.remove()
        bias = model.get_submodule(name).bias
        torch.testing.assert_close(seen["o"], ours + (bias if bias is not None else 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ("gpt2", "bloom", "deberta"))
def test_query_is_read_from_fused_projections_as_the_model_splits_it(family):
    task = F.tasks_of(family)[0]
    peft = get_peft_model(F.make_model(family, task), UnifiedConfig(
        task_type=task, attn_mode="prefix_nomlp", attn_option="cross_attn_relu", attn_bn=2))
    wrapped = next(m for m in peft.get_base_model().modules() if type(m).__name__ == "CrossPrefixLayer")
    hp = wrapped.hparams["default"]
    x = torch.randn(2, 5, 32)
    fused = hp.query_module(x)
    attention = peft.get_base_model().get_submodule(hp.capture)
    if family == "gpt2":
        expected = fused.split(attention.split_size, dim=2)[0]
    elif family == "bloom":
        expected = attention._reshape(fused)[0].transpose(1, 2).reshape(2, 5, 32)
    else:
        expected = attention.transpose_for_scores(fused).chunk(3, dim=-1)[0].transpose(1, 2).reshape(2, 5, 32)
    # the branch with P_v = identity rows reads q back through ReLU(q P_kᵀ): compare the scores' input instead
    prefix = peft.base_model.prompt_encoder["default"]
    with torch.no_grad():
        prefix.embedding.weight.zero_()
    heads, head_dim = hp.heads, hp.head_dim
    q_heads = expected.view(2, 5, heads, head_dim)
    keys = torch.randn(heads, 2, head_dim)
    values = torch.randn(heads, 2, head_dim)
    flat = torch.stack([keys, values]).permute(2, 0, 1, 3)  # [t, 2, heads, head_dim] for layer 0
    with torch.no_grad():
        rows = prefix.embedding.weight.view(2, -1, heads, head_dim)
        layer = hp.layer
        rows[:, 2 * layer] = flat[:, 0]
        rows[:, 2 * layer + 1] = flat[:, 1]
    scores = torch.einsum("bthd,hld->bhtl", q_heads, keys) / head_dim ** 0.5
    branch = torch.einsum("bhtl,hld->bthd", scores.relu(), values).reshape(2, 5, heads * head_dim)
    projection = wrapped.weight
    reference = branch @ projection if family == "gpt2" else branch @ projection.t()
    torch.testing.assert_close(wrapped.delta("default", x), reference, rtol=1e-5, atol=1e-5)


def test_cross_forms_work_where_concat_prefixes_cannot():
    """DeBERTa's attention reads no cache, so prefix tuning (concat) is refused; the branch forms need none."""
    peft = randomize(get_peft_model(F.make_model("deberta", "SEQ_CLS"), UnifiedConfig(
        task_type="SEQ_CLS", attn_mode="prefix", attn_option="cross_attn", attn_bn=3, mid_dim=8)))
    batch = F.make_batch("deberta", "SEQ_CLS")
    with peft.disable_adapter():
        base = run(peft, batch)
    assert not torch.allclose(run(peft, batch), base, atol=1e-4)
