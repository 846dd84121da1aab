"""`projection_lr_scale`: the prefix MLP trains as if at a multiple of the learning rate.

The reason it must hold is Adam's: its step m/(sqrt(v) + eps) does not change when a gradient is multiplied
by a constant, so weights kept divided by s and multiplied by s in the forward pass (gradient times s) move by
the same lr-sized step, which is s times as large once multiplied back. The tests compare against the plain
MLP trained at s times the learning rate, which involves none of the scaling code.
"""
from __future__ import annotations

import json

import pytest
import torch

import families as F
import unipeft
from unipeft.methods.prefix import PrefixTuningConfig
from unipeft.methods.unified import MAMConfig, UnifiedConfig, components

SCALE = 0.1


def _model(scale: float, seed: int = 3):
    torch.manual_seed(seed)
    config = PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4, prefix_projection=True,
                                encoder_hidden_size=24, projection_lr_scale=scale)
    return unipeft.get_peft_model(F.make_model("bert", "SEQ_CLS"), config)


def _prompt(model):
    return model.base_model.prompt_encoder["default"]


def _effective_mlp(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in _prompt(model).training_tensors().items()}


def _train(model, lr: float, steps: int = 3) -> None:
    params = list(_prompt(model).parameters())  # the head (also trainable) would learn at different rates
    optimizer = torch.optim.Adam(params, lr=lr, eps=1e-12)  # eps is the one part of Adam that sees the scale
    batch = F.make_batch("bert", "SEQ_CLS")
    model.train()
    for _ in range(steps):
        torch.manual_seed(0)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_the_scaled_mlp_starts_as_the_plain_one():
    plain, scaled = _model(1.0), _model(SCALE)
    torch.testing.assert_close(_prompt(scaled)(), _prompt(plain)())
    for key, value in _effective_mlp(plain).items():
        torch.testing.assert_close(_effective_mlp(scaled)[key], value)
    stored = dict(_prompt(scaled).named_parameters())["encoder.2.weight"]
    torch.testing.assert_close(stored * SCALE, dict(_prompt(plain).named_parameters())["encoder.2.weight"])


def test_adam_moves_the_scaled_mlp_like_the_plain_one_at_a_scaled_learning_rate():
    lr = 1e-2
    plain, scaled, unscaled_same_lr = _model(1.0), _model(SCALE), _model(1.0)
    _train(plain, lr * SCALE)
    _train(scaled, lr)
    _train(unscaled_same_lr, lr)
    start = _prompt(_model(1.0))()
    moved = (_prompt(unscaled_same_lr)() - start).abs().max()
    moved_scaled = (_prompt(scaled)() - start).abs().max()
    # float rounding can flip the sign of a near-zero gradient entry, which Adam's first steps turn into a full
    # step of that weight: allow 1% of the distance moved
    torch.testing.assert_close(_prompt(scaled)(), _prompt(plain)(), rtol=0, atol=0.01 * moved_scaled.item())
    assert moved_scaled < moved / 3  # the scale slows it; without it both would have moved alike


def test_checkpoints_hold_the_effective_mlp_and_resume_with_any_scale(tmp_path):
    scaled = _model(SCALE)
    _train(scaled, 1e-2)
    scaled.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["projection_lr_scale"] == SCALE
    for scale in (SCALE, 1.0):  # the file means the same function whatever the scale that resumes it
        config = PrefixTuningConfig.from_pretrained(tmp_path)
        config.projection_lr_scale = scale
        resumed = unipeft.PeftModel.from_pretrained(F.make_model("bert", "SEQ_CLS"), tmp_path, config=config,
                                                    is_trainable=True)
        assert _prompt(resumed).encoder is not None
        torch.testing.assert_close(_prompt(resumed)(), _prompt(scaled)())


def test_peft_files_are_unchanged_at_the_default_scale():
    config = PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4, prefix_projection=True)
    assert "projection_lr_scale" not in config.to_dict()


def test_design_space_prefixes_train_at_a_tenth_by_default_and_refuse_bad_scales():
    model = F.make_model("bert", "SEQ_CLS")
    prefix = [c for c in components(MAMConfig(task_type="SEQ_CLS", ffn_bn=8), model) if isinstance(c, PrefixTuningConfig)]
    assert [c.projection_lr_scale for c in prefix] == [0.1]
    cross = components(UnifiedConfig(attn_mode="prefix", attn_option="cross_attn", prefix_lr_scale=0.5), model)
    assert [c.projection_lr_scale for c in cross] == [0.5]
    for bad in (0.0, -1.0, 2.0):
        with pytest.raises(unipeft.ConfigError, match="prefix_lr_scale must be in"):
            UnifiedConfig(attn_mode="prefix", prefix_lr_scale=bad)
        with pytest.raises(unipeft.ConfigError, match="projection_lr_scale must be in"):
            PrefixTuningConfig(num_virtual_tokens=4, projection_lr_scale=bad)
