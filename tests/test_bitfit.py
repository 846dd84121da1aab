"""BitFit (train only the biases) on every (family, task) cell of `families.MATRIX`.

Expected values come from outside the code under test: the untouched base model, real BitFit (the
model's own biases trained with everything else frozen), hand-computed bias counts of bert-base and
GPT-2 (124M), and a second unipeft path that must agree with the first (merged weights, rows alone).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import transformers as T
from safetensors.torch import load_file

import families as F
from adapter_checks import assert_state_equal
from unipeft import BitFitConfig, ConfigError, PeftModel, get_peft_model
from unipeft.engine.sites import family_of

NO_BIAS = ("t5", "llama", "mistral")  # no module with a bias outside the task heads
HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS")
BASE = "__base__"
ATOL = 1e-5
EMPTY_GROUPS = {"gptj": {"attention"}, "qwen2": {"ffn", "norm"}}  # GPT-J: no attention biases; Qwen2: q/k/v only


def cells(families=None, tasks=None):
    return [pytest.param(f, t, id=f"{f}-{t}") for f, t in F.MATRIX
            if (families is None or f in families) and (tasks is None or t in tasks)]


BIAS_CELLS = cells(families=[f for f in F.FAMILIES if f not in NO_BIAS])
NO_BIAS_CELLS = cells(families=NO_BIAS)


# ---- what the adapter should cover, computed without unipeft ------------------------------------------
def head_paths(model: nn.Module, task: str) -> list[str]:
    """A classifier's new head: its top-level children with parameters outside the pretrained backbone."""
    if task not in HEAD_TASKS:
        return []
    return [n for n, c in model.named_children() if n != model.base_model_prefix and any(True for _ in c.parameters())]


def biased_modules(model: nn.Module, task: str) -> list[str]:
    """Real BitFit's scope: every module with its own `bias` parameter, outside the task head."""
    heads = head_paths(model, task)
    return [n for n, m in model.named_modules() if "bias" in m._parameters and m.bias is not None
            and not any(n == h or n.startswith(h + ".") for h in heads)]


def base_state(peft_or_model: nn.Module) -> dict[str, torch.Tensor]:
    model = peft_or_model.get_base_model() if isinstance(peft_or_model, PeftModel) else peft_or_model
    return {k.replace(".base_layer.", ".").replace(".original_module.", "."): v.detach().clone()
            for k, v in model.state_dict().items() if ".bitfit_bias." not in k and ".modules_to_save." not in k}


# ---- building and running ----------------------------------------------------------------------------
def forward(model: nn.Module, batch: dict, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return F.output_tensor(model(**batch, **kwargs))


def loss_of(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(**batch)
    if getattr(out, "loss", None) is not None:
        return out.loss
    return sum(v.pow(2).mean() for v in out.values() if isinstance(v, torch.Tensor))  # feature extraction


def close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def setup(family: str, task: str):
    model = F.make_model(family, task, seed=0)
    batch = F.make_batch(family, task)
    return model, batch, forward(model, batch)


def randomize(peft: PeftModel, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if n.endswith(f".bitfit_bias.{name}") or f".modules_to_save.{name}." in n:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def wrap(model, task, adapters=("default",), **config):
    peft = None
    for i, name in enumerate(adapters):
        cfg = BitFitConfig(task_type=task, **config)
        if peft is None:
            peft = get_peft_model(model, cfg, adapter_name=name)
        else:
            peft.add_adapter(name, cfg)
        randomize(peft, name, seed=10 + i)
    return peft


# ---- cells without biases ------------------------------------------------------------------------------
@pytest.mark.parametrize("family,task", NO_BIAS_CELLS)
def test_model_without_biases_is_refused_before_it_changes(family, task):
    model, _, _ = setup(family, task)
    assert biased_modules(model, task) == []
    before = base_state(model)
    with pytest.raises(ConfigError, match=rf"{type(model).__name__}.*LoRA or IA3"):
        get_peft_model(model, BitFitConfig(task_type=task))
    assert_state_equal(base_state(model), before)
    assert not any("bitfit" in n for n, _ in model.named_modules())


# ---- adapter properties on every cell with biases --------------------------------------------------------
@pytest.mark.parametrize("family,task", BIAS_CELLS)
def test_identity_at_init_and_only_deltas_train(family, task):
    model, batch, base_out = setup(family, task)
    expected = biased_modules(model, task)
    assert expected
    peft = get_peft_model(model, BitFitConfig(task_type=task))
    assert peft.peft_config["default"].target_modules == expected
    assert torch.equal(forward(peft, batch), base_out)
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    deltas = [n for n in trainable if n.endswith(".bitfit_bias.default")]
    assert len(deltas) == len(expected)
    heads = head_paths(model, task)
    assert all(n in deltas or any(n.startswith(f"base_model.model.{h}.modules_to_save.default.") for h in heads)
               for n in trainable)
    assert all(peft.get_submodule(f"base_model.model.{m}").bitfit_bias["default"].shape ==
               model.get_submodule(f"{m}.base_layer").bias.shape for m in expected)


@pytest.mark.parametrize("family,task", BIAS_CELLS)
def test_sgd_on_deltas_equals_real_bitfit(family, task):
    """The oracle: the model's own biases (and the new head) trained, everything else frozen."""
    model, batch, base_out = setup(family, task)
    oracle = copy.deepcopy(model)
    heads = head_paths(oracle, task)
    oracle.requires_grad_(False)
    for name in biased_modules(oracle, task):
        oracle.get_submodule(name).bias.requires_grad_(True)
    for h in heads:
        oracle.get_submodule(h).requires_grad_(True)
    peft = get_peft_model(model, BitFitConfig(task_type=task))
    for net in (oracle, peft):
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
        for _ in range(3):
            opt.zero_grad()
            loss_of(net, batch).backward()
            opt.step()
    trained = forward(oracle, batch)
    assert not torch.allclose(trained, base_out, atol=1e-3)
    close(forward(peft, batch), trained)


@pytest.mark.parametrize("family,task", BIAS_CELLS)
def test_save_load_roundtrip_holds_only_deltas(family, task, tmp_path):
    model, batch, _ = setup(family, task)
    peft = wrap(model, task)
    adapted = forward(peft, batch)
    peft.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    heads = head_paths(model, task)
    targets = biased_modules(F.make_model(family, task), task)
    deltas = {k for k in tensors if k.endswith(".bitfit_bias")}
    assert deltas == {f"base_model.model.{m}.bitfit_bias" for m in targets}
    assert all(k in deltas or any(k.startswith(f"base_model.model.{h}.") for h in heads) for k in tensors)
    assert any(not k.endswith("bitfit_bias") for k in tensors) == bool(heads)
    loaded = PeftModel.from_pretrained(F.make_model(family, task, seed=0), tmp_path)
    assert torch.equal(forward(loaded, batch), adapted)
    assert not any(p.requires_grad for p in loaded.parameters())


# ---- bias_groups: hand counts on full-size configs (meta device: no memory) -------------------------------
def meta_model(config):
    with torch.device("meta"):
        return T.AutoModel.from_config(config)


def resolved_numel(model, groups) -> tuple[int, int]:
    names = BitFitConfig(bias_groups=groups).resolved(model).target_modules
    return len(names), sum(model.get_submodule(n).bias.numel() for n in names)


H, I, L = 768, 3072, 12
BERT_BASE = {  # per layer: q, k, v, attention.output.dense | intermediate, output.dense | 2 LayerNorms
    "attention": (4 * L, L * 4 * H),
    "ffn": (2 * L, L * (I + H)),
    "norm": (2 * L + 1, L * 2 * H + H),  # + embeddings.LayerNorm
    "all": (8 * L + 2, L * (4 * H + I + H + 2 * H) + H + H),  # + embeddings.LayerNorm, pooler.dense
}
GPT2_124M = {  # per layer: c_attn (3H), attn.c_proj | mlp.c_fc (4H), mlp.c_proj | ln_1, ln_2
    "attention": (2 * L, L * 4 * H),
    "ffn": (2 * L, L * 5 * H),
    "norm": (2 * L + 1, L * 2 * H + H),  # + ln_f
    "all": (6 * L + 1, L * 11 * H + H),
}


@pytest.mark.parametrize("name,config,expected", [("bert-base", T.BertConfig, BERT_BASE), ("gpt2", T.GPT2Config, GPT2_124M)])
def test_bias_group_counts_match_hand_formulas(name, config, expected):
    model = meta_model(config())
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (H, L)
    for group, counts in expected.items():
        assert resolved_numel(model, [group] if group != "all" else "all") == counts, group
    assert expected["all"][1] == sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    # the three groups together: everything but biased modules outside blocks and norms (BERT's pooler)
    outside = (1, H) if name == "bert-base" else (0, 0)
    union = resolved_numel(model, ["attention", "ffn", "norm"])
    assert union == (expected["all"][0] - outside[0], expected["all"][1] - outside[1])


@pytest.mark.parametrize("family", [f for f in F.FAMILIES if f not in NO_BIAS])
def test_groups_partition_all_inside_the_blocks(family):
    model = F.make_model(family, F.tasks_of(family)[-1])
    layers = family_of(model).layers
    in_block = lambda n: f".{layers}." in f".{n}"  # noqa: E731
    found = {}
    for group in ("attention", "ffn", "norm"):
        try:
            found[group] = [n for n in BitFitConfig(bias_groups=[group]).resolved(model).target_modules if in_block(n)]
        except ConfigError:
            found[group] = []
    every = [n for n in BitFitConfig().resolved(model).target_modules if in_block(n)]
    assert sorted(sum(found.values(), [])) == sorted(every)  # disjoint and covering
    assert {g for g, names in found.items() if not names} == EMPTY_GROUPS.get(family, set())


def test_cross_attention_is_attention():
    model = F.make_model("bart", "SEQ_2_SEQ_LM")
    names = BitFitConfig(bias_groups=["attention"]).resolved(model).target_modules
    assert "model.decoder.layers.0.encoder_attn.q_proj" in names
    assert "model.decoder.layers.0.encoder_attn_layer_norm" not in names


def test_target_modules_and_layers_narrow_the_groups():
    model = F.make_model("bert", "FEATURE_EXTRACTION")
    names = BitFitConfig(bias_groups=["attention"], target_modules=["query", "LayerNorm"]).resolved(model).target_modules
    assert names == ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"]
    peft = get_peft_model(model, BitFitConfig(bias_groups=["ffn"], layers_to_transform=[1]))
    wrapped = [n for n, _ in peft.named_parameters() if "bitfit_bias" in n]
    assert wrapped == [f"base_model.model.encoder.layer.1.{m}.bitfit_bias.default" for m in ("intermediate.dense", "output.dense")]


def test_channel_first_modules_broadcast_over_channels():
    """Conv and GroupNorm add their bias along dim 1; a model outside the family table ('all', 'norm' only)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(64, 3)).eval()
    x = torch.randn(3, 2, 6, 6)
    base = model(x).detach()
    with pytest.raises(ConfigError, match="needs the block sites"):
        get_peft_model(copy.deepcopy(model), BitFitConfig(bias_groups=["ffn"]))
    peft = get_peft_model(model, BitFitConfig())
    assert torch.equal(peft(x), base)
    randomize(peft, "default", seed=0)
    adapted = peft(x).detach()
    merged = copy.deepcopy(peft).merge_and_unload()
    close(merged(x).detach(), adapted)
    peft.add_adapter("zero", BitFitConfig())
    close(peft(x, adapter_names=["default", "zero", BASE]).detach(), torch.cat([adapted[:1], base[1:]]))


# ---- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("groups", [["attn"], "everything", [], ["ffn", "bias"]])
def test_unknown_group_is_refused(groups):
    with pytest.raises(ConfigError, match="bias_groups"):
        BitFitConfig(bias_groups=groups)


def test_llama_is_refused_with_a_clear_error():
    model = F.make_model("llama", "CAUSAL_LM")
    with pytest.raises(ConfigError, match=r"LlamaForCausalLM.*has no biases.*LoRA or IA3"):
        get_peft_model(model, BitFitConfig(task_type="CAUSAL_LM"))


def test_group_without_biases_is_refused():
    model = F.make_model("qwen2", "CAUSAL_LM")  # Qwen2 has q/k/v biases only
    with pytest.raises(ConfigError, match=r"\['ffn'\].*Qwen2ForCausalLM"):
        get_peft_model(model, BitFitConfig(task_type="CAUSAL_LM", bias_groups=["ffn"]))
    assert not any("bitfit" in n for n, _ in model.named_parameters())
