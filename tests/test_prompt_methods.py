"""Prompt tuning, P-tuning, prefix tuning and IDPG: what only prompts do. The section-4 properties run in
tests/test_properties.py.

Oracles: the untouched base model fed the prompt vectors as `inputs_embeds` by hand, and a training network
saved next to the flat prompt so that training resumes where it stopped.
"""
from __future__ import annotations

import pytest
import torch

import families as F
from adapter_checks import run
from capabilities import T, cells, make, params
from unipeft import PeftModel


def prompt_params(peft):
    return dict(peft.base_model.prompt_encoder.named_parameters())


@params(cells(("ptuning", "prefix"), ("CAUSAL_LM", "SEQ_CLS")))
def test_reparameterisation_is_saved_and_training_resumes(method, family, task, tmp_path):
    peft = make(method, family, task)
    peft.save_pretrained(tmp_path / "full")
    peft.export_flat(tmp_path / "flat")
    assert (tmp_path / "full" / "adapter_training_state.safetensors").exists()
    assert not (tmp_path / "flat" / "adapter_training_state.safetensors").exists()
    resumed = PeftModel.from_pretrained(F.make_model(family, task), tmp_path / "full", is_trainable=True)
    flat = PeftModel.from_pretrained(F.make_model(family, task), tmp_path / "flat", is_trainable=True)
    original = prompt_params(peft)
    assert {n: p.shape for n, p in prompt_params(resumed).items()} == {n: p.shape for n, p in original.items()}
    for n, p in prompt_params(resumed).items():
        assert torch.equal(p, original[n]) and p.requires_grad
    assert set(prompt_params(flat)) == {"default.embedding.weight"}  # no network in the file: train the vectors
    batch = F.make_batch(family, task)
    torch.testing.assert_close(run(resumed, batch), run(flat, batch))


@pytest.mark.parametrize("family", F.DECODERS)
def test_prompt_tuning_equals_base_model_fed_the_prompt(family):
    """Independent oracle: the untouched base model given [prompt vectors; word embeddings] by hand."""
    peft = make("prompt", family, "CAUSAL_LM")
    batch = F.make_batch(family, "CAUSAL_LM")
    base = F.make_model(family, "CAUSAL_LM")
    prompt = peft.base_model.prompt_encoder["default"].embedding.weight.detach()
    embeds = base.get_input_embeddings()(batch["input_ids"])
    embeds = torch.cat([prompt.expand(embeds.shape[0], -1, -1), embeds], dim=1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    with torch.no_grad():
        expected = base(inputs_embeds=embeds, attention_mask=mask).logits  # LM heads keep the virtual positions
    torch.testing.assert_close(run(peft, batch), expected, rtol=0, atol=1e-5)
    loss = peft(**batch).loss  # labels stay aligned with the user's tokens
    labels = torch.cat([torch.full((embeds.shape[0], T), -100), batch["labels"]], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(loss, base(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss)


@pytest.mark.parametrize("family", ("bert", "roberta", "deberta"))
def test_token_classification_outputs_align_with_input_tokens(family):
    peft = make("prompt", family, "TOKEN_CLS")
    batch = F.make_batch(family, "TOKEN_CLS", length=7)
    out = peft(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    expected = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 3), batch["labels"].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
