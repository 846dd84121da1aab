"""The files of a training checkpoint (checkpoint/ in a run folder): adapter-only, written atomically.

    trainable.safetensors   the trainable tensors by parameter name (adapter and head; the whole model for full)
    best.safetensors        the best evaluation's copy of them, when there is one
    optimizer.pt, scheduler.pt   their states
    rng_<i>.pt              process i's generators (python, numpy, torch CPU and CUDA), one file per process
    method_state.pt         what adapter methods keep between steps (AdaLoRA's importance scores and rank
                            pattern), only when a method keeps any
    best_method_state.pt    the same at the best evaluation, kept with best.safetensors, when both exist
    trainer_state.json      position, best tracking, history, the options and the caller's `fixed` values
                            that must not change on resume
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as safetensors_load

from ..atomic_files import honour_umask, write_synced
from ..engine.sharding import shape
from .errors import UsageError

CHECKPOINT = "checkpoint"
# Options that decide the data order, the schedule or the optimizer: a resume must use the checkpoint's values.
FIXED_ON_RESUME = ("epochs", "batch_size", "grad_accum", "seed", "schedule", "warmup_ratio", "warmup_steps",
                   "lr", "weight_decay")
OPTIONAL_FILES = ("best.safetensors", "method_state.pt", "best_method_state.pt")


@dataclass
class TrainState:
    """What trainer_state.json holds besides the options: the run's position and its best-tracking."""
    step: int = 0  # optimizer steps done
    epoch: int = 0  # 0-based epoch in progress
    consumed: int = 0  # batches of that epoch already trained on (by this process)
    best_metrics: dict | None = None
    best_step: int | None = None
    bad_evals: int = 0  # evaluations in a row without improvement
    checkpoint_step: int | None = None  # step of the last checkpoint point
    stopped_early: bool = False
    examples: int = 0
    train_seconds: float = 0.0
    history: list = field(default_factory=list)


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def cpu_copy(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in trainable(model).items()}


def first_mismatch(model, tensors: dict[str, torch.Tensor]) -> str | None:
    params = trainable(model)
    for name, p in params.items():
        if name not in tensors:
            return f"the model trains {name}, which the checkpoint lacks"
        if tuple(tensors[name].shape) != tuple(shape(p)):
            return f"{name} has shape {tuple(tensors[name].shape)} in the checkpoint, {tuple(shape(p))} in the model"
    extra = next((name for name in tensors if name not in params), None)
    return None if extra is None else f"the checkpoint holds {extra}, which the model does not train"


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        name, keys, pos, has_gauss, gauss = numpy.random.get_state()
        state["numpy"] = (name, keys.tolist(), pos, has_gauss, gauss)
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy

        name, keys, pos, has_gauss, gauss = state["numpy"]
        numpy.random.set_state((name, numpy.array(keys, dtype=numpy.uint32), pos, has_gauss, gauss))


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def write_checkpoint(run_dir: str, files: dict[str, bytes]) -> None:
    """Write the files into a temporary folder, then swap it in for checkpoint/. Until the swap the previous
    checkpoint is untouched; between its two renames it survives as checkpoint.old, which resume also reads."""
    final = os.path.join(run_dir, CHECKPOINT)
    old = final + ".old"
    tmp = tempfile.mkdtemp(prefix=".checkpoint-", dir=run_dir)
    honour_umask(tmp)
    try:
        for name, data in files.items():
            write_synced(os.path.join(tmp, name), data)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def rng_file(process_index: int) -> str:
    return f"rng_{process_index}.pt"


def _read(folder: str, name: str, read, contents: dict) -> None:
    path = os.path.join(folder, name)
    if name in OPTIONAL_FILES and not os.path.exists(path):
        return
    try:
        with open(path, "rb") as fh:
            contents[name] = read(fh.read())
    except FileNotFoundError:
        raise UsageError(f"cannot resume from {folder}: {name} is missing") from None
    except Exception as exc:  # any parse failure means a damaged file
        raise UsageError(f"cannot resume from {folder}: {name} is damaged ({type(exc).__name__}: {exc})") from None


def read_checkpoint(run_dir: str) -> tuple[str, dict]:
    """checkpoint/'s contents, every file parsed; UsageError naming the folder and the file that is wrong."""
    folder = os.path.join(run_dir, CHECKPOINT)
    if not os.path.isdir(folder) and os.path.isdir(folder + ".old"):
        folder += ".old"
    if not os.path.isdir(folder):
        raise UsageError(f"cannot resume: no checkpoint folder {folder}")
    def torch_load(data: bytes):
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

    readers = {
        "trainer_state.json": lambda data: json.loads(data.decode("utf-8")),
        "trainable.safetensors": safetensors_load,
        "optimizer.pt": torch_load,
        "scheduler.pt": torch_load,
        "best.safetensors": safetensors_load,
        "method_state.pt": torch_load,
        "best_method_state.pt": torch_load,
    }
    contents = {}
    for name, read in readers.items():
        _read(folder, name, read, contents)
    saved = contents["trainer_state.json"]
    try:
        contents["state"] = TrainState(**saved["state"])
        contents["options"] = dict(saved["options"])
        contents["fixed"] = dict(saved.get("fixed") or {})
        contents["num_processes"] = int(saved["num_processes"])
        contents["engine"] = str(saved.get("engine", "ddp"))
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"cannot resume from {folder}: trainer_state.json is damaged ({exc})") from None
    for index in range(contents["num_processes"]):
        _read(folder, rng_file(index), torch_load, contents)
    return folder, contents


def check_resume(folder: str, contents: dict, model, options, num_processes: int, engine: str, fixed: dict) -> None:
    """UsageError unless the run can continue from `contents`: the same FIXED_ON_RESUME options, the same
    caller's `fixed` values (JSON-normalised), the same number of processes and kind of engine (the
    optimizer state's form), and tensors that fit the model."""
    loop = [name for name in FIXED_ON_RESUME if contents["options"].get(name) != getattr(options, name)]
    changed = [f"{name} ({contents['options'].get(name)!r} in the checkpoint, {getattr(options, name)!r} now)"
               for name in loop]
    changed += [f"{name} ({contents['fixed'].get(name)!r} in the checkpoint, {fixed.get(name)!r} now)"
                for name in sorted(set(contents["fixed"]) | set(fixed))  # a name the loop's values named already: once
                if contents["fixed"].get(name) != fixed.get(name) and name not in loop]
    if changed:
        raise UsageError(f"cannot resume from {folder}: options differ from the checkpoint's: {', '.join(changed)}; "
                         f"resume with the same options")
    if contents["num_processes"] != num_processes:
        raise UsageError(f"cannot resume from {folder}: it was written by {contents['num_processes']} processes, "
                         f"this run has {num_processes}")
    if contents["engine"] != engine:
        raise UsageError(f"cannot resume from {folder}: it was written under {contents['engine']}, this run uses "
                         f"{engine}; resume under {contents['engine']}")
    for name in ("trainable.safetensors", "best.safetensors"):
        problem = first_mismatch(model, contents[name]) if name in contents else None
        if problem:
            raise UsageError(f"cannot resume from {folder}: {name} does not fit the model: {problem}")


