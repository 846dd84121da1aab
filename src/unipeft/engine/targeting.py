"""Which modules an adapter attaches to: one implementation for every method.

Semantics follow Hugging Face PEFT: a list of names matches a module whose full name equals an entry
or ends with "." + entry; a string is a regular expression that must match the full name;
"all-linear" selects every Linear/Conv1D except the output layer and task heads.
"""
from __future__ import annotations

import re
from typing import Iterable

import torch.nn as nn

from ..compat import is_conv1d
from .layers import base_named_modules, innermost
from .sites import DEFAULT_LAYER_PATTERNS, family_of

ALL_LINEAR = "all-linear"


class TargetError(ValueError):
    """target_modules / exclude_modules / layers_to_transform select nothing usable."""


def name_matches(name: str, spec) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def layer_index(name: str, layers_pattern) -> int | None:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or DEFAULT_LAYER_PATTERNS)
    for pattern in patterns:
        found = re.match(rf".*\.{pattern}\.(\d+)(\.|$)", name)
        if found:
            return int(found.group(1))
    return None


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


_WRAPPER_CHILDREN = {"base_layer", "original_module"}


def logical_modules(model: nn.Module):
    """(name, module) as the user names them: a wrapped layer appears under its own name, as its base."""
    for name, module in base_named_modules(model):
        if name and not _WRAPPER_CHILDREN & set(name.split(".")):
            yield name, innermost(module)


def _output_layer_names(model: nn.Module) -> set[str]:
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    return {n for n, m in logical_modules(model) if out is not None and m is innermost(out)}


def find_targets(
    model: nn.Module,
    target_modules,
    *,
    exclude_modules=None,
    layers_to_transform=None,
    layers_pattern=None,
    skip: Iterable[str] = (),
) -> list[str]:
    """Names of the modules to adapt, in model order. Raises TargetError naming what exists if none match."""
    if target_modules is None:
        raise TargetError("target_modules is None and this model family has no default; pass target_modules=[...]")
    skip = tuple(skip)
    if layers_to_transform is not None and layers_pattern is None:
        family = family_of(model)
        layers_pattern = family.layers if family else None
    wanted_layers = {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform or ())
    output_layers = _output_layer_names(model) if target_modules == ALL_LINEAR else set()

    chosen = []
    for name, module in logical_modules(model):
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if target_modules == ALL_LINEAR:
            if not is_linear(module) or name in output_layers:
                continue
        elif not name_matches(name, target_modules):
            continue
        if name_matches(name, exclude_modules):
            continue
        if wanted_layers and layer_index(name, layers_pattern) not in wanted_layers:
            continue
        chosen.append(name)
    if not chosen:
        raise TargetError(_nothing_matched(model, target_modules, exclude_modules, layers_to_transform))
    return chosen


def _nothing_matched(model, target_modules, exclude_modules, layers_to_transform) -> str:
    leaves = sorted({n.split(".")[-1] for n, m in logical_modules(model) if is_linear(m)})
    msg = f"target_modules={target_modules!r} matched no module of {type(model).__name__}"
    if exclude_modules:
        msg += f" (after exclude_modules={exclude_modules!r})"
    if layers_to_transform is not None:
        msg += f" (within layers_to_transform={layers_to_transform!r})"
    return msg + f". Linear layers it has, by suffix: {leaves[:20]}"
