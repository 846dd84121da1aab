"""The Accelerator a fit runs on: mixed precision, device, and DeepSpeed's plugin from the engine's config file."""
from __future__ import annotations

import os

import torch

from .engines import Engine
from .errors import UsageError

FP16_ON_CPU = ("--fp16 needs a CUDA GPU (Accelerate would silently train in float32 on the CPU); use --bf16, "
               "or neither")


def _deepspeed_plugin(options, engine: Engine, on_cpu: bool):
    from accelerate.state import PartialState
    from accelerate.utils import DeepSpeedPlugin

    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # Without this Accelerate sees no GPU and treats the launch as one process (it would not shard the data).
        PartialState(cpu=True)
    clipping = options.max_grad_norm or 0.0  # DeepSpeed: 0 is no clipping
    try:
        plugin = DeepSpeedPlugin(hf_ds_config=engine.deepspeed_config, gradient_accumulation_steps=options.grad_accum,
                                 gradient_clipping=clipping)
    except ValueError as exc:
        raise UsageError(f"DeepSpeed config {engine.deepspeed_config}: {exc}") from None
    for name, ours in (("gradient_accumulation_steps", options.grad_accum), ("gradient_clipping", clipping)):
        if getattr(plugin, name) != ours:
            raise UsageError(f"DeepSpeed config {engine.deepspeed_config} sets {name} to {getattr(plugin, name)}, "
                             f"the loop's options to {ours}; write \"auto\" in the config")
    if plugin.deepspeed_config.get("optimizer") or plugin.deepspeed_config.get("scheduler"):
        raise UsageError(f"DeepSpeed config {engine.deepspeed_config}: leave out its optimizer and scheduler "
                         f"(the loop uses AdamW over the trainable parameters and its own schedule)")
    return plugin


def make_accelerator(options, engine: Engine):
    """The Accelerator of one fit: its precision, device and engine (DeepSpeed's plugin), every refusal a UsageError."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if options.device not in (None, "cpu", "cuda"):
        raise UsageError(f"device must be None (Accelerate chooses), 'cpu' or 'cuda', got {options.device!r}")
    # AcceleratorState is a process-wide singleton that refuses a second fit with another precision;
    # forget the previous fit's. PartialState (the process group stays initialised either way) is forgotten
    # too when a DeepSpeed fit set it up and this fit runs without DeepSpeed.
    after_deepspeed = PartialState._shared_state.get("distributed_type") == DistributedType.DEEPSPEED
    AcceleratorState._reset_state(reset_partial_state=after_deepspeed and engine.kind != "deepspeed")
    on_cpu = options.device == "cpu" or not torch.cuda.is_available()
    kwargs = {"cpu": options.device == "cpu"}
    if engine.kind == "deepspeed":  # DeepSpeed runs on its own CPU accelerator: Accelerate's cpu=True would bypass it
        kwargs = {"deepspeed_plugin": _deepspeed_plugin(options, engine, on_cpu)}
    try:
        accelerator = Accelerator(gradient_accumulation_steps=options.grad_accum,
                                  mixed_precision=options.mixed_precision, **kwargs)
    except ValueError as exc:
        device = "cpu" if on_cpu else "cuda"
        raise UsageError(f"mixed_precision {options.mixed_precision!r} is not available on {device} ({exc}); "
                         f"use mixed_precision='no'") from None
    device = accelerator.device.type
    if options.device == "cuda" and device != "cuda":
        raise UsageError(f"device 'cuda' asked for, but Accelerate runs on {device}")
    if options.mixed_precision == "fp16" and device == "cpu":  # check_options catches the usual cases earlier
        raise UsageError(FP16_ON_CPU)
    return accelerator
