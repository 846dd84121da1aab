"""Interoperability with Hugging Face PEFT (the oracle): LoRA adapters written by one library load in the
other with the same outputs, both ways, on every model family.

Every adapter is made non-trivial before saving: init_lora_weights=False gives a non-zero B, and every
tensor the adapter trains (LoRA factors, task-head copies, trainable biases) gets noise added, so a
tensor that is not carried over changes the outputs well beyond the tolerance.
"""
from __future__ import annotations

import copy
import json
import os
import re
import warnings

import peft
import pytest
import torch

import families as F
import unipeft

TOL = 1e-5
# What PEFT says while *creating* adapters is not under test (loads record their own warnings, see `load`).
pytestmark = [
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning"),
    pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning"),
]
LIBS = {"unipeft": unipeft, "peft": peft}
DIRECTIONS = [("unipeft", "peft"), ("peft", "unipeft")]
DIRECTION_IDS = [f"{src}->{dst}" for src, dst in DIRECTIONS]
# A load must not warn about config fields or checkpoint keys it does not understand or cannot find.
_KEY_WARNING = re.compile(r"unknown|unexpected|ignor|missing", re.IGNORECASE)
_HEAD_NAMES = ("pooler", "classifier", "score", "classification_head")  # top-level task heads


# ---- helpers ------------------------------------------------------------------------------------
def seq_cls_heads(model) -> list[str]:
    """The newly initialised task head(s) of a sequence classifier, named explicitly for both libraries
    (PEFT only finds `classifier` / `score` by itself)."""
    return [name for name in _HEAD_NAMES if isinstance(getattr(model, name, None), torch.nn.Module)]


def lora_config(lib: str, task: str, base, **kwargs):
    """A LoraConfig of library `lib` with non-zero B; task heads go to modules_to_save for SEQ_CLS."""
    if task == "SEQ_CLS":
        kwargs.setdefault("modules_to_save", seq_cls_heads(base))
    return LIBS[lib].LoraConfig(task_type=task, init_lora_weights=False, **copy.deepcopy(kwargs))  # PEFT edits lists


@torch.no_grad()
def perturb_trainable(model, seed: int) -> int:
    """Add noise to every tensor the active adapter trains; returns how many tensors were touched."""
    g = torch.Generator().manual_seed(seed)
    touched = 0
    for _, param in sorted(model.named_parameters()):
        if param.requires_grad:
            param.add_(torch.randn(param.shape, generator=g) * 0.2)
            touched += 1
    return touched


def create(lib: str, family: str, task: str, adapters: dict[str, dict], seed: int = 0):
    """A model of library `lib` with the given adapters ({name: LoraConfig kwargs}), perturbed, in eval mode.
    The first adapter is active."""
    base = F.make_model(family, task, seed)
    model = None
    for i, (name, kwargs) in enumerate(adapters.items()):
        config = lora_config(lib, task, base, **kwargs)
        if model is None:
            model = LIBS[lib].get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        model.set_adapter(name)  # makes this adapter's tensors the trainable ones, in both libraries
        assert perturb_trainable(model, seed=100 + i) > 0
    model.set_adapter(next(iter(adapters)))
    return model.eval()


def check_no_key_warnings(caught) -> None:
    bad = [str(w.message) for w in caught if _KEY_WARNING.search(str(w.message))]
    assert not bad, f"loading warned about config fields or keys: {bad}"


def load(lib: str, family: str, task: str, directory: str, extra: tuple[str, ...] = (), style: str = "path",
         seed: int = 0):
    """Library `lib` loads `directory` (adapter "default") and each extra adapter from its subfolder into a
    fresh base with the same random weights, without any warning about unknown fields or keys."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = LIBS[lib].PeftModel.from_pretrained(F.make_model(family, task, seed), directory)
        for name in extra:
            if style == "subfolder":
                model.load_adapter(directory, name, subfolder=name)
            else:
                model.load_adapter(os.path.join(directory, name), name)
    check_no_key_warnings(caught)
    return model.eval()


@torch.no_grad()
def outputs(model, family: str, task: str, adapter: str | None = None) -> torch.Tensor:
    if adapter is not None:
        model.set_adapter(adapter)
    return F.output_tensor(model(**F.make_batch(family, task)))


def adapter_tensors(model, adapter: str) -> dict[str, torch.Tensor]:
    """In-memory tensors of one adapter by parameter name; both libraries name them the same way."""
    return {n: p.detach() for n, p in model.named_parameters() if f".{adapter}." in n or n.endswith(f".{adapter}")}


def assert_same_adapter(src, dst, family: str, task: str, adapter: str, same_tensors: bool = True) -> None:
    """Same outputs (<= TOL) and, for a loaded adapter, identical tensors; heads are carried and differ from
    the base head."""
    expected, got = outputs(src, family, task, adapter), outputs(dst, family, task, adapter)
    with torch.no_grad():
        base = F.output_tensor(F.make_model(family, task)(**F.make_batch(family, task)))
    assert (expected - base).abs().max() > 1e-3, "the adapter barely changes the outputs: the test would be vacuous"
    diff = (expected - got).abs().max().item()
    assert diff <= TOL, f"adapter {adapter!r}: max |delta outputs| = {diff:.3g}"

    src_tensors, dst_tensors = adapter_tensors(src, adapter), adapter_tensors(dst, adapter)
    assert src_tensors and sorted(src_tensors) == sorted(dst_tensors)
    for name, tensor in src_tensors.items() if same_tensors else ():
        torch.testing.assert_close(dst_tensors[name], tensor, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
    heads = [n for n in dst_tensors if ".modules_to_save." in n]
    if task == "SEQ_CLS":
        assert heads, "the task head was not saved as a modules_to_save copy"
    dst_params = dict(dst.named_parameters())
    for name in heads:
        original = re.sub(rf"\.modules_to_save\.{adapter}\.", ".original_module.", name)
        assert not torch.equal(dst_params[name], dst_params[original]), f"{name} equals the base head"


def roundtrip(src_lib: str, dst_lib: str, family: str, task: str, adapters: dict[str, dict], tmp_path,
              style: str = "path"):
    """src_lib creates and saves the adapters; dst_lib loads them; every adapter must match."""
    src = create(src_lib, family, task, adapters)
    src.save_pretrained(tmp_path)
    extra = tuple(adapters)[1:]
    for name in extra:
        assert os.path.isfile(os.path.join(tmp_path, name, "adapter_model.safetensors"))
    dst = load(dst_lib, family, task, str(tmp_path), extra, style)
    for name in adapters:
        assert_same_adapter(src, dst, family, task, name)
    return src, dst


# ---- 1. every family, both ways ------------------------------------------------------------------
CELLS = [(f, "SEQ_CLS") for f in F.FAMILIES] + [(f, t) for f, t in F.MATRIX if t in ("CAUSAL_LM", "SEQ_2_SEQ_LM")]


@pytest.mark.parametrize("src_lib,dst_lib", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("family,task", CELLS, ids=[f"{f}-{t}" for f, t in CELLS])
def test_default_lora_loads_in_other_library(family, task, src_lib, dst_lib, tmp_path):
    roundtrip(src_lib, dst_lib, family, task, {"default": {}}, tmp_path)


# ---- 2. extra adapters in subfolders -------------------------------------------------------------
OTHER_TARGETS = {"llama": ["k_proj", "o_proj", "up_proj"], "bart": ["k_proj", "out_proj", "fc1"]}


@pytest.mark.parametrize("style", ["path", "subfolder"])
@pytest.mark.parametrize("src_lib,dst_lib", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("family", ["llama", "bart"])
def test_extra_adapter_in_subfolder(family, src_lib, dst_lib, style, tmp_path):
    adapters = {"default": {"r": 4, "lora_alpha": 8},
                "other": {"r": 2, "lora_alpha": 5, "target_modules": OTHER_TARGETS[family]}}
    roundtrip(src_lib, dst_lib, family, "SEQ_CLS", adapters, tmp_path, style)


# ---- 3. config variants --------------------------------------------------------------------------
VARIANTS = {
    "rank_alpha_pattern": ("llama", "CAUSAL_LM", dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
        rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}, alpha_pattern={"o_proj": 3, "q_proj": 20})),
    "rslora": ("llama", "CAUSAL_LM", dict(r=4, lora_alpha=16, use_rslora=True)),
    "regex_target": ("llama", "SEQ_CLS", dict(target_modules=r".*\.layers\.1\.(self_attn\.(k|v)_proj|mlp\.down_proj)")),
    "exclude_modules": ("llama", "SEQ_CLS", dict(target_modules=["q_proj", "v_proj", "up_proj"],
                                                 exclude_modules=r".*layers\.0\.self_attn\.v_proj")),
    "all_linear_causal": ("llama", "CAUSAL_LM", dict(r=2, target_modules="all-linear")),
    "all_linear_seq_cls": ("bert", "SEQ_CLS", dict(r=2, target_modules="all-linear")),
    "layers_to_transform_list": ("opt", "SEQ_CLS", dict(layers_to_transform=[1])),
    "layers_to_transform_int_pattern": ("llama", "CAUSAL_LM", dict(layers_to_transform=0, layers_pattern="layers",
                                                                   target_modules=["q_proj", "gate_proj"])),
    "bias_all": ("opt", "SEQ_CLS", dict(bias="all")),
    "bias_lora_only": ("bert", "SEQ_CLS", dict(bias="lora_only", target_modules=["query", "value", "dense"])),
    "embedding_llama": ("llama", "CAUSAL_LM", dict(target_modules=["embed_tokens", "q_proj"])),
    "embedding_and_lm_head": ("llama", "CAUSAL_LM", dict(target_modules=["embed_tokens", "lm_head", "q_proj"])),
    "extra_modules_to_save": ("llama", "SEQ_CLS", dict(target_modules=["q_proj"],
                                                       modules_to_save=["score", "embed_tokens"])),
    "embedding_bert": ("bert", "SEQ_CLS", dict(target_modules=["word_embeddings", "query"])),
    "embedding_bart_scaled": ("bart", "SEQ_2_SEQ_LM", dict(target_modules=["embed_tokens", "v_proj"])),
    "gpt2_conv1d": ("gpt2", "CAUSAL_LM", dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "gpt2_conv1d_seq_cls": ("gpt2", "SEQ_CLS", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, r=3)),
}


@pytest.mark.parametrize("src_lib,dst_lib", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variant_loads_in_other_library(variant, src_lib, dst_lib, tmp_path):
    family, task, kwargs = VARIANTS[variant]
    src, dst = roundtrip(src_lib, dst_lib, family, task, {"default": kwargs}, tmp_path)
    if kwargs.get("bias", "none") != "none":  # the trained biases travel in the checkpoint
        src_bias = {n: p for n, p in src.named_parameters() if p.requires_grad and n.endswith("bias")
                    and ".default" not in n}
        dst_params = dict(dst.named_parameters())
        assert src_bias
        for name, value in src_bias.items():
            torch.testing.assert_close(dst_params[name], value, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


# ---- 4. adapter_config.json crosses without warnings ---------------------------------------------
RICH_CONFIG = dict(r=4, lora_alpha=6, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "gate_proj"],
                   rank_pattern={"gate_proj": 2}, alpha_pattern={"v_proj": 3}, use_rslora=True,
                   layers_to_transform=[0, 1], layers_pattern="layers", bias="lora_only")
_COMPARED_FIELDS = ("r", "lora_alpha", "lora_dropout", "rank_pattern", "alpha_pattern", "use_rslora",
                    "layers_to_transform", "layers_pattern", "bias", "modules_to_save", "init_lora_weights",
                    "fan_in_fan_out", "inference_mode")


def _config_from_json(lib: str, directory) -> object:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = LIBS[lib].PeftConfig.from_pretrained(str(directory))
    assert not [str(w.message) for w in caught], "reading the other library's adapter_config.json warned"
    return config


@pytest.mark.parametrize("src_lib,dst_lib", DIRECTIONS, ids=DIRECTION_IDS)
def test_adapter_config_json_reads_without_warnings(src_lib, dst_lib, tmp_path):
    src = create(src_lib, "llama", "SEQ_CLS", {"default": RICH_CONFIG})
    src.save_pretrained(tmp_path)
    with open(tmp_path / "adapter_config.json") as fh:
        saved = json.load(fh)
    assert saved["peft_type"] == "LORA" and saved["task_type"] == "SEQ_CLS"
    config = _config_from_json(dst_lib, tmp_path)
    assert str(getattr(config.peft_type, "value", config.peft_type)) == "LORA"
    assert str(getattr(config.task_type, "value", config.task_type)) == "SEQ_CLS"
    for field_name in _COMPARED_FIELDS:
        got, want = getattr(config, field_name), saved[field_name]
        assert (sorted(got) if isinstance(got, (set, list)) else got) == \
               (sorted(want) if isinstance(want, list) else want), field_name
    assert sorted(config.target_modules) == sorted(saved["target_modules"])
    # and the whole adapter loads (load() itself checks for warnings about keys) with the same outputs
    assert_same_adapter(src, load(dst_lib, "llama", "SEQ_CLS", str(tmp_path)), "llama", "SEQ_CLS", "default")


# ---- 5. add_weighted_adapter ---------------------------------------------------------------------
WEIGHTED_FAMILY, WEIGHTED_TASK = "llama", "CAUSAL_LM"
WEIGHTED_ADAPTERS = {
    "default": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "embed_tokens"]},
    "other": {"r": 4, "lora_alpha": 2, "target_modules": ["v_proj", "o_proj", "embed_tokens"]},
}
WEIGHTS = [0.7, -0.4]
COMBINATIONS = {"linear": {}, "cat": {}, "svd": {}, "svd_rank3": {"svd_rank": 3}}


@pytest.fixture(scope="module")
def weighted_checkpoint(tmp_path_factory):
    """Two LoRA adapters written by PEFT, loaded by both libraries for each combination."""
    directory = tmp_path_factory.mktemp("weighted")
    create("peft", WEIGHTED_FAMILY, WEIGHTED_TASK, WEIGHTED_ADAPTERS).save_pretrained(directory)
    return str(directory)


def _lora_factors(model, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name -> (A, B) of one adapter, read from parameter names ([r, in] and [out, r] layout)."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in model.named_parameters():
        hit = re.fullmatch(rf"(.+)\.lora_(?:embedding_)?([AB])\.{adapter}(?:\.weight)?", name)
        if hit:
            found.setdefault(hit.group(1), {})[hit.group(2)] = param.detach()
    return {module: (ab["A"], ab["B"]) for module, ab in found.items()}


@pytest.mark.parametrize("combination", list(COMBINATIONS))
def test_add_weighted_adapter_matches_peft(combination, weighted_checkpoint):
    combination_type = combination.split("_")[0]
    models = {}
    for lib in LIBS:
        model = load(lib, WEIGHTED_FAMILY, WEIGHTED_TASK, weighted_checkpoint, ("other",))
        model.add_weighted_adapter(list(WEIGHTED_ADAPTERS), WEIGHTS, "mix", combination_type=combination_type,
                                   **COMBINATIONS[combination])
        models[lib] = model
    for name in ("default", "other", "mix"):  # "mix" is computed, in float32: outputs within TOL
        assert_same_adapter(models["peft"], models["unipeft"], WEIGHTED_FAMILY, WEIGHTED_TASK, name,
                            same_tensors=name != "mix")

    if combination_type == "cat":  # exact: scaling_mix * B_mix A_mix == sum_i w_i * (alpha_i / r_i) * B_i A_i
        model = models["unipeft"]
        mix_config = model.peft_config["mix"]
        assert mix_config.r == sum(c["r"] for c in WEIGHTED_ADAPTERS.values())
        mix_scaling = mix_config.lora_alpha / mix_config.r
        mix = _lora_factors(model, "mix")
        parts = {name: _lora_factors(model, name) for name in WEIGHTED_ADAPTERS}
        assert sorted(mix) == sorted(set().union(*parts.values()))
        for module, (A, B) in mix.items():
            expected = torch.zeros(B.shape[0], A.shape[1])
            for (name, kwargs), weight in zip(WEIGHTED_ADAPTERS.items(), WEIGHTS):
                if module in parts[name]:
                    A_i, B_i = parts[name][module]
                    expected += weight * kwargs["lora_alpha"] / kwargs["r"] * (B_i @ A_i)
            torch.testing.assert_close(mix_scaling * (B @ A), expected, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, module=module: f"{module}: {m}")
