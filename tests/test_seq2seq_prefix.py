"""Prefix tuning at the three attention sites of encoder-decoder models (`PrefixTuningConfig.prefix_sites`):
decoder self-attention (PEFT's default), encoder self-attention and decoder cross-attention.

The oracle is independent of the hooks and caches under test: a copy of the base model whose attention
modules are replaced by `Reference`, softmax(q·[P_k; K]ᵀ·scale + bias + mask)·[P_v; V] written out, with the
prefix read from the stored tensor as the `methods/prefix.py` docstring lays it out.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import transformers
from safetensors.torch import load_file

import families as F
from unipeft import AdapterError, ConfigError, PeftModel, PrefixTuningConfig, compat, get_peft_model

T = 3
TASK = "SEQ_2_SEQ_LM"
ALL = ("decoder_self", "encoder_self", "cross")
SITE_SETS = [("encoder_self",), ("cross",), ("encoder_self", "cross"), ALL]
FAMILIES = ("t5", "bart")


def base_model(family):
    """The suite's tiny model without dropout (training steps are deterministic); BART's weights drawn wider
    (init_std 0.1, not 0.02) so each site's prefix moves the logits well above float noise."""
    config = F.make_config(family)
    if family == "bart":
        config.init_std = 0.1
        config.dropout = config.attention_dropout = config.activation_dropout = 0.0
    else:
        config.dropout_rate = 0.0
    torch.manual_seed(0)
    return transformers.AutoModelForSeq2SeqLM.from_config(config).eval()


def make(family, sites, seed=0, std=1.0, model=None, **fields):
    torch.manual_seed(seed)
    config = PrefixTuningConfig(task_type=TASK, num_virtual_tokens=T, prefix_sites=sites, **fields)
    peft = get_peft_model(model if model is not None else base_model(family), config)
    torch.manual_seed(seed + 100)
    with torch.no_grad():
        for p in peft.base_model.prompt_encoder.parameters():
            p.normal_(0, std)
    return peft


def padded_batch(family):
    batch = F.make_batch(family, TASK)
    batch["attention_mask"][1, -2:] = 0  # a padded row: the prefix must stay visible, the padding not
    batch["decoder_input_ids"] = torch.randint(3, F.VOCAB, (3, 4), generator=torch.Generator().manual_seed(7))
    return {k: v for k, v in batch.items() if k != "labels"}


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# ---- the oracle ---------------------------------------------------------------------------------------
class Reference(nn.Module):
    """One attention module written out: softmax(q·[P_k; K]ᵀ·scale + bias + mask)·[P_v; V], then the output
    projection. Only the stock module's projections are used."""

    def __init__(self, attn, prefix, key_mask, causal, bias):
        super().__init__()
        self.attn, self.prefix, self.key_mask, self.causal, self.bias = attn, prefix, key_mask, causal, bias
        self.t5 = hasattr(attn, "o")

    def forward(self, hidden_states, key_value_states=None, **ignored):
        a = self.attn
        names = ("q", "k", "v", "o") if self.t5 else ("q_proj", "k_proj", "v_proj", "out_proj")
        q_, k_, v_, o_ = (getattr(a, n) for n in names)
        heads, scale = (a.n_heads, 1.0) if self.t5 else (a.num_heads, a.scaling)
        batch, length, _ = hidden_states.shape
        source = hidden_states if key_value_states is None else key_value_states
        split = lambda x: x.view(batch, x.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q_(hidden_states)), split(k_(source)), split(v_(source))
        t = 0
        if self.prefix is not None:
            pk, pv = self.prefix
            t = pk.shape[1]
            k = torch.cat([pk.expand(batch, -1, -1, -1), k], dim=2)
            v = torch.cat([pv.expand(batch, -1, -1, -1), v], dim=2)
        scores = q @ k.transpose(-1, -2) * scale
        if self.bias is not None:
            scores = scores + self.bias(length, k.shape[2], t)
        visible = torch.ones(batch, 1, length, k.shape[2], dtype=torch.bool)
        if self.key_mask is not None:
            visible[..., t:] &= self.key_mask.bool()[:, None, None, :]
        if self.causal:
            visible[..., t:] &= torch.ones(length, length, dtype=torch.bool).tril()
        out = (scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v).transpose(1, 2).reshape(batch, length, -1)
        return (o_(out), None, None) if self.t5 else (o_(out), None)


def documented_prefix(flat, sites, layers, heads):
    """Split the stored [t, W] tensor as the prefix.py docstring says: one block per site in the order
    decoder_self, encoder_self, cross; pair i = (keys, values) of layer i, except PEFT's 2i mod L for
    decoder_self. Returns site -> per layer ([heads, t, head_dim] keys, values)."""
    t, width = flat.shape
    pair_width = width // sum(layers[s] for s in sites)  # keys and values of one layer
    out, start = {}, 0
    for site in ALL:
        if site not in sites:
            continue
        n = layers[site]
        block = flat[:, start:start + n * pair_width]
        start += n * pair_width
        pairs = block.reshape(t, 2 * n, heads, -1).permute(1, 2, 0, 3)
        order = [(2 * i) % n for i in range(n)] if site == "decoder_self" else range(n)
        out[site] = [(pairs[2 * j], pairs[2 * j + 1]) for j in order]
    assert start == width
    return out


def attention_sites(model, family):
    """site -> per layer (parent module, attribute name) of the stock attention modules."""
    if family == "t5":
        enc, dec = model.encoder.block, model.decoder.block
        return {"encoder_self": [(b.layer[0], "SelfAttention") for b in enc],
                "decoder_self": [(b.layer[0], "SelfAttention") for b in dec],
                "cross": [(b.layer[1], "EncDecAttention") for b in dec]}
    enc, dec = model.model.encoder.layers, model.model.decoder.layers
    return {"encoder_self": [(layer, "self_attn") for layer in enc],
            "decoder_self": [(layer, "self_attn") for layer in dec],
            "cross": [(layer, "encoder_attn") for layer in dec]}


def reference_model(family, prefix, key_mask):
    """The base model with every attention module replaced by `Reference` (prefix: site -> per layer or absent).
    T5's relative position bias: encoder prefix columns get none, real tokens keep theirs; in decoder
    self-attention the prefix takes positions 0..t-1 (PEFT's semantics, also for BART's learned decoder positions);
    cross-attention has no bias."""
    model = base_model(family)
    sites = attention_sites(model, family)
    bias = {s: None for s in ALL}
    if family == "t5":
        enc_bias, dec_bias = sites["encoder_self"][0][0].SelfAttention, sites["decoder_self"][0][0].SelfAttention
        bias["encoder_self"] = lambda q, k, t: torch.cat(
            [torch.zeros(1, enc_bias.n_heads, q, t), enc_bias.compute_bias(q, k - t)], dim=-1)
        bias["decoder_self"] = lambda q, k, t: dec_bias.compute_bias(q, k, past_seen_tokens=t)
    if family == "bart" and "decoder_self" in prefix:  # the prefix fills the cache: decoder tokens take positions t..
        t = prefix["decoder_self"][0][0].shape[1]
        model.model.decoder.embed_positions.register_forward_pre_hook(
            lambda m, args, kwargs: (args, {**kwargs, "position_ids": kwargs["position_ids"] + t}), with_kwargs=True)
    for site, modules in sites.items():
        for i, (parent, name) in enumerate(modules):
            setattr(parent, name, Reference(getattr(parent, name), prefix[site][i] if site in prefix else None,
                                            None if site == "decoder_self" else key_mask, site == "decoder_self", bias[site]))
    return model


def layer_counts(c):
    return {"decoder_self": c.num_hidden_layers, "encoder_self": getattr(c, "encoder_layers", None) or c.num_layers,
            "cross": getattr(c, "decoder_layers", None) or c.num_decoder_layers}


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_without_prefix_is_the_base_model(family):
    """The oracle itself: with no prefix it reproduces the stock model (masking, T5 position bias)."""
    batch = padded_batch(family)
    torch.testing.assert_close(logits(reference_model(family, {}, batch["attention_mask"]), batch),
                               logits(base_model(family), batch), rtol=0, atol=1e-5)


@pytest.mark.parametrize("sites", SITE_SETS + [("decoder_self",)], ids="+".join)
@pytest.mark.parametrize("family", FAMILIES)
def test_each_site_matches_the_written_out_attention(family, sites):
    peft = make(family, sites)
    batch = padded_batch(family)
    encoder = peft.base_model.prompt_encoder["default"]
    heads = peft.peft_config["default"].num_attention_heads
    prefix = documented_prefix(encoder.embedding.weight.detach(), sites, layer_counts(peft.config), heads)
    expected = logits(reference_model(family, prefix, batch["attention_mask"]), batch)
    adapted = logits(peft, batch)
    torch.testing.assert_close(adapted, expected, rtol=0, atol=1e-5)
    base = logits(base_model(family), batch)
    assert (adapted - base).abs().max() > 1e-3  # the prefix matters at this site
    embeds = peft.get_input_embeddings()(batch["input_ids"])  # inputs_embeds instead of ids: the same
    other = {**batch, "inputs_embeds": embeds, "input_ids": None}
    torch.testing.assert_close(logits(peft, other), adapted, rtol=0, atol=1e-6)


REPEL = [(f, s) for f in FAMILIES for s in ALL if (f, s) != ("bart", "decoder_self")]  # PEFT shifts BART's
# decoder positions by t under a decoder_self prefix, so there the base output is not the expected one


@pytest.mark.parametrize("family,site", REPEL, ids=[f"{f}-{s}" for f, s in REPEL])
def test_keys_that_repel_every_query_give_the_base_output(family, site):
    """One encoder and one decoder token: each attention has one query q per head, so a prefix key -M·q/|q|
    gets weight ~exp(-M|q|) = 0 whatever the values, and the output is the base output; keys +M·q/|q| take
    (nearly) all the weight and change it."""
    model = base_model(family)
    batch = {"input_ids": torch.tensor([[7]]), "decoder_input_ids": torch.tensor([[model.config.decoder_start_token_id]])}
    queries = {}
    for i, (parent, name) in enumerate(attention_sites(model, family)[site]):
        proj = getattr(getattr(parent, name), "q" if family == "t5" else "q_proj")
        proj.register_forward_hook(lambda m, args, out, i=i: queries.__setitem__(i, out.detach()))
    expected = logits(model, batch)
    peft = make(family, (site,))
    heads = peft.peft_config["default"].num_attention_heads
    weight = peft.base_model.prompt_encoder["default"].embedding.weight
    n = len(queries)
    pairs = weight.data.view(T, 2 * n, heads, -1)  # the documented layout: pair j = (keys, values)
    order = [(2 * i) % n for i in range(n)] if site == "decoder_self" else range(n)
    directions = torch.zeros(n, heads, pairs.shape[-1])
    for i, j in enumerate(order):  # a PEFT decoder_self pair can serve several layers: repel each one's query
        q = queries[i].view(heads, -1)
        directions[j] += q / q.norm(dim=-1, keepdim=True)
    pairs[:, 0::2] = -1e4 * directions
    torch.testing.assert_close(logits(peft, batch), expected, rtol=0, atol=1e-6)
    pairs[:, 0::2] = 1e4 * directions
    assert (logits(peft, batch) - expected).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_mask_none_means_all_visible(family):
    peft = make(family, ALL)
    batch = padded_batch(family)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    without = {k: v for k, v in batch.items() if k != "attention_mask"}
    torch.testing.assert_close(logits(peft, without), logits(peft, batch), rtol=0, atol=1e-6)


def test_default_sites_keep_the_peft_layout_and_config(tmp_path):
    default = make("t5", ("decoder_self",))
    explicit = PrefixTuningConfig(task_type=TASK, num_virtual_tokens=T)
    assert explicit.prefix_sites == ("decoder_self",)
    default.save_pretrained(tmp_path / "default")
    saved = json.loads((tmp_path / "default" / "adapter_config.json").read_text())
    assert "prefix_sites" not in saved  # PEFT's file, field for field
    assert load_file(tmp_path / "default" / "adapter_model.safetensors")["prompt_embeddings"].shape == (T, 2 * 2 * 32)
    extended = make("t5", ("cross", "encoder_self"))  # any order given; stored in the documented order
    assert extended.peft_config["default"].prefix_sites == ("encoder_self", "cross")
    extended.save_pretrained(tmp_path / "extended")
    saved = json.loads((tmp_path / "extended" / "adapter_config.json").read_text())
    assert saved["prefix_sites"] == ["encoder_self", "cross"]


# ---- training -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("projection", [False, True], ids=["flat", "mlp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_training_reaches_every_site_and_only_the_prefix(family, projection):
    fields = dict(prefix_projection=True, encoder_hidden_size=16) if projection else {}
    peft = make(family, ALL, std=0.5, **fields)
    batch = F.make_batch(family, TASK)
    base_before = {n: p.detach().clone() for n, p in peft.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert trainable and all(".prompt_encoder." in n for n in trainable)
    peft.train()
    loss = peft(**batch).loss
    loss.backward()
    encoder = peft.base_model.prompt_encoder["default"]
    grad = encoder.embedding.weight.grad if not projection else encoder.encoder[-1].weight.grad.T
    blocks = grad.split(grad.shape[1] // 3, dim=1)  # one block per site, each with 2 layers here
    assert all(block.abs().sum() > 0 for block in blocks)
    assert all(p.grad is None for n, p in peft.named_parameters() if n not in trainable)
    opt = torch.optim.Adam([p for p in peft.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = peft(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(p, base_before[n]) for n, p in peft.named_parameters() if n in base_before)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_matches_plain_training(family):
    """Non-reentrant checkpointing recomputes layers after the forward: two forwards of different batches
    before one backward must still see each call's own prefix at every site."""
    results = []
    for checkpointing in (False, True):
        peft = make(family, ALL, prefix_projection=True, encoder_hidden_size=16)
        if checkpointing:
            peft.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft.train()
        loss = peft(**F.make_batch(family, TASK)).loss + peft(**F.make_batch(family, TASK, batch=2, length=4, seed=5)).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[1][0], results[0][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_classifier_and_bf16_train_at_every_site(family):
    """Sequence classification runs the same encoder-decoder; bf16 keeps the prefix in bf16 and finite."""
    config = PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=T, prefix_sites=ALL)
    peft = get_peft_model(F.make_model(family, "SEQ_CLS"), config)
    peft(**F.make_batch(family, "SEQ_CLS")).loss.backward()
    grad = peft.base_model.prompt_encoder["default"].embedding.weight.grad
    assert all(block.abs().sum() > 0 for block in grad.split(grad.shape[1] // 3, dim=1))
    peft = get_peft_model(base_model(family).to(torch.bfloat16), PrefixTuningConfig(
        task_type=TASK, num_virtual_tokens=T, prefix_sites=ALL, prefix_projection=True, encoder_hidden_size=16))
    assert {p.dtype for p in peft.base_model.prompt_encoder.parameters()} == {torch.bfloat16}
    peft.train()
    loss = peft(**F.make_batch(family, TASK)).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in peft.base_model.prompt_encoder.parameters())


# ---- save, load, counts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sites", SITE_SETS, ids="+".join)
@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, sites, tmp_path):
    peft = make(family, sites, prefix_projection=True, encoder_hidden_size=16)
    batch = padded_batch(family)
    expected = logits(peft, batch)
    peft.save_pretrained(tmp_path)
    for trainable in (False, True):
        loaded = PeftModel.from_pretrained(base_model(family), tmp_path, is_trainable=trainable)
        assert loaded.peft_config["default"].prefix_sites == tuple(s for s in ALL if s in sites)
        torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_counts_follow_the_formula(family):
    """Different layer counts per stack, so each site's block size is visible in the count."""
    config = F.make_config(family)
    if family == "t5":
        config.num_layers, config.num_decoder_layers = 3, 2
    else:
        config.encoder_layers, config.decoder_layers = 3, 2
    d, h, layers, encoder_layers, decoder_layers = 32, 16, 3, 3, 2  # PEFT's num_layers is the encoder's count
    cases = {
        ("decoder_self",): layers,
        ("encoder_self",): encoder_layers,
        ("cross",): decoder_layers,
        ALL: layers + encoder_layers + decoder_layers,
    }
    base_total = sum(p.numel() for p in transformers.AutoModelForSeq2SeqLM.from_config(config).parameters())
    for sites, pairs in cases.items():
        width = pairs * 2 * d
        for projection, trainable in ((False, T * width), (True, T * d + d * h + h + h * width + width)):
            model = transformers.AutoModelForSeq2SeqLM.from_config(config).eval()
            peft = get_peft_model(model, PrefixTuningConfig(task_type=TASK, num_virtual_tokens=T, prefix_sites=sites,
                                                            prefix_projection=projection, encoder_hidden_size=h))
            assert peft.get_nb_trainable_parameters() == (trainable, base_total + trainable), (sites, projection)
            assert peft.get_nb_inference_parameters() == (T * width, base_total + T * width), (sites, projection)
            batch = F.make_batch(family, TASK)
            assert torch.isfinite(peft(**batch).loss)  # the layout fits the model's layers


# ---- generate -------------------------------------------------------------------------------------------
def greedy_loop(model, ids, mask, steps):
    """Greedy decoding by full forward passes: no cache, no generate(). Returns tokens and per-step logits."""
    out = torch.full((ids.shape[0], 1), model.config.decoder_start_token_id)
    scores = []
    for _ in range(steps):
        step = logits(model, {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": out})[:, -1]
        scores.append(step)
        out = torch.cat([out, step.argmax(-1, keepdim=True)], dim=1)
    return out, torch.stack(scores, 1)


@pytest.mark.parametrize("sites", SITE_SETS, ids="+".join)
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_greedy_and_beam_with_and_without_cache(family, sites):
    peft = make(family, sites, std=2.0)
    config = peft.get_base_model().generation_config
    config.eos_token_id = config.forced_eos_token_id = config.forced_bos_token_id = None
    ids = padded_batch(family)["input_ids"][:2]
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    expected, expected_scores = greedy_loop(peft, ids, mask, 4)
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    for use_cache in (True, False):
        out = peft.generate(**common, use_cache=use_cache, output_logits=True, return_dict_in_generate=True)
        assert torch.equal(out.sequences, expected), f"greedy, use_cache={use_cache}"
        torch.testing.assert_close(torch.stack(out.logits, 1), expected_scores, rtol=0, atol=1e-4)
    beams = [peft.generate(**common, num_beams=3, use_cache=c, output_scores=True, return_dict_in_generate=True)
             for c in (True, False)]
    assert torch.equal(beams[0].sequences, beams[1].sequences)
    torch.testing.assert_close(beams[0].sequences_scores, beams[1].sequences_scores, rtol=0, atol=1e-4)
    beam_logprob = beams[0].sequences_scores  # the best beam's score is the loop's log-probability of it
    seq = beams[0].sequences
    token_logprobs = []
    for i in range(seq.shape[1] - 1):
        step = logits(peft, {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": seq[:, : i + 1]})[:, -1]
        token_logprobs.append(step.log_softmax(-1).gather(1, seq[:, i + 1:i + 2]))
    length_penalty = peft.get_base_model().generation_config.length_penalty or 1.0
    total = torch.cat(token_logprobs, 1).sum(1) / (seq.shape[1] - 1) ** length_penalty
    torch.testing.assert_close(beam_logprob, total, rtol=0, atol=1e-4)


def test_padded_row_generates_as_it_does_alone():
    """The grown encoder masks (self and cross) keep padding invisible in generate() with a cache."""
    peft = make("t5", ALL, std=2.0)
    peft.get_base_model().generation_config.eos_token_id = None
    ids = torch.tensor([[11, 12, 13, 14, 1], [21, 22, 1, 0, 0]])
    mask = (torch.arange(5) < torch.tensor([[5], [3]])).long()
    common = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    both = peft.generate(input_ids=ids, attention_mask=mask, **common)
    alone = peft.generate(input_ids=ids[1:, :3], attention_mask=mask[1:, :3], **common)
    assert torch.equal(both.sequences[1], alone.sequences[0])
    torch.testing.assert_close(torch.stack(both.logits, 1)[1], torch.stack(alone.logits, 1)[0], rtol=0, atol=1e-5)


# ---- disable, delete, bad input -----------------------------------------------------------------------
def snapshot(model):
    return {
        "types": [(n, type(m).__name__) for n, m in model.named_modules()],
        "hooks": [(n, len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "configs": [(c.to_json_string(), c._attn_implementation) for c in
                    {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values()],
    }


def assert_same(before, after):
    for key in ("types", "hooks", "configs"):
        assert before[key] == after[key], key
    assert before["state"].keys() == after["state"].keys()
    assert all(torch.equal(v, after["state"][k]) for k, v in before["state"].items())


@pytest.mark.parametrize("family", FAMILIES)
def test_disable_and_delete_give_back_the_base_model(family):
    model = base_model(family)
    batch = padded_batch(family)
    base = logits(model, batch)
    before = snapshot(model)
    peft = make(family, ALL, model=model)
    adapted = logits(peft, batch)
    assert (adapted - base).abs().max() > 1e-3
    with peft.disable_adapter():
        torch.testing.assert_close(logits(peft, batch), base, rtol=0, atol=0)
    torch.testing.assert_close(logits(peft, batch), adapted, rtol=0, atol=0)
    assert model.forward.__func__ is type(model).forward
    peft.delete_adapter("default")
    assert_same(before, snapshot(model))
    torch.testing.assert_close(logits(model, batch), base, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_switching_to_a_default_prefix_adapter_and_unload(family):
    model = base_model(family)
    batch = padded_batch(family)
    before = snapshot(model)
    peft = make(family, ALL, model=model)
    expected_all = logits(peft, batch)
    peft.add_adapter("plain", PrefixTuningConfig(task_type=TASK, num_virtual_tokens=T))
    plain = make(family, ("decoder_self",))
    peft.base_model.prompt_encoder["plain"].load_state_dict(plain.base_model.prompt_encoder["default"].state_dict())
    peft.set_adapter("plain")
    torch.testing.assert_close(logits(peft, batch), logits(plain, batch), rtol=0, atol=1e-6)
    peft.set_adapter("default")
    torch.testing.assert_close(logits(peft, batch), expected_all, rtol=0, atol=1e-6)
    unloaded = peft.unload()
    assert_same(before, snapshot(unloaded))


@pytest.mark.parametrize("sites", [["decoder_self", "encoder"], ["cross", "cross"], [], "cross", ["Cross"]])
def test_bad_sites_are_refused(sites):
    with pytest.raises(ConfigError, match="prefix_sites"):
        PrefixTuningConfig(task_type=TASK, num_virtual_tokens=T, prefix_sites=sites)


@pytest.mark.parametrize("family,task", [("gpt2", "CAUSAL_LM"), ("llama", "CAUSAL_LM"), ("bert", "SEQ_CLS")])
def test_extra_sites_on_a_single_stack_model_are_refused(family, task):
    model = F.make_model(family, task)
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"exist only in encoder-decoder models.*prefix_sites=\('decoder_self',\)"):
        get_peft_model(model, PrefixTuningConfig(task_type=task, num_virtual_tokens=T, prefix_sites=["decoder_self", "cross"]))
    assert_same(before, snapshot(model))
    get_peft_model(model, PrefixTuningConfig(task_type=task, num_virtual_tokens=T, prefix_sites=["decoder_self"]))


def test_a_cache_from_another_adapter_is_refused():
    peft = make("t5", ("cross",))
    ids = torch.tensor([[5, 6, 7]])
    with peft.disable_adapter():
        out = peft(input_ids=ids, decoder_input_ids=torch.tensor([[0]]), use_cache=True)
    with pytest.raises(AdapterError, match="not produced with prefix adapter"):
        cache = {compat.cache_keyword(peft.get_base_model()): compat.output_cache(out)}
        peft(input_ids=ids, decoder_input_ids=torch.tensor([[4]]), **cache)
