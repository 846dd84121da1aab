"""VeRA's own checks; the section-4 properties and HF PEFT interop with the projections saved run in
tests/test_properties.py.

Oracles: HF PEFT's projections drawn from the same key (without them in the file, both libraries must draw the
same A and B), and the adapted layer written out by hand as W x + λ_b ⊙ (B (λ_d ⊙ (A x))).
"""
from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file

import families as F
from adapter_checks import randomize, run
from unipeft import ConfigError, PeftModel, VeraConfig, get_peft_model


@pytest.mark.parametrize("family,task", [("llama", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM")])
def test_without_saved_projections_both_libraries_draw_the_same_from_the_key(family, task, tmp_path):
    ours = randomize(get_peft_model(F.make_model(family, task), VeraConfig(
        task_type=task, r=8, save_projection=False, projection_prng_key=7)))
    ours.save_pretrained(tmp_path)
    assert not [k for k in load_file(tmp_path / "adapter_model.safetensors") if "vera_A" in k or "vera_B" in k]
    theirs = peft.PeftModel.from_pretrained(F.make_model(family, task), tmp_path).eval()
    batch = F.make_batch(family, task)
    torch.testing.assert_close(run(theirs, batch), run(ours, batch), rtol=1e-5, atol=1e-5)
    reloaded = PeftModel.from_pretrained(F.make_model(family, task), tmp_path)
    torch.testing.assert_close(run(reloaded, batch), run(ours, batch), rtol=0, atol=0)


def test_a_layer_is_w_x_plus_the_scaled_shared_projections():
    peft_model = randomize(get_peft_model(F.make_model("llama", "CAUSAL_LM"), VeraConfig(task_type="CAUSAL_LM", r=8)))
    a, b = peft_model.base_model.model_parts["default"].vera_A, peft_model.base_model.model_parts["default"].vera_B
    layer = peft_model.get_base_model().model.layers[0].self_attn.v_proj  # 32 -> 16 (grouped-query): a slice of B
    x = torch.randn(2, 5, 32)
    lambda_b, lambda_d = layer.vera_lambda_b["default"], layer.vera_lambda_d["default"]
    expected = layer.base_layer(x) + lambda_b * ((lambda_d * (x @ a[:, :32].T)) @ b[:16].T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert a.shape == (8, 32) and b.shape == (32, 8)  # the widest input and output among q_proj (32 -> 32), v_proj


@pytest.mark.parametrize("kwargs,message", [(dict(r=0), "r must be a positive"),
                                            (dict(vera_dropout=1.0), "vera_dropout"),
                                            (dict(layers_pattern="layers"), "layers_to_transform")])
def test_bad_config_names_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        VeraConfig(**kwargs)
