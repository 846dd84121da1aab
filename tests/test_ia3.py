"""IA3: interop with Hugging Face PEFT both ways, merge, and the adapter properties on every family.

Vectors are made non-identity (l = 1 + noise) before anything is compared, so a vector that is not
carried over, or scales the wrong axis, changes the outputs well beyond the tolerance.
"""
from __future__ import annotations

import copy
import json
import re
import warnings

import peft
import pytest
import torch
import torch.nn as nn
import transformers as T
from safetensors.torch import load_file

import families as F
import unipeft
from unipeft import AdapterError, ConfigError, IA3Config, PeftModel, TargetError, get_peft_model

ATOL = 1e-5
LIBS = {"unipeft": unipeft, "peft": peft}
pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning",
                                        "ignore:Unmerge result can be inaccurate:UserWarning")
_KEY_WARNING = re.compile(r"unknown|unexpected|ignor|missing", re.IGNORECASE)


# ---- helpers ------------------------------------------------------------------------------------
def heads(model, task: str) -> list[str]:
    """The newly initialised task head of a classifier, named for both libraries."""
    if task not in ("SEQ_CLS", "TOKEN_CLS"):
        return []
    return [n for n in ("pooler", "classifier", "score", "classification_head") if isinstance(getattr(model, n, None), nn.Module)]


def base(family: str, task: str) -> nn.Module:
    """families' tiny model with random (not zero-initialised) biases, so that merging must scale them."""
    model = F.make_model(family, task)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("bias"):
                param.add_(0.1 * torch.randn(param.shape, generator=g))
    return model


def make(lib: str, family: str, task: str, adapters=("default",), **kwargs):
    """Library `lib`'s IA3 model with each adapter's trainable tensors (vectors, head copies) perturbed."""
    base_model = base(family, task)
    model = None
    for i, name in enumerate(adapters):
        config = LIBS[lib].IA3Config(task_type=task, modules_to_save=heads(base_model, task) or None, **copy.deepcopy(kwargs))
        if model is None:
            model = LIBS[lib].get_peft_model(base_model, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        model.set_adapter(name)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for _, param in sorted(model.named_parameters()):
                if param.requires_grad:
                    param.add_(0.3 * torch.randn(param.shape, generator=g))
    model.set_adapter(adapters[0])
    return model.eval()


def forward(model, batch: dict, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return F.output_tensor(model(**batch, **kwargs))


def base_output(family: str, task: str) -> torch.Tensor:
    return forward(base(family, task), F.make_batch(family, task))


def close(actual, expected, atol=ATOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=atol)


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors under their original names, through any wrappers."""
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return {k.replace(".base_layer.", ".").replace(".original_module.", "."): v.detach().clone()
            for k, v in model.state_dict().items() if ".ia3_l" not in k and ".modules_to_save." not in k}


def ia3_parts(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".ia3_l." in n}


# ---- 1. interop with HF PEFT, both ways -----------------------------------------------------------
INTEROP = [("gpt2", "CAUSAL_LM"), ("bert", "SEQ_CLS"), ("t5", "SEQ_2_SEQ_LM"), ("llama", "CAUSAL_LM")]


@pytest.mark.parametrize("src,dst", [("unipeft", "peft"), ("peft", "unipeft")], ids=["unipeft->peft", "peft->unipeft"])
@pytest.mark.parametrize("family,task", INTEROP, ids=[f"{f}-{t}" for f, t in INTEROP])
def test_interop_with_peft(family, task, src, dst, tmp_path):
    batch = F.make_batch(family, task)
    source = make(src, family, task)
    source.save_pretrained(tmp_path / "src")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = LIBS[dst].PeftModel.from_pretrained(base(family, task), str(tmp_path / "src")).eval()
    assert not [str(w.message) for w in caught if _KEY_WARNING.search(str(w.message))]

    expected = forward(source, batch)
    assert (expected - base_output(family, task)).abs().max() > 1e-3, "vacuous: the adapter changes nothing"
    close(forward(loaded, batch), expected)

    loaded.save_pretrained(tmp_path / "dst")  # the same checkpoint layout, tensor for tensor
    written, rewritten = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("src", "dst"))
    assert sorted(written) == sorted(rewritten)
    head_keys = tuple(f"base_model.model.{h}." for h in heads(source.get_base_model(), task))
    assert all(k.endswith(".ia3_l") or k.startswith(head_keys) for k in written) and len(written) > len(head_keys)
    for key, value in written.items():
        assert torch.equal(rewritten[key], value), key
    with open(tmp_path / "src" / "adapter_config.json") as fh:
        saved = json.load(fh)
    assert saved["peft_type"] == "IA3" and sorted(saved["feedforward_modules"]) == sorted(
        peft.utils.constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[family])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_two_active_adapters_multiply_like_peft_and_merge(family):
    """Several active adapters on one layer compose by multiplying, as PEFT does and as merging does."""
    task, batch = "CAUSAL_LM", F.make_batch(family, "CAUSAL_LM")
    ours, theirs = make("unipeft", family, task, ("one", "two")), make("peft", family, task, ("one", "two"))
    for name, param in ia3_parts(theirs).items():  # the same vectors in both
        ia3_parts(ours)[name].data.copy_(param)
    ours.set_adapter(["one", "two"])
    theirs.base_model.set_adapter(["one", "two"])
    expected = forward(theirs, batch)
    close(forward(ours, batch), expected)
    ours.merge_adapter()
    close(forward(ours, batch), expected)


# ---- 2. properties on every family ----------------------------------------------------------------
CELLS = [pytest.param(f, t, id=f"{f}-{t}") for f, t in F.MATRIX]


def expected_trainable(model: nn.Module, task: str) -> set[str]:
    """ia3_l of each default target (HF PEFT's table, matched by suffix) and the task head copies."""
    targets = peft.utils.constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[model.config.model_type]
    hs = heads(model, task)
    names = {f"base_model.model.{n}.ia3_l.default" for n, m in model.named_modules()
             if any(n == t or n.endswith("." + t) for t in targets) and not any(n.startswith(h + ".") for h in hs)}
    for h in hs:
        names |= {f"base_model.model.{h}.modules_to_save.default.{k}" for k, _ in model.get_submodule(h).named_parameters()}
    return names


@pytest.mark.parametrize("family,task", CELLS)
def test_default_targets_are_peft_s(family, task):
    model = base(family, task)
    trainable = expected_trainable(model, task)
    model_ = get_peft_model(model, IA3Config(task_type=task))
    assert {n for n, p in model_.named_parameters() if p.requires_grad} == trainable


@pytest.mark.parametrize("family,task", CELLS)
def test_a_zero_entry_is_refused_by_merge_which_unmerge_could_not_undo(family, task):
    batch = F.make_batch(family, task)
    model = make("unipeft", family, task, ("one", "two"))
    model.set_adapter("one")
    before = base_state(model)
    last = [p for n, p in ia3_parts(model).items() if n.endswith(".one")][-1]
    last.data.view(-1)[0] = 0.0
    unmerged = forward(model, batch)
    with pytest.raises(AdapterError, match="zeros"):
        model.merge_adapter(safe_merge=True)
    assert all(torch.equal(base_state(model)[k], v) for k, v in before.items()), "a refused merge changed the base"
    with pytest.raises(AdapterError, match="zeros"):  # a plain merge refuses too, at that layer
        model.merge_adapter()
    model.unmerge_adapter()  # what it merged before that layer unmerges
    after = base_state(model)
    assert all(torch.allclose(after[k], v, atol=1e-6, rtol=1e-6) for k, v in before.items())
    torch.testing.assert_close(forward(model, batch), unmerged, atol=1e-5, rtol=1e-5)


# ---- 3. trainable-parameter count formula ---------------------------------------------------------
def ia3_count(family: str, config) -> int:
    """Per block: non-feedforward targets add out_features, feedforward ones in_features (HF PEFT's suffixes
    "output.dense" match both BERT's attention.output.dense and output.dense, both feedforward)."""
    if family == "bert":  # key (H) + value (H) + attention.output.dense (in H) + output.dense (in I)
        return config.num_hidden_layers * (3 * config.hidden_size + config.intermediate_size)
    inner = config.n_inner or 4 * config.n_embd  # gpt2: c_attn (out 3H) + mlp.c_proj (in 4H)
    return config.n_layer * (3 * config.n_embd + inner)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_trainable_count_formula(family):
    small = F.make_config(family)  # the formula against PEFT's own count on a small model
    counts = {lib: LIBS[lib].get_peft_model(T.AutoModel.from_config(copy.deepcopy(small)), LIBS[lib].IA3Config())
              .get_nb_trainable_parameters()[0] for lib in LIBS}
    assert counts == {lib: ia3_count(family, small) for lib in LIBS}

    config = T.BertConfig() if family == "bert" else T.GPT2Config()  # bert-base, gpt2 (124M)
    with torch.device("meta"):
        big = T.AutoModel.from_config(config)
    assert get_peft_model(big, IA3Config()).get_nb_trainable_parameters()[0] == ia3_count(family, config) == 64512


# ---- 4. bad input -------------------------------------------------------------------------------
def test_feedforward_outside_targets_is_refused_before_the_model_changes(tmp_path):
    with pytest.raises(ConfigError, match=r"subset of target_modules.*\['wo'\]"):
        IA3Config(target_modules=["k", "v"], feedforward_modules=["wo", "k"])
    model = base("t5", "SEQ_2_SEQ_LM")
    before = dict(model.named_modules())
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "IA3", "target_modules": ["k"], "feedforward_modules": ["wo"]}))
    with pytest.raises(ConfigError, match="wo"):
        PeftModel.from_pretrained(model, str(tmp_path))
    assert dict(model.named_modules()) == before


def test_embedding_target_is_refused():
    model = base("llama", "CAUSAL_LM")
    before = dict(model.named_modules())
    with pytest.raises(TargetError, match="embed_tokens is a Embedding, which IA3 cannot adapt"):
        get_peft_model(model, IA3Config(target_modules=["embed_tokens", "k_proj"], feedforward_modules=[]))
    assert dict(model.named_modules()) == before
