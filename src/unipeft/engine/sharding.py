"""Whole parameters while an engine partitions them: DeepSpeed ZeRO-3 (a parameter holds a shard, shape [0],
and knows its whole size as `ds_shape`/`ds_numel`) and FSDP2 (a parameter is a DTensor of which each process
holds a shard).

Adding, loading and merging adapters read and write base weights; under these engines they do it inside
`whole_parameters(module)`, which gathers the module's own parameters for the time of a `with` block (and,
with `write_back=True`, keeps what the block wrote). Gathering is collective: every process must enter the
same blocks in the same order, as every process does when each runs the same code on the same model. For an
unpartitioned model everything here is a no-op, and nothing imports DeepSpeed.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterable, Iterator

import torch
from torch import nn


def numel(param: torch.Tensor) -> int:
    """Elements of the whole parameter, also while ZeRO-3 holds only a shard of it (numel 0)."""
    return getattr(param, "ds_numel", param.numel())


def shape(param: torch.Tensor) -> torch.Size:
    """The whole parameter's shape, also while ZeRO-3 holds only a shard of it (shape [0])."""
    return getattr(param, "ds_shape", param.shape)


def _is_dtensor(tensor) -> bool:
    if not torch.distributed.is_available():  # torch built without distributed support
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _zero3(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p for p in params if hasattr(p, "ds_id")]


@contextlib.contextmanager
def whole_parameters(modules: nn.Module | Iterable[nn.Module], trainable_only: bool = False,
                     write_back: bool = False) -> Iterator[None]:
    """Inside the block every (trainable, or all) parameter of `modules` (recursively) is a whole tensor on
    every process. With `write_back` what the block writes into them is kept (each process must write the
    same values); without it, changes may be lost. Run no forward or backward inside."""
    modules = [modules] if isinstance(modules, nn.Module) else list(modules)
    for m in modules:
        reshard(m)
    params = list({id(p): p for m in modules for p in m.parameters()
                   if p.requires_grad or not trainable_only}.values())
    zero3 = _zero3(params)
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=0 if write_back else None):
            yield
        return
    if not any(_is_dtensor(p) for p in params):
        yield
        return
    from torch.distributed.tensor import distribute_tensor

    # FSDP: each DTensor parameter is swapped for a whole copy (gathered from the shards) until the block ends;
    # nothing runs the model meanwhile, so FSDP's own hooks never see the swap.
    wanted = {id(p) for p in params}
    copies: dict[int, nn.Parameter] = {}  # one whole copy a parameter, also where it is tied to several modules
    swapped = []
    for m in modules:
        for module in m.modules():
            for name, p in list(module._parameters.items()):
                if id(p) in wanted and _is_dtensor(p):
                    if id(p) not in copies:
                        copies[id(p)] = nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
                    module._parameters[name] = copies[id(p)]
                    swapped.append((module, name, p))
    try:
        yield
    finally:
        written = set()
        for module, name, p in swapped:
            if write_back and id(p) not in written:
                written.add(id(p))
                with torch.no_grad():
                    whole = module._parameters[name].detach().to(p.device, p.dtype)
                    p.to_local().copy_(distribute_tensor(whole, p.device_mesh, p.placements,
                                                         src_data_rank=None).to_local())
            module._parameters[name] = p


def reshard(model: nn.Module) -> None:
    """Put every FSDP unit of `model` back to its shards: a forward without backward leaves the root unit's
    parameters unsharded in a buffer, where writes would be lost."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters are ordinary whole tensors, also when the module's are partitioned."""
    with whole_parameters(module):
        return whole_copy(module)


def whole_copy(module: nn.Module) -> nn.Module:
    """`plain_copy` inside a `whole_parameters` block that already holds the module (an adapter's make_parts):
    DeepSpeed refuses to gather a parameter twice."""
    memo = {id(p): nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad) for p in module.parameters()}
    return copy.deepcopy(module, memo)
