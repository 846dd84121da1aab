"""The training loop on Accelerate: one entry point, `fit`, for any model whose forward returns `.loss`.

    result = fit(model, train_examples, collate, evaluate, main_metric, greater_is_better, LoopOptions(...), run_dir)

`collate(list of examples) -> dict of tensors` builds a batch; `evaluate() -> {metric: value}` evaluates the
current model (it is called at every checkpoint point: every `eval_every` optimizer steps, or at each epoch's end,
and at the very end). Under several processes every process calls it and evaluates every example itself (it sees
the whole split, nothing is sharded), so all processes get the same metrics and pick the same best step.
The best evaluation by `main_metric` is loaded back into the model before `fit` returns, with the adapter
methods' step state of that moment (AdaLoRA's rank pattern), so the model matches what it saves.

Files written (by the main process) in run_dir:
    log.jsonl      one JSON record a line. Training: {"step", "epoch", "loss", "lr", "examples_per_second"}, the mean
                   loss and the last rate of the steps since the previous record, every `log_every` steps and at each
                   checkpoint point. Evaluation: {"step", "epoch", "eval": {metric: value}}. "epoch" is fractional
                   (1.5: half-way through the second epoch).
    checkpoint/    replaced atomically at each checkpoint point and at the end; adapter-only (trainable tensors):
                   trainable.safetensors (by parameter name), best.safetensors (the best copy, if any),
                   optimizer.pt, scheduler.pt, rng_<i>.pt (process i's python, numpy, torch CPU and CUDA
                   generators), method_state.pt and best_method_state.pt (the adapter methods' step state now
                   and at the best evaluation, only for a method that keeps one, e.g. AdaLoRA),
                   trainer_state.json (step, epoch, batches consumed, best tracking, history, options, fixed)

Several processes (torchrun, accelerate launch): `options.engine` picks DDP, FSDP2 or DeepSpeed ZeRO (see
engines.py). Each process takes every num_processes-th batch of batch_size rows, so one optimizer step sees
batch_size × num_processes rows. Only trainable parameters get gradients and optimizer state; the files above
hold whole tensors under every engine (gathered from the shards), optimizer.pt too (under FSDP by parameter
name, under DeepSpeed AdamW's moments by parameter name and its step), so a run resumes under the same engine
and number of processes.

`resume=True` continues from checkpoint/ exactly (same data order, optimizer, schedule, RNG and best tracking);
log.jsonl is rewritten from the checkpoint's history, so records written after the checkpoint are dropped.
`fixed` holds the caller's JSON values that must not change on resume (its data and model options); they are
kept in trainer_state.json and a resume with other values is refused before anything is written.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from safetensors.torch import save as safetensors_save
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .errors import UsageError
from .batches import make_optimizer
from ..engine.sharding import whole_parameters
from .engines import (
    Engine, deepspeed_backward_keeping_grads, full_optimizer_state, full_trainable, load_full_optimizer_state,
    load_full_trainable, resolve_engine, shard_fsdp, whole_with_gradients,
)
from .train_state import (CHECKPOINT, TrainState, check_resume, read_checkpoint,
                          rng_file, rng_state, set_rng_state, torch_bytes, write_checkpoint)

LOG = "log.jsonl"
SCHEDULES = ("linear", "cosine", "constant")  # the learning-rate schedules (after warm-up)
PRECISIONS = ("no", "bf16", "fp16")  # the mixed_precision values
FP16_ON_CPU = ("--fp16 needs a CUDA GPU (Accelerate would silently train in float32 on the CPU); use --bf16, "
               "or neither")


@dataclass
class LoopOptions:
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06  # fraction of optimizer steps; warmup_steps overrides when set
    warmup_steps: int | None = None
    schedule: str = "linear"  # "linear" | "cosine" | "constant" (after warm-up)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None  # optimizer steps between checkpoint points; None: at the end of each epoch
    early_stopping: int | None = None  # stop after this many evaluations without improving main_metric; None: off
    mixed_precision: str = "no"  # "no" | "bf16" (autocast, also on CPU) | "fp16" (GPU only)
    seed: int = 0
    log_every: int = 10  # optimizer steps between training-loss records in log.jsonl
    progress: bool = True
    device: str | None = None  # None: let Accelerate choose; "cpu" forces CPU
    engine: str | None = None  # "ddp" | "fsdp" | a DeepSpeed JSON file | None: from accelerate launch (engines.py)


@dataclass
class FitResult:
    history: list[dict]  # the log.jsonl records
    best_metrics: dict | None  # the evaluation with the best main_metric (None without main_metric)
    best_step: int | None
    steps: int  # optimizer steps taken, including those before a resume
    epochs_run: float  # epochs of data trained on (2.5: stopped half-way through the third)
    stopped_early: bool
    train_seconds: float  # training only (no evaluation or checkpoint writing), including before a resume
    peak_memory_mb: float | None  # CUDA: max_memory_allocated during fit; CPU: the process's peak RSS so far
    examples_per_second: float


def schedule_factor(kind: str, step: int, total: int, warmup: int) -> float:
    """Multiplier of the base learning rate for 0-based optimizer step `step` of `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


def warmup_steps(options: LoopOptions, total: int) -> int:
    if options.warmup_steps is not None:
        return options.warmup_steps
    return max(1, math.ceil(total * options.warmup_ratio)) if options.warmup_ratio > 0 else 0


def check_options(options: LoopOptions) -> None:
    """UsageError for any LoopOptions value the loop cannot run with; nothing is loaded or written first."""
    for name in ("epochs", "batch_size", "grad_accum", "log_every"):
        if getattr(options, name) < 1:
            raise UsageError(f"{name} must be at least 1, got {getattr(options, name)}")
    for name in ("eval_every", "early_stopping"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise UsageError(f"{name} must be at least 1 (or None), got {value}")
    if options.schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule {options.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if options.mixed_precision not in PRECISIONS:
        raise UsageError(f"unknown mixed_precision {options.mixed_precision!r}; choose one of {', '.join(PRECISIONS)}")
    if not 0 <= options.warmup_ratio <= 1:
        raise UsageError(f"warmup_ratio must be between 0 and 1, got {options.warmup_ratio}")
    if options.warmup_steps is not None and options.warmup_steps < 0:
        raise UsageError(f"warmup_steps must be at least 0, got {options.warmup_steps}")
    if not options.lr > 0:
        raise UsageError(f"lr must be positive, got {options.lr}")
    if not options.weight_decay >= 0:
        raise UsageError(f"weight_decay must be at least 0, got {options.weight_decay}")
    if options.max_grad_norm is not None and not options.max_grad_norm > 0:
        raise UsageError(f"max_grad_norm must be positive (or None: no clipping), got {options.max_grad_norm}")
    if options.early_stopping is not None and options.eval_every is None and options.epochs < 2:
        raise UsageError("--early-stopping needs several evaluations: more than one epoch, or --eval-every N")
    if options.mixed_precision == "fp16" and (options.device == "cpu"
                                              or options.device is None and not torch.cuda.is_available()):
        raise UsageError(FP16_ON_CPU)
    resolve_engine(options.engine)


def _deepspeed_plugin(options: LoopOptions, engine: Engine, on_cpu: bool):
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


def _accelerator(options: LoopOptions, engine: Engine):
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


def _peak_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _rows(batch) -> int:
    return next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))


def _improved(value: float, best: float | None, greater_is_better: bool) -> bool:
    if math.isnan(value):
        return False
    return best is None or (value > best if greater_is_better else value < best)


def fit(model, train_examples: list, collate: Callable[[list], dict], evaluate: Callable[[], dict] | None,
        main_metric: str | None, greater_is_better: bool, options: LoopOptions, run_dir: str,
        resume: bool = False, log: Callable[[str], None] = print, fixed: dict | None = None) -> FitResult:
    """Train `model` on `train_examples`; see the module docstring. Returns the run's FitResult."""
    check_options(options)
    fixed = json.loads(json.dumps(fixed or {}))  # as trainer_state.json will hold it (tuples become lists)
    if not train_examples:
        raise UsageError("no training examples")
    if main_metric is not None and evaluate is None:
        raise UsageError(f"main_metric {main_metric!r} needs an evaluate function")
    if options.early_stopping is not None and main_metric is None:
        raise UsageError("early_stopping needs an evaluate function and a main_metric")
    engine = resolve_engine(options.engine)
    # Accelerate marks the process as DeepSpeed's for good (ACCELERATE_USE_DEEPSPEED); a later fit in this
    # process must read only what the user set, so the variable gets its value back at the end.
    environment = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    try:
        accelerator = _accelerator(options, engine)
        contents = None
        if resume:
            folder, contents = read_checkpoint(run_dir)
            check_resume(folder, contents, model, options, accelerator.num_processes, engine.kind, fixed)
        try:
            return _Fit(accelerator, engine, model, train_examples, collate, evaluate, main_metric, greater_is_better,
                        options, run_dir, log, contents, fixed).run()
        finally:
            accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # drops the autocast wrapper from forward
            accelerator.free_memory()
    finally:
        if environment is None:
            os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = environment


class _Fit:
    """One call of `fit`: the prepared objects and the loop over them."""

    def __init__(self, accelerator, engine, model, examples, collate, evaluate, main_metric, greater_is_better,
                 options, run_dir, log, contents, fixed):
        self.accelerator, self.examples, self.collate, self.options = accelerator, examples, collate, options
        self.engine = engine
        self.fixed = fixed
        self.evaluate, self.main_metric, self.greater = evaluate, main_metric, greater_is_better
        self.run_dir, self.log_path = run_dir, os.path.join(run_dir, LOG)
        self.main = accelerator.is_main_process
        self.log = log if self.main else (lambda message: None)
        self.state = contents["state"] if contents else TrainState()
        self.best = contents.get("best.safetensors") if contents else None
        self.best_method_state = contents.get("best_method_state.pt") if contents else None  # goes with self.best
        if contents:
            load_full_trainable(model, contents["trainable.safetensors"])
        if accelerator.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(accelerator.device)

        # FSDP: sharding replaces the parameters, so it comes before the optimizer; Accelerate's own FSDP does
        # not run on CPU, so the model is sharded here and not handed to prepare (which would wrap it in DDP).
        fsdp = engine.kind == "fsdp"
        if fsdp:
            if not torch.distributed.is_initialized():
                raise UsageError("FSDP needs several processes: start them with torchrun or accelerate launch")
            model = shard_fsdp(model, accelerator.device)
        self.autocast = accelerator.autocast if fsdp else contextlib.nullcontext  # prepare adds it otherwise
        optimizer = make_optimizer(model, options.lr, options.weight_decay)
        loader = self._loader(self.state.epoch)
        # Each process takes every num_processes-th batch (the last ones padded to an even count).
        self.batches_per_epoch = math.ceil(len(loader) / accelerator.num_processes)
        self.total = math.ceil(self.batches_per_epoch / options.grad_accum) * options.epochs
        warmup = warmup_steps(options, self.total)
        # A prepared scheduler steps once per process at each optimizer step (under DeepSpeed too: a LambdaLR is
        # none of DeepSpeed's schedulers, so Accelerate steps it, not the engine).
        ticks = accelerator.num_processes
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda tick: schedule_factor(options.schedule, tick // ticks, self.total, warmup))
        # One prepare call: DeepSpeed builds its engine from the model, optimizer, loader and scheduler together.
        if fsdp:
            self.model = model
            self.optimizer, self.loader, self.scheduler = accelerator.prepare(optimizer, loader, scheduler)
        else:
            self.model, self.optimizer, self.loader, self.scheduler = accelerator.prepare(model, optimizer, loader,
                                                                                        scheduler)
        assert len(self.loader) == self.batches_per_epoch, (len(self.loader), self.batches_per_epoch)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        unwrapped = accelerator.unwrap_model(self.model)
        adapters = getattr(unwrapped, "base_model", None)
        # only where some method works after each step (AdaLoRA): elsewhere no gradient is kept or gathered
        self.allocate = adapters.update_and_allocate if getattr(adapters, "has_step_work", bool)() else None
        self.step_state = getattr(adapters, "step_state_dict", lambda: {})
        self.load_step_state = getattr(adapters, "load_step_state_dict", None)

        if self.main:
            os.makedirs(run_dir, exist_ok=True)
            from ..engine.checkpoint import atomic_write_text

            atomic_write_text(self.log_path, "".join(json.dumps(r) + "\n" for r in self.state.history))
        if contents:
            load_full_optimizer_state(self.model, self.optimizer.optimizer, self.engine, contents["optimizer.pt"])
            self.scheduler.load_state_dict(contents["scheduler.pt"])
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
                group["lr"] = lr  # the schedule's current rate (DeepSpeed's optimizer state does not hold it)
            if "method_state.pt" in contents:
                with whole_parameters(unwrapped, trainable_only=True, write_back=True):
                    self.load_step_state(contents["method_state.pt"])
            # last, so nothing above draws from the restored generators
            set_rng_state(contents[rng_file(accelerator.process_index)])
            self.log(f"resumed from {CHECKPOINT}/ at step {self.state.step} (epoch {self.state.epoch + 1}, "
                     f"batch {self.state.consumed})")

    def _loader(self, epoch: int) -> DataLoader:
        # The order of epoch e is a function of (seed, e) alone: a fresh generator per epoch, never the global one.
        generator = torch.Generator().manual_seed(self.options.seed * 1_000_003 + epoch)
        return DataLoader(self.examples, batch_size=self.options.batch_size, shuffle=True, generator=generator,
                          collate_fn=self.collate)

    def _epoch_progress(self) -> float:
        return round(self.state.epoch + self.state.consumed / self.batches_per_epoch, 4)

    def _record(self, record: dict) -> None:
        self.state.history.append(record)
        if self.main:
            with open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def run(self) -> FitResult:
        options, state, accelerator = self.options, self.state, self.accelerator
        bar = tqdm(total=self.total, initial=state.step, desc="train", dynamic_ncols=True,
                   disable=not (options.progress and accelerator.is_local_main_process))
        self.session_start, self.paused, self.seconds_before = time.perf_counter(), 0.0, state.train_seconds
        self.window = {"losses": [], "examples": 0, "start": time.perf_counter(), "lr": 0.0}
        micro_losses: list[float] = []
        self.model.train()
        while state.epoch < options.epochs and not state.stopped_early:
            if self.loader is None:
                self.loader = accelerator.prepare_data_loader(self._loader(state.epoch))
            batches = accelerator.skip_first_batches(self.loader, state.consumed) if state.consumed else self.loader
            for batch in batches:
                with accelerator.accumulate(self.model):
                    stepped = accelerator.sync_gradients
                    if stepped:  # before backward: DeepSpeed steps the optimizer and the schedule inside it
                        self.window["lr"] = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
                    with self.autocast():
                        loss = self.model(**batch).loss
                    grads = None
                    if stepped and self.allocate is not None and self.engine.kind == "deepspeed":
                        # DeepSpeed's step (inside backward) clears the gradients the allocation reads
                        grads = deepspeed_backward_keeping_grads(self.model, loss, self.params,
                                                                 options.max_grad_norm)
                    else:
                        accelerator.backward(loss)
                    micro_losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
                    rows = _rows(batch) * accelerator.num_processes
                    self.window["examples"] += rows
                    state.examples += rows
                    if stepped:
                        if options.max_grad_norm:  # DeepSpeed clips inside its step (its gradient_clipping)
                            accelerator.clip_grad_norm_(self.params, options.max_grad_norm)
                        self.optimizer.step()
                        self.scheduler.step()
                        if self.allocate is not None:  # after the step, while the gradients are still there
                            with whole_with_gradients(self.model, grads):
                                self.allocate(state.step)
                        self.optimizer.zero_grad(set_to_none=True)
                state.consumed += 1
                if not stepped:
                    continue
                state.step += 1
                self.window["losses"].append(sum(micro_losses) / len(micro_losses))
                micro_losses = []
                epoch_end = state.consumed == self.batches_per_epoch
                if epoch_end:
                    state.epoch, state.consumed = state.epoch + 1, 0
                bar.update(1)
                bar.set_postfix(loss=f"{sum(self.window['losses']) / len(self.window['losses']):.4f}",
                                lr=f"{self.window['lr']:.2e}", ex_s=f"{self._throughput():.1f}")
                if state.step % options.log_every == 0:
                    self._flush_window()
                if (state.step % options.eval_every == 0) if options.eval_every else epoch_end:
                    self._checkpoint_point()
                    if state.stopped_early:
                        break
            self.loader = None
        if state.checkpoint_step != state.step:
            self._checkpoint_point()
        bar.close()
        return self._finish()

    def _train_seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.session_start - self.paused

    def _throughput(self) -> float:
        return self.state.examples / max(1e-9, self._train_seconds())

    def _flush_window(self) -> None:
        window, now = self.window, time.perf_counter()
        if window["losses"]:
            self._record({"step": self.state.step, "epoch": self._epoch_progress(),
                          "loss": sum(window["losses"]) / len(window["losses"]), "lr": window["lr"],
                          "examples_per_second": window["examples"] / max(1e-9, now - window["start"])})
        self.window = {"losses": [], "examples": 0, "start": now, "lr": window["lr"]}

    def _checkpoint_point(self) -> None:
        """Flush the loss window, evaluate, update the best copy, write the checkpoint; time spent is not training."""
        self._flush_window()
        started, state = time.perf_counter(), self.state
        state.train_seconds = self._train_seconds()
        if self.evaluate is not None:
            metrics = {name: float(value) for name, value in self.evaluate().items()}
            self.model.train()
            self._record({"step": state.step, "epoch": self._epoch_progress(), "eval": metrics})
            self.log(f"epoch {self._epoch_progress():g}, step {state.step}: validation "
                     + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if self.main_metric is not None:
                self._track_best(metrics)
        state.checkpoint_step = state.step
        from accelerate.utils import gather_object

        rng_states = gather_object([rng_state()])  # every process's, in process order (all processes call it)
        trainable = full_trainable(self.accelerator.unwrap_model(self.model))  # collective under sharding
        optimizer_state = full_optimizer_state(self.model, self.optimizer.optimizer, self.engine)  # collective
        if self.main:
            self._save(trainable, optimizer_state, rng_states)
        self.accelerator.wait_for_everyone()
        self.paused += time.perf_counter() - started
        self.window["start"] = time.perf_counter()

    def _track_best(self, metrics: dict) -> None:
        state = self.state
        if self.main_metric not in metrics:
            raise UsageError(f"main_metric {self.main_metric!r} is not among the evaluated metrics "
                             f"({', '.join(metrics) or 'none'})")
        best = None if state.best_metrics is None else state.best_metrics[self.main_metric]
        if _improved(metrics[self.main_metric], best, self.greater):
            state.best_metrics, state.best_step, state.bad_evals = metrics, state.step, 0
            self.best = full_trainable(self.accelerator.unwrap_model(self.model))  # every process calls it
            self.best_method_state = copy.deepcopy(self.step_state())
        else:
            state.bad_evals += 1
            if self.options.early_stopping is not None and state.bad_evals >= self.options.early_stopping:
                state.stopped_early = True
                self.log(f"early stopping at step {state.step}: {state.bad_evals} evaluations without improving "
                         f"{self.main_metric} (best at step {state.best_step})")

    def _save(self, trainable: dict, optimizer_state: dict, rng_states: list[dict]) -> None:
        files = {
            "trainable.safetensors": safetensors_save(trainable),
            "optimizer.pt": torch_bytes(optimizer_state),
            "scheduler.pt": torch_bytes(self.scheduler.state_dict()),
            "trainer_state.json": json.dumps({"state": dataclasses.asdict(self.state),
                                              "options": dataclasses.asdict(self.options), "fixed": self.fixed,
                                              "num_processes": self.accelerator.num_processes,
                                              "engine": self.engine.kind}).encode("utf-8"),
        }
        for index, state in enumerate(rng_states):
            files[rng_file(index)] = torch_bytes(state)
        if self.best is not None:
            files["best.safetensors"] = safetensors_save(self.best)
        method_state = self.step_state()
        if method_state:  # only a method that keeps state between steps (AdaLoRA) has a file
            files["method_state.pt"] = torch_bytes(method_state)
        if self.best is not None and self.best_method_state:
            files["best_method_state.pt"] = torch_bytes(self.best_method_state)
        write_checkpoint(self.run_dir, files)

    def _finish(self) -> FitResult:
        state = self.state
        if self.best is not None:
            load_full_trainable(self.accelerator.unwrap_model(self.model), self.best)  # every process calls it
            if self.best_method_state:  # the rank pattern (AdaLoRA) that goes with those tensors
                with whole_parameters(self.accelerator.unwrap_model(self.model), trainable_only=True, write_back=True):
                    self.load_step_state(self.best_method_state)
            self.log(f"loaded the best evaluation's parameters (step {state.best_step})")
        return FitResult(history=list(state.history), best_metrics=state.best_metrics, best_step=state.best_step,
                         steps=state.step, epochs_run=self._epoch_progress(),
                         stopped_early=state.stopped_early, train_seconds=state.train_seconds,
                         peak_memory_mb=_peak_memory_mb(self.accelerator.device),
                         examples_per_second=state.examples / max(1e-9, state.train_seconds))
