"""DoRA (`LoraConfig(use_dora=True)`): HF PEFT interop both ways, the norm without B·A,
counts, and bad input. The section-4 properties on every cell run in tests/test_properties.py."""
from __future__ import annotations

import peft
import pytest
import torch
import transformers as T

import families as F
from adapter_checks import randomize, run
from unipeft import ConfigError, LoraConfig, PeftModel, TargetError, get_peft_model
from unipeft.methods.dora import row_norms

CELLS = [("gpt2", "CAUSAL_LM"), ("bert", "SEQ_CLS"), ("t5", "SEQ_2_SEQ_LM"), ("llama", "CAUSAL_LM")]


def config(task, lib=None):
    return (lib or __import__("unipeft")).LoraConfig(task_type=task, r=4, lora_alpha=8, use_dora=True,
                                                      init_lora_weights=False)


@pytest.mark.parametrize("family,task", CELLS)
def test_unipeft_adapter_loads_in_peft_with_the_same_outputs(family, task, tmp_path):
    ours = randomize(get_peft_model(F.make_model(family, task), config(task)))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(F.make_model(family, task), tmp_path).eval()
    batch = F.make_batch(family, task)
    torch.testing.assert_close(run(theirs, batch), run(ours, batch), rtol=1e-5, atol=1e-5)
    assert any(k.endswith("lora_magnitude_vector") for k, _ in theirs.named_modules())


@pytest.mark.parametrize("family,task", CELLS)
def test_peft_adapter_loads_in_unipeft_with_the_same_outputs_and_gradients(family, task, tmp_path):
    torch.manual_seed(0)
    theirs = peft.get_peft_model(F.make_model(family, task), config(task, peft))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(0.1 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(F.make_model(family, task), tmp_path, is_trainable=True)
    batch = F.make_batch(family, task)
    torch.testing.assert_close(run(ours, batch), run(theirs.eval(), batch), rtol=1e-5, atol=1e-5)
    grads = []
    for model in (ours, theirs):  # the norm is a constant in backward in both (DoRA §4.3)
        model.eval()  # no dropout anywhere (T5 drops attention weights with a float rate, not a module)
        model(**batch).loss.backward()
        grads.append({n.replace("lora_magnitude_vector.default.weight", "lora_magnitude_vector.default"): p.grad
                      for n, p in model.named_parameters() if p.requires_grad and "lora_" in n})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-6)


def test_row_norms_equal_the_norms_of_the_formed_weight():
    torch.manual_seed(0)
    weight, A, B = torch.randn(48, 32), torch.randn(4, 32), torch.randn(48, 4)
    expected = torch.linalg.vector_norm(weight + 0.5 * (B @ A), dim=1)
    torch.testing.assert_close(row_norms(weight, A, B, 0.5), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,make", [("bert-base", T.BertConfig), ("gpt2", T.GPT2Config)])
def test_count_is_lora_plus_one_magnitude_per_output_row(name, make):
    config_ = make()
    d, layers = config_.hidden_size, config_.num_hidden_layers
    with torch.device("meta"):
        model = T.AutoModel.from_config(config_)
        base = sum(p.numel() for p in model.parameters())
        counted = get_peft_model(model, LoraConfig(r=8, use_dora=True)).get_nb_trainable_parameters()
    # bert: query and value (d -> d); gpt2: c_attn (d -> 3d)
    per_layer = 2 * (8 * (d + d) + d) if name == "bert-base" else 8 * (d + 3 * d) + 3 * d
    assert counted == (layers * per_layer, base + layers * per_layer)


def test_dora_on_an_embedding_is_refused_before_the_model_changes():
    model = F.make_model("gpt2", "CAUSAL_LM")
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(TargetError, match="use_dora=True works on Linear and Conv1D layers, not on a Embedding"):
        get_peft_model(model, LoraConfig(target_modules=["wte", "c_attn"], use_dora=True))
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_add_weighted_adapter_refuses_dora_and_adds_nothing():
    model = get_peft_model(F.make_model("llama", "CAUSAL_LM"), config("CAUSAL_LM"))
    model.add_adapter("other", config("CAUSAL_LM"))
    with pytest.raises(ConfigError, match="plain LoRA adapters .*not DoRA"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix", combination_type="cat")
    assert sorted(model.peft_config) == ["default", "other"]


def test_add_weighted_adapter_refuses_other_methods_by_name_and_adds_nothing():
    from unipeft import IA3Config

    model = get_peft_model(F.make_model("llama", "CAUSAL_LM"), IA3Config(task_type="CAUSAL_LM"))
    model.add_adapter("other", IA3Config(task_type="CAUSAL_LM"))
    with pytest.raises(ConfigError, match="IA3 adapters cannot be combined; it combines LoRA adapters"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")
    with pytest.raises(ConfigError, match="no adapters given"):
        model.add_weighted_adapter([], [], "mix")
    assert sorted(model.peft_config) == ["default", "other"]
