"""Which distributed engine `fit` trains with, and reading/writing full trainable tensors under sharding.

Choosing the engine: `LoopOptions.engine` (the CLI's `--engine`), under a launcher that starts the processes
(`torchrun --nproc_per_node N`, or `accelerate launch`):

    "ddp"          data parallel: every process holds the whole model (also the one-process default)
    "fsdp"         FSDP2 (`torch.distributed.fsdp.fully_shard`), one unit per transformer block (the model's
                   `_no_split_modules`: BertLayer, BertEmbeddings, LlamaDecoderLayer ...) and one for the rest
    "<file>.json"  DeepSpeed with that config file (configs/deepspeed/zero1.json, zero2.json, zero3.json);
                   its batch size, gradient accumulation and clipping are "auto": the loop's options fill them
    None           what `accelerate launch --config_file ...` put in the environment: DeepSpeed when its config
                   says so (ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_CONFIG_FILE), FSDP for
                   ACCELERATE_USE_FSDP, otherwise DDP

    torchrun --nproc_per_node 2 -m unipeft train --engine configs/deepspeed/zero2.json --output-dir runs/z2
    accelerate launch --config_file configs/accelerate/fsdp.yaml -m unipeft train --output-dir runs/f

Only trainable parameters get gradients and optimizer state under every engine: the optimizer holds them
alone, and frozen parameters never get a gradient. FSDP2 shards each parameter on its own, so a unit may mix
frozen and trainable parameters (a block with its LoRA matrices); adapter modules are not units of their own,
since several methods read their weights directly in the block's forward, outside any forward of theirs.

Under ZeRO-3 and FSDP the parameters are partitioned (ZeRO-3: shape [0] and `ds_numel`; FSDP: DTensor shards).
`gathered(model)` makes them whole for the time of a `with` block; `full_trainable` and `load_full_trainable`
read and write whole trainable tensors. All three are collective: every process must call them, in the same
order. They are no-ops (plain copies) for an unsharded model.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UsageError

ENGINES = ("ddp", "fsdp")  # besides a DeepSpeed JSON file


@dataclass(frozen=True)
class Engine:
    kind: str  # "ddp" | "fsdp" | "deepspeed"
    deepspeed_config: str | None = None  # the JSON file; None under accelerate launch's own DeepSpeed settings

    @property
    def sharded(self) -> bool:
        """Whether a process holds only part of the parameters or of the optimizer state."""
        return self.kind != "ddp"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def resolve_engine(option: str | None) -> Engine:
    """The engine for LoopOptions.engine (see the module docstring); UsageError for an unknown value."""
    if option is None:
        if _env_flag("ACCELERATE_USE_DEEPSPEED"):
            path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
            return resolve_engine(path) if path and path != "none" else Engine("deepspeed")
        return Engine("fsdp" if _env_flag("ACCELERATE_USE_FSDP") else "ddp")
    if option in ENGINES:
        return Engine(option)
    if option.endswith(".json"):
        if not os.path.isfile(option):
            raise UsageError(f"DeepSpeed config {option} does not exist")
        return Engine("deepspeed", option)
    raise UsageError(f"unknown engine {option!r}; choose ddp, fsdp, or a DeepSpeed config file (.json)")


def fsdp_auto_wrap_policy(model: nn.Module):
    """`policy(module) -> bool`: whether `module` is an FSDP unit of its own: a transformer block, by the class
    names of the Hugging Face model's `_no_split_modules` (found through a PEFT wrapper). UsageError when the
    model names none."""
    base = model
    while not hasattr(base, "_no_split_modules") and hasattr(base, "get_base_model"):
        base = base.get_base_model()
    names = set(getattr(base, "_no_split_modules", None) or ())
    if not names:
        raise UsageError(f"FSDP needs the model's transformer blocks, and {type(base).__name__} names none "
                         f"(no _no_split_modules); use --engine ddp or a DeepSpeed config")
    return lambda module: type(module).__name__ in names


def shard_fsdp(model: nn.Module) -> nn.Module:
    """Apply FSDP2 in place: `fully_shard` on every block the policy picks, then on the whole model."""
    from torch.distributed.fsdp import fully_shard

    policy = fsdp_auto_wrap_policy(model)
    for module in [m for m in model.modules() if m is not model and policy(m)]:  # listed first: sharding alters them
        fully_shard(module)
    fully_shard(model)
    return model


def _zero3_params(params) -> list:
    return [p for p in params if hasattr(p, "ds_id")]


def numel(param: torch.Tensor) -> int:
    """Elements of the whole parameter, also while ZeRO-3 holds only a shard of it (numel 0)."""
    return getattr(param, "ds_numel", param.numel())


@contextlib.contextmanager
def gathered(model: nn.Module, trainable_only: bool = True):
    """Inside the block the (trainable, or all) parameters are whole tensors on every process; collective.
    Changes made inside are not kept under FSDP and ZeRO-3: write with `load_full_trainable`. Run no forward
    or backward inside."""
    params = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    zero3 = _zero3_params(params)
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
            yield model
        return
    # FSDP: each DTensor parameter is swapped for a whole copy (gathered from the shards) until the block ends;
    # nothing runs the model meanwhile, so FSDP's own hooks never see the swap.
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()  # a forward without backward leaves the root unit's parameters gathered in a buffer
    swapped = []
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if isinstance(p, DTensor) and (p.requires_grad or not trainable_only):
                module._parameters[name] = nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
                swapped.append((module, name, p))
    try:
        yield model
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def full_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole CPU copies of the trainable tensors, by parameter name; collective."""
    from .train_state import cpu_copy

    with gathered(model):
        return cpu_copy(model)


@torch.no_grad()
def load_full_trainable(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into the (possibly sharded) trainable parameters; collective. Under ZeRO-1/2/3 the
    optimizer keeps its own fp32 copy: this is for the end of training (or before the engine starts)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    zero3 = _zero3_params(params.values())
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=0):  # every process holds the same tensors
            for name, p in params.items():
                p.copy_(tensors[name])
        return
    for name, p in params.items():
        value = tensors[name].to(p.device, p.dtype)
        if isinstance(p, DTensor):  # each process keeps its own shard of the whole tensor it holds
            value = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)
        p.copy_(value)
