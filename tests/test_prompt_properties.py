"""Prompt tuning, P-tuning and prefix tuning pass the DESIGN.md section-4 properties that apply to them,
on every (family, task) cell of `families.MATRIX` (prefix tuning: every model whose attention reads a cache).

Expected values come from outside the hooks under test where possible: the base model fed the prompt
vectors as `inputs_embeds` by hand, hand-computed parameter counts, and generate() against a greedy loop.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import families as F
import support_matrix
from test_lora_properties import covers
from unipeft import (
    AdapterError, IDPGConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model,
)

T = 3  # virtual tokens
NO_CACHE = {"deberta", "deberta-v2"}  # their attention takes no cache: no prefix tuning
METHODS = {
    "prompt": lambda task: PromptTuningConfig(task_type=task, num_virtual_tokens=T),
    "ptuning": lambda task: PromptEncoderConfig(task_type=task, num_virtual_tokens=T, encoder_hidden_size=16),
    "prefix": lambda task: PrefixTuningConfig(task_type=task, num_virtual_tokens=T, prefix_projection=True, encoder_hidden_size=16),
    "idpg": lambda task: IDPGConfig(task_type=task, num_virtual_tokens=T, generator_hidden_size=16, generator_dropout=0.0),
}


def cells(methods=tuple(METHODS), tasks=None):
    return [
        pytest.param(m, f, t, id=f"{m}-{f}-{t}") for m in methods for f, t in F.MATRIX
        if (tasks is None or t in tasks) and not (m == "prefix" and f in NO_CACHE)
    ]


ALL = cells()
GENERATIVE = cells(tasks=("CAUSAL_LM", "SEQ_2_SEQ_LM"))


def make(method: str, family: str, task: str, seed: int = 0):
    torch.manual_seed(seed)
    peft = get_peft_model(F.make_model(family, task), METHODS[method](task))
    torch.manual_seed(seed + 100)
    with torch.no_grad():  # move away from the init so every check sees a real prompt
        for p in peft.base_model.prompt_encoder.parameters():
            p.normal_(0, 0.5)
    return peft


def run(model, batch) -> torch.Tensor:
    """The main output; seq2seq models keep their labels, from which they build the decoder inputs."""
    keep_labels = model.config.is_encoder_decoder and "decoder_input_ids" not in batch
    with torch.no_grad():
        return F.output_tensor(model(**{k: v for k, v in batch.items() if k != "labels" or keep_labels}))


def loss_of(peft, batch, task) -> torch.Tensor:
    if task == "FEATURE_EXTRACTION":  # no head, no labels: any differentiable function of the output
        return peft(**{k: v for k, v in batch.items() if k != "labels"}).last_hidden_state[..., 0].mean()
    return peft(**batch).loss


def prompt_params(peft):
    return dict(peft.base_model.prompt_encoder.named_parameters())


@covers(1)
@pytest.mark.parametrize("method,family,task", ALL)
def test_only_prompt_and_head_train(method, family, task):
    peft = make(method, family, task)
    batch = F.make_batch(family, task)
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert trainable and all(".prompt_encoder." in n or ".modules_to_save." in n for n in trainable)
    base_before = {n: p.detach().clone() for n, p in peft.named_parameters() if not p.requires_grad}
    prompt_before = {n: p.detach().clone() for n, p in prompt_params(peft).items()}
    opt = torch.optim.Adam([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    peft.train()
    for _ in range(2):
        opt.zero_grad()
        loss_of(peft, batch, task).backward()
        opt.step()
    assert all(torch.equal(p, base_before[n]) for n, p in peft.named_parameters() if n in base_before)
    assert all(not torch.equal(p, prompt_before[n]) for n, p in prompt_params(peft).items())


@covers(3)
@pytest.mark.parametrize("method,family,task", ALL)
def test_loss_decreases(method, family, task):
    peft = make(method, family, task)
    batch = F.make_batch(family, task)
    if task == "SEQ_CLS":  # one class: reachable even where the pooled position is a virtual token (BERT)
        batch["labels"] = torch.zeros_like(batch["labels"])
    opt = torch.optim.Adam([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = loss_of(peft, batch, task)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@covers(4)
@pytest.mark.parametrize("method,family,task", ALL)
def test_save_load_round_trip(method, family, task, tmp_path):
    peft = make(method, family, task)
    batch = F.make_batch(family, task)
    expected = run(peft, batch)
    peft.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    stored = "base_model.prompt_encoder.generator.4.weight" if method == "idpg" else "prompt_embeddings"
    assert stored in keys and all(k == "prompt_embeddings" or k.startswith("base_model.") for k in keys)
    assert all(".modules_to_save." not in k and "word_embeddings" not in k for k in keys)
    for name in ("default", "other"):
        loaded = PeftModel.from_pretrained(F.make_model(family, task), tmp_path, adapter_name=name)
        torch.testing.assert_close(run(loaded, batch), expected, rtol=0, atol=1e-6)  # fp32 rounding only


@covers(4)
@pytest.mark.parametrize("method,family,task", cells(("ptuning", "prefix"), ("CAUSAL_LM", "SEQ_CLS")))
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


@covers(6)
@pytest.mark.parametrize("method,family,task", ALL)
def test_disable_gives_base_output(method, family, task):
    peft = make(method, family, task)
    batch = F.make_batch(family, task)
    base = run(F.make_model(family, task), batch)
    adapted = run(peft, batch)
    assert adapted.shape != base.shape or not torch.allclose(adapted, base)
    with peft.disable_adapter():
        torch.testing.assert_close(run(peft, batch), base, rtol=0, atol=0)
    torch.testing.assert_close(run(peft, batch), adapted, rtol=0, atol=0)


@covers(7)
@pytest.mark.parametrize("method,family,task", cells(tasks=("SEQ_CLS", "CAUSAL_LM", "SEQ_2_SEQ_LM")))
def test_two_adapters_switch_and_delete(method, family, task):
    first, second = make(method, family, task, seed=0), make(method, family, task, seed=1)
    batch = F.make_batch(family, task)
    expected = {"default": run(first, batch), "second": run(second, batch)}
    both = make(method, family, task, seed=0)
    both.add_adapter("second", METHODS[method](task))
    both.base_model.prompt_encoder["second"].load_state_dict(second.base_model.prompt_encoder["default"].state_dict())
    heads = [m for _, m in both.named_modules() if hasattr(m, "modules_to_save")]
    for head in heads:
        source = second.get_submodule(next(n for n, m in both.named_modules() if m is head)).modules_to_save["default"]
        head.modules_to_save["second"].load_state_dict(source.state_dict())
    for name in ("second", "default", "second"):
        both.set_adapter(name)
        torch.testing.assert_close(run(both, batch), expected[name], rtol=0, atol=1e-6)
    both.delete_adapter("second")
    assert both.active_adapters == ["default"] and "second" not in both.base_model.prompt_encoder
    torch.testing.assert_close(run(both, batch), expected["default"], rtol=0, atol=1e-6)


@covers(8)
@pytest.mark.parametrize("method", METHODS)
def test_mixed_batch_is_refused_clearly(method):
    peft = make(method, "gpt2", "CAUSAL_LM")
    batch = F.make_batch("gpt2", "CAUSAL_LM")
    with pytest.raises(AdapterError, match="cannot be mixed in one batch"):
        peft(**batch, adapter_names=["default", "__base__", "default"])


# ---- generate ---------------------------------------------------------------------------------------
def greedy_by_forward(peft, ids, steps, encoder_decoder):
    """Greedy decoding by full forward passes of the PeftModel: no cache, no generate()."""
    if encoder_decoder:
        start = peft.config.decoder_start_token_id
        out = torch.full((ids.shape[0], 1), start)
        for _ in range(steps):
            logits = run(peft, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": out})
            out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return out
    out = ids
    for _ in range(steps):
        logits = run(peft, {"input_ids": out, "attention_mask": torch.ones_like(out)})
        out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


@covers(9)
@pytest.mark.parametrize("method,family,task", GENERATIVE)
def test_generate_greedy_and_beam_with_and_without_cache(method, family, task):
    peft = make(method, family, task)
    ids = F.make_batch(family, task, batch=2, length=5)["input_ids"]
    encoder_decoder = task == "SEQ_2_SEQ_LM"
    # an instance-dependent prompt (IDPG) comes from the input alone, not from the tokens generated so far
    with peft._pinned_prompts((), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}):
        expected = greedy_by_forward(peft, ids, 4, encoder_decoder)
    for model in (peft.get_base_model(), base_model := F.make_model(family, task)):
        model.generation_config.eos_token_id = None  # the greedy loop does not stop at EOS either
        model.generation_config.forced_eos_token_id = None
    common = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4)
    for use_cache in (True, False):
        greedy = peft.generate(**common, do_sample=False, use_cache=use_cache)
        assert torch.equal(greedy, expected), f"greedy, use_cache={use_cache}"
    beams = [peft.generate(**common, num_beams=2, do_sample=False, use_cache=c) for c in (True, False)]
    assert torch.equal(beams[0], beams[1])
    if not encoder_decoder:  # only real tokens: the input, then new tokens
        assert beams[0].shape == (2, 5 + 4) and torch.equal(beams[0][:, :5], ids)
    with peft.disable_adapter():
        base = peft.generate(**common, do_sample=False)
    assert torch.equal(base, greedy_by_forward(base_model, ids, 4, encoder_decoder))


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


# ---- bf16, counts ------------------------------------------------------------------------------------
@covers(10)
@pytest.mark.parametrize("method,family,task", cells(tasks=("CAUSAL_LM", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION")))
def test_bf16_forward_backward_finite(method, family, task):
    model = F.make_model(family, task).to(torch.bfloat16)
    peft = get_peft_model(model, METHODS[method](task))
    assert {p.dtype for p in peft.base_model.prompt_encoder.parameters()} == {torch.bfloat16}
    batch = F.make_batch(family, task)
    out = peft(**batch) if task != "FEATURE_EXTRACTION" else None
    if out is None:
        hidden = peft(**{k: v for k, v in batch.items() if k != "labels"}).last_hidden_state
        loss = hidden.float().pow(2).mean()
    else:
        loss = out.loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in peft.base_model.prompt_encoder.parameters())


def _dims(family):
    c = F.make_config(family)
    d = getattr(c, "hidden_size", None) or getattr(c, "n_embd", None) or c.d_model
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", None) or c.num_layers
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head", None) or c.num_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    return d, layers, d // heads * kv


@covers(11)
@pytest.mark.parametrize("family", [f for f in F.FAMILIES if f not in NO_CACHE])
def test_parameter_counts_follow_the_formulas(family):
    task = "SEQ_2_SEQ_LM" if family in F.ENCODER_DECODERS else "FEATURE_EXTRACTION" if family in F.ENCODERS else "CAUSAL_LM"
    d, layers, kv_width = _dims(family)
    h = 16
    formulas = {
        # method: (trainable, trainable once the training-only network is folded away)
        "prompt": (T * d, T * d),
        "ptuning": (T * d + (d * h + h) + (h * h + h) + (h * d + d), T * d),
        "prefix": (T * d + (d * h + h) + (h * layers * 2 * kv_width + layers * 2 * kv_width), T * layers * 2 * kv_width),
    }
    for method, (trainable, kept) in formulas.items():
        if method != "prefix":
            h_cfg = METHODS[method](task)
        else:  # the prefix MLP reads token_dim, which is the key/value width for grouped-query models
            h_cfg = PrefixTuningConfig(task_type=task, num_virtual_tokens=T, prefix_projection=True, encoder_hidden_size=h)
            trainable = T * kv_width + (kv_width * h + h) + (h * layers * 2 * kv_width + layers * 2 * kv_width)
        peft = get_peft_model(F.make_model(family, task), h_cfg)
        base_total = sum(p.numel() for p in F.make_model(family, task).parameters())
        assert peft.get_nb_trainable_parameters() == (trainable, base_total + trainable), method
        assert peft.get_nb_inference_parameters() == (kept, base_total + kept), method


def test_readme_prompt_matrix_is_current():
    assert support_matrix.readme_block((support_matrix.PROMPT_START, support_matrix.PROMPT_END)) == \
        support_matrix.render_prompt_methods(), "README prompt-method matrix is stale: run `python tests/support_matrix.py --write`"
