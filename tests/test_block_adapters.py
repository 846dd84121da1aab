"""Bottleneck adapters (Houlsby, Pfeiffer, parallel, scaled parallel) and points of the unified design space
(MAM, LoRA + adapter unions): where each form reads and writes, presets as points of the design space,
composition, gradient checkpointing, counts at full size, bad input. The section-4 properties of every method
run in tests/test_properties.py.

Oracles from outside the code under test: the untouched base model, hand formulas, and the base model with
its own weights edited by hand (a sequential adapter whose ReLU never clips is a linear map, so it equals a
changed output projection).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

import families as F
from adapter_checks import is_adapter_param, loss_of, randomize, run
from capabilities import R, make
from unipeft import (
    ConfigError, HoulsbyConfig, ParallelAdapterConfig, PfeifferConfig, ScaledParallelAdapterConfig, get_peft_model,
)
from unipeft.methods.unified import MAMConfig, UnifiedConfig


@pytest.mark.parametrize("method", ("parallel", "pfeiffer", "cross_attn"))
@pytest.mark.parametrize("family", ("gpt2", "bert", "t5", "llama"))
def test_gradient_checkpointing_gives_the_same_gradients(method, family):
    """A checkpointed block recomputes its forward in backward: the hooks capture the site input again."""
    task = F.tasks_of(family)[-1]
    grads = []
    for checkpointing in (False, True):
        peft = make(method, family, task)
        if checkpointing:
            peft.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft.train()
        loss_of(peft(**F.make_batch(family, task)), task).backward()
        grads.append({n: p.grad for n, p in peft.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


# ---- 11: counts ---------------------------------------------------------------------------------------
def bottleneck_numel(d: int, r: int, norm: bool = False, learned_scale: bool = False) -> int:
    return 2 * d * r + r + d + (2 * d if norm else 0) + (1 if learned_scale else 0)


@pytest.mark.parametrize("name,make_model", [("bert-base", "bert"), ("gpt2", "gpt2")])
def test_counts_on_full_size_configs(name, make_model):
    import transformers as T

    config = T.BertConfig() if make_model == "bert" else T.GPT2Config()
    d, layers = config.hidden_size, config.num_hidden_layers
    with torch.device("meta"):
        base_total = sum(p.numel() for p in T.AutoModel.from_config(config).parameters())
    presets = [
        (HoulsbyConfig(bottleneck_size=64), 2 * layers * bottleneck_numel(d, 64)),
        (PfeifferConfig(bottleneck_size=48, layernorm_option="in"), layers * bottleneck_numel(d, 48, norm=True)),
        (ParallelAdapterConfig(bottleneck_size=512), layers * bottleneck_numel(d, 512)),
        (ScaledParallelAdapterConfig(bottleneck_size=512, scalar="learnable_scalar"),
         layers * bottleneck_numel(d, 512, learned_scale=True)),
    ]
    for preset, expected in presets:
        with torch.device("meta"):
            peft = get_peft_model(T.AutoModel.from_config(config), preset)
        assert peft.get_nb_trainable_parameters() == (expected, base_total + expected), type(preset).__name__
    # MAM: a prefix of l = 30 through an 800-wide MLP (training only) plus the scaled parallel adapter r = 512
    kv = layers * 2 * d
    adapter = layers * bottleneck_numel(d, 512)
    with torch.device("meta"):
        peft = get_peft_model(T.AutoModel.from_config(config), MAMConfig())
    mlp = 30 * d + (d * 800 + 800) + (800 * kv + kv)
    assert peft.get_nb_trainable_parameters() == (mlp + adapter, base_total + mlp + adapter)
    assert peft.get_nb_inference_parameters() == (30 * kv + adapter, base_total + 30 * kv + adapter)


# ---- semantics: where each form reads and writes --------------------------------------------------------
# The output projections of each family's attention and FFN blocks, written down from the model code.
OUT_PROJECTIONS = {
    "bert": ("attention.output.dense", "output.dense"), "roberta": ("attention.output.dense", "output.dense"),
    "deberta": ("attention.output.dense", "output.dense"), "deberta-v2": ("attention.output.dense", "output.dense"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"), "bloom": ("self_attention.dense", "mlp.dense_4h_to_h"),
    "opt": ("self_attn.out_proj", "fc2"), "gpt_neo": ("attn.attention.out_proj", "mlp.c_proj"),
    "gptj": ("attn.out_proj", "mlp.fc_out"), "t5": ("SelfAttention.o", "DenseReluDense.wo"),
    "bart": ("self_attn.out_proj", "fc2"), "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.down_proj"), "mistral": ("self_attn.o_proj", "mlp.down_proj"),
}


def fold_linear_adapter(projection: nn.Module, down: nn.Linear, up: nn.Linear) -> None:
    """Edit `projection` in place so that it computes h + up(down(h)) for its old output h."""
    with torch.no_grad():
        d = up.weight.shape[0]
        m = torch.eye(d) + up.weight @ down.weight  # [d, d]
        shift = up.weight @ down.bias + up.bias
        old_bias = projection.bias if projection.bias is not None else torch.zeros(d)
        if isinstance(projection, Conv1D):  # weight [in, out]
            projection.weight.copy_(projection.weight @ m.t())
        else:
            projection.weight.copy_(m @ projection.weight)
        projection.bias = nn.Parameter(m @ old_bias + shift)


@pytest.mark.parametrize("family", F.FAMILIES)
def test_sequential_adapter_equals_edited_output_projections(family):
    """Houlsby with a ReLU that never clips (down bias +50) is linear: the base model with each attention
    and FFN output projection W replaced by (I + U D) W gives the same output."""
    task = F.tasks_of(family)[-1]
    peft = get_peft_model(F.make_model(family, task), HoulsbyConfig(task_type=task, bottleneck_size=R))
    randomize(peft)
    edited = F.make_model(family, task)
    folded = 0
    for name, module in peft.get_base_model().named_modules():
        if hasattr(module, "adapter_down"):
            down, up = module.adapter_down["default"], module.adapter_up["default"]
            with torch.no_grad():
                down.bias.fill_(50.0)
                up.weight.mul_(0.01)
            assert name.endswith(OUT_PROJECTIONS[family]), name
            fold_linear_adapter(edited.get_submodule(name), down, up)
            folded += 1
    blocks = sum(1 for n, m in edited.named_modules() if n.endswith(OUT_PROJECTIONS[family][0]))
    assert folded == 2 * blocks
    batch = F.make_batch(family, task)
    torch.testing.assert_close(run(peft, batch), run(edited, batch), rtol=1e-4, atol=1e-4)


# FFN blocks that are one module: the parallel adapter reads its input and adds to its output.
FFN_MODULES = {"gpt2": "mlp", "gpt_neo": "mlp", "gptj": "mlp", "bloom": "mlp", "t5": "DenseReluDense",
               "llama": "mlp", "qwen2": "mlp", "mistral": "mlp"}


@pytest.mark.parametrize("norm", ("none", "in", "out"))
@pytest.mark.parametrize("family", sorted(FFN_MODULES))
def test_parallel_adapter_reads_ffn_input_and_adds_to_its_output(family, norm):
    task = F.tasks_of(family)[-1]
    config = ScaledParallelAdapterConfig(task_type=task, bottleneck_size=R, layernorm_option=norm)
    peft = randomize(get_peft_model(F.make_model(family, task), config))
    reference = F.make_model(family, task)
    adapters = {n.rsplit(".", 1)[0]: m for n, m in peft.get_base_model().named_modules() if hasattr(m, "adapter_down")}
    for ffn_name, adapter in adapters.items():  # the FFN module holding the wrapped output projection
        assert ffn_name.endswith(FFN_MODULES[family])
        down, up = adapter.adapter_down["default"], adapter.adapter_up["default"]
        ln = adapter.adapter_norm["default"] if norm != "none" else None

        def add_parallel(module, args, output, down=down, up=up, ln=ln):
            z = ln(args[0]) if norm == "in" else args[0]
            change = 4.0 * up(torch.relu(down(z)))
            return output + (ln(change) if norm == "out" else change)
        reference.get_submodule(ffn_name).register_forward_hook(add_parallel)
    batch = F.make_batch(family, task)
    torch.testing.assert_close(run(peft, batch), run(reference, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ("gpt2", "bert"))
def test_pfeiffer_reads_the_residual_stream(family):
    """Pre-norm GPT-2: z = FFN output + the residual (ln_2's input). Post-norm BERT: z = LayerNorm(h + x)."""
    task = F.tasks_of(family)[-1]
    peft = randomize(get_peft_model(F.make_model(family, task), PfeifferConfig(task_type=task, bottleneck_size=R)))
    reference = F.make_model(family, task)
    blocks = reference.transformer.h if family == "gpt2" else reference.encoder.layer
    for i, block in enumerate(blocks):
        prefix = f"transformer.h.{i}.mlp.c_proj" if family == "gpt2" else f"encoder.layer.{i}.output.dense"
        adapter = peft.get_base_model().get_submodule(prefix)
        down, up = adapter.adapter_down["default"], adapter.adapter_up["default"]
        seen = {}
        if family == "gpt2":
            block.ln_2.register_forward_pre_hook(lambda m, args, seen=seen: seen.update(residual=args[0]))
            out_proj = block.mlp.c_proj
            stream = lambda h, seen=seen: h + seen["residual"]  # noqa: E731
        else:
            block.output.register_forward_pre_hook(lambda m, args, seen=seen: seen.update(residual=args[1]))
            out_proj = block.output.dense
            stream = lambda h, seen=seen, ln=block.output.LayerNorm: ln(h + seen["residual"])  # noqa: E731
        out_proj.register_forward_hook(lambda m, a, h, stream=stream, down=down, up=up: h + up(torch.relu(down(stream(h)))))
    batch = F.make_batch(family, task)
    torch.testing.assert_close(run(peft, batch), run(reference, batch), rtol=1e-5, atol=1e-5)


# ---- presets are points of the design space -----------------------------------------------------------------
PRESET_POINTS = [
    (HoulsbyConfig(bottleneck_size=R),
     UnifiedConfig(attn_mode="adapter", attn_option="sequential", attn_bn=R, ffn_mode="adapter", ffn_option="sequential", ffn_bn=R)),
    (PfeifferConfig(bottleneck_size=R), UnifiedConfig(ffn_mode="adapter", ffn_option="pfeiffer", ffn_bn=R)),
    (ParallelAdapterConfig(bottleneck_size=R), UnifiedConfig(ffn_mode="adapter", ffn_option="parallel", ffn_bn=R)),
    (ScaledParallelAdapterConfig(bottleneck_size=R),
     UnifiedConfig(ffn_mode="adapter", ffn_option="parallel", ffn_bn=R, ffn_adapter_scalar="4")),
    (MAMConfig(attn_bn=3, ffn_bn=R, mid_dim=8),
     UnifiedConfig(attn_mode="prefix", attn_option="concat", attn_composition="add", attn_bn=3, mid_dim=8,
                   ffn_mode="adapter", ffn_option="parallel", ffn_adapter_scalar=4, ffn_bn=R)),
]


@pytest.mark.parametrize("preset,point", PRESET_POINTS, ids=lambda c: type(c).__name__)
@pytest.mark.parametrize("family", ("gpt2", "bart", "llama"))
def test_presets_equal_their_point_of_the_design_space(preset, point, family, tmp_path):
    task = F.tasks_of(family)[-1]
    preset.task_type = point.task_type = task
    named = randomize(get_peft_model(F.make_model(family, task), preset))
    spelled = get_peft_model(F.make_model(family, task), point)
    state = {k.replace(".default.", "."): v for k, v in named.state_dict().items() if is_adapter_param(k)}
    own = {k.replace(".default.", "."): k for k in spelled.state_dict() if is_adapter_param(k)}
    assert state.keys() == own.keys()
    spelled.load_state_dict({own[k]: v for k, v in state.items()}, strict=False)
    batch = F.make_batch(family, task)
    torch.testing.assert_close(run(spelled, batch), run(named, batch), rtol=0, atol=1e-6)


# ---- composition: adapters of different methods active together ---------------------------------------------
@pytest.mark.parametrize("family", ("gpt2", "bert", "t5", "llama"))
def test_lora_and_parallel_adapter_compose_as_separate_adapters_or_one_union(family):
    from unipeft import LoraConfig

    task = F.tasks_of(family)[-1]
    union = randomize(get_peft_model(F.make_model(family, task), UnifiedConfig(
        task_type=task, attn_mode="lora", attn_bn=R, lora_alpha=8, ffn_mode="adapter", ffn_option="parallel", ffn_bn=R)))
    separate = get_peft_model(F.make_model(family, task), LoraConfig(task_type=task, r=R, lora_alpha=8), adapter_name="lora")
    separate.add_adapter("ffn", ParallelAdapterConfig(task_type=task, bottleneck_size=R))
    separate.set_adapter(["lora", "ffn"])
    mine = dict(separate.named_parameters())
    with torch.no_grad():
        for n, p in union.named_parameters():
            if ".lora_" in n or ".adapter_" in n:
                mine[n.replace(".default.", ".lora." if ".lora_" in n else ".ffn.")].copy_(p)
            elif ".modules_to_save." in n:
                for adapter in ("lora", "ffn"):
                    mine[n.replace(".default.", f".{adapter}.")].copy_(p)
    batch = F.make_batch(family, task)
    torch.testing.assert_close(run(separate, batch), run(union, batch), rtol=1e-6, atol=1e-6)


def test_a_sequential_adapter_wraps_lora_on_the_same_projection():
    """Two methods on one module nest: the adapter sees the LoRA-adapted output; delete restores the layer."""
    from unipeft import LoraConfig

    task = "CAUSAL_LM"
    peft = get_peft_model(F.make_model("gpt2", task), LoraConfig(task_type=task, target_modules=["mlp.c_proj"], r=R,
                                                                 init_lora_weights=False), adapter_name="lora")
    peft.add_adapter("seq", PfeifferConfig(task_type=task, bottleneck_size=R, adapter_option="sequential"))
    randomize(peft, "seq")
    peft.set_adapter(["lora", "seq"])
    batch = F.make_batch("gpt2", task)
    lora_only = get_peft_model(F.make_model("gpt2", task), LoraConfig(task_type=task, target_modules=["mlp.c_proj"], r=R))
    lora_state = {k.replace(".base_layer.lora_", ".lora_").replace(".lora.", ".default."): v
                  for k, v in peft.state_dict().items() if ".lora_" in k}
    assert not lora_only.load_state_dict(lora_state, strict=False).unexpected_keys
    reference, hooks = lora_only.get_base_model(), []
    for i in range(2):
        wrapped = peft.get_base_model().transformer.h[i].mlp.c_proj
        down, up = wrapped.adapter_down["seq"], wrapped.adapter_up["seq"]
        hooks.append(reference.transformer.h[i].mlp.c_proj.register_forward_hook(
            lambda m, a, h, down=down, up=up: h + up(torch.relu(down(h)))))
    torch.testing.assert_close(run(peft, batch), run(reference, batch), rtol=1e-5, atol=1e-5)
    for hook in hooks:
        hook.remove()
    peft.delete_adapter("seq")
    torch.testing.assert_close(run(peft, batch), run(lora_only, batch), rtol=0, atol=0)


# ---- 12: bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    (dict(sites=["attention"], adapter_option="pfeiffer"), "pfeiffer"),
    (dict(sites=["embeddings"]), "sites"),
    (dict(bottleneck_size=0), "bottleneck_size"),
    (dict(adapter_dropout=1.5), "adapter_dropout"),
])
def test_bottleneck_config_errors(kwargs, message):
    from unipeft import BottleneckConfig

    with pytest.raises(ConfigError, match=message):
        BottleneckConfig(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(attn_mode="adapter", attn_option="concat"), "attn_option='concat' conflicts with attn_mode='adapter'"),
    (dict(attn_mode="lora", attn_option="parallel"), "attn_option='parallel' conflicts with attn_mode='lora'"),
    (dict(attn_mode="adapter", attn_composition="gate_add"), "gate_add"),
    (dict(ffn_mode="lora", ffn_option="parallel"), "ffn_option='parallel' conflicts with ffn_mode='lora'"),
    (dict(ffn_mode="adapter", ffn_adapter_scalar="big"), "ffn_adapter_scalar"),
    (dict(), "both 'none'"),
    (dict(attn_mode="prefix", attn_bn=0), "attn_bn"),
])
def test_unified_config_names_the_conflict(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        UnifiedConfig(**kwargs)


def test_mam_on_a_model_without_cache_is_refused_before_the_model_changes():
    model = F.make_model("deberta", "SEQ_CLS")
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ConfigError, match="reads a key/value cache"):
        get_peft_model(model, MAMConfig(task_type="SEQ_CLS", attn_bn=3, ffn_bn=R, mid_dim=8))
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_unknown_family_is_refused_clearly():
    import transformers as T

    model = T.AutoModel.from_config(T.ElectraConfig(vocab_size=50, embedding_size=16, hidden_size=16,
                                                    num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ConfigError, match="block sites .* of model_type .electra., which are not known"):
        get_peft_model(model, HoulsbyConfig(bottleneck_size=R))
