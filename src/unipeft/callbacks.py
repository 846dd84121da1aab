"""A transformers.Trainer callback that runs the per-step work of adapter methods (AdaLoRA's rank schedule)."""
from __future__ import annotations

from transformers import TrainerCallback


class AdaLoraCallback(TrainerCallback):
    """Calls `model.base_model.update_and_allocate(step)` after every optimizer step, before the gradients are
    cleared, as AdaLoRA needs: `Trainer(model=peft_model, ..., callbacks=[AdaLoraCallback()])`.
    Harmless for methods without per-step work."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        for _ in range(3):  # a DDP wrapper's .module, then the PeftModel's .base_model (the tuner)
            if model is None or hasattr(model, "update_and_allocate"):
                break
            model = getattr(model, "module", None) or getattr(model, "base_model", None)
        if model is not None and hasattr(model, "update_and_allocate"):
            model.update_and_allocate(state.global_step)  # steps finished before this one: 0-based
        return control
