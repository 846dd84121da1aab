"""Model-level adapter parts (tensors one adapter shares across its layers) and their checkpoint keys. The
whole path (plan, load, save, delete, PEFT's files) runs through VeRA in tests/test_properties.py."""
from __future__ import annotations

import torch

from unipeft.engine.checkpoint import KEY_PREFIX, file_key
from unipeft.engine.model_parts import SharedTensors


def test_file_keys_follow_hf_peft_s_layout():
    assert file_key("transformer.h.0.attn.c_attn.lora_A.weight", KEY_PREFIX) == \
        "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"  # a module's tensor: under the model
    assert file_key("prompt_embeddings", KEY_PREFIX) == "prompt_embeddings"  # prompt methods: top level
    assert file_key("base_model.vera_A", KEY_PREFIX) == "base_model.vera_A"  # model-level parts: on the tuner


def test_parts_are_frozen_buffers_saved_under_the_tuner_unless_told_not_to():
    a, b = torch.randn(2, 3), torch.randn(4, 2)
    parts = SharedTensors({"vera_A": a, "vera_B": b})
    assert list(parts.parameters()) == [] and dict(parts.named_buffers()).keys() == {"vera_A", "vera_B"}
    saved = parts.checkpoint_tensors()
    assert saved.keys() == {"base_model.vera_A", "base_model.vera_B"} and torch.equal(saved["base_model.vera_A"], a)
    assert parts.to(torch.bfloat16).vera_B.dtype == torch.bfloat16  # they move with the model
    assert SharedTensors({"vera_A": a}, saved=False).checkpoint_tensors() == {}
