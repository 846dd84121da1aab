"""Bad input gets a clear error naming the problem, and the model is left exactly as it was."""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

import families as F
from unipeft import (
    AdapterError, CheckpointError, CheckpointMismatchError, ConfigError, LoraConfig, PeftConfig, PeftModel,
    TargetError, get_peft_config, get_peft_model,
)


def snapshot(model: torch.nn.Module) -> dict:
    return {
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "params": {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["params"].keys() == before["params"].keys()
    for name, (value, grad) in before["params"].items():
        assert torch.equal(after["params"][name][0], value), name
        assert after["params"][name][1] == grad, name


def lora_model(family="bert", task="SEQ_CLS", **kw):
    return get_peft_model(F.make_model(family, task), LoraConfig(task_type=task, r=4, init_lora_weights=False, **kw))


# ---- targeting -------------------------------------------------------------------------------
def test_target_modules_matching_nothing_names_patterns_and_existing_modules():
    model = F.make_model("bert", "SEQ_CLS")
    before = snapshot(model)
    with pytest.raises(TargetError) as err:
        get_peft_model(model, LoraConfig(task_type="SEQ_CLS", target_modules=["q_proj", "nonexistent"]))
    msg = str(err.value)
    assert "q_proj" in msg and "nonexistent" in msg
    assert "query" in msg and "value" in msg  # shows what exists
    assert_unchanged(model, before)


def test_regex_target_matching_nothing_and_layers_out_of_range():
    model = F.make_model("gpt2", "CAUSAL_LM")
    before = snapshot(model)
    with pytest.raises(TargetError, match="layers_to_transform"):
        get_peft_model(model, LoraConfig(target_modules=["c_attn"], layers_to_transform=[7]))
    with pytest.raises(TargetError, match=r"\.\*attn_q"):
        get_peft_model(model, LoraConfig(target_modules=r".*attn_q"))
    assert_unchanged(model, before)


def test_unsupported_module_type_is_refused_before_modifying():
    model = F.make_model("bert", "SEQ_CLS")
    before = snapshot(model)
    # "attention" also matches the BertAttention block, which LoRA cannot wrap; "value" would be fine.
    with pytest.raises(TargetError, match="BertAttention"):
        get_peft_model(model, LoraConfig(task_type="SEQ_CLS", target_modules=["value", "attention"]))
    assert_unchanged(model, before)


def test_wrong_task_type_for_model_class():
    model = F.make_model("bert", "SEQ_CLS")
    before = snapshot(model)
    with pytest.raises(ConfigError, match="CAUSAL_LM.*BertForSequenceClassification"):
        get_peft_model(model, LoraConfig(task_type="CAUSAL_LM"))
    assert_unchanged(model, before)


# ---- configs -------------------------------------------------------------------------------------
def test_unknown_task_type_and_peft_type():
    with pytest.raises(ConfigError, match="unknown task_type 'CLASSIFY'"):
        LoraConfig(task_type="CLASSIFY")
    with pytest.raises(ConfigError, match="unknown peft_type 'SUPERLORA'"):
        get_peft_config({"peft_type": "SUPERLORA"})
    with pytest.raises(ConfigError, match="no 'peft_type'"):
        get_peft_config({"r": 4})


@pytest.mark.parametrize("field,value", [("r", "8"), ("lora_dropout", "high"), ("target_modules", 3),
                                         ("bias", "some"), ("inference_mode", "yes"), ("rank_pattern", [1])])
def test_wrong_field_type_in_config_json_names_the_field(tmp_path, field, value):
    data = {"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 4, field: value}
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=f"LoraConfig.{field} must be"):
        PeftConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("kw,match", [({"r": 0}, "r must be a positive"), ({"lora_dropout": 1.5}, "lora_dropout"),
                                      ({"layers_pattern": "h"}, "layers_pattern only applies")])
def test_invalid_values(kw, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(**kw)


def _configs_with(field_name: str) -> list[type]:
    from unipeft.registry import get_method, known_peft_types

    classes = {get_method(t).config_cls for t in known_peft_types()}
    return sorted((c for c in classes if field_name in c.__dataclass_fields__), key=lambda c: c.__name__)


@pytest.mark.parametrize("config_cls", _configs_with("layers_pattern"), ids=lambda c: c.__name__)
def test_every_targeting_config_checks_its_targeting_fields(config_cls):
    """One check for every config with the targeting fields: a layers_pattern alone selects nothing; sets of
    module names are kept as sorted lists (JSON has no sets)."""
    needed = {"total_step": 10} if config_cls.__name__ == "AdaLoraConfig" else {}  # its schedule's length
    with pytest.raises(ConfigError, match=f"{config_cls.__name__}.layers_pattern only applies together with "
                                          f"layers_to_transform"):
        config_cls(layers_pattern="layers", **needed)
    assert config_cls(target_modules={"value", "query"}, **needed).target_modules == ["query", "value"]


def test_unknown_json_fields_warn_and_are_ignored(tmp_path):
    data = {"peft_type": "LORA", "r": 4, "future_knob": 3, "another": None}
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"ignoring unknown config fields \['another', 'future_knob'\]"):
        config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, LoraConfig) and config.r == 4 and not hasattr(config, "future_knob")


def test_peft_feature_we_lack_is_refused_not_silently_dropped():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_peft_config({"peft_type": "LORA", "use_qalora": False, "loftq_config": {}}).r == 8
    with pytest.raises(ConfigError, match="use_qalora"):
        get_peft_config({"peft_type": "LORA", "use_qalora": True})


def test_unreadable_config_json_names_the_file(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="adapter_config.json"):
        PeftConfig.from_pretrained(tmp_path)


# ---- loading checkpoints -----------------------------------------------------------------------
def test_adapter_for_another_base_model_names_key_and_shapes(tmp_path):
    lora_model("llama", "CAUSAL_LM").save_pretrained(tmp_path)
    other = F.make_model("llama", "CAUSAL_LM")
    # a wider model of the same family: same module names, other shapes
    wider = type(other)(F.make_config("llama").__class__(**{**F.make_config("llama").to_dict(), "hidden_size": 48, "intermediate_size": 96}))
    before = snapshot(wider)
    with pytest.raises(CheckpointMismatchError) as err:
        PeftModel.from_pretrained(wider, tmp_path)
    msg = str(err.value)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in msg
    assert "(4, 32)" in msg and "(4, 48)" in msg
    assert_unchanged(wider, before)


def test_adapter_for_another_architecture_is_refused(tmp_path):
    lora_model("bert", "SEQ_CLS").save_pretrained(tmp_path)
    model = F.make_model("roberta", "SEQ_CLS")
    before = snapshot(model)
    with pytest.raises(CheckpointMismatchError, match="bert.encoder"):
        PeftModel.from_pretrained(model, tmp_path)
    assert_unchanged(model, before)


def test_second_adapter_with_wrong_shapes_leaves_first_adapter_intact(tmp_path):
    lora_model("gpt2", "CAUSAL_LM").save_pretrained(tmp_path / "gpt2")
    host = lora_model("llama", "CAUSAL_LM")
    before = snapshot(host)
    with pytest.raises((CheckpointMismatchError, TargetError)):
        host.load_adapter(tmp_path / "gpt2", "other")
    assert_unchanged(host, before)
    assert list(host.peft_config) == ["default"]


def test_missing_adapter_files_name_the_file(tmp_path):
    model = F.make_model("bert", "SEQ_CLS")
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        PeftModel.from_pretrained(model, tmp_path)
    lora_model().save_pretrained(tmp_path)
    os.remove(tmp_path / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        PeftModel.from_pretrained(model, tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_weights_file_names_the_file(tmp_path, damage):
    lora_model().save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00\xff" * 64, "empty": b""}[damage])
    model = F.make_model("bert", "SEQ_CLS")
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="adapter_model.safetensors.*corrupt"):
        PeftModel.from_pretrained(model, tmp_path)
    assert_unchanged(model, before)


def test_missing_tensor_in_file_is_reported(tmp_path):
    from safetensors.torch import load_file, save_file

    lora_model().save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    dropped = sorted(k for k in tensors if "lora_B" in k)[0]
    del tensors[dropped]
    save_file(tensors, path)
    with pytest.raises(CheckpointMismatchError, match="lacks 1 adapter tensors"):
        PeftModel.from_pretrained(F.make_model("bert", "SEQ_CLS"), tmp_path)


def test_pickle_weights_need_an_explicit_flag(tmp_path):
    from safetensors.torch import load_file

    pm = lora_model()
    pm.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    os.remove(tmp_path / "adapter_model.safetensors")
    torch.save(tensors, tmp_path / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        PeftModel.from_pretrained(F.make_model("bert", "SEQ_CLS"), tmp_path)
    loaded = PeftModel.from_pretrained(F.make_model("bert", "SEQ_CLS"), tmp_path, allow_pickle=True)
    batch = F.make_batch("bert", "SEQ_CLS")
    assert torch.equal(loaded(**batch).logits, pm(**batch).logits)


# ---- atomic saves ---------------------------------------------------------------------------------
def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    from unipeft import atomic_files

    lora_model().save_pretrained(tmp_path)
    old = {p: (tmp_path / p).read_bytes() for p in ("adapter_config.json", "adapter_model.safetensors")}
    newer = get_peft_model(F.make_model("bert", "SEQ_CLS", seed=5), LoraConfig(task_type="SEQ_CLS", r=2, init_lora_weights=False))

    real_write = atomic_files._write_temp
    calls = []

    def failing_write(final_path, data):
        calls.append(final_path)
        if len(calls) == 2:  # the weights went to a temp file; the config write now dies
            raise OSError("disk full")
        return real_write(final_path, data)

    monkeypatch.setattr(atomic_files, "_write_temp", failing_write)
    with pytest.raises(OSError, match="disk full"):
        newer.save_pretrained(tmp_path)
    assert {p: (tmp_path / p).read_bytes() for p in old} == old
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]  # no temp left


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_and_checkpoint_folders_follow_the_umask(tmp_path, umask):
    """As open() and mkdir would: a serving account reads an adapter saved under umask 022 (tempfile alone
    would make every file 0600)."""
    from unipeft.train.train_state import CHECKPOINT, write_checkpoint

    previous = os.umask(umask)
    try:
        lora_model().save_pretrained(tmp_path / "adapter")
        write_checkpoint(str(tmp_path), {"trainer_state.json": b"{}"})
    finally:
        os.umask(previous)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "adapter" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert (tmp_path / CHECKPOINT).stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / CHECKPOINT / "trainer_state.json").stat().st_mode & 0o777 == 0o666 & ~umask


# ---- runtime misuse ------------------------------------------------------------------------------
def test_unknown_adapter_names():
    pm = lora_model()
    with pytest.raises(AdapterError, match=r"unknown adapter name\(s\) \['nope'\]; this model has \['default'\]"):
        pm.set_adapter("nope")
    with pytest.raises(AdapterError, match="nope"):
        pm.delete_adapter("nope")
    batch = F.make_batch("bert", "SEQ_CLS")
    with pytest.raises(AdapterError, match="nope"):
        pm(**batch, adapter_names=["default", "nope", "__base__"])


def test_mixed_batch_length_mismatch():
    pm = lora_model()
    batch = F.make_batch("bert", "SEQ_CLS", batch=3)
    with pytest.raises(AdapterError, match="2 entries but the batch has 3 rows"):
        pm(**batch, adapter_names=["default", "__base__"])


def test_mixed_batch_on_merged_weights_is_refused():
    pm = lora_model()
    pm.merge_adapter()
    with pytest.raises(AdapterError, match="unmerge"):
        pm(**F.make_batch("bert", "SEQ_CLS"), adapter_names=["default"] * 3)


def test_duplicate_and_invalid_adapter_names():
    pm = lora_model()
    before = snapshot(pm)
    with pytest.raises(AdapterError, match="already exists"):
        pm.add_adapter("default", LoraConfig(task_type="SEQ_CLS"))
    with pytest.raises(AdapterError, match="invalid adapter name"):
        pm.add_adapter("a.b", LoraConfig(task_type="SEQ_CLS"))
    assert_unchanged(pm, before)


def test_safe_merge_refuses_non_finite_and_leaves_base_unchanged():
    pm = lora_model("gpt2", "CAUSAL_LM")
    base_before = {n: p.clone() for n, p in pm.get_base_model().named_parameters() if "lora_" not in n}
    layers = [m for m in pm.modules() if hasattr(m, "lora_B")]
    with torch.no_grad():
        layers[-1].lora_B["default"].weight[0, 0] = float("inf")  # only the last layer is bad
    with pytest.raises(AdapterError, match=r"non-finite.*nothing was merged"):
        pm.merge_adapter(safe_merge=True)
    with pytest.raises(AdapterError, match="non-finite"):
        pm.merge_and_unload(safe_merge=True)
    for n, p in pm.get_base_model().named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n
    assert pm.base_model.merged_adapters() == []


def test_save_unsafe_serialization_and_unknown_selected_adapter(tmp_path):
    pm = lora_model()
    with pytest.raises(ValueError, match="safetensors"):
        pm.save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(AdapterError, match="nope"):
        pm.save_pretrained(tmp_path, selected_adapters=["nope"])
    assert os.listdir(tmp_path) == []


def test_a_task_type_the_model_class_cannot_serve_is_refused_naming_the_class_that_can():
    model = F.make_model("bert", "SEQ_CLS")
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"task_type=CAUSAL_LM does not fit BertForSequenceClassification.*BertLMHeadModel"):
        get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=2))
    assert_unchanged(model, before)


# ---- issue 17's first cases: each refused before anything changes, the message naming the fix ----------------
def _adapted_bert():
    return get_peft_model(F.make_model("bert", "SEQ_CLS"), LoraConfig(task_type="SEQ_CLS", r=2))


@pytest.mark.parametrize("target", ["its base model", "the PeftModel itself"])
def test_a_second_get_peft_model_on_an_adapted_model_is_refused(target):
    peft_model = _adapted_bert()
    model = peft_model.get_base_model() if target == "its base model" else peft_model
    before = snapshot(peft_model)
    with pytest.raises(AdapterError, match=r"already carries adapters; add another one with "
                                           r"peft_model\.add_adapter\(name, config\)"):
        get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4))
    assert_unchanged(peft_model, before)
    assert peft_model.peft_config["default"].r == 2


def test_get_peft_model_on_something_that_is_not_a_model_names_what_it_got():
    with pytest.raises(TypeError, match=r"must be a torch\.nn\.Module .* got str"):
        get_peft_model("hello", LoraConfig(task_type="SEQ_CLS"))


def test_an_empty_target_list_is_refused_rather_than_saved_as_selecting_nothing():
    # HF PEFT refuses to load "target_modules": [], so a config holding it must never describe a saved adapter
    with pytest.raises(ConfigError, match=r"target_modules=\[\] selects no module; leave it None"):
        LoraConfig(task_type="SEQ_CLS", target_modules=[])


@pytest.mark.parametrize("init", ["pissa", "olora", "loftq", "eva", "orthogonal"])
def test_hf_peft_initialisations_we_lack_are_named_with_what_is_supported(init):
    with pytest.raises(ConfigError, match=f"init_lora_weights='{init}' is an HF PEFT initialisation not "
                                          f"implemented in unipeft; supported: True"):
        LoraConfig(init_lora_weights=init)


def test_runtime_config_at_its_default_loads_and_asking_for_offload_is_refused(tmp_path):
    # HF PEFT 0.21 writes runtime_config = {"ephemeral_gpu_offload": false} into every LoRA config it saves
    assert LoraConfig.from_dict({"peft_type": "LORA", "r": 4, "runtime_config": {"ephemeral_gpu_offload": False}}).r == 4
    with pytest.raises(ConfigError, match="runtime_config=.*does not implement"):
        LoraConfig.from_dict({"peft_type": "LORA", "runtime_config": {"ephemeral_gpu_offload": True}})


def test_adapter_names_given_as_one_string_says_it_is_one_name_per_row():
    peft_model = _adapted_bert()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(AdapterError, match=r"one name per row of the batch, got the string 'default'; pass "
                                           r"\['default'\] \* batch_size"):
        peft_model(input_ids=ids, adapter_names="default")


def test_a_rank_above_the_layer_s_dimensions_is_accepted_with_a_warning():
    # BERT's tiny test model is 32 wide: rank 40 cannot be reached, rank 32 spans the same updates
    with pytest.warns(UserWarning, match=r"r=40 is above min\(in, out\)=32 of a target layer.*r=32 does the same"):
        get_peft_model(F.make_model("bert", "SEQ_CLS"), LoraConfig(task_type="SEQ_CLS", r=40))


def test_from_pretrained_with_a_dict_as_config_says_how_to_build_one(tmp_path):
    _adapted_bert().save_pretrained(tmp_path)
    base = F.make_model("bert", "SEQ_CLS")
    before = snapshot(base)
    with pytest.raises(ConfigError, match=r"config must be a PeftConfig .* got dict; build one from a dict with "
                                          r"unipeft\.get_peft_config"):
        PeftModel.from_pretrained(base, tmp_path, config={"r": 2})
    assert_unchanged(base, before)


def test_saving_onto_a_file_path_is_refused_and_the_file_kept(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    with pytest.raises(CheckpointError, match=r"notes\.txt: it is a file, not a folder"):
        _adapted_bert().save_pretrained(path)
    assert path.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["notes.txt"]
