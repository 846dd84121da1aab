"""The engine-specific work of a training step behind one small interface, so the loop in trainer.py reads the
same under DDP, FSDP2 and DeepSpeed, with or without a method that works after each step (AdaLoRA):

    stepper = Stepper.prepare(accelerator, engine, model, loader, make_optimizer, make_scheduler, max_grad_norm)
    for batch in stepper.loader:
        with accelerator.accumulate(stepper.model):
            stepping = accelerator.sync_gradients
            loss = stepper.loss(batch)
            stepper.backward(loss, stepping)
            if stepping:
                stepper.step(global_step)
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .batches import make_optimizer
from .engines import Engine, deepspeed_backward_keeping_grads, shard_fsdp, whole_with_gradients
from .errors import UsageError


class Stepper:
    def __init__(self, accelerator, engine: Engine, model, optimizer, loader, scheduler, max_grad_norm, autocast):
        self.accelerator, self.engine, self.max_grad_norm, self.autocast = accelerator, engine, max_grad_norm, autocast
        self.model, self.optimizer, self.loader, self.scheduler = model, optimizer, loader, scheduler
        self.params = [p for p in model.parameters() if p.requires_grad]
        adapters = getattr(accelerator.unwrap_model(model), "base_model", None)
        # only where some method works after each step (AdaLoRA): elsewhere no gradient is kept or gathered
        self.after_step = adapters.update_and_allocate if getattr(adapters, "has_step_work", bool)() else None
        self.step_state = getattr(adapters, "step_state_dict", lambda: {})
        self.load_step_state = getattr(adapters, "load_step_state_dict", None)
        self._grads = None

    @classmethod
    def prepare(cls, accelerator, engine: Engine, model, loader, lr: float, weight_decay: float,
                make_scheduler: Callable, max_grad_norm: float | None) -> "Stepper":
        """Shard or wrap the model for the engine, make AdamW over its trainable parameters and the schedule
        (`make_scheduler(optimizer)`), and prepare them with the loader in one call (DeepSpeed builds its engine
        from all four together)."""
        fsdp = engine.kind == "fsdp"
        if fsdp:
            # Sharding replaces the parameters, so it comes before the optimizer; Accelerate's own FSDP does not
            # run on CPU, so the model is sharded here and not handed to prepare (which would wrap it in DDP).
            if not torch.distributed.is_initialized():
                raise UsageError("FSDP needs several processes: start them with torchrun or accelerate launch")
            model = shard_fsdp(model, accelerator.device)
        optimizer = make_optimizer(model, lr, weight_decay)
        scheduler = make_scheduler(optimizer)
        if fsdp:
            optimizer, loader, scheduler = accelerator.prepare(optimizer, loader, scheduler)
        else:
            model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
        autocast = accelerator.autocast if fsdp else contextlib.nullcontext  # prepare adds it to forward otherwise
        return cls(accelerator, engine, model, optimizer, loader, scheduler, max_grad_norm, autocast)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def loss(self, batch: dict) -> torch.Tensor:
        with self.autocast():
            return self.model(**batch).loss

    def backward(self, loss: torch.Tensor, stepping: bool) -> None:
        if stepping and self.after_step is not None and self.engine.kind == "deepspeed":
            # DeepSpeed steps the optimizer inside backward, clearing the gradients the method reads after the step
            self._grads = deepspeed_backward_keeping_grads(self.model, loss, self.params, self.max_grad_norm)
        else:
            self.accelerator.backward(loss)

    def step(self, global_step: int) -> None:
        """Clip, step the optimizer and the schedule, let the methods work (with the step's gradients), zero."""
        if self.max_grad_norm:  # DeepSpeed clips inside its step (its gradient_clipping)
            self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        if self.after_step is not None:  # after the step, while the gradients are still there
            with whole_with_gradients(self.model, self._grads):
                self.after_step(global_step)
            self._grads = None
        self.optimizer.zero_grad(set_to_none=True)
