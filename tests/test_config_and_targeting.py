"""Config round-trips and the one targeting implementation, with hand-written expectations."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import families as F
from unipeft import LoraConfig, PeftConfig, TargetError, TaskType, get_peft_config, get_peft_model
from unipeft.engine.layers import AdapterLayer


def wrapped_names(pm) -> list[str]:
    return sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, AdapterLayer))


def test_config_json_round_trip(tmp_path):
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=6, lora_alpha=12, target_modules=["q_proj", "v_proj"],
                        rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3.5}, layers_to_transform=[1],
                        layers_pattern="layers", use_rslora=True, init_lora_weights="gaussian")
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["task_type"] == "CAUSAL_LM" and data["inference_mode"] is True
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LoraConfig)
    for key in ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "layers_to_transform",
                "layers_pattern", "use_rslora", "init_lora_weights"):
        assert getattr(loaded, key) == getattr(config, key), key
    assert loaded.task_type is TaskType.CAUSAL_LM


def test_get_peft_config_from_dict():
    config = get_peft_config({"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 3, "target_modules": ["query"]})
    assert isinstance(config, LoraConfig) and config.r == 3 and config.task_type is TaskType.SEQ_CLS


def test_set_of_targets_is_normalised_to_sorted_list():
    assert LoraConfig(target_modules={"v", "q"}).target_modules == ["q", "v"]


def test_family_defaults_are_recorded_in_the_saved_config():
    pm = get_peft_model(F.make_model("bloom", "CAUSAL_LM"), LoraConfig(task_type="CAUSAL_LM"))
    assert pm.peft_config["default"].target_modules == ["query_key_value"]
    assert wrapped_names(pm) == [f"transformer.h.{i}.self_attention.query_key_value" for i in (0, 1)]


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")  # HF PEFT's, as it records the same
@pytest.mark.parametrize("method", ["LoraConfig", "IA3Config", "VeraConfig"])
def test_what_planning_records_goes_to_the_adapter_s_config_never_the_caller_s(method):
    """On GPT-2 HF PEFT records the family's default targets and fan_in_fan_out=True (its Conv1D keeps weights as
    [in, out]) in the adapter's config; so do we, on a copy: the config object the caller passed stays as given."""
    import peft

    given = getattr(__import__("unipeft"), method)(task_type="CAUSAL_LM")
    pm = get_peft_model(F.make_model("gpt2", "CAUSAL_LM"), given)
    reference = peft.get_peft_model(F.make_model("gpt2", "CAUSAL_LM"), getattr(peft, method)(task_type="CAUSAL_LM"))
    recorded, expected = pm.peft_config["default"], reference.peft_config["default"]
    assert sorted(recorded.target_modules) == sorted(expected.target_modules)
    assert recorded.fan_in_fan_out is expected.fan_in_fan_out is True
    assert given.target_modules is None and given.fan_in_fan_out is False


def test_suffix_matching_is_by_whole_name_component():
    # An entry matches a whole trailing name component: "query_proj" matches, a fragment like "uery" does not.
    pm = get_peft_model(F.make_model("deberta-v2", "FEATURE_EXTRACTION"), LoraConfig(target_modules=["query_proj"]))
    assert wrapped_names(pm) == [f"encoder.layer.{i}.attention.self.query_proj" for i in (0, 1)]
    model = F.make_model("bert", "FEATURE_EXTRACTION")
    with pytest.raises(TargetError, match="matched no module"):
        get_peft_model(model, LoraConfig(target_modules=["uery"]))


def test_regex_must_match_the_full_name():
    pm = get_peft_model(F.make_model("llama", "CAUSAL_LM"), LoraConfig(target_modules=r".*\.1\.self_attn\.(q|k)_proj"))
    assert wrapped_names(pm) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj"]


def test_all_linear_skips_output_layer_and_heads():
    pm = get_peft_model(F.make_model("opt", "CAUSAL_LM"), LoraConfig(target_modules="all-linear"))
    expected = [f"model.decoder.layers.{i}.{m}" for i in (0, 1)
                for m in ("fc1", "fc2", "self_attn.k_proj", "self_attn.out_proj", "self_attn.q_proj", "self_attn.v_proj")]
    assert wrapped_names(pm) == sorted(expected)  # no lm_head
    cls = get_peft_model(F.make_model("roberta", "SEQ_CLS"), LoraConfig(task_type="SEQ_CLS", target_modules="all-linear"))
    assert not any(n.startswith("classifier") for n in wrapped_names(cls))
    assert len(wrapped_names(cls)) == 12  # 6 linear layers per block, 2 blocks


def test_all_linear_includes_gpt2_conv1d():
    pm = get_peft_model(F.make_model("gpt2", "CAUSAL_LM"), LoraConfig(target_modules="all-linear"))
    assert wrapped_names(pm) == sorted(f"transformer.h.{i}.{m}" for i in (0, 1)
                                       for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert pm.peft_config["default"].fan_in_fan_out is True


def test_exclude_modules_and_layers_to_transform():
    pm = get_peft_model(F.make_model("mistral", "CAUSAL_LM"),
                        LoraConfig(target_modules=["q_proj", "k_proj", "v_proj"], exclude_modules=["k_proj"], layers_to_transform=1))
    assert wrapped_names(pm) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    t5 = get_peft_model(F.make_model("t5", "SEQ_2_SEQ_LM"), LoraConfig(target_modules=["q"], layers_to_transform=[0], layers_pattern="block"))
    assert wrapped_names(t5) == ["decoder.block.0.layer.0.SelfAttention.q", "decoder.block.0.layer.1.EncDecAttention.q",
                                 "encoder.block.0.layer.0.SelfAttention.q"]


def test_rank_and_alpha_patterns_set_per_layer_shapes_and_scaling():
    pm = get_peft_model(F.make_model("llama", "CAUSAL_LM"),
                        LoraConfig(r=4, lora_alpha=8, rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 1}))
    layers = dict((n.removeprefix("base_model.model."), m) for n, m in pm.named_modules() if isinstance(m, AdapterLayer))
    assert layers["model.layers.1.self_attn.q_proj"].lora_A["default"].weight.shape[0] == 2
    assert layers["model.layers.0.self_attn.q_proj"].lora_A["default"].weight.shape[0] == 4
    assert layers["model.layers.1.self_attn.q_proj"].hparams["default"].scaling == 8 / 2
    assert layers["model.layers.0.self_attn.v_proj"].hparams["default"].scaling == 1 / 4


def test_rslora_scaling():
    pm = get_peft_model(F.make_model("llama", "CAUSAL_LM"), LoraConfig(r=16, lora_alpha=8, use_rslora=True))
    layer = next(m for m in pm.modules() if isinstance(m, AdapterLayer))
    assert layer.hparams["default"].scaling == 8 / 4


def test_lora_forward_equals_explicit_formula():
    """h = W x + b + (alpha/r) B A x, computed by hand from the layer's own tensors."""
    model = F.make_model("llama", "CAUSAL_LM")
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=6, init_lora_weights=False))
    layer = next(m for m in pm.modules() if isinstance(m, AdapterLayer))
    x = torch.randn(2, 5, layer.base_layer.in_features)
    A, B, W = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.base_layer.weight
    expected = x @ W.T + (6 / 4) * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)


def test_import_is_lazy():
    code = "import sys, unipeft; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])  # Linear without bias, Conv1D, Linear with bias
def test_lora_gradients_equal_plain_autograd_of_the_formula(family):
    """The training path (one active adapter) must give the gradients of h = W x + b + s B A x."""
    pm = get_peft_model(F.make_model(family, "CAUSAL_LM"), LoraConfig(r=4, lora_alpha=6, init_lora_weights=False))
    pm.train()
    layer = next(m for m in pm.modules() if isinstance(m, AdapterLayer))
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    W, b = layer.base_layer.weight, layer.base_layer.bias
    W_out_in = W.T if type(layer.base_layer).__name__ == "Conv1D" else W
    x = torch.randn(2, 5, W_out_in.shape[1], requires_grad=True)
    out = layer(x)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, A, B), g)

    A2, B2, x2 = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    expected_out = x2 @ W_out_in.T + (0 if b is None else b) + (6 / 4) * (x2 @ A2.T @ B2.T)
    want = torch.autograd.grad(expected_out, (x2, A2, B2), g)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
    for name, a, e in zip(("x", "A", "B"), got, want):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5, msg=name)
