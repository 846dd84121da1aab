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
engines.py); what differs between them in a step is behind stepper.Stepper, so the loop here is the same for all. Each process takes every num_processes-th batch of batch_size rows, so one optimizer step sees
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

from ..atomic_files import atomic_write_text
from ..engine.sharding import whole_parameters
from .accelerator import make_accelerator
from .engines import full_optimizer_state, full_trainable, load_full_optimizer_state, load_full_trainable, resolve_engine
from .errors import UsageError
from .stepper import Stepper
from .loop_options import LoopOptions, check_options, schedule_factor, warmup_steps
from .train_state import (CHECKPOINT, TrainState, check_resume, read_checkpoint,
                          rng_file, rng_state, set_rng_state, torch_bytes, write_checkpoint)

LOG = "log.jsonl"
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
        accelerator = make_accelerator(options, engine)
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
        self.engine, self.fixed = engine, fixed
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
        loader = self._loader(self.state.epoch)
        # Each process takes every num_processes-th batch (the last ones padded to an even count).
        self.batches_per_epoch = math.ceil(len(loader) / accelerator.num_processes)
        self.total = math.ceil(self.batches_per_epoch / options.grad_accum) * options.epochs
        self.stepper = Stepper.prepare(accelerator, engine, model, loader, options.lr, options.weight_decay,
                                       self._scheduler, options.max_grad_norm)
        self.loader = self.stepper.loader
        assert len(self.loader) == self.batches_per_epoch, (len(self.loader), self.batches_per_epoch)
        if self.main:
            os.makedirs(run_dir, exist_ok=True)
            atomic_write_text(self.log_path, "".join(json.dumps(r) + "\n" for r in self.state.history))
        if contents:
            self._restore(contents)

    def _scheduler(self, optimizer):
        # A prepared scheduler steps once per process at each optimizer step (under DeepSpeed too: a LambdaLR is
        # none of DeepSpeed's schedulers, so Accelerate steps it, not the engine).
        ticks, warmup = self.accelerator.num_processes, warmup_steps(self.options, self.total)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda tick: schedule_factor(self.options.schedule, tick // ticks, self.total, warmup))

    def _restore(self, contents: dict) -> None:
        """The optimizer, schedule, methods' step state and generators of the checkpoint being resumed."""
        stepper = self.stepper
        load_full_optimizer_state(stepper.model, stepper.optimizer.optimizer, self.engine, contents["optimizer.pt"])
        stepper.scheduler.load_state_dict(contents["scheduler.pt"])
        for group, lr in zip(stepper.optimizer.param_groups, stepper.scheduler.get_last_lr()):
            group["lr"] = lr  # the schedule's current rate (DeepSpeed's optimizer state does not hold it)
        if "method_state.pt" in contents:
            with whole_parameters(self._unwrapped(), trainable_only=True, write_back=True):
                stepper.load_step_state(contents["method_state.pt"])
        set_rng_state(contents[rng_file(self.accelerator.process_index)])  # last: nothing above draws from them
        self.log(f"resumed from {CHECKPOINT}/ at step {self.state.step} (epoch {self.state.epoch + 1}, "
                 f"batch {self.state.consumed})")

    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.stepper.model)

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
        state, accelerator, stepper = self.state, self.accelerator, self.stepper
        self.bar = tqdm(total=self.total, initial=state.step, desc="train", dynamic_ncols=True,
                        disable=not (self.options.progress and accelerator.is_local_main_process))
        self.session_start, self.paused, self.seconds_before = time.perf_counter(), 0.0, state.train_seconds
        self.window = {"losses": [], "examples": 0, "start": time.perf_counter(), "lr": 0.0}
        micro_losses: list[float] = []
        stepper.model.train()
        while state.epoch < self.options.epochs and not state.stopped_early:
            loader = self.loader or accelerator.prepare_data_loader(self._loader(state.epoch))
            for batch in accelerator.skip_first_batches(loader, state.consumed) if state.consumed else loader:
                with accelerator.accumulate(stepper.model):
                    stepping = accelerator.sync_gradients
                    if stepping:  # before backward: DeepSpeed steps the optimizer and the schedule inside it
                        self.window["lr"] = stepper.lr
                    loss = stepper.loss(batch)
                    stepper.backward(loss, stepping)
                    micro_losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
                    self._count_rows(batch)
                    if stepping:
                        stepper.step(state.step)
                state.consumed += 1
                if stepping:
                    self._after_step(sum(micro_losses) / len(micro_losses))
                    micro_losses = []
                    if state.stopped_early:
                        break
            self.loader = None
        if state.checkpoint_step != state.step:
            self._checkpoint_point()
        self.bar.close()
        return self._finish()

    def _count_rows(self, batch: dict) -> None:
        rows = _rows(batch) * self.accelerator.num_processes
        self.window["examples"] += rows
        self.state.examples += rows

    def _after_step(self, loss: float) -> None:
        """The bookkeeping of an optimizer step: position, progress bar, loss log, checkpoint point."""
        state, options = self.state, self.options
        state.step += 1
        self.window["losses"].append(loss)
        epoch_end = state.consumed == self.batches_per_epoch
        if epoch_end:
            state.epoch, state.consumed = state.epoch + 1, 0
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{sum(self.window['losses']) / len(self.window['losses']):.4f}",
                             lr=f"{self.window['lr']:.2e}", ex_s=f"{self._throughput():.1f}")
        if state.step % options.log_every == 0:
            self._flush_window()
        if (state.step % options.eval_every == 0) if options.eval_every else epoch_end:
            self._checkpoint_point()

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
            self.stepper.model.train()
            self._record({"step": state.step, "epoch": self._epoch_progress(), "eval": metrics})
            self.log(f"epoch {self._epoch_progress():g}, step {state.step}: validation "
                     + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if self.main_metric is not None:
                self._track_best(metrics)
        state.checkpoint_step = state.step
        from accelerate.utils import gather_object

        rng_states = gather_object([rng_state()])  # every process's, in process order (all processes call it)
        trainable = full_trainable(self._unwrapped())  # collective under sharding
        optimizer_state = full_optimizer_state(self.stepper.model, self.stepper.optimizer.optimizer, self.engine)  # collective
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
            self.best = full_trainable(self._unwrapped())  # every process calls it
            self.best_method_state = copy.deepcopy(self.stepper.step_state())
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
            "scheduler.pt": torch_bytes(self.stepper.scheduler.state_dict()),
            "trainer_state.json": json.dumps({"state": dataclasses.asdict(self.state),
                                              "options": dataclasses.asdict(self.options), "fixed": self.fixed,
                                              "num_processes": self.accelerator.num_processes,
                                              "engine": self.engine.kind}).encode("utf-8"),
        }
        for index, state in enumerate(rng_states):
            files[rng_file(index)] = torch_bytes(state)
        if self.best is not None:
            files["best.safetensors"] = safetensors_save(self.best)
        method_state = self.stepper.step_state()
        if method_state:  # only a method that keeps state between steps (AdaLoRA) has a file
            files["method_state.pt"] = torch_bytes(method_state)
        if self.best is not None and self.best_method_state:
            files["best_method_state.pt"] = torch_bytes(self.best_method_state)
        write_checkpoint(self.run_dir, files)

    def _finish(self) -> FitResult:
        state = self.state
        if self.best is not None:
            load_full_trainable(self._unwrapped(), self.best)  # every process calls it
            if self.best_method_state:  # the rank pattern (AdaLoRA) that goes with those tensors
                with whole_parameters(self._unwrapped(), trainable_only=True, write_back=True):
                    self.stepper.load_step_state(self.best_method_state)
            self.log(f"loaded the best evaluation's parameters (step {state.best_step})")
        return FitResult(history=list(state.history), best_metrics=state.best_metrics, best_step=state.best_step,
                         steps=state.step, epochs_run=self._epoch_progress(),
                         stopped_early=state.stopped_early, train_seconds=state.train_seconds,
                         peak_memory_mb=_peak_memory_mb(self.accelerator.device),
                         examples_per_second=state.examples / max(1e-9, state.train_seconds))
