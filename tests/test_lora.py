"""LoRA's own oracles on every (family, task) cell; the section-4 properties run in tests/test_properties.py.

HF PEFT's table of default targets gives the modules LoRA adapts and the checkpoint keys it writes; the merged
weights are W + (alpha / r) B A computed here from the adapter's factors.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

import families as F
from adapter_checks import base_tensors, randomize, run
from capabilities import LORA, METHODS, head_paths, peft_targets
from unipeft import get_peft_model

CELLS = [pytest.param(f, t, id=f"{f}-{t}") for f, t in F.MATRIX]


def lora(model: nn.Module, task: str, **overrides):
    config = METHODS["lora"].build(task)
    for key, value in overrides.items():
        setattr(config, key, value)
    return get_peft_model(model, config)


def adapter_layout(model: nn.Module, task: str) -> dict[str, str]:
    """Checkpoint key (HF PEFT layout: no adapter name) -> the PeftModel parameter it holds."""
    layout = {}
    for path in peft_targets(model, task, LORA):
        for ab in "AB":
            layout[f"base_model.model.{path}.lora_{ab}.weight"] = f"base_model.model.{path}.lora_{ab}.default.weight"
    for head in head_paths(model, task):
        for key in model.get_submodule(head).state_dict():
            layout[f"base_model.model.{head}.{key}"] = f"base_model.model.{head}.modules_to_save.default.{key}"
    return layout


@pytest.mark.parametrize("family,task", CELLS)
def test_default_targets_and_checkpoint_keys_are_peft_s(family, task, tmp_path):
    model = F.make_model(family, task)
    layout = adapter_layout(model, task)
    peft = randomize(lora(model, task))
    params = dict(peft.named_parameters())
    assert {n for n, p in params.items() if p.requires_grad} == set(layout.values())
    peft.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors.keys() == layout.keys()
    for key, owner in layout.items():
        assert torch.equal(tensors[key], params[owner]), key


@pytest.mark.parametrize("family,task", CELLS)
def test_merged_weights_are_w_plus_scaled_ba(family, task):
    model = F.make_model(family, task)
    targets = peft_targets(model, task, LORA)
    before = base_tensors(lora(F.make_model(family, task), task))
    peft = randomize(lora(model, task))
    peft.merge_adapter()
    merged = base_tensors(peft)
    for path in targets:
        module = peft.get_base_model().get_submodule(path)
        delta = 2.0 * module.lora_B["default"].weight @ module.lora_A["default"].weight  # alpha / r = 2
        key = f"{path}.base_layer.weight"
        expected = before[key] + (delta.T if isinstance(module.base_layer, Conv1D) else delta)
        assert not torch.allclose(expected, before[key], atol=1e-3)
        torch.testing.assert_close(merged[key], expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("autocast", [False, True], ids=["follow-base", "autocast-fp32"])
@pytest.mark.parametrize("family,task", CELLS)
def test_bf16_factor_dtype(family, task, autocast):
    """LoRA factors follow the base dtype, or are fp32 when asked (autocast_adapter_dtype=True, as in HF PEFT);
    task-head copies keep the base dtype, since they run on the base's activations."""
    model = F.make_model(family, task).to(torch.bfloat16)
    peft = get_peft_model(model, METHODS["lora"].build(task), autocast_adapter_dtype=autocast)
    factors = {n: p for n, p in peft.named_parameters() if ".lora_" in n}
    assert len(factors) == 2 * len(peft_targets(F.make_model(family, task), task, LORA))
    assert all(p.dtype == (torch.float32 if autocast else torch.bfloat16) for p in factors.values())
    assert all(p.dtype == torch.bfloat16 for n, p in peft.named_parameters() if ".modules_to_save." in n)
    batch = F.make_batch(family, task)
    out = run(peft, batch)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()

