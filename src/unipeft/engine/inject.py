"""Attach adapters to a model: plan (pure), validate, apply; freeze the base; merge, unload, delete.

`AdapterModel` is what Hugging Face PEFT calls the tuner (`peft_model.base_model`): it holds the user's
model as `.model`, so checkpoint keys read `base_model.model.<module path>...` in both libraries.
An adapter is added in two steps: `plan` builds every new tensor without touching the model, so
loading can check a checkpoint against it and fail cleanly; `apply` then swaps the wrappers in.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn as nn

from ..registry import get_method
from .layers import (
    BASE, AdapterError, AdapterLayer, AdapterState, ModulesToSaveWrapper, Routing, base_named_modules,
    innermost, logical_name, named_part_tensors, wrapper_of,
)
from .checkpoint import CheckpointMismatchError
from .merge import MergeAndRemove
from .model_parts import PART_HOMES, ModelPart
from .sharding import numel, plain_copy, shape, whole_parameters
from .sites import default_targets
from .targeting import TargetError, find_targets, logical_modules, name_matches


@dataclass
class PlannedLayer:
    module_name: str
    layer_cls: type
    parts: dict[str, Any]
    hparams: Any  # the method's hyperparameter dataclass


@dataclass
class AdapterPlan:
    name: str
    config: Any
    layers: list[PlannedLayer] = field(default_factory=list)
    heads: dict[str, nn.Module] = field(default_factory=dict)
    target_modules: Any = None
    part: ModelPart | None = None  # what the adapter holds at the model level (a prompt, shared tensors)
    resolved_config: Any = None  # the last planned part's config with the model's sizes filled in

    def tensors(self) -> dict[str, torch.Tensor]:
        """Checkpoint key (without the `base_model.model.` prefix) -> the new tensor it fills."""
        out: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            out.update(named_part_tensors(layer.module_name, layer.parts))
        for module_name, head in self.heads.items():
            out.update({f"{module_name}.{k}": v for k, v in head.state_dict(keep_vars=True).items()})
        return out


def _module_bias_name(module_name: str, module: nn.Module) -> str | None:
    base = innermost(module)
    if getattr(base, "bias", None) is None:
        return None
    return f"{logical_name(module_name)}.base_layer.bias" if isinstance(module, AdapterLayer) else f"{module_name}.bias"


class AdapterModel(MergeAndRemove, nn.Module):
    def __init__(self, model: nn.Module, config, adapter_name: str, state_dict: dict | None = None,
                 source: str = "state_dict") -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, Any] = {}
        self.adapter_state = AdapterState()
        self.prompt_encoder = nn.ModuleDict()  # model parts by adapter name: prompts (HF PEFT's attribute name)
        self.model_parts = nn.ModuleDict()  # and the others (engine.model_parts.PART_HOMES)
        self.method_state: dict[str, Any] = {}  # what a method keeps across steps, by adapter name
        self.add_adapter(adapter_name, config, state_dict, source)

    def forward(self, *args, **kwargs):
        outputs = self.model(*args, **kwargs)
        if isinstance(getattr(outputs, "loss", None), torch.Tensor):
            for name, spec in self._training_specs("loss_term"):
                outputs.loss = outputs.loss + spec.loss_term(self, name)
        return outputs

    def update_and_allocate(self, global_step: int) -> None:
        """Run the per-step work of the training adapters' methods (AdaLoRA's rank allocation; nothing for
        the others). Call it after each `optimizer.step()`, before `zero_grad()`, with the 0-based step;
        `unipeft train` and `unipeft.AdaLoraCallback` (for transformers.Trainer) do."""
        for name, spec in self._training_specs("after_optimizer_step"):
            spec.after_optimizer_step(self, name, global_step)

    def has_step_work(self) -> bool:
        """Whether `update_and_allocate` does anything: some training adapter's method works after each step."""
        return any(True for _ in self._training_specs("after_optimizer_step"))

    def step_state_dict(self) -> dict[str, dict]:
        """What the training adapters' per-step work keeps between steps (AdaLoRA's importance scores), by
        adapter name: saved with a training checkpoint so a resumed run continues exactly."""
        return {name: spec.step_state(self, name) for name, spec in self._training_specs("step_state")}

    def load_step_state_dict(self, states: dict[str, dict]) -> None:
        for name, spec in self._training_specs("load_step_state"):
            if name in states:
                spec.load_step_state(self, name, states[name])

    def _training_specs(self, hook: str):
        for name in self.adapter_state.active:
            spec = get_method(self.peft_config[name].peft_type)
            if getattr(spec, hook) is not None and not self.peft_config[name].inference_mode:
                yield name, spec

    # ---- adding adapters -----------------------------------------------------------------------
    def plan(self, name: str, config) -> AdapterPlan:
        if not name or "." in name or name == BASE:
            raise AdapterError(f"invalid adapter name {name!r}: use a non-empty name without '.', not {BASE!r}")
        if name in self.peft_config:
            raise AdapterError(f"adapter {name!r} already exists; delete_adapter({name!r}) first or choose another name")
        plan = AdapterPlan(name, config)
        head_specs = list(getattr(config, "modules_to_save", None) or [])
        for module_name, module in logical_modules(self.model):
            if name_matches(module_name, head_specs) and not any(module_name.startswith(h + ".") for h in plan.heads):
                plan.heads[module_name] = plain_copy(module).requires_grad_(True)
        spec = get_method(config.peft_type)
        parts = spec.components(config, self.model) if spec.components else [config]
        for part in parts:
            self._plan_part(plan, part)
        if spec.components is None:
            plan.config = plan.resolved_config
        return plan

    def _plan_part(self, plan: AdapterPlan, config) -> None:
        """Add one plain method's tensors to the plan (a union config has several)."""
        spec = get_method(config.peft_type)
        if hasattr(config, "resolved"):  # sizes or sites read from the model
            config = config.resolved(self.model)
        plan.resolved_config = config
        if spec.layer_for is not None:
            self._plan_layers(plan, spec, config)
            transposed = any(getattr(layer.hparams, "transposed", False) for layer in plan.layers)
            config = plan.resolved_config = config.planned(plan.target_modules, transposed)
        if spec.model_part is not None:
            if plan.part is not None:
                raise AdapterError("one adapter can hold only one model-level part (one prompt-based part)")
            with whole_parameters(self.model.get_input_embeddings()):  # prompts may start from token embeddings
                plan.part = spec.model_part(self.model, config, plan.layers).place(*self._model_device_dtype())

    def _plan_layers(self, plan: AdapterPlan, spec, config) -> None:
        plan.target_modules = targets = config.target_modules or default_targets(self.model, spec.default_targets)
        for module_name in find_targets(
            self.model, targets, exclude_modules=getattr(config, "exclude_modules", None),
            layers_to_transform=getattr(config, "layers_to_transform", None),
            layers_pattern=getattr(config, "layers_pattern", None), skip=plan.heads,
        ):
            module = self.model.get_submodule(module_name)
            base = innermost(module)
            with whole_parameters(base):  # sizes and initial values read the base weight (ZeRO-3 partitions it)
                self._plan_layer(plan, spec, config, module_name, base)

    @staticmethod
    def _plan_layer(plan: AdapterPlan, spec, config, module_name: str, base: nn.Module) -> None:
        layer_cls = spec.layer_for(base, config)
        if layer_cls is None:
            raise TargetError(
                f"{module_name} is a {type(base).__name__}, which {spec.peft_type} cannot adapt; "
                f"narrow target_modules to supported layers"
            )
        if any(p.module_name == module_name and p.layer_cls is layer_cls for p in plan.layers):
            raise AdapterError(f"two parts of adapter {plan.name!r} would put a {layer_cls.__name__} on {module_name}")
        parts, hparams = layer_cls.make_parts(base, config, module_name)
        plan.layers.append(PlannedLayer(module_name, layer_cls, parts, hparams))

    def fill_plan(self, plan: AdapterPlan, tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        """Check a checkpoint against the plan and copy it in. Returns base tensors (trained biases,
        embeddings HF PEFT saved) to load after apply."""
        expected = plan.tensors()
        if plan.part is not None:
            plan.part.load_tensors({k: v for k, v in tensors.items() if plan.part.owns(k)}, source)
            tensors = {k: v for k, v in tensors.items() if not plan.part.owns(k)}
        base_tensors = {}
        for key, value in tensors.items():
            target = expected.get(key)
            if target is None and key.endswith("bias") and getattr(plan.config, "bias", "none") != "none":
                target = base_tensors[key] = self._base_parameter(key)
            if target is None and self._is_embedding_weight(key):  # HF PEFT's save_embedding_layers
                target = base_tensors[key] = self._base_parameter(key)
            if target is None:
                raise CheckpointMismatchError(
                    f"{source}: key base_model.model.{key} matches nothing this adapter config creates in "
                    f"{type(self.model).__name__}; the adapter was saved for another base model or config"
                )
            if tuple(value.shape) != tuple(shape(target)):
                raise CheckpointMismatchError(
                    f"{source}: base_model.model.{key} has shape {tuple(value.shape)} in the file but "
                    f"{tuple(shape(target))} in this model; the adapter was saved for another base model"
                )
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise CheckpointMismatchError(f"{source} lacks {len(missing)} adapter tensors, first base_model.model.{missing[0]}")
        with torch.no_grad():
            for key, target in expected.items():
                target.copy_(tensors[key])
        return {key: tensors[key] for key in base_tensors}

    def _is_embedding_weight(self, key: str) -> bool:
        """Whether `key` is the full weight of the input/output embeddings, which HF PEFT saves when they are
        targeted (or resized); loading it into the base matches what HF PEFT does."""
        param = self._base_parameter(key)
        if param is None or not key.endswith("weight"):
            return False
        for getter in ("get_input_embeddings", "get_output_embeddings"):
            try:
                layer = getattr(self.model, getter)()
            except (AttributeError, NotImplementedError):
                continue
            if layer is not None and getattr(innermost(layer), "weight", None) is param:
                return True
        return False

    def _model_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Where new adapter tensors go and their dtype: those of the base weights."""
        param = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        return (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)

    def _base_parameter(self, key: str) -> torch.Tensor | None:
        logical = key.replace(".base_layer.", ".")
        for name, param in self.named_base_parameters():
            if name.replace(".base_layer.", ".") == logical:
                return param
        return None

    def apply_plan(self, plan: AdapterPlan) -> None:
        existing = {id(m) for m in self.model.modules()}
        if plan.part is not None:  # first: adapter layers reach it when attached
            getattr(self, plan.part.home)[plan.name] = plan.part
            plan.part.attached(self)
        for planned in plan.layers:
            outer = self.model.get_submodule(planned.module_name)
            module = wrapper_of(outer, planned.layer_cls)
            if module is None:  # a new wrapper goes outside any other method's wrapper of this module
                module = planned.layer_cls(outer, self.adapter_state)
                self.model.set_submodule(planned.module_name, module)
            module.add_adapter(plan.name, planned.parts, planned.hparams)
            module.attach(self)
        for module_name, head in plan.heads.items():
            module = self.model.get_submodule(module_name)
            if not isinstance(module, ModulesToSaveWrapper):
                module = ModulesToSaveWrapper(module, self.adapter_state)
                self.model.set_submodule(module_name, module)
            module.add_adapter(plan.name, head)
        self.peft_config[plan.name] = plan.config
        self._follow_mode(existing)

    def _follow_mode(self, existing: set[int]) -> None:
        """New modules (wrappers, dropout, generators) take the model's train/eval mode, as if they had been
        there when the user called `model.eval()`."""
        mode = self.model.training
        for module in self.modules():
            if id(module) not in existing:
                module.training = mode
        for part in self.parts():
            part.train(mode)  # a method may keep frozen parts in eval mode (IDPG's sentence encoder)

    def add_adapter(self, name: str, config, state_dict: dict | None = None, source: str = "state_dict") -> None:
        plan = self.plan(name, config)
        base_tensors = self.fill_plan(plan, state_dict, source) if state_dict is not None else {}
        self.apply_plan(plan)  # not `apply`: nn.Module.apply(fn) must keep its meaning (DeepSpeed, FSDP call it)
        targets = [self._base_parameter(key) for key in base_tensors]
        owners = [m for m in self.model.modules() if any(p is t for p in m.parameters(recurse=False) for t in targets)]
        with torch.no_grad(), whole_parameters(owners, write_back=True):
            for key, value in base_tensors.items():
                self._base_parameter(key).copy_(value)  # looked up here: FSDP swaps in whole copies
        if not self.adapter_state.active:
            self.adapter_state.active = [name]
        self.refresh_trainable()

    # ---- which adapters run and train ----------------------------------------------------------
    def adapter_layers(self) -> Iterator[tuple[str, nn.Module]]:
        for module_name, module in self.model.named_modules():
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
                yield module_name, module

    def replaced_head_numel(self) -> int:
        """Parameters of frozen original heads that trained copies stand in for while an adapter is active."""
        return sum(numel(p) for _, module in self.adapter_layers() if isinstance(module, ModulesToSaveWrapper)
                   and module.modules_to_save for p in module.original_module.parameters())

    def named_base_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for module_name, module in base_named_modules(self.model):
            if not isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
                for pname, param in module.named_parameters(recurse=False):
                    yield (f"{module_name}.{pname}" if module_name else pname), param

    def adapter_tensors(self, name: str, saving: bool = False) -> dict[str, torch.Tensor]:
        """Everything adapter `name` owns, keyed as in the checkpoint (adapter name stripped); `saving`
        gives what the file holds, which a method may prune (AdaLoRA drops its masked ranks)."""
        out: dict[str, torch.Tensor] = {}
        part = self.part_of(name)
        if part is not None:
            out.update(part.checkpoint_tensors())
        bias = getattr(self.peft_config[name], "bias", "none")
        for module_name, module in self.adapter_layers():
            if isinstance(module, AdapterLayer) and name in module.hparams:
                parts = module.saved_parts(name) if saving else module.parts_of(name)
                out.update(named_part_tensors(logical_name(module_name), parts))
                bias_name = _module_bias_name(module_name, module) if bias.endswith("_only") else None  # lora_only, oft_only
                if bias_name:
                    out[bias_name] = innermost(module).bias
            elif isinstance(module, ModulesToSaveWrapper) and name in module.modules_to_save:
                copy_state = module.modules_to_save[name].state_dict(keep_vars=True)
                out.update({f"{module_name}.{k}": v for k, v in copy_state.items()})
        if bias == "all":
            out.update({n: p for n, p in self.named_base_parameters() if n.endswith("bias")})
        return out

    def training_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """What adapter `name` needs beyond its checkpoint to resume training (reparameterisation networks)."""
        part = self.part_of(name)
        return part.training_tensors() if part is not None else {}

    def trainable_tensors(self, name: str) -> list[torch.Tensor]:
        part = self.part_of(name)
        return list(self.adapter_tensors(name).values()) + (part.trainable_parameters() if part is not None else [])

    def part_of(self, name: str) -> ModelPart | None:
        """Adapter `name`'s model-level part (engine.model_parts), if it has one."""
        return next((getattr(self, home)[name] for home in PART_HOMES if name in getattr(self, home)), None)

    def parts(self) -> Iterator[ModelPart]:
        for home in PART_HOMES:
            yield from getattr(self, home).values()

    def set_adapter(self, names) -> None:
        names = [names] if isinstance(names, str) else list(names)
        self.check_names(names)
        prompts = [n for n in names if n in self.prompt_encoder]
        if len(prompts) > 1:
            raise AdapterError(f"only one prompt-based adapter can be active at a time, got {prompts}")
        self.adapter_state.active = names
        self.refresh_trainable()

    def check_names(self, names, allow_base: bool = False) -> None:
        known = set(self.peft_config) | ({BASE} if allow_base else set())
        unknown = [n for n in names if n not in known]
        if unknown:
            raise AdapterError(f"unknown adapter name(s) {unknown}; this model has {sorted(self.peft_config)}")

    def refresh_trainable(self) -> None:
        for param in self.parameters():
            param.requires_grad_(False)
        for name in self.adapter_state.active:
            if not self.peft_config[name].inference_mode:
                for tensor in self.trainable_tensors(name):
                    if isinstance(tensor, nn.Parameter) and tensor.is_floating_point():
                        tensor.requires_grad_(True)

    @contextlib.contextmanager
    def disabled(self):
        self.unmerge()
        state = self.adapter_state
        previous, state.disabled = state.disabled, True
        try:
            yield
        finally:
            state.disabled = previous

    @contextlib.contextmanager
    def routed(self, adapter_names: list[str] | None):
        if adapter_names is None:
            yield
            return
        self.check_names(adapter_names, allow_base=True)
        if self.merged_adapters():
            raise AdapterError("mixed-batch adapter_names cannot run on merged weights; call unmerge_adapter() first")
        state = self.adapter_state
        state.routing = Routing(adapter_names)
        try:
            yield
        finally:
            state.routing = None
