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

Building a model too large for one process: under ZeRO-3, load it inside `partitioned_loading(engine)` and
transformers' `from_pretrained` builds it partitioned from the start; under FSDP, every process but the first
may build it on the meta device, and `shard_fsdp` fills their shards from the first process. Adapters are
created on such a base as on any other (`unipeft train` does both).

Under ZeRO-3 and FSDP the parameters are partitioned (ZeRO-3: shape [0] and `ds_numel`; FSDP: DTensor shards).
`unipeft.engine.sharding.whole_parameters(model)` makes them whole for the time of a `with` block;
`full_trainable` and `load_full_trainable` read and write whole trainable tensors. All are collective: every
process must call them, in the same order. They are no-ops (plain copies) for an unsharded model.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..compat import no_split_modules
from ..engine.sharding import whole_parameters
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

    @property
    def zero_stage(self) -> int | None:
        """DeepSpeed's ZeRO stage (from the config file, else from accelerate launch's settings); None otherwise."""
        if self.kind != "deepspeed":
            return None
        if self.deepspeed_config is None:
            return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0"))
        with open(self.deepspeed_config, encoding="utf-8") as fh:
            return int(json.load(fh).get("zero_optimization", {}).get("stage", 0))


@contextlib.contextmanager
def partitioned_loading(engine: Engine):
    """Around loading the base model with `from_pretrained`: under ZeRO-3 transformers then builds it partitioned
    (deepspeed.zero.Init), so no process ever holds the whole model and adapters are created on partitioned
    weights. A no-op for the other engines. The process group must exist (accelerate's PartialState)."""
    if engine.zero_stage != 3 or engine.deepspeed_config is None:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

    with open(engine.deepspeed_config, encoding="utf-8") as fh:
        config = json.load(fh)
    # the batch sizes are the loop's, filled in when training starts; zero.Init only needs them to parse
    config.pop("train_batch_size", None)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if config.get(key, "auto") == "auto":
            config[key] = 1
    alive = HfDeepSpeedConfig(config)  # transformers holds a weak reference: keep it until loading ends
    try:
        yield
    finally:
        del alive
        unset_hf_deepspeed_config()


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
    names = no_split_modules(model)
    if not names:
        raise UsageError(f"FSDP needs the model's transformer blocks, and {type(model).__name__} names none "
                         f"(no _no_split_modules); use --engine ddp or a DeepSpeed config")
    return lambda module: type(module).__name__ in names


def shard_fsdp(model: nn.Module, device: torch.device) -> nn.Module:
    """Apply FSDP2 in place: `fully_shard` on every block the policy picks, then on the whole model. A block
    holding the input embeddings stays in the root unit, whole for the entire forward: prompt methods embed
    their tokens outside that block's forward, and an output layer may share the embedding matrix.

    Processes other than the first may hold the model on the meta device (built without memory, adapters
    included): their shards are then allocated on `device` and filled from the first process's model."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    on_meta = any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, on_meta)
    if flags[0]:
        raise UsageError("FSDP meta-device init: the first process must hold the real weights (it broadcasts them)")
    whole = model.state_dict() if any(flags) and dist.get_rank() == 0 else {}
    if not on_meta:
        model.to(device)
    policy = fsdp_auto_wrap_policy(model)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    blocks = [m for m in model.modules() if m is not model and policy(m)  # listed first: sharding alters them
              and not any(sub is embeddings for sub in m.modules())]
    for module in blocks:
        fully_shard(module)
    fully_shard(model)
    if any(flags):
        if on_meta:
            model.to_empty(device=device)
        set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for buffer in model.buffers():  # also those outside the state dict (position ids)
            dist.broadcast(buffer, src=0)
    return model


def full_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole CPU copies of the trainable tensors, by parameter name; collective."""
    from .train_state import cpu_copy

    with whole_parameters(model, trainable_only=True):
        return cpu_copy(model)


@torch.no_grad()
def load_full_trainable(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into the (possibly sharded) trainable parameters; collective. Under ZeRO-1/2/3 the
    optimizer keeps its own fp32 copy: this is for the end of training (or before the engine starts)."""
    with whole_parameters(model, trainable_only=True, write_back=True):  # every process holds the same tensors
        for name, p in model.named_parameters():  # under FSDP the whole copies, written back to the shards
            if p.requires_grad:
                p.copy_(tensors[name].to(p.device, p.dtype))


def deepspeed_backward_keeping_grads(engine, loss: torch.Tensor, params: list, max_grad_norm: float | None) -> list:
    """What Accelerate's backward does on the last micro-batch of a step under DeepSpeed (backward, then the
    engine's optimizer step, which clears the gradients), keeping whole copies of the gradients of `params`
    taken in between, clipped as the engine clips them; collective."""
    from deepspeed.utils import safe_get_full_grad

    engine.set_gradient_accumulation_boundary(is_boundary=True)
    engine.backward(loss)
    scale = float(getattr(engine.optimizer, "loss_scale", 1.0) or 1.0)  # fp16: the gradients are still scaled
    grads = [None if g is None else g.detach() / scale for g in map(safe_get_full_grad, params)]
    engine.step()
    present = [g for g in grads if g is not None]
    if max_grad_norm and present:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in present]))
        scale = (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        grads = [None if g is None else g * scale.to(g.dtype) for g in grads]
    return grads


@contextlib.contextmanager
def whole_with_gradients(model: nn.Module, grads: list | None = None):
    """For a method's work between the optimizer step and zero_grad (AdaLoRA's rank allocation): the
    trainable parameters whole, each with its whole gradient (`grads` in the order of the trainable
    parameters, or each one's own .grad); what the block writes into them is kept, under DeepSpeed also in
    the optimizer's fp32 copy; collective."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad for p in params] if grads is None else grads
    grads = [g.full_tensor() if isinstance(g, DTensor) else g for g in grads]
    deepspeed = any(hasattr(p, "_hp_mapping") or hasattr(p, "ds_id") for p in params)
    with whole_parameters(model, trainable_only=True, write_back=True):
        whole = [p for p in model.parameters() if p.requires_grad]  # FSDP swapped in whole copies, same order
        own_grads = [p.grad for p in whole]
        before = [p.detach().clone() for p in whole] if deepspeed else []
        for p, g in zip(whole, grads):
            p.grad = None if g is None else g.to(p.dtype)
        try:
            yield
        finally:
            changed = [(i, p.detach().clone()) for i, (p, old) in enumerate(zip(whole, before))
                       if not torch.equal(p.detach(), old)]
            for p, grad in zip(whole, own_grads):
                p.grad = grad
    if changed:  # DeepSpeed's optimizer steps its own fp32 copy: write the changes there too
        for i, value in changed:
            _set_deepspeed_whole(params[i], value)


ADAM_STATE = ("exp_avg", "exp_avg_sq")  # AdamW's per-parameter state, besides its step count


def full_optimizer_state(model: nn.Module, optimizer, engine: Engine) -> dict:
    """The optimizer's state whole, gathered from every process's shard, in the form `load_full_optimizer_state`
    reads under the same engine (for a checkpoint); collective. `model` as prepared, `optimizer` torch's AdamW
    (FSDP, DDP) or DeepSpeed's ZeRO optimizer."""
    if engine.kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                    cpu_offload=True))
    if engine.kind == "deepspeed":
        from deepspeed.utils import safe_get_full_optimizer_state

        tensors = {f"{key}.{name}": safe_get_full_optimizer_state(p, key).detach().cpu()
                   for name, p in _trainable(model) for key in ADAM_STATE}
        steps = [state["step"] for state in optimizer.optimizer.state.values() if "step" in state]
        return {"tensors": tensors, "step": steps[0] if steps else 0}
    return optimizer.state_dict()


def load_full_optimizer_state(model: nn.Module, optimizer, engine: Engine, state: dict) -> None:
    """Restore what `full_optimizer_state` returned (every process passes the whole state); collective."""
    if engine.kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    elif engine.kind == "deepspeed":
        # AdamW creates its state at the first step, and DeepSpeed maps each parameter's fragment of it only
        # then: create it as that step would (zeros, step 0) and have DeepSpeed map it, then fill it in.
        inner_state = optimizer.optimizer.state  # torch's AdamW over DeepSpeed's flat fp32 partitions (ZeRO-3, 1/2)
        for flat in getattr(optimizer, "fp32_partitioned_groups_flat", None) or optimizer.single_partition_of_fp32_groups:
            if "exp_avg" not in inner_state[flat]:
                inner_state[flat].update({"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(flat),
                                          "exp_avg_sq": torch.zeros_like(flat)})
        if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2
            optimizer._lazy_init_hp_params_optimizer_state()
        for name, p in _trainable(model):
            for key in ADAM_STATE:
                _set_deepspeed_whole(p, state["tensors"][f"{key}.{name}"].to(p.device), key)
        for inner in inner_state.values():
            if "step" in inner:
                inner["step"] = state["step"].clone() if torch.is_tensor(state["step"]) else state["step"]
    else:
        optimizer.load_state_dict(state)


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters by the unwrapped model's names (a DeepSpeed engine prefixes them with module.)."""
    module = getattr(model, "module", model)
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


def _set_deepspeed_whole(param: nn.Parameter, value: torch.Tensor, state_key: str | None = None) -> None:
    """DeepSpeed's safe_set_full_fp32_param (state_key None) or safe_set_full_optimizer_state: write a whole
    tensor into this process's part of the optimizer's fp32 copy or state. Under ZeRO-3 it is written here:
    DeepSpeed 0.19 slices the part out of `value` as if the last process's part were not padded, and fails
    on a parameter whose size the number of processes does not divide."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if not hasattr(param, "ds_id"):
        if state_key is None:
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, state_key)
        return
    zero3 = param._z3_optimizer
    part, _ = zero3._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=state_key)
    start = part.numel() * zero3._get_param_partition_rank(param)
    piece = value.flatten()[start:start + part.numel()]
    part.data[:piece.numel()].copy_(piece)
