"""PeftModel, its thin task wrappers and `get_peft_model`: the API Hugging Face PEFT users know."""
from __future__ import annotations

import dataclasses
import inspect
import os
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from .compat import name_or_path, task_model_classes
from .config import PeftConfig, TaskType, ConfigError
from .engine.checkpoint import CheckpointError, key_prefix, load_adapter_tensors, save_adapter
from .engine.inject import AdapterModel
from .engine.layers import AdapterError, AdapterLayer, named_part_tensors
from .engine.sharding import numel, reshard
from .engine.sites import task_heads
from .engine.targeting import logical_modules, name_matches

def check_task(model: nn.Module, task_type) -> None:
    """Refuse a task type that the model class cannot serve (e.g. CAUSAL_LM on a classifier)."""
    if task_type is None:
        return
    tables = task_model_classes()
    if TaskType(task_type).value not in tables:
        return
    cls_name = type(model).__name__
    if not any(cls_name in names for table in tables.values() for names in table.values()):
        return  # a custom model: we cannot tell, so trust the user
    table = tables[TaskType(task_type).value]
    if not any(cls_name in names for names in table.values()):
        fitting = sorted(table.get(getattr(model.config, "model_type", ""), ())) or ["the task-specific class"]
        raise ConfigError(
            f"task_type={TaskType(task_type).value} does not fit {cls_name}; load the model with the matching "
            f"Auto class (e.g. {', '.join(fitting)}) or change task_type"
        )


def _with_task_heads(model: nn.Module, config: PeftConfig) -> PeftConfig:
    """A copy of the config whose modules_to_save include the task's newly initialised head."""
    config = dataclasses.replace(config)
    heads = [h for h in task_heads(model, config.task_type)
             if any(name_matches(n, [h]) for n, _ in logical_modules(model))]
    if heads and hasattr(config, "modules_to_save"):
        config.modules_to_save = list(dict.fromkeys([*(config.modules_to_save or []), *heads]))
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = name_or_path(getattr(model, "config", None))
    return config


def _check_unadapted(model) -> None:
    """Adapters go on a plain torch model: a second get_peft_model would rewire the first one's layers."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"the model to adapt must be a torch.nn.Module (e.g. from AutoModelForCausalLM."
                        f"from_pretrained(name)), got {type(model).__name__}")
    if hasattr(model, "peft_config") or any(isinstance(m, (AdapterLayer, AdapterModel)) for m in model.modules()):
        raise AdapterError(f"this {type(model).__name__} already carries adapters; add another one with "
                           f"peft_model.add_adapter(name, config), or start from a fresh base model")


def _batch_size(args, kwargs) -> int | None:
    for key in ("input_ids", "inputs_embeds", "pixel_values"):
        if kwargs.get(key) is not None:
            return kwargs[key].shape[0]
    if args and isinstance(args[0], torch.Tensor):
        return args[0].shape[0]
    return None


class PeftModel(nn.Module):
    """A transformers model with adapters; `base_model` is the tuner holding the model as `.model`."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = False, state_dict: dict | None = None, source: str = "state_dict",
                 **_compat_kwargs) -> None:
        super().__init__()
        _check_unadapted(model)
        check_task(model, peft_config.task_type)
        config = _with_task_heads(model, peft_config) if state_dict is None else dataclasses.replace(peft_config)
        self.base_model = AdapterModel(model, config, adapter_name, state_dict, source)
        self.training = model.training
        if autocast_adapter_dtype:
            self._upcast_adapter(adapter_name)

    def _upcast_adapter(self, adapter_name: str) -> None:
        # Only the adapter layers' own tensors, as HF PEFT does: an fp32 copy of a task head
        # (modules_to_save) would meet the half-precision activations of the base and fail.
        for _, layer in self.base_model.adapter_layers():
            if isinstance(layer, AdapterLayer) and adapter_name in layer.hparams:
                for tensor in named_part_tensors("", layer.parts_of(adapter_name)).values():
                    if tensor.dtype in (torch.float16, torch.bfloat16):
                        tensor.data = tensor.data.float()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model.model, name)  # one level only: the user's model

    # ---- introspection -------------------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @property
    def active_adapters(self) -> list[str]:
        return list(self.base_model.adapter_state.active)

    @property
    def active_adapter(self) -> str:
        return self.active_adapters[0]

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapter]

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total). The total counts the model as it runs: a task head trained as a copy counts
        once, not also as the frozen original kept for `disable_adapter()` (HF PEFT counts both)."""
        trainable = sum(numel(p) for p in self.parameters() if p.requires_grad)
        total = sum(numel(p) for p in self.parameters()) - self.base_model.replaced_head_numel()
        return trainable, total

    def get_nb_inference_parameters(self) -> tuple[int, int]:
        """(trainable, total) once training-only parts (prefix MLP, P-tuning encoder) are folded away."""
        trainable, total = self.get_nb_trainable_parameters()
        for part in self.base_model.parts():
            params = part.trainable_parameters()
            training_only = sum(numel(p) for p in params) - part.inference_numel()
            total -= training_only
            if any(p.requires_grad for p in params):
                trainable -= training_only
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        kept, kept_total = self.get_nb_inference_parameters()
        if kept_total != total:
            line += f" || without training-only parts: {kept:,d} of {kept_total:,d} ({100 * kept / kept_total:.4f}%)"
        print(line)

    # ---- running -------------------------------------------------------------------------------
    @contextmanager
    def _routing(self, adapter_names, args, kwargs):
        if isinstance(adapter_names, str):
            raise AdapterError(f"adapter_names is one name per row of the batch, got the string {adapter_names!r}; "
                               f"pass [{adapter_names!r}] * batch_size, or set_adapter({adapter_names!r}) for every row")
        if adapter_names is not None:
            batch = _batch_size(args, kwargs)
            if batch is not None and len(adapter_names) != batch:
                raise AdapterError(f"adapter_names has {len(adapter_names)} entries but the batch has {batch} rows")
        with self.base_model.routed(adapter_names):
            yield

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        with self._routing(adapter_names, args, kwargs):
            return self.base_model(*args, **kwargs)

    # What forward passes on, named for tools that read the signature: transformers.Trainer keeps only the
    # dataset columns a model's forward names (it looks through HF PEFT's models, not through ours).
    forward.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in (
            "input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "labels",
            "decoder_input_ids", "decoder_attention_mask", "decoder_inputs_embeds", "pixel_values", "adapter_names")]
        + [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        self._check_generation_room(args, kwargs)
        with self._routing(adapter_names, args, kwargs), self._pinned_prompts(args, kwargs):
            return self.get_base_model().generate(*args, **kwargs)

    def _check_generation_room(self, args, kwargs) -> None:
        virtual = getattr(self.base_model, "virtual_inputs", None)
        inputs = kwargs.get("input_ids", args[0] if args else None)
        inputs = kwargs.get("inputs_embeds") if inputs is None else inputs
        if virtual is None or inputs is None:
            return
        config = kwargs.get("generation_config") or getattr(self.get_base_model(), "generation_config", None)
        new_tokens = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
        if new_tokens is None:  # transformers then stops at max_length tokens in all
            max_length = kwargs.get("max_length", getattr(config, "max_length", None))
            new_tokens = None if max_length is None else max_length - inputs.shape[1]
        if new_tokens is not None:
            virtual.check_generation_room(inputs.shape[1], new_tokens)

    @contextmanager
    def _pinned_prompts(self, args, kwargs):
        """Instance-dependent prompts (IDPG) come from the input, not from the tokens generated so far."""
        virtual = getattr(self.base_model, "virtual_inputs", None)
        found = virtual.active() if virtual is not None else None
        if found is None or not found[1].per_instance:
            yield
            return
        name, prompt = found
        inputs = {"input_ids": kwargs.get("input_ids", args[0] if args else None),
                  "attention_mask": kwargs.get("attention_mask"), "inputs_embeds": kwargs.get("inputs_embeds")}
        with torch.no_grad():
            virtual.pinned[name] = prompt.tokens(inputs)
        try:
            yield
        finally:
            virtual.pinned.pop(name, None)

    @contextmanager
    def disable_adapter(self):
        with self.base_model.disabled():
            yield

    # ---- adapters ------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False) -> None:
        check_task(self.get_base_model(), peft_config.task_type)
        self.base_model.add_adapter(adapter_name, _with_task_heads(self.get_base_model(), peft_config))

    def set_adapter(self, adapter_name) -> None:
        self.base_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    def merge_adapter(self, adapter_names=None, safe_merge: bool = False) -> None:
        reshard(self)  # FSDP: writes go to the shards (this model may be the root unit)
        self.base_model.merge(adapter_names, safe_merge)

    def unmerge_adapter(self) -> None:
        reshard(self)
        self.base_model.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        reshard(self)
        return self.base_model.unload(merge=True, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        return self.base_model.unload(merge=False)

    def add_weighted_adapter(self, adapters, weights, adapter_name, combination_type="svd", svd_rank=None, **kwargs) -> None:
        from .config import ConfigError
        from .registry import get_method

        self.base_model.check_names(adapters)
        peft_type = self.peft_config[adapters[0]].peft_type if adapters else None
        combine = get_method(peft_type).add_weighted_adapter if adapters else None
        if combine is None:
            raise ConfigError(f"add_weighted_adapter: {peft_type or 'no adapters given'}"
                              f"{' adapters cannot be combined' if adapters else ''}; it combines LoRA adapters")
        combine(self.base_model, adapters, weights, adapter_name, combination_type, svd_rank)

    # ---- files ---------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None,
                        safe_serialization: bool = True, is_main_process: bool = True, flat: bool = False,
                        **_compat_kwargs) -> None:
        if not safe_serialization:
            raise ValueError("unipeft writes safetensors only; drop safe_serialization=False")
        names = list(selected_adapters or self.peft_config)
        self.base_model.check_names(names)
        if os.path.exists(save_directory) and not os.path.isdir(save_directory):
            raise CheckpointError(f"cannot save adapters into {os.fspath(save_directory)}: it is a file, not a "
                                  f"folder; choose a folder path")
        if not is_main_process:
            return
        for name in names:
            directory = os.fspath(save_directory) if name == "default" else os.path.join(save_directory, name)
            training = {} if flat else self.base_model.training_tensors(name)
            config = self.peft_config[name]
            save_adapter(directory, config.to_saved_json(), self.base_model.adapter_tensors(name, saving=True), training, key_prefix(config))

    def export_flat(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None) -> None:
        """Save the inference-only form Hugging Face PEFT reads: no reparameterisation networks."""
        self.save_pretrained(save_directory, selected_adapters, flat=True)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None, allow_pickle: bool = False,
                        subfolder: str | None = None, autocast_adapter_dtype: bool = False, **hub_kwargs) -> "PeftModel":
        config, tensors, source = _read_adapter(model_id, config, is_trainable, allow_pickle, subfolder, hub_kwargs)
        wrapper = cls if cls is not PeftModel else MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)
        return wrapper(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                       state_dict=tensors, source=source)

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     allow_pickle: bool = False, subfolder: str | None = None, **hub_kwargs) -> None:
        config, tensors, source = _read_adapter(model_id, None, is_trainable, allow_pickle, subfolder, hub_kwargs)
        check_task(self.get_base_model(), config.task_type)
        self.base_model.add_adapter(adapter_name, config, tensors, source)


def _read_adapter(model_id, config, is_trainable, allow_pickle, subfolder, hub_kwargs):
    if config is not None and not isinstance(config, PeftConfig):
        raise ConfigError(f"config must be a PeftConfig (e.g. LoraConfig(...)), got {type(config).__name__}; "
                          f"build one from a dict with unipeft.get_peft_config(...), or leave config out to read "
                          f"the adapter's own adapter_config.json")
    config = config or PeftConfig.from_pretrained(model_id, subfolder=subfolder, **hub_kwargs)
    config = dataclasses.replace(config, inference_mode=not is_trainable)
    tensors, source = load_adapter_tensors(model_id, subfolder, allow_pickle, key_prefix(config), **hub_kwargs)
    return config, tensors, source


class PeftModelForSequenceClassification(PeftModel):
    pass


class PeftModelForCausalLM(PeftModel):
    pass


class PeftModelForSeq2SeqLM(PeftModel):
    pass


class PeftModelForTokenClassification(PeftModel):
    pass


class PeftModelForFeatureExtraction(PeftModel):
    pass


class PeftModelForQuestionAnswering(PeftModel):
    pass


MODEL_TYPE_TO_PEFT_MODEL_MAPPING = {
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
}


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                   autocast_adapter_dtype: bool = False, **_compat_kwargs) -> PeftModel:
    if not isinstance(peft_config, PeftConfig):
        raise ConfigError(f"peft_config must be a PeftConfig (e.g. LoraConfig), got {type(peft_config).__name__}")
    wrapper = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(peft_config.task_type, PeftModel)
    return wrapper(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
