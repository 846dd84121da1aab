"""Configs: the PeftConfig base, TaskType, PeftType and checked JSON (de)serialisation.

Field names follow Hugging Face PEFT so that `adapter_config.json` files move both ways.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from .registry import PeftType

CONFIG_NAME = "adapter_config.json"


class TaskType(str, enum.Enum):
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


class ConfigError(ValueError):
    """A config value or file that cannot be used; the message names the field and the fix."""


def _type_ok(value: Any, annotation: Any) -> bool:
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if origin is Literal:
        return value in args
    if annotation is type(None):
        return value is None
    if origin in (list, tuple, set):
        return isinstance(value, (list, tuple, set)) and all(_type_ok(v, args[0]) for v in value) if args else True
    if origin is dict:
        return isinstance(value, dict) and all(_type_ok(v, args[1]) for v in value.values())
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return isinstance(value, annotation) or value in {m.value for m in annotation}
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _neutral(value: Any, neutral: Any) -> bool:
    """Whether an HF PEFT-only field's value asks for nothing (its default, empty, off; a dict of such values,
    e.g. runtime_config's {"ephemeral_gpu_offload": false})."""
    if isinstance(value, dict):
        return value == neutral or all(_neutral(v, None) for v in value.values())
    return value in (neutral, None, False, [])


def _describe(annotation: Any) -> str:
    return str(annotation).replace("typing.", "").replace("NoneType", "None")


def unsaved(default=None):
    """A config field that planning fills in from the model (`resolved`) and the adapter file never holds."""
    return field(default=default, repr=False, compare=False, metadata={"saved": False})


@dataclass
class PeftConfig:
    """Fields every method shares. Subclasses add their own and set `peft_type`."""

    peft_type: Optional[Union[str, PeftType]] = None
    task_type: Optional[Union[str, TaskType]] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    auto_mapping: Optional[dict] = None

    # Fields Hugging Face PEFT writes that we accept silently while they hold their neutral value.
    # A non-neutral value is a feature we do not implement: refuse it rather than load it wrongly.
    _peft_neutral_fields: typing.ClassVar[dict[str, Any]] = {"peft_version": None}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for key in ("target_modules", "exclude_modules"):  # the targeting fields, where a method has them
            if isinstance(getattr(self, key, None), (set, tuple)):
                setattr(self, key, sorted(getattr(self, key)))
        if getattr(self, "target_modules", None) == []:
            raise ConfigError(f"{type(self).__name__}.target_modules=[] selects no module; leave it None for the "
                              f"model family's default targets, or name the modules to adapt")
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _type_ok(value, hints[f.name]):
                raise ConfigError(
                    f"{type(self).__name__}.{f.name} must be {_describe(hints[f.name])}, "
                    f"got {type(value).__name__} {value!r}"
                )
        if self.task_type is not None:
            try:
                self.task_type = TaskType(self.task_type)
            except ValueError:
                raise ConfigError(
                    f"unknown task_type {self.task_type!r}; choose one of {[t.value for t in TaskType]}"
                ) from None
        if getattr(self, "layers_pattern", None) is not None and getattr(self, "layers_to_transform", None) is None:
            raise ConfigError(f"{type(self).__name__}.layers_pattern only applies together with layers_to_transform")

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, (set, tuple)):
                value = sorted(value) if isinstance(value, set) else list(value)
            if f.metadata.get("saved", True):
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PeftConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs, unknown = {}, []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in cls._peft_neutral_fields:
                if not _neutral(value, cls._peft_neutral_fields[key]) and key != "peft_version":
                    raise ConfigError(
                        f"{cls.__name__}: field {key}={value!r} asks for a Hugging Face PEFT feature that "
                        f"unipeft does not implement; remove it from the config to load this adapter"
                    )
            else:
                unknown.append(key)
        if unknown:
            warnings.warn(f"{cls.__name__}: ignoring unknown config fields {sorted(unknown)}", stacklevel=3)
        expected = cls.__dataclass_fields__["peft_type"].default
        if expected is not None and kwargs.get("peft_type") not in (None, expected, getattr(expected, "value", None)):
            raise ConfigError(f"{cls.__name__} expects peft_type {expected}, got {kwargs['peft_type']!r}")
        return cls(**kwargs)

    def to_saved_json(self) -> str:
        """The JSON written next to adapter weights: saved adapters load for inference by default."""
        data = self.to_dict()
        data["inference_mode"] = True
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        from .atomic_files import atomic_write_text

        os.makedirs(save_directory, exist_ok=True)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), self.to_saved_json())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, subfolder: str | None = None, **hub_kwargs) -> "PeftConfig":
        from .engine.checkpoint import resolve_file

        file = resolve_file(path, CONFIG_NAME, subfolder=subfolder, **hub_kwargs)
        data = read_config_json(file)
        if cls is PeftConfig:
            return config_from_dict(data, source=file)
        return cls.from_dict(data)

    # ---- conveniences PEFT users call ----------------------------------------------------------
    @property
    def is_prompt_learning(self) -> bool:
        return False

    def planned(self, target_modules, transposed: bool) -> "PeftConfig":
        """This config as saved once planned on a model, as HF PEFT records it: the family's default
        `target_modules` when none were given, and `fan_in_fan_out=True` when a target keeps its weight as
        [in, out] (GPT-2's Conv1D). A copy when anything changes: the caller's config is never modified."""
        changes = {}
        if getattr(self, "target_modules", ()) is None and target_modules is not None:
            changes["target_modules"] = list(target_modules)
        if transposed and getattr(self, "fan_in_fan_out", True) is False:
            changes["fan_in_fan_out"] = True
        return dataclasses.replace(self, **changes) if changes else self

    def describe(self) -> str:
        """Where the adapter attaches, in a few words for a run's log (methods say more about themselves)."""
        targets = getattr(self, "target_modules", None)
        if not targets:
            return type(self).__name__
        return f"target modules: {targets if isinstance(targets, str) else ', '.join(sorted(targets))}"

    @property
    def is_adaption_prompt(self) -> bool:
        return False


def read_config_json(file: str, what: str = "adapter config") -> dict[str, Any]:
    """The JSON object in `file`; a ConfigError naming `what` and the file when it cannot be read or is not one."""
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {file}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {file} must hold a JSON object, got {type(data).__name__}")
    return data


def config_from_dict(data: dict[str, Any], source: str = "config") -> PeftConfig:
    """Build the right config class from a dict holding `peft_type` (HF PEFT's `get_peft_config`)."""
    from .registry import get_method, known_peft_types

    peft_type = data.get("peft_type")
    if peft_type is None:
        raise ConfigError(f"{source} has no 'peft_type'; set it to one of {known_peft_types()}")
    return get_method(str(peft_type)).config_cls.from_dict(data)


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    return config_from_dict(config_dict)


__all__ = [
    "CONFIG_NAME", "ConfigError", "PeftConfig", "PeftType", "TaskType", "field", "get_peft_config",
]
